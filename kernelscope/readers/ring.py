"""BPF ring buffer (BPF_MAP_TYPE_RINGBUF) reader: mmap the map fd, parse records in batches.

Layout (kernel/bpf/ringbuf.c, Documentation/bpf/ringbuf.rst; libbpf ringbuf.c does the same):
- page 0 of the map fd: consumer_pos (u64), mapped read-write: user space advances it;
- page 1: producer_pos (u64), read-only, advanced by the kernel on every reservation;
- from page 2: the data area, `size` bytes (a power of two), mapped twice in a row so a
  record that wraps past the end is still contiguous in memory.
Each record: an 8-byte header {u32 len; u32 pg_off} then `len` bytes, the whole padded to
8 bytes. Bit 31 of len is BUSY (reserved, not yet submitted): nothing after it may be read
yet. Bit 30 is DISCARD: skip it. Positions only grow; `pos & (size - 1)` is the offset.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import weakref
from dataclasses import dataclass

import numpy as np

from ..errors import ClosedError
from .batch import Batch, concat_records, copy_records, opaque

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


@dataclass
class ParseResult:
    records: np.ndarray
    discarded: int
    consumed: int  # bytes consumer_pos moved
    busy: bool  # stopped at a record the producer has not committed yet


class RingParser:
    """Layout only: parses the records between consumer_pos and producer_pos.

    `consumer` holds consumer_pos at offset 0 (writable), `producer` holds producer_pos at
    offset 0 and the double-mapped data area at offset `data_offset`. Tests pass bytearrays
    built to the same layout; the reader passes the two mmaps.
    """

    def __init__(
        self, consumer: object, producer: object, size: int, dtype: np.dtype, data_offset: int = PAGE
    ) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring size must be a power of two, got {size}")
        self.size = size
        self.mask = size - 1
        self.dtype = np.dtype(dtype)
        self.stride = record_span(self.dtype.itemsize)
        self._opaque = opaque(self.dtype)
        self._run_max = max(1, RELEASE_BYTES // self.stride)
        self._cons = np.frombuffer(consumer, dtype="<u8", count=1)  # type: ignore[call-overload]
        self._prod = np.frombuffer(producer, dtype="<u8", count=1)  # type: ignore[call-overload]
        self._data = np.frombuffer(producer, dtype=np.uint8, offset=data_offset)  # type: ignore[call-overload]
        if len(self._data) < 2 * size:
            raise ValueError("data area must be mapped twice (2 * size bytes)")

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
        every RELEASE_BYTES of fixed-size records copied out, and at the end."""
        cons = self.consumer_pos
        prod = self.producer_pos  # read before any record: x86 keeps loads in order
        avail = prod - cons
        if max_bytes is not None:
            avail = min(avail, max_bytes)
        start = cons & self.mask
        region = self._data[start : start + avail]  # contiguous thanks to the double mapping
        # Fixed-size records are copied into one array (a copy: the kernel reuses the bytes
        # once consumer_pos moves on); records of other sizes go between its segments.
        out = np.empty(avail // self.stride, dtype=self._opaque)
        chunks: list[np.ndarray] = []
        pos, filled, mark, discarded, busy = 0, 0, 0, 0, False
        itemsize, stride = self.dtype.itemsize, self.stride
        while pos + HDR <= avail:
            # Fast path: the longest run of committed records of exactly the struct's size,
            # found by reading every header at the expected stride in one vector operation.
            n = min((avail - pos) // stride, self._run_max, len(out) - filled)
            if n:
                lens = np.ndarray((n,), dtype="<u4", buffer=region, offset=pos, strides=(stride,))
                bad = np.flatnonzero(lens != itemsize)
                run = int(bad[0]) if len(bad) else n
                if run:
                    out[filled : filled + run] = np.ndarray(
                        (run,), dtype=self._opaque, buffer=region, offset=pos + HDR, strides=(stride,)
                    )
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
                break  # only when max_bytes cut the region
            if hdr & DISCARD:
                discarded += 1
            else:
                if filled > mark:
                    chunks.append(out[mark:filled].view(self.dtype))
                    mark = filled
                chunks.append(copy_records(region[pos + HDR : pos + HDR + length], self.dtype))
            pos += span
        if filled > mark:
            chunks.append(out[mark:filled].view(self.dtype))
        if pos:
            self._cons[0] = cons + pos  # the kernel reads it to make room
        records = concat_records(chunks, self.dtype)
        return ParseResult(records, discarded, pos, busy)


class _Resources:
    """What a reader owns in the kernel's name, closable without a reference to the reader.

    Python's mmap keeps a dup of the map fd, so an unclosed mapping keeps the BPF map alive
    after BCC closed its own fd: the parser's numpy views must go before the mappings can.
    """

    def __init__(self) -> None:
        self.maps: list[mmap.mmap] = []
        self.closables: list[object] = []
        self.parser: object | None = None

    def close(self) -> None:
        self.parser = None
        for m in self.maps:
            with contextlib.suppress(BufferError):  # a stray view still exists: unmapped with it
                m.close()
        for c in self.closables:
            with contextlib.suppress(OSError):
                c.close() if hasattr(c, "close") else os.close(c)  # type: ignore[arg-type]
        self.maps.clear()
        self.closables.clear()


WAKEUPS = ("adaptive", "epoll", "timer")


class RingBufferReader:
    """Public layer over one ring map fd: mmap, epoll wake-ups or timer mode, close.

    `map_fd` stays owned by the caller (BCC); the reader owns its mappings, its epoll and
    an eventfd that `close()` uses to wake a blocked `poll()`. `wakeup` "epoll" and
    "adaptive" register the map fd with the epoll (the caller's drain loop decides when
    to wait on it; "adaptive" says it paces its reads with `pace()`); "timer" does not.
    """

    def __init__(self, map_fd: int, size: int, dtype: np.dtype, wakeup: str = "epoll") -> None:
        if wakeup not in WAKEUPS:
            raise ValueError(f"wakeup must be one of {', '.join(map(repr, WAKEUPS))}, not {wakeup!r}")
        self.size = size
        self.wakeup = wakeup
        self.closed = False
        res = self._res = _Resources()
        self._finalizer = weakref.finalize(self, res.close)
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        res.maps.append(mmap.mmap(map_fd, PAGE, flags=mmap.MAP_SHARED, prot=rw))
        res.maps.append(
            mmap.mmap(map_fd, PAGE + 2 * size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=PAGE)
        )
        self.parser = res.parser = RingParser(res.maps[0], res.maps[1], size, dtype)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        res.closables.append(self._wake)
        self._ep = select.epoll()
        res.closables.append(self._ep)
        self._ep.register(self._wake, select.EPOLLIN)
        if wakeup != "timer":
            # The kernel wakes the map's poll queue when a committed record becomes visible
            # to a consumer that had caught up (unless the program passed BPF_RB_NO_WAKEUP).
            self._ep.register(map_fd, select.EPOLLIN)

    def _check(self) -> RingParser:
        if self.closed:
            raise ClosedError("ring buffer reader is closed")
        return self.parser

    def poll(self, timeout: float) -> bool:
        """Wait up to `timeout` s for data (epoll) or just sleep it (timer mode). True if data."""
        parser = self._check()
        if parser.pending_bytes():
            return True
        self._ep.poll(timeout)
        return not self.closed and bool(parser.pending_bytes())

    def read(self, max_bytes: int | None = None) -> Batch:
        res = self._check().read(max_bytes)
        return Batch(res.records, discarded=res.discarded)

    def fill_bytes(self) -> int:
        return 0 if self.closed else self.parser.pending_bytes()

    @property
    def capacity_bytes(self) -> int:
        return self.size

    def close(self) -> None:
        """Wake a blocked poll, unmap, close our fds. Idempotent."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)
        del self.parser
        self._finalizer()
