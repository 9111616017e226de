"""The bench's runners: one function per (scenario, consumer), each filling one Result."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from ..backends.bcc import release_bpf
from .config import EVENT_FIELDS, EVENT_SIZE, NOBODY, PAGE, PERF_RECORD, RING_RECORD, Config, Result, program
from .producer import Producers, _send_go


def _cleanup_bcc(b: Any) -> None:
    """release_bpf(b), closing perf buffers first.

    BCC closes a perf buffer when its table is garbage collected; a callback that refers
    to the table (`table.event`) makes a cycle, so that would happen after cleanup()
    closed the map fd, and BCC would print a KeyError from `__del__`.
    """
    for table in list(b.tables.values()):
        for key in list(getattr(table, "_open_key_fds", {})):
            del table[key]
    release_bpf(b)


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


def _producers(env: Env, res: Result) -> Producers:
    """The run's paused producer(s): one on the producer CPU, or one per MPSC CPU, each
    making its share of `res.events`."""
    cpus = [env.cfg.producer_cpu] if res.producers == 1 else list(env.cfg.mpsc_cpus)
    if len(cpus) != res.producers:
        raise RuntimeError(f"{res.producers} producers planned, {len(cpus)} MPSC CPUs configured")
    return Producers(env.helpers["producer"], res.events // res.per_call // res.producers, cpus)


@contextlib.contextmanager
def _bcc_program(env: Env, res: Result) -> Iterator[tuple[Producers, Any, int]]:
    """Paused producer(s) and the bench program loaded by BCC for them (pages too); unloaded on exit."""
    pages = _pages(res.size)
    with _producers(env, res) as prod:
        b = env.bcc.BPF(text=program(res.kind, prod.pids, pages, res.per_call))
        try:
            yield prod, b, pages
        finally:
            _cleanup_bcc(b)


def _produced(res: Result, calls: int, t0: int, t1: int) -> None:
    """What the producer made, exactly, and how long it took."""
    res.made = calls * res.per_call
    res.producer_seconds = (t1 - t0) / 1e9


def undisturbed_size(kind: str, events: int) -> int:
    """The smallest buffer (a power-of-two number of pages) that holds `events` records: the
    whole ring, or each CPU's perf buffer (any one producer's CPU may get them all)."""
    pages = -(-events * (RING_RECORD if kind == "ring" else PERF_RECORD) // PAGE)
    return PAGE << (pages - 1).bit_length()


def undisturbed(env: Env, res: Result) -> None:
    """The producer's own rate: the program loaded by BCC into a buffer that holds every
    event, nobody reading, no wake-ups. A ring: the kernel queues one wake-up in all, for the
    first record (bpf_ringbuf_commit() wakes only when the record is the first unread one).
    Perf: per-CPU buffers opened with the wake-up watermark at their size, which no pending
    data reaches, so the kernel never wakes anyone. Each CPU's buffer holds every event (the
    producer is pinned, so one CPU gets them all): 64 MiB/CPU for 1 M events, which
    perf_event_mlock_kb (516 KiB per user by default) does not cap for root (CAP_IPC_LOCK)."""
    import numpy as np

    from ..readers.perf import PerfBufferReader
    from ..readers.ring import RingBufferReader

    dtype = np.dtype((np.void, EVENT_SIZE))
    with _bcc_program(env, res) as (prod, b, pages):
        if res.kind == "ring":
            prod.go()
            calls, t0, t1 = prod.finish()
            ring = RingBufferReader(b["events"].map_fd, res.size, dtype, wakeup="timer")
            try:
                pending = ring.fill_bytes()
            finally:
                ring.close()
            res.received = pending // RING_RECORD
        else:
            table = b["events"]

            def set_cpu_fd(cpu: int, fd: int) -> None:
                table[ctypes.c_int(cpu)] = ctypes.c_int(fd)

            # only the pinned producers' CPUs get a buffer (256 MiB each for 3 M events)
            pinned = [m.cpu for m in prod.members if m.cpu is not None]
            perf = PerfBufferReader(set_cpu_fd, dtype, pages, watermark_bytes=pages * PAGE,
                                    cpus=pinned if len(pinned) == len(prod.members) else None)
            try:
                prod.go()
                calls, t0, t1 = prod.finish()
                res.received = perf.fill_bytes() // PERF_RECORD
                # epoll reports a perf fd readable only once the kernel has woken it
                # (perf_output_wakeup sets rb->poll): False proves no wake-up happened
                res.extra["woken"] = perf.poll(0)
            finally:
                perf.close()
    _produced(res, calls, t0, t1)
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
        from ..probe import Probe
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


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class LiveRun(NamedTuple):
    calls: int
    t0: int
    t1: int
    stats: dict[str, Any]
    df: Any  # pandas.DataFrame
    cpu_s: float  # this process's CPU time from the producers' go to their end


def _live_probe(p: Any, prod: Producers, per_call: int) -> LiveRun:
    """Start `p`, run the producers, wait until every event is received or counted dropped,
    stop, and return the counts and the frame; `p` is closed in any case. cpu_s is the drain
    thread's CPU time, near enough: the main thread only waits meanwhile, and the producers
    and their BPF programs are other processes."""
    try:
        p.start()
        cpu0 = _own_cpu_seconds()
        prod.go()
        calls, t0, t1 = prod.finish()
        cpu_s = _own_cpu_seconds() - cpu0  # while the producers ran (and finish() returned)
        _wait_accounted(p, calls * per_call)
        p.stop()
        if p.error is not None:
            raise p.error
        return LiveRun(calls, t0, t1, dict(p.stats["events"]), p.frame("events"), cpu_s)
    finally:
        p.close()


def live_kernelscope(env: Env, res: Result) -> None:
    """Probe.start() drains in its own thread while the producer runs."""
    probe_cls = _probe_class()
    pages = _pages(res.size)
    kw: dict[str, Any] = {}
    if res.consumer == "kernelscope-wm" and env.cfg.perf_watermark is not None:
        kw["watermark_bytes"] = max(8, int(res.size * env.cfg.perf_watermark))
        res.extra["watermark_bytes"] = kw["watermark_bytes"]
    with _producers(env, res) as prod:
        p = probe_cls(program(res.kind, prod.pids, pages, res.per_call), pages=pages,
                      poll_interval=env.cfg.poll_interval, **kw)
        run = _live_probe(p, prod, res.per_call)
    calls, t0, t1, stats, df = run.calls, run.t0, run.t1, run.stats, run.df
    res.extra["consumer_cpu_s"] = round(run.cpu_s, 4)
    _produced(res, calls, t0, t1)
    res.received = len(df)
    # which CPUs the program ran on (its `cpu` field): MPSC runs must show every producer's
    res.extra["event_cpus"] = {str(k): int(v) for k, v in df["cpu"].value_counts().items()}
    # ks_arrival_ns: CLOCK_MONOTONIC when the read that brought each record returned
    t_last = int(df["ks_arrival_ns"].max()) if len(df) else 0
    res.seconds = (t_last - t0) / 1e9 if t_last else 0.0
    _ks_accounting(res, stats, len(df))


def drain_kernelscope(env: Env, res: Result) -> None:
    """Probe.load() while the producer fills the buffer; timed: start(), stop(), frame().

    stop() ends with a final drain, so the frame then holds every event that entered the
    buffer; the timed window includes stop()'s wait for in-flight programs. The
    "kernelscope-reader" consumer times the reader alone instead, the same work as libbpf's
    consume into a C array: the probe's reader read until the buffer is empty, each batch an
    owned numpy array of records (no drain thread, no stop(), no store, no DataFrame).
    """
    probe_cls = _probe_class()
    pages = _pages(res.size)
    reader_only = res.consumer == "kernelscope-reader"
    with _producers(env, res) as prod:
        p = probe_cls(program(res.kind, prod.pids, pages, res.per_call), pages=pages,
                      poll_interval=env.cfg.poll_interval)
        try:
            p.load()
            prod.go()
            calls, t0, t1 = prod.finish()
            start = time.perf_counter()
            if reader_only:
                received, lost, reads = _read_until_empty(p._drain.maps["events"].reader)
            else:
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
    if reader_only:
        res.received = received
        res.lost_reported = lost if res.kind == "perf" else None
        res.extra["reads"] = reads
        res.extra["into"] = "the probe's reader: read() until empty, each batch an owned numpy array"
        return
    res.received = len(df)
    res.extra["into"] = "Probe.start(); Probe.stop(); Probe.frame() -> DataFrame"
    _ks_accounting(res, stats, len(df))


def _read_until_empty(reader: Any) -> tuple[int, int, int]:
    """(records, lost, reads) of reading `reader` until a read brings nothing."""
    received, lost, reads = 0, 0, 0
    while True:
        batch = reader.read()
        if not len(batch) and not batch.lost:
            return received, lost, reads
        received += len(batch)
        lost += batch.lost
        reads += 1


def latency_kernelscope(env: Env, res: Result) -> None:
    """A producer paced at `res.pace` calls/s into a Probe with every default (its poll
    interval and wake-up policy, the program's ring size, 64 pages per CPU for perf).
    Latency per event: ks_arrival_ns (CLOCK_MONOTONIC when the read that brought it returned)
    - ts (bpf_ktime_get_ns(), the same clock, taken in the tracepoint)."""
    import numpy as np

    probe_cls = _probe_class()
    calls = res.events // res.per_call
    with Producers(env.helpers["producer"], calls, [env.cfg.producer_cpu], res.pace) as prod:
        p = probe_cls(program(res.kind, prod.pids, _pages(res.size), res.per_call))
        run = _live_probe(p, prod, res.per_call)
    calls, t0, t1, stats, df = run.calls, run.t0, run.t1, run.stats, run.df
    _produced(res, calls, t0, t1)
    res.received = len(df)
    lat = df["ks_arrival_ns"].to_numpy(np.int64) - df["ts"].to_numpy(np.int64)
    t_last = int(df["ks_arrival_ns"].max()) if len(df) else 0
    res.seconds = (t_last - t0) / 1e9 if t_last else 0.0
    if len(lat):
        med, p99 = np.percentile(lat, [50, 99])
        res.extra["latency_us"] = {"median": round(float(med) / 1e3, 1),
                                   "p99": round(float(p99) / 1e3, 1),
                                   "max": round(float(lat.max()) / 1e3, 1)}
    _ks_accounting(res, stats, len(df))


RUNNERS: dict[tuple[str, str], Callable[[Env, Result], None]] = {
    ("undisturbed", NOBODY): undisturbed,
    ("live", "bcc"): live_bcc,
    ("live", "libbpf"): live_libbpf,
    ("live", "kernelscope"): live_kernelscope,
    ("drain", "bcc"): drain_bcc,
    ("drain", "libbpf"): drain_libbpf,
    ("drain", "kernelscope"): drain_kernelscope,
    ("drain", "kernelscope-reader"): drain_kernelscope,
    ("overflow", "bcc"): live_bcc,
    ("overflow", "libbpf"): live_libbpf,
    ("overflow", "kernelscope"): live_kernelscope,
    ("live", "kernelscope-wm"): live_kernelscope,
    ("overflow", "kernelscope-wm"): live_kernelscope,
    ("latency", "kernelscope"): latency_kernelscope,
}


