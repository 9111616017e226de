"""Event types real tools use, and the values in their columns, on the running kernel.

The programs are written here in the style of libbpf-tools (a header next to the file for
the event struct, `SEC("tp/...")`, per-CPU scratch maps, BPF_URETPROBE), each checked against
events the test makes on purpose: signals to known pids, a TCP connection on loopback, opens
of known paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from util import wait_for

from kernelscope import Probe, ip_address
from kernelscope.backends import toolchain
from kernelscope.errors import SchemaError
from kernelscope.schema import Schema, time_unit

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"

# A kill(2) entry tracepoint, for the test process only: `args[0]` the target, `args[1]` the signal.
KILL_FILTER = """
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET) return 0;
    __u32 target = (__u32)ctx->args[0];
    __u32 sig = (__u32)ctx->args[1];
"""


def run(source: str, trigger, rows: int, **kw) -> pd.DataFrame:
    """Start `source`, call `trigger()`, wait for `rows` rows of its one output map, stop."""
    cflags = [f"-DTARGET={os.getpid()}", *kw.pop("cflags", [])]
    p = Probe(source, cflags=cflags, **kw).start()
    try:
        trigger()
        wait_for(lambda: len(p.df) >= rows, timeout=10, what=f"{rows} events")
        p.stop()
        df = p.df
        st = next(iter(p.stats.values()))
        assert st["attempted"] == st["received"] + st["dropped"]
    finally:
        p.close()
    return df


def kill_children(n: int) -> list[int]:
    """Start `n` sleeping children and send each SIGTERM; their pids, in order."""
    kids = [subprocess.Popen(["sleep", "30"]) for _ in range(n)]
    for k in kids:  # Popen returns once exec closed its pipe, a moment before the kernel renames the task
        wait_for(lambda k=k: Path(f"/proc/{k.pid}/comm").read_text().strip() == "sleep")
    for k in kids:
        os.kill(k.pid, signal.SIGTERM)
    for k in kids:
        k.wait()
    return [k.pid for k in kids]


# --- 128-bit integers ------------------------------------------------------------------------

WIDE = """
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct event { __u32 target; __u32 sig; unsigned __int128 big; __u16 after; };
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 1 << 16); } events SEC(".maps");
SEC("tp/syscalls/sys_enter_kill")
int on_kill(struct trace_event_raw_sys_enter *ctx)
{
""" + KILL_FILTER + """
    struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (!e) return 0;
    e->target = target;
    e->sig = sig;
    e->big = ((unsigned __int128)target << 64) | (__u64)~(__u64)target;  /* hi: pid, lo: ~pid */
    e->after = 0xbeef;
    bpf_ringbuf_submit(e, 0);
    return 0;
}
"""


@pytest.mark.kernel
def test_a_128_bit_field_is_two_u64_halves_with_the_values_the_program_wrote() -> None:
    pids: list[int] = []
    df = run(WIDE, lambda: pids.extend(kill_children(3)), rows=3)
    assert {"big.lo", "big.hi", "after"} <= set(df.columns)
    rows = df.set_index("target").loc[pids]
    assert list(rows["big.hi"]) == pids
    assert list(rows["big.lo"]) == [(~p) & (2**64 - 1) for p in pids]
    assert (rows["after"] == 0xBEEF).all()  # the field after it sits where C put it (align 16)


TCP_STATES = """
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#define AF_INET 2
struct event { unsigned __int128 saddr; unsigned __int128 daddr; __u16 family; __u16 sport; __u16 dport; };
struct { __uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY); __uint(key_size, 4); __uint(value_size, 4); }
    events SEC(".maps");
SEC("tp/sock/inet_sock_set_state")
int on_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
    if (ctx->protocol != IPPROTO_TCP || ctx->newstate != TCP_SYN_SENT ||
        (ctx->dport != PORT4 && ctx->dport != PORT6)) return 0;
    struct event e = {};
    e.family = ctx->family;
    e.sport = ctx->sport;
    e.dport = ctx->dport;
    if (e.family == AF_INET) {
        bpf_probe_read_kernel(&e.saddr, 4, ctx->saddr);
        bpf_probe_read_kernel(&e.daddr, 4, ctx->daddr);
    } else {
        bpf_probe_read_kernel(&e.saddr, 16, ctx->saddr_v6);
        bpf_probe_read_kernel(&e.daddr, 16, ctx->daddr_v6);
    }
    bpf_perf_event_output(ctx, &events, BPF_F_CURRENT_CPU, &e, sizeof(e));
    return 0;
}
"""


@pytest.mark.kernel
def test_tcp_addresses_in_128_bit_fields_read_as_ipv4_and_ipv6_text() -> None:
    servers = []
    for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.bind((host, 0))
        s.listen()
        servers.append((s, host))
    port4, port6 = (s.getsockname()[1] for s, _ in servers)
    clients: list[socket.socket] = []

    def connect() -> None:
        clients.extend(socket.create_connection((host, s.getsockname()[1])) for s, host in servers)

    try:
        df = run(TCP_STATES, connect, rows=2, cflags=[f"-DPORT4={port4}", f"-DPORT6={port6}"])
    finally:
        for c in [*clients, *(s for s, _ in servers)]:
            c.close()
    df = df.assign(src=ip_address(df, "saddr", family=df["family"]),
                   dst=ip_address(df, "daddr", family=df["family"])).set_index("dport")
    assert df.loc[port4, "family"] == socket.AF_INET
    assert (df.loc[port4, "src"], df.loc[port4, "dst"]) == ("127.0.0.1", "127.0.0.1")
    assert df.loc[port6, "family"] == socket.AF_INET6
    assert (df.loc[port6, "src"], df.loc[port6, "dst"]) == ("::1", "::1")
    # without the family column: IPv4 where only the first 4 bytes are set
    assert list(ip_address(df, "daddr")) == list(df["dst"])


def test_ip_address_reads_byte_arrays_and_u32_columns_too() -> None:
    v6 = socket.inet_pton(socket.AF_INET6, "fe80::1")
    df = pd.DataFrame({"a": [np.frombuffer(v6, np.uint8), np.frombuffer(b"\x0a\x00\x00\x01" + bytes(12),
                                                                        np.uint8)],
                       "b": [int.from_bytes(socket.inet_aton("192.168.1.2"), "little")] * 2})
    assert list(ip_address(df, "a")) == ["fe80::1", "10.0.0.1"]
    assert list(ip_address(df, "b", family=socket.AF_INET)) == ["192.168.1.2"] * 2
    with pytest.raises(KeyError, match="no column 'c'"):
        ip_address(df, "c")


# --- anonymous unions and structs ---------------------------------------------------------------

UNIONS = """
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct event {
    __u32 target;
    __u32 kind;
    union {                                  /* mountsnoop's shape: one struct per kind */
        struct { __u64 sig; __u64 target; } kill;
        struct { __u32 code; } other;
        char raw[16];
    };
    struct { __u32 a; __u32 b; };            /* an anonymous struct */
    union { __u64 word; __u32 halves[2]; } u;  /* a named union */
};
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 1 << 16); } events SEC(".maps");
SEC("tp/syscalls/sys_enter_kill")
int on_kill(struct trace_event_raw_sys_enter *ctx)
{
""" + KILL_FILTER + """
    struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (!e) return 0;
    __builtin_memset(e, 0, sizeof(*e));
    e->target = target;
    e->kind = 1;
    e->kill.sig = sig;
    e->kill.target = target;
    e->a = target + 1;
    e->b = sig + 1;
    e->u.word = ((__u64)sig << 32) | target;
    bpf_ringbuf_submit(e, 0);
    return 0;
}
"""


@pytest.mark.kernel
def test_anonymous_unions_and_structs_give_every_member_a_column() -> None:
    pids: list[int] = []
    df = run(UNIONS, lambda: pids.extend(kill_children(2)), rows=2)
    for col in ("kill.sig", "kill.target", "other.code", "raw", "a", "b", "u", "u.word", "u.halves"):
        assert col in df.columns, col
    rows = df.set_index("target").loc[pids]
    term = int(signal.SIGTERM)
    assert (rows["kill.sig"] == term).all()
    assert list(rows["kill.target"]) == pids
    assert list(rows["other.code"]) == [term] * 2  # a view of the same bytes as kill.sig
    assert list(rows["a"]) == [p + 1 for p in pids]
    assert (rows["b"] == term + 1).all()
    assert list(rows["u.word"]) == [(term << 32) | p for p in pids]
    assert [list(h) for h in rows["u.halves"]] == [[p, term] for p in pids]
    assert list(rows["u"]) == [((term << 32) | p).to_bytes(8, "little") for p in pids]  # the raw bytes


# --- dtypes= by struct name ---------------------------------------------------------------------

HEADER = """
#ifndef __NAMED_H
#define __NAMED_H
struct event { __u32 target; __u32 sig; char comm[16]; };
#endif
"""

# The output call in a helper taking `void *`: the text does not say which struct goes out.
NAMED = """
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "named.h"
struct { __uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY); __uint(key_size, 4); __uint(value_size, 4); }
    events SEC(".maps");
static __always_inline void emit(void *ctx, void *data, __u32 size)
{
    bpf_perf_event_output(ctx, &events, BPF_F_CURRENT_CPU, data, size);
}
SEC("tp/syscalls/sys_enter_kill")
int on_kill(struct trace_event_raw_sys_enter *ctx)
{
""" + KILL_FILTER + """
    struct event e = {};
    e.target = target;
    e.sig = sig;
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    emit(ctx, &e, sizeof(e));
    return 0;
}
"""


@pytest.mark.kernel
def test_dtypes_by_struct_name_finds_a_struct_only_local_variables_use(tmp_path: Path) -> None:
    (tmp_path / "named.h").write_text(HEADER)
    pids: list[int] = []
    df = run(NAMED, lambda: pids.extend(kill_children(2)), rows=2, cflags=[f"-I{tmp_path}"],
             dtypes={"events": "struct event"})
    assert list(df.columns[:3]) == ["target", "sig", "comm"]
    rows = df.set_index("target").loc[pids]
    assert (rows["sig"] == int(signal.SIGTERM)).all()
    assert (rows["comm"] == Path("/proc/self/comm").read_text().strip()[:15]).all()


@pytest.mark.kernel
def test_dtypes_naming_a_type_the_program_lacks_says_so(tmp_path: Path) -> None:
    (tmp_path / "named.h").write_text(HEADER)
    with pytest.raises(SchemaError, match=r"no type 'struct nothing_here' in the program"):
        run(NAMED, lambda: None, rows=1, cflags=[f"-I{tmp_path}"], dtypes={"events": "struct nothing_here"})


# compat.bpf.h's shape: the reservation comes back through a `void *` helper.
RESERVED = """
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "named.h"
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 1 << 16); } events SEC(".maps");
static __always_inline void *reserve_buf(__u64 size) { return bpf_ringbuf_reserve(&events, size, 0); }
SEC("tp/syscalls/sys_enter_kill")
int on_kill(struct trace_event_raw_sys_enter *ctx)
{
""" + KILL_FILTER + """
    struct event *e = reserve_buf(sizeof(*e));
    if (!e) return 0;
    e->target = target;
    e->sig = sig;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    bpf_ringbuf_submit(e, 0);
    return 0;
}
"""


@pytest.mark.kernel
def test_a_ring_reserved_through_a_void_pointer_helper_takes_dtypes_by_name(tmp_path: Path) -> None:
    (tmp_path / "named.h").write_text(HEADER)
    pids: list[int] = []
    df = run(RESERVED, lambda: pids.extend(kill_children(2)), rows=2, cflags=[f"-I{tmp_path}"],
             dtypes={"events": "struct event"})
    assert list(df.set_index("target").loc[pids, "sig"]) == [int(signal.SIGTERM)] * 2
    # without dtypes=, the type is the caller's: `struct event *e = reserve_buf(...)`
    pids.clear()
    df = run(RESERVED, lambda: pids.extend(kill_children(2)), rows=2, cflags=[f"-I{tmp_path}"])
    assert list(df.set_index("target").loc[pids, "sig"]) == [int(signal.SIGTERM)] * 2


# --- strings with stale bytes after the NUL ------------------------------------------------------

STRINGS = """
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct event { __u32 pid; char fname[128]; };
struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, 1); __type(key, __u32);
         __type(value, struct event); } heap SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY); __uint(key_size, 4); __uint(value_size, 4); }
    events SEC(".maps");
SEC("tp/syscalls/sys_enter_openat")
int on_open(struct trace_event_raw_sys_enter *ctx)
{
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET) return 0;
    __u32 zero = 0;
    struct event *e = bpf_map_lookup_elem(&heap, &zero);  /* reused: older paths stay behind */
    if (!e) return 0;
    e->pid = TARGET;
    bpf_probe_read_user_str(e->fname, sizeof(e->fname), (const char *)ctx->args[1]);
    bpf_perf_event_output(ctx, &events, BPF_F_CURRENT_CPU, e, sizeof(*e));
    return 0;
}
"""


@pytest.mark.kernel
def test_strings_stop_at_the_first_nul_though_older_bytes_follow_it() -> None:
    paths = ["/nonexistent/" + "x" * 80, "/nonexistent/a", "/nonexistent/" + "y" * 100, "/b"]
    cpu = min(os.sched_getaffinity(0))
    old = os.sched_getaffinity(0)

    def opens() -> None:
        os.sched_setaffinity(0, {cpu})  # one CPU's scratch buffer for every open
        try:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.open(path, os.O_RDONLY)
        finally:
            os.sched_setaffinity(0, old)

    df = run(STRINGS, opens, rows=len(paths))
    mine = [n for n in df["fname"] if n.startswith(("/nonexistent", "/b"))]
    assert mine == paths  # the short paths without the longer ones' tails


# --- time columns by unit -----------------------------------------------------------------------

TIMES = """
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct event { __u32 target; __u32 pad; __u64 duration_ns; __u64 ts_us; __u64 delta_us; };
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 1 << 16); } events SEC(".maps");
SEC("tp/syscalls/sys_enter_kill")
int on_kill(struct trace_event_raw_sys_enter *ctx)
{
""" + KILL_FILTER + """
    struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (!e) return 0;
    e->target = target;
    e->pad = sig;
    e->duration_ns = 1500;
    e->ts_us = bpf_ktime_get_ns() / 1000;
    e->delta_us = 7;
    bpf_ringbuf_submit(e, 0);
    return 0;
}
"""


@pytest.mark.kernel
def test_ks_time_comes_from_ts_us_in_microseconds_never_from_a_duration() -> None:
    before = pd.Timestamp(time.time_ns())
    pids: list[int] = []
    df = run(TIMES, lambda: pids.extend(kill_children(2)), rows=2)
    after = pd.Timestamp(time.time_ns())
    assert "ks_time" in df.columns
    assert (df["ks_time"] >= before - pd.Timedelta("50ms")).all(), (df["ks_time"], before)
    assert (df["ks_time"] <= after + pd.Timedelta("50ms")).all(), (df["ks_time"], after)
    assert (df["duration_ns"] == 1500).all()  # durations stay numbers
    assert (df["delta_us"] == 7).all()


def test_durations_alone_give_no_datetime_column() -> None:
    dt = np.dtype([("pid", "<u4"), ("duration_ns", "<u8"), ("delta_us", "<u8"), ("lat_ns", "<u8"),
                   ("mnt_ns", "<u8")])
    assert "ks_time" not in Schema(dt).columns
    assert [time_unit(n) for n in ("ts", "ts_ns", "ts_us", "start_ms", "exit_ts")] == [
        1, 1, 1_000, 1_000_000, 1]
    assert [time_unit(n) for n in ("duration_ns", "delta_us", "lat_ns", "span_us", "run_delta",
                                    "mnt_ns", "pid")] == [None] * 7


# --- toolchain: newer libbpf macros, kfuncs, -mcpu ---------------------------------------------

URETPROBE = """
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
struct event { __u32 ret; __u32 has_kfunc; char comm[16]; };
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 1 << 16); } events SEC(".maps");
SEC("uretprobe")
int BPF_URETPROBE(on_getpid_return, int ret)
{
    struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (!e) return 0;
    e->ret = ret;
    e->has_kfunc = bpf_ksym_exists(bpf_task_from_pid);
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    bpf_ringbuf_submit(e, 0);
    return 0;
}
"""

KFUNC = """
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct event { __u32 target; __u32 found; char tcomm[16]; };
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 1 << 16); } events SEC(".maps");
SEC("tp/syscalls/sys_enter_kill")
int on_kill(struct trace_event_raw_sys_enter *ctx)
{
""" + KILL_FILTER + """
    struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (!e) return 0;
    e->target = target;
    e->found = 0;
    e->tcomm[0] = 0;
    if (bpf_ksym_exists(bpf_task_from_pid)) {        /* sigsnoop's way to name the target */
        struct task_struct *t = bpf_task_from_pid(target);
        if (t) {
            e->found = 1;
            bpf_probe_read_kernel_str(e->tcomm, sizeof(e->tcomm), t->comm);
            bpf_task_release(t);
        }
    }
    bpf_ringbuf_submit(e, 0);
    return 0;
}
"""


@pytest.mark.kernel
def test_bpf_uretprobe_and_bpf_ksym_exists_compile_against_libbpf_1_1() -> None:
    p = Probe(URETPROBE)
    p.load()
    try:
        p.attach_uprobe(LIBC, "getpid", "on_getpid_return", pid=os.getpid(), retprobe=True)
        p.start()
        libc = ctypes.CDLL(LIBC)
        got = [libc.getpid() for _ in range(3)]
        wait_for(lambda: len(p.df) >= 3, timeout=10, what="3 getpid returns")
        p.stop()
        df = p.df
    finally:
        p.close()
    assert (df["ret"] == got[0]).all()
    assert set(df["has_kfunc"]) == {1}  # the kernel's BTF tags bpf_task_from_pid a kfunc


@pytest.mark.kernel
def test_a_kfunc_prototype_from_the_kernels_btf_reads_the_signalled_task() -> None:
    pids: list[int] = []
    df = run(KFUNC, lambda: pids.extend(kill_children(2)), rows=2)
    rows = df.set_index("target").loc[pids]
    assert (rows["found"] == 1).all()
    assert (rows["tcomm"] == "sleep").all()


def test_kfunc_prototypes_go_inside_the_include_guard_behind_bpftools_switch() -> None:
    header = "#ifndef __VMLINUX_H__\n#define __VMLINUX_H__\nstruct x;\n#endif /* __VMLINUX_H__ */\n"
    out = toolchain.with_kfuncs(header, "extern void f(void) __attribute__((weak));\n")
    assert out.index("#ifndef BPF_NO_KFUNC_PROTOTYPES") < out.index("extern void f") < out.rindex(
        "#endif /* __VMLINUX_H__ */")
    assert "bpf_map_lookup_elem" in toolchain.helper_names()  # never redeclared as a kfunc


# A cpufreq-style histogram: a u32 divided, bounded, then used as an index. Built for
# -mcpu=v3 (32-bit sub-registers), clang checks the bound on the 32-bit half and the
# verifier loses it; clang's default (v1), as the tool's own Makefile builds it, loads.
HIST = """
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#define SLOTS 25
struct hist { __u32 slots[SLOTS]; };
struct hist counts = {};
__u32 value = 0;
SEC("tp/syscalls/sys_enter_kill")
int on_kill(struct trace_event_raw_sys_enter *ctx)
{
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET) return 0;
    __u32 v = (__u32)ctx->args[1] * 200 + value;
    __u32 slot = v / 200;
    if (slot >= SLOTS) slot = SLOTS - 1;
    __sync_fetch_and_add(&counts.slots[slot], 1);
    return 0;
}
"""


def test_mcpu_is_the_kernels_newest_unless_the_cell_gives_one() -> None:
    newest = toolchain.kernel_mcpu()
    assert newest in ("v1", "v2", "v3")
    assert toolchain.mcpu_flags(()) == [f"-mcpu={newest}"]
    assert toolchain.mcpu_flags(("-O2", "-mcpu=v1")) == []  # the cell's own, and only that one
    flags = toolchain.compile_flags(("-mcpu=v1",))
    assert [f for f in flags if f.startswith("-mcpu")] == ["-mcpu=v1"]


@pytest.mark.kernel
def test_a_program_needing_clangs_default_isa_runs_with_mcpu_in_cflags() -> None:
    p = Probe(HIST, cflags=[f"-DTARGET={os.getpid()}", "-mcpu=v1"]).start()
    try:
        kill_children(3)  # SIGTERM = 15: slot 15
        prog = p.program
        assert prog is not None
        bss = next(name for name in prog.maps if name.endswith(".bss"))
        wait_for(lambda: np.frombuffer(prog.map_lookup(bss, 0), "<u4")[15] >= 3, timeout=10,
                 what="3 counts in slot 15")
    finally:
        p.close()


def test_toolchain_include_folder_ships_with_the_package() -> None:
    for name in ("bpf/bpf_helpers.h", "bpf/bpf_tracing.h"):
        text = (toolchain.INCLUDE / name).read_text()
        assert f"#include_next <{name}>" in text
