"""IP addresses from event columns: the forms BPF tools store them in, as text.

    from kernelscope import ip_address
    df["src"] = ip_address(df, "saddr", family=df["family"])

Tools copy an address's bytes as the kernel keeps them (network order) into a 16-byte field:
`unsigned __int128 saddr` (columns `saddr.lo`/`saddr.hi`, see schema.WIDE), `__u8 saddr[16]`
or `__u32 saddr_v6[4]`; an IPv4 address sits in the first 4 bytes, or in a `__u32` of its own.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import numpy as np
import pandas as pd

AF_INET = socket.AF_INET  # 2
AF_INET6 = socket.AF_INET6  # 10


def address_bytes(frame: pd.DataFrame, column: str) -> np.ndarray:
    """The address bytes of `column` in each row, as a (rows, 16) uint8 array (network order)."""
    lo, hi = f"{column}.lo", f"{column}.hi"
    n = len(frame)
    if lo in frame.columns and hi in frame.columns:  # a 128-bit integer: two little-endian u64
        halves = np.stack([frame[lo].to_numpy(np.uint64), frame[hi].to_numpy(np.uint64)], axis=1)
        return halves.astype("<u8").view(np.uint8).reshape(n, 16)
    if column not in frame.columns:
        raise KeyError(f"no column {column!r} (nor {lo!r}/{hi!r}); columns: {', '.join(frame.columns)}")
    col = frame[column]
    out = np.zeros((n, 16), np.uint8)
    if n == 0:
        return out
    first = col.iloc[0]
    if isinstance(first, (bytes, bytearray)):
        for i, v in enumerate(col):
            b = bytes(v)[:16]
            out[i, : len(b)] = np.frombuffer(b, np.uint8)
    elif isinstance(first, np.ndarray):  # u8[16], u32[4]: the raw bytes of each row's array
        for i, v in enumerate(col):
            arr = np.ascontiguousarray(v).view(np.uint8)[:16]
            out[i, : len(arr)] = arr
    else:  # a __u32 IPv4 address, as the kernel keeps it (network order in memory)
        out[:, :4] = col.to_numpy(np.uint32).astype("<u4").view(np.uint8).reshape(n, 4)
    return out


def ip_address(frame: pd.DataFrame, column: str, family: Any = None) -> pd.Series:
    """Column `column` of `frame` as address text ("127.0.0.1", "::1"), one per row.

    `family`: AF_INET (2) or AF_INET6 (10), one for all rows or a column of them (the
    event's `family` field); None takes a row as IPv4 when its last 12 bytes are zero (so an
    all-zero address reads "0.0.0.0"), else IPv6. A family that is neither gives None.
    """
    raw = address_bytes(frame, column)
    if family is None:
        fams = np.where(raw[:, 4:].any(axis=1), AF_INET6, AF_INET)
    else:
        fams = np.broadcast_to(np.asarray(family, dtype=np.int64), (len(frame),))
    text: list[str | None] = []
    for b, fam in zip(raw, fams, strict=True):
        if fam == AF_INET:
            text.append(str(ipaddress.IPv4Address(b[:4].tobytes())))
        elif fam == AF_INET6:
            text.append(str(ipaddress.IPv6Address(b.tobytes())))
        else:
            text.append(None)
    return pd.Series(text, index=frame.index, name=column, dtype=object)
