"""Review fixes of the maps layer on real programs: empty maps saved and replayed, array
globals, BCC tables BCC cannot wrap, signed stack ids in an unsigned field, a value field named
`time` under watch, reloads by reconfigure(), per-CPU writes and 64-bit per-CPU sums.

Ground truth is made on purpose: a child process that makes exactly N getppid() calls (the
programs filter on its pid), values written from Python, a kernel stack asked for with more
frames skipped than any stack has (bpf_get_stackid then returns -EFAULT, kernel/bpf/stackmap.c).
"""

from __future__ import annotations

import errno
import os
import struct

import numpy as np
import pytest
from producers import paused

from kernelscope import Probe
from kernelscope.backends import libbpf
from kernelscope.captures.replay import replay
from kernelscope.errors import ClosedError, KernelscopeError

pytestmark = pytest.mark.kernel

# a counting map keyed like libbpf-tools' profile, but with u32 stack ids (as some tools
# declare them); the kernel stack skips 255 frames: more than perf_event_max_stack (127)
# allows, so bpf_get_stackid returns -EFAULT for it every time
PROFILE_U32 = r"""
struct key_t { u32 pid; u32 user_stack_id; u32 kern_stack_id; char comm[16]; };
BPF_HASH(counts, struct key_t, u64, 1024);
BPF_STACK_TRACE(stacks, 1024);
BPF_HASH(never, u32, u64, 16);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != TARGET) return 0;
    struct key_t key = {.pid = pid};
    key.user_stack_id = stacks.get_stackid(args, BPF_F_USER_STACK);
    key.kern_stack_id = stacks.get_stackid(args, 255);
    bpf_get_current_comm(&key.comm, sizeof(key.comm));
    counts.increment(key);
    if (pid == 0) never.increment(pid);  /* pid 0 makes no syscalls: stays empty */
    return 0;
}
"""


def test_empty_hash_and_stack_maps_save_replay_and_give_empty_stack_frames(tmp_path) -> None:
    """An empty BPF_HASH and an empty stack-trace map are saved and replayed (was: reshape of
    size 0); stacks() before the first sample is an empty frame with its columns."""
    p = Probe(PROFILE_U32, backend="bcc", cflags=["-DTARGET=1"]).start()  # pid 1 never calls getppid
    try:
        df = p.stacks()
        assert len(df) == 0
        assert {"pid", "user_stack_id", "kern_stack_id", "comm", "stack", "user_stack", "kernel_stack",
                "count"} <= set(df.columns)
        p.stop()
        assert len(p.maps["never"].frame()) == len(p.maps["stacks"].frame()) == 0
        path = p.save(tmp_path / "empty.parquet")
    finally:
        p.close()
    r = replay(path, speed=None)
    for name in ("counts", "stacks", "never"):
        assert len(r.maps[name].frame()) == 0
        assert list(r.maps[name].frame().columns) == list(p.maps[name].frame().columns)
    assert len(r.stacks()) == 0


def test_drained_map_saves(tmp_path) -> None:
    child = paused(30)
    p = Probe(PROFILE_U32, backend="bcc", cflags=child.cflags).start()
    try:
        child.go()
        p.stop()
        drained = p.maps["counts"].drain()
        assert int(drained["value"].sum()) == 30
        path = p.save(tmp_path / "drained.parquet")
    finally:
        p.close()
    assert len(replay(path, speed=None).maps["counts"].frame()) == 0


def test_a_u32_stack_id_holding_minus_efault_is_dropped_as_efault() -> None:
    """-EFAULT stored in a `u32 kern_stack_id` (4294967282) is no kernel stack, counted as
    EFAULT (was: '[missing kernel stack]', 'not in the stack map')."""
    child = paused(25)
    p = Probe(PROFILE_U32, backend="bcc", cflags=child.cflags).start()
    try:
        child.go()
        p.stop()
        raw = p.maps["counts"].frame()
        assert set(raw["kern_stack_id"]) == {2**32 - errno.EFAULT}  # the kernel's -EFAULT, unsigned
        df = p.stacks()
    finally:
        p.close()
    assert int(df["count"].sum()) == 25
    assert all(k == () for k in df["kernel_stack"])
    assert all(len(u) > 0 for u in df["user_stack"])  # the user stacks were taken
    assert df.attrs["stack_errors"] == {"kernel EFAULT": len(df)}


ARRAY_GLOBAL = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
u32 targ_pid = 0;
int arr[4];
SEC("tp/syscalls/sys_enter_getppid")
int ks_arr(void *ctx) {
    if ((bpf_get_current_pid_tgid() >> 32) != targ_pid) return 0;
    __sync_fetch_and_add(&arr[2], 1);
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""


def test_an_array_global_is_read_written_and_shown() -> None:
    p = Probe(ARRAY_GLOBAL, backend="libbpf").start()
    try:
        g = p.globals
        assert g["arr"].tolist() == [0, 0, 0, 0]
        g["arr"] = [10, 20, 30, 40]
        child = paused(7)
        g["targ_pid"] = child.pid
        child.go()
        assert g["arr"].tolist() == [10, 20, 37, 40]  # the program's 7 increments on our write
        assert "arr=array([10, 20, 37, 40]" in repr(g)
        p.stop()
        assert g["arr"].tolist() == [10, 20, 37, 40]  # the stop-time snapshot
    finally:
        p.close()
    with pytest.raises(ClosedError, match="closed"):
        p.globals["targ_pid"] = 1


PERCPU_UNALIGNED = r"""
struct three { u32 a, b, c; };
BPF_PERCPU_HASH(m, u32, struct three, 16);
BPF_HASH(plain, u32, u64, 16);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != TARGET) return 0;
    struct three v = {1, 2, 3};
    m.update(&pid, &v);
    plain.increment(pid);
    return 0;
}
"""


def test_a_bcc_table_bcc_cannot_wrap_is_listed_untyped_and_stop_freezes_the_rest() -> None:
    """BCC's Table() raises 'Leaf must be aligned to 8 bytes' for this per-CPU hash: the map
    is still listed (bytes values, fd from libbcc) and the other maps are read and frozen."""
    child = paused(5)
    p = Probe(PERCPU_UNALIGNED, backend="bcc", cflags=child.cflags).start()
    try:
        assert {"m", "plain"} <= set(p.maps)
        m = p.maps["m"]
        assert (m.kind, m.value_size, m.per_cpu) == ("percpu_hash", 12, True)
        child.go()
        p.stop()
        assert p.maps["plain"].frame()["value"].tolist() == [5]
        got = m.frame()
        assert got["key"].tolist() == [child.pid]
        assert got["value"].tolist() == [struct.pack("<3I", 1, 2, 3)]  # the one CPU that wrote it
        assert "m" in repr(p.maps)
    finally:
        p.close()


LAST = r"""
struct last_t { u64 time; u64 n; };
BPF_HASH(last, u32, struct last_t, 16);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != TARGET) return 0;
    struct last_t zero = {}, *v = last.lookup_or_try_init(&pid, &zero);
    if (v) { v->time = bpf_ktime_get_ns(); v->n++; }
    return 0;
}
"""


def test_watching_a_value_with_a_time_field_keeps_the_kernels_time(wait_for) -> None:
    child = paused(40)
    p = Probe(LAST, backend="bcc", cflags=child.cflags).start()
    try:
        m = p.maps["last"].watch(every=0.02, max_samples=5)
        child.go()
        wait_for(lambda: (h := m.history()).shape[0] >= 5 and h["n"].iloc[-1] == 40, timeout=10)
        p.stop()
        h = m.history()
        final = p.maps["last"].frame()
    finally:
        p.close()
    assert list(h.columns) == ["snapshot_time", "key", "time", "n"]
    assert len(h) <= 5  # max_samples: only the last five snapshots
    assert h["time"].iloc[-1] == final["time"].iloc[0]  # bpf_ktime_get_ns of the last call
    assert h["snapshot_time"].dtype.kind == "M"


RELOADED = r"""
struct event { u32 pid; };
BPF_RINGBUF_OUTPUT(events, 8);
BPF_HASH(counts, u32, u64, 16);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != TARGET) return 0;
    counts.increment(pid);
    struct event e = {pid};
    events.ringbuf_output(&e, sizeof(e), 0);
    return 0;
}
"""


def test_maps_follow_every_reload_by_reconfigure() -> None:
    """After reconfigure() the maps are the new program's: its ring's max_entries, and a counts
    map that holds exactly what happened since (the old programs' fds are closed). 20 rounds of
    two reloads each: id() of a freed program is reused, a weak reference to it is not."""
    pid = os.getpid()
    p = Probe(RELOADED, backend="bcc", cflags=[f"-DTARGET={pid}"]).start()
    try:
        for i in range(20):
            # two reloads between reads: the third program can get the first one's freed address
            p.reconfigure(pages=64)
            pages = 16 if i % 2 else 32
            p.reconfigure(pages=pages)
            assert p.maps["events"].max_entries == pages * 4096
            for _ in range(i + 1):
                os.getppid()
            assert p.maps["counts"].lookup(pid) == i + 1, i  # the new map: only this round's calls
    finally:
        p.close()


PERCPU_WRITES = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct named { char name[8]; u32 n; };
struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, 1); __type(key, u32);
         __type(value, u64[2]); } pair SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, 1); __type(key, u32);
         __type(value, u32); } big SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_PERCPU_HASH); __uint(max_entries, 4); __type(key, u32);
         __type(value, struct named); } names SEC(".maps");
SEC("tp/syscalls/sys_enter_getppid")
int ks_noop(void *ctx) { return 0; }
char LICENSE[] SEC("license") = "GPL";
"""


def test_per_cpu_writes_are_explicit_and_sums_are_64_bit() -> None:
    ncpus = libbpf.possible_cpus()
    p = Probe(PERCPU_WRITES, backend="libbpf").load()
    try:
        pair, big, names = p.maps["pair"], p.maps["big"], p.maps["names"]
        pair.update(0, [5, 6])  # a list is the u64[2] value itself, on CPU 0, on any CPU count
        assert pair.frame()["value"][0].tolist() == [5, 6]
        by_cpu = pair.frame(per_cpu=True)
        assert by_cpu.loc[by_cpu["cpu"] == 0, "value"].iloc[0].tolist() == [5, 6]
        pair.update(0, per_cpu=[[1, 2]] * ncpus)
        assert pair.frame()["value"][0].tolist() == [ncpus, 2 * ncpus]
        with pytest.raises(KernelscopeError, match=f"{ncpus} possible CPUs"):
            pair.update(0, per_cpu=[[1, 2]] * (ncpus + 1))
        with pytest.raises(KernelscopeError, match="either a value or per_cpu"):
            pair.update(0)
        big.update(0, per_cpu=[3_000_000_000] * ncpus)  # each fits a u32, the sum need not
        got = big.frame()
        assert got["value"].dtype == np.uint64
        assert int(got["value"][0]) == 3_000_000_000 * ncpus
        assert big.lookup(0) == 3_000_000_000 * ncpus
        # text: the first CPU's copy that is not empty (CPU 0 never wrote one here)
        names.update(1, per_cpu=[{"n": 1}] * (ncpus - 1) + [{"name": "last", "n": 2}])
        row = names.frame()
        assert row["name"].tolist() == ["last"]
        assert row["n"].tolist() == [ncpus - 1 + 2]
    finally:
        p.close()


TAGGED = r"""
struct key_t { u32 pid; int user_stack_id; };
struct tag_t { char tag[8]; };
BPF_HASH(counts, struct key_t, struct tag_t, 64);
BPF_STACK_TRACE(stacks, 64);
struct pad_t { u8 kind; u64 total; };
BPF_HASH(padded, u32, struct pad_t, 16);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != TARGET) return 0;
    struct key_t key = {.pid = pid, .user_stack_id = stacks.get_stackid(args, BPF_F_USER_STACK)};
    struct tag_t tag = {.tag = "seen"};
    counts.update(&key, &tag);
    struct pad_t zero = {}, *v = padded.lookup_or_try_init(&pid, &zero);
    if (v) { v->kind = 7; v->total++; }
    return 0;
}
"""


def test_no_numeric_value_to_weigh_by_is_a_clear_error_and_bcc_padding_is_no_column() -> None:
    child = paused(3)
    p = Probe(TAGGED, backend="bcc", cflags=child.cflags).start()
    try:
        child.go()
        p.stop()
        assert p.stacks()["tag"].tolist() == ["seen"]
        with pytest.raises(KernelscopeError, match=r"no numeric value column.*\['tag'\]"):
            p.flamegraph()
        # BCC names the 7 bytes between `kind` and `total` __pad_N in its Leaf: no column
        df = p.maps["padded"].frame()
        assert list(df.columns) == ["key", "kind", "total"]
        assert (df["kind"].tolist(), df["total"].tolist()) == ([7], [3])
        assert p.maps["padded"].items() == [(child.pid, {"kind": 7, "total": 3})]
    finally:
        p.close()


SIZED = "BPF_HASH(counts, u32, u64, SIZE);\nTRACEPOINT_PROBE(syscalls, sys_enter_getppid) { return 0; }\n"


class _Loaded:
    """A loaded program as Maps sees it, in an object CPython recycles at once: the address of
    a freed one is what id() compared (the programs behind are real, their maps the kernel's)."""

    def __init__(self, prog: object) -> None:
        self.prog = prog

    def map_types(self) -> list:
        return self.prog.map_types()  # type: ignore[attr-defined]


def test_maps_tell_a_new_program_from_a_freed_one_at_the_same_address() -> None:
    from kernelscope.maps.table import Maps

    small = Probe(SIZED, backend="bcc", cflags=["-DSIZE=16"]).load()
    large = Probe(SIZED, backend="bcc", cflags=["-DSIZE=32"]).load()
    try:
        progs = [small.maps._prog(), large.maps._prog()]
        cur: list[_Loaded | None] = [_Loaded(progs[0])]
        maps = Maps(lambda: cur[0])
        reused = 0
        for i in range(20):
            want = 16 if i % 2 == 0 else 32
            assert maps["counts"].max_entries == want, i
            assert maps["counts"].fd == progs[i % 2].map_types()[0].fd
            old = id(cur[0])
            cur[0] = None  # freed: the next _Loaded may get its address
            cur[0] = _Loaded(progs[(i + 1) % 2])
            reused += id(cur[0]) == old
        assert reused > 0  # the case id() got wrong did happen in this run
    finally:
        small.close()
        large.close()
