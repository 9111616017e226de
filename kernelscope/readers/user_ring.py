"""Writing into a BPF_MAP_TYPE_USER_RINGBUF (Linux 6.1): user space produces, a program drains.

    probe.send("user_ringbuf", [{"pid": 1, "value": 7}, ...], timeout=1.0)

The protocol is libbpf's (`user_ring_buffer__reserve` / `__submit`, src/ringbuf.c) and the
kernel's checks (`__bpf_user_ringbuf_peek`, kernel/bpf/ringbuf.c): each sample is an 8-byte
header {u32 len; u32 pad} and its payload, rounded up to 8 bytes, written at
`producer_pos & (size - 1)` in the data area (mapped twice, so a sample that wraps is still
contiguous); the kernel consumes up to `producer_pos` and stops at a header with the BUSY
bit. libbpf publishes each sample as it reserves it (BUSY set) and clears BUSY on submit.
kernelscope writes a whole batch instead: every header (BUSY clear) and payload of as many
samples as fit, as strided numpy stores straight into the mapped area, then one store to
`producer_pos`. x86-64 keeps stores in
order, so the kernel, which reads `producer_pos` with acquire semantics, never sees a
sample before its bytes. No syscall, no Python call per record.

When the ring is full the program has not drained it yet: `timeout` > 0 waits on the map fd
with epoll (the kernel signals EPOLLOUT after a drain that consumed something), and when
there is still no room, UserRingFullError says how many records went in and how many did
not. Nothing is dropped without an error.
"""

from __future__ import annotations

import mmap
import select
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ClosedError, SchemaError, UnknownNameError, UserRingFullError
from .base import Resources
from .ring import HDR, PAGE, ring_views
from .ring import record_span as sample_span  # the same layout as a ring buffer's

__all__ = ["HDR", "PAGE", "RingWriter", "UserRing", "choose_ring", "sample_span", "to_records"]


class RingWriter:
    """Layout only: writes batches of samples between producer_pos and consumer_pos.

    `consumer` holds consumer_pos at offset 0 (the kernel's, read-only here); `producer` holds
    producer_pos at offset 0 and the double-mapped data area at `data_offset`. Tests pass
    bytearrays built to the same layout; UserRing passes the two mmaps.
    """

    # Bytes written per step of a batch: the payload copy and the header stores of one step
    # touch the same cache lines, so the second pass finds them in cache (1 M samples of 32 B:
    # 10 ns a sample in steps, 14 in two passes over the whole batch); a step costs ~2 us.
    STEP_BYTES = 256 * 1024

    def __init__(self, consumer: Any, producer: Any, size: int, data_offset: int = PAGE) -> None:
        self._cons, self._prod, self._data = ring_views(consumer, producer, size, data_offset)
        self.size = size
        self._layouts: dict[int, _Slots] = {}

    def pending_bytes(self) -> int:
        return int(self._prod[0]) - int(self._cons[0])

    def write(self, records: np.ndarray) -> int:
        """Write as many of `records` as fit, in order; returns how many."""
        n, size = len(records), records.dtype.itemsize
        lay = self._layouts.get(size)
        if lay is None:
            span = sample_span(size)
            if span > self.size:
                raise ValueError(f"a {size}-byte sample does not fit the ring ({self.size} bytes)")
            lay = self._layouts[size] = _Slots(self._data, size, max(1, self.STEP_BYTES // span))
        span = lay.span
        prod = self._prod.item(0)
        k = min(n, (self.size - prod + self._cons.item(0)) // span)
        if k <= 0:
            return 0
        # The k slots from the producer's offset are one strided run: contiguous even when the
        # batch runs past the end of the area, which is mapped twice in a row (start < size and
        # k * span <= size).
        first, rem = divmod(prod & (self.size - 1), span)
        hdr, payload = lay.views(rem)
        if payload is None:  # zero-byte samples: headers alone
            hdr[first:first + k] = 0
        else:
            step, src = lay.step, (records if k == n else records[:k]).view(payload.dtype)
            for i in range(0, k, step):  # one step for up to 256 KiB
                a, b = first + i, first + min(i + step, k)
                payload[a:b] = src[i:i + step] if k > step else src
                hdr[a:b] = size
        # Publish: one store, after every byte of the batch. x86-64 (TSO) makes stores visible
        # in program order (a weakly ordered CPU would need a release store here), and numpy's
        # strided copies are plain stores (glibc's non-temporal memcpy path ends in sfence), so
        # the kernel, which loads producer_pos with acquire semantics (__bpf_user_ringbuf_peek),
        # never sees a sample before its bytes.
        self._prod[0] = prod + k * span
        return k


class _Slots:
    """Strided views of the data area as slots of one sample size: {u64 header; payload}.

    The kernel reads only the header's u32 len (BUSY and DISCARD clear here) and the payload;
    the u32 after len is written 0, as libbpf does, and a payload's padding to 8 bytes keeps
    what it held. A slot starts at a multiple of 8, so the views of a size are span / 8
    phases (offset within the first slot), each made when first needed, not per call.
    """

    def __init__(self, data: np.ndarray, size: int, step: int) -> None:
        self.span, self.step, self._data = sample_span(size), step, data
        names, formats, offsets = ["hdr"], ["<u8"], [0]
        if size:  # a zero-byte sample is a header alone
            names, formats, offsets = [*names, "payload"], [*formats, f"V{size}"], [*offsets, HDR]
        self._slot = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": self.span})
        self._phases: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def views(self, phase: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(headers as u64, payloads or None) of the slots that start `phase` bytes into a span."""
        got = self._phases.get(phase)
        if got is None:
            count = (len(self._data) - phase) // self.span
            slots = np.ndarray((count,), self._slot, buffer=self._data, offset=phase)
            payload = slots["payload"] if "payload" in (self._slot.names or ()) else None
            got = self._phases[phase] = (slots["hdr"], payload)
        return got


def choose_ring(name: Any, records: Any, rings: Iterable[str], program: str) -> tuple[str, Any]:
    """(map name, records) for `send(name, records)` or `send(records)` with one user ring.

    `program` names whose rings these are in errors ("this program", "the recorded program").
    """
    if records is None and name is not None and not isinstance(name, str):
        name, records = None, name
    names = list(rings)
    if not names:
        raise UnknownNameError(f"{program} has no BPF_MAP_TYPE_USER_RINGBUF map to send to")
    if name is None:
        if len(names) > 1:
            raise UnknownNameError(f"several user ring buffers: name one of {', '.join(names)}")
        name = names[0]
    if name not in names:
        raise UnknownNameError(f"no user ring buffer {name!r}; {program} has {', '.join(names)}")
    return name, records


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
    """The producer side of one user ring buffer map: its mappings, the writer, the counts."""

    def __init__(self, name: str, fd: int, size: int, dtype: np.dtype | None) -> None:
        self.name = name
        self.size = size
        self.dtype = dtype
        self.sent = 0
        self.full = 0  # sends that found the ring full (waited or raised)
        self._lock = threading.Lock()  # one producer at a time (the kernel's model, and libbpf's)
        res = self._res = Resources()
        try:
            # page 0: consumer_pos, read-only (the kernel refuses a writable mapping of it);
            # from page 1: producer_pos, then the data area twice
            cons = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ)
            res.push(cons.close)
            prod = mmap.mmap(fd, PAGE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=PAGE)
            res.push(prod.close)
            self._writer: RingWriter | None = RingWriter(cons, prod, size)
            epoll = select.epoll()
            res.push(epoll.close)
            self._epoll: select.epoll | None = epoll
            epoll.register(fd, select.EPOLLOUT)
        except BaseException:
            self._writer = self._epoll = None
            res.release()
            raise

    @property
    def closed(self) -> bool:
        return self._writer is None

    def fill_bytes(self) -> int:
        """Bytes written (headers included) that the kernel has not drained yet."""
        w = self._writer
        return 0 if w is None else w.pending_bytes()

    def send(self, records: Any, timeout: float = 0.0) -> int:
        """Write one sample per record, in order, in batches. Returns how many were sent.

        `timeout`: seconds to wait in total for room when the ring is full (0: do not wait).
        Raises UserRingFullError (with .sent/.remaining) when records are left over.
        """
        arr = to_records(records, self.dtype, f"send to {self.name}")
        n = len(arr)
        if n and sample_span(arr.dtype.itemsize) > self.size:
            raise ValueError(f"{self.name}: a {arr.dtype.itemsize}-byte sample does not fit the ring "
                             f"({self.size} bytes)")
        deadline = time.monotonic() + timeout
        done = 0
        with self._lock:
            if self._writer is None or self._epoll is None:
                raise ClosedError(f"{self.name}: the probe is closed")
            waited = False
            while done < n:
                k = self._writer.write(arr[done:])
                done += k
                self.sent += k
                if done == n:
                    break
                if k == 0:
                    if not waited:
                        self.full += 1
                        waited = True
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise UserRingFullError(
                            f"{self.name}: the user ring buffer is full ({self.size} bytes, "
                            f"{self.fill_bytes()} waiting for the program to drain); {done} of {n} "
                            f"records sent, {n - done} not. The program drains only when it runs: "
                            "trigger its attach point, send with a timeout, or use a bigger ring "
                            "(pages=...).", sent=done, remaining=n - done)
                    # EPOLLOUT: the ring is not completely full (ringbuf_map_poll_user), which a
                    # drain brings about. A ring with a few bytes free, too few for a sample, is
                    # "ready" at once: a short sleep then keeps this loop from spinning.
                    t0 = time.monotonic()
                    if self._epoll.poll(min(left, 0.1)) and time.monotonic() - t0 < 0.0005:
                        time.sleep(0.001)
                else:
                    waited = False
        return n

    def close(self) -> None:
        """Unmap the ring and close the epoll; a second call does nothing."""
        with self._lock:
            self._writer = self._epoll = None  # the writer's numpy views go before the mappings can
            self._res.release()
