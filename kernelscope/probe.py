"""`Probe`: one BPF program's lifecycle and settings, its output maps drained into DataFrames.

    p = Probe(source).start()   # compile, attach, drain in a background thread
    p.df                        # DataFrame of what arrived (one output map)
    p.stats                     # attempted / received / dropped ... per output map
    p.stop(); p.close()

The backend (BCC or CO-RE/libbpf) is picked once from BACKENDS; the drain loop is drain.py's,
a plain `poll_once()` that tests call directly, run by `start()` in a daemon thread that holds
only a weak reference, so a forgotten probe is still collected and closed (`weakref.finalize`).
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
from typing import Any, cast

import numpy as np

from . import mode, printk, spill, tracepoints
from . import stacks as stacks_
from .backends import bcc, core
from .backends.base import Backend, Program
from .backends.selection import Selection
from .drain import (
    Drain,
    MapState,
    Resources,
    _drain_thread,
    carry_over,
    map_stats,
    open_map,
    user_ring_stats,
)
from .errors import ClosedError, KernelscopeError, SettingError
from .grace import GRACE, sleepable, wait_out
from .maps.table import Maps
from .results import Results
from .schema import Schema
from .settings import check_settings, include_flags, program_name, read_program, shown_setting

_live: weakref.WeakSet[Probe] = weakref.WeakSet()
BACKENDS: dict[str, Backend] = {"bcc": bcc, "libbpf": core}  # the one place a backend is chosen
__all__ = ["BACKENDS", "GRACE", "Probe", "close_all", "live_probes"]
def live_probes() -> list[Probe]:
    return [p for p in list(_live) if not p.closed]


@atexit.register
def close_all() -> None:
    """Close every live probe (interpreter exit, %bpf_stop --all, unload_ipython_extension)."""
    for p in live_probes():
        p.close()


class _LiveOrReplay(type):
    """`Probe(...)` asks kernelscope.mode first: under KERNELSCOPE_MODE=replay it is the replay
    of the capture recorded for `name` (mode.replay_instead), so notebooks run without BPF."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        instead = mode.replay_instead(kwargs.get("name"))
        return instead if instead is not None else super().__call__(*args, **kwargs)


class Probe(Results, metaclass=_LiveOrReplay):
    """A BCC program whose output maps drain into growing DataFrames.

    Under KERNELSCOPE_MODE=replay, `Probe(..., name=N)` is the replay of the capture recorded
    for N instead (kernelscope.mode decides), so notebooks run unchanged without BPF.
    """

    live = True

    def __init__(
        self,
        source: str,
        pages: int | Mapping[str, int] | None = None,
        poll_interval: float = 0.05,
        max_rows: int | None = None,
        cflags: tuple[str, ...] | list[str] = (),
        *,
        wakeup: str = "adaptive",
        wakeup_events: int | None = None,
        watermark_bytes: int | None = None,
        reorder_ns: int | None = None,
        dtypes: Mapping[str, np.dtype] | None = None,
        name: str | None = None,
        usdt: Sequence[tuple[str | int, str, str]] = (),
        backend: str | None = None,
        globals: Mapping[str, Any] | None = None,
        max_bytes: int | None = None,
        programs: Sequence[str] | None = None,
        skip: Sequence[str] = (),
        map_sizes: Mapping[str, int] | None = None,
        on_attach_error: str = "raise",
        include: Sequence[str | os.PathLike[str]] = (),
        printk_kb: int | None = None,
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
        that also have a perf buffer do not pace their rings: they read when any buffer's
        wake-up or the timer comes.) "epoll": read as soon as the
        kernel notifies. "timer": read every poll_interval, for programs that submit with
        BPF_RB_NO_WAKEUP. Perf buffers: with neither `wakeup_events` nor `watermark_bytes`,
        the kernel wakes the reader each time a quarter of a CPU's buffer has been written
        and the drain reads every poll_interval regardless, so a lone event arrives within
        about poll_interval and the producer is not interrupted per event;
        `watermark_bytes=N` wakes every N bytes, `wakeup_events=N` every N events (1: per
        event, BCC's default, which slowed the producer 3-8x here). `reorder_ns`: hold events this
        long to emit them in timestamp order (needs a ts-like u64 field). `usdt`: (binary path or pid, probe,
        program function) triples, attached while compiling as BCC requires.

        `backend`: "bcc" (BCC macros: TRACEPOINT_PROBE, BPF_RINGBUF_OUTPUT...) or "libbpf"
        (CO-RE: SEC("tp/..."), vmlinux.h, BPF_CORE_READ); None picks "libbpf" when the source
        uses SEC(...). `dtypes` overrides a map's record type: a numpy dtype, or a C type name
        such as "struct event". `globals` (CO-RE): values for the program's `const volatile`
        variables, set before load as a libbpf skeleton does ({"targ_tgid": 1234}).
        `max_bytes`: memory budget per output map for stored events (besides the process-wide
        one, kernelscope.set_memory_budget()); beyond it the oldest rows spill to disk.

        Which programs load, as a tool's loader chooses (backends/selection.py): `programs`
        (only these, by C function name; `SEC("?...")` ones load only when named here), `skip`
        (not these: libbpf's set_autoload(false)); `map_sizes` (CO-RE): {map: max_entries} set
        before load; `on_attach_error="warn"`: a program that fails to attach is named in
        `warnings` and the others run. BCC: selection applies to its auto-attached functions
        (TRACEPOINT_PROBE, kprobe__...); its maps are sized in their macros.
        `include`: folders searched for the program's `#include`s (`-I DIR`, either backend).
        `printk_kb`: per-CPU buffer (KiB) for bpf_printk lines (kernelscope.printk; None: tracefs's).
        """
        backend = backend or ("libbpf" if core.is_core(source) else "bcc")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'bcc' or 'libbpf', not {backend!r}")
        self.backend = backend
        self._backend = BACKENDS[backend]
        check_settings(pages=pages, wakeup=wakeup, wakeup_events=wakeup_events,
                       watermark_bytes=watermark_bytes, reorder_ns=reorder_ns, poll_interval=poll_interval)
        self.source = source
        self.name = name
        self.pages = dict(pages) if isinstance(pages, Mapping) else pages
        self.poll_interval = poll_interval
        self.max_rows = max_rows
        spill.check_bytes("max_bytes", max_bytes)
        self.max_bytes = max_bytes
        self.cflags = (*include_flags(include), *cflags)
        self.wakeup = wakeup
        self.wakeup_events = wakeup_events
        self.watermark_bytes = watermark_bytes
        self.reorder_ns = reorder_ns
        self.dtypes: dict[str, Any] = dict(dtypes or {})
        self.usdt = list(usdt)
        self.initial_globals = dict(globals or {})
        self.printk_kb = printk.check_kb(printk_kb)
        self.selection = Selection.of(programs, skip, map_sizes, on_attach_error)
        if self.selection.map_sizes and backend == "bcc":
            raise SettingError("map_sizes= sizes CO-RE maps before load; a BCC map is sized in its macro "
                               "(BPF_HASH(name, key_t, value_t, N), BPF_STACK_TRACE(name, N))")
        self.outputs: dict[str, MapState] = {}
        self.user_rings: dict[str, Any] = {}  # name -> userring.UserRing (CO-RE backend)
        self._attached: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []  # attached by hand
        self._sent_before: dict[str, dict[str, int]] = {}  # user ring counts of replaced programs
        self.error: BaseException | None = None
        self.closed = False
        self.started_at: float | None = None
        self._res = Resources()
        res = self._res
        self._maps = Maps(lambda: res.prog)  # holds no self: the probe stays collectable
        self._finalizer = weakref.finalize(self, self._res.close)
        # the drain sees this probe through a weak proxy: no cycle, so a forgotten probe is
        # freed as soon as the drain thread lets go of it (and its finalizer closes it)
        me = cast(Probe, weakref.proxy(self))
        self._drain = Drain(self.outputs, self._res.stop, me, lambda: me._compute_stats())  # noqa: PLW0108 (a bound method would hold self)
        self._stopped_stats: dict[str, dict[str, Any]] | None = None
        self._stopped_send_stats: dict[str, dict[str, Any]] | None = None
        self.instrumented: Any = self._instrument()
        self.warnings: list[str] = []
        _live.add(self)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **probe_args: Any) -> Probe:
        """A Probe of the program in file `path` (a libbpf-style `.bpf.c` or a BCC text), its
        folder first on the include path (then `include=`), named after the file
        (`opensnoop` for opensnoop.bpf.c) unless `name=` says otherwise."""
        source, folder = read_program(path)
        more = probe_args.get("include", ())
        probe_args["include"] = [folder, *([more] if isinstance(more, (str, os.PathLike)) else more)]
        probe_args.setdefault("name", program_name(path))
        return cls(source, **probe_args)

    # --- lifecycle -------------------------------------------------------------------

    def _instrument(self) -> Any:
        return self._backend.prepare(self.source, self.pages, self.initial_globals, self.cflags)

    @property
    def bpf(self) -> Any:
        """The underlying `bcc.BPF` object (BCC backend; None before load, after close, for CO-RE)."""
        return None if self._res.prog is None else self._res.prog.bpf

    @property
    def program(self) -> Program | None:
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
        self._adopt(self._open_replacement(self.instrumented))
        return self

    def _adopt(self, prog: Program) -> None:
        """Make the loaded `prog` this probe's: readers on its buffers, then its gate opens."""
        self._res.prog = prog
        try:
            self._open_buffers(prog)
        except BaseException:
            self._res.close()
            raise
        for note in prog.notes:
            if note not in self.warnings:
                self.warnings.append(note)
        self._set_gate(1)

    def _dtype(self, prog: Program, name: str) -> np.dtype | None:
        want = self.dtypes.get(name)
        if isinstance(want, str):
            return np.dtype(prog.named_dtype(want, name))
        return np.dtype(want) if want is not None else None

    def _open_buffers(self, prog: Program) -> None:
        """A reader on each output map (rows and counts carry on over a reload), a writer on
        each user ring."""
        from .readers.user_ring import UserRing

        for name, om in self.instrumented.maps.items():
            dtype = self._dtype(prog, name)
            dtype = prog.event_dtype(name) if dtype is None else dtype
            ms = open_map(prog, om, dtype, self.outputs.get(name), self)
            self._res.readers.append(ms.reader)
            self.outputs[name] = ms
        for name in self.instrumented.user_rings:
            dtype = self._dtype(prog, name)
            if dtype is None and name in self.instrumented.event_types:
                dtype = prog.event_dtype(name)
            self.user_rings[name] = UserRing(name, prog.map_fd(name), prog.ring_size(name), dtype)
            self._res.readers.append(self.user_rings[name])
        if (not self.outputs and not self.user_rings and not self._maps.aggregations()
                and not printk.uses_printk(self.source)):
            self.warnings.append(f"the program declares no {prog.output_decl}: nothing to drain")

    def _prog(self) -> Program:
        if self._res.prog is None:
            raise KernelscopeError("probe is not loaded: call start() or load() first")
        return self._res.prog

    def _set_gate(self, value: int) -> None:
        self._prog().set_gate(value)
        printk.gate(self, value)

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
        return user_ring_stats(self.user_rings, self.counters() if self.loaded else {}, self._sent_before)

    def start(self) -> Probe:
        """Load if needed and drain in a background thread. Idempotent."""
        self.load()
        if self.running:
            return self
        self._set_gate(1)
        self._maps.thaw()
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
        """Close the gate, wait out running programs (grace.py) while draining, drain what is left.

        After stop() the counters are frozen, so `attempted == received + dropped` exactly.
        Stopping a stopped probe (again, or by close()) changes nothing: the maps, stacks and
        stats stay as the first stop() found them, and record mode saves once.
        """
        if self.closed or not self.loaded or (self._stopped_stats is not None and not self.running):
            return self
        self._set_gate(0)
        self._res.stop.set()
        wait_out(sleepable(self.source))  # the drain thread reads on meanwhile (GIL released)
        t = self._res.thread
        if t is not None and t is not threading.current_thread():
            t.join()
        self._res.thread = None
        deadline = time.monotonic() + 5.0  # a BUSY record is finished by the time the gate closed
        while self.poll_once(0) or self._drain.pending():
            if time.monotonic() > deadline:
                self.warnings.append("final drain stopped after 5 s with data still in a buffer")
                break
        self._drain.flush_reorder()
        self._drain.sample(force=True)
        stacks_.remember(self)  # stack maps and the symbols of their processes, while they live
        self._stopped_stats = self._compute_stats()
        self._stopped_send_stats = self._compute_send_stats() if self.user_rings else None
        self._maps.freeze()  # what the user reads of the maps from now on: their state at stop()
        self._record()
        return self

    def _record(self) -> None:
        """In record mode, a named probe saves its capture each time it stops."""
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

        Buffer sizes are fixed when maps are created, so a new size means a new program. The
        settings are checked and the new program is compiled, loaded and attached (its gate
        still closed) while the old one runs, so a bad setting or a program the kernel refuses
        raises and leaves the probe as it was. Then the old one is stopped (final drain, exact
        counts), its counters are carried over, the new one takes its place, and the change is
        marked (`MapState.marks`, `stats[...]['reloads']`) for plots. Functions attached by
        hand (attach_uprobe, attach_tracepoint) are attached again.
        `reorder_ns=False` keeps the current window; None turns reordering off.
        """
        self._check_open()
        check_settings(pages=pages, wakeup=wakeup, wakeup_events=wakeup_events,
                       watermark_bytes=watermark_bytes, poll_interval=poll_interval,
                       reorder_ns=None if reorder_ns is False else reorder_ns)
        new: dict[str, Any] = {}
        if pages is not None and pages != self.pages:
            new["pages"] = dict(pages) if isinstance(pages, Mapping) else pages
        if watermark_bytes == 0 and self.watermark_bytes is not None:
            new["watermark_bytes"] = None  # 0 turns the watermark off: wake per wakeup_events
        if watermark_bytes == 0 and wakeup_events is None and self.wakeup_events is None:
            new["wakeup_events"] = 1  # not even the default watermark: wake per event
        for attr, value in (
            ("wakeup", wakeup),
            ("wakeup_events", wakeup_events),
            ("watermark_bytes", watermark_bytes or None),
            ("poll_interval", poll_interval),
        ):
            if value is not None and value != getattr(self, attr):
                new[attr] = value
        if reorder_ns is not False and reorder_ns != self.reorder_ns:
            new["reorder_ns"] = reorder_ns
        if not new:
            return self
        changes = "; ".join(f"{k} {shown_setting(k, getattr(self, k))} -> {shown_setting(k, v)}"
                            for k, v in new.items())
        instrumented = self._backend.prepare(self.source, new.get("pages", self.pages), self.initial_globals,
                                             self.cflags)
        if not self.loaded:  # settings only: the next load() uses them
            self.__dict__.update(new)
            self.instrumented = instrumented
            return self
        prog = self._open_replacement(instrumented)
        was_running = self.running
        old = {k: getattr(self, k) for k in new}
        old_instrumented = self.instrumented
        self.stop()
        carry_over(self.outputs, self.user_rings, self.counters(), self._sent_before)
        self._res.close()
        self.__dict__.update(new)
        self.instrumented = instrumented
        try:
            self._adopt(prog)
        except BaseException as e:  # e.g. buffers the host cannot map: back to the old settings
            self._res.close()
            self.__dict__.update(old)
            self.instrumented = old_instrumented
            self._adopt(self._open_replacement(old_instrumented))
            if was_running:
                self.start()
            if isinstance(e, KernelscopeError):
                e.add_note("the probe runs again with its previous settings")
            raise
        now = time.monotonic()
        for ms in self.outputs.values():
            ms.marks.append({"t": now, "what": changes})
        self._stopped_stats = None
        if was_running:
            self.start()
        return self

    def _open_replacement(self, instrumented: Any) -> Program:
        """A new program for `instrumented`, attached where this one is, its gate closed; on any
        failure nothing of it survives and the running program is untouched."""
        prog = self._backend.open_program(instrumented, self.source, self.cflags, self.usdt,
                                          self.initial_globals, select=self.selection)
        try:
            for kind, args, kw in self._attached:
                getattr(prog, f"attach_{kind}")(*args, **kw)
        except BaseException:
            prog.close()
            raise
        return prog

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
        self._prog()
        return self._drain.poll_once(timeout)

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
            return printk.with_stats(self, self._stopped_stats or {})
        return printk.with_stats(self, self._compute_stats())

    def _compute_stats(self) -> dict[str, dict[str, Any]]:
        return map_stats(self.outputs, self.counters, self._prog().counts_discards)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write everything received, the counters over time and the program to one Parquet file."""
        from .captures import capture

        started = int((self.started_at or 0) * 1e9)
        stats = self.stats
        maps = {name: ms.capture(stats.get(name, {}), self.started_at or 0)
                for name, ms in self.outputs.items()}
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
        derived = stacks_.captured(self)  # stacks with their symbols, named while the processes live
        if printk.uses_printk(self.source):
            derived["printk"] = printk.saved_frame(self)
        cap = capture.Capture(maps, self.source, settings, started_ns=started, tables=self._maps.captured(),
                              frames=derived)
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
                received = sum(ms.store.received for ms in self.outputs.values())
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
        """Attach a function of the program to a user-space symbol (`name`: binary or library),
        the same on both backends: `retprobe=True` on return, `pid=` one process, `addr=` an
        address instead of a symbol. CO-RE: `sym` and `retprobe` default to what the SEC()
        name says (SEC("uretprobe/readline"): attach_uprobe("/bin/bash", fn_name="f"))."""
        return self._attach("uprobe", [fn_name], name, sym, fn_name, **kw)

    def attach_tracepoint(self, tp: str, fn_name: str) -> Probe:
        """Attach a program function to `category:event` (for functions not named by macros)."""
        self.load()
        cat_ev = tp.replace(":", " ").split()
        if len(cat_ev) == 2:
            tracepoints.check_tracepoint(cat_ev[0], cat_ev[1])
        return self._attach("tracepoint", [fn_name], tp, fn_name)

    # --- attach kinds beyond tracepoints (kernelscope.backends.attach) ---------------------

    def _attach(self, kind: str, fn_names: list[str], *args: Any, **kw: Any) -> Probe:
        """Attach with the program's `attach_<kind>`, remember it for reconfigure(), and drop
        the "is not attached" warnings of the programs it attached."""
        self.load()
        getattr(self._prog(), f"attach_{kind}")(*args, **kw)
        self._attached.append((kind, args, kw))
        for name in fn_names:
            self.warnings[:] = [w for w in self.warnings
                                if not (w.startswith(f"{name} (") and " is not attached:" in w)]
        return self

    def attach_perf_event(self, fn_name: str, event: str | tuple[int, int] = "cpu-clock",
                          freq: int | None = None, period: int | None = None,
                          cpus: Sequence[int] | None = None) -> Probe:
        """Run program `fn_name` (SEC("perf_event"), or a BCC function of `struct
        bpf_perf_event_data *`) on a sampling perf event on each CPU (`cpus`: all online):
        `freq` samples a second (99 by default) or one every `period` events. `event`:
        "cpu-clock", "task-clock", ... (software), "cycles", "instructions", ... (hardware,
        where the machine has a PMU), or a (type, config) pair of perf_event_attr."""
        return self._attach("perf_event", [fn_name], fn_name, event, freq=freq, period=period, cpus=cpus)

    def attach_usdt(self, target: str | int, probe: str, fn_name: str) -> Probe:
        """Attach a SEC("usdt") program to USDT probe "provider:name" of a binary (path) or a
        process (pid), as usdt=[...] does at load (CO-RE; BCC needs usdt= at load)."""
        return self._attach("usdt", [fn_name], target, probe, fn_name)

    def attach_xdp(self, fn_name: str, ifname: str, mode: str = "skb") -> Probe:
        """Attach an XDP program to interface `ifname` ("skb": generic, any driver; "native":
        in the driver), with a BPF link: detached when the probe closes."""
        return self._attach("xdp", [fn_name], fn_name, ifname, mode=mode)

    def attach_tc(self, fn_name: str, ifname: str, direction: str = "ingress") -> Probe:
        """Attach a tc (SCHED_CLS) program to `ifname`'s "ingress" or "egress" (a tcx link,
        Linux 6.6+): detached when the probe closes."""
        return self._attach("tc", [fn_name], fn_name, ifname, direction=direction)

    def attach_prog_array(self, map_name: str, programs: Mapping[int, str] | Sequence[str]) -> Probe:
        """Fill tail-call array `map_name` (BPF_MAP_TYPE_PROG_ARRAY) with programs by name:
        {index: name}, or a list (index = position)."""
        names = list(programs.values()) if isinstance(programs, Mapping) else list(programs)
        return self._attach("prog_array", names, map_name, programs)

    def program_fd(self, fn_name: str) -> int:
        """The fd of program `fn_name` (for your own bpf() calls; owned by the probe)."""
        self.load()
        return self._prog().program_fd(fn_name)

    def iter_read(self, fn_name: str, dtype: Any = None) -> Any:
        """One pass of iterator program `fn_name` (SEC("iter/task"), ...): the text it printed
        (BPF_SEQ_PRINTF), or with `dtype` (numpy dtype or "struct row") the records it wrote
        (bpf_seq_write) as a DataFrame."""
        self.load()
        prog = self._prog()
        data = prog.iter_read(fn_name)
        if dtype is None:
            return data.decode("utf-8", "replace")
        dt = np.dtype(prog.named_dtype(dtype, fn_name) if isinstance(dtype, str) else dtype)
        if len(data) % dt.itemsize:
            raise KernelscopeError(f"{fn_name}: wrote {len(data)} bytes, not a whole number of "
                                   f"{dt.itemsize}-byte records of {dtype}")
        records = np.frombuffer(data, dt)
        n = len(records)
        frame = Schema(dt).frame(records, np.arange(n), np.zeros(n, np.int64))
        return frame[[c for c in frame.columns if not c.startswith("ks_")]]

    def state(self) -> str:
        return "closed" if self.closed else "running" if self.running else "loaded" if self.loaded else "new"

    def attach_points(self) -> list[str]:
        prog = self._res.prog
        return [] if prog is None else list(prog.attach_points())


