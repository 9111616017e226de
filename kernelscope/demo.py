"""`kernelscope demo`: a real probe for a few seconds, a summary table, an HTML report and a capture.

Attaches exec/exit/openat tracepoints, makes some activity of its own so the run is never
empty, drains into a DataFrame and prints who did what. Writes a self-contained HTML report
(plotly embedded: it opens offline) with the program, the host and kernel, each output map's
accounting (attempted = received + dropped, checked), event rates and delivery latency, and
beside it `capture.parquet`, the run's capture, with the lines that replay it.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import host, sources
from .captures.atomic import check_destination, write_text
from .errors import KernelscopeError, SettingError
from .probe import Probe

KINDS = {0: "exec", 1: "exit", 2: "openat"}
PROGRAM = "exec_exit_openat.c"
OUTPUT = "events"  # the program's one output map
RATE_BIN_S = 0.1
COLOURS = {"exec": "#2563eb", "exit": "#ea580c", "openat": "#059669"}  # the same in every plot
OTHER_COLOUR = "#6b7280"


def _activity(stop_at: float) -> None:
    """A few short processes that exec, open files and exit."""
    while time.monotonic() < stop_at:
        subprocess.run(["ls", "/proc/self"], capture_output=True, check=False)
        subprocess.run(["cat", "/proc/loadavg"], capture_output=True, check=False)
        time.sleep(0.05)


# --- what the run says ----------------------------------------------------------------------

def kind_names(kinds: pd.Series) -> pd.Series:
    """Event kind codes as names (exec, exit, openat); a code the program should not emit
    shows as "kind N" instead of vanishing from the counts."""
    names = kinds.map(KINDS)
    return names.where(names.notna(), "kind " + kinds.astype(str))


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Events per process name and kind, busiest first."""
    names = list(KINDS.values())
    if df.empty:
        return pd.DataFrame(columns=[*names, "total"])
    table = pd.crosstab(df["comm"], kind_names(df["kind"]))
    for k in names:
        if k not in table:
            table[k] = 0
    table = table[names + sorted(set(table.columns) - set(names))]
    table.columns.name = None
    table["total"] = table.sum(axis=1)
    return table.sort_values("total", ascending=False)


def by_kind(df: pd.DataFrame) -> pd.Series:
    """Events per kind name, every kind of KINDS listed (zero when none arrived)."""
    counts = kind_names(df["kind"]).value_counts() if len(df) else pd.Series(dtype=np.int64)
    return counts.reindex(list(KINDS.values()) + sorted(set(counts.index) - set(KINDS.values())),
                          fill_value=0).astype(np.int64)


def accounting(stats: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per output map: attempted, received, dropped and whether attempted = received + dropped.

    After stop() the final drain has read everything the program wrote, so nothing may be in
    flight: any difference is a miscount, reported rather than hidden.
    """
    rows = []
    for name, st in stats.items():
        attempted, received, dropped = int(st["attempted"]), int(st["received"]), int(st["dropped"])
        rows.append({"map": name, "kind": st.get("kind", ""), "capacity_bytes": st.get("capacity_bytes"),
                     "attempted": attempted, "received": received, "dropped": dropped,
                     "lost_records": st.get("lost_records"),
                     "holds": attempted == received + dropped})
    return rows


def latencies_us(df: pd.DataFrame) -> pd.DataFrame:
    """Each event's delivery latency in microseconds, with its kind name.

    ks_arrival_ns is time.monotonic_ns() when the read that brought the event returned; `ts`
    is bpf_ktime_get_ns() when the program ran: both CLOCK_MONOTONIC, so no conversion.
    """
    us = (df["ks_arrival_ns"].to_numpy(np.int64) - df["ts"].to_numpy(np.uint64).astype(np.int64)) / 1e3
    return pd.DataFrame({"kind": kind_names(df["kind"]).to_numpy(), "latency_us": us})


def _by_kind(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Rows grouped by kind name, in KINDS order (exec, exit, openat), other names after."""
    groups = {str(k): g for k, g in frame.groupby("kind", sort=False)}
    order = [k for k in KINDS.values() if k in groups] + sorted(set(groups) - set(KINDS.values()))
    return [(k, groups[k]) for k in order]


def latency_table(lat: pd.DataFrame) -> pd.DataFrame:
    """Median, p90, p99 and max delivery latency (us) per kind and over all events."""
    groups = [(k, g["latency_us"]) for k, g in _by_kind(lat)] + [("all", lat["latency_us"])]
    rows = {k: {"events": len(v), "p50_us": v.median(), "p90_us": v.quantile(0.9),
                "p99_us": v.quantile(0.99), "max_us": v.max()} for k, v in groups if len(v)}
    return pd.DataFrame.from_dict(rows, orient="index")


def host_facts(probe: Probe) -> dict[str, str]:
    """Where the run happened: the machine, its kernel, the headers BCC compiled with, versions."""
    from . import __version__

    release = host.kernel_release()
    headers = host.find_headers()
    if headers is None:
        used = "none found (BCC could not have compiled)" if probe.backend == "bcc" else "not used (CO-RE)"
    else:
        used = f"{headers.version} ({headers.build})"
        if not headers.matches_kernel:
            used += (f": not the running kernel's ({release}); this program reads only tracepoint "
                     "args and helpers, which stay right, never kernel structs")
    btf = Path("/sys/kernel/btf/vmlinux")
    return {
        "hostname": socket.gethostname(),
        "kernel release": release,
        "kernel version": platform.version(),
        "architecture": platform.machine(),
        "kernel headers": used,
        "BTF": str(btf) if btf.exists() else "none (no /sys/kernel/btf/vmlinux)",
        "backend": probe.backend,
        "BCC": host.bcc_version() or "not importable",
        "Python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "CPUs": str(os.cpu_count() or "?"),
        "kernelscope": __version__,
        "run at (UTC)": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def replay_code(capture: Path, report: Path | None) -> str:
    """The Python lines that replay `capture` (named relative to the report's folder when
    it sits there, as `kernelscope demo` writes it)."""
    shown = capture.name if report is not None and capture.parent.resolve() == report.parent.resolve() \
        else str(capture.resolve())
    return (
        "from kernelscope.captures.replay import replay\n"
        "from kernelscope.demo import KINDS\n"
        f"r = replay({shown!r}, speed=None).start()  # speed=1.0: at the recorded pace\n"
        f"df, stats = r.df, r.stats[{OUTPUT!r}]\n"
        'df["kind"].map(KINDS).value_counts()  # exec / exit / openat\n'
    )


# --- the report -------------------------------------------------------------------------------

CSS = """
body{font-family:Helvetica,Arial,sans-serif;color:#1f2937;max-width:1040px;margin:24px auto;padding:0 16px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #e5e7eb;padding:3px 8px;
text-align:right}th{background:#f3f4f6}td.l,th.l{text-align:left}.ok{color:#047857}.bad{color:#b91c1c;
font-weight:bold}pre{background:#f8f8f8;padding:8px;overflow-x:auto;font-size:12px}h2{margin-top:28px}
"""


def source_html(source: str) -> str:
    """The C source, highlighted with inline styles (no stylesheet to fetch), or plain."""
    try:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import CLexer
    except ImportError:
        return f"<pre>{html.escape(source)}</pre>"
    return str(highlight(source, CLexer(), HtmlFormatter(noclasses=True)))


def _table(frame: pd.DataFrame, index: str, plain: tuple[str, ...] = ()) -> str:
    """An HTML table; numbers get thousands separators except in the `plain` columns (ids)."""
    head = f"<th class='l'>{html.escape(index)}</th>" + "".join(f"<th>{html.escape(str(c))}</th>"
                                                            for c in frame.columns)
    body = "".join("<tr><td class='l'>" + html.escape(str(i)) + "</td>"
                   + "".join(f"<td>{html.escape(str(v)) if c in plain else _fmt(v)}</td>"
                             for c, v in zip(frame.columns, row, strict=True)) + "</tr>"
                   for i, row in zip(frame.index, frame.itertuples(index=False), strict=True))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{v:,}"
    if isinstance(v, (float, np.floating)):
        return "-" if math.isnan(v) else f"{v:,.1f}"
    return html.escape(str(v))


def accounting_html(rows: list[dict[str, Any]]) -> str:
    out = ["<table id='ks-accounting'><thead><tr><th class='l'>map</th><th class='l'>type</th><th>buffer</th>"
           "<th>attempted</th><th>received</th><th>dropped</th><th>lost records reported</th>"
           "<th class='l'>attempted = received + dropped</th></tr></thead><tbody>"]
    for r in rows:
        check = (f"<span class='ok'>holds: {r['attempted']:,} = {r['received']:,} + {r['dropped']:,}</span>"
                 if r["holds"] else
                 f"<span class='bad'>does not hold: {r['attempted']:,} &ne; {r['received']:,} + "
                 f"{r['dropped']:,} (off by {r['attempted'] - r['received'] - r['dropped']:,})</span>")
        cap = r["capacity_bytes"]
        lost = _fmt(r["lost_records"]) if r["kind"] == "perf" else "n/a (ring)"  # only perf reports losses
        out.append(
            f"<tr data-map='{html.escape(r['map'])}' data-attempted='{r['attempted']}' "
            f"data-received='{r['received']}' data-dropped='{r['dropped']}' data-holds='{int(r['holds'])}'>"
            f"<td class='l'>{html.escape(r['map'])}</td><td class='l'>{html.escape(str(r['kind']))}</td>"
            f"<td>{f'{cap // 1024:,} KiB' if cap else '-'}</td><td>{r['attempted']:,}</td>"
            f"<td>{r['received']:,}</td><td>{r['dropped']:,}</td><td>{lost}</td>"
            f"<td class='l'>{check}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _style(fig: Any, title: str, xtitle: str, ytitle: str) -> Any:
    fig.update_layout(template="none", title=title, height=360, margin={"l": 60, "r": 20, "t": 50, "b": 50},
                      xaxis_title=xtitle, yaxis_title=ytitle, legend={"orientation": "h", "y": -0.2})
    return fig


def _colour(kind: str) -> str:
    return COLOURS.get(kind, OTHER_COLOUR)


def rate_figure(df: pd.DataFrame, started_ns: int, drain: dict[str, np.ndarray] | None) -> Any:
    """Events per second: on top, all kinds as the drain counted them (received, and dropped,
    from its counter samples: `drain` is plots.rates()); below, one row per kind, received
    events in RATE_BIN_S bins of event time (one row each, as openat outnumbers exec 20:1)."""
    from plotly.subplots import make_subplots

    kinds = list(by_kind(df).index)
    fig = make_subplots(rows=1 + len(kinds), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=["all kinds (the drain's counters)", *kinds])
    if drain is not None:
        fig.add_scatter(x=drain["t"], y=drain["received"], name="received", mode="lines",
                        line={"color": "#374151"}, row=1, col=1)
        fig.add_scatter(x=drain["t"], y=drain["dropped"], name="dropped", mode="lines",
                        line={"dash": "dash", "color": "#dc2626"}, row=1, col=1)
    s = (df["ts"].to_numpy(np.uint64).astype(np.int64) - started_ns) / 1e9
    # the gate opens at load, a moment before start() stamps started_at: earlier events count too
    first = min(math.floor(float(s.min()) / RATE_BIN_S) * RATE_BIN_S if len(s) else 0.0, 0.0)
    end = max(float(s.max()) if len(s) else 0.0, first + RATE_BIN_S)
    edges = np.arange(first, end + RATE_BIN_S, RATE_BIN_S)
    names = kind_names(df["kind"]).to_numpy()
    for row, kind in enumerate(kinds, start=2):
        counts, _ = np.histogram(s[names == kind], bins=edges)
        fig.add_scatter(x=edges, y=np.append(counts, 0) / RATE_BIN_S, name=f"{kind} received", mode="lines",
                        line={"shape": "hv", "color": _colour(kind)}, row=row, col=1)
        fig.update_yaxes(title_text="events/s", rangemode="tozero", row=row, col=1)
    fig.update_yaxes(title_text="events/s", rangemode="tozero", row=1, col=1)
    fig.update_xaxes(title_text="seconds since start", row=1 + len(kinds), col=1)
    fig.update_layout(template="none", height=170 * (1 + len(kinds)) + 80,
                      title=f"Events per second (kinds: {RATE_BIN_S * 1000:g} ms bins of event time)",
                      margin={"l": 60, "r": 20, "t": 60, "b": 50}, legend={"orientation": "h", "y": -0.08})
    return fig


def latency_figure(lat: pd.DataFrame) -> Any:
    """Histogram of delivery latency per kind on log-spaced bins (1 us .. 1 s), each kind as
    shares of its own events so that 60 exits show beside 3,000 openats."""
    import plotly.graph_objects as go

    from .jupyter.plots import LATENCY_EDGES_US as edges

    fig = go.Figure()
    for kind, g in _by_kind(lat):
        counts, _ = np.histogram(np.clip(g["latency_us"], edges[0], edges[-1]), bins=edges)
        fig.add_scatter(x=edges, y=np.append(counts, 0) / len(g), name=f"{kind} ({len(g):,} events)",
                        mode="lines", line={"shape": "hv", "color": _colour(str(kind))})
    fig = _style(fig, "Delivery latency: ks_arrival_ns - ts (both CLOCK_MONOTONIC)", "microseconds",
                 "share of the kind's events")
    fig.update_xaxes(type="log")
    fig.update_yaxes(tickformat=".1%", rangemode="tozero")
    return fig


def report_html(df: pd.DataFrame, stats: Mapping[str, Mapping[str, Any]], summary: pd.DataFrame,
                seconds: float, *, source: str, facts: Mapping[str, str], started_ns: int,
                drain: dict[str, np.ndarray] | None = None, capture: Path | None = None,
                report: Path | None = None) -> str:
    """The whole report as one HTML page; plotly.js is inlined once, so it opens offline."""
    import plotly.express as px

    rows = accounting(stats)
    lat = latencies_us(df)
    kinds = by_kind(df)
    top = (summary.head(15).rename_axis("comm").reset_index()
           .melt(id_vars="comm", value_vars=list(kinds.index), var_name="kind", value_name="events"))
    colours = {k: _colour(k) for k in kinds.index}
    bars = _style(px.bar(top, x="comm", y="events", color="kind", color_discrete_map=colours),
                  "Events by process (top 15)", "process (comm)", "events")
    config = {"displaylogo": False}
    plots = (rate_figure(df, started_ns, drain).to_html(full_html=False, include_plotlyjs=True,
                                                          div_id="ks-rate-plot", config=config)
             + latency_figure(lat).to_html(full_html=False, include_plotlyjs=False,
                                           div_id="ks-latency-plot", config=config))
    latest = df.tail(20).assign(kind=kind_names(df["kind"].tail(20)))
    latest = latest[["ks_seq", "ks_time", "pid", "comm", "kind"]].set_index("ks_seq")
    verdict = ("every output map's accounting holds" if all(r["holds"] for r in rows)
               else "<span class='bad'>the accounting does NOT hold for "
                    + ", ".join(html.escape(r["map"]) for r in rows if not r["holds"]) + "</span>")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>kernelscope demo</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>kernelscope demo: exec, exit and openat on this kernel</h1>",
        f"<p>{len(df):,} events in {seconds:g} s on {html.escape(facts.get('hostname', '?'))}, kernel "
        f"{html.escape(facts.get('kernel release', '?'))}; {verdict}.</p>",
        "<h2>Host and kernel</h2><table id='ks-host'><tbody>",
        *(f"<tr><th class='l'>{html.escape(k)}</th><td class='l'>{html.escape(v)}</td></tr>"
          for k, v in facts.items()),
        "</tbody></table>",
        "<h2>Accounting per output map</h2>",
        "<p>attempted: records the program tried to write (its own per-CPU counter); received: "
        "records the reader took out of the buffer; dropped: writes the kernel refused because the "
        "buffer was full. The probe is stopped and drained, so attempted must equal received + dropped.</p>",
        accounting_html(rows),
        "<h2>Events by kind</h2>", _table(kinds.rename("events").to_frame().T, ""),
        "<h2>Rates and latency</h2>", plots,
        "<p>Latency = ks_arrival_ns (time.monotonic_ns() when the read that brought the event "
        "returned) - ts (bpf_ktime_get_ns() when the program ran); both are CLOCK_MONOTONIC, so "
        "the difference is how long the event waited in the ring buffer before user space had it.</p>",
        _table(latency_table(lat), "kind") if len(lat) else "<p>No events, no latency.</p>",
        "<h2>Who did what</h2>",
        bars.to_html(full_html=False, include_plotlyjs=False, config=config),
        _table(summary.head(30), "comm"),
        "<h2>The latest events</h2>", _table(latest, "ks_seq", plain=("pid",)),
        f"<h2>The program ({html.escape(PROGRAM)})</h2>",
        f"<div id='ks-source'>{source_html(source)}</div>",
    ]
    if capture is not None:
        size = capture.stat().st_size if capture.exists() else 0
        parts += [
            "<h2>The capture</h2>",
            f"<p>Every received event, the counters over time and the program are in "
            f"<code>{html.escape(str(capture.resolve()))}</code> ({size:,} bytes), kernelscope's capture "
            "format. Replay it anywhere kernelscope is installed, no BPF or root needed (run Python in "
            "the folder that holds it):</p>",
            f"<pre id='ks-replay'>{html.escape(replay_code(capture, report))}</pre>",
        ]
    parts.append("</body></html>")
    return "".join(parts)


# --- the run ----------------------------------------------------------------------------------

def check_paths(report: Path | None, capture: Path | None) -> None:
    """Refuse paths that would fail only after the run: SettingError (the report) or
    CaptureError (the capture) saying why."""
    if report is not None:
        folder = report.parent
        if report.is_dir():
            raise SettingError(f"report {report} is a folder: give a file name, "
                               f"e.g. {report / 'report.html'}")
        if not folder.is_dir():
            raise SettingError(f"report {report}: the folder {folder} does not exist (mkdir -p {folder})")
        if not os.access(folder, os.W_OK):
            raise SettingError(f"report {report}: cannot write in {folder}")
    if capture is not None:
        check_destination(capture)


def run(seconds: float = 3.0, report: Path | None = Path("report.html"),
        capture: Path | None = None) -> tuple[pd.DataFrame, dict]:
    """Trace for `seconds`, print the summary, write `report` and `capture` (by default
    capture.parquet beside the report; with no report, only when given)."""
    from .jupyter import plots

    if not (math.isfinite(seconds) and seconds > 0):
        raise SettingError(f"seconds must be a positive number, got {seconds!r}")
    if capture is None and report is not None:
        capture = report.parent / "capture.parquet"
    check_paths(report, capture)
    source = sources.read(PROGRAM)
    probe = Probe(source, name="demo")
    try:
        probe.start()
        print(
            f"attached to {', '.join(probe.attach_points())}; tracing for {seconds:g} s ...", file=sys.stderr
        )
        _activity(time.monotonic() + seconds)
        probe.stop()
        df, stats = probe.df, probe.stats
        started_ns = int((probe.started_at or 0) * 1e9)
        drain = plots.rates(probe, OUTPUT)
        facts = host_facts(probe)
        if capture is not None:
            probe.save(capture)
    finally:
        probe.close()
    summary = summarize(df)
    print()
    for row in accounting(stats):
        print(f"{row['map']}: attempted {row['attempted']:,} = received {row['received']:,} "
              f"+ dropped {row['dropped']:,}: " + ("holds" if row["holds"] else "DOES NOT HOLD"))
    print("events by kind: " + ", ".join(f"{k} {n:,}" for k, n in by_kind(df).items()))
    if len(df):
        lat = latency_table(latencies_us(df)).loc["all"]
        print(f"delivery latency: median {lat['p50_us']:,.0f} us, p99 {lat['p99_us']:,.0f} us")
    print()
    print(summary.head(15).to_string())
    if capture is not None:
        print(f"\ncapture: {capture.resolve()} ({capture.stat().st_size:,} bytes); replay it with:\n")
        print("    " + replay_code(capture, report).rstrip("\n").replace("\n", "\n    "))
    if report is not None:
        page = report_html(df, stats, summary, seconds, source=source, facts=facts, started_ns=started_ns,
                           drain=drain, capture=capture, report=report)
        write_text(report, page)
        print(f"\nreport: {report.resolve()} ({report.stat().st_size / 1e6:.1f} MB, opens offline)")
    return df, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kernelscope demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="how long to trace (default 3)")
    ap.add_argument("-o", "--report", type=Path, default=Path("report.html"), help="HTML report path")
    ap.add_argument("--capture", type=Path, default=None,
                    help="capture file (.parquet; default: capture.parquet beside the report)")
    args = ap.parse_args(argv)
    if not (math.isfinite(args.seconds) and args.seconds > 0):
        ap.error(f"--seconds must be a positive number of seconds, got {args.seconds:g}")
    capture = args.capture or args.report.parent / "capture.parquet"
    try:
        check_paths(args.report, capture)
    except KernelscopeError as e:
        ap.error(str(e))
    try:
        df, stats = run(args.seconds, args.report, capture)
    except KernelscopeError as e:
        print(f"kernelscope demo: {e}", file=sys.stderr)
        return 1
    return 0 if len(df) and all(r["holds"] for r in accounting(stats)) else 1
