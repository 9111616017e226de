"""The drain loop: readers -> batches -> stores, paced, and the one thread that runs it.

`Drain.poll_once()` is the loop's body (`Probe.poll_once()` delegates to it); `_drain_thread`
runs the owner's `poll_once` holding only a weak reference, so a forgotten probe is still
collected and closed. Nothing here knows a backend or imports probe.py.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .backends.rewrite import OutputMap
from .errors import ClosedError
from .order import OrderTracker, Reorderer
from .readers.base import Reader
from .readers.batch import Batch
from .readers.ring import pace
from .schema import Schema
from .store import FrameStore


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

    def poll_once(self, timeout: float = 0.0) -> int:
        """Wait up to `timeout` s for data, then drain every output map once. Returns rows read."""
        wakeup = self.settings.wakeup
        waited = False  # for the kernel's wake-up
        if timeout and wakeup == "timer":
            self.stop.wait(timeout)  # timer-driven: look every poll_interval, pending or not
        elif timeout and self.next_read is not None:
            self.stop.wait(min(max(0, self.next_read - time.monotonic_ns()) / 1e9, timeout))
        elif timeout and not self.pending():
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
            readers[0].poll(timeout)
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
        ms.order.update(batch.records)
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
