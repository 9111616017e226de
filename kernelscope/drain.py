"""The drain loop: readers -> batches -> stores, paced, and the one thread that runs it.

`Drain.poll_once()` is the loop's body (`Probe.poll_once()` delegates to it); `_drain_thread`
runs the owner's `poll_once` holding only a weak reference, so a forgotten probe is still
collected and closed. Nothing here knows a backend or imports probe.py.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .backends.base import Program
from .backends.rewrite import OutputMap
from .captures.capture import MapCapture
from .errors import ClosedError, SchemaError
from .order import OrderTracker, Reorderer
from .readers.base import Reader
from .readers.batch import Batch
from .readers.perf import PerfBufferReader
from .readers.ring import PAGE, RingBufferReader, pace, record_span
from .schema import Schema
from .store import FrameStore

RESERVE_RING_BYTES = 64 << 20  # rings up to this size get their drain memory faulted in at load


@dataclass
class MapState:
    """Everything kept per output map: its reader, rows and counters."""

    om: OutputMap
    schema: Schema
    store: FrameStore
    reader: Reader | None = None  # None in a replay: no buffer behind it
    order: OrderTracker | None = None
    reorder: Reorderer | None = None
    lost_records: int = 0
    lost_by_cpu: dict[int, int] = field(default_factory=dict)
    discarded_seen: int = 0
    batches: int = 0
    pages: int = 0
    history: deque[dict[str, float]] = field(default_factory=lambda: deque(maxlen=100_000))
    carried: dict[str, int] = field(default_factory=dict)  # counters of programs replaced by reconfigure()
    marks: list[dict[str, Any]] = field(default_factory=list)  # {"t", "what"}: settings changes, for plots

    def capture(self, stats: dict[str, Any], t0: float) -> MapCapture:
        """Everything received and counted, for a capture file (`t0`: the start, monotonic s)."""
        c = self.store.chunk()
        return MapCapture(
            name=self.om.name,
            kind=self.om.kind,
            dtype=self.schema.dtype,
            records=c.records,
            seq=np.arange(c.seq0, c.seq0 + len(c.records), dtype=np.int64),
            arrival_ns=c.arrival_ns,
            cpu=c.cpu,
            stats=stats,
            history=[{**h, "t": h["t"] - t0} for h in self.history],
            pages=self.pages,
            epoch_offset_ns=self.schema.epoch_offset_ns,
            marks=[{**m, "t": m["t"] - t0} for m in self.marks],
        )

    def live_reader(self) -> Reader:
        """The reader to drain; ClosedError for a map with none (a replay's)."""
        if self.reader is None:
            raise ClosedError(f"{self.om.name}: no buffer reader behind this map")
        return self.reader



def fill_bytes(reader: Reader | None) -> int:
    """Bytes waiting in a reader's buffer(s) (all CPUs of a perf buffer); 0 once closed."""
    return 0 if reader is None or reader.closed else reader.fill_bytes()


# --- the loop --------------------------------------------------------------------------

HISTORY_INTERVAL = 0.1  # seconds between samples of the counters kept for plots and captures
# Below this arrival rate (records/s) adaptive pacing reads as soon as the kernel notifies:
# a wake-up per record then costs the producer a few per cent of a CPU at most, and a pause
# would only delay sparse events (by up to poll_interval).
PACE_MIN_RATE = 10_000


class Settings(Protocol):
    """What the drain reads of its owner's settings at each poll (they change on reconfigure)."""

    wakeup: str
    poll_interval: float


class Drain:
    """Readers -> batches -> stores for a set of output maps, paced; the body of the drain thread.

    `maps` is the owner's dict (it may gain maps when the program is reloaded), `stop` the
    Event that cuts waits short, `stats` computes the per-map figures sampled into history.
    """

    def __init__(self, maps: dict[str, MapState], stop: threading.Event, settings: Settings,
                 stats: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.maps = maps
        self.stop = stop
        self.settings = settings
        self.stats = stats
        self.lock = threading.RLock()  # one drainer at a time
        self.last_sample = 0.0
        # adaptive pacing: seconds between reads, the next read (monotonic ns; None: wait for
        # the kernel), and since when the records the next read finds have been arriving
        self.interval = 0.0
        self.next_read: int | None = None
        self.window_start = 0
        self.last_read = 0  # monotonic ns of the last read's start

    def pending(self) -> bool:
        return any(fill_bytes(ms.reader) for ms in self.maps.values())

    def ready(self) -> bool:
        """Data to read without waiting. A perf buffer that batches its wake-ups (a watermark,
        the default, or wakeup_events > 1) is left to its wake-up or the poll_interval timer,
        so a steady trickle below the watermark is read once per interval, not per poll."""
        return any(fill_bytes(ms.reader) for ms in self.maps.values()
                   if not (isinstance(ms.reader, PerfBufferReader) and ms.reader.batches_wakeups))

    def poll_once(self, timeout: float = 0.0) -> int:
        """Wait up to `timeout` s for data, then drain every output map once. Returns rows read."""
        wakeup = self.settings.wakeup
        waited = False  # for the kernel's wake-up
        if timeout and wakeup == "timer":
            self.stop.wait(timeout)  # timer-driven: look every poll_interval, pending or not
        elif timeout and self.next_read is not None:
            self.stop.wait(min(max(0, self.next_read - time.monotonic_ns()) / 1e9, timeout))
        elif timeout and not self.ready():
            self._wait(timeout)
            waited = True
        total = 0
        with self.lock:
            now = time.monotonic_ns()
            paced = self.paced()
            pending = [(fill_bytes(ms.reader), ms.live_reader().capacity_bytes)
                       for ms in self.maps.values()] if paced else []
            for ms in self.maps.values():
                batch: Batch = ms.live_reader().read()
                ms.batches += 1
                ms.lost_records += batch.lost
                for cpu, n in batch.lost_by_cpu.items():
                    ms.lost_by_cpu[cpu] = ms.lost_by_cpu.get(cpu, 0) + n
                ms.discarded_seen += batch.discarded
                if not len(batch):
                    continue
                total += len(batch)
                store(ms, batch, time.monotonic_ns())  # arrived by now: stamped after the read
            limit = timeout or self.settings.poll_interval
            self.next_read = self.next_paced_read(now, pending, limit, waited, total) if paced else None
            self.window_start = self.last_read = now
            self.sample()
        return total

    def paced(self) -> bool:
        """Adaptive pacing applies to probes whose output maps are all ring buffers: a perf
        buffer keeps its own wake-up settings (wakeup_events, watermark_bytes)."""
        return (self.settings.wakeup == "adaptive" and bool(self.maps)
                and all(ms.om.kind == "ringbuf" for ms in self.maps.values()))

    def next_paced_read(self, now: int, pending: list[tuple[int, int]], limit: float,
                        waited: bool, records: int) -> int | None:
        """When to start the next read, from what the read started at `now` found (bytes
        pending, capacity per map; `records` in all); None when it found nothing, or records
        that arrived slower than PACE_MIN_RATE: wait for the kernel then, so sparse events
        arrive at once (a wake-up per record costs nothing worth saving at that rate).

        The interval survives a paced read that found nothing (a producer that did not get
        the CPU for one interval, e.g. because each of our wake-ups preempted it on a shared
        CPU, is still busy); it halves when a whole wait for the kernel (`waited`) brought
        nothing, so a ring idle for a while is paced from a short interval again.
        """
        window = max(0, now - self.window_start) / 1e9 if self.window_start else 0.0
        found = [(n, capacity) for n, capacity in pending if n]
        if not found:
            if waited:
                self.interval /= 2
            return None
        # the rate that decides: records since the previous read (after a wait for the kernel,
        # `window` only spans the time since the wake-up, which one record makes look fast)
        since = max(0, now - self.last_read) / 1e9 if self.last_read else window
        if records < PACE_MIN_RATE * since:
            return None
        self.interval = min(pace(self.interval, window, n, capacity, limit) for n, capacity in found)
        return now + int(self.interval * 1e9)

    def _wait(self, timeout: float) -> None:
        """Wait for the kernel to notify (or `timeout`); the next read's records arrived after."""
        readers = [ms.live_reader() for ms in self.maps.values()]
        if not readers:
            self.stop.wait(timeout)
        elif len(readers) == 1:
            r = readers[0]
            if isinstance(r, PerfBufferReader) and isinstance(self.stop, StopSignal):
                with self.stop.interrupting(r.interrupt):
                    if not self.stop.is_set():  # set before the waker was in place
                        r.poll(timeout)
            else:
                r.poll(timeout)
        else:
            # several maps: short polls in turn, bounded by `timeout` overall
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not self.stop.is_set():
                if any(r.poll(min(0.005, timeout)) for r in readers):
                    break
        self.window_start = time.monotonic_ns()

    def flush_reorder(self) -> None:
        now = time.monotonic_ns()
        for ms in self.maps.values():
            if ms.reorder is not None:
                batch = ms.reorder.flush()
                if len(batch):
                    if ms.order is not None:
                        ms.order.update(batch.records)
                    ms.store.append(batch, now)

    def sample(self, force: bool = False) -> None:
        """Append the counters to each map's history, at most every HISTORY_INTERVAL s."""
        now = time.monotonic()
        if not force and now - self.last_sample < HISTORY_INTERVAL:
            return
        self.last_sample = now
        for name, st in self.stats().items():
            self.maps[name].history.append(
                {
                    "t": now,
                    "attempted": st["attempted"],
                    "received": st["received"],
                    "dropped": st["dropped"],
                    "fill_bytes": st["fill_bytes"],
                    "capacity_bytes": st["capacity_bytes"],
                    "lost_records": st["lost_records"],
                }
            )


def store(ms: MapState, batch: Batch, now: int) -> None:
    """One batch into its map's store, through the reorder window and the order tracker."""
    if ms.reorder is not None:
        batch = ms.reorder.push(batch)
        if not len(batch):
            return
    if ms.order is not None:
        ms.order.update(batch.records, batch.ordered, batch.runs)
    ms.store.append(batch, now)


class Drained(Protocol):
    """What the drain thread needs of its owner (a Probe)."""

    poll_interval: float
    error: BaseException | None

    def poll_once(self, timeout: float = 0.0) -> int: ...


def _drain_thread(ref: weakref.ReferenceType[Drained], stop: threading.Event) -> None:
    while not stop.is_set():
        owner = ref()
        if owner is None:
            return
        try:
            owner.poll_once(owner.poll_interval)
        except ClosedError:
            return
        except Exception as e:  # keep the error for the user, stop draining
            owner.error = e
            return
        finally:
            del owner


# --- what the drain owns, and what it reports ---------------------------------------------


class StopSignal(threading.Event):
    """The drain thread's stop Event. `set()` also runs the wakers of a wait under way
    (`interrupting`), so a reader blocked in poll returns at once and stop() joins the drain
    thread without waiting out a poll_interval (a perf buffer with batched wake-ups sits in
    that wait whenever it is below its watermark)."""

    def __init__(self) -> None:
        super().__init__()
        self._wakers: list[Callable[[], None]] = []

    def set(self) -> None:
        super().set()
        for wake in list(self._wakers):
            with contextlib.suppress(ClosedError, OSError):
                wake()

    @contextlib.contextmanager
    def interrupting(self, wake: Callable[[], None]) -> Iterator[None]:
        self._wakers.append(wake)
        try:
            yield
        finally:
            self._wakers.remove(wake)


class Resources:
    """The kernel-side objects of a probe (program, readers, drain thread), closable without a
    reference to the probe (for `weakref.finalize`)."""

    def __init__(self) -> None:
        self.prog: Program | None = None
        self.readers: list[Any] = []
        self.stop = StopSignal()
        self.thread: threading.Thread | None = None

    def close(self) -> None:
        self.stop.set()
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        for r in self.readers:
            r.close()
        self.readers.clear()
        if self.prog is not None:
            self.prog.close()
            self.prog = None


class ReaderSettings(Protocol):
    """The settings `open_map` builds a reader from (a Probe's)."""

    pages: int | dict[str, int] | None
    max_rows: int | None
    wakeup: str
    wakeup_events: int | None
    watermark_bytes: int | None
    reorder_ns: int | None
    max_bytes: int | None
    warnings: list[str]


def open_map(prog: Program, om: OutputMap, dtype: np.dtype, old: MapState | None,
             s: ReaderSettings) -> MapState:
    """The MapState of output map `om` of a loaded program, with a new reader on its buffer.

    `old`: the map's state under the program this one replaces (reconfigure); with the same
    record type its rows and counts carry on.
    """
    name = om.name
    if old is not None and old.schema.dtype == np.dtype(dtype):
        ms = old  # reconfigure(): same program, new buffers; rows and counts carry on
        ms.om = om
    else:
        schema = Schema(np.dtype(dtype), per_cpu=om.kind == "perf")
        warnings = s.warnings  # the list, not the probe: a store must not keep its probe alive
        ms = MapState(om, schema, FrameStore(schema, s.max_rows, s.max_bytes,
                                             warn=lambda text: warnings.append(f"{name}: {text}")))
    schema = ms.schema
    if om.kind == "ringbuf":
        size = prog.ring_size(name)
        ms.pages = size // PAGE
        # a full ring is drained into memory faulted in now, not page by page while timed:
        # ~1.4x the ring for 32-byte events, so only up to RESERVE_RING_BYTES of ring, and not
        # beyond what max_rows keeps
        rows = size // record_span(schema.dtype.itemsize)
        reserve = size <= RESERVE_RING_BYTES and (s.max_rows is None or rows <= s.max_rows)
        ms.reader = RingBufferReader(prog.map_fd(name), size, schema.dtype, wakeup=s.wakeup,
                                     reserve=reserve)
        ms.store.reserve(rows if reserve else 0)
        ms.reader.stamp_with(ms.store.stamper(rows if reserve else 0))
    else:
        pages = s.pages.get(name, 64) if isinstance(s.pages, dict) else (s.pages or 64)
        ms.pages = pages
        ms.reader = PerfBufferReader(
            prog.perf_set_fd(name),
            schema.dtype,
            pages=pages,
            wakeup_events=s.wakeup_events,
            watermark_bytes=s.watermark_bytes,
        )
    tf = schema.time_field
    if tf:
        ms.order = ms.order or OrderTracker(tf)
        ms.reorder = Reorderer(tf, s.reorder_ns) if s.reorder_ns is not None else None
    elif s.reorder_ns is not None:
        ms.reader.close()
        raise SchemaError(f"{name}: reorder_ns needs a u64 timestamp field (e.g. `u64 ts`)")
    return ms


def map_stats(maps: dict[str, MapState], counters: Callable[[], dict[str, dict[str, int]]],
              counts_discards: bool) -> dict[str, dict[str, Any]]:
    """Per output map: attempted, received, dropped, in_flight, lost_records, ordering...

    `counters` reads the program's own; `counts_discards` False when the program cannot count
    discarded records (CO-RE: bpf_ringbuf_discard() names no map), so the readers' count is used.

    A live snapshot is consistent (in_flight >= 0) because of the order of reads: what arrived
    first (store, then reorder window, so a record moving between them is not seen twice),
    then the counters twice. The program bumps `attempted` before `failed`/`discarded` for the
    same record, and counters only grow: `failed`/`discarded` come from the first read and
    `attempted` from the second, which covers every record counted before it.
    """
    got = {name: (ms.store.received + (len(ms.reorder) if ms.reorder else 0), ms.discarded_seen)
           for name, ms in maps.items()}
    first = counters()
    later = counters()
    out = {}
    for name, ms in maps.items():
        received, discarded_seen = got[name]
        zero = {"attempted": 0, "failed": 0, "discarded": 0}
        now = {**first.get(name, zero), "attempted": later.get(name, zero).get("attempted", 0)}
        c = {k: now.get(k, 0) + ms.carried.get(k, 0) for k in ("attempted", "failed", "discarded")}
        if not counts_discards:
            c["discarded"] += discarded_seen
        attempted = c["attempted"] - c["discarded"]
        store = ms.store
        out[name] = {
            "kind": ms.om.kind,
            "attempted": attempted,
            "received": received,
            "dropped": c["failed"],
            "in_flight": attempted - received - c["failed"],
            "discarded": c["discarded"],
            "lost_records": ms.lost_records,
            "stored": len(store),
            "evicted": store.evicted,
            "spilled": store.spilled_rows,
            "fill_bytes": fill_bytes(ms.reader),
            "capacity_bytes": ms.reader.capacity_bytes if ms.reader else 0,
            "pages": ms.pages,
            "inversions": ms.order.inversions if ms.order else None,
            "max_inversion_ns": ms.order.max_inversion_ns if ms.order else None,
            "batches": ms.batches,
            "memory_bytes": store.memory_bytes,
            "spill_bytes": store.spill_bytes,
            "reloads": len(ms.marks),
        }
    return out


def carry_over(maps: dict[str, MapState], rings: dict[str, Any], counters: dict[str, dict[str, int]],
               before: dict[str, dict[str, int]]) -> None:
    """Keep the counts of a program about to be replaced (reconfigure), so they carry on."""
    for name, ms in maps.items():
        for key in ("attempted", "failed", "discarded"):
            ms.carried[key] = ms.carried.get(key, 0) + counters.get(name, {}).get(key, 0)
    for name, ring in rings.items():  # user ring counts carry on too
        was = before.setdefault(name, {})
        for key, n in (("sent", ring.sent), ("full", ring.full),
                       ("drained", counters.get(name, {}).get("drained", 0))):
            was[key] = was.get(key, 0) + n


def user_ring_stats(rings: dict[str, Any], counters: dict[str, dict[str, int]],
                    before: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
    """Per user ring buffer: records sent, drained by the program, pending, times found full
    (`before`: the counts of programs replaced by reconfigure)."""
    out = {}
    for name, ring in rings.items():
        was = before.get(name, {})
        c = counters.get(name, {})
        drained = c.get("drained", 0) + was.get("drained", 0)
        sent = ring.sent + was.get("sent", 0)
        out[name] = {
            "kind": "user_ringbuf",
            "sent": sent,
            "drained": drained,
            "pending": sent - drained,
            "drain_errors": c.get("drain_errors", 0),
            "full": ring.full + was.get("full", 0),
            "fill_bytes": ring.fill_bytes(),
            "capacity_bytes": ring.size,
            "pages": ring.size // PAGE,
        }
    return out
