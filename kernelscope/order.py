"""Ordering: how far arrival order strays from timestamp order, and a window that mends it.

A ring buffer hands out records in reservation order, which is nearly timestamp order;
perf buffers are per CPU, so a reader that empties them one CPU after another sees each
CPU's events in order but the CPUs interleaved out of order.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from .readers.batch import Batch, concat_records, take_records


class OrderTracker:
    """Counts timestamp inversions in arrival order: records older than one seen before."""

    def __init__(self, ts_field: str) -> None:
        self.ts_field = ts_field
        self.max_seen = 0
        self.inversions = 0
        self.max_inversion_ns = 0

    def update(self, records: np.ndarray, ordered: bool = False,
               runs: Sequence[int] | None = None) -> None:
        """`ordered`: the reader already found the batch's timestamps never decrease. `runs`:
        lengths of the consecutive pieces the batch is made of, each one buffer's records in
        their arrival order (a perf read: one piece per CPU)."""
        if not len(records):
            return
        if ordered and int(records[self.ts_field][0]) >= self.max_seen:
            self.max_seen = int(records[self.ts_field][-1])
            return
        start = 0
        for n in runs if runs is not None and len(runs) > 1 else (len(records),):
            self._piece(records[self.ts_field][start : start + n])
            start += n

    def _piece(self, ts: np.ndarray) -> None:
        if not len(ts):
            return
        if not (ts[1:] < ts[:-1]).any():
            # in order within itself (the usual piece): the late records are those older
            # than the max before the piece, a prefix found by bisection; no running max
            behind = bisect.bisect_left(_Values(ts), self.max_seen)
            if behind:
                self.inversions += behind
                self.max_inversion_ns = max(self.max_inversion_ns, self.max_seen - int(ts[0]))
            self.max_seen = max(self.max_seen, int(ts[-1]))
            return
        ts = np.ascontiguousarray(ts, dtype=np.uint64)
        # running max of everything seen so far, this piece included
        running = np.maximum.accumulate(ts)
        np.maximum(running, np.uint64(self.max_seen), out=running)
        late = ts[1:] < running[:-1]  # record i is late if older than the max before it
        first_late = int(ts[0]) < self.max_seen
        n = int(np.count_nonzero(late)) + first_late
        if n:
            self.inversions += n
            worst = int((running[:-1][late] - ts[1:][late]).max()) if late.any() else 0
            if first_late:
                worst = max(worst, self.max_seen - int(ts[0]))
            self.max_inversion_ns = max(self.max_inversion_ns, worst)
        self.max_seen = int(running[-1])


class _Values:
    """A timestamp column as a sequence of Python ints, for bisect (a few probes, no copy)."""

    def __init__(self, ts: np.ndarray) -> None:
        self.ts = ts

    def __len__(self) -> int:
        return len(self.ts)

    def __getitem__(self, i: int) -> int:
        return int(self.ts[i])


class Reorderer:
    """Holds records for `window_ns` of timestamp time and releases them sorted.

    A record is released once a record at least `window_ns` newer has arrived, so any
    record delayed by less than the window comes out in order (the perf-buffer merge
    technique used by `perf` itself, with a time window instead of per-round flushes).
    """

    def __init__(self, ts_field: str, window_ns: int) -> None:
        if window_ns < 0:
            raise ValueError("window_ns must be >= 0")
        self.ts_field = ts_field
        self.window_ns = window_ns
        self._held: Batch | None = None  # always sorted by timestamp
        self._max = 0

    def __len__(self) -> int:
        return len(self._held) if self._held is not None else 0

    def push(self, batch: Batch) -> Batch:
        if len(batch):
            self._max = max(self._max, int(batch.records[self.ts_field].max()))
            self._held = self._merge(self._sorted(batch))
        return self._release(self._max - self.window_ns)

    def flush(self) -> Batch:
        return self._release(None)

    def _sorted(self, batch: Batch) -> Batch:
        order = np.argsort(batch.records[self.ts_field], kind="stable")
        return Batch(take_records(batch.records, order), batch.cpu[order] if batch.cpu is not None else None)

    def _merge(self, batch: Batch) -> Batch:
        """Held records and a sorted batch, merged: two sorted runs, so the stable sort
        (timsort) merges them in linear time instead of re-sorting everything held."""
        held = self._held
        if held is None or not len(held):
            return batch
        records = concat_records([held.records, batch.records], held.records.dtype)
        cpu = (
            np.concatenate([held.cpu, batch.cpu])
            if held.cpu is not None and batch.cpu is not None
            else None
        )
        order = np.argsort(records[self.ts_field], kind="stable")
        return Batch(take_records(records, order), cpu[order] if cpu is not None else None)

    def _release(self, horizon: int | None) -> Batch:
        held = self._held
        if held is None:
            return Batch(np.empty(0, dtype=np.dtype([("_", "u1")])))
        ts = held.records[self.ts_field]
        cut = len(ts) if horizon is None else int(np.searchsorted(ts, max(horizon, 0), side="right"))
        cpu = held.cpu
        self._held = (
            Batch(held.records[cut:], cpu[cut:] if cpu is not None else None) if cut < len(ts) else None
        )
        return Batch(held.records[:cut], cpu[:cut] if cpu is not None else None)
