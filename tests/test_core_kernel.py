"""The CO-RE (libbpf) backend and the user ring buffer, on the running kernel."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from producers import paused
from util import bpf_object_counts, fd_count, refusal, usdt_gc_program

from kernelscope import (
    AttachError,
    CompileError,
    Probe,
    UnsupportedError,
    UserRingFullError,
    VerifierError,
    host,
    sources,
)
from kernelscope.errors import KernelscopeError, SchemaError

pytestmark = pytest.mark.kernel

EXIT_CODES = (3, 7, 42)


def exits_seen(source: str) -> tuple[Probe, list[int]]:
    """Run `source` while three children exit with known codes; their pids."""
    p = Probe(source).start()
    children = [subprocess.Popen(["sh", "-c", f"exit {code}"]) for code in EXIT_CODES]
    for c in children:
        c.wait()
    p.stop()
    return p, [c.pid for c in children]


def test_core_reads_task_struct_right_where_bcc_with_other_headers_does_not() -> None:
    core, pids = exits_seen(sources.read("exit_task_core.c"))
    assert core.backend == "libbpf"
    rows = core.df.set_index("pid").loc[pids]
    assert list(rows["tgid"]) == pids  # task->tgid
    assert (rows["ppid"] == os.getpid()).all()  # task->real_parent->tgid
    assert list(rows["exit_code"]) == list(EXIT_CODES)  # task->exit_code >> 8
    assert (rows["comm"] == "sh").all()
    st = core.stats["exits"]
    assert st["attempted"] == st["received"] + st["dropped"]
    assert st["dropped"] == 0
    core.close()

    bcc, pids = exits_seen(sources.read("exit_task_bcc.c"))
    assert bcc.backend == "bcc"
    rows = bcc.df.set_index("pid").loc[pids]  # the helper-based pid is right with either backend
    right = (rows["tgid"] == pids) & (rows["ppid"] == os.getpid()) & (rows["exit_code"] == list(EXIT_CODES))
    headers = host.find_headers()
    bcc.close()
    assert headers is not None
    if headers.matches_kernel:
        assert right.all(), rows  # matching headers: BCC reads them right too
    else:
        # headers of another kernel (6.1 on this 6.18): the same reads return garbage
        assert not right.any(), rows


def test_user_ring_round_trip_delivers_exactly_the_records_written_in_order() -> None:
    p = Probe(sources.read("user_ringbuf_echo.c")).start()
    n = 5_000
    sent = p.send("user_ringbuf", [{"seq": i, "value": -i, "text": f"s{i}"} for i in range(n)])
    assert sent == n
    assert p.send_stats["user_ringbuf"]["pending"] == n  # nothing drains until the program runs
    assert p.send_stats["user_ringbuf"]["fill_bytes"] == n * (24 + 8)
    os.kill(os.getpid(), 0)  # a kill(2) syscall: the program drains and echoes
    p.stop()
    df = p.df
    assert list(df["seq"]) == list(range(n))
    assert list(df["value"]) == [-i for i in range(n)]
    assert list(df["text"][:3]) == ["s0", "s1", "s2"]
    assert (df["pid"] == os.getpid()).all()
    ss = p.send_stats["user_ringbuf"]
    assert (ss["sent"], ss["drained"], ss["pending"], ss["fill_bytes"], ss["full"]) == (n, n, 0, 0, 0)
    from kernelscope.jupyter.display import StatusLine, counts

    assert "5,000 events" in StatusLine(p, "echo").text(counts(p))
    assert "5,000 sent (user ring)" in StatusLine(p, "echo").text(counts(p))
    page = p._repr_html_()
    assert "libbpf backend" in page
    assert "<td>user_ringbuf</td><td>5000</td><td>5000</td><td>0</td>" in page
    st = p.stats["kernel_ringbuf"]
    assert st["attempted"] == st["received"] == n
    assert st["dropped"] == 0
    p.close()


def test_send_accepts_dataframes_and_structured_arrays_and_rejects_unknown_fields() -> None:
    import pandas as pd

    p = Probe(sources.read("user_ringbuf_echo.c")).start()
    dtype = p.user_rings["user_ringbuf"].dtype
    assert dtype is not None
    assert dtype.names == ("seq", "value", "text")
    assert dtype.itemsize == 24
    arr = np.zeros(3, dtype)
    arr["seq"] = [0, 1, 2]
    p.send(arr)
    p.send(pd.DataFrame({"seq": [3, 4], "text": ["a", "b"]}))  # missing fields are zero
    with pytest.raises(SchemaError, match="colour not in the sample struct"):
        p.send([{"seq": 5, "colour": 1}])
    with pytest.raises(SchemaError, match="dicts, a DataFrame or a numpy structured array"):
        p.send("user_ringbuf", "not records")
    os.kill(os.getpid(), 0)
    p.stop()
    assert list(p.df["seq"]) == [0, 1, 2, 3, 4]
    assert list(p.df["text"]) == ["", "", "", "a", "b"]
    assert p.send_stats["user_ringbuf"]["sent"] == 5  # the rejected sends wrote nothing
    p.close()


def test_full_user_ring_raises_with_counts_then_resumes_after_a_drain() -> None:
    p = Probe(sources.read("user_ringbuf_echo.c"), pages={"user_ringbuf": 1}).start()
    ring = p.user_rings["user_ringbuf"]
    assert ring.size == 4096
    fits = 4096 // (24 + 8)  # 8-byte header per sample (libbpf ringbuf.c)
    with pytest.raises(UserRingFullError) as info:
        p.send([{"seq": i} for i in range(fits + 50)])
    assert (info.value.sent, info.value.remaining) == (fits, 50)
    assert "full" in str(info.value)
    assert f"{fits} of {fits + 50} records sent" in str(info.value)
    assert p.send_stats["user_ringbuf"]["full"] == 1
    os.kill(os.getpid(), 0)  # drain makes room
    p.send([{"seq": i} for i in range(fits, fits + 50)])
    os.kill(os.getpid(), 0)
    p.stop()
    assert list(p.df["seq"]) == list(range(fits + 50))  # nothing lost, nothing reordered
    ss = p.send_stats["user_ringbuf"]
    assert ss["sent"] == ss["drained"] == fits + 50
    p.close()


def test_a_sample_bigger_than_the_whole_ring_is_refused_before_writing() -> None:
    big = np.dtype([("seq", "<u4"), ("blob", "u1", 5000)])
    p = Probe(sources.read("user_ringbuf_echo.c"), pages={"user_ringbuf": 1}, dtypes={"user_ringbuf": big})
    p.start()
    with pytest.raises(ValueError, match="5004-byte sample does not fit the ring"):
        p.send([{"seq": 1}])
    assert p.send_stats["user_ringbuf"]["sent"] == 0
    p.close()


def test_full_user_ring_with_a_timeout_waits_for_the_program_to_drain() -> None:
    p = Probe(sources.read("user_ringbuf_echo.c"), pages={"user_ringbuf": 1}).start()
    stop = threading.Event()

    def kicker() -> None:  # another thread's kill(2) calls run the draining program
        while not stop.wait(0.005):
            os.kill(os.getpid(), 0)

    t = threading.Thread(target=kicker)
    t.start()
    try:
        n = 2_000  # 15x what the 1-page ring holds
        assert p.send([{"seq": i} for i in range(n)], timeout=10) == n
    finally:
        stop.set()
        t.join()
    os.kill(os.getpid(), 0)
    p.stop()
    assert list(p.df["seq"]) == list(range(n))
    ss = p.send_stats["user_ringbuf"]
    assert ss["sent"] == ss["drained"] == n
    assert ss["full"] > 0
    assert p.df["batch"].nunique() > 1  # it took many drains
    p.close()


LIBBPF_TOOLS_STYLE = r"""
// the shape of libbpf-tools' programs: vmlinux.h, CO-RE reads, a perf event array
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

const volatile pid_t targ_tgid = 0;

struct event {
    pid_t pid;
    pid_t ppid;
    u32 cpu;
    char comm[16];
};

struct {
    __uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
    __uint(key_size, sizeof(u32));
    __uint(value_size, sizeof(u32));
} events SEC(".maps");

SEC("tracepoint/syscalls/sys_enter_getppid")
int tracepoint__syscalls__sys_enter_getppid(struct trace_event_raw_sys_enter *ctx)
{
    struct event e = {};
    struct task_struct *task;
    u64 id = bpf_get_current_pid_tgid();

    if (targ_tgid && (id >> 32) != targ_tgid)
        return 0;
    task = (struct task_struct *)bpf_get_current_task();
    e.pid = id >> 32;
    e.ppid = BPF_CORE_READ(task, real_parent, tgid);
    e.cpu = bpf_get_smp_processor_id();
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    bpf_perf_event_output(ctx, &events, BPF_F_CURRENT_CPU, &e, sizeof(e));
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
"""


def test_libbpf_tools_style_program_attaches_to_a_tracepoint_with_a_perf_buffer() -> None:
    prod = paused(3_000)
    # configured as libbpf-tools are: a `const volatile` global set before load
    p = Probe(LIBBPF_TOOLS_STYLE, globals={"targ_tgid": prod.pid}).start()
    assert p.attach_points() == ["tracepoint:syscalls:sys_enter_getppid"]
    prod.go()
    p.stop()
    st = p.stats["events"]
    assert st["kind"] == "perf"
    assert st["attempted"] == st["received"] + st["dropped"] == 3_000
    df = p.df
    assert (df["pid"] == prod.pid).all()
    assert (df["ppid"] == os.getpid()).all()
    assert (df["cpu"] == df["ks_cpu"]).all()  # the perf buffer a record came from is its CPU's
    p.close()


def test_raw_tracepoint_and_uprobe_sections_attach() -> None:
    src = r"""
    #include "vmlinux.h"
    #include <bpf/bpf_helpers.h>
    struct ev { u32 kind; u32 pid; };
    struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096 * 4); } out SEC(".maps");
    static int emit(u32 kind) {
        u32 pid = bpf_get_current_pid_tgid() >> 32;
        if (pid != TARGET) return 0;
        struct ev *e = bpf_ringbuf_reserve(&out, sizeof(*e), 0);
        if (!e) return 0;
        e->kind = kind; e->pid = pid;
        bpf_ringbuf_submit(e, 0);
        return 0;
    }
    SEC("raw_tp/sys_enter") int on_raw(void *ctx) { return emit(1); }
    SEC("uprobe") int on_getppid(void *ctx) { return emit(2); }
    """
    prod = paused(100)
    p = Probe(src, cflags=prod.cflags)
    p.load()
    assert any("on_getppid" in w and "attach_uprobe" in w for w in p.warnings)  # no target in SEC
    maps = Path(f"/proc/{prod.pid}/maps").read_text().splitlines()
    libc = next(line.split()[-1] for line in maps if "libc.so" in line)
    p.attach_uprobe(libc, "getppid", "on_getppid")
    assert "raw_tracepoint:sys_enter" in p.attach_points()
    assert any(a.startswith("uprobe:") and a.endswith(":getppid") for a in p.attach_points())
    p.start()
    prod.go()
    p.stop()
    counts = p.df.groupby("kind").size()
    assert counts[2] == 100  # every getppid() call in libc
    assert counts[1] >= 100  # and at least its syscalls
    p.close()


def test_compile_error_names_the_cell_line() -> None:
    src = '#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n\nSEC("tp/sched/sched_process_exit")\n' \
          "int f(void *ctx) {\n  return undefined_thing;\n}\n"
    with pytest.raises(CompileError) as info:
        Probe(src).load()
    assert info.value.line == 6
    assert "undefined_thing" in str(info.value)
    assert "line 6" in str(info.value)


def test_unknown_tracepoint_in_a_section_is_named_with_close_matches() -> None:
    src = 'SEC("tp/sched/sched_process_exitt") int f(void *ctx) { return 0; }'
    want = r"line 1: no tracepoint sched:sched_process_exitt.*did you mean sched:sched_process_exit"
    with pytest.raises(AttachError, match=want):
        Probe(src).load()


def test_verifier_rejection_carries_the_log() -> None:
    src = r"""
    SEC("tp/sched/sched_process_exit")
    int f(void *ctx) {
        int *p = (int *)(long)bpf_get_prandom_u32();
        return *p;
    }
    """
    with pytest.raises(VerifierError) as info:
        Probe(src).load()
    assert "the verifier rejected f" in str(info.value)
    assert "invalid mem access" in info.value.log or "R0 invalid" in info.value.log, info.value.log


def test_core_relocation_against_a_field_this_kernel_lacks_is_explained() -> None:
    src = r"""
    struct task_struct___mine { int no_such_field_here; } __attribute__((preserve_access_index));
    SEC("tp/sched/sched_process_exit")
    int f(void *ctx) {
        struct task_struct___mine *t = (void *)bpf_get_current_task();
        return BPF_CORE_READ(t, no_such_field_here);
    }
    """
    with pytest.raises(VerifierError, match="CO-RE relocation failed for f") as info:
        Probe(src).load()
    assert "struct task_struct___mine.no_such_field_here" in str(info.value)


def test_kprobe_section_is_refused_naming_the_missing_option() -> None:
    from kernelscope.tracepoints import config_option

    src = 'SEC("kprobe/do_sys_openat2") int f(void *ctx) { return 0; }'
    if config_option("CONFIG_KPROBES") not in (None, "n"):
        Probe(src).start().close()
        pytest.skip("this kernel has kprobes (CONFIG_KPROBES=y): nothing to refuse")
    with pytest.raises(UnsupportedError, match="CONFIG_KPROBES") as info:
        Probe(src).load()
    assert info.value.feature == "CONFIG_KPROBES"


def test_fentry_section_is_refused_with_the_reason_on_this_kernel() -> None:
    refused = refusal('SEC("fentry/do_sys_openat2") int BPF_PROG(f) { return 0; }')
    if refused is None:
        pytest.skip("this kernel allows fentry programs: nothing to refuse")
    assert "fentry" in str(refused)
    assert "lockdown" in refused.feature or "tracing" in refused.feature


def test_closing_core_probes_releases_programs_maps_links_and_fds() -> None:
    Probe(sources.read("user_ringbuf_echo.c")).start().close()  # warm up (vmlinux.h, libbpf)
    gc.collect()
    fds, objs = fd_count(), bpf_object_counts()
    for name in ("user_ringbuf_echo.c", "exit_task_core.c"):
        p = Probe(sources.read(name)).start()
        assert bpf_object_counts().progs > objs.progs
        p.close()
        p.close()
    assert bpf_object_counts() == objs
    assert fd_count() == fds


def test_failed_core_load_leaves_nothing_behind() -> None:
    gc.collect()
    fds, objs = fd_count(), bpf_object_counts()
    bad = sources.read("user_ringbuf_echo.c").replace(
        "return 0;\n}\n\nchar", "return *(int *)(long)bpf_get_prandom_u32();\n}\n\nchar")
    with pytest.raises(VerifierError):
        Probe(bad).load()
    assert bpf_object_counts() == objs
    assert fd_count() == fds


def test_reconfigure_resizes_core_rings_and_carries_send_counts() -> None:
    p = Probe(sources.read("user_ringbuf_echo.c")).start()
    p.send([{"seq": i} for i in range(10)])
    os.kill(os.getpid(), 0)
    p.reconfigure(pages={"user_ringbuf": 2, "kernel_ringbuf": 8})
    assert p.user_rings["user_ringbuf"].size == 2 * 4096
    assert p.stats["kernel_ringbuf"]["capacity_bytes"] == 8 * 4096
    p.send([{"seq": i} for i in range(10, 20)])
    os.kill(os.getpid(), 0)
    p.stop()
    assert list(p.df["seq"]) == list(range(20))
    ss = p.send_stats["user_ringbuf"]
    assert ss["sent"] == ss["drained"] == 20
    st = p.stats["kernel_ringbuf"]
    assert st["attempted"] == st["received"] == 20
    assert st["reloads"] == 1
    p.close()


def test_core_capture_replays_frames_and_send_counts(tmp_path: Path) -> None:
    from kernelscope.captures.replay import replay

    p = Probe(sources.read("user_ringbuf_echo.c"), name="echo").start()
    p.send([{"seq": i, "text": "x"} for i in range(100)])
    os.kill(os.getpid(), 0)
    p.stop()
    path = p.save(tmp_path / "echo.parquet")
    r = replay(path, speed=None).start()
    assert r.backend == "libbpf"
    assert r.df["seq"].tolist() == p.df["seq"].tolist()
    assert r.send_stats["user_ringbuf"]["drained"] == 100
    assert r.send([{"seq": 1}]) == 1  # checked against the recorded struct
    with pytest.raises(SchemaError):
        r.send([{"nope": 1}])
    p.close()


def test_core_backend_works_without_importing_bcc() -> None:
    # the CO-RE path needs no BCC: a fresh interpreter that never imports bcc loads a program
    code = (
        "import os, sys; from kernelscope import Probe, sources\n"
        "p = Probe(sources.read('user_ringbuf_echo.c')).start()\n"
        "p.send([{'seq': 1}]); os.kill(os.getpid(), 0); p.stop()\n"
        "assert p.df['seq'].tolist() == [1]; assert 'bcc' not in sys.modules, 'bcc imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.stdout.strip() == "ok", out.stderr


def test_unknown_or_misused_globals_are_named() -> None:
    with pytest.raises(KernelscopeError, match=r"no global variable 'targ_pid'.*globals: targ_tgid"):
        Probe(LIBBPF_TOOLS_STYLE, globals={"targ_pid": 1}).load()
    with pytest.raises(ValueError, match="global targ_tgid: 8 bytes given, the map's is 4"):
        Probe(LIBBPF_TOOLS_STYLE, globals={"targ_tgid": b"12345678"}).load()
    with pytest.raises(ValueError, match="for BCC programs use cflags"):
        Probe(sources.read("exit_task_bcc.c"), globals={"x": 1})


def test_usdt_section_attaches_and_reads_the_probe_arguments() -> None:
    from kernelscope.doctor.checks import _find_usdt_binary

    binary = _find_usdt_binary()
    if binary is None:
        pytest.skip("no binary with the python:gc__start USDT probe on this machine")
    src = usdt_gc_program(f"usdt/{binary}:python:gc__start")
    p = Probe(src).start()
    assert p.attach_points() == [f"usdt:{binary}:python:gc__start"]
    child = subprocess.Popen([str(binary), "-c", "import gc; gc.collect(0); gc.collect(1); gc.collect(2)"])
    assert child.wait(30) == 0
    p.stop()
    gens = set(p.df.loc[p.df["pid"] == child.pid, "gen"].tolist())
    assert {0, 1, 2} <= gens  # the probe's argument, read by libbpf's USDT support
    p.close()


def test_compiled_objects_are_removed_with_the_probe_and_after_a_failed_compile() -> None:
    import glob
    import tempfile

    from kernelscope import folders

    # this process's folders only: other processes (a notebook, a second test run) make theirs
    pattern = os.path.join(tempfile.gettempdir(), folders.my_prefix() + "*")
    before = set(glob.glob(pattern))
    p = Probe(sources.read("exit_task_core.c")).start()
    assert len(set(glob.glob(pattern)) - before) == 1  # the object lives while the program does
    p.close()
    with pytest.raises(CompileError):
        Probe('SEC("tp/sched/sched_process_exit") int f(void *c) { return nope; }').load()
    assert set(glob.glob(pattern)) == before
