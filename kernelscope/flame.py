"""Flame graphs from any frame of stacks: folded text, speedscope JSON, plotly and SVG renderings.

The input is a DataFrame with a column of root-first stacks (tuples of frame names,
outermost caller first, leaf last; a "a;b;c" string also works) and a value column
(`count`, off-CPU `us`, ...; `value=None` counts each row once). Identical stacks are summed.

    folded(df)          # Brendan Gregg's folded format, "a;b;c 12" per line, sorted
    speedscope(df)      # a speedscope file ("sampled" profile) as a dict, for speedscope.app
    fg = flamegraph(df) # displays in Jupyter; fg.figure (plotly), fg.svg(), fg.save("x.html")

Width is a frame's share of the total. For large inputs, sibling frames below `min_share`
of the total (default 0.1 %, about one pixel of a 1200-pixel graph) are merged into one
"[other]" frame under their parent, and what lies above them is not drawn: the kept frames'
widths stay exact, and 100k distinct stacks of ~25 frames build in about a second (the tree is
merged level by level with numpy over all stacks at once) and draw a few hundred frames.
`folded()` and `speedscope()` are never pruned.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import KernelscopeError
from .hist import guess_unit

MIN_SHARE = 0.001  # siblings below this share of the total merge into "[other]"
OTHER = "[other]"
ROOT = "all"
EMPTY = "[no stack]"  # a row whose stack is empty still counts, under this frame
KINDS = ("flame", "icicle")
SVG_WIDTH = 1200  # pixels
ROW = 16  # pixels per stack level
CHAR = 6.6  # pixels per character of the 11 px labels, to decide what fits
SPEEDSCOPE_SCHEMA = "https://www.speedscope.app/file-format-schema.json"
SPEEDSCOPE_UNITS = {"ns": "nanoseconds", "us": "microseconds", "ms": "milliseconds", "s": "seconds",
                    "bytes": "bytes"}


class FlameError(KernelscopeError, ValueError):
    """A frame that cannot be drawn as a flame graph (no stack column, negative values); the message says why.
    """


# --- input ------------------------------------------------------------------------------------
def _frame_name(f: Any) -> str:
    return str(f).replace(";", ":").replace("\n", " ").replace("\r", " ")


def _clean(s: tuple[Any, ...]) -> bool:
    """True when a tuple of frames is already names with no ';' or line break (checked at C speed)."""
    try:
        joined = ";".join(s)
    except TypeError:
        return False
    return joined.count(";") == len(s) - 1 and "\n" not in joined and "\r" not in joined


def _as_stack(s: Any) -> tuple[str, ...]:
    if isinstance(s, tuple) and _clean(s):
        parts: tuple[str, ...] = s
    elif isinstance(s, str):
        parts = tuple(p for p in s.split(";") if p)
    elif isinstance(s, (tuple, list, np.ndarray)):
        parts = tuple(_frame_name(f) for f in s)
    elif s is None or (isinstance(s, float) and math.isnan(s)):
        parts = ()
    else:
        raise FlameError("a stack must be a tuple of frame names (root first) or an 'a;b;c' string, "
                         f"not {s!r}")
    return parts or (EMPTY,)


def stacks(df: pd.DataFrame, stack: str = "stack", value: str | None = "count", *,
           by: str | Sequence[str] | None = None) -> dict[tuple[str, ...], Any]:
    """Identical stacks summed: {root-first tuple: value}, in first-seen order, zero values dropped.

    `by`: columns (e.g. "comm", or ["pid", "comm"]) whose values become the outermost frames,
    so each process gets its own tower, as `profile -f` and stackcollapse output begin.
    """
    if not isinstance(df, pd.DataFrame):
        raise FlameError(f"a flame graph is drawn from a DataFrame, not {type(df).__name__}")
    if stack not in df.columns:
        raise FlameError(f"no stack column {stack!r}; the frame has {list(df.columns)} (pass stack=)")
    if value is None:
        weights: np.ndarray = np.ones(len(df), dtype=np.int64)
    elif value not in df.columns:
        raise FlameError(f"no value column {value!r}; the frame has {list(df.columns)} "
                         "(pass value=, or value=None to count rows)")
    else:
        weights = df[value].to_numpy()
        if not np.issubdtype(weights.dtype, np.number):
            raise FlameError(f"value column {value!r} must hold numbers, not {weights.dtype}")
        if len(weights) and (np.isnan(weights.astype(float)).any() or (weights < 0).any()):
            raise FlameError(f"value column {value!r} has negative or missing values")
        if weights.dtype.kind == "f" and np.all(weights == np.round(weights)):
            weights = weights.astype(np.int64)
    col = df[stack].tolist()
    if not _all_clean(col):
        col = [_as_stack(s) for s in col]
    if by is not None:
        names = [by] if isinstance(by, str) else list(by)
        missing = [c for c in names if c not in df.columns]
        if missing:
            raise FlameError(f"by= columns {missing} are not in the frame; it has {list(df.columns)}")
        outer = zip(*(map(_frame_name, df[c].tolist()) for c in names), strict=True)
        col = [o + s for o, s in zip(outer, col, strict=True)]
    out: dict[tuple[str, ...], Any] = {}
    for s, w in zip(col, weights.tolist(), strict=True):
        if w:
            out[s] = out.get(s, 0) + w
    return out


def _all_clean(col: list[Any]) -> bool:
    """True when every stack is a non-empty tuple of names free of ';' and line breaks: the common
    case, checked with one join over all of them rather than frame by frame."""
    if set(map(type, col)) != {tuple} or not all(col):
        return False
    try:
        joined = "\n".join(map(";".join, col))
    except TypeError:
        return False
    frames = sum(map(len, col))
    return (joined.count(";") == frames - len(col) and joined.count("\n") == len(col) - 1
            and "\r" not in joined)


def _fmt(v: Any) -> str:
    return str(v) if isinstance(v, (int, np.integer)) else f"{v:.15g}"


def folded(df: pd.DataFrame, stack: str = "stack", value: str | None = "count", *,
           by: str | Sequence[str] | None = None) -> str:
    """Brendan Gregg's folded format: one "root;...;leaf value" line per distinct stack, sorted.

    ';' inside a frame name becomes ':' (the format has no escape).
    """
    lines = sorted(f"{';'.join(s)} {_fmt(v)}" for s, v in stacks(df, stack, value, by=by).items())
    return "\n".join(lines) + ("\n" if lines else "")


def _unit(value: str | None, unit: str | None) -> str:
    return unit if unit is not None else guess_unit(value)


def speedscope(df: pd.DataFrame, stack: str = "stack", value: str | None = "count", *,
               name: str = "kernelscope", unit: str | None = None,
               by: str | Sequence[str] | None = None) -> dict[str, Any]:
    """A speedscope file (https://www.speedscope.app/file-format-schema.json): shared frames and one
    "sampled" profile, each distinct stack a sample (frame indexes root first) with its value as weight."""
    from . import __version__

    agg = stacks(df, stack, value, by=by)
    index: dict[str, int] = {}
    samples = [[index.setdefault(f, len(index)) for f in s] for s in agg]
    weights = list(agg.values())
    total = sum(weights)
    return {
        "$schema": SPEEDSCOPE_SCHEMA,
        "shared": {"frames": [{"name": f} for f in index]},
        "profiles": [{"type": "sampled", "name": name,
                      "unit": SPEEDSCOPE_UNITS.get(_unit(value, unit), "none"),
                      "startValue": 0, "endValue": total, "samples": samples, "weights": weights}],
        "name": name, "activeProfileIndex": 0, "exporter": f"kernelscope {__version__}",
    }


# --- the tree, pruned -------------------------------------------------------------------------
@dataclass
class Tree:
    """Nodes of the merged stacks, node 0 the root, parents before children, siblings in drawing
    order (alphabetical, "[other]" last). `merged[i]` counts the frames an "[other]" node stands for."""

    name: list[str]
    parent: np.ndarray
    depth: np.ndarray
    value: np.ndarray
    x: np.ndarray  # offset from the left, in value units
    merged: np.ndarray
    min_share: float = MIN_SHARE

    @property
    def total(self) -> Any:
        return self.value[0] if len(self.value) else 0

    def __len__(self) -> int:
        return len(self.name)


def build_tree(agg: dict[tuple[str, ...], Any], min_share: float = MIN_SHARE) -> Tree:
    """Merge stacks level by level (numpy over all stacks at once), pruning below `min_share`."""
    if not 0 <= min_share < 1:
        raise FlameError(f"min_share must be in [0, 1), not {min_share!r}")
    keys = list(agg)
    w = np.asarray(list(agg.values()) or [0])
    w = w if keys else w[:0]
    total = w.sum() if len(w) else 0
    lengths = np.fromiter((len(s) for s in keys), dtype=np.int64, count=len(keys))
    flat = np.fromiter(itertools.chain.from_iterable(keys), dtype=object, count=int(lengths.sum()))
    codes, uniques = pd.factorize(flat)
    by_name = np.argsort(uniques.astype(str), kind="stable")  # recode so code order = name order
    recode = np.empty(len(uniques), dtype=np.int64)
    recode[by_name] = np.arange(len(uniques))
    codes = recode[codes] if len(flat) else codes
    names = [str(u) for u in uniques[by_name]]
    nf = len(names)
    maxdepth = int(lengths.max()) if keys else 0
    grid = np.full((len(keys), maxdepth), -1, dtype=np.int64)
    if len(flat):
        rows = np.repeat(np.arange(len(keys)), lengths)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        grid[rows, cols] = codes
    threshold = total * min_share
    name_code = [np.array([-2])]  # -2: root, -1: [other]
    parents, depths, values = [np.array([-1])], [np.array([0])], [np.array([total])]
    merged = [np.array([0])]
    at = np.zeros(len(keys), dtype=np.int64)  # each stack's current node
    live = np.arange(len(keys))
    count = 1
    for d in range(maxdepth):
        live = live[lengths[live] > d]
        if not len(live):
            break
        key = at[live] * (nf + 1) + grid[live, d]
        uniq, inv = np.unique(key, return_inverse=True)
        val = np.bincount(inv, weights=w[live])  # float sums: exact for integers below 2**53
        if w.dtype.kind != "f":
            val = np.rint(val).astype(np.int64)
        par, code = uniq // (nf + 1), uniq % (nf + 1)
        keep = val >= threshold if min_share > 0 else np.ones(len(uniq), bool)
        small = ~keep
        if small.any():  # siblings under the threshold: one [other] per parent, nothing above it
            opar, oinv = np.unique(par[small], return_inverse=True)
            oval = np.zeros(len(opar), dtype=val.dtype)
            np.add.at(oval, oinv, val[small])
            ocount = np.bincount(oinv)
        else:
            opar, oval, ocount = np.array([], np.int64), np.array([], val.dtype), np.array([], np.int64)
        nk = int(keep.sum())
        ids = np.full(len(uniq), -1, dtype=np.int64)
        ids[keep] = count + np.arange(nk)
        name_code += [code[keep], np.full(len(opar), -1)]
        parents += [par[keep], opar]
        depths += [np.full(nk + len(opar), d + 1)]
        values += [val[keep], oval]
        merged += [np.zeros(nk, np.int64), ocount]
        count += nk + len(opar)
        node = ids[inv]
        alive = node >= 0
        at[live[alive]] = node[alive]
        live = live[alive]
    code_all = np.concatenate(name_code)
    parent = np.concatenate(parents)
    depth = np.concatenate(depths)
    value = np.concatenate(values)
    tree = _ordered(code_all, parent, depth, value, np.concatenate(merged), names=names, nf=nf)
    tree.min_share = min_share
    return tree


def _ordered(code: np.ndarray, parent: np.ndarray, depth: np.ndarray, value: np.ndarray,
             merged: np.ndarray, *, names: list[str], nf: int) -> Tree:
    """Sort siblings by name ([other] last), renumber so parents come first, and place each node."""
    rank = np.where(code == -1, nf, code)  # codes are alphabetical already
    order = np.lexsort((rank, parent, depth))  # by depth, then parent id, then name
    new_id = np.empty(len(order), dtype=np.int64)
    new_id[order] = np.arange(len(order))
    parent = np.where(parent[order] >= 0, new_id[np.maximum(parent[order], 0)], -1)
    code, depth, value, merged = code[order], depth[order], value[order], merged[order]
    x = np.zeros(len(order), dtype=float)
    for d in range(1, int(depth.max()) + 1 if len(depth) else 0):
        sel = np.flatnonzero(depth == d)
        # parents were renumbered in order, so siblings are contiguous and grouped by parent
        p = parent[sel]
        cum = np.cumsum(value[sel].astype(float)) - value[sel]
        starts = np.r_[0, np.flatnonzero(np.diff(p)) + 1]
        base = np.repeat(cum[starts], np.diff(np.r_[starts, len(sel)]))
        x[sel] = x[p] + cum - base
    label = [ROOT if c == -2 else OTHER if c == -1 else names[c] for c in code.tolist()]
    return Tree(label, parent, depth, value, x, merged)


# --- renderings --------------------------------------------------------------------------------
def colour(name: str) -> str:
    """A warm colour fixed by the frame's name (the same frame is the same colour everywhere)."""
    if name in (ROOT, OTHER, EMPTY):
        return "rgb(210,210,210)"
    h = zlib.crc32(name.encode())
    r, g, b = 205 + (h & 0x3F) % 50, 60 + ((h >> 8) & 0xFF) % 170, (h >> 16) % 55
    return f"rgb({r},{g},{b})"


def _hover(tree: Tree, i: int, unit: str) -> str:
    total = tree.total or 1
    pv = tree.value[tree.parent[i]] if tree.parent[i] >= 0 else tree.value[i]
    u = f" {unit}" if unit else ""
    extra = f", {int(tree.merged[i])} frames below {tree.min_share:.1%} merged" if tree.merged[i] else ""
    return (f"{tree.name[i]} ({_fmt(tree.value[i].item())}{u}, {tree.value[i] / total:.2%} of total, "
            f"{tree.value[i] / (pv or 1):.2%} of parent{extra})")


def svg(tree: Tree, *, kind: str = "flame", width: int = SVG_WIDTH, title: str = "", unit: str = "") -> str:
    """A static SVG: one <rect class="f"> per node, width proportional to value, a <title> tooltip each."""
    levels = int(tree.depth.max()) + 1 if len(tree) else 1
    top, pad = 24, 10
    height = top + levels * ROW + pad
    scale = (width - 2 * pad) / (tree.total or 1)
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
           f"viewBox='0 0 {width} {height}' font-family='Verdana, sans-serif' font-size='11'>",
           f"<rect class='bg' width='{width}' height='{height}' fill='#fafafa'/>",
           f"<text x='{width / 2}' y='16' text-anchor='middle' font-size='13'>{html.escape(title)}</text>"]
    for i in range(len(tree)):
        d = int(tree.depth[i])
        y = height - pad - (d + 1) * ROW if kind == "flame" else top + d * ROW
        x, w = pad + tree.x[i] * scale, float(tree.value[i]) * scale
        name = tree.name[i]
        out.append(f"<g><title>{html.escape(_hover(tree, i, unit))}</title>"
                   f"<rect class='f' x='{x:.3f}' y='{y}' width='{w:.3f}' height='{ROW - 1}' "
                   f"fill='{colour(name)}' rx='2'/>")
        fit = int((w - 6) / CHAR)
        if fit >= 3:
            text = name if len(name) <= fit else name[: fit - 2] + ".."
            out.append(f"<text x='{x + 3:.2f}' y='{y + 11.5}'>{html.escape(text)}</text>")
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


def figure(tree: Tree, *, kind: str = "flame", title: str = "", unit: str = "") -> Any:
    """A plotly icicle: root at the bottom for a flame graph, at the top for an icicle."""
    import plotly.graph_objects as go

    ids = [f"n{i}" for i in range(len(tree))]
    parents = ["" if p < 0 else ids[p] for p in tree.parent.tolist()]
    total = tree.total or 1
    pv = np.where(tree.parent >= 0, tree.value[np.maximum(tree.parent, 0)], tree.value)
    share = np.c_[tree.value / total, tree.value / np.where(pv == 0, 1, pv), tree.merged]
    u = f" {unit}" if unit else ""
    trace = go.Icicle(
        ids=ids, labels=tree.name, parents=parents, values=tree.value, branchvalues="total", sort=False,
        customdata=share, marker={"colors": [colour(n) for n in tree.name]},
        tiling={"orientation": "v", **({"flip": "y"} if kind == "flame" else {})},
        hovertemplate=(f"<b>%{{label}}</b><br>%{{value:,}}{u}<br>%{{customdata[0]:.2%}} of total<br>"
                       "%{customdata[1]:.2%} of parent<extra></extra>"))
    fig = go.Figure(trace)
    levels = int(tree.depth.max()) + 1 if len(tree) else 1
    fig.update_layout(template="none", title=title or None,
                      margin={"l": 5, "r": 5, "t": 30 if title else 5, "b": 5},
                      height=max(300, min(1200, 30 + ROW * 2 * levels)))
    return fig


class FlameGraph:
    """A flame graph of a frame's stacks: shows in Jupyter (plotly, with a static SVG for saved
    notebooks and nbconvert), and saves as folded text, speedscope JSON, SVG or HTML."""

    def __init__(self, df: pd.DataFrame, stack: str = "stack", value: str | None = "count", *,
                 kind: str = "flame", min_share: float = MIN_SHARE, title: str = "",
                 unit: str | None = None, by: str | Sequence[str] | None = None) -> None:
        if kind not in KINDS:
            raise FlameError(f"kind must be one of {KINDS}, not {kind!r}")
        self.stacks = stacks(df, stack, value, by=by)
        self.kind = kind
        self.unit = _unit(value, unit)
        self.value_name = value
        self.title = title
        self.tree = build_tree(self.stacks, min_share)
        self._figure: Any = None

    @property
    def total(self) -> Any:
        return self.tree.total

    @property
    def figure(self) -> Any:
        """The plotly figure (an icicle trace), built once."""
        if self._figure is None:
            self._figure = figure(self.tree, kind=self.kind, title=self.title, unit=self.unit)
        return self._figure

    def svg(self, width: int = SVG_WIDTH) -> str:
        return svg(self.tree, kind=self.kind, width=width, title=self.title, unit=self.unit)

    def folded(self) -> str:
        lines = sorted(f"{';'.join(s)} {_fmt(v)}" for s, v in self.stacks.items())
        return "\n".join(lines) + ("\n" if lines else "")

    def speedscope(self, name: str = "kernelscope") -> dict[str, Any]:
        frame = pd.DataFrame({"stack": list(self.stacks), "v": list(self.stacks.values())})
        unit = self.unit if self.unit else None
        return speedscope(frame, "stack", "v", name=name or self.title or "kernelscope", unit=unit)

    def html(self, plotlyjs: bool | str = True) -> str:
        """A whole page: the interactive graph (plotly.js inlined: opens offline), the SVG without scripts."""
        div = self.figure.to_html(full_html=False, include_plotlyjs=plotlyjs, config={"displaylogo": False})
        return (f"<html><head><meta charset='utf-8'><title>{html.escape(self.title or 'flame graph')}</title>"
                f"</head><body>{div}<noscript>{self.svg()}</noscript></body></html>")

    def save(self, path: str | Path) -> Path:
        """Write by suffix: .folded/.txt (folded), .json (speedscope), .svg, .html."""
        p = Path(path)
        name = p.name.lower()
        if name.endswith((".folded", ".txt")):
            p.write_text(self.folded())
        elif name.endswith(".json"):
            p.write_text(json.dumps(self.speedscope(p.name.split(".")[0])))
        elif name.endswith(".svg"):
            p.write_text(self.svg())
        elif name.endswith((".html", ".htm")):
            p.write_text(self.html())
        else:
            raise FlameError(f"cannot tell a format from {p.name!r}: use .folded, .txt, .speedscope.json, "
                             ".svg or .html")
        return p

    def _repr_mimebundle_(self, include: Iterable[str] | None = None,
                          exclude: Iterable[str] | None = None) -> dict[str, Any]:
        fig = json.loads(self.figure.to_json())
        fig["config"] = {"displaylogo": False}
        static = self.svg()
        return {"application/vnd.plotly.v1+json": fig,
                "text/html": f"<div class='kernelscope-flame'>{static}</div>",
                "image/svg+xml": static, "text/plain": repr(self)}

    def __repr__(self) -> str:
        u = f" {self.unit}" if self.unit else ""
        return (f"<FlameGraph {self.kind}: {len(self.stacks):,} stacks, {_fmt(self.total)}{u}, "
                f"{len(self.tree):,} frames drawn>")


def flamegraph(df: pd.DataFrame, stack: str = "stack", value: str | None = "count", *, kind: str = "flame",
               min_share: float = MIN_SHARE, title: str = "", unit: str | None = None,
               by: str | Sequence[str] | None = None) -> FlameGraph:
    """A flame graph (`kind="flame"`, root at the bottom) or icicle (`"icicle"`, root on top) of a frame
    with a column of root-first stacks and a value column; siblings below `min_share` of the total
    merge into "[other]" (0 keeps every frame); `by` columns become the outermost frames."""
    return FlameGraph(df, stack, value, kind=kind, min_share=min_share, title=title, unit=unit, by=by)


__all__ = ["FlameError", "FlameGraph", "Tree", "build_tree", "flamegraph", "folded", "speedscope", "stacks"]
