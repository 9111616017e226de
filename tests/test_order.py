"""OrderTracker and Reorderer on synthetic streams (no kernel needed)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelscope.order import OrderTracker, Reorderer
from kernelscope.readers.batch import Batch

DT = np.dtype([("ts", "<u8"), ("cpu", "<u4"), ("n", "<u4")])


def batch(ts: list[int], cpu: list[int] | None = None) -> Batch:
    rec = np.zeros(len(ts), DT)
    rec["ts"] = ts
    rec["n"] = np.arange(len(ts))
    return Batch(rec, np.array(cpu, dtype=np.int16) if cpu is not None else None)


def test_tracker_counts_late_records_and_the_largest_delay() -> None:
    t = OrderTracker("ts")
    t.update(batch([10, 20, 15, 30]).records)
    t.update(batch([5, 40]).records)  # 5 is late by 25 against the 30 seen before
    assert t.inversions == 2
    assert t.max_inversion_ns == 25


@settings(max_examples=200, deadline=None)
@given(
    stream=st.lists(st.lists(st.integers(min_value=0, max_value=10_000), max_size=30), max_size=20),
    window=st.integers(min_value=0, max_value=3_000),
)
def test_reorderer_releases_everything_once_and_in_order_within_the_window(stream, window) -> None:
    r = Reorderer("ts", window)
    out: list[int] = []
    seen_max = 0
    late_beyond_window = False
    for part in stream:
        for ts in part:
            if ts < seen_max - window:
                late_beyond_window = True
            seen_max = max(seen_max, ts)
        released = r.push(batch(part, [0] * len(part)))
        assert released.cpu is not None or not len(released)
        out += [int(x) for x in released.records["ts"]] if len(released) else []
    final = r.flush()
    out += [int(x) for x in final.records["ts"]] if len(final) else []
    assert sorted(out) == sorted(x for part in stream for x in part)
    assert len(r) == 0
    if not late_beyond_window:
        assert out == sorted(out)


def naive(stream: list[int]) -> tuple[int, int, int]:
    """(inversions, largest delay, max seen) by the definition: a record is late if older
    than the largest timestamp before it."""
    seen_max, inversions, worst = 0, 0, 0
    for ts in stream:
        if ts < seen_max:
            inversions += 1
            worst = max(worst, seen_max - ts)
        seen_max = max(seen_max, ts)
    return inversions, worst, seen_max


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(min_value=0, max_value=1_000), max_size=20), max_size=10))
def test_tracker_matches_a_naive_count(parts) -> None:
    t = OrderTracker("ts")
    for part in parts:
        t.update(batch(part).records)
    assert (t.inversions, t.max_inversion_ns) == naive([ts for part in parts for ts in part])[:2]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.lists(st.integers(min_value=0, max_value=1_000), max_size=20),
                         max_size=4), max_size=8),
       st.booleans())
def test_tracker_given_per_cpu_pieces_counts_as_the_naive_count(reads, sort_pieces) -> None:
    """A perf read is one piece per CPU (`runs`): sorted pieces take the bisection path,
    unsorted ones the running max; both must count exactly what the naive loop counts."""
    t = OrderTracker("ts")
    stream: list[int] = []
    for read in reads:
        pieces = [sorted(p) for p in read] if sort_pieces else read
        flat = [ts for p in pieces for ts in p]
        t.update(batch(flat).records, runs=tuple(len(p) for p in pieces))
        stream += flat
    assert (t.inversions, t.max_inversion_ns, t.max_seen) == naive(stream)
