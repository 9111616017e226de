"""BPF ring buffer (BPF_MAP_TYPE_RINGBUF) reader: mmap the map fd, parse records in batches.

Layout (kernel/bpf/ringbuf.c, Documentation/bpf/ringbuf.rst; libbpf ringbuf.c does the same):
- page 0 of the map fd: consumer_pos (u64), mapped read-write: user space advances it;
- page 1: producer_pos (u64), read-only, advanced by the kernel on every reservation;
- from page 2: the data area, `size` bytes (a power of two), mapped twice in a row so a
  record that wraps past the end is still contiguous in memory.
Each record: an 8-byte header {u32 len; u32 pg_off} then `len` bytes, the whole padded to
8 bytes. Bit 31 of len is BUSY (reserved, not yet submitted): nothing after it may be read
yet. Bit 30 is DISCARD: skip it. Positions only grow; `pos & (size - 1)` is the offset.
A user ring buffer (BPF_MAP_TYPE_USER_RINGBUF, readers/user_ring.py) has the same layout with
the roles swapped; `record_span` and `ring_views` serve both.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from ..errors import ClosedError, CorruptBufferError
from .base import Resources
from .batch import Arena, Batch, Stamper, concat_records, copy_records, opaque

BUSY = 1 << 31
DISCARD = 1 << 30
HDR = 8
PAGE = mmap.PAGESIZE
# A long read gives room back to the producer this often, not only at its end: a reader
# that parses a big batch while the producer keeps writing would otherwise hold all of it.
RELEASE_BYTES = 256 * 1024


def record_span(length: int) -> int:
    """Bytes a record of `length` payload bytes occupies in the ring (header + padding)."""
    return (length + HDR + 7) & ~7


def ring_views(consumer: object, producer: object, size: int,
               data_offset: int = PAGE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """consumer_pos, producer_pos (one u64 each) and the double-mapped data area as numpy views.

    `consumer` holds consumer_pos at offset 0, `producer` holds producer_pos at offset 0 and
    the data area, mapped twice in a row, at `data_offset`.
    """
    if size <= 0 or size & (size - 1):
        raise ValueError(f"ring size must be a power of two, got {size}")
    cons = np.frombuffer(consumer, dtype="<u8", count=1)  # type: ignore[call-overload]
    prod = np.frombuffer(producer, dtype="<u8", count=1)  # type: ignore[call-overload]
    data = np.frombuffer(producer, dtype=np.uint8, offset=data_offset)  # type: ignore[call-overload]
    if len(data) < 2 * size:
        raise ValueError("data area must be mapped twice (2 * size bytes)")
    return cons, prod, data


def pace(interval_s: float, window_s: float, pending_bytes: int, capacity_bytes: int,
         limit_s: float) -> float:
    """The next interval between the starts of two reads of a ring, after a read that found
    `pending_bytes`, which had arrived over `window_s` seconds; `interval_s` is the current
    interval. The aim is a ring about a quarter full at each read, at the rate just measured;
    the interval at most doubles per read (a burst that starts from idle is first measured
    over a short window) and never exceeds `limit_s`.

    Why wait at all: bpf_ringbuf_commit() queues an irq_work wake-up when the committed
    record is the first one the consumer has not read (`cons_pos == rec_pos`), so a consumer
    that is always caught up costs the producer a wake-up for nearly every record. A ring
    left unread between reads takes about one wake-up per read instead.
    """
    if pending_bytes <= 0:
        return interval_s
    quarter = window_s * capacity_bytes / (4 * pending_bytes)
    return max(0.0, min(quarter, 2 * max(interval_s, window_s), limit_s))


def committed_run(lens: np.ndarray, itemsize: int) -> int:
    """How many headers from the first are exactly `itemsize` (committed, not discarded, the
    struct's size). `lens` is a live view of the ring: two reductions (no temporary, a third
    cheaper than a comparison array) and, if they disagree, a scan for the first other one.
    The producer may commit a BUSY record between those reads: a scan that then finds none
    means every header is committed now, and the copy that follows reads after it."""
    if lens.min() == itemsize and lens.max() == itemsize:
        return len(lens)
    bad = np.flatnonzero(lens != itemsize)
    return int(bad[0]) if len(bad) else len(lens)


@dataclass
class ParseResult:
    records: np.ndarray
    discarded: int
    consumed: int  # bytes consumer_pos moved
    busy: bool  # stopped at a record the producer has not committed yet
    times: np.ndarray | None = None  # with a stamper: Batch.times
    ordered: bool = False


class RingParser:
    """Layout only: parses the records between consumer_pos and producer_pos.

    `consumer` holds consumer_pos at offset 0 (writable), `producer` holds producer_pos at
    offset 0 and the double-mapped data area at offset `data_offset`. Tests pass bytearrays
    built to the same layout; the reader passes the two mmaps.
    """

    def __init__(
        self, consumer: object, producer: object, size: int, dtype: np.dtype, data_offset: int = PAGE
    ) -> None:
        self._cons, self._prod, self._data = ring_views(consumer, producer, size, data_offset)
        self.size = size
        self.mask = size - 1
        self.dtype = np.dtype(dtype)
        self.stride = record_span(self.dtype.itemsize)
        self._opaque = opaque(self.dtype)
        # Records are copied out with their headers, slot for slot as the ring holds them:
        # one contiguous copy per run is 2-3x faster than numpy's strided copy of
        # 24-byte-or-larger records, for `stride - itemsize` bytes per record (8 for a
        # 32-byte struct). The records are then views at the ring's stride (`packed()`).
        self._slot = np.dtype((np.void, self.stride))
        self._slot_record = np.dtype({"names": ["r"], "formats": [self._opaque], "offsets": [HDR],
                                      "itemsize": self.stride})
        self._run_max = max(1, RELEASE_BYTES // self.stride)
        self.arena = Arena(grow=Arena.GROW)  # where records are copied to; `reserve` faults it in ahead
        self.stamper: Stamper | None = None  # set by the owner: timestamps stamped per run

    def reserve(self) -> None:
        """Fault in room for a full ring of records now, so a read that finds the ring full
        copies into memory already mapped (a fresh array costs a fault per page)."""
        self.arena = Arena(self.size // self.stride * self.stride, grow=Arena.GROW)

    @property
    def consumer_pos(self) -> int:
        return int(self._cons[0])

    @property
    def producer_pos(self) -> int:
        return int(self._prod[0])

    def pending_bytes(self) -> int:
        return self.producer_pos - self.consumer_pos

    def read(self, max_bytes: int | None = None) -> ParseResult:
        """Parse everything committed, return owned records. consumer_pos is stored after
        every RELEASE_BYTES of fixed-size records copied out, and at the end.

        Raises CorruptBufferError for what the kernel never writes (positions more than the
        ring apart, a record longer than what was reserved), after moving consumer_pos to
        producer_pos so the next read starts clean.
        """
        cons = self.consumer_pos
        prod = self.producer_pos  # read before any record: x86 keeps loads in order
        avail = prod - cons
        if not 0 <= avail <= self.size:
            self._cons[0] = prod
            raise CorruptBufferError(f"corrupt ring buffer: producer_pos {prod}, consumer_pos {cons}, "
                                     f"ring {self.size} bytes")
        whole = max_bytes is None or max_bytes >= avail
        if max_bytes is not None:
            avail = min(avail, max_bytes)
        start = cons & self.mask
        region = self._data[start : start + avail]  # contiguous thanks to the double mapping
        # Fixed-size records are copied into one array of slots (a copy: the kernel reuses
        # the bytes once consumer_pos moves on); records of other sizes go between its segments.
        out = self.arena.take(avail // self.stride, self._slot)
        out_bytes = out.view(np.uint8)
        recs = out.view(self._slot_record)["r"]  # the records in the slots (opaque bytes)
        stamper = self.stamper
        times = taken = stamper.arena.take(len(out), np.int64) if stamper is not None else None
        if stamper is not None:
            stamper.reset()
        chunks: list[np.ndarray] = []
        pos, filled, mark, discarded, busy = 0, 0, 0, 0, False
        itemsize, stride = self.dtype.itemsize, self.stride
        while pos + HDR <= avail:
            # Fast path: the longest run of committed records of exactly the struct's size,
            # found by reading every header at the expected stride in one vector operation.
            n = min((avail - pos) // stride, self._run_max, len(out) - filled)
            if n:
                lens = np.ndarray((n,), dtype="<u4", buffer=region, offset=pos, strides=(stride,))
                run = committed_run(lens, itemsize)
                if run:
                    out_bytes[filled * stride : (filled + run) * stride] = region[pos : pos + run * stride]
                    if stamper is not None and times is not None:  # the run is still in cache
                        stamper.stamp(recs[filled : filled + run], times[filled : filled + run])
                    filled += run
                    pos += run * stride
                    self._cons[0] = cons + pos  # copied out: the producer may reuse the room
                    continue
            # Slow path: one record that is BUSY, DISCARDed or of another size.
            hdr = int(region[pos : pos + 4].view("<u4")[0])
            if hdr & BUSY:
                busy = True
                break
            length = hdr & ~(BUSY | DISCARD)
            span = record_span(length)
            if pos + span > avail:
                if whole:  # the kernel reserves a record whole before producer_pos covers it
                    self._cons[0] = prod
                    raise CorruptBufferError(f"corrupt ring buffer record at position {cons + pos}: "
                                             f"length {length} runs past producer_pos {prod}")
                break  # max_bytes cut the region
            if hdr & DISCARD:
                discarded += 1
            else:
                if filled > mark:
                    chunks.append(recs[mark:filled].view(self.dtype))
                    mark = filled
                chunks.append(copy_records(region[pos + HDR : pos + HDR + length], self.dtype))
                times = None  # a record of another size: the owner stamps the batch itself
            pos += span
        if filled > mark:
            chunks.append(recs[mark:filled].view(self.dtype))
        self.arena.give_back(out, filled)
        if stamper is not None and taken is not None:
            kept = stamper.arena.give_back(taken, filled if times is not None else 0)
            times = kept if times is not None else None
        if pos:
            self._cons[0] = cons + pos  # the kernel reads it to make room
        records = concat_records(chunks, self.dtype)
        ordered = stamper is not None and times is not None and stamper.ordered
        return ParseResult(records, discarded, pos, busy, times, ordered)


WAKEUPS = ("adaptive", "epoll", "timer")


class RingBufferReader:
    """Public layer over one ring map fd: mmap, epoll wake-ups or timer mode, close (a `Reader`).

    `map_fd` stays owned by the caller (BCC); the reader owns its mappings, its epoll and
    an eventfd that `close()` uses to wake a blocked `poll()`. `wakeup` "epoll" and
    "adaptive" register the map fd with the epoll (the caller's drain loop decides when
    to wait on it; "adaptive" says it paces its reads with `pace()`); "timer" does not.
    One thread reads and polls; `close` may come from any thread. `reserve` faults in room
    for a full ring of records at once (RingParser.reserve): the first read that finds
    the ring full then copies into mapped memory; later ones into fresh arrays.
    """

    def __init__(self, map_fd: int, size: int, dtype: np.dtype, wakeup: str = "epoll",
                 reserve: bool = False) -> None:
        if wakeup not in WAKEUPS:
            raise ValueError(f"wakeup must be one of {', '.join(map(repr, WAKEUPS))}, not {wakeup!r}")
        self.size = size
        self.wakeup = wakeup
        self._closed = False
        self._close_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._poll_lock = threading.Lock()
        # Python's mmap keeps a dup of the map fd, so an unclosed mapping keeps the BPF map
        # alive after BCC closed its own fd: the parser's numpy views go before the mappings.
        res = self._res = Resources()
        self._finalizer = weakref.finalize(self, res.release)
        try:
            rw = mmap.PROT_READ | mmap.PROT_WRITE
            cons = mmap.mmap(map_fd, PAGE, flags=mmap.MAP_SHARED, prot=rw)
            res.push(cons.close)
            prod = mmap.mmap(map_fd, PAGE + 2 * size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ,
                             offset=PAGE)
            res.push(prod.close)
            holder = [RingParser(cons, prod, size, dtype)]
            res.push(holder.clear)
            self._parser: RingParser | None = holder[0]
            if reserve:
                holder[0].reserve()
                res.push(holder[0].arena.release)
            self._wake = res.fd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            self._ep = select.epoll()
            res.push(self._ep.close)
            self._ep.register(self._wake, select.EPOLLIN)
            if wakeup != "timer":
                # The kernel wakes the map's poll queue when a committed record becomes visible
                # to a consumer that had caught up (unless the program passed BPF_RB_NO_WAKEUP).
                self._ep.register(map_fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise

    @property
    def parser(self) -> RingParser:
        """The layout layer; ClosedError once the reader is closed."""
        parser = self._parser
        if self._closed or parser is None:
            raise ClosedError("the ring buffer reader is closed")
        return parser

    @property
    def closed(self) -> bool:
        return self._closed

    def poll(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` s (None: no limit) for data (epoll), or just sleep it (timer
        mode). True if data is pending; raises ClosedError if the reader is closed, also when
        `close` interrupts the wait."""
        with self._poll_lock:
            if self.parser.pending_bytes():
                return True
            self._ep.poll(timeout)
            if self._closed:
                raise ClosedError("the ring buffer reader was closed while polling")
            return bool(self.parser.pending_bytes())

    def stamp_with(self, stamper: Stamper | None) -> None:
        """Have every read stamp its records' timestamps run by run (Batch.times)."""
        self.parser.stamper = stamper

    def read(self, max_bytes: int | None = None) -> Batch:
        with self._read_lock:
            res = self.parser.read(max_bytes)
        return Batch(res.records, discarded=res.discarded, times=res.times, ordered=res.ordered)

    def fill_bytes(self) -> int:
        return self.parser.pending_bytes()

    @property
    def capacity_bytes(self) -> int:
        return self.size

    def close(self) -> None:
        """Wake a blocked poll, unmap, close our fds. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(OSError, AttributeError):  # AttributeError: __init__ failed early
                os.eventfd_write(self._wake, 1)
            with self._poll_lock, self._read_lock:
                self._parser = None
                self._finalizer()

    def __enter__(self) -> RingBufferReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"wakeup {self.wakeup}"
        return f"<RingBufferReader {state}, {self.size} bytes>"
