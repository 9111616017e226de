"""Writing into a BPF_MAP_TYPE_USER_RINGBUF (Linux 6.1): user space produces, a program drains.

    probe.send("user_ringbuf", [{"pid": 1, "value": 7}, ...], timeout=1.0)

libbpf's `user_ring_buffer__reserve` / `__submit` do the protocol (an 8-byte header per
sample, BUSY until submitted, 8-byte aligned); this module turns rows (numpy structured
array, DataFrame, dicts) into samples of the program's struct, one reserve/copy/submit
each. When the ring is full the kernel consumer has not drained it yet: `timeout` > 0
waits for space (libbpf's `__reserve_blocking`: the kernel wakes the producer after each
drain), and when there is still none, UserRingFullError says how many records went in and
how many did not. Nothing is dropped without an error.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from . import libbpf
from .errors import ClosedError, SchemaError, UserRingFullError

PAGE = mmap.PAGESIZE


def to_records(records: Any, dtype: np.dtype | None, where: str = "send") -> np.ndarray:
    """Rows as a structured array of `dtype` (missing fields zero, unknown fields an error)."""
    if isinstance(records, np.ndarray) and records.dtype.names:
        if dtype is None or records.dtype == dtype:
            return np.ascontiguousarray(records)
        frame = pd.DataFrame({n: list(records[n]) for n in records.dtype.names})
    elif isinstance(records, pd.DataFrame):
        frame = records
    elif isinstance(records, Mapping):
        frame = pd.DataFrame([records])
    elif isinstance(records, Iterable) and not isinstance(records, (str, bytes)):
        rows = list(records)
        if rows and not all(isinstance(r, Mapping) for r in rows):
            raise SchemaError(f"{where}: records must be dicts, a DataFrame or a numpy structured array")
        frame = pd.DataFrame(rows)
    else:
        raise SchemaError(f"{where}: records must be dicts, a DataFrame or a numpy structured array, "
                          f"not {type(records).__name__}")
    if dtype is None:
        raise SchemaError(f"{where}: the sample struct of this map is unknown; pass a numpy structured "
                          "array, or dtypes={map: 'struct NAME'} to Probe")
    names = dtype.names or ()
    unknown = [c for c in frame.columns if c not in names]
    if unknown:
        raise SchemaError(f"{where}: {', '.join(map(str, unknown))} not in the sample struct "
                          f"(fields: {', '.join(names)})")
    out = np.zeros(len(frame), dtype=dtype)
    for col in frame.columns:
        values = frame[col].to_numpy()
        kind = dtype.fields[col][0].kind  # type: ignore[index]
        if kind == "S":
            values = np.array([v.encode() if isinstance(v, str) else v for v in values])
        try:
            out[col] = values
        except (ValueError, TypeError) as e:
            raise SchemaError(f"{where}: column {col!r} does not fit {dtype.fields[col][0]}: {e}") from None  # type: ignore[index]
    return out


class UserRing:
    """The producer side of one user ring buffer map (libbpf's user_ring_buffer)."""

    def __init__(self, name: str, fd: int, size: int, dtype: np.dtype | None) -> None:
        self.name = name
        self.size = size
        self.dtype = dtype
        self.sent = 0
        self.full = 0  # sends that found the ring full (waited or raised)
        self._lock = threading.Lock()  # libbpf: reserve is not thread safe
        self._rb: int | None = libbpf.check_ptr(libbpf.lib().user_ring_buffer__new(fd, None),
                                                f"{name}: user_ring_buffer__new")
        # consumer_pos (page 0) and producer_pos (page 1), read-only: the fill level
        self._pos: mmap.mmap | None = mmap.mmap(fd, 2 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ)

    @property
    def closed(self) -> bool:
        return self._rb is None

    def fill_bytes(self) -> int:
        """Bytes written (headers included) that the kernel has not drained yet."""
        if self._pos is None:
            return 0
        cons = int.from_bytes(self._pos[0:8], "little")
        prod = int.from_bytes(self._pos[PAGE:PAGE + 8], "little")
        return prod - cons

    def send(self, records: Any, timeout: float = 0.0) -> int:
        """Reserve, fill and submit one sample per record, in order. Returns how many were sent.

        `timeout`: seconds to wait for room in total when the ring is full (0: do not wait).
        Raises UserRingFullError (with .sent/.remaining) when records are left over.
        """
        if self._rb is None:
            raise ClosedError(f"{self.name}: the probe is closed")
        arr = to_records(records, self.dtype, f"send to {self.name}")
        n, size = len(arr), arr.dtype.itemsize
        if n and size + 8 > self.size:
            raise ValueError(f"{self.name}: a {size}-byte sample does not fit the ring ({self.size} bytes)")
        so = libbpf.lib()
        buf = arr.tobytes()
        base = ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value or 0
        deadline = time.monotonic() + timeout
        with self._lock:
            for i in range(n):
                p = so.user_ring_buffer__reserve(self._rb, size)
                if not p:
                    err = ctypes.get_errno()
                    if err != _errno.ENOSPC:
                        raise OSError(err, f"{self.name}: user_ring_buffer__reserve: {os.strerror(err)}")
                    self.full += 1
                    # wait in slices of at most 100 ms, so that Ctrl-C is seen between them
                    while not p and (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
                        p = so.user_ring_buffer__reserve_blocking(self._rb, size, min(left_ms, 100))
                    if not p:
                        raise UserRingFullError(
                            f"{self.name}: the user ring buffer is full ({self.size} bytes, "
                            f"{self.fill_bytes()} waiting for the program to drain); {i} of {n} records "
                            f"sent, {n - i} not. The program drains only when it runs: trigger its "
                            "attach point, send with a timeout, or use a bigger ring (pages=...).",
                            sent=i, remaining=n - i)
                ctypes.memmove(p, base + i * size, size)
                so.user_ring_buffer__submit(self._rb, p)
                self.sent += 1
        return n

    def close(self) -> None:
        with self._lock:
            if self._rb is not None:
                libbpf.lib().user_ring_buffer__free(self._rb)
                self._rb = None
            if self._pos is not None:
                self._pos.close()
                self._pos = None
