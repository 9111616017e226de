"""kernelscope.flame: folded text, speedscope JSON, the pruned tree, the SVG and the plotly figure."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernelscope
from kernelscope import flame
from kernelscope.flame import OTHER, ROOT, FlameError, build_tree, flamegraph, folded, speedscope

KNOWN = pd.DataFrame({
    "stack": [("main", "read", "vfs_read"), ("main", "read", "vfs_read"), ("main", "write"),
              ("main", "read"), ("idle",), ("main", "a;b")],
    "count": [5, 2, 3, 1, 4, 1],
})

# The essentials of https://www.speedscope.app/file-format-schema.json for a sampled profile.
SPEEDSCOPE_SCHEMA = {
    "type": "object",
    "required": ["$schema", "shared", "profiles"],
    "properties": {
        "$schema": {"const": "https://www.speedscope.app/file-format-schema.json"},
        "shared": {"type": "object", "required": ["frames"], "properties": {"frames": {
            "type": "array", "items": {"type": "object", "required": ["name"],
                                       "properties": {"name": {"type": "string"}}}}}},
        "profiles": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["type", "name", "unit", "startValue", "endValue", "samples", "weights"],
            "properties": {
                "type": {"const": "sampled"},
                "unit": {"enum": ["none", "nanoseconds", "microseconds", "milliseconds", "seconds", "bytes"]},
                "samples": {"type": "array", "items": {"type": "array", "items": {"type": "integer",
                                                                                   "minimum": 0}}},
                "weights": {"type": "array", "items": {"type": "number", "minimum": 0}},
            }}},
        "activeProfileIndex": {"type": "integer"},
    },
}


def test_folded_text_is_exact() -> None:
    assert folded(KNOWN) == ("idle 4\n"
                             "main;a:b 1\n"  # ';' inside a frame name cannot stay: it is the separator
                             "main;read 1\n"
                             "main;read;vfs_read 7\n"
                             "main;write 3\n")
    as_text = pd.DataFrame({"s": ["x;y", "x;y", "x"], "n": [1.5, 2.0, 1.0]})
    assert folded(as_text, stack="s", value="n") == "x 1\nx;y 3.5\n"
    rows = pd.DataFrame({"stack": [("a", "b"), ("a", "b"), (), ("a",)]})
    assert folded(rows, value=None) == "[no stack] 1\na 1\na;b 2\n"  # each row once; empty kept
    procs = pd.DataFrame({"stack": [("main", "f"), ("main", "f"), ("main",)], "comm": ["dd", "cat", "dd"],
                          "count": [1, 2, 3]})
    assert folded(procs, by="comm") == "cat;main;f 2\ndd;main 3\ndd;main;f 1\n"
    assert flamegraph(procs, by=["comm"]).tree.name[:3] == [ROOT, "cat", "dd"]


def test_speedscope_file_validates_and_holds_the_same_stacks() -> None:
    doc = speedscope(KNOWN, name="test")
    jsonschema.validate(doc, SPEEDSCOPE_SCHEMA)
    prof = doc["profiles"][0]
    names = [f["name"] for f in doc["shared"]["frames"]]
    assert len(names) == len(set(names))  # frames are shared, not repeated per sample
    assert len(prof["samples"]) == len(prof["weights"]) == 5
    assert sum(prof["weights"]) == prof["endValue"] - prof["startValue"] == int(KNOWN["count"].sum())
    back = pd.DataFrame({"stack": [tuple(names[i] for i in s) for s in prof["samples"]],
                         "count": prof["weights"]})
    assert folded(back) == folded(KNOWN)  # samples are root first, like the input
    timed = speedscope(KNOWN.rename(columns={"count": "us"}), value="us")
    assert timed["profiles"][0]["unit"] == "microseconds"
    json.dumps(doc)  # plain JSON types only


def self_values(df: pd.DataFrame) -> dict[tuple[str, ...], int]:
    out: dict[tuple[str, ...], int] = defaultdict(int)
    for s, v in flame.stacks(df).items():
        out[s] += v
    return out


def paths(tree: flame.Tree) -> list[tuple[str, ...]]:
    """Each node's frames from the root's child down to it."""
    out: list[tuple[str, ...]] = []
    for i in range(len(tree)):
        p = tree.parent[i]
        out.append(() if p < 0 else (*out[p], tree.name[i]))
    return out


def test_tree_values_are_the_sums_of_stacks_through_each_frame() -> None:
    tree = build_tree(flame.stacks(KNOWN), min_share=0)
    total = int(KNOWN["count"].sum())
    assert tree.name[0] == ROOT
    assert tree.value[0] == total
    through: dict[tuple[str, ...], int] = defaultdict(int)
    for s, v in self_values(KNOWN).items():
        for d in range(1, len(s) + 1):
            through[s[:d]] += v
    got = {p: int(v) for p, v in zip(paths(tree)[1:], tree.value[1:], strict=True)}
    assert got == dict(through)
    # siblings laid side by side inside their parent, in name order
    for i in range(1, len(tree)):
        p = tree.parent[i]
        assert tree.x[p] <= tree.x[i]
        assert tree.x[i] + tree.value[i] <= tree.x[p] + tree.value[p]


def test_small_siblings_merge_into_other_and_widths_stay_exact() -> None:
    stacks = [("main", f"tiny{i}") for i in range(50)] + [("main", "big"), ("cold",)]
    df = pd.DataFrame({"stack": stacks, "count": [1] * 50 + [1000, 1]})
    tree = build_tree(flame.stacks(df), min_share=0.01)  # threshold: 10.51 of 1051
    by_path = {p: int(v) for p, v in zip(paths(tree), tree.value, strict=True)}
    assert by_path[("main", "big")] == 1000
    assert by_path[("main", OTHER)] == 50
    assert by_path[(OTHER,)] == 1  # "cold" alone is below the threshold too
    assert tree.merged[paths(tree).index(("main", OTHER))] == 50
    assert not any(p[-1].startswith("tiny") for p in by_path if p)


def svg_rects(svg: str) -> list[dict[str, Any]]:
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    out = []
    for g in root.iter(f"{ns}g"):
        rect = g.find(f"{ns}rect")
        title = g.find(f"{ns}title")
        if rect is not None and rect.get("class") == "f":
            out.append({"x": float(rect.get("x", 0)), "y": float(rect.get("y", 0)),
                        "w": float(rect.get("width", 0)), "title": title.text if title is not None else ""})
    return out


def test_svg_has_one_rect_per_kept_frame_with_width_proportional_to_value() -> None:
    rng = np.random.default_rng(7)
    stacks = [("root", f"f{rng.integers(0, 30)}", f"g{rng.integers(0, 30)}") for _ in range(2000)]
    df = pd.DataFrame({"stack": stacks, "count": rng.integers(1, 50, len(stacks))})
    fg = flamegraph(df, min_share=0.002)
    rects = svg_rects(fg.svg(width=1000))
    tree = fg.tree
    assert len(rects) == len(tree)
    kept = [i for i in range(len(tree)) if tree.name[i] != OTHER]
    threshold = fg.total * 0.002
    assert all(tree.value[i] >= threshold for i in kept)
    scale = rects[0]["w"] / tree.value[0]
    for r, v in zip(rects, tree.value, strict=True):
        assert r["w"] == pytest.approx(v * scale, abs=1e-3)
    # flame: the root at the bottom; icicle: at the top
    assert rects[0]["y"] == max(r["y"] for r in rects)
    icicle = svg_rects(flamegraph(df, kind="icicle", min_share=0.002).svg())
    assert icicle[0]["y"] == min(r["y"] for r in icicle)
    assert "of total" in rects[1]["title"]
    assert "of parent" in rects[1]["title"]


def test_plotly_figure_values_sum_per_parent() -> None:
    fg = flamegraph(KNOWN, title="known")
    trace = fg.figure.data[0]
    assert trace.type == "icicle"
    assert trace.branchvalues == "total"
    assert trace.tiling.flip == "y"  # flame: root at the bottom
    ids, parents, values = list(trace.ids), list(trace.parents), list(trace.values)
    children: dict[str, int] = defaultdict(int)
    for p, v in zip(parents, values, strict=True):
        if p:
            children[p] += v
    self_of = {(ROOT, *k): v for k, v in self_values(KNOWN).items()}
    labels = dict(zip(ids, paths(fg.tree), strict=True))
    for i, v in zip(ids, values, strict=True):
        assert children.get(i, 0) + self_of.get((ROOT, *labels[i]), 0) == v
    assert values[0] == int(KNOWN["count"].sum())
    share = np.asarray(trace.customdata)
    assert share[0, 0] == 1.0
    assert flamegraph(KNOWN, kind="icicle").figure.data[0].tiling.flip in ("", None)


def test_mime_bundle_carries_the_interactive_figure_and_a_static_svg() -> None:
    fg = kernelscope.flamegraph(KNOWN)
    bundle = fg._repr_mimebundle_()
    assert bundle["application/vnd.plotly.v1+json"]["data"][0]["type"] == "icicle"
    assert "<svg" in bundle["text/html"]
    assert "<script" not in bundle["text/html"]  # shows in nbconvert and on GitHub without JS
    assert bundle["image/svg+xml"].startswith("<svg")
    json.dumps(bundle)


def test_save_by_suffix(tmp_path: Path) -> None:
    fg = flamegraph(KNOWN)
    assert fg.save(tmp_path / "p.folded").read_text() == folded(KNOWN)
    assert fg.save(tmp_path / "p.txt").read_text() == folded(KNOWN)
    doc = json.loads(fg.save(tmp_path / "p.speedscope.json").read_text())
    jsonschema.validate(doc, SPEEDSCOPE_SCHEMA)
    assert len(svg_rects(fg.save(tmp_path / "p.svg").read_text())) == len(fg.tree)
    page = fg.save(tmp_path / "p.html").read_text()
    assert "Plotly" in page
    assert "<noscript><svg" in page
    with pytest.raises(FlameError, match="cannot tell a format"):
        fg.save(tmp_path / "p.png")


def test_bad_input_says_what_is_wrong() -> None:
    with pytest.raises(FlameError, match="stack column"):
        folded(pd.DataFrame({"x": [1]}))
    with pytest.raises(FlameError, match="value column"):
        folded(pd.DataFrame({"stack": [("a",)]}))
    with pytest.raises(FlameError, match="negative"):
        folded(pd.DataFrame({"stack": [("a",)], "count": [-1]}))
    with pytest.raises(FlameError, match="kind"):
        flamegraph(KNOWN, kind="sideways")


def test_hundred_thousand_distinct_stacks_draw_a_bounded_tree() -> None:
    rng = np.random.default_rng(1)
    depth = rng.integers(3, 30, 100_000)
    frames = rng.zipf(1.5, int(depth.sum())) % 5000
    starts = np.r_[0, np.cumsum(depth)[:-1]]
    stacks = {("main", *(f"fn{f}" for f in frames[s:s + d]), f"leaf{i}")
              for i, (s, d) in enumerate(zip(starts, depth, strict=True))}
    df = pd.DataFrame({"stack": list(stacks), "count": rng.integers(1, 100, len(stacks))})
    fg = flamegraph(df)
    tree = fg.tree
    assert tree.value[0] == int(df["count"].sum())
    per_level = np.bincount(tree.depth)
    assert per_level.max() <= 2 / flame.MIN_SHARE  # kept frames plus one [other] per kept parent
    rects = svg_rects(fg.svg())
    assert len(rects) == len(tree)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from("abcde"), min_size=1, max_size=6), st.integers(1, 1000)),
                min_size=1, max_size=40),
       st.sampled_from([0.0, 0.01, 0.1, 0.3]))
def test_pruning_conserves_every_parents_width(rows: list[tuple[list[str], int]], share: float) -> None:
    df = pd.DataFrame({"stack": [tuple(s) for s, _ in rows], "count": [v for _, v in rows]})
    tree = build_tree(flame.stacks(df), min_share=share)
    assert tree.value[0] == sum(v for _, v in rows)
    kids: dict[int, int] = defaultdict(int)
    for i in range(1, len(tree)):
        kids[int(tree.parent[i])] += int(tree.value[i])
        assert tree.name[i] == OTHER or tree.value[i] >= share * tree.value[0]
    for p, v in kids.items():
        assert v <= tree.value[p]
    if share == 0:
        prefixes = {tuple(s[:d]) for s, _ in rows for d in range(1, len(s) + 1)}
        assert len(tree) == 1 + len(prefixes)
