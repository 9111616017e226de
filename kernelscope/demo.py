"""`kernelscope demo`: a real probe for a few seconds, a summary table and an HTML report.

Attaches exec/exit/openat tracepoints, makes some activity of its own so the run is never
empty, drains into a DataFrame, prints who did what, and writes a self-contained HTML
report with plots (plotly, embedded: it opens offline).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from . import sources
from .errors import KernelscopeError
from .probe import Probe

KINDS = {0: "exec", 1: "exit", 2: "openat"}


def _activity(stop_at: float) -> None:
    """A few short processes that exec, open files and exit."""
    while time.monotonic() < stop_at:
        subprocess.run(["ls", "/proc/self"], capture_output=True, check=False)
        subprocess.run(["cat", "/proc/loadavg"], capture_output=True, check=False)
        time.sleep(0.05)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Events per process name and kind, busiest first."""
    if df.empty:
        return pd.DataFrame(columns=["exec", "exit", "openat", "total"])
    kinds = df["kind"].map(KINDS)
    table = pd.crosstab(df["comm"], kinds)
    for k in KINDS.values():
        if k not in table:
            table[k] = 0
    table = table[list(KINDS.values())]
    table["total"] = table.sum(axis=1)
    return table.sort_values("total", ascending=False)


def report_html(df: pd.DataFrame, stats: dict, summary: pd.DataFrame, seconds: float) -> str:
    import plotly.express as px

    top = (
        summary.head(15)
        .reset_index()
        .melt(id_vars="comm", value_vars=list(KINDS.values()), var_name="kind", value_name="events")
    )
    bars = px.bar(top, x="comm", y="events", color="kind", title="Events by process (top 15)")
    per_s = df.assign(kind=df["kind"].map(KINDS), second=df["ks_time"].dt.floor("100ms"))
    rate = per_s.groupby(["second", "kind"]).size().rename("events").reset_index()
    line = px.line(rate, x="second", y="events", color="kind", title="Events per 100 ms")
    st = stats["events"]
    facts = (
        f"<p>{len(df):,} events in {seconds:.1f} s; attempted {st['attempted']:,} = received "
        f"{st['received']:,} + dropped {st['dropped']:,}; ring buffer {st['capacity_bytes'] // 1024} KiB.</p>"
    )
    return (
        "<html><head><meta charset='utf-8'><title>kernelscope demo</title></head><body>"
        "<h1>kernelscope demo: exec, exit and openat on this kernel</h1>"
        + facts
        + bars.to_html(full_html=False, include_plotlyjs=True)
        + line.to_html(full_html=False, include_plotlyjs=False)
        + "<h2>Summary</h2>"
        + summary.head(30).to_html()
        + "</body></html>"
    )


def run(seconds: float = 3.0, report: Path | None = Path("report.html")) -> tuple[pd.DataFrame, dict]:
    probe = Probe(sources.read("exec_exit_openat.c"), name="demo")
    try:
        probe.start()
        print(
            f"attached to {', '.join(probe.attach_points())}; tracing for {seconds:g} s ...", file=sys.stderr
        )
        _activity(time.monotonic() + seconds)
        probe.stop()
        df, stats = probe.df, probe.stats
    finally:
        probe.close()
    summary = summarize(df)
    st = stats["events"]
    print(
        f"\n{len(df):,} events: attempted {st['attempted']:,} = received {st['received']:,} "
        f"+ dropped {st['dropped']:,}\n"
    )
    print(summary.head(15).to_string())
    if report is not None:
        report.write_text(report_html(df, stats, summary, seconds))
        print(f"\nreport: {report.resolve()}")
    return df, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kernelscope demo", description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0, help="how long to trace (default 3)")
    ap.add_argument("-o", "--report", type=Path, default=Path("report.html"), help="HTML report path")
    args = ap.parse_args(argv)
    try:
        df, _ = run(args.seconds, args.report)
    except KernelscopeError as e:
        print(f"kernelscope demo: {e}", file=sys.stderr)
        return 1
    return 0 if len(df) else 1
