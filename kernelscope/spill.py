"""The memory budget for stored events, and the Parquet files rows spill to beyond it.

Stored events (raw records plus the converted columns `df` reads) count against a budget:
process-wide by default a quarter of the machine's RAM (`set_memory_budget()` changes it),
and optionally per output map (`Probe(max_bytes=...)`). Beyond it a store writes its oldest
rows to Parquet segment files in a folder of its own under the cache folder, reads them back
when a frame asks for everything, and deletes the folder when it is freed. Folders whose
process is gone (killed) are removed the next time a store spills.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import folders, host
from .readers.batch import packed

SHARE_OF_RAM = 0.25  # default budget: what stored events may take of MemTotal, all stores together
WARN_AT = 0.8  # a warning once a store's memory reaches this share of its budget
SPILL_PREFIX = "spill-"  # a store's folder under host.cache_dir("spill"), named for its process
SPILL_DISK_SHARE = 0.5  # default disk limit: this share of the free space where spills go
_budget: int | None = None  # set_memory_budget(); None: SHARE_OF_RAM of MemTotal
_disk_limit: int | None = None


@functools.cache  # read once: every stored batch checks the budget
def mem_total(meminfo: str = "/proc/meminfo") -> int:
    """Bytes of RAM (MemTotal), or 8 GiB when /proc/meminfo cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(meminfo) as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def set_memory_budget(max_bytes: int | None = None, *, spill_bytes: int | None = None) -> None:
    """Set the process-wide budget for stored events (bytes; None: a quarter of RAM) and,
    optionally, the disk space spilled rows may take (None: half the free space)."""
    global _budget, _disk_limit
    for name, value in (("max_bytes", max_bytes), ("spill_bytes", spill_bytes)):
        check_bytes(name, value)
    _budget = max_bytes
    _disk_limit = spill_bytes


def check_bytes(name: str, value: object) -> None:
    """A SettingError unless `value` is None or a positive int of bytes."""
    from .errors import SettingError

    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SettingError(
            f"{name} must be a positive number of bytes (e.g. 2 * 2**30 for 2 GiB) or None, "
            f"not {value!r}"
        )


def memory_budget() -> int:
    """The process-wide budget for stored events, in bytes."""
    return _budget if _budget is not None else int(mem_total() * SHARE_OF_RAM)


class Accounted(Protocol):
    @property
    def memory_bytes(self) -> int: ...


_stores: weakref.WeakSet[Any] = weakref.WeakSet()


def register(store: Accounted) -> None:
    _stores.add(store)


def process_memory() -> int:
    """Bytes held by every live store in this process (what the process-wide budget caps)."""
    return sum(s.memory_bytes for s in list(_stores))


# --- segment files ----------------------------------------------------------------------


@dataclass
class Segment:
    """Rows spilled to one Parquet file: seq0 .. seq0+rows, the first `skip` since evicted."""

    path: Path
    seq0: int
    rows: int
    nbytes: int  # file size
    skip: int = 0

    @property
    def live(self) -> int:
        return self.rows - self.skip


class SpillDir:
    """A store's own folder of segment files; removed when the store is freed or at exit."""

    def __init__(self, root: Path | None = None) -> None:
        root = root or host.cache_dir("spill")
        root.mkdir(parents=True, exist_ok=True)
        self.path = folders.owned_dir(root, SPILL_PREFIX)
        self._names = itertools.count()
        self.limit = _disk_limit if _disk_limit is not None else int(
            shutil.disk_usage(self.path).free * SPILL_DISK_SHARE)
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def write(self, records: np.ndarray, arrival_ns: np.ndarray, cpu: np.ndarray | None,
              seq0: int) -> Segment:
        """Rows as one Parquet file: each record's raw bytes (padding included, so any C
        struct round-trips exactly), its arrival time and CPU."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = len(records)
        raw = packed(records).view(np.uint8)
        rec = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(records.dtype.itemsize), n, [None, pa.py_buffer(raw)])
        cols = {"rec": rec, "arrival_ns": pa.array(arrival_ns)}
        if cpu is not None:
            cols["cpu"] = pa.array(cpu)
        path = self.path / f"{next(self._names):08d}.parquet"
        pq.write_table(pa.table(cols), path, use_dictionary=False, compression="lz4")
        return Segment(path, seq0, n, path.stat().st_size)

    @staticmethod
    def read(seg: Segment, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """A segment's live rows back: (records, arrival_ns, cpu)."""
        import pyarrow.parquet as pq

        t = pq.read_table(seg.path)
        rec = t.column("rec").combine_chunks()
        data = rec.buffers()[1]
        start = rec.offset * dtype.itemsize
        records = np.frombuffer(data, dtype=dtype, count=len(rec), offset=start)
        arrival = t.column("arrival_ns").to_numpy()
        cpu = t.column("cpu").to_numpy() if "cpu" in t.column_names else None
        k = seg.skip
        return records[k:], arrival[k:], cpu[k:] if cpu is not None else None

    @staticmethod
    def delete(seg: Segment) -> None:
        with contextlib.suppress(OSError):
            seg.path.unlink()

    def close(self) -> None:
        self._finalizer()
