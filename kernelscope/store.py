"""Growing event storage: raw chunks, converted columns cached for `df`, spilling beyond a budget.

The drain thread's `append` only takes `_lock` for list updates (O(batch) at most). Frames are
built under a separate `_build_lock`: the rows that arrived since the last build are converted
once, outside `_lock`, into column buffers that grow in place, and the frame is a view of
them, so a repeated `df` costs only the new rows. Beyond the memory budget (spill.py) a
background thread writes the oldest rows to Parquet segments, which frames read back.
With `max_rows`, the oldest rows go first and are counted in `evicted`.

A buffer drained whole (one big batch) is framed without a copy: its numeric columns are
strided views of the stored records, ks_time is the reader's stamped times (Batch.times), and
arrival times, ks_seq and ks_time live in memory faulted in by `reserve` at load. Columns
that view stored rows are counted once in `memory_bytes`; a later frame that grows the
columns copies them into buffers of their own (and counts those).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from . import spill
from .readers.batch import Arena, Batch, Stamper, concat_records, packed
from .schema import ARRIVAL, Schema, time_unit

CHUNK_ROWS = 4096  # small batches are gathered into chunks of about this many rows
CONVERT_ROWS = 16384  # rows converted per step: other threads get the GIL between steps
FIRST_CONVERT_ROWS = 1 << 22  # rows of the first step (~40 ms of GIL for numeric rows)
SPILL_FILE_BYTES = 32 << 20  # raw bytes per segment file
MERGE_ROWS = 1 << 20  # Arrow column pieces are merged up to this many rows
SPILL_AT, SPILL_DOWN_TO = 0.9, 0.7  # shares of the budget: start spilling, stop spilling


@dataclass
class _Chunk:
    records: np.ndarray
    seq0: int  # arrival sequence number of records[0]
    arrival_ns: np.ndarray  # per record (int64 monotonic ns of the read that brought it)
    cpu: np.ndarray | None
    # ks_time as int64 epoch ns, stamped by the reader: kept (big chunks only) until converted
    times: np.ndarray | None = None


def _tbytes(c: _Chunk) -> int:
    """Bytes of `c`'s stamped times (ks_time as int64, kept until converted)."""
    return c.times.nbytes if c.times is not None else 0


def _sbytes(c: _Chunk) -> int:
    """Bytes of the ring headers between `c`'s records, when they are views of a ring
    reader's slots (`packed()`): memory the chunk holds beyond `_row_bytes` per row."""
    r = c.records
    return (r.strides[0] - r.dtype.itemsize) * len(r) if len(r) else 0


def _concat(chunks: list[_Chunk], dtype: np.dtype) -> _Chunk:
    if len(chunks) == 1:
        return chunks[0]
    cpus = [c.cpu for c in chunks]
    times = [c.times for c in chunks]
    return _Chunk(
        concat_records([c.records for c in chunks], dtype),
        chunks[0].seq0,
        np.concatenate([c.arrival_ns for c in chunks]),
        np.concatenate(cpus) if all(c is not None for c in cpus) else None,  # type: ignore[arg-type]
        np.concatenate(times) if all(t is not None for t in times) else None,  # type: ignore[arg-type]
    )


_IOTA = np.arange(1 << 16, dtype=np.dtype(np.int64))


def sequence(out: np.ndarray, start: int) -> np.ndarray:
    """Fill int64 `out` with start, start+1, ... in place (np.arange would fault in a fresh array)."""
    step = len(_IOTA)
    for i in range(0, len(out), step):
        part = out[i : i + step]
        np.add(_IOTA[: len(part)], start + i, out=part)
    return out


def pa_combined(arr: Any) -> Any:
    """The pyarrow data of an Arrow-backed pandas array as one contiguous chunk."""
    import pyarrow as pa

    return pa.chunked_array([arr._pa_array.combine_chunks()])


def _slice(c: _Chunk, lo: int, hi: int) -> _Chunk:
    """Rows seq lo..hi of chunk `c` (views)."""
    a, b = lo - c.seq0, hi - c.seq0
    return _Chunk(c.records[a:b], lo, c.arrival_ns[a:b], c.cpu[a:b] if c.cpu is not None else None,
                  c.times[a:b] if c.times is not None else None)


class _View:
    """Converted columns of rows seq0 .. seq0+n: numpy columns in buffers grown in place
    (rows already written are never rewritten, so earlier frames stay valid views), Arrow
    columns (strings) as pieces joined without copying, small pieces merged as they come so
    there are O(log n) of them."""

    def __init__(self, seq0: int = 0) -> None:
        self.seq0 = seq0
        self.n = 0
        self.bufs: dict[str, np.ndarray] = {}
        self.pieces: dict[str, list[Any]] = {}
        self.piece_seq0: list[int] = []  # where each piece starts (numpy columns keep them too)
        self.obj_row_bytes = 0  # per row, for object columns (Python objects per cell)
        # columns that are views of the stored chunks (records, arrival times) cost nothing
        # while the chunks are stored; this many bytes per row once the store let them go
        self.borrowed: set[str] = set()
        self.borrowed_row_bytes = 0
        self.nbytes = 0  # read by the drain thread's budget check: kept, not summed there

    @property
    def end(self) -> int:
        return self.seq0 + self.n

    def _count(self) -> None:
        arrow = sum(int(p.nbytes) for ps in self.pieces.values() for p in ps)
        # rows written, not the buffers' capacity: np.empty's pages past them are never touched
        owned = sum(b[: self.n].nbytes for c, b in self.bufs.items() if c not in self.borrowed)
        self.nbytes = owned + arrow + self.obj_row_bytes * self.n

    def extend(self, df: pd.DataFrame, source: _Chunk | None = None) -> None:
        """Append converted rows; `source` is the chunk they came from, when the chunk stays
        stored (its record and arrival columns may then be kept as views, not counted)."""
        k = len(df)
        first = not self.bufs and not self.pieces
        self.piece_seq0.append(self.end)
        for col in df.columns:
            values = df[col].array
            if hasattr(values, "_pa_array"):  # Arrow-backed (strings): keep the piece
                self.pieces.setdefault(col, []).append(values)
                continue
            arr = np.asarray(values)
            buf = self.bufs.get(col)
            if first and k >= CHUNK_ROWS:  # a whole run converted at once: its columns are the buffers
                self.bufs[col] = arr
                if arr.dtype == object:
                    self.obj_row_bytes += sys.getsizeof(arr[0])
                elif source is not None and np.may_share_memory(arr, source.records):
                    self.borrowed.add(col)
                elif source is not None and any(np.may_share_memory(arr, a)
                                                for a in (source.arrival_ns, source.times) if a is not None):
                    self.borrowed.add(col)
                    self.borrowed_row_bytes += 8
                continue
            if buf is None or len(buf) < self.n + k or col in self.borrowed:
                grown = np.empty(max(2 * (len(buf) if buf is not None else 0), self.n + k, CHUNK_ROWS),
                                 arr.dtype)
                if buf is not None:
                    grown[: self.n] = buf[: self.n]
                self.bufs[col] = buf = grown
                self.borrowed.discard(col)
            buf[self.n: self.n + k] = arr
            if first and arr.dtype == object and k:
                self.obj_row_bytes += sys.getsizeof(arr[0])
        self.n += k
        if first and any(c in self.borrowed for c in df.columns if c not in (ARRIVAL, "ks_time")):
            self.borrowed_row_bytes += source.records.strides[0] if source is not None else 0
        if not self.borrowed:
            self.borrowed_row_bytes = 0
        self._merge_small()
        self._count()

    def _merge_small(self) -> None:
        """Merge the last two pieces while the older is no bigger than the newer (a binary
        counter: each row is copied O(log n) times), up to MERGE_ROWS rows per piece."""
        starts = self.piece_seq0
        while len(starts) >= 2:
            older, newer = starts[-1] - starts[-2], self.end - starts[-1]
            if older > newer or older + newer > MERGE_ROWS:
                return
            starts.pop()
            for ps in self.pieces.values():
                last = ps.pop()
                joined = type(last)._concat_same_type([ps[-1], last])
                ps[-1] = type(last)(pa_combined(joined), dtype=last.dtype)

    def frame(self, columns: list[str], lo: int, hi: int) -> pd.DataFrame:
        a, b = lo - self.seq0, hi - self.seq0
        data: dict[str, Any] = {c: buf[a:b] for c, buf in self.bufs.items()}
        if self.pieces:
            # pieces before the one holding row `lo` are not needed
            i = max(0, int(np.searchsorted(self.piece_seq0, lo, side="right")) - 1)
            off = lo - self.piece_seq0[i] if self.piece_seq0 else 0
            for c, ps in self.pieces.items():
                joined = type(ps[i])._concat_same_type(ps[i:]) if len(ps) > i + 1 else ps[i]
                data[c] = joined[off: off + (b - a)]
        return pd.DataFrame(data, columns=columns, copy=False)

    def drop_before(self, seq: int) -> _View:
        """This view without the rows before `seq`; copies only once they are most of it, and
        from the start of the piece holding `seq` (Arrow pieces are kept whole)."""
        if seq >= self.end:
            return _View(seq) if self.n else self
        keep = max(0, int(np.searchsorted(self.piece_seq0, seq, side="right")) - 1)
        dead = self.piece_seq0[keep] - self.seq0 if self.piece_seq0 else 0
        if dead <= 0 or dead < self.n - dead:
            return self  # not worth a copy yet: frames slice past them
        out = _View(self.seq0 + dead)
        out.n = self.n - dead
        out.obj_row_bytes = self.obj_row_bytes
        out.bufs = {c: b[dead: self.n].copy() for c, b in self.bufs.items()}
        out.pieces = {c: ps[keep:] for c, ps in self.pieces.items()}
        out.piece_seq0 = self.piece_seq0[keep:]
        out._count()
        return out


class FrameStore:
    """Chunks of one output map's records, with a cached DataFrame view."""

    def __init__(self, schema: Schema, max_rows: int | None = None, max_bytes: int | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        if max_rows is not None and max_rows <= 0:
            raise ValueError("max_rows must be positive or None")
        spill.check_bytes("max_bytes", max_bytes)
        self.schema = schema
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.warn = warn or (lambda _msg: None)
        self._chunks: list[_Chunk] = []  # in memory, oldest first, after every segment
        self._open: list[_Chunk] = []  # small batches not yet gathered into a chunk
        self._open_rows = 0
        self._segments: list[spill.Segment] = []  # spilled rows, oldest first
        self._rows = 0  # stored: in memory and spilled
        self._mem_rows = 0
        self.received = 0  # every record ever appended, evicted ones included
        self.evicted = 0
        self.spilled = 0  # rows written to disk so far (some may since be evicted)
        self._lock = threading.Lock()  # what the drain thread takes: list updates only
        self._build_lock = threading.Lock()  # frame builds and view compaction
        self._view = _View()
        self._last: tuple[tuple[int, int], weakref.ReferenceType[pd.DataFrame]] | None = None
        self._spill_dir: spill.SpillDir | None = None
        self._spill_wake = threading.Event()
        self._spiller: threading.Thread | None = None
        self._warned: set[str] = set()
        # record + arrival time (+ CPU for perf buffers): what one stored row costs
        self._row_bytes = schema.dtype.itemsize + 8 + (2 if schema.per_cpu else 0)
        self._times_bytes = 0  # _tbytes() of the stored chunks: times not converted yet
        self._slot_bytes = 0  # _sbytes() of the stored chunks (open ones are packed: 0)
        self._arena = Arena(grow=Arena.GROW)  # arrival times and computed columns of the rows to come
        self._timed = schema.time_field is not None
        spill.register(self)

    def reserve(self, rows: int) -> None:
        """Fault in now the memory the next `rows` rows' arrival times and computed columns
        (ks_seq, ks_time) need, so a buffer drained full is stored and framed without a
        page fault per page (a fresh array's first write costs about as much as the copy)."""
        per_row = 8 + 8
        if self.max_rows is not None:
            rows = min(rows, self.max_rows)
        if self.max_bytes is not None:
            rows = min(rows, self.max_bytes // (2 * per_row))
        self._arena = Arena(rows * per_row + 4 * Arena.ALIGN, grow=Arena.GROW)

    def stamper(self, rows: int = 0) -> Stamper | None:
        """A Stamper of this map's ks_time (None without a timestamp field) for a reader to
        fill Batch.times with, with `rows` rows of memory faulted in."""
        tf = self.schema.time_field
        if tf is None:
            return None
        return Stamper(self.schema.dtype, tf, time_unit(tf) or 1, self.schema.epoch_offset_ns, rows)

    @property
    def reserved_bytes(self) -> int:
        """Memory faulted in by `reserve` and not used yet (not part of memory_bytes)."""
        return self._arena.free_bytes

    def __len__(self) -> int:
        return self._rows

    @property
    def memory_bytes(self) -> int:
        """Bytes held in memory: raw records with their metadata, and the converted columns
        (those that are views of stored records count once, with the records)."""
        view = self._view
        released = max(0, min(view.end, self.received - self._mem_rows) - view.seq0)  # held by the view only
        return (self._mem_rows * self._row_bytes + self._times_bytes + self._slot_bytes + view.nbytes
                + view.borrowed_row_bytes * released)

    nbytes = memory_bytes

    @property
    def spilled_rows(self) -> int:
        """Rows on disk now."""
        return sum(s.live for s in self._segments)

    @property
    def spill_bytes(self) -> int:
        return sum(s.nbytes for s in self._segments)

    def _mem_chunks(self) -> list[_Chunk]:
        return self._chunks + self._open

    def tail_chunks(self, n: int) -> list[_Chunk]:
        """The newest chunks in memory holding at least `n` rows (fewer if memory has fewer),
        oldest first: cheap enough for a plot refreshing a few times a second."""
        with self._lock:
            chunks = self._mem_chunks()
        picked, rows = [], 0
        for c in reversed(chunks):
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
        arrival = self._arena.take(n, np.dtype(np.int64))
        arrival.fill(arrival_ns)
        cpu = batch.cpu.astype(np.int16, copy=False) if batch.cpu is not None else None
        times = batch.times if self._timed and n >= CHUNK_ROWS else None
        if times is not None and len(times) != n:
            times = None
        # a small batch is gathered with others by copying later; packed now (a few KiB, and
        # outside the lock) so the gathered chunks hold no ring slots. A big one that lands
        # among gathered ones is copied by the gathering at once.
        records = packed(batch.records) if n < CHUNK_ROWS else batch.records
        with self._lock:
            c = _Chunk(records, self.received, arrival, cpu, times)
            if n >= CHUNK_ROWS and not self._open:
                self._chunks.append(c)
                self._times_bytes += _tbytes(c)
                self._slot_bytes += _sbytes(c)
            else:
                c.times = None  # small batches are gathered by copying; frames compute their ks_time
                self._open.append(c)
                self._open_rows += n
                if self._open_rows >= CHUNK_ROWS or len(self._open) >= 256:
                    self._chunks.append(_concat(self._open, self.schema.dtype))
                    self._open, self._open_rows = [], 0
            self.received += n
            self._rows += n
            self._mem_rows += n
            if self.max_rows is not None and self._rows > self.max_rows:
                self._evict(self._rows - self.max_rows)
        self._check_budget()

    # --- the budget -----------------------------------------------------------------------

    def _over(self, share: float) -> bool:
        if self.max_bytes is not None and self.memory_bytes > share * self.max_bytes:
            return True
        return spill.process_memory() > share * spill.memory_budget()

    def _budget_text(self) -> str:
        mine = f"this map's max_bytes={self.max_bytes}" if self.max_bytes else ""
        glob = f"the process-wide budget of {spill.memory_budget() / 2**20:.0f} MiB"
        return " and ".join(x for x in (mine, glob) if x)

    def _check_budget(self) -> None:
        if not self._over(spill.WARN_AT):
            return
        self._warn_once("near", (
            f"stored events reached {spill.WARN_AT:.0%} of {self._budget_text()} "
            f"({self.memory_bytes / 2**20:.0f} MiB in this map); beyond "
            f"{SPILL_AT:.0%} the oldest rows are spilled to Parquet files on disk and read back "
            "by df (slower). Raise it with Probe(max_bytes=...) or "
            "kernelscope.set_memory_budget(...), or bound rows with max_rows."))
        if self._over(SPILL_AT):
            if self._spiller is None:
                self._spiller = threading.Thread(
                    target=_spill_thread, args=(weakref.ref(self), self._spill_wake),
                    name="kernelscope-spill", daemon=True)
                self._spiller.start()
            self._spill_wake.set()

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(text)

    def spill_some(self) -> int:
        """Write the oldest rows in memory to disk until under SPILL_DOWN_TO of the budget
        (what the spill thread runs; tests call it directly). Returns rows spilled."""
        done = 0
        while self._over(SPILL_DOWN_TO):
            with self._lock:
                pick: list[_Chunk] = []
                size = 0
                for c in self._chunks:
                    if pick and size + len(c.records) * self._row_bytes > SPILL_FILE_BYTES:
                        break
                    pick.append(c)
                    size += len(c.records) * self._row_bytes
            if not pick:
                break
            whole = _concat(pick, self.schema.dtype)
            try:
                seg = self._spill_folder().write(whole.records, whole.arrival_ns, whole.cpu, whole.seq0)
            except OSError as e:
                self._warn_once("spill-failed", (
                    f"spilling stored events to disk failed ({e}): the oldest rows in memory "
                    "are evicted instead (counted in stats['evicted'])"))
                with self._lock:
                    if _starts_with(self._chunks, pick):
                        self._evict_memory(len(whole.records))
                continue
            with self._lock:
                if not _starts_with(self._chunks, pick):
                    spill.SpillDir.delete(seg)  # evicted or cleared meanwhile
                    continue
                del self._chunks[: len(pick)]
                self._times_bytes -= sum(_tbytes(c) for c in pick)
                self._slot_bytes -= sum(_sbytes(c) for c in pick)
                self._segments.append(seg)
                self._mem_rows -= seg.rows
                self.spilled += seg.rows
                self._limit_disk()
            done += seg.rows
            self._compact_view()
        return done

    def _spill_folder(self) -> spill.SpillDir:
        """The store's one spill folder, made once: two spill_some() at a time (the spill thread
        and a caller) each made one, and the one dropped took the other's segments with it when
        its finalizer removed the folder."""
        with self._lock:
            if self._spill_dir is None:
                self._spill_dir = spill.SpillDir()
            return self._spill_dir

    def _limit_disk(self) -> None:
        """Beyond the disk limit, the oldest segments go (evicted, counted)."""
        limit = self._spill_dir.limit if self._spill_dir else 0
        while len(self._segments) > 1 and self.spill_bytes > limit:
            seg = self._segments.pop(0)
            spill.SpillDir.delete(seg)
            self.evicted += seg.live
            self._rows -= seg.live
            self._warn_once("disk", (
                f"spilled events reached the disk limit ({limit / 2**20:.0f} MiB): the oldest "
                "are evicted (counted in stats['evicted']); set "
                "kernelscope.set_memory_budget(spill_bytes=...) to keep more"))

    def _compact_view(self) -> None:
        with self._build_lock:
            first_mem = self.received - self._mem_rows
            self._view = self._view.drop_before(first_mem)

    # --- eviction ---------------------------------------------------------------------------

    def _evict(self, count: int) -> None:
        while count and self._segments:
            seg = self._segments[0]
            take = min(seg.live, count)
            if take == seg.live:
                self._segments.pop(0)
                spill.SpillDir.delete(seg)
            else:
                self._segments[0] = dataclasses.replace(seg, skip=seg.skip + take)
            self.evicted += take
            self._rows -= take
            count -= take
        if count:
            self._evict_memory(count)

    def _evict_memory(self, count: int) -> None:
        self.evicted += count
        self._rows -= count
        self._mem_rows -= count
        for chunks in (self._chunks, self._open):
            while count and chunks:
                first = chunks[0]
                n = len(first.records)
                if n <= count:
                    gone = chunks.pop(0)
                    self._times_bytes -= _tbytes(gone)
                    self._slot_bytes -= _sbytes(gone)
                    count -= n
                    if chunks is self._open:
                        self._open_rows -= n
                else:
                    rest = _slice(first, first.seq0 + count, first.seq0 + n)
                    chunks[0] = _Chunk(packed(rest.records, copy=True), rest.seq0, rest.arrival_ns.copy(),
                                       rest.cpu.copy() if rest.cpu is not None else None,
                                       rest.times.copy() if rest.times is not None else None)
                    self._times_bytes -= _tbytes(first) - _tbytes(chunks[0])
                    self._slot_bytes -= _sbytes(first) - _sbytes(chunks[0])
                    if chunks is self._open:
                        self._open_rows -= count
                    count = 0

    # --- reading ------------------------------------------------------------------------------

    def _snapshot(self) -> tuple[list[spill.Segment], list[_Chunk], int, int]:
        with self._lock:
            return (list(self._segments), self._mem_chunks(), self.received - self._rows,
                    self.received - self._mem_rows)

    def _disk_chunks(self, segs: list[spill.Segment]) -> list[_Chunk]:
        out = []
        for seg in segs:
            records, arrival, cpu = spill.SpillDir.read(seg, self.schema.dtype)
            out.append(_Chunk(records, seg.seq0 + seg.skip, arrival, cpu))
        return out

    def chunk(self) -> _Chunk:
        """All stored records with their arrival times and CPUs as one chunk (spilled rows read back)."""
        segs, mem, _first, _ = self._snapshot()
        chunks = [c for c in self._disk_chunks(segs) + mem if len(c.records)]
        if not chunks:
            return _Chunk(np.empty(0, self.schema.dtype), self.received, np.empty(0, np.int64), None)
        return _concat(chunks, self.schema.dtype)

    def since(self, start: int, limit: int | None = None) -> tuple[int, list[_Chunk]]:
        """Stored rows with seq >= `start`, at most `limit` of them, oldest first (views where in
        memory), reading back only the spilled segments that hold some: (the oldest seq >= start
        still stored, the chunks). Rows below a chunk's seq0 not in an earlier chunk were evicted."""
        segs, mem, first, _ = self._snapshot()
        out: list[_Chunk] = []
        rows = 0
        sources: list[spill.Segment | _Chunk] = [*segs, *mem]
        for src in sources:
            if limit is not None and rows >= limit:
                break
            if isinstance(src, spill.Segment):
                if src.seq0 + src.rows <= start:
                    continue
                try:
                    records, arrival, cpu = spill.SpillDir.read(src, self.schema.dtype)
                except OSError:  # evicted (deleted) since the snapshot: its rows count as evicted
                    continue
                c = _Chunk(records, src.seq0 + src.skip, arrival, cpu)
            else:
                c = src
            end = c.seq0 + len(c.records)
            lo = max(start, c.seq0)
            hi = end if limit is None else min(end, lo + limit - rows)
            if hi > lo:
                out.append(_slice(c, lo, hi))
                rows += hi - lo
        return max(start, first), out

    def records(self) -> np.ndarray:
        """All stored records as one contiguous structured array (oldest first): records
        kept in their ring slots are copied out, byte for byte."""
        return packed(self.chunk().records)

    def frame(self) -> pd.DataFrame:
        """Every stored row as a DataFrame. Rows that arrived since the last call are converted
        here, outside the lock the drain thread takes; the rest is reused."""
        with self._build_lock:
            segs, mem, first, first_mem = self._snapshot()
            end = first_mem + sum(len(c.records) for c in mem)
            key = (first, end)
            if self._last is not None and self._last[0] == key:
                cached = self._last[1]()
                if cached is not None:
                    return _handed_out(cached)
            view = self._view.drop_before(first_mem)
            if view.end < first_mem:
                view = _View(first_mem)
            parts: list[_Chunk] = []
            converted: list[pd.DataFrame] = []
            pending = 0  # rows in parts
            # the first conversion takes up to FIRST_CONVERT_ROWS in one step, its columns
            # kept as the buffers (no copy); later ones, as a drain extends the frame, go in
            # steps of CONVERT_ROWS
            step = CONVERT_ROWS if view.n else FIRST_CONVERT_ROWS
            for c in mem:
                a, c_end = max(view.end + pending, c.seq0), c.seq0 + len(c.records)
                while a < c_end:
                    b = min(c_end, a + step - pending)
                    parts.append(_slice(c, a, b))
                    pending += b - a
                    a = b
                    if pending >= step:
                        converted.append(self._convert(view, parts))
                        parts, pending = [], 0
            if parts:
                converted.append(self._convert(view, parts))
            end = view.end
            self._view = view
            if self._times_bytes and "ks_time" not in view.borrowed:
                self._drop_times(end)
            if len(converted) == 1 and len(converted[0]) == view.n == end - max(first, first_mem):
                out = converted[0]  # everything converted at once: that frame is the frame
            elif view.n:
                out = view.frame(self.schema.columns, max(first, first_mem), end)
            else:
                out = self.schema.frame(np.empty(0, self.schema.dtype), np.empty(0, np.int64),
                                        np.empty(0, np.int64))
            if segs:
                disk = [self.schema.frame(c.records, np.arange(c.seq0, c.seq0 + len(c.records)),
                                          c.arrival_ns, c.cpu) for c in self._disk_chunks(segs)]
                out = pd.concat([*disk, out] if len(out) else disk, ignore_index=True)
            self._last = (key, weakref.ref(out))
            return _handed_out(out)

    def _drop_times(self, end: int) -> None:
        """Stamped times of rows before `end` are in the view's own ks_time now: let them go."""
        with self._lock:
            for c in self._chunks:
                if c.seq0 + len(c.records) > end:
                    break
                if c.times is not None:
                    self._times_bytes -= c.times.nbytes
                    c.times = None

    def _convert(self, view: _View, parts: list[_Chunk]) -> pd.DataFrame:
        piece = _concat(parts, self.schema.dtype)
        seq = sequence(self._arena.take(len(piece.records), np.int64), piece.seq0)
        df = self.schema.frame(piece.records, seq, piece.arrival_ns, piece.cpu, alloc=self._arena.take,
                               times=piece.times)
        view.extend(df, piece if len(parts) == 1 else None)
        return df

    def clear(self) -> None:
        with self._build_lock, self._lock:
            self.evicted += self._rows
            for seg in self._segments:
                spill.SpillDir.delete(seg)
            self._segments.clear()
            self._chunks.clear()
            self._open.clear()
            self._open_rows = self._rows = self._mem_rows = self._times_bytes = self._slot_bytes = 0
            self._view = _View(self.received)
            self._last = None


def _keep(*_refs: object) -> None:
    """What a handed-out frame's finalizer runs: nothing; its arguments were what it kept alive."""


def _handed_out(inner: pd.DataFrame) -> pd.DataFrame:
    """A frame for the caller over the same memory as `inner`, which may be the store's column
    buffers or views of its stored records. pandas' copy-on-write copies a block before writing
    to it only while another pandas object still references it, so `inner` is kept alive as
    long as the copy is: `df.loc[0, "pid"] = 7` then changes the caller's frame, never the
    store's rows (which later frames, records() and captures read). A shallow copy costs
    microseconds."""
    out = inner.copy(deep=False)
    weakref.finalize(out, _keep, inner)
    return out


def _starts_with(chunks: list[_Chunk], pick: list[_Chunk]) -> bool:
    return len(chunks) >= len(pick) and all(a is b for a, b in zip(chunks, pick, strict=False))


def _spill_thread(ref: weakref.ReferenceType[FrameStore], wake: threading.Event) -> None:
    """Spill whenever an append finds the store over budget; ends once the store is freed."""
    while True:
        wake.wait(0.5)
        wake.clear()
        store = ref()
        if store is None:
            return
        with contextlib.suppress(Exception):
            store.spill_some()
        del store
