"""kernelscope.hist: bucket bounds, estimates, map-frame layouts, and real BPF histograms.

The ground truth is values the test makes: numpy draws them, Python's int.bit_length()
buckets them (floor(log2 v) = v.bit_length() - 1, the documented rule, computed another way
than the module's shifts), and the kernel tests make read() calls of sizes they choose.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from programs import LOG2L

from kernelscope import Probe
from kernelscope.hist import Histogram, HistogramError, from_map_frame, guess_unit, log2_bounds, log2_slot
from kernelscope.maps import syscall


def floor_log2(v: int) -> int:
    return max(v.bit_length() - 1, 0)


# --- bounds ---------------------------------------------------------------------------------------
def test_log2_bounds_are_the_tools_printed_ranges() -> None:
    low, high = log2_bounds(64)
    assert (int(low[0]), int(high[0])) == (0, 1)  # libbpf-tools print_log2_hist: "0 -> 1"
    assert [(int(a), int(b)) for a, b in zip(low[1:5], high[1:5], strict=True)] == \
        [(2, 3), (4, 7), (8, 15), (16, 31)]
    assert (int(low[63]), int(high[63])) == (2**63, 2**64 - 1)
    bl, bh = log2_bounds(65, "bcc")
    assert (int(bl[1]), int(bh[1])) == (0, 1)  # BCC print_log2_hist starts at slot 1: "0 -> 1"
    assert (int(bl[5]), int(bh[5])) == (16, 31)
    assert (int(bl[64]), int(bh[64])) == (2**63, 2**64 - 1)
    # contiguous: each bucket starts one past the previous end
    assert np.array_equal(low[1:].astype(object), high[:-1].astype(object) + 1)


def test_slots_of_edge_values_match_bit_length() -> None:
    edges = sorted({0, 1, 2, 3, 4, 7, 8, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**63, 2**64 - 1}
                   | {2**i + d for i in range(1, 64) for d in (-1, 0, 1)})
    v = np.array(edges, dtype=np.uint64)
    assert log2_slot(v).tolist() == [floor_log2(x) for x in edges]
    assert log2_slot(v, "bcc").tolist() == [floor_log2(x) + 1 for x in edges]  # bpf_log2l: one more


@pytest.mark.parametrize("scale", [10, 1_000, 10**6, 10**12])
def test_random_values_fall_in_their_buckets_and_percentiles_in_the_estimated_bucket(scale: int) -> None:
    rng = np.random.default_rng(scale)
    values = rng.lognormal(np.log(scale), 1.5, 20_000).astype(np.int64)
    counts = np.bincount([floor_log2(int(x)) for x in values], minlength=64)
    h = Histogram.log2(counts, "us")
    f = h.frame(full=True)
    for lo, hi, c in f[["low", "high", "count"]].itertuples(index=False):
        assert c == int(((values >= int(lo)) & (values <= int(hi))).sum())
    assert h.total == len(values) == Histogram.of(values).total
    assert h == Histogram.of(values, unit="us")  # bucketing raw values agrees with bit_length
    for q in (0, 1, 10, 50, 90, 99, 99.9, 100):
        true = np.percentile(values, q, method="inverted_cdf")  # nearest rank
        lo, hi = h.percentile_bucket(q)
        assert lo <= true <= hi
        est = h.percentile(q)
        assert lo <= est <= hi
        assert abs(est - true) <= hi - lo
    mid = h.mean()
    widest = max(int(r.high) - int(r.low) for r in f[f["count"] > 0].itertuples())
    assert abs(mid - values.mean()) <= widest / 2


def test_bcc_rule_is_the_libbpf_rule_shifted_by_one_and_refuses_slot_zero() -> None:
    counts = np.array([0, 5, 3, 0, 7])  # bpf_log2l: slot 1 = [0, 1]
    assert Histogram.log2(counts, rule="bcc") == Histogram.log2(counts[1:])
    with pytest.raises(HistogramError, match="bpf_log2l never returns 0"):
        Histogram.log2([2, 5], rule="bcc")


def test_linear_buckets_and_labels() -> None:
    h = Histogram.linear([1, 0, 4], step=10, start=100, unit="ms")
    f = h.frame()
    assert f[["low", "high", "count"]].values.tolist() == [[100, 109, 1], [110, 119, 0], [120, 129, 4]]
    assert h.labels() == ["100-109 ms", "110-119 ms", "120-129 ms"]
    assert Histogram.linear([3], step=1).labels() == ["0"]
    assert Histogram.of(np.array([100, 125, 129, 121, 128]), "linear", step=10, start=100) == \
        Histogram.linear([1, 0, 4], step=10, start=100)
    with pytest.raises(HistogramError, match="whole step"):
        Histogram.linear([1], step=0)


def test_log2_labels_read_like_the_tools() -> None:
    h = Histogram.log2([1, 0, 0, 0, 2], "us")
    assert h.labels()[:2] == ["0-1 us", "2-3 us"]
    assert h.labels()[4] == "16-31 us"


# --- properties -------------------------------------------------------------------------------------
counts_st = st.lists(st.integers(0, 10**9), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(counts_st, counts_st)
def test_total_is_conserved_and_subtract_undoes_merge(a: list[int], b: list[int]) -> None:
    ha, hb = Histogram.log2(a), Histogram.log2(b)
    s = ha + hb
    assert s.total == sum(a) + sum(b)
    assert (s - hb) == ha
    assert (s - ha) == hb
    assert int(s.frame(full=True)["count"].sum()) == s.total


@settings(max_examples=200, deadline=None)
@given(counts_st.filter(any), st.lists(st.floats(0, 100), min_size=2, max_size=10))
def test_percentile_is_monotonic_in_q(counts: list[int], qs: list[float]) -> None:
    h = Histogram.log2(counts)
    est = [h.percentile(q) for q in sorted(qs)]
    assert all(x <= y for x, y in itertools.pairwise(est))
    lows = [h.percentile_bucket(q)[0] for q in sorted(qs)]
    assert lows == sorted(lows)


def test_subtracting_the_later_read_is_an_error_that_says_which_way() -> None:
    with pytest.raises(HistogramError, match="earlier read from the later"):
        Histogram.log2([1, 2]) - Histogram.log2([1, 3])
    with pytest.raises(HistogramError, match="layouts"):
        Histogram.log2([1]) + Histogram.linear([1], step=5)


def test_per_key_merge_keeps_keys_seen_on_one_side() -> None:
    a = from_map_frame(pd.DataFrame({"disk": ["sda", "sda", "sdb"], "slot": [1, 2, 2], "value": [1, 2, 3]}))
    b = from_map_frame(pd.DataFrame({"disk": ["sdb", "sdc"], "slot": [3, 1], "value": [4, 5]}))
    m = a + b
    assert m.totals.to_dict() == {"sda": 3, "sdb": 7, "sdc": 5}
    assert (m - b).totals.to_dict() == {"sda": 3, "sdb": 3, "sdc": 0}


# --- map frames ---------------------------------------------------------------------------------------
def test_bcc_scalar_key_frame() -> None:
    df = pd.DataFrame({"key": [1, 2, 7], "value": np.array([4, 6, 1], np.uint64)})
    h = from_map_frame(df, name="dist_usecs")
    assert h.unit == "us"
    assert h.keys is None
    f = h.frame()
    assert f.loc[f["count"] > 0, ["low", "high", "count"]].values.tolist() == \
        [[0, 1, 4], [2, 3, 6], [64, 127, 1]]


def test_bcc_struct_key_with_slot_gives_one_histogram_per_other_key_field() -> None:
    df = pd.DataFrame({"disk": ["sda", "sdb", "sda"], "slot": [3, 3, 4], "value": [2, 5, 1]})
    h = from_map_frame(df, unit="bytes")
    assert list(h.keys["disk"]) == ["sda", "sdb"]  # type: ignore[index]
    f = h.frame()
    assert list(f.columns) == ["disk", "low", "high", "count"]
    got = f[f["count"] > 0].values.tolist()
    assert got == [["sda", 4, 7, 2], ["sda", 8, 15, 1], ["sdb", 4, 7, 5]]
    assert h.percentile(50).to_dict() == pytest.approx({"sda": 4 + 0.75 * 3, "sdb": 4 + 0.5 * 3})
    assert from_map_frame(df, key=False).total == 8  # everything into one


def test_libbpf_tools_struct_hist_frame_keeps_key_and_comm() -> None:
    slots = [np.array([0, 2, 0, 1], np.uint32), np.array([3, 0, 0, 0], np.uint32)]
    df = pd.DataFrame({"key": [10, 20], "slots": slots, "comm": ["dd", "cat"]})
    h = from_map_frame(df, name="hists_ns")
    assert h.unit == "ns"
    assert h.keys.to_dict("list") == {"key": [10, 20], "comm": ["dd", "cat"]}  # type: ignore[union-attr]
    f = h.frame()
    assert f[f["count"] > 0].values.tolist() == \
        [[10, "dd", 2, 3, 2], [10, "dd", 8, 15, 1], [20, "cat", 0, 1, 3]]
    one = from_map_frame(df.iloc[:1])
    assert one.keys is None
    assert one.total == 3
    lin = from_map_frame(df, layout="linear", step=100, key="comm")
    assert lin.frame()[["comm", "low", "high"]].values.tolist()[:2] == [["dd", 0, 99], ["dd", 100, 199]]


@pytest.mark.parametrize(("names", "unit"), [
    (("dist_usecs",), "us"), (("lat_us",), "us"), (("delta_ns",), "ns"), (("msecs",), "ms"),
    (("io_bytes",), "bytes"), (("kbytes",), "KiB"), (("dist", None, "slots"), ""), (("business",), "")])
def test_unit_guesses(names: tuple[Any, ...], unit: str) -> None:
    assert guess_unit(*names) == unit


def test_bad_frames_say_what_is_wrong() -> None:
    with pytest.raises(HistogramError, match="slot column"):
        from_map_frame(pd.DataFrame({"pid": [1], "count": [2]}))
    with pytest.raises(HistogramError, match="step="):
        from_map_frame(pd.DataFrame({"key": [1], "value": [2]}), layout="linear")
    with pytest.raises(HistogramError, match="not in the frame"):
        from_map_frame(pd.DataFrame({"key": [1], "value": [2]}), key="disk")
    with pytest.raises(HistogramError, match="0, 100"):
        Histogram.log2([1]).percentile(101)


def test_views_without_a_kernel() -> None:
    df = pd.DataFrame({"disk": ["sda", "sdb"], "slot": [5, 6], "value": [3, 4]})
    h = from_map_frame(df, unit="us")
    page = h._repr_html_()
    assert "<script" not in page
    assert page.count("<table") == 2
    assert "16-31 us" in page
    fig = h.plot()
    assert [t.name for t in fig.data] == ["sda", "sdb"]
    assert list(fig.data[0].x) == h.labels(slice(0, 6))
    assert sum(sum(t.y) for t in fig.data) == h.total


# --- the real kernel: read() sizes the test makes, counted by BPF ----------------------------------
# (fd, size, times): the child process reads /dev/zero through fds 100 and 101 with these sizes.
PLAN = [(100, 0, 2), (100, 1, 3), (100, 100, 10), (100, 5000, 20), (100, 65535, 6), (100, 65536, 4),
        (101, 2, 8), (101, 3, 9), (101, 4096, 5)]
CHILD = """
import json, os, sys
z = os.open("/dev/zero", os.O_RDONLY)
os.dup2(z, 100); os.dup2(z, 101)
sys.stdin.readline()
for fd, size, n in json.loads(sys.argv[1]):
    for _ in range(n):
        os.read(fd, size)
"""

BCC_SOURCE = """
struct fd_slot { u32 fd; u32 slot; };
BPF_HISTOGRAM(sizes);                           // key int: the bpf_log2l slot
BPF_HISTOGRAM(by_fd, struct fd_slot, 256);      // struct key: one histogram per fd

TRACEPOINT_PROBE(syscalls, sys_enter_read) {
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET)
        return 0;
    u32 fd = args->fd;
    if (fd != 100 && fd != 101)
        return 0;
    sizes.increment(bpf_log2l(args->count));
    struct fd_slot k = {.fd = fd, .slot = bpf_log2l(args->count)};
    by_fd.increment(k);
    return 0;
}
"""

CORE_SOURCE = """
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#define MAX_SLOTS 27
struct hist { __u32 slots[MAX_SLOTS]; char comm[16]; };   // as libbpf-tools keep them

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16);
    __type(key, u32);
    __type(value, struct hist);
} hists SEC(".maps");

static struct hist zero;

LOG2L

SEC("tracepoint/syscalls/sys_enter_read")
int on_read(struct trace_event_raw_sys_enter *ctx) {
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET)
        return 0;
    u32 fd = ctx->args[0];
    if (fd != 100 && fd != 101)
        return 0;
    struct hist *h = bpf_map_lookup_elem(&hists, &fd);
    if (!h) {
        bpf_map_update_elem(&hists, &fd, &zero, BPF_NOEXIST);
        h = bpf_map_lookup_elem(&hists, &fd);
        if (!h)
            return 0;
        bpf_get_current_comm(h->comm, sizeof(h->comm));
    }
    u64 slot = log2l(ctx->args[2]);
    if (slot >= MAX_SLOTS)
        slot = MAX_SLOTS - 1;
    __sync_fetch_and_add(&h->slots[slot], 1);
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
""".replace("LOG2L", LOG2L)


def run_plan(source: str) -> tuple[Probe, subprocess.Popen[bytes]]:
    """Load `source` for a child that waits, then let it make PLAN's reads and exit."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(PLAN)], stdin=subprocess.PIPE)
    p = Probe(source.replace("TARGET", str(child.pid)), name="hist-test").start()
    assert child.stdin is not None
    child.stdin.write(b"go\n")
    child.stdin.close()
    assert child.wait(timeout=30) == 0
    p.stop()
    return p, child


def read_map(p: Probe, name: str) -> tuple[np.ndarray, np.ndarray, syscall.Info]:
    fd = p.program.map_fd(name)  # type: ignore[union-attr]
    info = syscall.info(fd)
    el = syscall.read_all(fd, info.key_size, info.value_size, info.max_entries)
    return el.keys, el.values, info


def expected(fd: int | None = None) -> dict[tuple[int, int], int]:
    """(low, high) of each bucket -> reads the plan made of sizes in it (on `fd`, or all)."""
    out: dict[tuple[int, int], int] = {}
    for f, size, n in PLAN:
        if fd is None or f == fd:
            b = floor_log2(size)
            key = (0, 1) if b == 0 else (2**b, 2**(b + 1) - 1)
            out[key] = out.get(key, 0) + n
    return out


def nonzero(f: pd.DataFrame) -> dict[tuple[int, int], int]:
    return {(int(r.low), int(r.high)): int(r.count) for r in f[f["count"] > 0].itertuples()}


def check_percentiles(h: Histogram, fd: int | None = None) -> None:
    sizes = np.array([s for f, s, n in PLAN for _ in range(n) if fd is None or f == fd])
    for q in (0, 25, 50, 75, 99, 100):
        lo, hi = h.percentile_bucket(q)
        assert lo <= np.percentile(sizes, q, method="inverted_cdf") <= hi


@pytest.mark.kernel
def test_bcc_bpf_histogram_counts_exactly_the_reads_made() -> None:
    p, _ = run_plan(BCC_SOURCE)
    try:
        keys, values, info = read_map(p, "sizes")
        assert info.key_size == 4
        assert info.value_size == 8
        frame = pd.DataFrame({"key": keys.view("<i4").ravel(), "value": values.view("<u8").ravel()})
        h = from_map_frame(frame, name="sizes_bytes")
        assert h.unit == "bytes"
        assert h.total == sum(n for _, _, n in PLAN)
        assert nonzero(h.frame()) == expected()
        check_percentiles(h)

        keys, values, info = read_map(p, "by_fd")
        k = keys.view(np.dtype([("fd", "<u4"), ("slot", "<u4")])).ravel()
        frame = pd.DataFrame({"fd": k["fd"], "slot": k["slot"], "value": values.view("<u8").ravel()})
        per_fd = from_map_frame(frame)
        assert sorted(per_fd.keys["fd"]) == [100, 101]  # type: ignore[index]
        for fd, one in per_fd.items():
            assert nonzero(one.frame()) == expected(int(fd))
            check_percentiles(one, int(fd))
        assert per_fd.total == h.total
    finally:
        p.close()


@pytest.mark.kernel
def test_core_struct_hist_counts_exactly_the_reads_made() -> None:
    p, _ = run_plan(CORE_SOURCE)
    try:
        assert p.backend == "libbpf"
        keys, values, info = read_map(p, "hists")
        vdt = np.dtype([("slots", "<u4", (27,)), ("comm", "S16")])
        assert info.value_size == vdt.itemsize
        v = values.view(vdt).ravel()
        frame = pd.DataFrame({"key": keys.view("<u4").ravel(), "slots": list(v["slots"]),
                              "comm": [c.decode() for c in v["comm"]]})
        h = from_map_frame(frame)
        assert h.keys is not None
        assert sorted(h.keys["key"]) == [100, 101]
        assert set(h.keys["comm"]) == {os.path.basename(sys.executable)[:15]}  # what execve named
        for key, one in h.items():
            fd = int(key[0])
            assert nonzero(one.frame()) == expected(fd)
            check_percentiles(one, fd)
        merged = from_map_frame(frame, key=False)
        assert nonzero(merged.frame()) == expected()
    finally:
        p.close()


def test_slot_counts_are_summed_exactly_in_integers() -> None:
    """Counts above 2**53 add exactly (bincount(weights=) summed in float64: 2**53 + 1 became
    2**53), and a total beyond int64 is an error, not a wrapped number."""
    big = 2**53 + 1
    df = pd.DataFrame({"key": np.array([3, 3, 4], np.uint64), "value": np.array([big, big, 1], np.uint64)})
    h = from_map_frame(df, rule="libbpf-tools")
    assert int(h.counts[0][3]) == 2 * big
    assert int(h.counts[0][4]) == 1
    huge = pd.DataFrame({"key": np.array([1, 2], np.uint64), "value": np.array([2**63, 2**63], np.uint64)})
    with pytest.raises(HistogramError, match="2\\*\\*63"):
        from_map_frame(huge, rule="libbpf-tools")
