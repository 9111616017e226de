"""Growing event storage: batches kept as chunks, the DataFrame built lazily and cached.

Appending is O(batch); a DataFrame is assembled only when asked for, after which the
chunks are merged into one so the next assembly does not re-concatenate hundreds of
small arrays. With `max_rows`, the oldest rows go first and are counted in `evicted`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .readers.batch import Batch, concat_records
from .schema import Schema


@dataclass
class _Chunk:
    records: np.ndarray
    seq0: int  # arrival sequence number of records[0]
    arrival_ns: np.ndarray  # per record (int64 monotonic ns of the read that brought it)
    cpu: np.ndarray | None


class FrameStore:
    """Chunks of one output map's records, with a cached DataFrame view."""

    def __init__(self, schema: Schema, max_rows: int | None = None) -> None:
        if max_rows is not None and max_rows <= 0:
            raise ValueError("max_rows must be positive or None")
        self.schema = schema
        self.max_rows = max_rows
        self._chunks: list[_Chunk] = []
        self._rows = 0
        self.received = 0  # every record ever appended, evicted ones included
        self.evicted = 0
        self._frame: pd.DataFrame | None = None
        self._lock = threading.Lock()
        # record + arrival time (+ CPU for perf buffers): what one stored row costs
        self._row_bytes = schema.dtype.itemsize + 8 + (2 if schema.per_cpu else 0)

    def __len__(self) -> int:
        return self._rows

    @property
    def nbytes(self) -> int:
        """Bytes held by stored records and their per-record metadata (not the cached frame)."""
        return self._rows * self._row_bytes

    def tail_chunks(self, n: int) -> list[_Chunk]:
        """The newest chunks holding at least `n` rows (fewer if the store has fewer), oldest
        first, without merging the store: cheap enough for a plot refreshing a few times a second."""
        with self._lock:
            picked, rows = [], 0
            for c in reversed(self._chunks):
                if rows >= n:
                    break
                picked.append(c)
                rows += len(c.records)
        picked.reverse()
        return picked

    def append(self, batch: Batch, arrival_ns: int) -> None:
        n = len(batch.records)
        if not n:
            return
        self.schema.check(batch.records)
        arrival = np.full(n, arrival_ns, dtype=np.int64)
        cpu = batch.cpu.astype(np.int16, copy=False) if batch.cpu is not None else None
        with self._lock:
            self._chunks.append(_Chunk(batch.records, self.received, arrival, cpu))
            self.received += n
            self._rows += n
            self._frame = None
            if self.max_rows is not None and self._rows > self.max_rows:
                self._evict(self._rows - self.max_rows)

    def _evict(self, count: int) -> None:
        self.evicted += count
        self._rows -= count
        while count:
            first = self._chunks[0]
            n = len(first.records)
            if n <= count:
                self._chunks.pop(0)
                count -= n
            else:
                cpu = first.cpu[count:] if first.cpu is not None else None
                self._chunks[0] = _Chunk(
                    first.records[count:].copy(),
                    first.seq0 + count,
                    first.arrival_ns[count:].copy(),
                    cpu.copy() if cpu is not None else None,
                )
                count = 0

    def _merged(self) -> _Chunk:
        if len(self._chunks) > 1:
            cpus = [c.cpu for c in self._chunks]
            self._chunks = [
                _Chunk(
                    concat_records([c.records for c in self._chunks], self.schema.dtype),
                    self._chunks[0].seq0,
                    np.concatenate([c.arrival_ns for c in self._chunks]),
                    np.concatenate(cpus) if all(c is not None for c in cpus) else None,  # type: ignore[arg-type]
                )
            ]
        if not self._chunks:
            return _Chunk(np.empty(0, self.schema.dtype), self.received, np.empty(0, np.int64), None)
        return self._chunks[0]

    def chunk(self) -> _Chunk:
        """All stored records with their arrival times and CPUs, merged into one chunk."""
        with self._lock:
            return self._merged()

    def records(self) -> np.ndarray:
        """All stored records as one structured array (oldest first)."""
        with self._lock:
            return self._merged().records

    def frame(self) -> pd.DataFrame:
        with self._lock:
            if self._frame is None:
                c = self._merged()
                seq = np.arange(c.seq0, c.seq0 + len(c.records), dtype=np.int64)
                self._frame = self.schema.frame(c.records, seq, c.arrival_ns, c.cpu)
            return self._frame

    def clear(self) -> None:
        with self._lock:
            self.evicted += self._rows
            self._chunks.clear()
            self._rows = 0
            self._frame = None
