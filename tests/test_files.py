"""Programs run from their files, with their headers: Probe.from_file, include=, %%bpf --file,
%bpf_run and `kernelscope record FILE`, on the running kernel.

The programs are written here in the style of libbpf-tools (a `.bpf.c` next to a header that
holds the event struct and includes vmlinux.h), each against events the test makes: an exec
of /bin/true, or getppid() calls of a child whose pid the program filters on (-DTARGET).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output
from producers import paused
from shell import Shell, ipython_shell

from kernelscope import Probe
from kernelscope.backends import core, preprocess
from kernelscope.captures import capture, record
from kernelscope.errors import CompileError, SettingError, UnknownTracepointError

# libbpf-tools style: the event struct in the header, which includes vmlinux.h itself
EXECS_H = """\
#ifndef __EXECS_H
#define __EXECS_H
#include "vmlinux.h"
#define TASK_COMM_LEN 16
struct event {
\t__u32 pid;
\tchar comm[TASK_COMM_LEN];
};
#endif /* __EXECS_H */
"""

EXECS_BPF_C = """\
// SPDX-License-Identifier: GPL-2.0
#include "execs.h"
#include <bpf/bpf_helpers.h>

struct {
\t__uint(type, BPF_MAP_TYPE_RINGBUF);
\t__uint(max_entries, 256 * 1024);
} events SEC(".maps");

SEC("tp/sched/sched_process_exec")
int handle_exec(void *ctx)
{
\tstruct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
\tif (!e)
\t\treturn 0;
\te->pid = bpf_get_current_pid_tgid() >> 32;
\tbpf_get_current_comm(&e->comm, sizeof(e->comm));
\tbpf_ringbuf_submit(e, 0);
\treturn 0;
}

char LICENSE[] SEC("license") = "GPL";
"""

# the map and the output call in a header: one call names the map, one gets it as a parameter
EMIT_H = """\
#ifndef __EMIT_H
#define __EMIT_H
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct event {
\t__u32 pid;
\t__u32 kind;
\t__u64 ts;
};
struct {
\t__uint(type, BPF_MAP_TYPE_RINGBUF);
\t__uint(max_entries, 64 * 4096);
} events SEC(".maps");

static __always_inline void submit(__u32 kind)
{
\tstruct event e = {};
\te.pid = bpf_get_current_pid_tgid() >> 32;
\te.kind = kind;
\te.ts = bpf_ktime_get_ns();
\tbpf_ringbuf_output(&events, &e, sizeof(e), 0);
}

static __always_inline void submit_to(void *rb, struct event *e)
{
\tbpf_ringbuf_output(rb, e, sizeof(*e), 0);
}
#endif
"""

EMIT_BPF_C = """\
#include "vmlinux.h"
#include "emit.h"

SEC("tp/syscalls/sys_enter_getppid")
int on_getppid(void *ctx)
{
\tif ((bpf_get_current_pid_tgid() >> 32) != TARGET)
\t\treturn 0;
\tsubmit(1);
\tstruct event e = {.pid = TARGET, .kind = 2};
\tsubmit_to(&events, &e);
\treturn 0;
}
BAD_LINE
char LICENSE[] SEC("license") = "GPL";
"""

# a tracepoint this kernel does not have, in a block the preprocessor drops
IF0_CORE = """\
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct event { __u32 pid; };
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 64 * 4096); } events SEC(".maps");
#if 0
SEC("tp/no_such_category/no_such_event")
int never(void *ctx) { return 0; }
#endif
#ifdef WITH_MISSING
SEC("tp/no_such_category/no_such_event")
int missing(void *ctx) { return 0; }
#endif
SEC("tp/syscalls/sys_enter_getppid")
int on_getppid(void *ctx)
{
\tstruct event e = {.pid = bpf_get_current_pid_tgid() >> 32};
\tif (e.pid == TARGET)
\t\tbpf_ringbuf_output(&events, &e, sizeof(e), 0);
\treturn 0;
}
"""

IF0_BCC = """
struct event { u32 pid; };
BPF_RINGBUF_OUTPUT(events, 16);
#if 0
TRACEPOINT_PROBE(no_such_category, no_such_event) { return 0; }
#endif
#ifdef WITH_MISSING
TRACEPOINT_PROBE(no_such_category, no_such_event) { return 0; }
#endif
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    struct event e = {.pid = bpf_get_current_pid_tgid() >> 32};
    if (e.pid == TARGET)
        events.ringbuf_output(&e, sizeof(e), 0);
    return 0;
}
"""


def write_execs(folder: Path) -> Path:
    (folder / "execs.h").write_text(EXECS_H)
    path = folder / "execs.bpf.c"
    path.write_text(EXECS_BPF_C)
    return path


def exec_true_until(stop: threading.Event) -> list[int]:
    """Exec /bin/true every 20 ms until `stop`; the pids it made."""
    pids: list[int] = []

    def run() -> None:
        while not stop.is_set():
            p = subprocess.Popen(["/bin/true"])
            pids.append(p.pid)
            p.wait()
            time.sleep(0.02)

    threading.Thread(target=run, daemon=True).start()
    return pids


def execs_seen(probe: Any, timeout: float = 10.0) -> tuple[pd.DataFrame, list[int]]:
    """Exec /bin/true while `probe` runs until one of those execs arrived; (its rows, the pids)."""
    stop = threading.Event()
    pids = exec_true_until(stop)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            df = probe.df
            mine = df[df["pid"].isin(pids) & (df["comm"] == "true")] if len(df) else df
            if len(mine):
                return mine, pids
            time.sleep(0.05)
    finally:
        stop.set()
    raise AssertionError(f"no exec of /bin/true arrived in {timeout} s ({len(probe.df)} rows)")


# --- preprocessed text, no kernel ---------------------------------------------------------


def test_line_markers_trace_each_output_line_to_its_file_and_line() -> None:
    out = '# 1 "cell"\nint a;\n# 1 "/x/emit.h" 1\nint b;\n\nint c;\n# 3 "cell" 2\nint d;\n'
    pre = preprocess.parse(out)
    assert pre.origin(out.index("int b")) == ("/x/emit.h", 1)
    assert pre.origin(out.index("int c")) == ("/x/emit.h", 3)
    assert pre.cell_line(out.index("int d")) == 3
    assert pre.cell_line(out.index("int c")) is None
    assert pre.where(out.index("int c")) == "emit.h:3"
    assert pre.cell_view(3).split("\n") == ["int a;", "", "int d;"]
    kept = pre.only(lambda f: f == "cell")
    assert len(kept) == len(out)
    assert "int b" not in kept
    assert kept.index("int d") == out.index("int d")


def test_include_must_name_folders(tmp_path: Path) -> None:
    with pytest.raises(SettingError, match=r"include: .*nowhere is not a folder"):
        Probe(IF0_CORE, include=[tmp_path / "nowhere"])
    with pytest.raises(SettingError, match="no program file"):
        Probe.from_file(tmp_path / "missing.bpf.c")


# --- running files ----------------------------------------------------------------------


@pytest.mark.kernel
def test_from_file_finds_the_header_beside_it_and_reads_its_events(tmp_path: Path) -> None:
    path = write_execs(tmp_path)
    with Probe.from_file(path) as p:
        assert p.name == "execs"
        assert p.backend == "libbpf"
        rows, pids = execs_seen(p)
    assert set(rows["pid"]) <= set(pids)
    st = p.stats["events"]
    assert st["attempted"] == st["received"] + st["dropped"]


@pytest.mark.kernel
def test_vmlinux_brought_by_a_local_header_is_not_redefined_by_the_prelude(tmp_path: Path) -> None:
    """exitsnoop-style: the .bpf.c includes only its header, which includes vmlinux.h."""
    (tmp_path / "execs.h").write_text(EXECS_H)
    only_header = EXECS_BPF_C.replace("#include <bpf/bpf_helpers.h>\n", "")
    prep = core.prepare(only_header, cflags=[f"-I{tmp_path}"])
    assert "<linux/types.h>" not in prep.source
    with Probe(only_header, include=[tmp_path]) as p:
        execs_seen(p)
    # vmlinux.h included by the program after a local header
    (tmp_path / "first.h").write_text("#define FIRST_PID_SHIFT 32\n")
    after = ('#include "first.h"\n#include "vmlinux.h"\n'
             + EXECS_H.split('#include "vmlinux.h"\n')[1].replace("#endif", "")
             + EXECS_BPF_C.replace('#include "execs.h"\n', "").replace(">> 32", ">> FIRST_PID_SHIFT"))
    assert "<linux/types.h>" not in core.prepare(after, cflags=[f"-I{tmp_path}"]).source
    with Probe(after, include=[tmp_path]) as p:
        execs_seen(p)


@pytest.mark.kernel
def test_output_calls_inside_a_header_are_counted_and_typed(tmp_path: Path) -> None:
    (tmp_path / "emit.h").write_text(EMIT_H)
    path = tmp_path / "emit.bpf.c"
    path.write_text(EMIT_BPF_C.replace("BAD_LINE\n", ""))
    child = paused(7)
    with Probe.from_file(path, cflags=child.cflags) as p:
        assert p.instrumented.event_types == {"events": "struct event"}
        child.go()
        p.stop()
        df = p.df
    assert list(df.columns[:3]) == ["pid", "kind", "ts"]
    assert (df["pid"] == child.pid).all()
    assert df["kind"].value_counts().to_dict() == {1: 7, 2: 7}
    st = p.stats["events"]
    assert st["attempted"] == 14 == st["received"] + st["dropped"]


@pytest.mark.kernel
def test_compile_errors_of_a_header_program_name_the_files_line(tmp_path: Path) -> None:
    (tmp_path / "emit.h").write_text(EMIT_H)
    source = EMIT_BPF_C.replace("BAD_LINE", "int broken = ;").replace("TARGET", "1")
    assert core.prepare(source, cflags=[f"-I{tmp_path}"]).preprocessed
    with pytest.raises(CompileError) as info:
        Probe(source, include=[tmp_path]).load()
    assert info.value.line == source.splitlines().index("int broken = ;") + 1
    assert f"line {info.value.line}: error: expected expression" in str(info.value)


@pytest.mark.kernel
@pytest.mark.parametrize("source", [IF0_CORE, IF0_BCC], ids=["core", "bcc"])
def test_a_tracepoint_in_an_inactive_block_is_not_checked(source: str) -> None:
    child = paused(3)
    with Probe(source, cflags=child.cflags) as p:
        child.go()
        p.stop()
        assert (p.df["pid"] == child.pid).sum() == 3
    with pytest.raises(UnknownTracepointError, match="no tracepoint no_such_category:no_such_event"):
        Probe(source, cflags=[*child.cflags, "-DWITH_MISSING"]).load()


# --- the magic and the CLI ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shell() -> Iterator[Shell]:
    yield from ipython_shell()


@pytest.mark.kernel
@pytest.mark.parametrize("how", ["--file", "%bpf_run"])
def test_the_magic_runs_a_file_with_its_headers(shell: Shell, tmp_path: Path, how: str) -> None:
    path = write_execs(tmp_path)
    line = (f"%%bpf files --file {path} --quiet\n// the program is in the file\n" if how == "--file"
            else f"%bpf_run {path} files --quiet")
    with capture_output():
        shell.run_cell(line)
    probe = shell.ip.user_ns["files"]
    try:
        assert probe.running
        execs_seen(probe)
    finally:
        probe.close()


@pytest.mark.kernel
def test_the_magic_include_option_and_its_mistakes(shell: Shell, tmp_path: Path) -> None:
    (tmp_path / "execs.h").write_text(EXECS_H)
    with capture_output():
        shell.run_cell(f"%%bpf files -I {tmp_path} --quiet\n" + EXECS_BPF_C)
    probe = shell.ip.user_ns["files"]
    try:
        execs_seen(probe)
    finally:
        probe.close()
    with pytest.raises(UsageError, match="either the cell or --file"):
        shell.run_cell(f"%%bpf files --file {tmp_path / 'x.bpf.c'}\nint x;\n")
    with pytest.raises(UsageError, match="no program file"):
        shell.run_cell(f"%bpf_run {tmp_path / 'missing.bpf.c'}")
    with pytest.raises(UsageError, match="usage: %bpf_run PATH"):
        shell.run_cell("%bpf_run")
    with pytest.raises(UsageError, match="not a folder"):
        shell.run_cell(f"%%bpf files --include {tmp_path / 'nowhere'}\n" + EXECS_BPF_C)


@pytest.mark.kernel
def test_record_runs_a_bpf_c_file_with_its_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_execs(tmp_path)
    out = tmp_path / "execs.parquet"
    stop = threading.Event()
    pids = exec_true_until(stop)
    try:
        assert record.main([str(path), "-o", str(out), "--limit", "3"]) == 0
    finally:
        stop.set()
    cap = capture.load(out)
    rows = cap.maps["events"].records
    assert cap.settings["name"] == "execs"
    assert any(r["comm"] == b"true" and r["pid"] in pids for r in rows)
    assert "events: attempted" in capsys.readouterr().out


def test_record_checks_its_include_folders_before_attaching(tmp_path: Path) -> None:
    path = write_execs(tmp_path)
    with pytest.raises(SystemExit) as info:
        record.main([str(path), "-o", str(tmp_path / "x.parquet"), "--limit", "1",
                     "-I", str(tmp_path / "no")])
    assert info.value.code == 2


COMPAT_H = """\
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 64 * 4096); } events SEC(".maps");
static __always_inline void *reserve_buf(__u64 size) { return bpf_ringbuf_reserve(&events, size, 0); }
static __always_inline long submit_buf(void *ctx, void *buf, __u64 size)
{
\treturn bpf_perf_event_output(ctx, &events, BPF_F_CURRENT_CPU, buf, size);
}
"""


def test_a_reservation_returned_by_a_header_function_takes_the_callers_type(tmp_path: Path) -> None:
    """compat.bpf.h's reserve_buf()/submit_buf(void *buf): the type is the caller's variable's,
    never the helper's `void *`."""
    (tmp_path / "compat.h").write_text(COMPAT_H)
    src = ('#include "compat.h"\nstruct event { __u32 pid; };\nSEC("tp/sched/sched_process_exec")\n'
           "int f(void *ctx) {\n\tstruct event *eventp = reserve_buf(sizeof(*eventp));\n"
           "\tif (!eventp) return 0;\n\tsubmit_buf(ctx, eventp, sizeof(*eventp));\n\treturn 0;\n}\n")
    prep = core.prepare(src, cflags=[f"-I{tmp_path}"])
    assert prep.preprocessed
    assert prep.event_types == {"events": "struct event"}
    assert prep.source.count("__ks_count(0,") == 2  # both header calls counted on the one map
