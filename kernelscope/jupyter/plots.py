"""Plots of how events reached user space: pure functions from a probe (or replay) to plotly data.

Everything here reads what the drain loop already keeps: the counters it samples about ten
times a second (`MapState.history`), the reload marks, and a bounded tail of the stored
records (the last few thousand rows, sliced from the store's chunks without merging them).
Nothing asks the kernel, so these functions are safe to call from another thread while a
probe drains or reloads, and their cost does not grow with the number of rows received.

    plots.figure("rates", probe)      # a plotly Figure; also "fill", "ordering", "latency"
    plots.overview(probe)             # all of them in one figure (static output)
    plots.static_html(probe)          # that figure as HTML with plotly.js inlined once
    plots.static_png(probe)           # PNG bytes via kaleido, or None when it is missing
"""

from __future__ import annotations

import ast
import base64
import html
import math
import os
import re
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from ..results import Results

PAGE = os.sysconf("SC_PAGE_SIZE")
ORDER_SAMPLE = 5_000  # latest rows drawn in the ordering scatter
LATENCY_SAMPLE = 5_000  # latest rows in the delivery latency distribution
MAX_POINTS = 1_000  # history samples per time series (longer runs are strided)
FIGURES = ("rates", "fill", "ordering", "latency")
LATENCY_EDGES_US = np.logspace(0, 6, 61)  # 1 us .. 1 s, 10 bins per decade
MAP_COLOURS = ("#2563eb", "#ea580c", "#059669", "#7c3aed", "#db2777", "#0891b2")
CPU_COLOURS = ("#2563eb", "#ea580c", "#059669", "#7c3aed", "#ca8a04", "#0891b2", "#db2777", "#65a30d")
LATE_COLOUR = "#dc2626"
TITLES = {
    "rates": "Events per second: received (solid) and dropped (dashed)",
    "fill": "Buffer fill: bytes waiting / buffer size",
    "ordering": "Arrival order against event timestamp",
    "latency": "Delivery latency (timestamp to read)",
}
XTITLES = {"rates": "seconds since start", "fill": "seconds since start", "latency": "microseconds",
           "ordering": "arrival index"}
YTITLES = {"rates": "events/s", "fill": "", "latency": "events", "ordering": "event time (s)"}
WIDTH = 980  # pixels: fits a notebook's output area at common window sizes
ROW_HEIGHT = 300  # pixels per row of plots

Trace = dict[str, Any]
# Styling spelled out with the empty template: plotly's named templates are deep-copied into
# every figure, which costs about a second of GIL per figure and starves the drain thread.
AXIS = {"gridcolor": "#e5e7eb", "zeroline": False, "showline": True, "linecolor": "#9ca3af",
        "ticks": "outside", "tickcolor": "#9ca3af"}
STYLE = {"template": "none", "paper_bgcolor": "white", "plot_bgcolor": "white",
         "font": {"family": "Helvetica, Arial, sans-serif", "size": 11, "color": "#1f2937"}}


# --- what the drain loop kept --------------------------------------------------------------

def map_names(results: Results) -> list[str]:
    return list(results.outputs)


def is_live(results: Results) -> bool:
    """A live probe (its settings can change) rather than a replayed capture."""
    return results.live


def origin_s(results: Results) -> float:
    """Time zero of the plots, in the monotonic clock of the history samples and marks.

    A live probe's samples are monotonic seconds, counted from its start; a replay's are
    already relative to the recording's start.
    """
    if is_live(results):
        started = results.started_at
        if started:
            return float(started)
        for ms in results.outputs.values():
            if ms.history:
                return float(ms.history[0]["t"])
        return 0.0
    return 0.0


def origin_ns(results: Results) -> int:
    """Time zero in the clock of event timestamps (bpf_ktime_get_ns is CLOCK_MONOTONIC)."""
    capture = results.capture
    if capture is not None:
        return int(capture.started_ns)
    return int(origin_s(results) * 1e9)


def history(results: Results, name: str) -> list[dict[str, float]]:
    """The counter samples of map `name`, oldest first, as plain dicts."""
    ms = results.outputs[name]
    if ms.history:
        for _ in range(5):
            try:
                return list(ms.history)  # a C-level copy of references: the drain loop may append
            except RuntimeError:  # "deque mutated during iteration"
                continue
        return []
    if is_live(results):
        return []
    frame = results.history(name)  # a replay: the recorded samples up to its current time
    return cast("list[dict[str, float]]", frame.to_dict("records")) if len(frame) else []


def capacity_bytes(ms: Any) -> int:
    """Buffer size of a map's current reader (perf: all CPUs), from its page count if closed."""
    reader = ms.reader
    if reader is not None and not reader.closed:
        cap = int(reader.capacity_bytes)
        if cap:
            return cap
    cpus = (os.cpu_count() or 1) if ms.om.kind == "perf" else 1
    return int(ms.pages) * PAGE * cpus


def summary(results: Results) -> dict[str, dict[str, Any]]:
    """Per map: the numbers the panel shows, read from the drain loop's bookkeeping only.

    `Probe.stats` reads the program's counters from the kernel, which must not race with a
    reload in another thread; the last history sample has the same counters (<= 0.1 s old).
    A replay's stats are already plain data.
    """
    out: dict[str, dict[str, Any]] = {}
    stats = {} if is_live(results) else results.stats
    for name, ms in list(results.outputs.items()):
        if not is_live(results):
            st = dict(stats.get(name, {}))
            st.setdefault("pages", ms.pages)
            st.setdefault("reloads", len(ms.marks))
            out[name] = st
            continue
        last = ms.history[-1] if ms.history else {}
        order = ms.order
        out[name] = {
            "kind": ms.om.kind,
            "pages": ms.pages,
            "capacity_bytes": capacity_bytes(ms),
            # from the same sample as attempted and dropped, so a running probe's row adds up
            # (the store runs up to 0.1 s ahead); stop() takes a last sample: exact then
            "received": int(last["received"]) if "received" in last else ms.store.received,
            "stored": len(ms.store),
            "attempted": int(last.get("attempted", 0)),
            "dropped": int(last.get("dropped", 0)),
            "lost_records": int(ms.lost_records),
            "fill_bytes": int(last.get("fill_bytes", 0)),
            "inversions": order.inversions if order is not None else None,
            "max_inversion_ns": order.max_inversion_ns if order is not None else None,
            "reloads": len(ms.marks),
        }
    return out


def tail(results: Results, name: str, n: int) -> dict[str, np.ndarray | None]:
    """The latest `n` stored rows of map `name`: seq, arrival_ns, cpu and the time field.

    Only the last chunks of the store are touched (FrameStore merges all its chunks when a
    whole frame is asked for, which costs O(rows) under the GIL).
    """
    ms = results.outputs[name]
    store = ms.store
    tf = ms.schema.time_field
    picked = store.tail_chunks(n)
    rows = sum(len(c.records) for c in picked)
    if not picked:
        empty = np.empty(0, np.int64)
        return {"seq": empty, "arrival_ns": empty, "ts": empty if tf else None, "cpu": None}
    skip = max(rows - n, 0)
    seq = np.concatenate([np.arange(c.seq0, c.seq0 + len(c.records), dtype=np.int64) for c in picked])[skip:]
    arrival = np.concatenate([c.arrival_ns for c in picked])[skip:]
    ts = (np.concatenate([c.records[tf].astype(np.int64) for c in picked])[skip:] if tf else None)
    cpus = [c.cpu for c in picked]
    cpu = None
    if all(c is not None for c in cpus):
        cpu = np.concatenate([c for c in cpus if c is not None])[skip:].astype(np.int64)
    return {"seq": seq, "arrival_ns": arrival, "ts": ts, "cpu": cpu}


# --- derived data ----------------------------------------------------------------------------

def _strided(samples: Sequence[dict[str, float]], max_points: int) -> list[dict[str, float]]:
    if len(samples) <= max_points:
        return list(samples)
    step = math.ceil(len(samples) / max_points)
    picked = list(samples[::step])
    if picked[-1] is not samples[-1]:
        picked.append(samples[-1])
    return picked


def rates(results: Results, name: str, max_points: int = MAX_POINTS) -> dict[str, np.ndarray]:
    """Received, dropped and lost events per second between history samples."""
    samples = _strided(history(results, name), max_points)
    if len(samples) < 2:
        empty = np.empty(0)
        return {"t": empty, "received": empty, "dropped": empty, "lost": empty}
    t = np.array([s["t"] for s in samples], dtype=float)
    dt = np.diff(t)
    dt[dt <= 0] = np.nan
    out = {"t": t[1:] - origin_s(results)}
    for key, col in (("received", "received"), ("dropped", "dropped"), ("lost", "lost_records")):
        v = np.array([s.get(col, 0) for s in samples], dtype=float)
        out[key] = np.clip(np.nan_to_num(np.diff(v) / dt), 0, None)
    return out


def fill(results: Results, name: str, max_points: int = MAX_POINTS) -> dict[str, np.ndarray]:
    """Bytes waiting in the buffer as a fraction of its size (at the time), over time."""
    samples = _strided(history(results, name), max_points)
    t = np.array([s["t"] for s in samples], dtype=float)
    waiting = np.array([s.get("fill_bytes", 0) for s in samples], dtype=float)
    cap = capacity_at(results, name, t)
    own = np.array([s.get("capacity_bytes") or np.nan for s in samples], dtype=float)
    cap = np.where(np.isnan(own), cap, own)  # a sample that knows its buffer size wins
    return {"t": t - origin_s(results), "fraction": waiting / cap, "bytes": waiting}


def capacity_at(results: Results, name: str, times: np.ndarray) -> np.ndarray:
    """Buffer size of map `name` at each of `times`, rebuilt from the reload marks.

    Each "pages A -> B" mark says what the size was before it; NaN where that is unknown
    (a ring buffer's size as first declared, when pages were not given).
    """
    ms = results.outputs[name]
    now = capacity_bytes(ms) if is_live(results) else int(
        summary(results).get(name, {}).get("capacity_bytes") or ms.pages * PAGE or 0)
    per_page = now / ms.pages if ms.pages else np.nan
    caps = np.full(len(times), float(now) if now else np.nan)
    for m in reversed(list(ms.marks)):
        before = _pages_before(str(m["what"]), name, ms.om.kind)
        if before is not None:
            caps[times < float(m["t"])] = before * per_page
    return caps


def _pages_before(what: str, name: str, kind: str) -> float | None:
    """Pages of map `name` before the change a mark describes; None if they did not change."""
    for part in what.split("; "):
        m = re.fullmatch(r"pages (.+) -> (.+)", part)
        if not m:
            continue
        old, new = (_pages_value(x) for x in m.groups())
        old_n = old.get(name) if isinstance(old, dict) else old
        new_n = new.get(name) if isinstance(new, dict) else new
        if old_n == new_n:
            return None
        if old_n is None:  # "default": perf buffers get 64 pages a CPU; a ring, what it declared
            return 64.0 if kind == "perf" else np.nan
        return float(old_n)
    return None


def _pages_value(text: str) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None  # "default"
    return value if isinstance(value, (int, dict)) else None


def ordering(results: Results, name: str, sample: int = ORDER_SAMPLE) -> dict[str, Any] | None:
    """The latest rows: arrival index against event time, and which arrived out of order.

    A row is out of order when an earlier arrival carries a later timestamp (the same rule
    as OrderTracker, within the sample). None when the map's events have no time field.
    """
    t = tail(results, name, sample)
    ts = t["ts"]
    if ts is None:
        return None
    late = np.zeros(len(ts), dtype=bool)
    if len(ts) > 1:
        prior = np.maximum.accumulate(ts)[:-1]
        late[1:] = ts[1:] < prior
    return {
        "seq": t["seq"],
        "s": (ts - origin_ns(results)) / 1e9,
        "cpu": t["cpu"],
        "late": late,
        "rows": len(ts),
        "inversions": int(late.sum()),
    }


def latency(results: Results, name: str, sample: int = LATENCY_SAMPLE) -> dict[str, Any] | None:
    """Distribution of (arrival - event timestamp) over the latest rows, in microseconds.

    Both are CLOCK_MONOTONIC: the drain loop stamps each read with time.monotonic_ns() and
    bpf_ktime_get_ns() reads the same clock. A reorder window adds its hold time here.
    """
    t = tail(results, name, sample)
    ts = t["ts"]
    if ts is None:
        return None
    edges = LATENCY_EDGES_US
    us = (t["arrival_ns"] - ts) / 1e3
    counts, _ = np.histogram(np.clip(us, edges[0], edges[-1]), bins=edges)
    return {
        "edges": edges,
        "counts": counts,
        "rows": len(us),
        "p50": float(np.median(us)) if len(us) else math.nan,
        "p99": float(np.percentile(us, 99)) if len(us) else math.nan,
    }


def marks(results: Results) -> list[tuple[float, str]]:
    """(seconds since start, what changed) for every reload, once per change (not per map)."""
    seen: dict[float, str] = {}
    for ms in results.outputs.values():
        for m in list(ms.marks):
            seen.setdefault(float(m["t"]), str(m["what"]))
    t0 = origin_s(results)
    return sorted((t - t0, what) for t, what in seen.items())


def short_mark(what: str) -> str:
    """A reload mark's text made short: only the map sizes that changed, ns as ms."""
    parts = []
    for part in what.split("; "):
        m = re.fullmatch(r"pages (.+) -> (.+)", part)
        if m:
            try:
                old, new = (ast.literal_eval(x) if x.startswith("{") else x for x in m.groups())
            except (ValueError, SyntaxError):
                old, new = m.groups()
            if isinstance(new, dict):
                before = old if isinstance(old, dict) else {}
                parts += [f"{k} {before.get(k, old if not isinstance(old, dict) else '?')}->{v}p"
                          for k, v in new.items() if before.get(k) != v]
                continue
            parts.append(f"pages {old}->{new}")
            continue
        m = re.fullmatch(r"reorder_ns (\w+) -> (\w+)", part)
        if m:
            parts.append("reorder " + "->".join(_ns_label(x) for x in m.groups()))
            continue
        parts.append(part.replace(" -> ", "->"))
    return ", ".join(parts)


def _ns_label(text: str) -> str:
    if text == "None":
        return "off"
    try:
        return f"{int(text) / 1e6:g}ms"
    except ValueError:
        return text


# --- traces (plain dicts, cheap to rebuild a few times a second) ------------------------------

def _colour(i: int) -> str:
    return MAP_COLOURS[i % len(MAP_COLOURS)]


def _trace(name: str, key: str, x: Any, y: Any, **props: Any) -> Trace:
    """A scatter trace spec; `meta` is its stable identity across refreshes (plotly owns `uid`).

    Arrays go out as float64: a widget sends numpy arrays as binary buffers, and the browser
    has no plain typed array for int64 (plotly.js would read NaN).
    """
    mode = "markers" if "marker" in props else "lines"
    return {"type": "scatter", "mode": mode, "name": name, "meta": key,
            "x": np.asarray(x, dtype=np.float64), "y": np.asarray(y, dtype=np.float64), **props}


def rates_traces(results: Results, max_points: int = MAX_POINTS) -> list[Trace]:
    out: list[Trace] = []
    for i, name in enumerate(map_names(results)):
        r = rates(results, name, max_points)
        out.append(_trace(f"{name} received/s", f"{name}:received", r["t"], r["received"],
                          line={"color": _colour(i)}, legendgroup=name))
        out.append(_trace(f"{name} dropped/s", f"{name}:dropped", r["t"], r["dropped"],
                          line={"color": _colour(i), "dash": "dash"}, legendgroup=name))
    return out


def fill_traces(results: Results, max_points: int = MAX_POINTS) -> list[Trace]:
    out: list[Trace] = []
    for i, name in enumerate(map_names(results)):
        f = fill(results, name, max_points)
        # drawn in percent with a "%" suffix: plotly then picks as many decimals as the axis
        # range needs (a fixed ".0%" read "0%, 0%, 0%" below 1 % fill, the usual case)
        out.append(_trace(f"{name} fill", f"{name}:fill", f["t"], f["fraction"] * 100,
                          line={"color": _colour(i)}, customdata=f["bytes"], showlegend=False,
                          legendgroup=name,
                          hovertemplate="%{y:.3~r}% (%{customdata:,.0f} bytes)"
                          f"<extra>{html.escape(name)}</extra>"))
    return out


def ordering_traces(results: Results, name: str, sample: int = ORDER_SAMPLE) -> list[Trace]:
    """One map's latest rows: a trace per CPU (perf buffer) or one (ring), then the late rows."""
    o = ordering(results, name, sample)
    if o is None:
        return []
    i = map_names(results).index(name)
    seq, secs, cpu = o["seq"], o["s"], o["cpu"]
    out: list[Trace] = []
    if cpu is not None and results.outputs[name].om.kind == "perf":
        for c in sorted(int(x) for x in np.unique(cpu)):
            sel = cpu == c
            colour = CPU_COLOURS[c % len(CPU_COLOURS)]
            out.append(_trace(f"{name} CPU {c}", f"{name}:cpu{c}", seq[sel], secs[sel],
                              marker={"size": 3, "color": colour}))
    else:
        out.append(_trace(f"{name} (one buffer)", f"{name}:all", seq, secs,
                          marker={"size": 3, "color": _colour(i)}))
    late = o["late"]
    ring = {"size": 7, "color": LATE_COLOUR, "symbol": "circle-open", "line": {"width": 1}}
    out.append(_trace(f"{name} out of order", f"{name}:late", seq[late], secs[late], marker=ring))
    return out


def ordering_title(results: Results, name: str, sample: int = ORDER_SAMPLE) -> str:
    o = ordering(results, name, sample)
    kind = results.outputs[name].om.kind
    if o is None:
        return f"{name} ({kind}): no timestamp field"
    return f"{name} ({kind}): {o['inversions']:,} of the latest {o['rows']:,} out of order"


def latency_traces(results: Results, sample: int = LATENCY_SAMPLE) -> list[Trace]:
    out: list[Trace] = []
    for i, name in enumerate(map_names(results)):
        lat = latency(results, name, sample)
        if lat is None:
            continue
        x, y = (lat["edges"], np.append(lat["counts"], 0)) if lat["rows"] else ([], [])
        out.append(_trace(f"{name} latency", f"{name}:latency", x, y,
                          line={"color": _colour(i), "shape": "hv"}, fill="tozeroy", showlegend=False,
                          legendgroup=name))
    return out


def latency_title(results: Results, sample: int = LATENCY_SAMPLE) -> str:
    parts = []
    for name in map_names(results):
        lat = latency(results, name, sample)
        if lat is not None and lat["rows"]:
            parts.append(f"{name} {_us_label(lat['p50'])}/{_us_label(lat['p99'])}")
    return "Delivery latency, median/p99: " + ", ".join(parts) if parts else TITLES["latency"]


def _us_label(us: float) -> str:
    if math.isnan(us):
        return "-"
    if us >= 1000:
        return f"{us / 1000:.3g} ms"
    return f"{us:.3g} us"


def traces(kind: str, results: Any, sample: int = ORDER_SAMPLE, max_points: int = MAX_POINTS) -> list[Trace]:
    """The traces of one of FIGURES; `sample`: latest rows for ordering and latency;
    `max_points`: history samples per time series."""
    if kind == "ordering":
        return [t for name in map_names(results) for t in ordering_traces(results, name, sample)]
    if kind == "latency":
        return latency_traces(results, sample)
    return {"rates": rates_traces, "fill": fill_traces}[kind](results, max_points)


# --- one figure, a grid of plots -------------------------------------------------------------------

def cells(results: Results, kinds: Sequence[str] = FIGURES) -> list[str]:
    """The plots of a grid, in order: ordering takes one cell per output map ("ordering:NAME")."""
    out = []
    for kind in kinds:
        if kind not in FIGURES:
            raise ValueError(f"unknown plot {kind!r}; one of {', '.join(FIGURES)}")
        if kind == "ordering":
            out += [f"ordering:{n}" for n in map_names(results)]
        else:
            out.append(kind)
    return out


def spec(results: Results, kinds: Sequence[str] = FIGURES, sample: int = ORDER_SAMPLE,
         width: int | None = WIDTH, max_points: int = MAX_POINTS) -> tuple[list[Trace], dict[str, Any]]:
    """Traces and layout (plain dicts) of a grid of plots, two a row, each on its own axes.

    The live panel sends these to one FigureWidget (each FigureWidget carries plotly.js, ~5 MB,
    to the browser); the static output renders the same grid. `width=None`: as wide as the
    page makes the plots' container (autosize), for the live panel.
    """
    grid = cells(results, kinds)
    cols = 1 if len(grid) == 1 else 2
    rows = math.ceil(len(grid) / cols)
    layout: dict[str, Any] = {
        **STYLE, "height": ROW_HEIGHT * rows + 60,
        "margin": {"l": 60, "r": 20, "t": 30, "b": 30},
        "legend": {"orientation": "h", "x": 0, "y": -40 / (ROW_HEIGHT * rows), "yanchor": "top",
                   "font": {"size": 10}},
        "annotations": [], "shapes": [],
    }
    if width is None:
        layout["autosize"] = True
    else:
        layout["width"] = width
    layout["height"] += 40  # the legend below the grid
    gap_x, gap_top, gap_bottom = 0.1, 40 / (ROW_HEIGHT * rows), 50 / (ROW_HEIGHT * rows)
    out: list[Trace] = []
    for k, cell in enumerate(grid):
        row, col = divmod(k, cols)
        ax = "" if k == 0 else str(k + 1)
        x0 = col * (1 + gap_x) / cols
        x1 = x0 + (1 - gap_x * (cols - 1)) / cols
        top, bottom = 1 - row / rows - gap_top, 1 - (row + 1) / rows + gap_bottom
        kind, _, name = cell.partition(":")
        xaxis: dict[str, Any] = {**AXIS, "domain": [x0, x1], "anchor": f"y{ax}",
                                 "title": {"text": XTITLES[kind], "standoff": 4}}
        yaxis: dict[str, Any] = {**AXIS, "domain": [bottom, top], "anchor": f"x{ax}",
                                 "title": {"text": YTITLES[kind]}}
        if kind == "latency":
            xaxis["type"] = "log"
        elif kind == "fill":
            yaxis.update(ticksuffix="%", rangemode="tozero", exponentformat="none")
        elif kind == "rates":
            yaxis["rangemode"] = "tozero"
        # the ordering plot's event times keep plotly's own tick format, which has the decimals
        # its range needs (".3f" read "6.615, 6.615" over a 1 ms sample)
        layout[f"xaxis{ax}"], layout[f"yaxis{ax}"] = xaxis, yaxis
        if kind == "ordering":
            title, specs = ordering_title(results, name, sample), ordering_traces(results, name, sample)
        elif kind == "latency":
            title, specs = latency_title(results, sample), latency_traces(results, sample)
        else:
            title, specs = TITLES[kind], traces(kind, results, sample, max_points)
        layout["annotations"].append({"text": html.escape(title), "xref": "paper", "yref": "paper",
                                      "x": (x0 + x1) / 2, "y": top, "xanchor": "center", "yanchor": "bottom",
                                      "showarrow": False, "font": {"size": 12}, "name": f"title:{cell}"})
        out += [{**t, "xaxis": f"x{ax}", "yaxis": f"y{ax}"} for t in specs]
        if kind in ("rates", "fill"):
            shapes, notes = mark_shapes(results, f"x{ax}", f"y{ax} domain")
            layout["shapes"] += shapes
            layout["annotations"] += notes
    return out, layout


def mark_shapes(results: Results, xref: str = "x", yref: str = "y domain") -> tuple[list[Trace], list[Trace]]:
    """Vertical lines (and labels, staggered so neighbours do not overlap) at reloads."""
    shapes, notes = [], []
    for i, (t, what) in enumerate(marks(results)):
        shapes.append({"type": "line", "xref": xref, "yref": yref, "x0": t, "x1": t, "y0": 0, "y1": 1,
                       "line": {"color": "#6b7280", "dash": "dot", "width": 1}})
        notes.append({"xref": xref, "yref": yref, "x": t, "y": 1 - 0.12 * (i % 3), "yanchor": "top",
                      "xanchor": "left", "showarrow": False, "bgcolor": "rgba(255,255,255,0.7)",
                      "text": html.escape(short_mark(what)), "hovertext": html.escape(what),
                      "font": {"size": 10, "color": "#374151"}})
    return shapes, notes


def figure(kind: str, results: Any, sample: int = ORDER_SAMPLE, width: int = WIDTH) -> Any:
    """One of FIGURES (ordering: one plot per output map) as a plotly Figure."""
    import plotly.graph_objects as go

    data, layout = spec(results, [kind], sample, width)
    return go.Figure(data=data, layout=layout)


def overview(results: Results, sample: int = ORDER_SAMPLE) -> Any:
    """Every plot in one plotly Figure: what the panel shows, for static output."""
    import plotly.graph_objects as go

    data, layout = spec(results, FIGURES, sample)
    layout["title"] = {"text": f"kernelscope: {html.escape(_label(results))}", "font": {"size": 14},
                       "x": 0, "xanchor": "left"}
    layout["margin"] = {**layout["margin"], "t": 60}
    layout["height"] += 30
    return go.Figure(data=data, layout=layout)


def state(results: Results) -> str:
    """The probe's state, "stopped" (not the engine's "loaded") once it has run."""
    st = results.state()
    if st == "loaded" and results.started_at:
        return "stopped"
    return str(st)


def _label(results: Results) -> str:
    name = results.name or type(results).__name__
    st = state(results)
    return f"{name} ({st})" if st else name


# --- static output: what nbconvert and GitHub show ------------------------------------------

def stats_table(results: Results) -> str:
    """The panel's numbers as an HTML table."""
    cols = ("kind", "pages", "capacity", "attempted", "received", "dropped", "lost_records", "inversions",
            "reloads")
    rows = []
    for name, st in summary(results).items():
        cap = st.get("capacity_bytes")
        cells = [name, st.get("kind", ""), st.get("pages", ""), _bytes(cap) if cap else "",
                 *(_num(st.get(k)) for k in cols[3:])]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("map", *cols))
    return (f"<table class='ks-stats-table'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _num(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:,}" if isinstance(v, (int, np.integer)) else str(v)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def static_html(results: Results, plotlyjs: bool = True) -> str:
    """Stats table and every plot as one HTML fragment, plotly.js inlined once (works offline).

    plotly.js is about 4.5 MB; `plotlyjs=False` leaves it out for pages that already load it.
    """
    fig = overview(results)
    div = fig.to_html(full_html=False, include_plotlyjs=bool(plotlyjs), config={"displaylogo": False})
    return f"<div class='kernelscope-static'>{stats_table(results)}{div}</div>"


def static_png(results: Results, scale: float = 1.0) -> bytes | None:
    """Every plot as one PNG via kaleido (which drives a local Chromium); None without kaleido.

    kaleido 1.x finds a browser on PATH (Debian's `chromium`) or in $BROWSER_PATH; it never
    downloads one unless asked to (`kaleido.get_chrome`).
    """
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return None
    fig = overview(results)
    try:
        png: bytes = fig.to_image(format="png", scale=scale)
    except Exception:  # no usable browser, or kaleido too old for this plotly
        return None
    return png


def png_html(png: bytes, alt: str = "kernelscope plots") -> str:
    """An <img> with the PNG inlined: GitHub and nbconvert show it without any script."""
    data = base64.b64encode(png).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}' style='max-width:100%'/>"
