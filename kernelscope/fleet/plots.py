"""Per-host lines of a fleet probe, as plain plotly specs: the live panel and `figure()` share them.

Two rows: each host's received rate (events/s between pulls), then its counts so far, received
(solid, left axis) and dropped (dotted, on its own right-hand axis: a few drops among millions of
events stay visible). One colour per host (per host and map when the probe has several
output maps); the legend names the host, and a click on it hides all of that host's lines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..jupyter.plots import AXIS, ROW_HEIGHT, STYLE, WIDTH, Trace, _colour

if TYPE_CHECKING:
    from .fleet import FleetProbe

MAX_POINTS = 1_000  # samples per host and line (longer runs are strided, the last one kept)
TITLES = ("Received per second, per host",
          "So far, per host: received (solid, left axis) and dropped (dotted, right axis)")


def lines(fp: FleetProbe) -> list[tuple[str, str]]:
    """(host, map) of each host whose probe started (a host that failed to load has no line)."""
    return [(h, m) for h in fp.workers for m in fp.host_stats.get(h, {})]


def _strided(part: pd.DataFrame, max_points: int) -> pd.DataFrame:
    if len(part) <= max_points:
        return part
    step = -(-len(part) // max_points)
    keep = np.r_[np.arange(0, len(part) - 1, step), len(part) - 1]  # the latest sample stays
    return part.iloc[list(keep)]


def traces(fp: FleetProbe, max_points: int = MAX_POINTS) -> list[Trace]:
    """Three lines per host and map: rate (row 1), received and dropped so far (row 2).
    `meta` ("rate:HOST:MAP", "received:...", "dropped:...") is each trace's identity."""
    hist = fp.history()
    keys = lines(fp)
    several = len({m for _, m in keys}) > 1
    out: list[Trace] = []
    for i, (host, name) in enumerate(keys):
        part = _strided(hist[(hist["host"] == host) & (hist["map"] == name)], max_points)
        t = part["t"].to_numpy(np.float64)
        label = f"{host} {name}" if several else host
        colour = _colour(i)
        common = {"legendgroup": label, "line": {"color": colour, "width": 1.5}}
        out += [
            {"type": "scatter", "mode": "lines", "name": label, "meta": f"rate:{host}:{name}",
             "x": t, "y": part["rate"].to_numpy(np.float64), "xaxis": "x", "yaxis": "y", **common},
            {"type": "scatter", "mode": "lines", "name": label, "meta": f"received:{host}:{name}",
             "x": t, "y": part["received"].to_numpy(np.float64), "xaxis": "x2", "yaxis": "y2",
             "showlegend": False, **common},
            {"type": "scatter", "mode": "lines", "name": f"{label} dropped", "meta": f"dropped:{host}:{name}",
             "x": t, "y": part["dropped"].to_numpy(np.float64), "xaxis": "x2", "yaxis": "y3",
             "showlegend": False, **common, "line": {"color": colour, "width": 1.5, "dash": "dot"}},
        ]
    return out


# counts and rates: integer ticks, and 0..5 at least, so an axis with only zeros (no drops yet)
# reads 0 1 2 3 4 5, not 0 0.237 0.475 ...
COUNT_AXIS = {**AXIS, "rangemode": "tozero", "tickformat": ",d", "nticks": 6,
              "autorangeoptions": {"include": [0, 5]}}


def layout(width: int | None = WIDTH) -> dict[str, Any]:
    """Two stacked plots sharing the time axis; `width=None`: as wide as the page (live panel)."""
    out: dict[str, Any] = {
        **STYLE, "height": 2 * ROW_HEIGHT, "margin": {"l": 70, "r": 70, "t": 40, "b": 50},
        "xaxis": {**AXIS, "anchor": "y", "title": {"text": "seconds since start"}},
        "yaxis": {**COUNT_AXIS, "domain": [0.58, 1.0], "title": {"text": "events/s"}},
        "xaxis2": {**AXIS, "anchor": "y2", "matches": "x", "title": {"text": "seconds since start"}},
        "yaxis2": {**COUNT_AXIS, "domain": [0.0, 0.42], "title": {"text": "received"}},
        "yaxis3": {**COUNT_AXIS, "overlaying": "y2", "side": "right", "title": {"text": "dropped"},
                   "showgrid": False},
        "legend": {"title": {"text": "host"}},
        "annotations": [{"text": f"<b>{t}</b>", "xref": "paper", "yref": "paper", "x": 0, "y": y,
                         "xanchor": "left", "yanchor": "bottom", "showarrow": False}
                        for t, y in zip(TITLES, (1.0, 0.42), strict=True)],
    }
    if width is not None:
        out["width"] = width
    return out


def spec(fp: FleetProbe, max_points: int = MAX_POINTS, width: int | None = WIDTH) -> tuple[list[Trace],
                                                                                           dict[str, Any]]:
    return traces(fp, max_points), layout(width)
