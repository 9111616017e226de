"""`kernelscope bench`: kernelscope's readers against BCC's Python callbacks and libbpf's C.

One run on this machine, everything side by side. A C producer (built here with gcc)
calls getppid() in a loop; a TRACEPOINT_PROBE on syscalls:sys_enter_getppid, filtered on
the producer's pid, emits a 32-byte event per call (or K per call) into a ring buffer or
a perf buffer. The producer's count is exact, so dropped = made - received for every
consumer, whether or not it can count losses itself.

Consumers: BCC's Python callbacks (open_ring_buffer / open_perf_buffer), libbpf's C
consumers (bench_c/*_consumer.c, given the BCC-created map fd by inheritance), and
kernelscope's Probe. Scenarios: undisturbed (the program loaded by BCC into a ring that
holds every event, nobody reading: the producer's own rate, which the live figures are
judged against), live (producer and consumer in parallel), drain (a buffer filled while
nobody reads, then drained into memory: a DataFrame for Python) and overflow (tiny perf
buffers overrun live: are the losses reported?).

Run as `kernelscope bench` or `python -m kernelscope.bench`; `--quick` for a smoke run.
The figures are ratios within one run; other work on the machine skews them, so each
run's share of CPU lost to other processes is measured and flagged.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import SetupError

KIB = 1024
MIB = 1024 * KIB
PAGE = os.sysconf("SC_PAGE_SIZE")
EVENT_SIZE = 32
EVENT_FIELDS = ("ts", "pid", "cpu", "seq", "pad")
RING_RECORD = 40  # 8-byte ring header + 32-byte event (already 8-byte aligned)
PERF_RECORD = 48  # perf_event_header (8) + u32 raw size + 32 bytes, padded to 8

KINDS = ("ring", "perf")
CONSUMERS = ("bcc", "libbpf", "kernelscope")
NOBODY = "nobody"  # the undisturbed scenario's consumer: none
SCENARIOS = ("undisturbed", "live", "drain", "overflow")
# "kernelscope-wm": the Probe with a perf wakeup watermark instead of a wakeup per event
KS_VARIANTS = ("kernelscope", "kernelscope-wm")
LABELS = {"bcc": "BCC Python", "libbpf": "libbpf C", "kernelscope": "kernelscope",
          "kernelscope-wm": "kernelscope wm", NOBODY: "nobody reads"}

SRC_DIR = Path(__file__).parent / "bench_c"
CFLAGS = ("-O2", "-Wall")
HELPERS = {
    "producer": ("producer.c", ()),
    "ringbuf_consumer": ("ringbuf_consumer.c", ("-lbpf",)),
    "perfbuf_consumer": ("perfbuf_consumer.c", ("-lbpf",)),
    "userring_producer": ("userring_producer.c", ("-lbpf",)),
}
LIBBPF_HEADER = Path("/usr/include/bpf/libbpf.h")
BUSY = 0.15  # share of the CPUs used by other work that makes a figure worth a warning

class BenchSetupError(SetupError):
    """The bench cannot build or run its C helpers (gcc or libbpf-dev missing, build failed)."""


def program(kind: str, target: int, pages: int, per_call: int = 1) -> str:
    """The bench's BPF C source for a ring (`pages` for the whole ring) or perf buffer: the
    notebooks' getppid program with the producer's pid as a literal, so every consumer
    (BCC, libbpf, kernelscope) compiles the same text with no extra flags."""
    from .lab import getppid_program

    source = getppid_program("ring" if kind == "ring" else "perf", pages, per_call)
    return f"#define TARGET {target}\n{source}"


# --- C helpers ----------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kernelscope" / "bench"


def build_helpers(cache: Path | None = None) -> dict[str, Path]:
    """Compile the producer and the libbpf consumers once per source version.

    Binaries are cached as `<name>-<hash of source, shared header and flags>`, so editing a
    .c file rebuilds it and nothing else; editing bench_common.h rebuilds them all.
    """
    gcc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        raise BenchSetupError(
            "gcc is not installed: `kernelscope bench` builds its C producer and libbpf "
            "consumers at run time. Install them with `apt-get install gcc libbpf-dev`."
        )
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}
    common = (SRC_DIR / "bench_common.h").read_bytes()
    for name, (src_name, libs) in HELPERS.items():
        src = SRC_DIR / src_name
        text = src.read_bytes() + common
        key = hashlib.sha256(text + " ".join((*CFLAGS, *libs)).encode()).hexdigest()[:16]
        exe = cache / f"{name}-{key}"
        if not exe.exists():
            if libs and not LIBBPF_HEADER.exists():
                raise BenchSetupError(
                    f"libbpf's headers are missing ({LIBBPF_HEADER}): the bench's reference "
                    "consumers link against libbpf. Install them with `apt-get install libbpf-dev`."
                )
            tmp = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")
            cmd = [gcc, *CFLAGS, "-o", str(tmp), str(src), *libs]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                hint = (
                    " (is libbpf-dev installed? `apt-get install libbpf-dev`)"
                    if "bpf" in r.stderr
                    else ""
                )
                raise BenchSetupError(f"building {src_name} failed{hint}:\n{r.stderr.strip()}")
            os.replace(tmp, exe)
        built[name] = exe
    return built


def _send_go(proc: subprocess.Popen[bytes]) -> None:
    """Release a helper waiting on its stdin (one byte, then EOF)."""
    assert proc.stdin is not None
    proc.stdin.write(b"g")
    proc.stdin.close()
    proc.stdin = None  # so communicate() does not flush the closed pipe


def _cleanup_bcc(b: Any) -> None:
    """b.cleanup(), closing perf buffers first.

    BCC closes a perf buffer when its table is garbage collected; a callback that refers
    to the table (`table.event`) makes a cycle, so that would happen after cleanup()
    closed the map fd, and BCC would print a KeyError from `__del__`.
    """
    for table in list(b.tables.values()):
        for key in list(getattr(table, "_open_key_fds", {})):
            del table[key]
    b.cleanup()


class Producer:
    """The C producer, started paused so a program can be loaded with its pid first."""

    def __init__(self, exe: Path, calls: int, cpu: int | None) -> None:
        self.calls = calls
        self.proc = subprocess.Popen(
            [str(exe), str(calls), "0", str(-1 if cpu is None else cpu)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self) -> None:
        _send_go(self.proc)

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def finish(self, timeout: float = 300.0) -> tuple[int, int, int]:
        """Wait for the producer; returns (calls, t_start_ns, t_end_ns) on CLOCK_MONOTONIC."""
        out, _ = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"producer exited with status {self.proc.returncode}")
        calls, t0, t1 = (int(x) for x in out.split())
        return calls, t0, t1

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# --- configuration and results ------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    live_events: int = 3_000_000  # ring buffers
    # Perf buffers wake the consumer on every event (BCC's, libbpf's and the Probe's
    # default), which slows the producer itself 3-10x: fewer events keep the run short.
    live_perf_events: int = 1_000_000
    live_sizes: tuple[int, ...] = (64 * KIB, 1 * MIB, 4 * MIB)
    # Events per getppid() call in live runs: every live run at the first value; the live
    # ring of `target_size` (every consumer) and the undisturbed producer at each value.
    live_per_calls: tuple[int, ...] = (1, 16)
    target_size: int = 4 * MIB  # the live ring size the targets judge
    # The producer's speed on this project's VMs drifts by up to a third between runs of the
    # same work (another guest's load on the host), for seconds at a time, idle guest or not.
    # So the runs the live target compares (the undisturbed producer, the target-size live
    # ring, every consumer) are made in this many interleaved rounds; the fastest is kept.
    target_rounds: int = 3
    drain_ring_size: int = 64 * MIB
    drain_perf_size: int = 16 * MIB  # per CPU
    drain_per_call: int = 16  # filling speed does not matter for a drain
    drain_fill: float = 1.05  # make this many times what the buffer holds: it ends full
    # Perf buffers report losses (PERF_RECORD_LOST) only with the next sample that fits,
    # so a drain after the producer stopped shows none: a tiny buffer overrun live does.
    overflow_size: int = 8 * KIB  # per CPU
    overflow_events: int = 320_000
    overflow_per_call: int = 16
    overflow_consumers: tuple[str, ...] = (*CONSUMERS, "kernelscope-wm")
    # Also run kernelscope's perf reader with watermark_bytes = this share of the per-CPU
    # buffer (None: skip); BCC and libbpf use their defaults, a wakeup per event.
    perf_watermark: float | None = 0.25
    kinds: tuple[str, ...] = KINDS
    consumers: tuple[str, ...] = CONSUMERS
    producer_cpu: int | None = None
    consumer_cpu: int | None = None
    poll_interval: float = 0.01
    send_samples: int = 1_000_000  # user ring buffer writes (SEND section); 0 skips it
    quick: bool = False


def quick_config(**kw: Any) -> Config:
    """About 12 s on an idle machine: 4 MiB live runs, small drains, kernelscope's overflow."""
    base: dict[str, Any] = {
        "live_events": 400_000,
        "live_perf_events": 100_000,
        "live_sizes": (4 * MIB,),
        "drain_ring_size": 4 * MIB,
        "drain_perf_size": 2 * MIB,
        "overflow_events": 100_000,
        "overflow_consumers": ("kernelscope",),
        "perf_watermark": None,
        "target_rounds": 1,
        "send_samples": 100_000,
        "quick": True,
    }
    base.update(kw)
    return Config(**base)


@dataclass
class Result:
    scenario: str  # one of SCENARIOS
    kind: str  # "ring" or "perf"
    consumer: str  # one of CONSUMERS, a KS_VARIANT, or NOBODY (undisturbed)
    size: int  # ring: bytes of the whole ring; perf: bytes per CPU
    events: int  # planned: the producer makes events // per_call calls
    per_call: int  # events the program emits per getppid() call
    made: int = 0  # events the program tried to emit (exact: calls * per call)
    received: int = 0  # undisturbed: records in the ring (outputs that succeeded)
    # live: producer start to last event received; drain: the drain; undisturbed: the producer's
    seconds: float = 0.0
    producer_seconds: float = 0.0
    lost_reported: int | None = None  # what the consumer itself says it lost, if it can
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return self.made - self.received

    @property
    def dropped_pct(self) -> float:
        return 100.0 * self.dropped / self.made if self.made else 0.0

    @property
    def rate(self) -> float:
        """Events received per second."""
        return self.received / self.seconds if self.seconds > 0 else 0.0

    @property
    def producer_rate(self) -> float:
        return self.made / self.producer_seconds if self.producer_seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            dropped=self.dropped,
            dropped_pct=round(self.dropped_pct, 3),
            events_per_s=round(self.rate, 1),
            producer_events_per_s=round(self.producer_rate, 1),
        )
        return d


@dataclass
class Target:
    name: str
    passed: bool | None  # None: could not be evaluated
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "N/A "}[self.passed]


# --- the consumers ------------------------------------------------------------------------


def _now() -> int:
    return time.monotonic_ns()  # CLOCK_MONOTONIC, the clock the C helpers report


@dataclass
class Env:
    cfg: Config
    helpers: dict[str, Path]
    bcc: ModuleType


def _pages(size: int) -> int:
    return max(1, size // PAGE)


def _capacity(kind: str, size: int) -> int:
    """Events a full buffer holds: the whole ring, or one CPU's perf buffer."""
    return size // (RING_RECORD if kind == "ring" else PERF_RECORD)


def _bcc_counting_callbacks(
    kind: str, decode: Callable[[Any], Any] | None, rows: list[Any]
) -> tuple[Callable[..., Any], Callable[[int], None], list[int]]:
    """BCC callbacks that count (live) or decode into `rows` (drain). counts = [received, lost]."""
    counts = [0, 0]

    def lost_cb(n: int) -> None:
        counts[1] += n

    if decode is None:
        if kind == "ring":

            def ring_noop(ctx: Any, data: Any, size: int) -> int:
                counts[0] += 1
                return 0

            return ring_noop, lost_cb, counts

        def perf_noop(cpu: int, data: Any, size: int) -> None:
            counts[0] += 1

        return perf_noop, lost_cb, counts

    def ring_decode(ctx: Any, data: Any, size: int) -> int:
        e = decode(data)
        rows.append((e.ts, e.pid, e.cpu, e.seq, e.pad))
        return 0

    def perf_decode(cpu: int, data: Any, size: int) -> None:
        e = decode(data)
        rows.append((e.ts, e.pid, e.cpu, e.seq, e.pad))

    return (ring_decode if kind == "ring" else perf_decode), lost_cb, counts


def _open_bcc(b: Any, kind: str, pages: int, cb: Any, lost_cb: Any) -> tuple[Any, Any]:
    """Open the BCC reader on `events`; returns its (poll, consume) methods."""
    if kind == "ring":
        b["events"].open_ring_buffer(cb)
        return b.ring_buffer_poll, b.ring_buffer_consume
    b["events"].open_perf_buffer(cb, page_cnt=pages, lost_cb=lost_cb)
    return b.perf_buffer_poll, b.perf_buffer_consume


@contextlib.contextmanager
def _bcc_program(env: Env, res: Result) -> Iterator[tuple[Producer, Any, int]]:
    """A paused producer and the bench program loaded by BCC for it (pages too); unloaded on exit."""
    pages = _pages(res.size)
    with Producer(env.helpers["producer"], res.events // res.per_call,
                  env.cfg.producer_cpu) as prod:
        b = env.bcc.BPF(text=program(res.kind, prod.pid, pages, res.per_call))
        try:
            yield prod, b, pages
        finally:
            _cleanup_bcc(b)


def _produced(res: Result, calls: int, t0: int, t1: int) -> None:
    """What the producer made, exactly, and how long it took."""
    res.made = calls * res.per_call
    res.producer_seconds = (t1 - t0) / 1e9


def undisturbed_size(events: int) -> int:
    """The smallest ring (a power-of-two number of pages) that holds `events` records."""
    pages = -(-events * RING_RECORD // PAGE)
    return PAGE << (pages - 1).bit_length()


def undisturbed(env: Env, res: Result) -> None:
    """The producer's own rate: the program loaded by BCC into a ring that holds every event,
    nobody reading. Every output succeeds, and the kernel queues one wake-up in all, for the
    first record (bpf_ringbuf_commit() wakes only when the record is the first unread one)."""
    import numpy as np

    from .ringbuf import RingBufferReader

    with _bcc_program(env, res) as (prod, b, _):
        prod.go()
        calls, t0, t1 = prod.finish()
        ring = RingBufferReader(b["events"].map_fd, res.size, np.dtype((np.void, EVENT_SIZE)),
                                wakeup="timer")
        try:
            pending = ring.fill_bytes()
        finally:
            ring.close()
    _produced(res, calls, t0, t1)
    res.received = pending // RING_RECORD
    res.seconds = res.producer_seconds


def live_bcc(env: Env, res: Result) -> None:
    """BCC's documented loop: poll with a per-event Python callback that does nothing."""
    with _bcc_program(env, res) as (prod, b, pages):
        cb, lost_cb, counts = _bcc_counting_callbacks(res.kind, None, [])
        poll, consume = _open_bcc(b, res.kind, pages, cb, lost_cb)
        prod.go()
        t_last = 0
        while not prod.exited():
            before = counts[0]
            poll(10)
            if counts[0] != before:
                t_last = _now()
        before = counts[0]
        consume()
        if counts[0] != before:
            t_last = _now()
        calls, t0, t1 = prod.finish()
    _produced(res, calls, t0, t1)
    res.received = counts[0]
    res.seconds = (t_last - t0) / 1e9 if t_last else 0.0
    res.lost_reported = counts[1] if res.kind == "perf" else None


def drain_bcc(env: Env, res: Result) -> None:
    """Decode every record with `table.event(data)` into a list, then build a DataFrame."""
    import pandas as pd

    with _bcc_program(env, res) as (prod, b, pages):
        rows: list[tuple[int, ...]] = []
        cb, lost_cb, counts = _bcc_counting_callbacks(res.kind, b["events"].event, rows)
        if res.kind == "perf":  # perf_submit needs the per-CPU perf events to exist
            _, consume = _open_bcc(b, res.kind, pages, cb, lost_cb)
        prod.go()
        calls, t0, t1 = prod.finish()
        if res.kind == "ring":
            _, consume = _open_bcc(b, res.kind, pages, cb, lost_cb)
        start = time.perf_counter()
        consume()
        df = pd.DataFrame.from_records(rows, columns=list(EVENT_FIELDS))
        res.seconds = time.perf_counter() - start
    _produced(res, calls, t0, t1)
    res.received = len(df)
    res.lost_reported = counts[1] if res.kind == "perf" else None
    res.extra["into"] = "table.event() per record -> list of tuples -> DataFrame"


def _spawn_c_consumer(
    env: Env, kind: str, fd: int, *, mode: str, capacity: int, pages: int
) -> subprocess.Popen[bytes]:
    exe = env.helpers["ringbuf_consumer" if kind == "ring" else "perfbuf_consumer"]
    cpu = -1 if env.cfg.consumer_cpu is None else env.cfg.consumer_cpu
    args = [str(exe), str(fd), mode, str(capacity)]
    if kind == "perf":
        args.append(str(pages))
    args.append(str(cpu))
    cons = subprocess.Popen(
        args, pass_fds=(fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert cons.stdout is not None
    line = cons.stdout.readline()
    if line.strip() != b"ready":
        cons.kill()
        _, err = cons.communicate()
        raise RuntimeError(f"{exe.name} did not start: {err.decode(errors='replace').strip()}")
    return cons


def _c_report(cons: subprocess.Popen[bytes], timeout: float = 120.0) -> dict[str, int]:
    out, err = cons.communicate(timeout=timeout)
    if cons.returncode != 0:
        raise RuntimeError(
            f"C consumer exited with status {cons.returncode}: "
            f"{err.decode(errors='replace').strip()}"
        )
    report: dict[str, int] = json.loads(out.decode().strip().splitlines()[-1])
    return report


@contextlib.contextmanager
def _c_consumers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Where a run puts the C consumers it starts; any still running at the end are killed."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for cons in started:
            if cons.poll() is None:
                cons.kill()
                cons.communicate()


def live_libbpf(env: Env, res: Result) -> None:
    """libbpf's ring_buffer__poll / perf_buffer__poll in a C process on the BCC map fd."""
    with _bcc_program(env, res) as (prod, b, pages), _c_consumers() as started:
        cons = _spawn_c_consumer(env, res.kind, b["events"].map_fd, mode="live",
                                 capacity=res.events, pages=pages)
        started.append(cons)
        prod.go()
        calls, t0, t1 = prod.finish()
        cons.send_signal(signal.SIGUSR1)
        report = _c_report(cons)
    _produced(res, calls, t0, t1)
    res.received = report["received"]
    res.seconds = (report["t_last"] - t0) / 1e9 if report["t_last"] else 0.0
    res.lost_reported = report["lost"] if res.kind == "perf" else None


def drain_libbpf(env: Env, res: Result) -> None:
    """One timed ring_buffer__consume / perf_buffer__consume copying into a C array."""
    with _bcc_program(env, res) as (prod, b, pages), _c_consumers() as started:
        cap = _capacity(res.kind, res.size) + 1

        def spawn() -> subprocess.Popen[bytes]:
            started.append(_spawn_c_consumer(env, res.kind, b["events"].map_fd, mode="drain",
                                             capacity=cap, pages=pages))
            return started[-1]

        if res.kind == "perf":  # perf_buffer__new creates the per-CPU perf events
            spawn()
        prod.go()
        calls, t0, t1 = prod.finish()
        cons = started[-1] if started else spawn()
        _send_go(cons)
        report = _c_report(cons)
    _produced(res, calls, t0, t1)
    res.received = report["received"]
    res.seconds = (report["t_done"] - report["t_start"]) / 1e9
    res.lost_reported = report["lost"] if res.kind == "perf" else None
    res.extra["into"] = "memcpy of each record into a preallocated C array"


def _probe_class() -> Any:
    try:
        from .probe import Probe
    except ImportError as e:
        raise RuntimeError(f"kernelscope.probe.Probe is not available ({e})") from e
    return Probe


def _ks_accounting(res: Result, stats: dict[str, Any], rows: int) -> None:
    """Record kernelscope's own counts next to the bench's exact ones."""
    res.extra["stats"] = {k: v for k, v in stats.items() if isinstance(v, int | float | str)}
    res.extra["frame_rows"] = rows
    attempted, received = int(stats["attempted"]), int(stats["received"])
    dropped = int(stats["dropped"])
    problems = []
    if attempted != res.made:
        problems.append(f"attempted {attempted} != made {res.made}")
    if received != rows:
        problems.append(f"stats received {received} != frame rows {rows}")
    if attempted != received + dropped:
        problems.append(f"attempted {attempted} != received {received} + dropped {dropped}")
    res.extra["accounting"] = "exact" if not problems else "; ".join(problems)
    # ring buffers have no loss records: kernelscope's count of failed outputs is the report
    res.lost_reported = int(stats["lost_records"]) if res.kind == "perf" else dropped


def _wait_accounted(p: Any, made: int, timeout: float = 10.0) -> None:
    """Wait until every event made is received or counted dropped (p.stats costs ~40 us)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.error is None:
        st = p.stats["events"]
        if st["received"] + st["dropped"] >= made:
            return
        time.sleep(0.005)


def live_kernelscope(env: Env, res: Result) -> None:
    """Probe.start() drains in its own thread while the producer runs."""
    probe_cls = _probe_class()
    pages = _pages(res.size)
    kw: dict[str, Any] = {}
    if res.consumer == "kernelscope-wm" and env.cfg.perf_watermark is not None:
        kw["watermark_bytes"] = max(8, int(res.size * env.cfg.perf_watermark))
        res.extra["watermark_bytes"] = kw["watermark_bytes"]
    with Producer(env.helpers["producer"], res.events // res.per_call,
                  env.cfg.producer_cpu) as prod:
        p = probe_cls(program(res.kind, prod.pid, pages, res.per_call), pages=pages,
                      poll_interval=env.cfg.poll_interval, **kw)
        try:
            p.start()
            prod.go()
            calls, t0, t1 = prod.finish()
            made = calls * res.per_call
            _wait_accounted(p, made)
            p.stop()
            if p.error is not None:
                raise p.error
            stats = dict(p.stats["events"])
            df = p.frame("events")
        finally:
            p.close()
    _produced(res, calls, t0, t1)
    res.received = len(df)
    # ks_arrival_ns: CLOCK_MONOTONIC when the read that brought each record began
    t_last = int(df["ks_arrival_ns"].max()) if len(df) else 0
    res.seconds = (t_last - t0) / 1e9 if t_last else 0.0
    _ks_accounting(res, stats, len(df))


def drain_kernelscope(env: Env, res: Result) -> None:
    """Probe.load() while the producer fills the buffer; timed: start(), stop(), frame().

    stop() ends with a final drain, so the frame then holds every event that entered the
    buffer; the timed window includes stop()'s grace period for in-flight programs.
    """
    probe_cls = _probe_class()
    pages = _pages(res.size)
    with Producer(env.helpers["producer"], res.events // res.per_call,
                  env.cfg.producer_cpu) as prod:
        p = probe_cls(program(res.kind, prod.pid, pages, res.per_call), pages=pages,
                      poll_interval=env.cfg.poll_interval)
        try:
            p.load()
            prod.go()
            calls, t0, t1 = prod.finish()
            start = time.perf_counter()
            p.start()
            p.stop()
            df = p.frame("events")
            res.seconds = time.perf_counter() - start
            if p.error is not None:
                raise p.error
            stats = dict(p.stats["events"])
        finally:
            p.close()
    _produced(res, calls, t0, t1)
    res.received = len(df)
    res.extra["into"] = "Probe.start(); Probe.stop(); Probe.frame() -> DataFrame"
    _ks_accounting(res, stats, len(df))


RUNNERS: dict[tuple[str, str], Callable[[Env, Result], None]] = {
    ("undisturbed", NOBODY): undisturbed,
    ("live", "bcc"): live_bcc,
    ("live", "libbpf"): live_libbpf,
    ("live", "kernelscope"): live_kernelscope,
    ("drain", "bcc"): drain_bcc,
    ("drain", "libbpf"): drain_libbpf,
    ("drain", "kernelscope"): drain_kernelscope,
    ("overflow", "bcc"): live_bcc,
    ("overflow", "libbpf"): live_libbpf,
    ("overflow", "kernelscope"): live_kernelscope,
    ("live", "kernelscope-wm"): live_kernelscope,
    ("overflow", "kernelscope-wm"): live_kernelscope,
}


# --- planning, running, judging -----------------------------------------------------------


def _consumers(cfg: Config, kind: str) -> tuple[str, ...]:
    wm = kind == "perf" and cfg.perf_watermark is not None and "kernelscope" in cfg.consumers
    return cfg.consumers + (("kernelscope-wm",) if wm else ())


def plan(cfg: Config) -> list[Result]:
    """Every measurement, in the order made. The ones the live target compares come first,
    in `target_rounds` interleaved rounds (the same run planned once per round)."""
    runs: list[Result] = []
    if "ring" in cfg.kinds:
        target = cfg.target_size in cfg.live_sizes
        for _ in range(cfg.target_rounds):
            for per_call in cfg.live_per_calls:
                runs.append(Result("undisturbed", "ring", NOBODY, undisturbed_size(cfg.live_events),
                                   cfg.live_events, per_call))
                # kernelscope right after the undisturbed producer it is compared with
                consumers = sorted(_consumers(cfg, "ring"), key=lambda c: c != "kernelscope")
                runs += [Result("live", "ring", consumer, cfg.target_size, cfg.live_events, per_call)
                         for consumer in consumers if target]
    runs += [
        Result("live", kind, consumer, size,
               cfg.live_events if kind == "ring" else cfg.live_perf_events, per_call)
        for size in cfg.live_sizes
        for kind in cfg.kinds
        if (kind, size) != ("ring", cfg.target_size)
        for per_call in cfg.live_per_calls[:1]
        for consumer in _consumers(cfg, kind)
    ]
    for kind in cfg.kinds:
        size = cfg.drain_ring_size if kind == "ring" else cfg.drain_perf_size
        calls = -(-int(_capacity(kind, size) * cfg.drain_fill) // cfg.drain_per_call)
        runs += [
            Result("drain", kind, consumer, size, calls * cfg.drain_per_call, cfg.drain_per_call)
            for consumer in cfg.consumers
        ]
    if "perf" in cfg.kinds:
        runs += [
            Result("overflow", "perf", consumer, cfg.overflow_size, cfg.overflow_events,
                   cfg.overflow_per_call)
            for consumer in _consumers(cfg, "perf")
            if consumer in cfg.overflow_consumers
        ]
    return runs


def fmt_size(n: int) -> str:
    if n >= MIB and n % MIB == 0:
        return f"{n // MIB} MiB"
    return f"{n // KIB} KiB"


def _describe(res: Result) -> str:
    per_cpu = "/CPU" if res.kind == "perf" else ""
    per_call = f", {res.per_call} per call" if res.scenario in ("undisturbed", "live") else ""
    return f"{res.scenario} {res.kind} {fmt_size(res.size)}{per_cpu} {LABELS[res.consumer]}{per_call}"


def _progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def irq_work_interrupts(cpu: int | None) -> int | None:
    """IRQ-work interrupts so far on `cpu` (all CPUs if None), from /proc/interrupts (x86: IWI).

    A ring buffer's wake-up is an irq_work the committing program queues on its own CPU
    (bpf_ringbuf_commit()), so this counts what waking the consumer costs the producer,
    plus a few interrupts of other kernel users.
    """
    try:
        with open("/proc/interrupts") as f:
            for line in f:
                name, _, rest = line.strip().partition(":")
                if name == "IWI":
                    counts = [int(x) for x in rest.split() if x.isdigit()]
                    return sum(counts) if cpu is None else counts[cpu]
    except (OSError, ValueError, IndexError):
        pass
    return None


def steal_seconds(cpu: int | None = None) -> float:
    """CPU time the hypervisor has taken so far from `cpu` (all CPUs if None): /proc/stat steal.

    A vCPU descheduled by the host stops its reader however the reader waits: a ring that
    fills faster than the host gives the vCPU back drops, and only this says why.
    """
    name = "cpu" if cpu is None else f"cpu{cpu}"
    try:
        with open("/proc/stat") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] == name:
                    return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _attempt(env: Env, planned: Result) -> Result:
    res = replace(planned, extra={})
    started = time.perf_counter()
    meter = OtherWork()
    gc.collect()
    irq_work = irq_work_interrupts(env.cfg.producer_cpu)
    steal = steal_seconds(env.cfg.consumer_cpu)
    try:
        RUNNERS[res.scenario, res.consumer](env, res)
    except Exception as e:  # one failed run must not lose the others' figures
        res.error = f"{type(e).__name__}: {e}"
    after = irq_work_interrupts(env.cfg.producer_cpu)
    if irq_work is not None and after is not None:
        res.extra["irq_work"] = after - irq_work
    res.extra["steal_ms"] = round((steal_seconds(env.cfg.consumer_cpu) - steal) * 1e3, 1)
    res.extra["wall_seconds"] = round(time.perf_counter() - started, 2)
    res.extra["other_cpu"] = round(meter.share(), 3)
    return res


def _key(r: Result) -> tuple[str, str, str, int, int]:
    return (r.scenario, r.kind, r.consumer, r.size, r.per_call)


def run_all(env: Env, runs: Sequence[Result], repeat: int = 1) -> list[Result]:
    """Run every planned measurement; drains `repeat` times; keep the fastest attempt of each.

    For a drain the best of several is the usual defence against other work on the
    machine, which only ever makes it slower. The same measurement planned several times
    (the target rounds) is one measurement too, fastest kept. Other live runs are not
    repeated: noise there moves drops both ways (a starved consumer drops more, a starved
    producer less). Every attempt's figures stay in `extra["attempts"]`.
    """
    tries: dict[tuple[str, str, str, int, int], list[Result]] = {}
    rounds = {_key(r): sum(_key(x) == _key(r) for x in runs) for r in runs}
    for i, planned in enumerate(runs, 1):
        n = repeat if planned.scenario == "drain" else 1
        for k in range(n):
            res = _attempt(env, planned)
            attempts = tries.setdefault(_key(res), [])
            attempts.append(res)
            if res.ok:
                lost = "" if res.lost_reported is None else f", {res.lost_reported:,} reported lost"
                what = (f"{res.received:,}/{res.made:,} received ({res.dropped_pct:.1f} % "
                        f"dropped{lost}), {res.rate / 1e6:.2f} M ev/s")
            else:
                what = f"FAILED: {res.error}"
            again = (f" (try {k + 1}/{n})" if n > 1 else
                     f" (round {len(attempts)}/{rounds[_key(res)]})" if rounds[_key(res)] > 1 else "")
            other = res.extra["other_cpu"]
            noisy = f", other work took {other:.0%} of the CPUs" if other > BUSY else ""
            noisy += (f", the host stole {res.extra['steal_ms']:g} ms of the consumers' CPU"
                      if res.extra["steal_ms"] else "")
            _progress(f"{i}/{len(runs)}{again} {_describe(res)}: {what} "
                      f"[{res.extra['wall_seconds']:.1f} s{noisy}]")
    done = []
    for attempts in tries.values():
        best = max(attempts, key=lambda r: (r.ok, r.rate))
        if len(attempts) > 1:
            best.extra["attempts"] = [
                {"events_per_s": round(r.rate, 1), "received": r.received, "made": r.made,
                 "steal_ms": r.extra["steal_ms"], "error": r.error} for r in attempts
            ]
        done.append(best)
    return done


def _find(runs: Sequence[Result], scenario: str, kind: str, consumer: str,
          size: int | None = None, *, per_call: int | None = None) -> Result | None:
    for r in runs:
        if ((r.scenario, r.kind, r.consumer) == (scenario, kind, consumer) and r.ok
                and (size is None or r.size == size)
                and (per_call is None or r.per_call == per_call)):
            return r
    return None


def undisturbed_rates(runs: Sequence[Result]) -> dict[int, float]:
    """The producer's undisturbed rate (events/s) by events per call, as measured in `runs`."""
    return {r.per_call: r.producer_rate for r in runs if r.scenario == "undisturbed" and r.ok}


def _vs_undisturbed(r: Result, rates: dict[int, float]) -> float | None:
    """A live ring run's received rate over the undisturbed producer's at its events per call."""
    base = rates.get(r.per_call)
    if r.kind != "ring" or r.scenario != "live" or not base or not r.ok:
        return None
    return r.rate / base


def _ratio(a: Result | None, b: Result | None) -> float | None:
    if a is None or b is None or b.rate <= 0:
        return None
    return a.rate / b.rate


def _ratio_key(r: Result) -> str:
    per_call = f"{r.per_call}pc/" if r.scenario == "live" and r.per_call != 1 else ""
    return f"{r.scenario}/{r.kind}/{fmt_size(r.size).replace(' ', '')}/{per_call}"


def ratios(runs: Sequence[Result]) -> dict[str, float | None]:
    """kernelscope's rate over each other consumer's, per scenario, buffer, size and events
    per call; and, for live rings, over the producer's undisturbed rate."""
    out: dict[str, float | None] = {}
    rates = undisturbed_rates(runs)
    for ks in runs:
        if ks.consumer not in KS_VARIANTS:
            continue
        for r in runs:
            if r.consumer in (*KS_VARIANTS, NOBODY) or (r.scenario, r.kind, r.size, r.per_call) != (
                ks.scenario, ks.kind, ks.size, ks.per_call
            ):
                continue
            out[f"{_ratio_key(r)}{ks.consumer}_vs_{r.consumer}"] = _ratio(
                ks if ks.ok else None, r if r.ok else None)
        if ks.scenario == "live" and ks.kind == "ring":
            out[f"{_ratio_key(ks)}{ks.consumer}_vs_undisturbed"] = _vs_undisturbed(ks, rates)
    return out


def _ratio_target(name: str, ks: Result | None, other: Result | None, at_least: float) -> Target:
    x = _ratio(ks, other)
    if ks is None or other is None or x is None:
        return Target(name, None, "missing runs")
    return Target(name, x >= at_least,
                  f"{x:.2f}x ({_m(ks.rate)} vs {_m(other.rate)} M rec/s)")


LIVE_SHARE = 0.9  # of the producer's undisturbed rate that kernelscope must receive live


def _drops_detail(attempts: list[dict[str, Any]], lossy: list[dict[str, Any]], reads: int | None) -> str:
    dropped = max((a["made"] - a["received"] for a in lossy), default=0)
    out = (f"{dropped:,} dropped" if len(attempts) == 1 else
           f"{len(lossy)} of {len(attempts)} rounds dropped" + (f" (at most {dropped:,})" if lossy else ""))
    if lossy:
        stolen = ", ".join(f"{a.get('steal_ms', 0):g}" for a in lossy)
        out += f"; the host stole {stolen} ms of the consumers' CPU in the rounds that dropped"
    return out + ("" if reads is None else f", {reads:,} reads")


def _live_target(runs: Sequence[Result], live_size: int) -> Target:
    """kernelscope live at every events-per-call value the undisturbed producer was measured at."""
    rates = undisturbed_rates(runs)
    per_calls = sorted(rates) or [1, 16]
    name = (f"live {fmt_size(live_size)} ring: kernelscope receives >= {LIVE_SHARE}x the producer's "
            f"undisturbed rate with 0 drops, at {' and at '.join(map(str, per_calls))} events per call")
    parts, verdicts = [], []
    for per_call in per_calls:
        ks = _find(runs, "live", "ring", "kernelscope", live_size, per_call=per_call)
        share = None if ks is None else _vs_undisturbed(ks, rates)
        if ks is None or share is None:
            return Target(name, None, f"missing runs at {per_call} per call")
        # every round counts for drops: the fastest one is only the one compared
        attempts = ks.extra.get("attempts") or [
            {"made": ks.made, "received": ks.received, "steal_ms": ks.extra.get("steal_ms", 0)}]
        lossy = [a for a in attempts if a["made"] > a["received"]]
        verdicts.append(share >= LIVE_SHARE and not lossy)
        parts.append(f"{per_call}/call: {_m(ks.rate)} of {_m(rates[per_call])} M ev/s ({share:.2f}x), "
                     + _drops_detail(attempts, lossy, ks.extra.get("stats", {}).get("batches")))
    return Target(name, all(verdicts), "; ".join(parts))


def targets(runs: Sequence[Result], live_size: int = 4 * MIB) -> list[Target]:
    """The 'done when' figures of the event-engine issue, as ratios within this run.

    Each is about kernelscope alone: its speed against the other consumers draining the same
    buffer, and live, against the producer's own undisturbed rate. Who else drops live
    depends on the host (how much a wake-up costs there), so the other consumers' live
    figures stay in the tables as measured, not in the targets.
    """
    ks = _find(runs, "drain", "ring", "kernelscope")
    out = [
        _ratio_target("drain full ring into a DataFrame: kernelscope >= 30x BCC Python callback",
                      ks, _find(runs, "drain", "ring", "bcc"), 30),
        _ratio_target("drain full ring: kernelscope >= 0.5x libbpf C consumer",
                      ks, _find(runs, "drain", "ring", "libbpf"), 0.5),
    ]

    out.append(_live_target(runs, live_size))

    name = "perf reader >= 10x BCC perf callback path, lost records reported"
    ratio = _ratio_target(name, _find(runs, "drain", "perf", "kernelscope"),
                          _find(runs, "drain", "perf", "bcc"), 10)
    bcc_live = _find(runs, "live", "perf", "bcc", live_size)
    live = [(_ratio(_find(runs, "live", "perf", v, live_size), bcc_live), LABELS[v])
            for v in KS_VARIANTS]
    over = _find(runs, "overflow", "perf", "kernelscope")
    if ratio.passed is None or over is None:
        out.append(Target(name, None, "missing runs"))
    else:
        lost = over.lost_reported or 0
        out.append(Target(
            name, bool(ratio.passed) and lost > 0,
            f"drain {ratio.detail}"
            + "".join(f"; live {fmt_size(live_size)}/CPU {label} {x:.1f}x"
                      for x, label in live if x is not None)
            + f"; overrun of {fmt_size(over.size)}/CPU: {lost:,} lost records reported, "
            f"{over.dropped:,} events not received",
        ))
    return out


# --- output -------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(
            c.rjust(w) if i >= 3 else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ))
    return "\n".join(out)


def _m(x: float) -> str:
    return f"{x / 1e6:.3f}" if x < 1e6 else f"{x / 1e6:.2f}"


def _lost(r: Result) -> str:
    return "-" if r.lost_reported is None else f"{r.lost_reported:,}"


def _size_label(r: Result) -> str:
    return fmt_size(r.size) + ("/CPU" if r.kind == "perf" else "")


def _label(r: Result) -> str:
    return LABELS[r.consumer] + (" *" if r.extra.get("other_cpu", 0.0) > BUSY else "")


def _run_table(runs: Sequence[Result], scenario: str, rates: dict[int, float]) -> str:
    """One section's table. Live tables add the events per call and, for rings, the received
    rate over the producer's undisturbed rate at the same events per call."""
    drain, live, per_call = scenario == "drain", scenario == "live", scenario != "drain"
    header = ["buffer", "size", "consumer"]
    header += ["per call"] if per_call else []
    header += ["received", "dropped %"]
    header += ["seconds", "M rec/s"] if drain else ["M ev/s", "producer M ev/s"]
    header += ["vs undisturbed"] if live else []
    header += ["IRQ work"] if per_call else []
    header += ["lost reported"]
    rows = []
    for r in runs:
        head = [r.kind, _size_label(r), _label(r)] + ([str(r.per_call)] if per_call else [])
        if not r.ok:
            rows.append([*head, "error"] + [""] * (len(header) - len(head) - 1))
            continue
        figures = [f"{r.seconds:.3f}", _m(r.rate)] if drain else [_m(r.rate), _m(r.producer_rate)]
        if live:
            share = _vs_undisturbed(r, rates)
            figures.append("-" if share is None else f"{share:.2f}x")
        if per_call:
            irq_work = r.extra.get("irq_work")
            figures.append("-" if irq_work is None else f"{irq_work:,}")
        rows.append([*head, f"{r.received:,}", f"{r.dropped_pct:.1f}", *figures, _lost(r)])
    return _table(header, rows)


def _undisturbed_line(rates: dict[int, float]) -> str:
    if not rates:
        return "  producer undisturbed: not measured (no undisturbed runs)"
    return ("  producer undisturbed (ring program, nobody reading): "
            + ", ".join(f"{_m(v)} M ev/s at {k} per call" for k, v in sorted(rates.items())))


def report(runs: Sequence[Result], cfg: Config, machine: dict[str, Any]) -> str:
    """The human-readable summary: tables, ratios, errors, targets."""
    order = (NOBODY, *CONSUMERS, *KS_VARIANTS)

    def reading_order(r: Result) -> tuple[int, int, int, int]:
        return (KINDS.index(r.kind), r.size, r.per_call, order.index(r.consumer))

    by = {s: sorted((r for r in runs if r.scenario == s), key=reading_order) for s in SCENARIOS}
    rates = undisturbed_rates(runs)
    und = _undisturbed_line(rates)
    out = [
        f"kernelscope bench{' --quick' if cfg.quick else ''}: kernel {machine['kernel']}, "
        f"{machine['cpus']} CPUs, BCC {machine['bcc']}, libbpf {machine['libbpf']}; "
        f"producer on CPU {cfg.producer_cpu}, consumers on CPU {cfg.consumer_cpu}",
        "received/dropped are exact: dropped = events the program emitted - events received"
        + (f"; each drain figure is the fastest of {machine['repeat']} runs"
           if machine.get("repeat", 1) > 1 else "")
        + (f"; undisturbed and live {fmt_size(cfg.target_size)} ring figures: the fastest of "
           f"{cfg.target_rounds} interleaved rounds" if cfg.target_rounds > 1 else ""),
    ]
    busy = (machine.get("busy_before", 0.0), machine.get("busy_during", 0.0))
    noisy = sum(1 for r in runs if r.extra.get("other_cpu", 0.0) > BUSY)
    if max(busy) > BUSY or noisy:
        out.append(f"WARNING: other work used {busy[0]:.0%} of the CPUs just before the run and "
                   f"{busy[1]:.0%} during it; {noisy} run(s) marked * lost over {BUSY:.0%} of the "
                   "CPUs to it: those figures are noisy")
    else:
        out.append(f"other work used {busy[0]:.0%} of the CPUs just before the run and "
                   f"{busy[1]:.0%} during it")
    if by["undisturbed"]:
        out += ["", "UNDISTURBED: the program loaded by BCC into a ring that holds every event, "
                "nobody reading: every output succeeds and the kernel queues a single wake-up, so "
                "the producer runs at its own speed; M ev/s = events / producer seconds",
                _run_table(by["undisturbed"], "undisturbed", rates)]
    if by["live"]:
        per_calls = " / ".join(map(str, cfg.live_per_calls))
        out += ["", f"LIVE: producer and consumer in parallel, {cfg.live_events:,} (ring) / "
                f"{cfg.live_perf_events:,} (perf) events of {EVENT_SIZE} bytes, {per_calls} "
                f"per getppid() call ({fmt_size(cfg.target_size)} ring at each); M ev/s = received / "
                "(producer start to last event received); vs undisturbed = that / the undisturbed "
                "producer's rate at the same events per call; IRQ work = IRQ-work interrupts on the "
                "producer's CPU during the run (a ring buffer wake-up is one)"
                + ("" if cfg.perf_watermark is None else
                   f"; kernelscope wm: perf wakeup at {cfg.perf_watermark:.0%} of the buffer, "
                   "the others wake per event"),
                und, _run_table(by["live"], "live", rates)]
    if by["drain"]:
        out += ["", "DRAIN: a buffer filled while nobody reads, then drained into memory "
                f"(Python: a DataFrame; libbpf: a C array), {cfg.drain_per_call} events per call; "
                "M rec/s = records / drain time",
                und, _run_table(by["drain"], "drain", rates)]
    if by["overflow"]:
        out += ["", f"OVERFLOW: perf buffers of {fmt_size(cfg.overflow_size)}/CPU overrun live "
                f"({cfg.overflow_per_call} events per call): are the losses reported?",
                und, _run_table(by["overflow"], "overflow", rates)]
    rat = {k: v for k, v in ratios(runs).items() if v is not None}
    if rat:
        out += ["", "RATIOS (kernelscope rate / other consumer's rate, or / the undisturbed "
                "producer's, same run)", und]
        out += [f"  {k:<50} {v:8.2f}x" for k, v in rat.items()]
    errors = [r for r in runs if not r.ok]
    if errors:
        out += ["", "ERRORS"]
        out += [f"  {_describe(r)}: {r.error}" for r in errors]
    out += ["", "TARGETS" + (" (--quick: a smoke run; its small drains are dominated by fixed "
                             "start/stop costs, judge the targets on a full run)"
                             if cfg.quick else ""), und]
    out += [f"  {t.verdict}  {t.name}: {t.detail}" for t in targets(runs, cfg.target_size)]
    return "\n".join(out)


class OtherWork:
    """Share of the CPUs that other processes used since creation.

    /proc/stat's busy time of all CPUs, minus the CPU time of this process and of its
    reaped children (the producer, the C consumers; BPF programs run in the producer's
    syscalls, so they count as ours). Kernel threads working for us count as other work,
    which is small next to what a test suite running alongside takes.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
            busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        except (OSError, ValueError, IndexError):
            busy = 0.0
        t = os.times()
        return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system

    def share(self) -> float:
        t0, busy0, ours0 = self._start
        t1, busy1, ours1 = self._sample()
        capacity = (t1 - t0) * (os.cpu_count() or 1)
        if capacity <= 0:
            return 0.0
        return max(0.0, min(1.0, ((busy1 - busy0) - (ours1 - ours0)) / capacity))


def cpu_busy(seconds: float = 0.3) -> float:
    """Share of the CPUs other work uses over `seconds` while the bench sleeps."""
    meter = OtherWork()
    time.sleep(seconds)
    return meter.share()


def machine_info(bcc: ModuleType | None) -> dict[str, Any]:
    libbpf = "?"
    with contextlib.suppress(OSError):
        text = (LIBBPF_HEADER.parent / "libbpf_version.h").read_text()
        major = re.search(r"LIBBPF_MAJOR_VERSION\s+(\d+)", text)
        minor = re.search(r"LIBBPF_MINOR_VERSION\s+(\d+)", text)
        if major and minor:
            libbpf = f"{major.group(1)}.{minor.group(1)}"
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "bcc": getattr(bcc, "__version__", "?"),
        "libbpf": libbpf,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "busy_before": round(cpu_busy(), 2),
    }


def write_json(path: Path, runs: Sequence[Result], cfg: Config, machine: dict[str, Any],
               sends: Sequence[Any] = ()) -> None:
    from .bench_send import ratio as send_ratio

    doc = {
        "version": 1,
        "machine": machine,
        "config": asdict(cfg),
        "event_size": EVENT_SIZE,
        "undisturbed": [r.as_json() for r in runs if r.scenario == "undisturbed"],
        "undisturbed_events_per_s": {str(k): round(v, 1) for k, v in undisturbed_rates(runs).items()},
        "live": [r.as_json() for r in runs if r.scenario == "live"],
        "drain": [r.as_json() for r in runs if r.scenario == "drain"],
        "overflow": [r.as_json() for r in runs if r.scenario == "overflow"],
        "send": [s.as_json() for s in sends],
        "ratios": {**ratios(runs),
                   **({"send/userring/kernelscope_vs_libbpf": send_ratio(list(sends))} if sends else {})},
        "targets": [{"name": t.name, "passed": t.passed, "detail": t.detail}
                    for t in targets(runs, cfg.target_size)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


# --- command line -------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'64K', '4M', '4MiB', '65536' -> bytes; must be a power-of-two number of pages."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 64K, 4M)")
    n = int(m.group(1)) * {"": 1, "k": KIB, "m": MIB, "g": 1024 * MIB}[m.group(2).lower()]
    pages = n // PAGE
    if n % PAGE or pages <= 0 or pages & (pages - 1):
        raise ValueError(f"{text}: must be a power-of-two number of {PAGE}-byte pages")
    return n


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sizes_arg(text: str) -> tuple[int, ...]:
    return tuple(_size_arg(x) for x in text.split(",") if x.strip())


def _ints_arg(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text}: positive integers, comma-separated (e.g. 1,16)")
    return values


def _csv(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kernelscope bench",
        description="Measure kernelscope's ring and perf readers against BCC's Python "
        "callbacks and libbpf's C consumers, in one run on this machine.",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run, well under 30 s")
    ap.add_argument("--json", type=Path, default=None,
                    help=f"where to write the figures (default {cache_dir() / 'bench.json'})")
    ap.add_argument("--events", type=int, help="events per live ring run (3,000,000)")
    ap.add_argument("--perf-events", type=int, help="events per live perf run (1,000,000)")
    ap.add_argument("--sizes", type=_sizes_arg,
                    help="live ring sizes, ring total / perf per CPU (default 64K,1M,4M)")
    ap.add_argument("--drain-ring", type=_size_arg, help="ring size for the drain (64M)")
    ap.add_argument("--drain-perf", type=_size_arg, help="perf size per CPU for the drain (16M)")
    ap.add_argument("--per-call", type=_ints_arg,
                    help="events per getppid() in live runs: every live run at the first, the 4 MiB "
                    "ring and the undisturbed producer at each (default 1,16)")
    ap.add_argument("--buffers", type=_csv(KINDS), help="ring,perf")
    ap.add_argument("--consumers", type=_csv(CONSUMERS), help="bcc,libbpf,kernelscope")
    ap.add_argument("--send", type=int, metavar="N",
                    help="samples for the user ring buffer SEND comparison (1,000,000; 0 skips it)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each drain N times and keep the fastest (on a busy machine)")
    ap.add_argument("--no-pin", action="store_true",
                    help="do not pin the producer and the consumers to separate CPUs")
    return ap


def config_from_args(args: argparse.Namespace) -> Config:
    kw: dict[str, Any] = {}
    for name, attr in (("live_events", "events"), ("live_perf_events", "perf_events"),
                       ("live_sizes", "sizes"),
                       ("drain_ring_size", "drain_ring"), ("drain_perf_size", "drain_perf"),
                       ("live_per_calls", "per_call"), ("kinds", "buffers"), ("send_samples", "send"),
                       ("consumers", "consumers")):
        if getattr(args, attr) is not None:
            kw[name] = getattr(args, attr)
    ncpu = os.cpu_count() or 1
    if not args.no_pin and ncpu > 1:
        kw["producer_cpu"] = ncpu - 1
        kw["consumer_cpu"] = 0
    return quick_config(**kw) if args.quick else Config(**kw)


@contextlib.contextmanager
def _pinned(cpu: int | None) -> Iterator[None]:
    """Pin this process (and the threads it starts) to `cpu` for the measurements."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    cfg = config_from_args(args)
    from .host import import_bcc, prepare

    try:
        for note in prepare():
            _progress(note)
        bcc = import_bcc()
        helpers = build_helpers()
    except SetupError as e:
        print(f"kernelscope bench: {e}", file=sys.stderr)
        return 2
    env = Env(cfg, helpers, bcc)
    runs = plan(cfg)
    machine = machine_info(bcc)
    _progress(f"{len(runs)} runs; C helpers in {cache_dir()}")
    if machine["busy_before"] > BUSY:
        _progress(f"the CPUs are {machine['busy_before']:.0%} busy with other work: "
                  "the figures will be noisy")
    started = time.perf_counter()
    meter = OtherWork()
    with _pinned(cfg.consumer_cpu):
        runs = run_all(env, runs, args.repeat)
        sends = []
        if cfg.send_samples:
            from . import bench_send

            _progress(f"send: {cfg.send_samples:,} samples into a user ring, libbpf C then kernelscope")
            sends = bench_send.run(helpers["userring_producer"], cfg.send_samples)
    machine["seconds"] = round(time.perf_counter() - started, 1)
    machine["busy_during"] = round(meter.share(), 2)
    machine["repeat"] = args.repeat
    print(report(runs, cfg, machine))
    if sends:
        print("\n".join(bench_send.report(sends)))
    path = args.json or cache_dir() / "bench.json"
    write_json(path, runs, cfg, machine, sends)
    print(f"\nfigures written to {path} ({machine['seconds']} s)")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
