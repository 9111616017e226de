"""The panel's events area: an output map's latest rows, and the top values of a chosen column.

Both read only the newest chunks of the map's store (`FrameStore.tail_chunks`, sliced to the
rows wanted; and the newest spilled segments when memory holds fewer rows than wanted): the
latest N rows for the table (what `probe.frame(name).tail(N)` gives), and the latest WINDOW
rows for the top-N (`value_counts()` of one column, decoded alone), so a refresh costs the
same after a billion events as after a thousand, and no whole DataFrame is built. The top-N
says which rows it counted: all stored rows while they fit the window, else the latest WINDOW
of them.
"""

from __future__ import annotations

import html
import threading
from typing import Any

import ipywidgets as w
import numpy as np
import pandas as pd

from ..readers.batch import concat_records
from ..results import Results
from ..schema import CPU, c_strings
from .mapview import _cell

LATEST_N = 10  # rows in the latest-rows table
TOP_N = 10  # values in the top-N table
MAX_N = 1_000  # most rows either table shows (HTML sent to the page at every refresh)
WINDOW = 50_000  # latest rows the top-N counts: the bound on a refresh's cost


def tail_parts(results: Results, name: str, n: int) -> dict[str, Any]:
    """The latest `n` stored rows of output map `name`: records, seq, arrival_ns, cpu (or None).

    Only the newest chunks are touched, and of the oldest of them only the rows wanted. When
    memory holds fewer than `n` rows and older ones were spilled to disk, the newest segments
    are read back, as many as the rest needs.
    """
    ms = results.outputs[name]
    store = ms.store
    picked = store.tail_chunks(n)
    if sum(len(c.records) for c in picked) < n and store.spilled_rows:
        picked = store.since(max(0, store.received - n))[1]  # the newest segments read back too
    left, parts = n, []
    for c in reversed(picked):
        take = min(left, len(c.records))
        if take <= 0:
            break
        lo = len(c.records) - take
        parts.append((c, lo))
        left -= take
    parts.reverse()
    dtype = ms.schema.dtype
    records = concat_records([c.records[lo:] for c, lo in parts], dtype)
    seq = (np.concatenate([np.arange(c.seq0 + lo, c.seq0 + len(c.records), dtype=np.int64)
                           for c, lo in parts]) if parts else np.empty(0, np.int64))
    arrival = (np.concatenate([c.arrival_ns[lo:] for c, lo in parts]) if parts else np.empty(0, np.int64))
    cpu = None
    if parts and all(c.cpu is not None for c, _ in parts):
        cpu = np.concatenate([c.cpu[lo:] for c, lo in parts if c.cpu is not None])
    return {"records": records, "seq": seq, "arrival_ns": arrival, "cpu": cpu}


def latest(results: Results, name: str, n: int) -> pd.DataFrame:
    """The latest `n` rows of output map `name`, with the columns (and values) of its frame."""
    t = tail_parts(results, name, n)
    return results.outputs[name].schema.frame(t["records"], t["seq"], t["arrival_ns"], t["cpu"])


def countable(results: Results, name: str) -> list[str]:
    """Columns a top-N can count: the event's scalar fields (numbers, char[] strings, nested
    members as `outer.inner`) and, for a perf buffer, the CPU; not arrays, not unions' bytes."""
    ms = results.outputs[name]
    out: list[str] = []

    def walk(dtype: np.dtype, prefix: str) -> None:
        for field in dtype.names or ():
            sub = dtype.fields[field][0]  # type: ignore[index]
            if sub.names:
                walk(sub, f"{prefix}{field}.")
            elif not sub.shape:
                out.append(prefix + field)

    walk(ms.schema.dtype, "")
    if ms.schema.per_cpu:
        out.append(CPU)
    return out


def default_column(results: Results, name: str) -> str | None:
    """The first countable column that is not a timestamp (counting those shows nothing)."""
    cols = countable(results, name)
    tf = results.outputs[name].schema.time_field
    return next((c for c in cols if c != tf), cols[0] if cols else None)


def column_values(parts: dict[str, Any], column: str) -> np.ndarray:
    """One column of `tail_parts` rows as stored (char[] still bytes: see `counts`)."""
    if column == CPU:
        cpu = parts["cpu"]
        return cpu if cpu is not None else np.full(len(parts["records"]), -1, np.int16)
    col = parts["records"]
    for field in column.split("."):
        col = col[field]
    return np.asarray(col)


def value_counts(values: np.ndarray) -> pd.Series:
    """How often each value occurs, most frequent first; char[] values as the frame's str.

    char[] columns are counted as raw bytes first and only the distinct values are cut at
    their NUL and decoded (decoding every row costs ~6x the count), then merged: two raw
    values with different bytes after the NUL are the same C string.
    """
    if values.dtype.kind != "S":
        return pd.Series(values).value_counts()
    size = values.dtype.itemsize
    if not len(values) or not size:
        return pd.Series([], dtype=object).value_counts()
    raw, n = np.unique(np.ascontiguousarray(values).view(f"V{size}"), return_counts=True)
    text = np.char.decode(c_strings(raw.view(values.dtype)), "utf-8", "replace").astype(object)
    return pd.Series(n, index=text).groupby(level=0, sort=False).sum().sort_values(ascending=False,
                                                                                  kind="stable")


def top_values(results: Results, name: str, column: str, n: int,
               window: int = WINDOW) -> tuple[pd.DataFrame, int]:
    """The `n` most frequent values of `column` in the latest `window` rows of map `name`, with
    their counts and share; and how many rows were counted."""
    parts = tail_parts(results, name, window)
    values = column_values(parts, column)
    counted = value_counts(values).head(n)
    rows = len(values)
    out = pd.DataFrame({column: counted.index, "rows": counted.to_numpy(),
                        "share": counted.to_numpy() / rows if rows else np.zeros(len(counted))})
    return out, rows


def latest_html(name: str, df: pd.DataFrame, stored: int) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v, False)}</td>" for v in r) + "</tr>"
                   for r in df.itertuples(index=False))
    return (f"<div class='ks-events-latest'><b>{html.escape(name)}</b>: the latest {len(df):,} of "
            f"{stored:,} stored rows <span style='color:#6b7280'>(<code>.frame({name!r}).tail({len(df)})"
            f"</code>)</span><table class='ks-events-rows'><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def top_html(name: str, column: str, df: pd.DataFrame, counted: int, stored: int) -> str:
    which = (f"all {stored:,} stored rows" if counted >= stored
             else f"the latest {counted:,} of {stored:,} rows")
    body = "".join(f"<tr><td>{_cell(v, False)}</td><td>{int(k):,}</td><td>{s:.1%}</td></tr>"
                   for v, k, s in df.itertuples(index=False))
    return (f"<div class='ks-events-top'><b>{html.escape(name)}</b>: top {len(df):,} "
            f"<code>{html.escape(column)}</code> values in {which}"
            f"<table class='ks-events-topn'><thead><tr><th>{html.escape(column)}</th><th>rows</th>"
            f"<th>share</th></tr></thead><tbody>{body}</tbody></table></div>")


class EventView(w.VBox):
    """The events area of a Panel: `refresh()` redraws both tables when rows or choices changed."""

    def __init__(self, results: Results, n: int = LATEST_N, top: int = TOP_N, window: int = WINDOW) -> None:
        self.results = results
        self.window = window
        self.reads = 0  # refreshes that read the store (tests: none while nothing changes)
        self.error: BaseException | None = None
        self.rows: pd.DataFrame | None = None  # the latest rows shown
        self.top_rows: pd.DataFrame | None = None  # the top-N shown
        self._lock = threading.RLock()  # the updater thread, the controls' handlers, static_html
        self._key: tuple[Any, ...] | None = None
        style = {"description_width": "initial"}
        maps = list(results.outputs)
        self.choose = w.Dropdown(options=maps, value=maps[0] if maps else None, description="events of",
                                 style=style, layout=w.Layout(width="auto"))
        self.choose.add_class("ks-events-choose")
        self.n = w.BoundedIntText(value=n, min=1, max=MAX_N, description="latest", style=style,
                                  layout=w.Layout(width="9em"))
        self.n.add_class("ks-events-n")
        cols = countable(results, maps[0]) if maps else []
        self.column = w.Dropdown(options=cols, value=default_column(results, maps[0]) if maps else None,
                                 description="top by", style=style, layout=w.Layout(width="auto"))
        self.column.add_class("ks-events-column")
        self.top = w.BoundedIntText(value=top, min=1, max=MAX_N, description="top N", style=style,
                                    layout=w.Layout(width="9em"))
        self.top.add_class("ks-events-topn-n")
        self.latest_table = w.HTML(layout=w.Layout(width="100%"))
        self.latest_table.add_class("ks-events-latest-area")
        self.top_table = w.HTML(layout=w.Layout(width="100%"))
        self.top_table.add_class("ks-events-top-area")
        self.choose.observe(self._on_map, names="value")
        for c in (self.n, self.column, self.top):
            c.observe(lambda _c: self.refresh(), names="value")
        head = w.HBox([self.choose, self.n, self.column, self.top], layout=w.Layout(flex_flow="row wrap"))
        super().__init__([head, self.latest_table, self.top_table], layout=w.Layout(width="100%"))
        self.add_class("ks-events")

    def _on_map(self, change: dict[str, Any]) -> None:
        name = change["new"]
        if name is None:
            return
        with self._lock:
            self.column.options = countable(self.results, name)
            self.column.value = default_column(self.results, name)
        self.refresh()

    def read(self) -> tuple[str, str]:
        """Both tables as HTML, read now from the chosen map's newest chunks."""
        name = self.choose.value
        if name is None:
            return "<p>no output maps</p>", ""
        store = self.results.outputs[name].store
        stored = len(store)
        rows = latest(self.results, name, int(self.n.value))
        self.rows = rows
        self.reads += 1
        top = ""
        column = self.column.value
        if column is not None:
            self.top_rows, counted = top_values(self.results, name, column, int(self.top.value), self.window)
            top = top_html(name, column, self.top_rows, counted, stored)
        return latest_html(name, rows, stored), top

    def refresh(self) -> None:
        """Redraw if rows arrived or went, or a choice changed; an error shows in the area."""
        with self._lock:
            name = self.choose.value
            store = self.results.outputs[name].store if name is not None else None
            key = (name, self.n.value, self.column.value, self.top.value,
                   *((store.received, len(store)) if store is not None else ()))
            if key == self._key:
                return
            try:
                latest_text, top_text = self.read()
            except Exception as e:
                self.error = e
                self.latest_table.value = (f"<p style='color:#b91c1c'>"
                                           f"{html.escape(f'{type(e).__name__}: {e}')}</p>")
                self._key = None
                return
            self.error = None
            self._key = key
            self.latest_table.value, self.top_table.value = latest_text, top_text

    def static_html(self) -> str:
        """Both tables, read now, for the final static rendering."""
        with self._lock:
            try:
                latest_text, top_text = self.read()
            except Exception as e:
                return f"<p>{html.escape(f'{type(e).__name__}: {e}')}</p>"
        return f"<div class='ks-events-static'>{latest_text}{top_text}</div>"
