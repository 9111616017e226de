"""The bench's verdicts and output: ratios, targets against the project's figures, tables, JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import (
    BUSY,
    CONSUMERS,
    EVENT_SIZE,
    KINDS,
    KS_VARIANTS,
    LABELS,
    MIB,
    NOBODY,
    SCENARIOS,
    Config,
    Result,
    _describe,
    fmt_size,
    live_size,
)


@dataclass
class Target:
    name: str
    passed: bool | None  # None: could not be evaluated
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "N/A "}[self.passed]



def _find(runs: Sequence[Result], scenario: str, kind: str, consumer: str,
          size: int | None = None, *, per_call: int | None = None) -> Result | None:
    for r in runs:
        if ((r.scenario, r.kind, r.consumer) == (scenario, kind, consumer) and r.ok
                and (size is None or r.size == size)
                and (per_call is None or r.per_call == per_call)):
            return r
    return None



def undisturbed_rates(runs: Sequence[Result], kind: str = "ring", producers: int = 1) -> dict[int, float]:
    """The undisturbed producer rate (events/s) by events per call, for one buffer kind and
    number of producers, as measured in `runs`."""
    return {r.per_call: r.producer_rate for r in runs
            if r.scenario == "undisturbed" and r.ok and (r.kind, r.producers) == (kind, producers)}


Rates = dict[tuple[str, int, int], float]  # (kind, producers, per call): undisturbed events/s


def all_undisturbed(runs: Sequence[Result]) -> Rates:
    return {(r.kind, r.producers, r.per_call): r.producer_rate for r in runs
            if r.scenario == "undisturbed" and r.ok}


def _vs_undisturbed(r: Result, rates: Rates) -> float | None:
    """A live run's received rate over the undisturbed producer's (same buffer kind, producers
    and events per call)."""
    base = rates.get((r.kind, r.producers, r.per_call))
    if r.scenario != "live" or not base or not r.ok:
        return None
    return r.rate / base


def _reader_cpu(r: Result) -> float | None:
    """kernelscope's reader CPU time while the producer ran, as a share of one CPU."""
    cpu = r.extra.get("consumer_cpu_s")
    if cpu is None or r.producer_seconds <= 0:
        return None
    return float(cpu) / r.producer_seconds


def _ratio(a: Result | None, b: Result | None) -> float | None:
    if a is None or b is None or b.rate <= 0:
        return None
    return a.rate / b.rate


def _ratio_key(r: Result) -> str:
    per_call = f"{r.per_call}pc/" if r.scenario == "live" and r.per_call != 1 else ""
    mpsc = f"/mpsc{r.producers}" if r.producers > 1 else ""
    return f"{r.scenario}{mpsc}/{r.kind}/{fmt_size(r.size).replace(' ', '')}/{per_call}"


def ratios(runs: Sequence[Result]) -> dict[str, float | None]:
    """kernelscope's rate over each other consumer's, per scenario, buffer, size and events
    per call; and, live, over the producer's undisturbed rate."""
    out: dict[str, float | None] = {}
    rates = all_undisturbed(runs)
    for ks in runs:
        if ks.consumer not in KS_VARIANTS or ks.scenario == "latency":
            continue
        for r in runs:
            if r.consumer in (*KS_VARIANTS, NOBODY) or (
                    r.scenario, r.kind, r.size, r.per_call, r.producers) != (
                    ks.scenario, ks.kind, ks.size, ks.per_call, ks.producers):
                continue
            out[f"{_ratio_key(r)}{ks.consumer}_vs_{r.consumer}"] = _ratio(
                ks if ks.ok else None, r if r.ok else None)
        if ks.scenario == "live" and (ks.kind, ks.producers, ks.per_call) in rates:
            out[f"{_ratio_key(ks)}{ks.consumer}_vs_undisturbed"] = _vs_undisturbed(ks, rates)
    return out


def _ratio_target(name: str, ks: Result | None, other: Result | None, at_least: float) -> Target:
    x = _ratio(ks, other)
    if ks is None or other is None or x is None:
        return Target(name, None, "missing runs")
    medians = [_median_rate(r) for r in (ks, other)]
    spread = (f"; medians of {len(ks.extra['attempts'])} tries {_m(medians[0])} vs {_m(medians[1])} "
              f"M rec/s, {medians[0] / medians[1]:.3f}x" if all(medians) else "")
    return Target(name, x >= at_least,
                  f"{x:.3f}x ({_m(ks.rate)} vs {_m(other.rate)} M rec/s; {ks.seconds * 1e3:.0f} vs "
                  f"{other.seconds * 1e3:.0f} ms for {ks.received:,} vs {other.received:,} records"
                  f"{', the fastest of each' if spread else ''}{spread})")


def _mean_rate(r: Result) -> float:
    """The mean rate of a run's rounds (its own rate if it ran once). The live verdicts use it:
    the host's speed here swings by up to 2x for a tenth of a second at a time, so the
    fastest of 5 rounds on each side compares two single runs (the same code gave 0.78-0.91x
    that way at perf 16/call), where the means of all rounds gave 0.96-0.97x."""
    rates = [a["events_per_s"] for a in r.extra.get("attempts", []) if not a.get("error")]
    return sum(rates) / len(rates) if rates else r.rate


def _median_rate(r: Result) -> float:
    """The median rate of a repeated run's tries (0.0 if it ran once)."""
    rates = sorted(a["events_per_s"] for a in r.extra.get("attempts", []) if not a.get("error"))
    return rates[len(rates) // 2] if len(rates) > 1 else 0.0


LIVE_SHARE = 0.9  # of the producer's undisturbed rate that kernelscope must receive live
DRAIN_RING, DRAIN_PERF, SEND = 1.2, 1.0, 0.8  # kernelscope / libbpf, the targets


def _drops_detail(attempts: list[dict[str, Any]], lossy: list[dict[str, Any]], reads: int | None) -> str:
    dropped = max((a["made"] - a["received"] for a in lossy), default=0)
    out = (f"{dropped:,} dropped" if len(attempts) == 1 else
           f"{len(lossy)} of {len(attempts)} rounds dropped" + (f" (at most {dropped:,})" if lossy else ""))
    if lossy:
        stolen = ", ".join(f"{a.get('steal_ms', 0):g}" for a in lossy)
        out += f"; the host stole {stolen} ms of the consumers' CPU in the rounds that dropped"
    return out + ("" if reads is None else f", {reads:,} reads")


def _live_target(runs: Sequence[Result], target_size: int, kind: str = "ring", producers: int = 1) -> Target:
    """kernelscope live at every events-per-call value the undisturbed producer was measured at."""
    size = live_size(target_size, kind, producers)
    rates = all_undisturbed(runs)
    per_calls = sorted(k for (kd, n, k) in rates if (kd, n) == (kind, producers)) or [1, 16]
    per_cpu = "/CPU" if kind == "perf" else ""
    mpsc = f"MPSC ({producers} producers, one per CPU) " if producers > 1 else ""
    name = (f"live {mpsc}{fmt_size(size)}{per_cpu} {kind}: kernelscope receives >= {LIVE_SHARE}x "
            f"the producer's undisturbed rate with 0 drops, at {' and at '.join(map(str, per_calls))} "
            "events per call")
    parts, verdicts = [], []
    for per_call in per_calls:
        ks = next((r for r in runs if (r.scenario, r.kind, r.consumer, r.size, r.per_call, r.producers)
                   == ("live", kind, "kernelscope", size, per_call, producers) and r.ok), None)
        share = None if ks is None else _vs_undisturbed(ks, rates)
        und = next((r for r in runs if r.scenario == "undisturbed" and r.ok and
                    (r.kind, r.producers, r.per_call) == (kind, producers, per_call)), None)
        if ks is None or share is None or und is None or not _mean_rate(und):
            return Target(name, None, f"missing runs at {per_call} per call")
        mean_share = _mean_rate(ks) / _mean_rate(und)
        # every round counts for drops: the fastest one is only the one compared
        attempts = ks.extra.get("attempts") or [
            {"made": ks.made, "received": ks.received, "steal_ms": ks.extra.get("steal_ms", 0)}]
        lossy = [a for a in attempts if a["made"] > a["received"]]
        verdicts.append(mean_share >= LIVE_SHARE and not lossy)
        reader = _reader_cpu(ks)
        limit = ("" if producers == 1 or reader is None else
                 f" (the reader used {reader:.0%} of a CPU, taken from {producers} producers on "
                 f"{producers} CPUs: at most {1 - reader / producers:.2f}x of their rate is left"
                 + _c_bound(runs, kind, producers, rates[kind, producers, per_call]) + ")")
        paired = _paired_median(runs, ks)
        paired_text = "" if paired is None else f", median of the rounds' own ratios {paired:.3f}x"
        aside = ks.extra.get("set_aside") or []
        aside_text = ("" if not aside else f", {len(aside)} round(s) set aside and measured again (the "
                      f"host stole {', '.join(str(a['steal_ms']) for a in aside)} ms of the CPUs)")
        rounds = len([a for a in ks.extra.get("attempts") or [{}] if not a.get("error")])
        parts.append(f"{per_call}/call: {_m(_mean_rate(ks))} of {_m(_mean_rate(und))} M ev/s, the mean of "
                     f"{rounds} round(s) each ({mean_share:.3f}x; the fastest of each {_m(ks.rate)} of "
                     f"{_m(rates[kind, producers, per_call])}, {share:.3f}x{paired_text}){limit}, "
                     + _drops_detail(attempts, lossy, ks.extra.get("stats", {}).get("batches")) + aside_text)
    return Target(name, all(verdicts), "; ".join(parts))


def _c_bound(runs: Sequence[Result], kind: str, producers: int, undisturbed: float) -> str:
    """What a consumer as fast as libbpf's C one would leave of `undisturbed` ev/s when its
    CPU time comes off the producers' (one producer per CPU): libbpf's time per record is
    its drain's in this run (records already in memory; live costs it more, wake-ups too)."""
    lb = _find(runs, "drain", kind, "libbpf")
    if producers == 1 or lb is None or lb.rate <= 0:
        return ""
    share = undisturbed / lb.rate
    left = max(0.0, 1 - share / producers)
    verdict = f"below {LIVE_SHARE}x: not reachable on {producers} CPUs" if left < LIVE_SHARE else "reachable"
    return (f"; libbpf's consumer at its drain speed here ({1e9 / lb.rate:.0f} ns/record) would "
            f"use {share:.0%} of a CPU at the undisturbed rate and leave at most {left:.2f}x, {verdict}")


def _paired_median(runs: Sequence[Result], ks: Result) -> float | None:
    """The median over rounds of kernelscope's rate / the undisturbed producer's in the same
    round (run right before it): the host's drift between rounds cancels from each pair. The
    verdict uses the means of each side's rounds; this is printed beside it."""
    und = next((r for r in runs if r.scenario == "undisturbed" and r.ok and
                (r.kind, r.producers, r.per_call) == (ks.kind, ks.producers, ks.per_call)), None)
    a, b = ks.extra.get("attempts") or [], (und.extra.get("attempts") or []) if und else []
    pairs = sorted(x["events_per_s"] / y["events_per_s"] for x, y in zip(a, b, strict=False)
                   if not x.get("error") and not y.get("error") and y["events_per_s"] > 0)
    return pairs[len(pairs) // 2] if len(pairs) > 1 else None


def _send_target(sends: Sequence[Any]) -> Target:
    """SEND's figures as send.py measured them (its result read, not re-derived)."""
    name = f"user ring SEND from a numpy array: kernelscope >= {SEND}x libbpf's reserve/submit loop"
    by = {s.writer: s for s in sends if s.intact}
    ks, lb = by.get("kernelscope"), by.get("libbpf C")
    if ks is None or lb is None or not lb.rate:
        return Target(name, None, "not run" if not sends else "missing or failed writers")
    x = ks.rate / lb.rate
    return Target(name, x >= SEND, f"{x:.3f}x ({_m(ks.rate)} vs {_m(lb.rate)} M samples/s, "
                  f"{ks.sent:,} samples)")


def targets(runs: Sequence[Result], target_size: int = 4 * MIB, sends: Sequence[Any] = ()) -> list[Target]:
    """The 'done when' figures of issue 17, as ratios within this run.

    Each is about kernelscope alone: draining against libbpf's C consumer of the same buffer,
    live against the producer's own undisturbed rate (one producer and one per CPU, ring and
    perf), sending against libbpf's C writer. Who else drops live depends on the host (how
    much a wake-up costs there), so the other consumers' live figures stay in the tables.
    """
    out = [
        _ratio_target(f"drain a full ring into a DataFrame: kernelscope >= {DRAIN_RING}x libbpf's "
                      "ring_buffer__consume", _find(runs, "drain", "ring", "kernelscope"),
                      _find(runs, "drain", "ring", "libbpf"), DRAIN_RING),
        # the perf target is the reader's: perf_buffer__consume into an array is
        # what the C consumer does; the whole drain into a DataFrame is in the DRAIN table
        _ratio_target(f"perf reader: full perf buffers read into arrays >= {DRAIN_PERF}x "
                      "libbpf's perf_buffer__consume into a C array",
                      _find(runs, "drain", "perf", "kernelscope-reader"),
                      _find(runs, "drain", "perf", "libbpf"), DRAIN_PERF),
    ]
    groups = sorted({(r.kind, r.producers) for r in runs if r.scenario == "undisturbed"},
                    key=lambda g: (g[1], KINDS.index(g[0])))
    out += [_live_target(runs, target_size, kind, n) for kind, n in groups or [("ring", 1)]]
    out.append(_send_target(sends))
    return out


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
    mpsc = f" MPSC x{r.producers}" if r.producers > 1 else ""
    return LABELS[r.consumer] + mpsc + (" *" if r.extra.get("other_cpu", 0.0) > BUSY else "")



def _run_table(runs: Sequence[Result], scenario: str, rates: Rates) -> str:
    """One section's table. Live tables add the events per call and the received rate over
    the producer's undisturbed rate (same buffer, producers and events per call)."""
    drain, live, per_call = scenario == "drain", scenario == "live", scenario != "drain"
    header = ["buffer", "size", "consumer"]
    header += ["per call"] if per_call else []
    header += ["received", "dropped %"]
    header += ["seconds", "M rec/s"] if drain else ["M ev/s", "producer M ev/s"]
    header += ["vs undisturbed"] if live else []
    header += ["IRQ work"] if per_call else []
    header += ["reader CPU %"] if live else []
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
        if live:
            share = _reader_cpu(r)
            figures.append("-" if share is None else f"{100 * share:.0f}")
        rows.append([*head, f"{r.received:,}", f"{r.dropped_pct:.1f}", *figures, _lost(r)])
    return _table(header, rows)



def _undisturbed_line(rates: Rates) -> str:
    if not rates:
        return "  producer undisturbed: not measured (no undisturbed runs)"
    groups: dict[tuple[str, int], list[str]] = {}
    for (kind, n, k), v in sorted(rates.items(), key=lambda x: (x[0][1], KINDS.index(x[0][0]), x[0][2])):
        groups.setdefault((kind, n), []).append(f"{_m(v)} at {k}/call")
    return ("  producer undisturbed (nobody reading, no wake-ups), M ev/s: " + "; ".join(
        f"{kind}{f' MPSC x{n}' if n > 1 else ''} " + ", ".join(v) for (kind, n), v in groups.items()))


def _contention_notes(rates: Rates) -> list[str]:
    """Where several producers together made fewer events than one alone (a shared ring)."""
    out = []
    for (kind, n, k), v in sorted(rates.items()):
        one = rates.get((kind, 1, k))
        if n > 1 and one and v < one:
            out.append(f"  {kind}, {k}/call: {n} producers together made {_m(v)} M ev/s, one alone "
                       f"{_m(one)}: every output reserves space under the one ring's spinlock "
                       "(bpf_ringbuf_reserve), so producers on other CPUs wait for each other; "
                       "a reader that takes CPU time from one of them lets the others run faster"
                       if kind == "ring" else
                       f"  {kind}, {k}/call: {n} producers together made {_m(v)} M ev/s, one alone "
                       f"{_m(one)}")
    return out


def _latency_table(runs: Sequence[Result]) -> str:
    header = ["buffer", "paced at ev/s", "producer M ev/s", "received", "dropped %", "median us",
              "p99 us", "max us"]
    rows = []
    for r in runs:
        head = [r.kind, f"{r.pace:,.0f}"]
        lat = r.extra.get("latency_us")
        if not r.ok or not lat:
            rows.append([*head, "error" if not r.ok else "no events"] + [""] * (len(header) - 3))
            continue
        rows.append([*head, _m(r.producer_rate), f"{r.received:,}", f"{r.dropped_pct:.1f}",
                     f"{lat['median']:,.1f}", f"{lat['p99']:,.1f}", f"{lat['max']:,.1f}"])
    return _table(header, rows)



def report(runs: Sequence[Result], cfg: Config, machine: dict[str, Any], sends: Sequence[Any] = (),
           extra: Sequence[str] = ()) -> str:
    """The human-readable summary: tables, ratios, errors, targets."""
    order = (NOBODY, *CONSUMERS, *KS_VARIANTS)

    def reading_order(r: Result) -> tuple[int, int, int, int]:
        return (KINDS.index(r.kind), r.size, r.per_call, order.index(r.consumer))

    by = {s: sorted((r for r in runs if r.scenario == s and r.producers == 1), key=reading_order)
          for s in SCENARIOS}
    mpsc = sorted((r for r in runs if r.producers > 1),
                  key=lambda r: (SCENARIOS.index(r.scenario), *reading_order(r)))
    rates = all_undisturbed(runs)
    und = _undisturbed_line(rates)
    out = [
        f"kernelscope bench{' --quick' if cfg.quick else ''}: kernel {machine['kernel']}, "
        f"{machine['cpus']} CPUs, BCC {machine['bcc']}, libbpf {machine['libbpf']}; "
        f"producer on CPU {cfg.producer_cpu}, consumers on CPU {cfg.consumer_cpu}",
        "received/dropped are exact: dropped = events the program emitted - events received"
        + (f"; each libbpf and kernelscope drain figure is the fastest of {machine['repeat']} "
           "runs (BCC's: one)"
           if machine.get("repeat", 1) > 1 else "")
        + (f"; undisturbed, MPSC and live {fmt_size(cfg.target_size)} figures: the fastest of "
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
        out += ["", "UNDISTURBED: the program loaded by BCC into a buffer that holds every event, "
                "nobody reading, no wake-ups (ring: the kernel queues a single one; perf: watermark "
                "at the buffer's size), so the producer runs at its own speed; "
                "M ev/s = events / producer seconds",
                und, _run_table(by["undisturbed"], "undisturbed", rates)]
    if by["live"]:
        per_calls = " / ".join(map(str, cfg.live_per_calls))
        out += ["", f"LIVE: producer and consumer in parallel, {cfg.live_events:,} (ring) / "
                f"{cfg.live_perf_events:,} (perf; {cfg.target_perf_events:,} in the target rounds) "
                f"events of {EVENT_SIZE} bytes, {per_calls} "
                f"per getppid() call ({fmt_size(cfg.target_size)} at each); M ev/s = received / "
                "(producer start to last event received); vs undisturbed = that / the undisturbed "
                "producer's rate (same buffer kind, events per call); IRQ work = IRQ-work interrupts "
                "on the producer's CPU during the run (a ring buffer wake-up is one); wake-ups: "
                "kernelscope uses the Probe's defaults (ring: paced reads; perf: a watermark at a "
                "quarter of each CPU's buffer plus a read every poll interval), BCC and libbpf "
                "theirs (ring: epoll as soon as notified; perf: a wake-up per event)"
                + ("" if cfg.perf_watermark is None else
                   f"; kernelscope wm: perf wakeup at {cfg.perf_watermark:.0%} of the buffer"),
                und, _run_table(by["live"], "live", rates)]
    if mpsc:
        out += ["", f"MPSC: one producer pinned on each of CPUs {', '.join(map(str, cfg.mpsc_cpus))}, "
                "the program filtering on all their pids, the events split between them; "
                "undisturbed (nobody reading) then kernelscope live at each events per call; "
                "producer M ev/s = all events / (first start to last end); IRQ work on every CPU",
                und, _run_table([r for r in mpsc if r.scenario == "undisturbed"], "undisturbed", rates),
                "", _run_table([r for r in mpsc if r.scenario == "live"], "live", rates),
                *_contention_notes(rates),
                "  reader CPU % = the Probe's CPU time while the producers ran / their seconds: on a "
                "machine with a producer on every CPU that time is taken from them"]
    if by["drain"]:
        out += ["", "DRAIN: a buffer filled while nobody reads, then drained into memory "
                f"(Python: a DataFrame; libbpf: a C array), {cfg.drain_per_call} events per call; "
                "M rec/s = records / drain time",
                und, _run_table(by["drain"], "drain", rates)]
    if by["overflow"]:
        out += ["", f"OVERFLOW: perf buffers of {fmt_size(cfg.overflow_size)}/CPU overrun live "
                f"({cfg.overflow_per_call} events per call): are the losses reported?",
                und, _run_table(by["overflow"], "overflow", rates)]
    if by["latency"]:
        out += ["", f"LATENCY: one producer paced at each rate (1 event per call, spinning on "
                f"CLOCK_MONOTONIC between calls) for {cfg.latency_seconds:g} s, kernelscope with every "
                "Probe default (poll interval, wake-ups; the program's "
                f"{fmt_size(cfg.target_size)} ring, 64 pages/CPU perf); latency = ks_arrival_ns (when "
                "the read that brought the event returned) - the event's ts (bpf_ktime_get_ns), both "
                "CLOCK_MONOTONIC", und, _latency_table(by["latency"])]
    out += list(extra)
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
    out += [f"  {t.verdict}  {t.name}: {t.detail}" for t in targets(runs, cfg.target_size, sends)]
    return "\n".join(out)



def write_json(path: Path, runs: Sequence[Result], cfg: Config, machine: dict[str, Any],
               sends: Sequence[Any] = (), *, dfs: Sequence[Any] = ()) -> dict[str, Any]:
    """The figures as JSON (what `--compare` reads); returns the document written."""
    from .send import ratio as send_ratio

    def section(scenario: str) -> list[dict[str, Any]]:
        return [r.as_json() for r in runs if r.scenario == scenario and r.producers == 1]

    doc = {
        "version": 2,
        "machine": machine,
        "config": asdict(cfg),
        "event_size": EVENT_SIZE,
        "undisturbed": section("undisturbed"),
        # the single-producer ring's, by events per call (version 1's key)
        "undisturbed_events_per_s": {str(k): round(v, 1) for k, v in undisturbed_rates(runs).items()},
        # every undisturbed rate: "<kind>/<producers>p/<per call>pc"
        "undisturbed_rates": {f"{kind}/{n}p/{k}pc": round(v, 1)
                              for (kind, n, k), v in all_undisturbed(runs).items()},
        "live": section("live"),
        "drain": section("drain"),
        "overflow": section("overflow"),
        "mpsc": [r.as_json() for r in runs if r.producers > 1],
        "latency": section("latency"),
        "df": [d.as_json() for d in dfs],
        "send": [s.as_json() for s in sends],
        "ratios": {**ratios(runs),
                   **({"send/userring/kernelscope_vs_libbpf": send_ratio(list(sends))} if sends else {})},
        "targets": [{"name": t.name, "passed": t.passed, "detail": t.detail}
                    for t in targets(runs, cfg.target_size, sends)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return doc
