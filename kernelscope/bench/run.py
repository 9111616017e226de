"""`kernelscope bench`: kernelscope's readers against BCC's Python callbacks and libbpf's C.

One run on this machine, everything side by side. A C producer (built here with gcc)
calls getppid() in a loop; a TRACEPOINT_PROBE on syscalls:sys_enter_getppid, filtered on
the producer's pid, emits a 32-byte event per call (or K per call) into a ring buffer or
a perf buffer. The producer's count is exact, so dropped = made - received for every
consumer, whether or not it can count losses itself.

Consumers: BCC's Python callbacks (open_ring_buffer / open_perf_buffer), libbpf's C
consumers (c/*_consumer.c, given the BCC-created map fd by inheritance), and
kernelscope's Probe. Scenarios: undisturbed (the program loaded by BCC into a ring that
holds every event, nobody reading: the producer's own rate, which the live figures are
judged against), live (producer and consumer in parallel), drain (a buffer filled while
nobody reads, then drained into memory: a DataFrame for Python) and overflow (tiny perf
buffers overrun live: are the losses reported?).

Run as `kernelscope bench` or `python -m kernelscope.bench` (the command line is in
`__main__.py`, the C producer in `producer.py`, sizes, Config and Result in `config.py`, the
runners per consumer in `consumers.py`, tables and targets in `report.py`; this module plans
the runs, runs them and watches the host meanwhile); `--quick` for a smoke run.
The figures are ratios within one run; other work on the machine skews them, so each
run's share of CPU lost to other processes is measured and flagged.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from types import ModuleType
from typing import Any

from .config import BUSY, NOBODY, Config, Result, _describe, live_size
from .consumers import RUNNERS, Env, _capacity, undisturbed_size
from .producer import LIBBPF_HEADER

# --- planning, running, judging -----------------------------------------------------------


def _consumers(cfg: Config, kind: str) -> tuple[str, ...]:
    wm = kind == "perf" and cfg.perf_watermark is not None and "kernelscope" in cfg.consumers
    return cfg.consumers + (("kernelscope-wm",) if wm else ())


def _round(cfg: Config, per_call: int) -> list[Result]:
    """One target round at `per_call`: per buffer kind, single producer then MPSC, the
    undisturbed producer and right after it kernelscope live (then BCC and libbpf for the
    single-producer ring, whose live figures the tables compare)."""
    runs: list[Result] = []
    mpsc = cfg.mpsc_cpus and per_call in (cfg.mpsc_per_calls or cfg.live_per_calls)
    groups = [1] + ([len(cfg.mpsc_cpus)] if mpsc else [])
    for kind in cfg.kinds:
        events = cfg.live_events if kind == "ring" else cfg.target_perf_events
        for producers in groups:
            runs.append(Result("undisturbed", kind, NOBODY, undisturbed_size(kind, events), events,
                               per_call, producers=producers))
            if cfg.target_size not in cfg.live_sizes:
                continue
            consumers = sorted(_consumers(cfg, kind) if (kind, producers) == ("ring", 1)
                               else [c for c in cfg.consumers if c == "kernelscope"],
                               key=lambda c: c != "kernelscope")
            size = live_size(cfg.target_size, kind, producers)
            runs += [Result("live", kind, consumer, size, events, per_call,
                            producers=producers) for consumer in consumers]
    return runs


def plan(cfg: Config) -> list[Result]:
    """Every measurement, in the order made. The ones the live targets compare come first,
    in `target_rounds` interleaved rounds (the same run planned once per round)."""
    runs: list[Result] = []
    for _ in range(cfg.target_rounds):
        for per_call in cfg.live_per_calls:
            runs += _round(cfg, per_call)
    runs += [
        Result("live", kind, consumer, size,
               cfg.live_events if kind == "ring" else cfg.live_perf_events, per_call)
        for size in cfg.live_sizes
        for kind in cfg.kinds
        if (kind, size) != ("ring", cfg.target_size)
        for per_call in cfg.live_per_calls[:1]
        for consumer in _consumers(cfg, kind)
        if (kind, size, consumer) != ("perf", cfg.target_size, "kernelscope")  # in the rounds
    ]
    for kind in cfg.kinds:
        size = cfg.drain_ring_size if kind == "ring" else cfg.drain_perf_size
        calls = -(-int(_capacity(kind, size) * cfg.drain_fill) // cfg.drain_per_call)
        reader = ("kernelscope-reader",) if "kernelscope" in cfg.consumers else ()
        runs += [
            Result("drain", kind, consumer, size, calls * cfg.drain_per_call, cfg.drain_per_call)
            for consumer in cfg.consumers + reader
        ]
    if "perf" in cfg.kinds:
        runs += [
            Result("overflow", "perf", consumer, cfg.overflow_size, cfg.overflow_events,
                   cfg.overflow_per_call)
            for consumer in _consumers(cfg, "perf")
            if consumer in cfg.overflow_consumers
        ]
    if "kernelscope" in cfg.consumers:
        runs += [Result("latency", kind, "kernelscope", cfg.target_size,
                        max(1, int(rate * cfg.latency_seconds)), 1, pace=float(rate))
                 for kind in cfg.kinds for rate in cfg.latency_rates]
    return runs


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
    irq_cpu = env.cfg.producer_cpu if res.producers == 1 else None  # MPSC: every CPU's
    irq_work = irq_work_interrupts(irq_cpu)
    steal = steal_seconds(env.cfg.consumer_cpu)
    steal_all = steal_seconds()
    try:
        RUNNERS[res.scenario, res.consumer](env, res)
    except Exception as e:  # one failed run must not lose the others' figures
        res.error = f"{type(e).__name__}: {e}"
    after = irq_work_interrupts(irq_cpu)
    if irq_work is not None and after is not None:
        res.extra["irq_work"] = after - irq_work
    res.extra["steal_ms"] = round((steal_seconds(env.cfg.consumer_cpu) - steal) * 1e3, 1)
    res.extra["steal_all_ms"] = round((steal_seconds() - steal_all) * 1e3, 1)  # every CPU's, summed
    res.extra["wall_seconds"] = round(time.perf_counter() - started, 2)
    res.extra["other_cpu"] = round(meter.share(), 3)
    return res


def _key(r: Result) -> tuple[str, str, str, int, int, int, float]:
    return (r.scenario, r.kind, r.consumer, r.size, r.per_call, r.producers, r.pace)


def run_all(env: Env, runs: Sequence[Result], repeat: int = 1) -> list[Result]:
    """Run every planned measurement; drains `repeat` times; keep the fastest attempt of each.

    For a drain the best of several is the usual defence against other work on the
    machine, which only ever makes it slower. The same measurement planned several times
    (the target rounds) is one measurement too, fastest kept. Other live runs are not
    repeated: noise there moves drops both ways (a starved consumer drops more, a starved
    producer less). Every attempt's figures stay in `extra["attempts"]`.
    """
    tries: dict[tuple[str, str, str, int, int, int, float], list[Result]] = {}
    set_aside: dict[tuple[str, str, str, int, int, int, float], list[dict[str, Any]]] = {}
    rounds = {_key(r): sum(_key(x) == _key(r) for x in runs) for r in runs}
    for i, planned in enumerate(runs, 1):
        n = repeat if planned.scenario == "drain" and planned.consumer != "bcc" else 1
        k = redone = 0
        while k < n:
            res = _attempt(env, planned)
            if rounds[_key(res)] > 1 and redone < STOLEN_REDO and _stolen(res):
                redone += 1  # a target round the host took the CPU from: measured again
                set_aside.setdefault(_key(res), []).append(
                    {"events_per_s": round(res.rate, 1), "received": res.received, "made": res.made,
                     "steal_ms": res.extra["steal_all_ms"]})
                _progress(f"{i}/{len(runs)} {_describe(res)}: the host stole "
                          f"{res.extra['steal_all_ms']:g} ms of the CPUs in "
                          f"{res.extra['wall_seconds']:.1f} s (its program's compile included): "
                          "set aside, measured again")
                continue
            k += 1
            attempts = tries.setdefault(_key(res), [])
            attempts.append(res)
            if res.ok and res.scenario == "latency":
                lat = res.extra.get("latency_us", {})
                what = (f"{res.received:,}/{res.made:,} received, latency median "
                        f"{lat.get('median', 0):,.1f} us, p99 {lat.get('p99', 0):,.1f} us")
            elif res.ok:
                lost = "" if res.lost_reported is None else f", {res.lost_reported:,} reported lost"
                what = (f"{res.received:,}/{res.made:,} received ({res.dropped_pct:.1f} % "
                        f"dropped{lost}), {res.rate / 1e6:.2f} M ev/s")
            else:
                what = f"FAILED: {res.error}"
            again = (f" (try {k}/{n})" if n > 1 else
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
        if _key(best) in set_aside:
            best.extra["set_aside"] = set_aside[_key(best)]
        done.append(best)
    return done


STOLEN_SHARE = 0.05  # of a target round's wall time: more stolen by the host and it is redone
STOLEN_REDO = 2  # at most this many times per round


def _stolen(r: Result) -> bool:
    """True if the hypervisor ran something else on the CPUs, per CPU on average, for more
    than STOLEN_SHARE of the measured window (/proc/stat steal on every CPU: the producer's
    and the consumer's alike; an undisturbed round slowed by it would lower the baseline):
    the round measured the host, not the reader. The steal is counted over the whole attempt
    (its program's compile too), so this errs towards measuring again."""
    window = max(r.seconds, r.producer_seconds)
    stolen = r.extra.get("steal_all_ms", r.extra.get("steal_ms", 0)) / 1e3 / (os.cpu_count() or 1)
    return window > 0 and stolen > STOLEN_SHARE * window


# --- the host while it runs --------------------------------------------------------------


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


