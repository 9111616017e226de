"""The panel's maps area: one aggregation map's top-N keys, and its histogram, following the probe.

A dropdown picks one of `results.maps.aggregations()`; the panel's refresh reads that map
once (`maps[name].frame()`: batch lookups, from the updater thread, at the panel's interval
and skipped with the plots while the browser is still drawing) and shows

- the N keys with the largest first numeric value column (N settable, default TOP_N), and
- for a map `hist()` can read (BCC `BPF_HISTOGRAM`, a `slot` key field, or a `slots` array
  value) a plotly bar chart of its histogram, updated in place.

After stop() `frame()` is the stop-time snapshot, and in a replay the captured one, so the
area shows those. The bar chart is its own FigureWidget (plotly.js, ~5 MB, once more to the
browser), made only when a histogram map is first chosen.
"""

from __future__ import annotations

import html
import threading
from typing import Any

import ipywidgets as w
import numpy as np
import pandas as pd

from ..errors import KernelscopeError
from ..hist import Histogram, from_map_frame
from ..maps import types
from ..maps.table import ARRAYS, Spec
from ..results import Results

TOP_N = 10
MAX_TOP = 1_000
# an array map of integers read as BPF_HISTOGRAM slots: BCC's default has 64; a larger array
# is more likely a table of counters than a histogram
MAX_SLOTS = 1_024


def names(results: Results) -> list[str]:
    """The maps the area can show; none before the program is loaded."""
    try:
        return results.maps.aggregations()
    except KernelscopeError:
        return []


def is_histogram(spec: Spec) -> bool:
    """True for the map layouts `Map.hist()` reads (hist.from_map_frame)."""
    k, v = spec.key_dtype, spec.value_dtype
    if v.names and "slots" in v.names and v["slots"].shape:
        return True
    if k.names and "slot" in k.names:
        return True
    return (spec.kind in ARRAYS and k.names is None and v.names is None and k.kind in "ui"
            and v.kind in "ui" and not v.shape and spec.max_entries <= MAX_SLOTS)


def sort_column(spec: Spec, df: pd.DataFrame) -> str | None:
    """The first value column holding scalar numbers: what the top-N ranks by."""
    keys = set(types.key_columns(spec.key_dtype))
    for col in df.columns:
        if col not in keys and pd.api.types.is_numeric_dtype(df[col].dtype):
            return str(col)
    return None


def top(df: pd.DataFrame, n: int, by: str | None) -> pd.DataFrame:
    """The `n` rows with the largest `by` (ties in the frame's order); the first `n` without `by`."""
    if by is None:
        return df.head(n)
    return df.sort_values(by, ascending=False, kind="stable").head(n)


def _cell(v: Any, grouped: bool) -> str:
    if isinstance(v, np.ndarray | list | tuple):
        a = np.asarray(v)
        text = f"[{', '.join(str(x) for x in a.ravel()[:8])}{', ...' if a.size > 8 else ''}]"
    elif grouped and isinstance(v, (int, np.integer)):  # counts, not keys (a pid reads 4242)
        text = f"{int(v):,}"
    else:
        text = str(v)
    return html.escape(text)


def table_html(name: str, df: pd.DataFrame, rows: pd.DataFrame, by: str | None, *, source: str,
               keys: list[str]) -> str:
    """The top-N rows as an HTML table (no script: saved notebooks show it); `keys`: key columns."""
    grouped = [c not in keys for c in rows.columns]
    order = f"by {html.escape(by)}" if by else "in key order"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v, g)}</td>" for v, g in zip(r, grouped, strict=True))
                   + "</tr>" for r in rows.itertuples(index=False))
    return (f"<div class='ks-maps-table'><b>{html.escape(name)}</b>: top {len(rows):,} of {len(df):,} keys "
            f"{order} <span style='color:#6b7280'>({source})</span>"
            f"<table class='ks-maps-top'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


class MapView(w.VBox):
    """The maps area of a Panel: `refresh()` reads the chosen map and redraws; `reads` counts reads."""

    def __init__(self, results: Results, n: int = TOP_N) -> None:
        self.results = results
        self.reads = 0
        self._lock = threading.RLock()  # the updater thread, the controls' handlers, static_html
        self._resyncing = False  # options being replaced: the dropdown's own change is not a refresh
        self.error: BaseException | None = None
        self.frame: pd.DataFrame | None = None  # the last read, as maps[name].frame() gave it
        self.rows: pd.DataFrame | None = None  # the top-N rows shown
        self.hist: Histogram | None = None  # the chosen map's histogram, when it has one
        style = {"description_width": "initial"}
        choices = names(results)
        self.choose = w.Dropdown(options=choices, value=choices[0] if choices else None, description="map",
                                 style=style, layout=w.Layout(width="auto"))
        self.choose.add_class("ks-maps-choose")
        self.top = w.BoundedIntText(value=n, min=1, max=MAX_TOP, description="top N", style=style,
                                    layout=w.Layout(width="9em"))
        self.top.add_class("ks-maps-n")
        self.table = w.HTML(layout=w.Layout(width="100%"))
        self.table.add_class("ks-maps-area")
        self.figure: Any = None  # a FigureWidget, made when a histogram map is first shown
        self.choose.observe(lambda _c: None if self._resyncing else self.refresh(), names="value")
        self.top.observe(lambda _c: self.refresh(), names="value")
        self.showing_hist = False  # the bar chart is among the children
        self._head = w.HBox([self.choose, self.top])
        super().__init__([self._head, self.table], layout=w.Layout(width="100%"))
        self.add_class("ks-maps")

    @property
    def name(self) -> str | None:
        return self.choose.value

    def _source(self) -> str:
        maps = self.results.maps
        if maps.replay:
            return "captured snapshot"
        return "stop-time snapshot" if self.name and maps.snapshot(self.name) is not None else "live"

    def read(self) -> tuple[str, Histogram | None]:
        """Read the chosen map once: (table HTML, histogram or None); sets frame, rows, hist."""
        name = self.name
        if name is None:
            return "<p>no aggregation maps</p>", None
        m = self.results.maps[name]
        df = m.frame()
        self.reads += 1
        by = sort_column(m.spec, df)
        rows = top(df, int(self.top.value), by)
        h = None
        if is_histogram(m.spec):
            try:
                h = from_map_frame(df, layout="log2", name=name)  # what maps[name].hist() gives
            except KernelscopeError:  # e.g. BCC's rule finds counts in slot 0: not a log2l histogram
                h = None
        self.frame, self.rows, self.hist = df, rows, h
        keys = types.key_columns(m.spec.key_dtype)
        return table_html(name, df, rows, by, source=self._source(), keys=keys), h

    def _resync(self) -> None:
        """The dropdown's maps again: reconfigure() loads a new program, whose maps may differ."""
        try:
            choices = names(self.results)
        except Exception:
            return
        if list(self.choose.options) != choices:
            keep = self.choose.value if self.choose.value in choices else (choices[0] if choices else None)
            self._resyncing = True
            try:
                self.choose.options = choices
                self.choose.value = keep
            finally:
                self._resyncing = False

    def refresh(self) -> None:
        """Read the chosen map and update the table and the bar chart; any error is shown in
        the table (the updater thread must not die of one)."""
        with self._lock:
            self._resync()
            try:
                text, h = self.read()
            except Exception as e:
                self.error = e
                self.table.value = f"<p style='color:#b91c1c'>{html.escape(f'{type(e).__name__}: {e}')}</p>"
                return
            self.error = None
            self.table.value = text
            self._draw(h)

    def _draw(self, h: Histogram | None) -> None:
        if h is None:
            if self.showing_hist:
                self.children = [self._head, self.table]
                self.showing_hist = False
            return
        fig = h.plot(title=f"{self.name}: {h.total:,} counts")
        if self.figure is None:
            from plotly.graph_objects import FigureWidget

            self.figure = FigureWidget(fig)
            self.figure.add_class("ks-maps-hist")
        target = self.figure
        same = len(fig.data) == len(target.data) and all(
            a.name == b.name for a, b in zip(fig.data, target.data, strict=True))
        with target.batch_update():
            if same:
                for new, old in zip(fig.data, target.data, strict=True):
                    old.x, old.y, old.customdata = new.x, new.y, new.customdata
            else:
                target.data = ()
                target.add_traces(list(fig.data))
            target.layout.title.text = fig.layout.title.text
            target.layout.xaxis.title.text = fig.layout.xaxis.title.text
            target.layout.showlegend = fig.layout.showlegend
        if not self.showing_hist:
            self.children = [self._head, self.table, target]
            self.showing_hist = True

    def bars(self) -> dict[str, list[int]]:
        """The bar chart's heights per trace (tests: what the page is sent)."""
        if self.figure is None or not self.showing_hist:
            return {}
        return {t.name: [int(y) for y in t.y] for t in self.figure.data}

    def static_html(self) -> str:
        """The chosen map's top-N table and histogram (CSS bars), read now, for the static output."""
        with self._lock:
            try:
                text, h = self.read()
            except Exception as e:
                return f"<p>{html.escape(f'{type(e).__name__}: {e}')}</p>"
        return f"<div class='ks-maps-static'>{text}{h._repr_html_() if h is not None else ''}</div>"

    def close(self) -> None:
        if self.figure is not None:
            self.figure.close()
        super().close()
