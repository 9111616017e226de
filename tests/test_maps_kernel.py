"""probe.maps and probe.globals on real programs, both backends (issue 15, the maps layer).

Ground truth is made on purpose: a child process that makes exactly N getppid() calls (the
programs filter on its pid), /proc/softirqs read around the same interval, keys written
from Python. Nothing asserts one machine's timing.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nobody import run_as_nobody
from producers import paused
from programs import LOG2L

from kernelscope import Probe, hist
from kernelscope.backends import libbpf
from kernelscope.captures.replay import replay
from kernelscope.errors import KernelscopeError
from kernelscope.maps import syscall

GETPPID = 110  # x86_64 syscall number (the suite's machines are x86_64)
pytestmark = pytest.mark.kernel

SYSCOUNT = {
    "bcc": r"""
BPF_HASH(counts, u32, u64, 1024);
TRACEPOINT_PROBE(raw_syscalls, sys_enter) {
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET) return 0;
    u32 id = args->id;
    counts.increment(id);
    return 0;
}
""",
    "libbpf": r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 1024); __type(key, u32); __type(value, u64); }
    counts SEC(".maps");
SEC("tp/raw_syscalls/sys_enter")
int ks_syscount(struct trace_event_raw_sys_enter *ctx) {
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET) return 0;
    u32 id = ctx->id;
    u64 one = 1, *v = bpf_map_lookup_elem(&counts, &id);
    if (v) __sync_fetch_and_add(v, 1);
    else bpf_map_update_elem(&counts, &id, &one, BPF_NOEXIST);
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
""",
}

SOFTIRQS = {
    "bcc": r"""
BPF_PERCPU_ARRAY(counts, u64, 10);
TRACEPOINT_PROBE(irq, softirq_entry) {
    u32 vec = args->vec;
    u64 *v = counts.lookup(&vec);
    if (v) (*v)++;
    return 0;
}
""",
    "libbpf": r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, 10); __type(key, u32);
         __type(value, u64); } counts SEC(".maps");
SEC("tp/irq/softirq_entry")
int ks_softirqs(struct trace_event_raw_softirq *ctx) {
    u32 vec = ctx->vec;
    u64 *v = bpf_map_lookup_elem(&counts, &vec);
    if (v) (*v)++;
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
""",
}

# a struct key and value the test writes from Python; the program only declares the map
STRUCTS = {
    "bcc": r"""
struct key_t { u32 pid; char comm[16]; };
struct val_t { u64 count; u32 slots[4]; };
BPF_HASH(tally, struct key_t, struct val_t, 64);
BPF_ARRAY(cells, u64, 8);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    if ((bpf_get_current_pid_tgid() >> 32) != 1) return 0;  /* the maps are the test's to write */
    u32 k = 0;
    u64 *c = cells.lookup(&k);
    if (c) (*c)++;
    struct key_t key = {};
    if (key.pid == 1) tally.delete(&key);
    return 0;
}
""",
    "libbpf": r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct key_t { u32 pid; char comm[16]; };
struct val_t { u64 count; u32 slots[4]; };
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 64); __type(key, struct key_t);
         __type(value, struct val_t); } tally SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 8); __type(key, u32); __type(value, u64); }
    cells SEC(".maps");
SEC("tp/syscalls/sys_enter_getppid")
int ks_structs(void *ctx) {
    if ((bpf_get_current_pid_tgid() >> 32) != 1) return 0;  /* the maps are the test's to write */
    u32 k = 0;
    u64 *c = bpf_map_lookup_elem(&cells, &k);
    if (c) __sync_fetch_and_add(c, 1);
    struct key_t key = {};
    if (key.pid == 1) bpf_map_delete_elem(&tally, &key);
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
""",
}

GLOBALS = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
u32 targ_pid = 0;
u64 hits = 0;
char label[16] = "maps";
const volatile u32 ro_limit = 7;
SEC("tp/syscalls/sys_enter_getppid")
int ks_globals(void *ctx) {
    if ((bpf_get_current_pid_tgid() >> 32) != targ_pid || hits >= ro_limit * 1000000) return 0;
    __sync_fetch_and_add(&hits, 1);
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""

BIG = {
    "bcc": "BPF_HASH(big, u32, u64, 16384);\nTRACEPOINT_PROBE(syscalls, sys_enter_getppid) "
           "{ u32 k = 1; u64 *v = big.lookup(&k); if (v) (*v)++; return 0; }\n",
    "libbpf": r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 16384); __type(key, u32); __type(value, u64); }
    big SEC(".maps");
SEC("tp/syscalls/sys_enter_getppid")
int ks_big(void *ctx) { u32 k = 1; u64 *v = bpf_map_lookup_elem(&big, &k); if (v) __sync_fetch_and_add(v, 1);
                        return 0; }
char LICENSE[] SEC("license") = "GPL";
""",
}

STACKS = {
    "bcc": r"""
BPF_STACK_TRACE(stacks, 64);
BPF_HASH(ids, u32, int, 64);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != TARGET) return 0;
    int id = stacks.get_stackid(args, BPF_F_USER_STACK);
    ids.update(&pid, &id);
    return 0;
}
""",
    "libbpf": r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_STACK_TRACE); __uint(max_entries, 64); __uint(key_size, sizeof(u32));
         __uint(value_size, 127 * sizeof(u64)); } stacks SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 64); __type(key, u32); __type(value, int); }
    ids SEC(".maps");
SEC("tp/syscalls/sys_enter_getppid")
int ks_stacks(void *ctx) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != TARGET) return 0;
    int id = bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK);
    bpf_map_update_elem(&ids, &pid, &id, BPF_ANY);
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
""",
}

BACKENDS = ["bcc", "libbpf"]


def _getppid_count(frame: pd.DataFrame) -> int:
    hit = frame.loc[frame["key"] == GETPPID, "value"]
    return int(hit.iloc[0]) if len(hit) else 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_syscount_counts_exactly_the_getppid_calls_made(backend: str, tmp_path) -> None:
    n = 3_000
    child = paused(n)
    p = Probe(SYSCOUNT[backend], backend=backend, cflags=child.cflags).start()
    try:
        assert "nothing to drain" not in " ".join(p.warnings)  # maps to read: no complaint
        counts = p.maps["counts"]
        assert (counts.kind, counts.key_size, counts.value_size, counts.per_cpu) == ("hash", 4, 8, False)
        assert list(p.maps) == ["counts"]  # kernelscope's gate and accounting maps are hidden
        child.go()
        frame = counts.frame()
        assert list(frame.columns) == ["key", "value"]
        assert _getppid_count(frame) == n
        assert counts.lookup(GETPPID) == n
        assert dict(counts.items())[GETPPID] == n
        assert "counts" in repr(p.maps)
        assert "hash" in p.maps._repr_html_()

        p.stop()
        frozen = counts.frame()
        counts.update(12345, 1)  # a write while stopped: the snapshot is taken again, and shows it
        assert counts.lookup(12345) == 1
        assert _getppid_count(counts.frame()) == n
        assert not frozen.equals(counts.frame())

        path = p.save(tmp_path / "syscount.parquet")
        r = replay(path, speed=None)
        pd.testing.assert_frame_equal(r.maps["counts"].frame(), counts.frame())
        assert r.maps["counts"].lookup(GETPPID) == n
        with pytest.raises(KernelscopeError, match="replay"):
            r.maps["counts"].update(1, 1)
    finally:
        p.close()
    pd.testing.assert_frame_equal(p.maps["counts"].frame(), counts.frame())  # readable after close


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_freezes_the_frame_while_the_kernel_map_moves_on(backend: str, wait_for) -> None:
    # the program counts this process's own syscalls, so the kernel map moves after stop()
    p = Probe(SYSCOUNT[backend], backend=backend, cflags=[f"-DTARGET={os.getpid()}"]).start()
    try:
        counts = p.maps["counts"].watch(every=0.05)
        for _ in range(3):
            before_sample = counts.history()["snapshot_time"].nunique()
            for _ in range(100):
                os.getppid()
            wait_for(lambda n=before_sample: counts.history()["snapshot_time"].nunique() > n + 1, timeout=10,
                     what="two more watch samples")
        p.stop()
        history = counts.history()
        assert list(history.columns) == ["snapshot_time", "key", "value"]
        seen = history[history["key"] == GETPPID]["value"]
        assert (seen.diff().dropna() >= 0).all()
        assert seen.nunique() >= 3  # each round of calls shows as a step
        assert seen.max() >= 300
        assert len(counts.history()) == len(history)  # the watch stopped with the probe
        frozen = p.maps["counts"].frame()
        before = _getppid_count(frozen)
        assert before >= 300
        for _ in range(250):
            os.getppid()
        time.sleep(1.0)
        after = p.maps["counts"].frame()
        pd.testing.assert_frame_equal(after, frozen)  # identical 1 s later
        live = _getppid_count(p.maps["counts"].frame(live=True))
        assert live >= before + 250  # the map-update helpers are not gated: the kernel map moved on
        p.start()
        assert _getppid_count(p.maps["counts"].frame()) >= live  # start() reads live again
    finally:
        p.close()


class ProgInfo(ctypes.Structure):
    """struct bpf_prog_info (include/uapi/linux/bpf.h) up to recursion_misses (Linux 5.12)."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16),
                ("ifindex", ctypes.c_uint32), ("gpl_compatible", ctypes.c_uint32),
                ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
                ("nr_jited_ksyms", ctypes.c_uint32), ("nr_jited_func_lens", ctypes.c_uint32),
                ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64),
                ("btf_id", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
                ("func_info", ctypes.c_uint64), ("nr_func_info", ctypes.c_uint32),
                ("nr_line_info", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
                ("jited_line_info", ctypes.c_uint64), ("nr_jited_line_info", ctypes.c_uint32),
                ("line_info_rec_size", ctypes.c_uint32), ("jited_line_info_rec_size", ctypes.c_uint32),
                ("nr_prog_tags", ctypes.c_uint32), ("prog_tags", ctypes.c_uint64),
                ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
                ("recursion_misses", ctypes.c_uint64)]


def _recursion_misses(prog_fd: int) -> int:
    """How often the kernel skipped the program because a BPF program already ran on the CPU."""
    info = ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    assert libbpf.lib().bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(size)) == 0
    return int(info.recursion_misses)


def _proc_softirqs() -> dict[str, int]:
    """/proc/softirqs: vector name -> count summed over CPUs."""
    with open("/proc/softirqs") as f:
        lines = f.read().splitlines()[1:]
    return {ln.split(":")[0].strip(): sum(int(x) for x in ln.split(":")[1].split()) for ln in lines}


VECTORS = ["HI", "TIMER", "NET_TX", "NET_RX", "BLOCK", "IRQ_POLL", "TASKLET", "SCHED", "HRTIMER", "RCU"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_softirqs_per_cpu_array_matches_proc_softirqs(backend: str) -> None:
    """Tolerance: the kernel bumps /proc/softirqs (kstat_incr_softirqs_this_cpu) and fires
    irq:softirq_entry one after the other for every softirq it runs, so over one interval the
    two agree exactly but for the softirqs that ran in the gaps between the reads. The reads
    are ordered proc, map, ..., map, proc, so the map's interval lies inside /proc's: map <= proc
    (plus one per CPU and boundary, for a softirq counted just before a read and traced just
    after it), and proc - map is what ran in the two gaps, checked against the rate seen, plus
    the softirqs the kernel did not run the program for: a softirq that interrupts a BPF
    program already running on its CPU (another tracer's, on this shared machine) skips
    tracing programs, counting each skip in the program's recursion_misses (trace_call_bpf)."""
    ncpus = libbpf.possible_cpus()
    p = Probe(SOFTIRQS[backend], backend=backend).start()
    fn = "tracepoint__irq__softirq_entry" if backend == "bcc" else "ks_softirqs"
    try:
        prog_fd = p.program_fd(fn)
        misses0 = _recursion_misses(prog_fd)
        m = p.maps["counts"]
        assert (m.per_cpu, m.kind) == (True, "percpu_array")
        t0 = time.monotonic()
        a = _proc_softirqs()
        m0 = m.frame()
        g0 = time.monotonic() - t0
        time.sleep(1.0)
        t1 = time.monotonic()
        m1 = m.frame()
        b = _proc_softirqs()
        g1 = time.monotonic() - t1
        span = time.monotonic() - t0
        misses = _recursion_misses(prog_fd) - misses0
        p.stop()  # one snapshot: both views below read the same bytes
        by_cpu, frozen = m.frame(per_cpu=True), m.frame()
    finally:
        p.close()
    assert list(by_cpu.columns) == ["key", "cpu", "value"]
    assert len(by_cpu) == 10 * ncpus
    summed = by_cpu.groupby("key")["value"].sum()
    np.testing.assert_array_equal(summed.to_numpy(), frozen["value"].to_numpy())  # rows sum to the frame
    got = dict(zip(m1["key"], m1["value"] - m0["value"], strict=True))
    for i, name in enumerate(VECTORS):
        proc = b[name] - a[name]
        rate = proc / span
        gaps = rate * (g0 + g1) * 4 + 4  # what ran while the two pairs of reads were made, with room
        assert got[i] <= proc + 2 * ncpus, (name, got[i], proc)
        assert proc - got[i] <= gaps + misses, (name, got[i], proc, gaps, misses)
    assert got[VECTORS.index("TIMER")] + got[VECTORS.index("RCU")] + got[VECTORS.index("SCHED")] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_element_access_with_struct_keys_and_values(backend: str) -> None:
    p = Probe(STRUCTS[backend], backend=backend).load()
    try:
        tally = p.maps["tally"]
        assert (tally.key_dtype.names, tally.value_dtype.names) == (("pid", "comm"), ("count", "slots"))
        tally.update({"pid": 7, "comm": "seven"}, {"count": 70, "slots": [1, 2, 3, 4]})
        tally.update({"pid": 8, "comm": "eight"}, {"count": 80, "slots": [5, 6, 7, 8]})
        frame = tally.frame()
        assert list(frame.columns) == ["pid", "comm", "count", "slots"]
        rows = frame.sort_values("pid").reset_index(drop=True)
        assert rows["comm"].tolist() == ["seven", "eight"]
        assert rows["count"].tolist() == [70, 80]
        assert rows["slots"][1].tolist() == [5, 6, 7, 8]
        got = tally.lookup({"pid": 7, "comm": "seven"})
        assert (got["count"], got["slots"].tolist()) == (70, [1, 2, 3, 4])
        assert tally.lookup({"pid": 9, "comm": "x"}) is None
        assert tally.delete({"pid": 8, "comm": "eight"}) is True
        assert tally.delete({"pid": 8, "comm": "eight"}) is False
        tally.zero()
        assert tally.frame()["count"].tolist() == [0]
        tally.update({"pid": 9, "comm": "nine"}, {"count": 9})
        drained = tally.drain()
        assert sorted(drained["pid"].tolist()) == [7, 9]
        assert len(tally.frame()) == 0
        tally.update({"pid": 1, "comm": "one"}, {"count": 1})
        tally.clear()
        assert len(tally.frame()) == 0
        with pytest.raises(KernelscopeError, match="no field 'cnt'"):
            tally.update({"pid": 1, "comm": "x"}, {"cnt": 1})

        cells = p.maps["cells"]  # an array: every index exists; delete and clear zero
        cells.update(3, 33)
        assert cells.frame()["value"].tolist() == [0, 0, 0, 33, 0, 0, 0, 0]
        assert cells.drain()["value"].tolist()[3] == 33
        assert cells.frame()["value"].sum() == 0
        cells.update(2, 5)
        cells.delete(2)
        assert cells.lookup(2) == 0
        with pytest.raises(KernelscopeError, match="does not fit"):
            cells.update(1, 1 << 70)
    finally:
        p.close()


def test_globals_read_write_change_what_is_counted(tmp_path) -> None:
    p = Probe(GLOBALS, backend="libbpf").start()
    try:
        g = p.globals
        assert {"targ_pid", "hits", "label", "ro_limit"} <= set(g)
        assert not any(name.startswith("__ks_") for name in g)
        assert (g["targ_pid"], g["hits"], g["label"], g["ro_limit"]) == (0, 0, "maps", 7)
        first = paused(400)
        g["targ_pid"] = first.pid
        first.go()
        assert g["hits"] == 400
        ignored = paused(300)  # not the target: not counted
        ignored.go()
        second = paused(250)
        g["targ_pid"] = second.pid
        second.go()
        assert g["hits"] == 650
        assert p.maps[".bss"].frame()["hits"].tolist() == [650]
        g["label"] = "renamed"
        assert g["label"] == "renamed"
        with pytest.raises(KernelscopeError, match="const volatile"):
            g["ro_limit"] = 1
        p.stop()
        assert p.globals["hits"] == 650  # the stop-time snapshot
        assert "hits" in p._repr_html_()  # no output map: the probe shows its maps
        path = p.save(tmp_path / "g.parquet")
    finally:
        p.close()
    r = replay(path, speed=None)
    assert (r.globals["hits"], r.globals["label"], r.globals["ro_limit"]) == (650, "renamed", 7)
    with pytest.raises(KernelscopeError, match="replay"):
        r.globals["targ_pid"] = 1


BSS_ONLY = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
u32 targ_pid = 0;
u64 hits = 0;
SEC("tp/syscalls/sys_enter_getppid")
int ks_bss(void *ctx) {
    if ((bpf_get_current_pid_tgid() >> 32) == targ_pid) __sync_fetch_and_add(&hits, 1);
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""


def test_globals_of_a_program_with_only_a_bss_section() -> None:
    # zero-initialised globals only: no .data or .rodata map, and `name in probe.maps` says so
    p = Probe(BSS_ONLY, backend="libbpf").start()
    try:
        assert ".bss" in p.maps
        assert ".data" not in p.maps
        assert ".rodata" not in p.maps
        child = paused(123)
        p.globals["targ_pid"] = child.pid
        child.go()
        assert p.globals["hits"] == 123
    finally:
        p.close()


def test_bcc_has_no_globals_and_says_what_to_use() -> None:
    p = Probe(SYSCOUNT["bcc"], backend="bcc", cflags=["-DTARGET=1"]).load()
    try:
        with pytest.raises(KernelscopeError, match="BPF_ARRAY"):
            p.globals["x"]
    finally:
        p.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_maps_are_listed_but_point_at_the_frame(backend: str) -> None:
    from test_unprivileged import SOURCES

    p = Probe(SOURCES[backend], backend=backend, cflags=["-DTARGET=1"]).load()
    try:
        name = "ks_unpriv_ev" if backend == "bcc" else "ks_unpriv_core"
        assert p.maps[name].kind == "ringbuf"
        with pytest.raises(KernelscopeError, match=r"probe.df / probe.frame\(name\)"):
            p.maps[name].frame()
    finally:
        p.close()


def _replayed_frames(path: str) -> dict[str, pd.DataFrame]:
    r = replay(path, speed=None)
    return {name: r.maps[name].frame() for name in r.maps}


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_and_replay_give_identical_map_frames_also_unprivileged(backend: str) -> None:
    import kernelscope.captures.replay  # noqa: F401 (imported before the fork)

    child = paused(1_000)
    p = Probe(SYSCOUNT[backend], backend=backend, cflags=child.cflags).start()
    try:
        child.go()
        p.stop()
        expected = p.maps["counts"].frame()
        folder = Path(tempfile.mkdtemp(prefix="ks-maps-"))  # /tmp: a folder uid 65534 may enter
        path = p.save(folder / "c.parquet")
    finally:
        p.close()
    try:
        os.chmod(folder, 0o755)
        os.chmod(path, 0o644)
        out = run_as_nobody(lambda: _replayed_frames(str(path)))
    finally:
        shutil.rmtree(folder)
    assert out.error is None, out.traceback
    pd.testing.assert_frame_equal(out.value["counts"], expected)
    assert _getppid_count(out.value["counts"]) == 1_000


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_reads_use_far_fewer_syscalls_than_key_by_key(backend: str) -> None:
    n = 10_000
    p = Probe(BIG[backend], backend=backend).load()
    try:
        big = p.maps["big"]
        keys = np.arange(1, n + 1, dtype="<u4")
        values = keys.astype("<u8") * 3
        libbpf.map_update_batch(big.fd, keys.tobytes(), values.tobytes(), n)
        t0 = time.perf_counter()
        batched = syscall.read_all(big.fd, 4, 8, big.max_entries, batch=True)
        t1 = time.perf_counter()
        single = syscall.read_all(big.fd, 4, 8, big.max_entries, batch=False)
        t2 = time.perf_counter()
        frame = big.frame()
    finally:
        p.close()
    print(f"\n{backend}: {n} keys, batch: {batched.syscalls} syscalls, {n / (t1 - t0):,.0f} keys/s; "
          f"key by key: {single.syscalls} syscalls, {n / (t2 - t1):,.0f} keys/s")
    assert (batched.batched, single.batched) == (True, False)
    assert len(batched.keys) == len(single.keys) == n
    assert batched.syscalls * 100 < single.syscalls
    assert frame["key"].tolist() == keys.tolist()
    assert frame["value"].tolist() == values.tolist()



@pytest.mark.parametrize("backend", BACKENDS)
def test_stack_trace_maps_read_key_by_key_as_address_arrays(backend: str) -> None:
    p = Probe(STACKS[backend], backend=backend, cflags=[f"-DTARGET={os.getpid()}"]).start()
    try:
        for _ in range(10):
            os.getppid()
        p.stop()
        stacks, ids = p.maps["stacks"], p.maps["ids"]
        assert stacks.kind == "stack_trace"
        stack_id = ids.lookup(os.getpid())
        assert stack_id is not None
        assert stack_id >= 0  # a user stack was taken
        frame = stacks.frame()
        assert stack_id in frame["key"].tolist()
        column = frame.columns[1]
        ips = frame.loc[frame["key"] == stack_id, column].iloc[0]
        assert ips.dtype == np.uint64
        assert len(ips) == 127
        assert ips[0] != 0  # the innermost user frame's address
        got = syscall.read_all(stacks.fd, 4, stacks.value_size, stacks.max_entries)
        assert not got.batched  # the kernel has no batch lookup for stack-trace maps
    finally:
        p.close()


HISTOGRAMS = {
    "bcc": r"""
BPF_HISTOGRAM(dist_usecs);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET) return 0;
    dist_usecs.increment(bpf_log2l(bpf_get_prandom_u32() % 1000));
    return 0;
}
""",
    "libbpf": r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct hist { __u32 slots[26]; };
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1); __type(key, u32);
         __type(value, struct hist); } dist_usecs SEC(".maps");
LOG2L
SEC("tp/syscalls/sys_enter_getppid")
int ks_hist(void *ctx) {
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET) return 0;
    u32 zero = 0;
    struct hist *h = bpf_map_lookup_elem(&dist_usecs, &zero);
    if (!h) return 0;
    u64 slot = log2l(bpf_get_prandom_u32() % 1000);
    if (slot < 26) __sync_fetch_and_add(&h->slots[slot], 1);
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
""".replace("LOG2L", LOG2L),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_histogram_map_becomes_a_histogram_with_every_sample(backend: str) -> None:
    child = paused(700)
    p = Probe(HISTOGRAMS[backend], backend=backend, cflags=child.cflags).start()
    try:
        empty = p.maps["dist_usecs"].hist()  # nothing counted yet: an empty histogram, not an error
        child.go()
        p.stop()
        h = p.maps["dist_usecs"].hist()
    finally:
        p.close()
    assert isinstance(h, hist.Histogram)
    assert h.total == 700  # one sample per getppid() of the child
    assert empty.total == 0
    assert empty.unit == "us"
    assert h.unit == "us"  # from the map's name
