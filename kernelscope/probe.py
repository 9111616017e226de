"""`Probe`: one BCC program, its output maps drained into DataFrames, every event accounted for.

    p = Probe(source).start()   # compile, attach, drain in a background thread
    p.df                        # DataFrame of what arrived (one output map)
    p.stats                     # attempted / received / dropped ... per output map
    p.stop(); p.close()

The drain loop is a plain `poll_once()` that tests call directly; `start()` runs it in a
daemon thread that holds only a weak reference, so a forgotten probe is still collected
and closed (`weakref.finalize`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import tracepoints
from .backends import bcc
from .backends.bcc import BCCProgram
from .backends.rewrite import instrument
from .drain import MapState, _drain_thread, fill_bytes
from .errors import AttachError, ClosedError, KernelscopeError, SchemaError
from .order import OrderTracker, Reorderer
from .readers.batch import Batch
from .readers.ring import PAGE, RingBufferReader, pace
from .results import Results
from .schema import Schema
from .store import FrameStore

_live: weakref.WeakSet[Probe] = weakref.WeakSet()
HISTORY_INTERVAL = 0.1  # seconds between samples of the counters kept for plots and captures
# Below this arrival rate (records/s) adaptive pacing reads as soon as the kernel notifies:
# a wake-up per record then costs the producer a few per cent of a CPU at most, and a pause
# would only delay sparse events (by up to poll_interval).
PACE_MIN_RATE = 10_000
GRACE = 0.02  # seconds for BPF programs already running to finish after the gate closes


def live_probes() -> list[Probe]:
    return [p for p in list(_live) if not p.closed]


@atexit.register
def close_all() -> None:
    """Close every live probe (interpreter exit, %bpf_stop --all, unload_ipython_extension)."""
    for p in live_probes():
        p.close()


class _Resources:
    """The kernel-side objects of a probe, closable without a reference to the probe."""

    def __init__(self) -> None:
        self.prog: Any = None  # BCCProgram or core.CoreProgram
        self.readers: list[Any] = []
        self.stop = threading.Event()
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


class Probe(Results):
    """A BCC program whose output maps drain into growing DataFrames.

    Under KERNELSCOPE_MODE=replay, `Probe(..., name=N)` returns the replay of the capture
    recorded for N instead (see kernelscope.mode), so notebooks run unchanged without BPF.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from . import mode

        if mode.mode() == "replay":
            from .captures.replay import replay

            return replay(mode.require_capture(kwargs.get("name")), speed=mode.replay_speed(),
                          name=kwargs.get("name"))
        return super().__new__(cls)

    def __init__(
        self,
        source: str,
        pages: int | Mapping[str, int] | None = None,
        poll_interval: float = 0.05,
        max_rows: int | None = None,
        cflags: tuple[str, ...] | list[str] = (),
        *,
        wakeup: str = "adaptive",
        wakeup_events: int = 1,
        watermark_bytes: int | None = None,
        reorder_ns: int | None = None,
        dtypes: Mapping[str, np.dtype] | None = None,
        name: str | None = None,
        usdt: Sequence[tuple[str | int, str, str]] = (),
        backend: str | None = None,
        globals: Mapping[str, Any] | None = None,
    ) -> None:
        """`pages`: ring buffer size in pages (whole ring) or perf buffer pages per CPU,
        one value for all output maps or a {map: pages} dict; None keeps the program's
        ring sizes and 64 pages per CPU for perf buffers.

        `wakeup` (ring buffers): "adaptive" (the default): after a read that found records,
        leave the ring unread for a pause sized from their arrival rate so that it would be
        about a quarter full (the interval between reads at most doubles from one read to
        the next, never exceeds poll_interval, and halves for each poll_interval the ring
        stays empty); after a read that found nothing, wait for the kernel to notify. An
        eager reader that keeps up is woken for nearly every record, each wake-up an
        interrupt on the producer's CPU that slows it; paced, it is woken about once per
        read. A lone event still arrives at once, any event within poll_interval. (Probes
        that also have a perf buffer read eagerly, as "epoll".) "epoll": read as soon as the
        kernel notifies. "timer": read every poll_interval, for programs that submit with
        BPF_RB_NO_WAKEUP. `wakeup_events`/`watermark_bytes`: when a perf buffer notifies.
        `reorder_ns`: hold events this long to emit them in
        timestamp order (needs a ts-like u64 field). `usdt`: (binary path or pid, probe,
        program function) triples, attached while compiling as BCC requires.

        `backend`: "bcc" (BCC macros: TRACEPOINT_PROBE, BPF_RINGBUF_OUTPUT...) or "libbpf"
        (CO-RE: SEC("tp/..."), vmlinux.h, BPF_CORE_READ); None picks "libbpf" when the source
        uses SEC(...). `dtypes` overrides a map's record type: a numpy dtype, or a C type name
        such as "struct event". `globals` (CO-RE): values for the program's `const volatile`
        variables, set before load as a libbpf skeleton does ({"targ_tgid": 1234}).
        """
        from .backends import core

        backend = backend or ("libbpf" if core.is_core(source) else "bcc")
        if backend not in ("bcc", "libbpf"):
            raise ValueError(f"backend must be 'bcc' or 'libbpf', not {backend!r}")
        self.backend = backend
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.source = source
        self.name = name
        self.pages = dict(pages) if isinstance(pages, Mapping) else pages
        self.poll_interval = poll_interval
        self.max_rows = max_rows
        self.cflags = tuple(cflags)
        self.wakeup = wakeup
        self.wakeup_events = wakeup_events
        self.watermark_bytes = watermark_bytes
        self.reorder_ns = reorder_ns
        self.dtypes: dict[str, Any] = dict(dtypes or {})
        self.usdt = list(usdt)
        self.globals = dict(globals or {})
        if self.globals and backend != "libbpf":
            raise ValueError("globals= sets `const volatile` variables of CO-RE programs; "
                             "for BCC programs use cflags=['-DNAME=VALUE']")
        self.maps: dict[str, MapState] = {}
        self.user_rings: dict[str, Any] = {}  # name -> userring.UserRing (CO-RE backend)
        self._sent_before: dict[str, dict[str, int]] = {}  # user ring counts of replaced programs
        self.error: BaseException | None = None
        self.closed = False
        self.started_at: float | None = None
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, self._res.close)
        self._lock = threading.RLock()  # one drainer at a time
        self._last_sample = 0.0
        # adaptive pacing: seconds between reads, the next read (monotonic ns; None: wait for
        # the kernel), and since when the records the next read finds have been arriving
        self._interval = 0.0
        self._next_read: int | None = None
        self._window_start = 0
        self._last_read = 0  # monotonic ns of the last read's start
        self._stopped_stats: dict[str, dict[str, Any]] | None = None
        self._stopped_send_stats: dict[str, dict[str, Any]] | None = None
        self.instrumented: Any = self._instrument()
        self.warnings: list[str] = []
        _live.add(self)

    # --- lifecycle -------------------------------------------------------------------

    def _instrument(self) -> Any:
        if self.backend == "libbpf":
            from .backends import core

            return core.prepare(self.source, self.pages)
        return instrument(self.source, self.pages)

    @property
    def bpf(self) -> Any:
        """The underlying `bcc.BPF` object (BCC backend; None before load, after close, for CO-RE)."""
        return getattr(self._res.prog, "bpf", None)

    @property
    def program(self) -> Any:
        """The loaded program behind either backend (BCCProgram or core.CoreProgram), or None."""
        return self._res.prog

    @property
    def loaded(self) -> bool:
        return self._res.prog is not None

    @property
    def running(self) -> bool:
        t = self._res.thread
        return t is not None and t.is_alive()

    def load(self) -> Probe:
        """Compile, load, attach and open the output gate; nothing is drained yet."""
        self._check_open()
        if self.loaded:
            return self
        if self.backend == "libbpf":
            from .backends import core

            prog: Any = core.load(self.instrumented, self.source, self.cflags, self.globals)
        else:
            bpf = bcc.load(self.instrumented, self.source, self.cflags, self.usdt)
            prog = BCCProgram(bpf, self.instrumented, self.source)
        self._res.prog = prog
        try:
            self._open_maps(prog)
            self._open_user_rings(prog)
        except BaseException:
            self._res.close()
            raise
        for note in prog.notes:
            if note not in self.warnings:
                self.warnings.append(note)
        self._set_gate(1)
        return self

    def _dtype(self, prog: Any, name: str) -> np.dtype | None:
        want = self.dtypes.get(name)
        if isinstance(want, str):
            return np.dtype(prog.named_dtype(want, name))
        return np.dtype(want) if want is not None else None

    def _open_maps(self, prog: Any) -> None:
        for name, om in self.instrumented.maps.items():
            dtype = self._dtype(prog, name)
            if dtype is None:
                dtype = prog.event_dtype(name)
            old = self.maps.get(name)
            if old is not None and old.schema.dtype == np.dtype(dtype):
                ms = old  # reconfigure(): same program, new buffers; rows and counts carry on
                ms.om = om
            else:
                schema = Schema(np.dtype(dtype), per_cpu=om.kind == "perf")
                ms = MapState(om, schema, FrameStore(schema, self.max_rows))
            schema = ms.schema
            if om.kind == "ringbuf":
                size = prog.ring_size(name)
                ms.pages = size // PAGE
                ms.reader = RingBufferReader(prog.map_fd(name), size, schema.dtype, wakeup=self.wakeup)
            else:
                from .readers.perf import PerfBufferReader

                pages = self.pages.get(name, 64) if isinstance(self.pages, dict) else (self.pages or 64)
                ms.pages = pages
                ms.reader = PerfBufferReader(
                    prog.perf_set_fd(name),
                    schema.dtype,
                    pages=pages,
                    wakeup_events=self.wakeup_events,
                    watermark_bytes=self.watermark_bytes,
                )
            self._res.readers.append(ms.reader)
            tf = schema.time_field
            if tf:
                ms.order = ms.order or OrderTracker(tf)
                ms.reorder = Reorderer(tf, self.reorder_ns) if self.reorder_ns is not None else None
            elif self.reorder_ns is not None:
                raise SchemaError(f"{name}: reorder_ns needs a u64 timestamp field (e.g. `u64 ts`)")
            self.maps[name] = ms
        if not self.maps and not getattr(self.instrumented, "user_rings", None):
            what = ("ring buffer or perf event array map (SEC(\".maps\"))" if self.backend == "libbpf"
                    else "BPF_RINGBUF_OUTPUT or BPF_PERF_OUTPUT map")
            self.warnings.append(f"the program declares no {what}: nothing to drain")

    def _open_user_rings(self, prog: Any) -> None:
        from .readers.user_ring import UserRing

        for name in getattr(self.instrumented, "user_rings", {}):
            dtype = self._dtype(prog, name)
            if dtype is None and name in self.instrumented.event_types:
                dtype = prog.event_dtype(name)
            ring = UserRing(name, prog.map_fd(name), prog.ring_size(name), dtype)
            self.user_rings[name] = ring
            self._res.readers.append(ring)

    def _set_gate(self, value: int) -> None:
        self._res.prog.set_gate(value)

    def send(self, name: str | None = None, records: Any = None, timeout: float = 0.0) -> int:
        """Write records into a BPF_MAP_TYPE_USER_RINGBUF map, in order; returns how many.

        `records`: dicts, a DataFrame or a numpy structured array of the struct the program
        reads (missing fields are zero). `name` may be omitted when there is one user ring.
        A full ring waits up to `timeout` s for the program to drain, then raises
        UserRingFullError saying how many records went in; nothing is lost silently.
        """
        from .readers.user_ring import choose_ring

        self._check_open()
        self.load()
        name, records = choose_ring(name, records, self.user_rings, "this program")
        return int(self.user_rings[name].send(records, timeout=timeout))

    @property
    def send_stats(self) -> dict[str, dict[str, Any]]:
        """Per user ring buffer: records sent, drained by the program, pending, times found full."""
        if not self.user_rings:
            return {}
        if self._stopped_send_stats is not None:
            return self._stopped_send_stats
        return self._compute_send_stats()

    def _compute_send_stats(self) -> dict[str, dict[str, Any]]:
        counters = self.counters() if self.loaded else {}
        out = {}
        for name, ring in self.user_rings.items():
            before = self._sent_before.get(name, {})
            c = counters.get(name, {})
            drained = c.get("drained", 0) + before.get("drained", 0)
            sent = ring.sent + before.get("sent", 0)
            out[name] = {
                "kind": "user_ringbuf",
                "sent": sent,
                "drained": drained,
                "pending": sent - drained,
                "drain_errors": c.get("drain_errors", 0),
                "full": ring.full + before.get("full", 0),
                "fill_bytes": ring.fill_bytes(),
                "capacity_bytes": ring.size,
                "pages": ring.size // PAGE,
            }
        return out

    def start(self) -> Probe:
        """Load if needed and drain in a background thread. Idempotent."""
        self.load()
        if self.running:
            return self
        self._set_gate(1)
        self._stopped_stats = None
        self._stopped_send_stats = None
        self._res.stop.clear()
        self.started_at = self.started_at or time.monotonic()
        t = threading.Thread(
            target=_drain_thread,
            args=(weakref.ref(self), self._res.stop),
            name=f"kernelscope-drain-{self.name or id(self)}",
            daemon=True,
        )
        self._res.thread = t
        t.start()
        return self

    def stop(self) -> Probe:
        """Close the gate, let running programs finish, drain what is left. Data stays.

        After stop() the counters are frozen, so `attempted == received + dropped` exactly.
        """
        if self.closed or not self.loaded:
            return self
        self._set_gate(0)
        self._res.stop.set()
        t = self._res.thread
        if t is not None and t is not threading.current_thread():
            t.join()
        self._res.thread = None
        time.sleep(GRACE)
        deadline = time.monotonic() + 5.0  # a BUSY record is finished by the time the gate closed
        while self.poll_once(0) or any(fill_bytes(ms.reader) for ms in self.maps.values()):
            if time.monotonic() > deadline:
                self.warnings.append("final drain stopped after 5 s with data still in a buffer")
                break
        self._flush_reorder()
        self._sample(force=True)
        self._stopped_stats = self._compute_stats()
        self._stopped_send_stats = self._compute_send_stats() if self.user_rings else None
        self._record()
        return self

    def _record(self) -> None:
        """In record mode, a named probe saves its capture each time it stops."""
        from . import mode

        if self.name and mode.mode() == "record":
            path = mode.capture_path(self.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.save(path)

    def reconfigure(
        self,
        *,
        pages: int | Mapping[str, int] | None = None,
        wakeup: str | None = None,
        wakeup_events: int | None = None,
        watermark_bytes: int | None = None,
        reorder_ns: int | bool | None = False,
        poll_interval: float | None = None,
    ) -> Probe:
        """Apply new buffer settings by reloading the program; rows and counts carry on.

        Buffer sizes are fixed when maps are created, so a new size means a new program:
        the old one is stopped (final drain, exact counts), its counters are carried over,
        and the change is marked (`MapState.marks`, `stats[...]['reloads']`) for plots.
        `reorder_ns=False` keeps the current window; None turns reordering off.
        """
        self._check_open()
        was_running = self.running
        changes = []
        if pages is not None and pages != self.pages:
            changes.append(f"pages {self.pages or 'default'} -> {pages}")
            self.pages = dict(pages) if isinstance(pages, Mapping) else pages
        if watermark_bytes == 0 and self.watermark_bytes is not None:
            changes.append(f"watermark_bytes {self.watermark_bytes} -> off")
            self.watermark_bytes = None  # 0 turns the watermark off: wake per wakeup_events
        for attr, value in (
            ("wakeup", wakeup),
            ("wakeup_events", wakeup_events),
            ("watermark_bytes", watermark_bytes or None),
            ("poll_interval", poll_interval),
        ):
            if value is not None and value != getattr(self, attr):
                changes.append(f"{attr} {getattr(self, attr)} -> {value}")
                setattr(self, attr, value)
        if reorder_ns is not False and reorder_ns != self.reorder_ns:
            changes.append(f"reorder_ns {self.reorder_ns} -> {reorder_ns}")
            self.reorder_ns = reorder_ns
        if not changes:
            return self
        if self.loaded:
            self.stop()
            counters = self.counters()
            for name, ms in self.maps.items():
                for key in ("attempted", "failed", "discarded"):
                    ms.carried[key] = ms.carried.get(key, 0) + counters.get(name, {}).get(key, 0)
            for name, ring in self.user_rings.items():  # user ring counts carry on too
                before = self._sent_before.setdefault(name, {})
                for key, n in (("sent", ring.sent), ("full", ring.full),
                               ("drained", counters.get(name, {}).get("drained", 0))):
                    before[key] = before.get(key, 0) + n
            self._res.close()
        self.instrumented = self._instrument()
        now = time.monotonic()
        for ms in self.maps.values():
            ms.marks.append({"t": now, "what": "; ".join(changes)})
        self._stopped_stats = None
        self.load()
        if was_running:
            self.start()
        return self

    def close(self) -> None:
        """Detach programs and free maps, readers and fds. Idempotent; frames stay readable."""
        if self.closed:
            return
        if self.loaded:
            with contextlib.suppress(Exception):
                self.stop()
        self.closed = True
        self._finalizer()

    def _check_open(self) -> None:
        if self.closed:
            raise ClosedError("this probe is closed; its frames stay readable, create a new Probe to run")

    def __enter__(self) -> Probe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- draining --------------------------------------------------------------------

    def poll_once(self, timeout: float = 0.0) -> int:
        """Wait up to `timeout` s for data, then drain every output map once. Returns rows read.

        The wait depends on `wakeup`: "timer" always sleeps `timeout`; "adaptive", after a
        read that found records, sleeps the pacing pause (on the stop Event, so stop() cuts
        it short); otherwise it waits until the kernel notifies or `timeout` passes.
        """
        self._check_open()
        if not self.loaded:
            raise KernelscopeError("probe is not loaded: call start() or load() first")
        waited = False  # for the kernel's wake-up
        if timeout and self.wakeup == "timer":
            self._res.stop.wait(timeout)  # timer-driven: look every poll_interval, pending or not
        elif timeout and self._next_read is not None:
            self._res.stop.wait(min(max(0, self._next_read - time.monotonic_ns()) / 1e9, timeout))
        elif timeout and not any(fill_bytes(ms.reader) for ms in self.maps.values()):
            self._wait(timeout)
            waited = True
        total = 0
        with self._lock:
            now = time.monotonic_ns()
            paced = self._paced()
            pending = [(fill_bytes(ms.reader), ms.reader.capacity_bytes)
                       for ms in self.maps.values()] if paced else []
            for ms in self.maps.values():
                batch: Batch = ms.reader.read()
                ms.batches += 1
                ms.lost_records += batch.lost
                for cpu, n in batch.lost_by_cpu.items():
                    ms.lost_by_cpu[cpu] = ms.lost_by_cpu.get(cpu, 0) + n
                ms.discarded_seen += batch.discarded
                if not len(batch):
                    continue
                total += len(batch)
                self._store(ms, batch, now)
            limit = timeout or self.poll_interval
            self._next_read = self._next_paced_read(now, pending, limit, waited, total) if paced else None
            self._window_start = self._last_read = now
            self._sample()
        return total

    def _paced(self) -> bool:
        """Adaptive pacing applies to probes whose output maps are all ring buffers: a perf
        buffer keeps its own wake-up settings (wakeup_events, watermark_bytes)."""
        return (self.wakeup == "adaptive" and bool(self.maps)
                and all(ms.om.kind == "ringbuf" for ms in self.maps.values()))

    def _next_paced_read(self, now: int, pending: list[tuple[int, int]], limit: float,
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
        window = max(0, now - self._window_start) / 1e9 if self._window_start else 0.0
        found = [(n, capacity) for n, capacity in pending if n]
        if not found:
            if waited:
                self._interval /= 2
            return None
        # the rate that decides: records since the previous read (after a wait for the kernel,
        # `window` only spans the time since the wake-up, which one record makes look fast)
        since = max(0, now - self._last_read) / 1e9 if self._last_read else window
        if records < PACE_MIN_RATE * since:
            return None
        self._interval = min(pace(self._interval, window, n, capacity, limit) for n, capacity in found)
        return now + int(self._interval * 1e9)

    def _wait(self, timeout: float) -> None:
        """Wait for the kernel to notify (or `timeout`); the next read's records arrived after."""
        readers = [ms.reader for ms in self.maps.values()]
        if not readers:
            self._res.stop.wait(timeout)
        elif len(readers) == 1:
            readers[0].poll(timeout)
        else:
            # several maps: short polls in turn, bounded by `timeout` overall
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not self._res.stop.is_set():
                if any(r.poll(min(0.005, timeout)) for r in readers):
                    break
        self._window_start = time.monotonic_ns()

    def _store(self, ms: MapState, batch: Batch, now: int) -> None:
        if ms.reorder is not None:
            batch = ms.reorder.push(batch)
            if not len(batch):
                return
        if ms.order is not None:
            ms.order.update(batch.records)
        ms.store.append(batch, now)

    def _flush_reorder(self) -> None:
        now = time.monotonic_ns()
        for ms in self.maps.values():
            if ms.reorder is not None:
                batch = ms.reorder.flush()
                if len(batch):
                    if ms.order is not None:
                        ms.order.update(batch.records)
                    ms.store.append(batch, now)

    # --- results ---------------------------------------------------------------------

    def counters(self) -> dict[str, dict[str, int]]:
        """The program's own per-CPU counters, summed: attempted, failed, discarded per map."""
        prog = self._res.prog
        if prog is None:
            return {}
        return dict(prog.counters())

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per output map: attempted, received, dropped, in_flight, lost_records, ordering..."""
        if self._stopped_stats is not None or not self.loaded:
            return self._stopped_stats or {}
        return self._compute_stats()

    def _compute_stats(self) -> dict[str, dict[str, Any]]:
        counters = self.counters()
        out = {}
        for name, ms in self.maps.items():
            now = counters.get(name, {"attempted": 0, "failed": 0, "discarded": 0})
            c = {k: now.get(k, 0) + ms.carried.get(k, 0) for k in ("attempted", "failed", "discarded")}
            if self.backend == "libbpf":
                # bpf_ringbuf_discard() names no map: count the discards the reader skipped
                c["discarded"] += ms.discarded_seen
            attempted = c["attempted"] - c["discarded"]
            received = ms.store.received + (len(ms.reorder) if ms.reorder else 0)
            out[name] = {
                "kind": ms.om.kind,
                "attempted": attempted,
                "received": received,
                "dropped": c["failed"],
                "in_flight": attempted - received - c["failed"],
                "discarded": c["discarded"],
                "lost_records": ms.lost_records,
                "stored": len(ms.store),
                "evicted": ms.store.evicted,
                "fill_bytes": fill_bytes(ms.reader),
                "capacity_bytes": ms.reader.capacity_bytes if ms.reader else 0,
                "pages": ms.pages,
                "inversions": ms.order.inversions if ms.order else None,
                "max_inversion_ns": ms.order.max_inversion_ns if ms.order else None,
                "batches": ms.batches,
                "memory_bytes": ms.store.nbytes,
                "reloads": len(ms.marks),
            }
        return out

    def _sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_sample < HISTORY_INTERVAL:
            return
        self._last_sample = now
        for name, st in self._compute_stats().items():
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

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write everything received, the counters over time and the program to one Parquet file."""
        from .captures import capture

        started = int((self.started_at or 0) * 1e9)
        maps = {}
        stats = self.stats
        for name, ms in self.maps.items():
            c = ms.store.chunk()
            maps[name] = capture.MapCapture(
                name=name,
                kind=ms.om.kind,
                dtype=ms.schema.dtype,
                records=c.records,
                seq=np.arange(c.seq0, c.seq0 + len(c.records), dtype=np.int64),
                arrival_ns=c.arrival_ns,
                cpu=c.cpu,
                stats=stats.get(name, {}),
                history=[{**h, "t": h["t"] - (self.started_at or 0)} for h in ms.history],
                pages=ms.pages,
                epoch_offset_ns=ms.schema.epoch_offset_ns,
                marks=[{**m, "t": m["t"] - (self.started_at or 0)} for m in ms.marks],
            )
        settings = {
            "pages": self.pages,
            "poll_interval": self.poll_interval,
            "max_rows": self.max_rows,
            "cflags": list(self.cflags),
            "wakeup": self.wakeup,
            "wakeup_events": self.wakeup_events,
            "watermark_bytes": self.watermark_bytes,
            "reorder_ns": self.reorder_ns,
            "name": self.name,
            "backend": self.backend,
            "send_stats": self.send_stats,
            "user_ring_dtypes": {n: capture.dtype_to_json(r.dtype) for n, r in self.user_rings.items()
                                 if r.dtype is not None},
        }
        cap = capture.Capture(maps, self.source, settings, started_ns=started)
        return capture.save(cap, path)

    # --- waiting, attaching, display ---------------------------------------------------

    def wait(
        self,
        duration: float | None = None,
        limit: int | None = None,
        progress: Callable[[int, float], None] | None = None,
    ) -> Probe:
        """Block until `duration` s passed or `limit` events arrived (Ctrl-C returns early)."""
        self.start()
        t0 = time.monotonic()
        try:
            while True:
                received = sum(ms.store.received for ms in self.maps.values())
                elapsed = time.monotonic() - t0
                if progress:
                    progress(received, elapsed)
                if (duration is not None and elapsed >= duration) or (
                    limit is not None and received >= limit
                ):
                    break
                if self.error is not None:
                    raise self.error
                if not self.running:
                    raise KernelscopeError("the drain thread stopped")
                time.sleep(0.05)
        finally:
            self.stop()
        return self

    def attach_uprobe(self, name: str, sym: str = "", fn_name: str = "", **kw: Any) -> Probe:
        """Attach a function of the program to a user-space symbol (`name`: binary or library)."""
        self.load()
        if self.backend == "libbpf":
            from .backends import core

            core.attach_uprobe(self._res.prog, name, sym, fn_name, **kw)
            return self
        with bcc.capture_fd2() as log:
            try:
                self.bpf.attach_uprobe(name=name, sym=sym, fn_name=fn_name, **kw)
                return self
            except Exception as e:
                err = e
        raise bcc.AttachError(
            f"uprobe {name}:{sym} -> {fn_name}: {err} {''.join(log).strip()}"
        ) from None

    def attach_tracepoint(self, tp: str, fn_name: str) -> Probe:
        """Attach a program function to `category:event` (for functions not named by macros)."""
        self.load()
        cat_ev = tp.replace(":", " ").split()
        if len(cat_ev) == 2:
            tracepoints.check_tracepoint(cat_ev[0], cat_ev[1])
        if self.backend == "libbpf":
            prog = self._res.prog
            if len(cat_ev) != 2:
                raise AttachError(f"tracepoint {tp!r}: expected CATEGORY:EVENT")
            try:
                prog.obj.attach_tracepoint(prog.program(fn_name), *cat_ev)
            except OSError as e:
                raise AttachError(f"tracepoint {tp} -> {fn_name}: {e}") from None
            return self
        with bcc.capture_fd2() as log:
            try:
                self.bpf.attach_tracepoint(tp=tp, fn_name=fn_name)
                return self
            except Exception as e:
                err = e
        raise bcc.AttachError(f"tracepoint {tp} -> {fn_name}: {err} {''.join(log).strip()}") from None

    def state(self) -> str:
        return "closed" if self.closed else "running" if self.running else "loaded" if self.loaded else "new"

    def attach_points(self) -> list[str]:
        prog = self._res.prog
        return [] if prog is None else list(prog.attach_points())


