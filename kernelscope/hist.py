"""Histograms as BPF programs keep them: log2 or linear slots of counts, one histogram or one per key.

A program counts a value v into a slot; the slot's bounds are fixed by the rule it used.
Both rules in use are floor(log2(v)) computed with shifts, and differ by one:

- libbpf-tools `log2l(u64 v)` (libbpf-tools/bits.bpf.h, and BCC's 32-bit `bpf_log2(u32)` in
  src/cc/export/helpers.h, the same code) gives floor(log2 v), with 0 -> 0: slot 0 holds
  v in [0, 1], slot i >= 1 holds v in [2**i, 2**(i+1) - 1]; slot 63 is the last.
- BCC `bpf_log2l(unsigned long v)` (src/cc/export/helpers.h) returns that plus one: slot 1
  holds v in [0, 1], slot i >= 2 holds v in [2**(i-1), 2**i - 1]; slot 0 is never produced
  and slot 64 is the last. BCC's `print_log2_hist` (src/python/bcc/table.py) prints from
  slot 1 on, with these bounds.

kernelscope stores either as the libbpf-tools layout (a BCC slot i is bucket i - 1), so
`Histogram.log2(counts, rule="bcc")` and `Histogram.log2(counts[1:])` are the same.
A linear histogram (`lhist`-style) counts v into slot (v - start) // step: slot i holds
v in [start + i*step, start + (i+1)*step - 1].

Percentiles and means are estimates: only the bucket is known, not where in it a value lay.
`percentile(q)` finds the bucket holding the value of rank ceil(q/100 * total) (the
nearest-rank percentile, numpy's method="inverted_cdf") and interpolates linearly inside
it, so the true percentile is within that bucket and the error is below the bucket's width
(`percentile_bucket(q)` gives the bounds). `mean()` takes each bucket's midpoint: its error
is at most half the widest occupied bucket.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .errors import KernelscopeError

RULES = ("libbpf-tools", "bcc")
LOG2_SLOTS = 64  # floor(log2(v)) of a u64 is 0..63
MAX_KEYS_SHOWN = 12  # histograms drawn in _repr_html_; the rest are summarised in a line
BAR_COLOUR = "#2563eb"
COLOURS = ("#2563eb", "#ea580c", "#059669", "#7c3aed", "#db2777", "#0891b2", "#ca8a04", "#65a30d")

# Name fragments -> unit, tried in order (map names like "dist_usecs", fields like "delta_ns").
_UNITS = (
    (r"nsecs?|(^|_)ns($|_)", "ns"),
    (r"usecs?|(^|_)us($|_)", "us"),
    (r"msecs?|(^|_)ms($|_)", "ms"),
    (r"kbytes|(^|_)kb($|_)", "KiB"),
    (r"bytes", "bytes"),
)


class HistogramError(KernelscopeError, ValueError):
    """Counts or a map frame that cannot be a histogram of the layout asked for; the message says why."""


def guess_unit(*names: str | None) -> str:
    """The unit a map, field or column name suggests ('usecs' -> 'us', 'delta_ns' -> 'ns'), or ''."""
    for name in names:
        if not name:
            continue
        low = str(name).lower()
        for pattern, unit in _UNITS:
            if re.search(pattern, low):
                return unit
    return ""


def log2_bounds(n: int, rule: str = "libbpf-tools") -> tuple[np.ndarray, np.ndarray]:
    """The inclusive (low, high) bounds of log2 slots 0..n-1 under `rule` (uint64; see the module doc)."""
    if rule not in RULES:
        raise HistogramError(f"log2 rule must be one of {RULES}, not {rule!r}")
    limit = LOG2_SLOTS + (rule == "bcc")
    if n > limit:
        raise HistogramError(f"{n} log2 slots: under the {rule} rule a u64 has only {limit}")
    i = np.arange(n, dtype=np.uint64)
    if rule == "bcc":  # bucket = slot - 1; slot 0 has no values, shown as [0, 0]
        i = np.where(i == 0, np.uint64(0), i - np.uint64(1))
    one = np.uint64(1)
    low = np.where(i == 0, np.uint64(0), one << i)
    high = np.where(i == 63, np.uint64(2**64 - 1), (one << np.minimum(i + one, np.uint64(63))) - one)
    high = np.where(i == 0, one, high)
    if rule == "bcc" and n:
        high[0] = 0
    return low, high


def log2_slot(values: Any, rule: str = "libbpf-tools") -> np.ndarray:
    """The slot of each value under `rule`: floor(log2 v) (0 for v = 0), plus one for BCC's bpf_log2l."""
    v = np.asarray(values)
    if v.size and v.min() < 0:
        raise HistogramError("log2 histograms count values >= 0; this input has negative values")
    v = v.astype(np.uint64)
    slot = np.zeros(v.shape, dtype=np.int64)
    rest = v.copy()
    for shift in (32, 16, 8, 4, 2, 1):  # binary search on the highest set bit, as the BPF code does
        big = rest >= (np.uint64(1) << np.uint64(shift))
        slot += np.where(big, shift, 0)
        rest = np.where(big, rest >> np.uint64(shift), rest)
    return slot + (1 if rule == "bcc" else 0)


def _number(x: Any) -> str:
    return f"{int(x)}"


class Histogram:
    """Counts in buckets with inclusive integer bounds, one row of counts per key (or a single row).

    Build one with `Histogram.log2`, `Histogram.linear`, `Histogram.of` (from raw values) or
    `from_map_frame` (a BPF map read as a DataFrame).
    """

    def __init__(self, low: Any, high: Any, counts: Any, unit: str = "", *, keys: pd.DataFrame | None = None,
                 layout: str = "log2", step: int | None = None, start: int = 0) -> None:
        self.low = np.asarray(low)
        self.high = np.asarray(high)
        c = np.asarray(counts)
        if c.ndim == 1:
            c = c[None, :]
        if c.ndim != 2 or c.shape[1] != len(self.low) or len(self.low) != len(self.high):
            raise HistogramError(f"counts of shape {np.shape(counts)} do not fit {len(self.low)} buckets")
        if c.size and not np.issubdtype(c.dtype, np.integer) and (
                not np.all(np.isfinite(c)) or not np.all(c == np.round(c))):
            raise HistogramError("histogram counts must be whole numbers")
        self.counts = c.astype(np.int64)
        if (self.counts < 0).any():
            raise HistogramError("a histogram bucket has a negative count (a subtraction of a later "
                                 "histogram from an earlier one, or a map cleared in between?)")
        if keys is not None:
            keys = keys.reset_index(drop=True)
            if len(keys) != len(self.counts):
                raise HistogramError(f"{len(keys)} key rows for {len(self.counts)} histograms")
        elif len(self.counts) != 1:
            raise HistogramError(f"{len(self.counts)} rows of counts need a key table naming each")
        self.keys = keys
        self.unit = unit
        self.layout = layout
        self.step = step
        self.start = start

    # --- constructors ------------------------------------------------------------------------
    @classmethod
    def log2(cls, counts: Any, unit: str = "", *, rule: str = "libbpf-tools",
             keys: pd.DataFrame | None = None) -> Histogram:
        """Slot i of `counts` (1-D, or 2-D with one row per row of `keys`) under `rule`:

        "libbpf-tools" (log2l, and BCC's bpf_log2): slot 0 = [0, 1], slot i = [2**i, 2**(i+1) - 1];
        "bcc" (BCC's bpf_log2l, one more): slot 1 = [0, 1], slot i = [2**(i-1), 2**i - 1],
        slot 0 must be empty (bpf_log2l never returns 0).
        """
        c = np.atleast_2d(np.asarray(counts))
        if rule == "bcc" and c.shape[1]:
            if c[:, 0].any():
                raise HistogramError(
                    f"slot 0 holds {int(c[:, 0].sum())} counts, but BCC's bpf_log2l never returns 0: "
                    "the program probably used bpf_log2() or libbpf-tools' log2l(); pass rule='libbpf-tools'")
            c = c[:, 1:]
        low, high = log2_bounds(c.shape[1])
        return cls(low, high, c if keys is not None else c[0], unit, keys=keys, layout="log2")

    @classmethod
    def linear(cls, counts: Any, step: int, start: int = 0, unit: str = "", *,
               keys: pd.DataFrame | None = None) -> Histogram:
        """Slot i of `counts` holds values in [start + i*step, start + (i+1)*step - 1]."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step <= 0:
            raise HistogramError("a linear histogram needs a whole step > 0 (the program's divisor), "
                                 f"not {step!r}")
        c = np.atleast_2d(np.asarray(counts))
        low = start + step * np.arange(c.shape[1], dtype=np.int64)
        return cls(low, low + step - 1, c if keys is not None else c[0], unit, keys=keys, layout="linear",
                   step=int(step), start=int(start))

    @classmethod
    def of(cls, values: Any, layout: str = "log2", step: int | None = None, start: int = 0,
           unit: str = "") -> Histogram:
        """Bucket raw values (an event column) as a BPF program would: log2 (libbpf-tools rule) or linear."""
        v = np.asarray(values)
        if not np.issubdtype(v.dtype, np.number) or v.dtype.kind == "c":
            raise HistogramError(f"histogram values must be numbers, not {v.dtype}")
        v = np.floor(v).astype(np.int64) if v.dtype.kind == "f" else v
        if layout == "log2":
            slots = log2_slot(v)
            n = int(slots.max()) + 1 if slots.size else 1
            return cls.log2(np.bincount(slots, minlength=n), unit)
        if layout == "linear":
            if step is None:
                raise HistogramError("a linear histogram needs step=")
            s = (v.astype(np.int64) - start) // step
            if s.size and s.min() < 0:
                raise HistogramError(f"values below start={start} do not fit a linear histogram "
                                     "starting there")
            n = int(s.max()) + 1 if s.size else 1
            return cls.linear(np.bincount(s, minlength=n), step, start, unit)
        raise HistogramError(f"layout must be 'log2' or 'linear', not {layout!r}")

    # --- what it holds -----------------------------------------------------------------------
    @property
    def total(self) -> int:
        """Every count, over all buckets and keys."""
        return int(self.counts.sum())

    @property
    def totals(self) -> pd.Series:
        """The count of each histogram (indexed by key when there are keys)."""
        return pd.Series(self.counts.sum(axis=1), index=self._index(), name="total")

    def __len__(self) -> int:
        return len(self.counts)

    def _index(self) -> pd.Index:
        if self.keys is None:
            return pd.RangeIndex(1)
        if self.keys.shape[1] == 1:
            return pd.Index(self.keys.iloc[:, 0], name=self.keys.columns[0])
        return pd.MultiIndex.from_frame(self.keys)

    def _span(self, full: bool) -> slice:
        """The buckets shown: from the first to the last non-empty one over all keys (all when `full`)."""
        if full:
            return slice(0, len(self.low))
        used = np.flatnonzero(self.counts.any(axis=0))
        if not len(used):
            return slice(0, 0)
        first = 0 if self.layout == "log2" else int(used[0])  # as the tools print them
        return slice(first, int(used[-1]) + 1)

    def frame(self, full: bool = False) -> pd.DataFrame:
        """Columns (key columns,) low, high, count: buckets from the first to the last non-empty
        (log2: from slot 0, as BCC and libbpf-tools print them); `full=True` for every slot."""
        span = self._span(full)
        low, high = self.low[span], self.high[span]
        n = len(low)
        parts = []
        for r in range(len(self.counts)):
            part = pd.DataFrame({"low": low, "high": high, "count": self.counts[r, span]})
            if self.keys is not None:
                for col in reversed(self.keys.columns):
                    part.insert(0, col, [self.keys[col].iloc[r]] * n)
            parts.append(part)
        out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["low", "high", "count"])
        out.attrs["unit"] = self.unit
        return out

    def items(self) -> Iterator[tuple[Any, Histogram]]:
        """(key, single Histogram) for each key; (None, self) without keys."""
        if self.keys is None:
            yield None, self
            return
        for r, k in enumerate(self._index()):
            yield k, Histogram(self.low, self.high, self.counts[r], self.unit, layout=self.layout,
                               step=self.step, start=self.start)

    def labels(self, span: slice | None = None) -> list[str]:
        """Bucket labels like '16-31 us' (a one-value bucket: '5 us')."""
        s = span or slice(None)
        unit = f" {self.unit}" if self.unit else ""
        return [(f"{_number(lo)}-{_number(hi)}" if lo != hi else _number(lo)) + unit
                for lo, hi in zip(self.low[s], self.high[s], strict=True)]

    # --- estimates ---------------------------------------------------------------------------
    def _per_key(self, values: list[Any]) -> Any:
        if self.keys is None:
            return values[0]
        return pd.Series(values, index=self._index())

    def _bucket_of(self, row: np.ndarray, q: float) -> tuple[int, float]:
        """The bucket holding the nearest-rank q-th percentile and the rank's fraction into it."""
        n = int(row.sum())
        rank = q / 100.0 * n
        cum = np.cumsum(row)
        b = int(np.searchsorted(cum, max(math.ceil(rank), 1)))
        before = int(cum[b] - row[b])
        return b, min(max((rank - before) / row[b], 0.0), 1.0)

    def _check_q(self, q: float) -> None:
        if not 0 <= q <= 100:
            raise HistogramError(f"percentile q must be in [0, 100], not {q!r}")

    def percentile(self, q: float) -> Any:
        """Estimated q-th percentile (0..100): the nearest-rank value's bucket, interpolated linearly.

        The true value lies in `percentile_bucket(q)`, so the error is below the bucket's width.
        NaN for an empty histogram; a Series by key when there are keys.
        """
        self._check_q(q)
        out: list[float] = []
        for row in self.counts:
            if not row.any():
                out.append(math.nan)
                continue
            b, frac = self._bucket_of(row, q)
            lo, hi = float(self.low[b]), float(self.high[b])
            out.append(lo + frac * (hi - lo))
        return self._per_key(out)

    def percentile_bucket(self, q: float) -> Any:
        """(low, high) of the bucket holding the q-th percentile: where the true value lies."""
        self._check_q(q)
        out: list[tuple[int, int] | None] = []
        for row in self.counts:
            if not row.any():
                out.append(None)
                continue
            b, _ = self._bucket_of(row, q)
            out.append((int(self.low[b]), int(self.high[b])))
        return self._per_key(out)

    def mean(self) -> Any:
        """Estimated mean from bucket midpoints; off by at most half the widest occupied bucket."""
        mid = (self.low.astype(float) + self.high.astype(float)) / 2
        out = [float(row @ mid / row.sum()) if row.any() else math.nan for row in self.counts]
        return self._per_key(out)

    # --- arithmetic: merge, and the delta of an interval ----------------------------------
    def _aligned(self, other: Histogram) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                  pd.DataFrame | None]:
        if not isinstance(other, Histogram):
            raise HistogramError(f"a Histogram combines only with a Histogram, not {type(other).__name__}")
        if (self.layout, self.step, self.start) != (other.layout, other.step, other.start):
            raise HistogramError(f"different layouts: {self.layout} step={self.step} start={self.start} and "
                                 f"{other.layout} step={other.step} start={other.start}")
        n = max(len(self.low), len(other.low))
        longer = self if len(self.low) >= len(other.low) else other
        m = min(len(self.low), len(other.low))
        same = np.array_equal(self.low[:m], other.low[:m]) and np.array_equal(self.high[:m], other.high[:m])
        if not same:
            raise HistogramError("the two histograms' buckets differ")
        if (self.keys is None) != (other.keys is None):
            raise HistogramError("one histogram has keys and the other has none")
        if self.keys is None:
            a = np.zeros((1, n), np.int64)
            b = np.zeros((1, n), np.int64)
            a[:, :len(self.low)] = self.counts
            b[:, :len(other.low)] = other.counts
            return longer.low, longer.high, a, b, None
        if list(self.keys.columns) != list(other.keys.columns):  # type: ignore[union-attr]
            raise HistogramError(f"key columns differ: {list(self.keys.columns)} and "
                                 f"{list(other.keys.columns)}")  # type: ignore[union-attr]
        ia, ib = self._index(), other._index()
        union = ia.append(ib[~ib.isin(ia)])
        a = np.zeros((len(union), n), np.int64)
        b = np.zeros((len(union), n), np.int64)
        a[union.get_indexer(ia), :len(self.low)] = self.counts
        b[union.get_indexer(ib), :len(other.low)] = other.counts
        keys = union.to_frame(index=False)
        return longer.low, longer.high, a, b, keys

    def _new(self, low: np.ndarray, high: np.ndarray, counts: np.ndarray,
             keys: pd.DataFrame | None) -> Histogram:
        return Histogram(low, high, counts if keys is not None else counts[0], self.unit, keys=keys,
                         layout=self.layout, step=self.step, start=self.start)

    def __add__(self, other: Histogram) -> Histogram:
        """Counts added bucket by bucket (and key by key: a key in only one side keeps its counts)."""
        low, high, a, b, keys = self._aligned(other)
        return self._new(low, high, a + b, keys)

    merge = __add__

    def __sub__(self, other: Histogram) -> Histogram:
        """What was counted between two reads of one map: `later - earlier` (negative is an error)."""
        low, high, a, b, keys = self._aligned(other)
        d = a - b
        if (d < 0).any():
            raise HistogramError("subtracting gives negative counts: subtract the earlier read from "
                                 "the later one, and do not clear the map between them")
        return self._new(low, high, d, keys)

    subtract = __sub__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        try:
            _, _, a, b, _ = self._aligned(other)
        except HistogramError:
            return False
        return bool(np.array_equal(a, b)) and self.unit == other.unit

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        keys = f", {len(self)} keys" if self.keys is not None else ""
        unit = f" {self.unit}" if self.unit else ""
        return f"<Histogram {self.layout}{unit}: {self.total:,} counts in {len(self.low)} buckets{keys}>"

    # --- views -----------------------------------------------------------------------------
    def plot(self, title: str | None = None) -> Any:
        """A plotly bar chart, one bar per bucket (labelled '16-31 us', evenly spaced: log2 buckets
        are a log-scale x axis), one trace per key."""
        import plotly.graph_objects as go

        span = self._span(False)
        labels = self.labels(span)
        fig = go.Figure()
        for i, (k, h) in enumerate(self.items()):
            row = h.counts[0, span]
            share = row / max(int(row.sum()), 1)
            fig.add_trace(go.Bar(
                x=labels, y=row, name="all" if k is None else str(k), customdata=share,
                marker={"color": COLOURS[i % len(COLOURS)]},
                hovertemplate="%{x}: %{y:,} (%{customdata:.1%})<extra>%{fullData.name}</extra>"))
        fig.update_layout(
            template="none", title={"text": title or repr(self).strip("<>"), "x": 0.01, "xanchor": "left"},
            bargap=0.05, barmode="group",
            showlegend=self.keys is not None, height=360, margin={"l": 60, "r": 20, "t": 40, "b": 90},
            xaxis={"title": self.unit or "value", "type": "category", "tickangle": -45},
            yaxis={"title": "count", "gridcolor": "#e5e7eb"})
        return fig

    def _table(self, row: np.ndarray, span: slice, labels: list[str]) -> str:
        top = max(int(row[span].max()) if row[span].size else 0, 1)
        total = max(int(row.sum()), 1)
        lines = []
        for lab, c in zip(labels, row[span], strict=True):
            width = 100.0 * int(c) / top
            lines.append(
                f"<tr><td style='text-align:right;white-space:nowrap;padding:0 8px'>{html.escape(lab)}</td>"
                f"<td style='text-align:right;padding:0 8px'>{int(c):,}</td>"
                f"<td style='text-align:right;padding:0 8px;color:#6b7280'>{100.0 * int(c) / total:.1f}%</td>"
                f"<td style='width:16em'><div style='background:{BAR_COLOUR};height:0.8em;"
                f"width:{width:.1f}%'></div></td></tr>")
        return ("<table style='border-collapse:collapse;font-size:12px'><tr><th>bucket</th><th>count</th>"
                "<th>share</th><th style='text-align:left'>distribution</th></tr>"
                + "".join(lines) + "</table>")

    def _summary(self, h: Histogram) -> str:
        if not h.total:
            return "empty"
        unit = f" {self.unit}" if self.unit else ""
        p50, p99 = h.percentile(50), h.percentile(99)
        return (f"{h.total:,} counts; p50 ~ {p50:,.0f}{unit}, p99 ~ {p99:,.0f}{unit} "
                "(estimates within a bucket)")

    def _repr_html_(self) -> str:
        """Per key: a summary line and a table with CSS bars (no script needed)."""
        span = self._span(False)
        labels = self.labels(span)
        out = [f"<div class='kernelscope-hist'><b>{html.escape(repr(self))}</b>"]
        for i, (k, h) in enumerate(self.items()):
            if i == MAX_KEYS_SHOWN:
                out.append(f"<p>... {len(self) - MAX_KEYS_SHOWN} more keys (see .frame())</p>")
                break
            name = "" if k is None else f"<b>{html.escape(str(k))}</b>: "
            out.append(f"<p style='margin:0.5em 0 0.2em'>{name}{html.escape(self._summary(h))}</p>")
            out.append(self._table(h.counts[0], span, labels))
        return "".join(out) + "</div>"


# --- map frames ------------------------------------------------------------------------------
def _is_array_column(s: pd.Series) -> bool:
    return len(s) > 0 and isinstance(s.iloc[0], (np.ndarray, list, tuple))


def _key_table(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    return df[list(cols)].reset_index(drop=True)


def from_map_frame(df: pd.DataFrame, layout: str = "log2", slots: str | None = None, *,
                   key: Sequence[str] | str | bool | None = None, step: int | None = None,
                   unit: str | None = None, rule: str | None = None, start: int = 0,
                   name: str | None = None) -> Histogram:
    """A Histogram from a map read as a DataFrame (one row per map key), of either layout:

    (a) BCC `BPF_HISTOGRAM`: a slot column (`slot` of a struct key, else `key`) and a count
        column `value`; any other key columns (e.g. `disk`) give one histogram per key.
        log2 rule "bcc" (bpf_log2l) unless `rule=` says otherwise.
    (b) libbpf-tools `struct hist { __u32 slots[N]; ... }`: a column (`slots`, or the one
        named by `slots=`) of count arrays; each row is one histogram, its other columns
        (map key, `comm`...) name it. log2 rule "libbpf-tools" unless `rule=` says otherwise.

    `key`: columns to keep one histogram each for (None: every other column when there is
    more than one group, none for a single group; False: sum everything into one).
    `layout="linear"` needs `step=` (and `start=`). `unit` is guessed from `name` (the map's
    name) and the column names unless given: usecs/_us -> us, nsecs/_ns, msecs/_ms, kbytes, bytes.
    """
    if layout not in ("log2", "linear"):
        raise HistogramError(f"layout must be 'log2' or 'linear', not {layout!r}")
    if layout == "linear" and step is None:
        raise HistogramError("a linear histogram needs step= (what the program divided the value by)")
    if not isinstance(df, pd.DataFrame):
        raise HistogramError(f"from_map_frame needs a DataFrame (a map's .frame()), not {type(df).__name__}")
    array_col = slots or ("slots" if "slots" in df.columns and _is_array_column(df["slots"]) else None)
    opts = _Options(layout, step, start, rule or ("libbpf-tools" if array_col else "bcc"))
    if array_col is not None:
        return _from_arrays(df, array_col, key, unit, name=name, o=opts)
    return _from_slots(df, key, unit, name, opts)


def _groups(df: pd.DataFrame, others: list[str], key: Sequence[str] | str | bool | None) -> list[str]:
    if key is False:
        return []
    if key is None or key is True:
        return others
    wanted = [key] if isinstance(key, str) else list(key)
    missing = [k for k in wanted if k not in df.columns]
    if missing:
        raise HistogramError(f"key columns {missing} are not in the frame; it has {list(df.columns)}")
    return wanted


@dataclass(frozen=True)
class _Options:
    layout: str
    step: int | None
    start: int
    rule: str


def _build(counts: np.ndarray, keys: pd.DataFrame | None, unit: str, o: _Options) -> Histogram:
    c = counts if keys is not None else counts[0]
    if o.layout == "linear":
        return Histogram.linear(c, int(o.step or 0), o.start, unit, keys=keys)
    return Histogram.log2(c, unit, rule=o.rule, keys=keys)


def _from_arrays(df: pd.DataFrame, col: str, key: Sequence[str] | str | bool | None, unit: str | None,
                 *, name: str | None, o: _Options) -> Histogram:
    if col not in df.columns:
        raise HistogramError(f"no column {col!r} of slot arrays; the frame has {list(df.columns)}")
    arrays = [np.asarray(a).ravel() for a in df[col]]
    width = max((len(a) for a in arrays), default=1)
    counts = np.zeros((max(len(arrays), 1), width), np.int64)
    for r, a in enumerate(arrays):
        counts[r, :len(a)] = a
    others = [c for c in df.columns if c != col]
    groups = _groups(df, others, key)
    guessed = unit if unit is not None else guess_unit(name, col, *others)
    if not groups or (len(df) <= 1 and key is None):
        return _build(counts.sum(axis=0, keepdims=True), None, guessed, o)
    keys = _key_table(df, groups)
    if groups != others:  # sum rows that share the chosen key
        g = keys.groupby(groups, sort=False, dropna=False).ngroup().to_numpy()
        summed = np.zeros((int(g.max()) + 1, width), np.int64)
        np.add.at(summed, g, counts)
        keys, counts = keys.drop_duplicates().reset_index(drop=True), summed
    return _build(counts, keys, guessed, o)


INT64_MAX = np.iinfo(np.int64).max


def _exact(values: np.ndarray) -> np.ndarray:
    """Counts as int64 for summing exactly: whole floats rounded, integers as they are; a
    count (or a sum of counts) beyond int64 is an error rather than a wrapped number."""
    if values.dtype.kind == "f":
        values = np.rint(values)
    if values.size and values.dtype.kind in "uf":
        top = int(values.max())
        if top > INT64_MAX // len(values) and sum(int(v) for v in values.tolist()) > INT64_MAX:
            raise HistogramError("the counts add up to more than 2**63 - 1, which a histogram "
                                 "(int64 counts) cannot hold")
    return values.astype(np.int64)


def _from_slots(df: pd.DataFrame, key: Sequence[str] | str | bool | None, unit: str | None,
                name: str | None, o: _Options) -> Histogram:
    slot_col = "slot" if "slot" in df.columns else "key" if "key" in df.columns else None
    if slot_col is None or "value" not in df.columns:
        raise HistogramError(
            "not a histogram map frame: expected a slot column (`slot` or `key`) and counts in `value` "
            "(BCC BPF_HISTOGRAM), or a column `slots` of arrays (libbpf-tools struct hist); "
            f"the frame has {list(df.columns)}")
    slot = df[slot_col].to_numpy()
    if slot.size and (not np.issubdtype(slot.dtype, np.integer) or slot.min() < 0):
        raise HistogramError(f"column {slot_col!r} must hold slot indexes (whole numbers >= 0)")
    values = df["value"].to_numpy()
    if values.size and not np.issubdtype(values.dtype, np.number):
        raise HistogramError("column 'value' must hold counts (numbers)")
    others = [c for c in df.columns if c not in (slot_col, "value")]
    groups = _groups(df, others, key)
    guessed = unit if unit is not None else guess_unit(name, *others)
    width = int(slot.max()) + 1 if slot.size else 1
    if o.layout == "log2":
        width = max(width, 2 if o.rule == "bcc" else 1)
    if groups:
        keys_all = _key_table(df, groups)
        g = keys_all.groupby(groups, sort=True, dropna=False).ngroup().to_numpy()
        keys = keys_all.assign(_g=g).drop_duplicates("_g").sort_values("_g").drop(columns="_g")
        keys = keys.reset_index(drop=True)
        if len(keys) <= 1 and key is None:
            groups = []
    if not groups:
        # np.add.at in integers, not bincount(weights=), which sums in float64 (inexact above 2**53)
        counts = np.zeros((1, width), np.int64)
        np.add.at(counts[0], slot.astype(np.int64), _exact(values))
        return _build(counts, None, guessed, o)
    counts = np.zeros((len(keys), width), np.int64)
    np.add.at(counts, (g, slot.astype(np.int64)), _exact(values))
    return _build(counts, keys, guessed, o)
