"""Map snapshots in a capture: the aggregation maps (counts, histograms, globals) as they were
at stop(), so a replay shows the same `probe.maps[name].frame()`.

Each snapshot is stored as rows of the capture's one Parquet table, as events are: `map` is
the map's name, `record` the key bytes followed by the value bytes (every CPU's for a per-CPU
map), `ks_seq` the row number, `ks_arrival_ns` the snapshot's time, `ks_cpu` -1. The
metadata's `tables.NAME` gives the key and value dtypes (the capture's dtype JSON: offsets,
padding and nesting exact), the kind, the CPU count and the row count and checksums (format 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CaptureError
from ..maps.syscall import value_bytes
from .meta import dtype_from_json, dtype_to_json, need


@dataclass
class TableCapture:
    """One map's snapshot: raw keys (n, key_size) and values (n, value bytes) as uint8."""

    name: str
    kind: str
    key_dtype: np.dtype
    value_dtype: np.dtype
    max_entries: int
    ncpus: int
    per_cpu: bool
    keys: np.ndarray
    values: np.ndarray
    taken_ns: int  # time.time_ns() of the snapshot
    typed: bool = True  # False: the program gave no types (kernelscope showed unsigned ints/bytes)

    @property
    def records(self) -> np.ndarray:
        """Each element as one byte string: key bytes, then value bytes."""
        n = len(self.keys)  # explicit widths: an empty map has n = 0, where reshape(0, -1) fails
        width = value_bytes(self.value_dtype.itemsize, self.per_cpu, self.ncpus)
        return np.concatenate([self.keys.reshape(n, self.key_dtype.itemsize), self.values.reshape(n, width)],
                              axis=1)


def to_meta(tc: TableCapture) -> dict[str, Any]:
    return {"kind": tc.kind, "key_dtype": dtype_to_json(tc.key_dtype),
            "value_dtype": dtype_to_json(tc.value_dtype), "max_entries": tc.max_entries,
            "ncpus": tc.ncpus, "per_cpu": tc.per_cpu, "key_size": int(tc.keys.shape[1]),
            "value_bytes": int(tc.values.shape[1]), "taken_ns": tc.taken_ns, "typed": tc.typed}


def _dtype(obj: Any, key: str) -> np.dtype:
    try:
        dt = dtype_from_json(obj)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as e:
        raise CaptureError(f"metadata key '{key}' is not a numpy dtype description ({e})") from None
    if dt.hasobject or dt.itemsize <= 0:
        raise CaptureError(f"metadata key '{key}' describes {dt}, which no map key or value can have")
    return dt


def check(m: Any, where: str) -> tuple[np.dtype, np.dtype]:
    """One `tables.NAME` entry checked before use; its key and value dtypes."""
    if not isinstance(m, dict):
        raise CaptureError(f"metadata key '{where}' should be an object")
    need(m, "kind", where, "str")
    key = _dtype(m.get("key_dtype"), f"{where}.key_dtype") if "key_dtype" in m else None
    value = _dtype(m.get("value_dtype"), f"{where}.value_dtype") if "value_dtype" in m else None
    if key is None or value is None:
        missing = "key_dtype" if key is None else "value_dtype"
        raise CaptureError(f"metadata key '{where}.{missing}' is missing")
    for k in ("max_entries", "ncpus", "key_size", "value_bytes", "rows"):
        need(m, k, where, "count")
    need(m, "taken_ns", where, "int")
    need(m, "sha256", where, "object")
    if not isinstance(m.get("per_cpu"), bool):
        raise CaptureError(f"metadata key '{where}.per_cpu' should be true or false")
    if m["key_size"] != key.itemsize:
        raise CaptureError(f"metadata key '{where}.key_size' is {m['key_size']}, its key dtype has "
                           f"{key.itemsize}")
    want = value_bytes(value.itemsize, m["per_cpu"], m["ncpus"])
    if m["value_bytes"] != want:
        raise CaptureError(f"metadata key '{where}.value_bytes' is {m['value_bytes']}, its value dtype "
                           f"needs {want}")
    return key, value


def from_rows(name: str, m: dict[str, Any], key: np.dtype, value: np.dtype, *, lengths: np.ndarray,
              data: np.ndarray) -> TableCapture:
    """A snapshot from its rows' record bytes (`lengths`, `data`: the binary column's parts)."""
    ks, vb = int(m["key_size"]), int(m["value_bytes"])
    if (lengths != ks + vb).any():
        raise CaptureError(f"map snapshot {name!r}: records are not {ks} + {vb} bytes")
    rows = data.reshape(len(lengths), ks + vb) if len(lengths) else np.empty((0, ks + vb), np.uint8)
    return TableCapture(name, m["kind"], key, value, int(m["max_entries"]), int(m["ncpus"]),
                        bool(m["per_cpu"]), rows[:, :ks].copy(), rows[:, ks:].copy(), int(m["taken_ns"]),
                        bool(m.get("typed", True)))
