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



def write_json(path: Path, runs: Sequence[Result], cfg: Config, machine: dict[str, Any],
               sends: Sequence[Any] = ()) -> None:
    from .send import ratio as send_ratio

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
