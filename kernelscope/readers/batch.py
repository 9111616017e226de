"""The unit every reader hands to the drain loop: parsed records plus what was lost."""

from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import DTypeLike


@dataclass
class Batch:
    """Records read in one pass over a buffer.

    `records` is a structured array of the map's event dtype that the batch owns (never a
    view into the mmap'd ring, which the kernel reuses once consumer_pos moves on).
    `cpu` is the CPU buffer each record came from (perf buffers) or None (one shared ring).
    `lost` counts samples the kernel reported lost (PERF_RECORD_LOST) during this pass;
    `lost_by_cpu` splits it per CPU; `discarded` counts ring records skipped for
    their DISCARD bit. Lost events are data, not log lines.
    """

    records: np.ndarray
    cpu: np.ndarray | None = None
    lost: int = 0
    lost_by_cpu: dict[int, int] = field(default_factory=dict)
    discarded: int = 0  # ring buffer records the program reserved then discarded
    # filled by a reader given a Stamper: each record's timestamp as epoch ns (ks_time),
    # computed while the records were in cache, and whether the timestamps never decrease
    times: np.ndarray | None = None
    ordered: bool = False
    # lengths of the consecutive pieces `records` is made of, each one buffer's records in
    # arrival order (a perf read: one piece per CPU), or None for one piece
    runs: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.records)

    @classmethod
    def empty(cls, dtype: np.dtype) -> Batch:
        return cls(np.empty(0, dtype=dtype))


def copy_records(raw: bytes | memoryview | np.ndarray, dtype: np.dtype) -> np.ndarray:
    """One record of arbitrary length as a 1-element array of `dtype`: truncated or zero-padded.

    Programs may submit fewer (or more) bytes than the struct BCC recorded; the slow path
    of every reader funnels through here so both behave the same.
    """
    out = np.zeros(1, dtype=dtype)
    src = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw
    n = min(len(src), dtype.itemsize)
    out.view(np.uint8)[:n] = src[:n]
    return out


def opaque(dtype: np.dtype) -> np.dtype:
    """Raw bytes of one record. Copying as opaque bytes keeps a struct's padding bytes;
    numpy copies a structured dtype field by field and leaves its padding uninitialised."""
    return np.dtype((np.void, dtype.itemsize))


def packed(records: np.ndarray, copy: bool = False) -> np.ndarray:
    """`records` as one contiguous array, byte for byte: itself if it already is one (and not
    `copy`), else a copy.

    Records a ring reader copied out keep their ring slots (an 8-byte header before each),
    so they are strided. numpy copies a structured array field by field (copy(), indexing,
    ascontiguousarray) and leaves the padding bytes uninitialised: copying as opaque bytes
    keeps them. The stride is checked, not flags.c_contiguous: numpy calls any array of one
    element contiguous, whatever its stride.
    """
    if not copy and (not len(records) or records.strides[0] == records.dtype.itemsize):
        return records
    return np.array(records.view(opaque(records.dtype)), copy=True, order="C").view(records.dtype)


def take_records(records: np.ndarray, index: np.ndarray) -> np.ndarray:
    """`records[index]` (an index array or a boolean mask), byte for byte, padding kept."""
    return records.view(opaque(records.dtype))[index].view(records.dtype)


def concat_records(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """Concatenate record arrays byte for byte, keeping `dtype` and its padding.

    Plain np.concatenate promotes structured dtypes and drops the padding of nested
    structs (numpy 2), which would no longer match the C layout. One part is returned as
    it is, strided or not.
    """
    if not parts:
        return np.empty(0, dtype=dtype)
    if len(parts) == 1 and parts[0].dtype == dtype:
        return parts[0]
    return np.concatenate([p.view(opaque(dtype)) for p in parts]).view(dtype)


class Arena:
    """Memory faulted in ahead of time, handed out in slices that are never handed out twice.

    A fresh array costs a page fault per page on its first write, which on a VM is most of
    the cost of copying records out of a ring (about as much as the copy itself). A reader
    or store that knows how much it will need soon reserves it here while nothing is timed
    (at load), and its hot path takes views instead of np.empty. A slice keeps its block
    alive while anything refers to it; the first request the block cannot serve lets it go
    (only the slices handed out keep it). Then, with `grow`, `take` carves the next slices
    out of a new block of at least `grow` bytes, not faulted in ahead: numpy asks for
    transparent huge pages for arrays of 4 MiB or more (madvise), so a block is faulted in
    2 MiB at a time as it is written, 1M 32-byte records in 8-11 ms instead of 22-24 ms
    in 750 KB arrays here. Without `grow`, `take` falls back to np.empty. A block outlives
    its first slices as long as a later one lives: with rows evicted oldest first, at most
    one block per arena is held for fewer rows than it has.
    """

    ALIGN = 64
    GROW = 8 << 20  # bytes: twice numpy's threshold for asking for huge pages

    def __init__(self, nbytes: int = 0, grow: int = 0) -> None:
        self._lock = threading.Lock()
        self._buf = np.empty(max(0, nbytes), dtype=np.uint8)
        self._buf[:: mmap.PAGESIZE] = 0  # one write per page faults the whole arena in
        self._used = 0
        self._grow = grow
        self._reserved = True  # the current block was faulted in ahead

    @property
    def free_bytes(self) -> int:
        """Bytes faulted in ahead and not handed out yet (a grown block's do not count)."""
        return len(self._buf) - self._used if self._reserved else 0

    def take(self, n: int, dtype: DTypeLike) -> np.ndarray:
        """An uninitialised array of `n` items of `dtype`, from the arena while it lasts."""
        dt = np.dtype(dtype)
        size = n * dt.itemsize
        with self._lock:
            start = -(-self._used // self.ALIGN) * self.ALIGN
            if n and start + size <= len(self._buf):
                self._used = start + size
                return self._buf[start : start + size].view(dt)
            if n and self._grow:
                self._buf = np.empty(max(self._grow, size), dtype=np.uint8)
                self._used, self._reserved = size, False
                return self._buf[:size].view(dt)
            if n and len(self._buf):  # used up: only the slices handed out keep it now
                self._buf, self._used = np.empty(0, dtype=np.uint8), 0
        return np.empty(n, dtype=dt)

    def give_back(self, arr: np.ndarray, n: int) -> np.ndarray:
        """`arr[:n]`, the rest of `arr` returned to the arena if it was the last slice taken."""
        with self._lock:
            if len(self._buf) and np.may_share_memory(arr, self._buf):
                start = int(arr.__array_interface__["data"][0] - self._buf.__array_interface__["data"][0])
                if start + arr.nbytes == self._used:
                    self._used = start + n * arr.dtype.itemsize
        return arr[:n]

    def release(self) -> None:
        """Hand out nothing more; the memory goes once the slices already taken are gone."""
        with self._lock:
            self._grow = 0
            self._buf = np.empty(0, dtype=np.uint8)
            self._used = 0


def epoch_ns(records: np.ndarray, field_name: str, unit: int, offset_ns: int,
             out: np.ndarray) -> np.ndarray:
    """`out` (int64, len(records)) filled with `records[field_name] * unit + offset_ns`: the
    records' timestamps as epoch ns. int64 arithmetic wraps like the u64 values' own, so
    the bits are those of astype(int64) first, without that copy."""
    ts = records[field_name].view(np.int64)
    if unit != 1:
        np.multiply(ts, unit, out=out)
        ts = out
    np.add(ts, offset_ns, out=out)
    return out


_UNSET = -(1 << 63)  # Stamper._last before a batch's first run


class Stamper:
    """Epoch-ns timestamps (`ts * unit + offset`, int64) of runs of records, and whether the
    timestamps never decrease, computed run by run right after a reader copied the run, while
    it is still in cache (a separate pass over a big batch reads it all from memory again).
    `reset()` starts a batch; `stamp(run, out)` handles the next run of it, in order."""

    def __init__(self, dtype: np.dtype, field_name: str, unit: int, offset_ns: int, rows: int = 0) -> None:
        self.dtype = np.dtype(dtype)
        self.field = field_name
        self.unit = unit
        self.offset_ns = offset_ns
        self.arena = Arena(rows * 8, grow=Arena.GROW)
        self.ordered = True
        self._last = _UNSET

    def reset(self) -> None:
        self.ordered, self._last = True, _UNSET

    def compute(self, records: np.ndarray, out: np.ndarray) -> np.ndarray:
        """`out` (int64, len(records)) filled with the records' epoch ns."""
        return epoch_ns(records, self.field, self.unit, self.offset_ns, out)

    def stamp(self, run: np.ndarray, out: np.ndarray) -> None:
        """Stamp one run (records of `dtype`, or opaque bytes of its size) into `out`."""
        recs = run.view(self.dtype)
        if not len(recs):
            return
        self.compute(recs, out)
        # the order is that of ks_time, checked on `out` (contiguous: 0.8 ns a record against
        # 1.9 for the strided field); the same as the field's below 2^62 ns (146 years)
        # and its unit, where int64 ks_time wraps
        if self.ordered:
            # a first value below the offset is a field with bit 63 set (e.g. -1 for unset):
            # int64 order would then differ from the field's
            first = self.offset_ns if self._last == _UNSET else self._last
            self.ordered = int(out[0]) >= first and not bool((out[1:] < out[:-1]).any())
        self._last = int(out[-1])
