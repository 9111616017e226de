"""`kernelscope bench --compare OLD.json [NEW.json]`: each figure's ratio new/old.

Pure functions over two bench JSON documents (what `--json` writes): `figures` flattens one
into {name: (value, better)}, `compare` pairs two and flags the figures that got worse by
more than the noise. The noise per figure is the larger of NOISE (this project's VMs,
measured between back-to-back full runs of the same commit) and the spread of its own
interleaved rounds in either run (`extra.attempts`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# Run-to-run noise by kind of figure on this project's 2-core VMs, same commit, quiet guest:
# a producer's speed drifts by up to a third (the host's other guests), within-run ratios
# by ~25 %, latencies by 2x (a poll interval's phase, scheduling), the store's frame() times
# by ~50 % (page faults, the allocator), memory per event not at all. With other work on
# the guest (three benches at once: 50-78 % of the CPUs) absolute figures moved 0.2x-1.5x
# between two --quick runs of one commit: then only the ratios mean anything, and the
# report says so (BUSY).
NOISE = {"rate": 0.33, "ratio": 0.25, "latency": 1.0, "df_time": 0.5, "memory": 0.02}
HIGHER, LOWER = "higher", "lower"  # which way is better
SECTIONS = ("undisturbed", "live", "drain", "overflow", "mpsc")


@dataclass
class Change:
    name: str
    old: float
    new: float
    better: str  # HIGHER or LOWER
    noise: float  # a relative change within this is noise

    @property
    def ratio(self) -> float:
        return self.new / self.old if self.old else float("inf")

    @property
    def worse(self) -> bool:
        if self.better == HIGHER:
            return self.ratio < 1 - self.noise
        return self.ratio > 1 + self.noise


def _run_name(x: dict[str, Any]) -> str:
    size = x["size"]
    size_s = f"{size // (1 << 20)}MiB" if size >= 1 << 20 else f"{size // 1024}KiB"
    mpsc = f"/mpsc{x['producers']}" if x.get("producers", 1) > 1 else ""
    return f"{x['scenario']}{mpsc}/{x['kind']}/{size_s}/{x['consumer']}/{x['per_call']}pc"


def _spread(x: dict[str, Any]) -> float:
    """(fastest - slowest) / fastest over a run's rounds: its own noise."""
    rates = [a["events_per_s"] for a in x.get("extra", {}).get("attempts", [])
             if a.get("error") is None and a.get("events_per_s")]
    return (max(rates) - min(rates)) / max(rates) if len(rates) > 1 else 0.0


def figures(doc: dict[str, Any]) -> dict[str, tuple[float, str, float]]:
    """{name: (value, which way is better, own noise)} for every figure in a bench JSON."""
    out: dict[str, tuple[float, str, float]] = {}
    for section in SECTIONS:
        for x in doc.get(section, []):
            if x.get("error") is None and x.get("events_per_s"):
                out[f"{_run_name(x)} ev/s"] = (x["events_per_s"], HIGHER, _spread(x))
    for x in doc.get("latency", []):
        name = f"latency/{x['kind']}/{x['pace']:.0f}ev/s"
        for stat, value in (x.get("extra", {}).get("latency_us") or {}).items():
            if stat != "max" and x.get("error") is None:
                out[f"{name} {stat} us"] = (value, LOWER, 0.0)
    for x in doc.get("df", []):
        if x.get("error") is None:
            out[f"df/{x['rows']}rows frame() after {x['new_rows']} new s"] = (x["frame_s"], LOWER, 0.0)
            out[f"df/{x['rows']}rows cold frame() s"] = (x["first_frame_s"], LOWER, 0.0)
            out[f"df/{x['rows']}rows bytes/event"] = (x["bytes_per_event"], LOWER, 0.0)
    for x in doc.get("send", []):
        if x.get("error") is None and x.get("samples_per_s"):
            out[f"send/{x['writer']} samples/s"] = (x["samples_per_s"], HIGHER, 0.0)
    # within-run ratios (kernelscope / libbpf, / the undisturbed producer): the host's speed
    # cancels out of them, so they stay comparable when the host was busy in one run
    for name, value in doc.get("ratios", {}).items():
        if value:
            out[f"ratio {name}"] = (value, HIGHER, 0.0)
    return out


def _noise_kind(name: str) -> str:
    if name.startswith("ratio "):
        return "ratio"
    if name.startswith("latency/"):
        return "latency"
    if name.endswith("bytes/event"):
        return "memory"
    if name.startswith("df/"):
        return "df_time"
    return "rate"


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every figure present in both runs, in the new run's order."""
    a, b = figures(old), figures(new)
    out = []
    for name, (value, better, spread) in b.items():
        if name not in a or not a[name][0]:
            continue
        noise = max(NOISE[_noise_kind(name)], spread, a[name][2])
        out.append(Change(name, a[name][0], value, better, noise))
    return out


def busy_note(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """A caveat when other work took over BUSY of the CPUs during either run."""
    from .config import BUSY

    busy = [(label, doc.get("machine", {}).get("busy_during", 0.0))
            for label, doc in (("old", old), ("new", new))]
    loaded = [f"{label} {share:.0%}" for label, share in busy if share > BUSY]
    if not loaded:
        return None
    return ("  NOTE: other work used " + " and ".join(loaded) + " of the CPUs during the run: its "
            "absolute figures reflect that load; judge by the within-run ratios (`ratio ...`)")


def report(changes: Iterable[Change], old_label: str, new_label: str, note: str | None = None) -> list[str]:
    changes = list(changes)
    worse = [c for c in changes if c.worse]
    lines = ["", f"COMPARE: new ({new_label}) / old ({old_label}), same figure; WORSE: moved the bad "
             "way by more than the noise (the larger of this host's run-to-run noise for that kind "
             "of figure and the spread of the figure's own rounds)",
             f"  {'figure':<64} {'old':>12} {'new':>12} {'new/old':>8}  noise"]
    for c in changes:
        flag = "  WORSE" if c.worse else ""
        lines.append(f"  {c.name:<64} {c.old:>12.4g} {c.new:>12.4g} {c.ratio:>7.2f}x  "
                     f"±{c.noise:.0%}{flag}")
    lines.append(f"  {len(worse)} of {len(changes)} figures worse beyond the noise"
                 + (": " + ", ".join(c.name for c in worse) if worse else ""))
    return lines + ([note] if note else [])
