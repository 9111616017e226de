"""The `%%bpf` magics driven through a real IPython shell, on the running kernel.

Cells run through `Shell.run_cell`, which raises the cell's error like a failing notebook
cell (JupySQL's `_testing.py`), so a UsageError is an exception the test can match. Leaks
are counted by this process's fds: other processes load BPF programs at the same time, so
system-wide counts (bpftool) are checked only for maps with names of our own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output
from shell import Shell, shell_fixtures
from util import fd_count, wait_for

from kernelscope import Probe, host, mode
from kernelscope import probe as probe_module
from kernelscope import tracepoints as discover
from kernelscope.doctor import checks as doctor
from kernelscope.errors import CorruptBufferError, InternalError
from kernelscope.jupyter import magic
from kernelscope.jupyter.display import Progress, StatusLine

# What a new user types: count exec, exit and openat events, system-wide (10 lines of C).
COUNT_CELL = """%%bpf
struct ev { u32 pid; u32 kind; char comm[16]; };
BPF_RINGBUF_OUTPUT(events, 256);
static int emit(u32 kind) {
    struct ev e = {.pid = bpf_get_current_pid_tgid() >> 32, .kind = kind};
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    events.ringbuf_output(&e, sizeof(e), 0);
    return 0;
}
TRACEPOINT_PROBE(sched, sched_process_exec) { return emit(0); }
TRACEPOINT_PROBE(sched, sched_process_exit) { return emit(1); }
TRACEPOINT_PROBE(syscalls, sys_enter_openat) { return emit(2); }
"""

# getppid() calls of this process only (other processes benchmark with getppid loops).
GETPPID = """
struct ev { u32 pid; u64 ts; };
BPF_RINGBUF_OUTPUT(ks_magic_ev, 64);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != TARGET)
        return 0;
    struct ev e = {.pid = pid, .ts = bpf_ktime_get_ns()};
    ks_magic_ev.ringbuf_output(&e, sizeof(e), 0);
    return 0;
}
"""


shell, no_probes_left = shell_fixtures("import os")


@contextlib.contextmanager
def getppid_calls(interval: float = 0.001) -> Iterator[None]:
    """Make events for GETPPID from a thread of this process until the block ends."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval):
            os.getppid()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def bpf_objects() -> Counter[str]:
    """This process's kernel objects by fd kind: bpf-prog, bpf-map, btf, perf_event (an
    attached tracepoint), bpf_link. An attachment holds its program alive after the
    program's own fd is closed, so perf_event fds are counted too."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the fd listdir itself used
        if target.startswith("anon_inode:"):
            kind = target.removeprefix("anon_inode:").strip("[]")
            if kind.startswith(("bpf", "btf", "perf_event")):
                kinds[kind] += 1
    return kinds


def system_maps(prefix: str) -> list[str]:
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    out = subprocess.run([bpftool, "-j", "map", "list"], capture_output=True, text=True, check=True).stdout
    return [m.get("name", "") for m in json.loads(out or "[]") if m.get("name", "").startswith(prefix)]


def shown(cap: Any) -> str:
    """Everything a captured cell printed or displayed, as plain text."""
    return cap.stdout + "".join(o.data.get("text/plain", "") + "\n" for o in cap.outputs)


def assert_nothing_attached(before_objects: Any, before_fds: int) -> None:
    assert bpf_objects() == before_objects
    assert fd_count() == before_fds


# --- the happy paths ---------------------------------------------------------------------


@pytest.mark.kernel
def test_ten_line_cell_counts_exec_exit_openat_and_groups_while_growing(shell: Shell) -> None:
    with capture_output() as cap:
        assert shell.run_cell(COUNT_CELL) is None  # returns at once; nothing blocks
    probe = shell.user_ns["probe"]  # the default name
    assert isinstance(probe, Probe)
    assert probe.running
    assert "probe: running" in shown(cap)
    assert sorted(probe.attach_points()) == [
        "tracepoint:sched:sched_process_exec",
        "tracepoint:sched:sched_process_exit",
        "tracepoint:syscalls:sys_enter_openat",
    ]

    child = subprocess.run(["/bin/true"], check=True)
    del child
    pids: list[int] = []
    for _ in range(3):
        p = subprocess.Popen(["/bin/true"])
        p.wait()
        pids.append(p.pid)

    def kinds_of_children() -> bool:
        df = probe.df
        mine = df[df["pid"].isin(pids)]
        return all(set(mine[mine["pid"] == pid]["kind"]) == {0, 1, 2} for pid in pids)

    wait_for(kinds_of_children, timeout=10, what="exec, openat and exit of each child")
    first = shell.run_cell("probe.df.groupby('kind').size()")
    assert set(first.index) >= {0, 1, 2}

    more = subprocess.Popen(["/bin/true"])
    more.wait()
    wait_for(lambda: (probe.df["pid"] == more.pid).sum() >= 3, timeout=10, what="the next child's events")
    second = shell.run_cell("probe.df.groupby(['kind', 'comm']).size()")
    assert second.sum() > first.sum()  # the frame kept growing between the two groupbys
    assert probe.running

    listing = shell.run_cell("%bpf_list")
    row = listing.set_index("name").loc["probe"]
    assert row["state"] == "running"
    assert row["received"] >= second.sum()
    assert row["dropped"] == 0

    with capture_output() as cap:
        shell.run_cell("%bpf_stop probe")
    assert "probe: stopped" in cap.stdout
    assert probe.closed
    assert len(probe.df) >= second.sum()  # data stays after stop
    st = probe.stats["events"]
    assert st["attempted"] == st["received"] + st["dropped"]


@pytest.mark.kernel
def test_duration_blocks_with_progress_then_stops_and_shows_rows(shell: Shell) -> None:
    with getppid_calls(), capture_output() as cap:
        t0 = time.monotonic()
        shell.run_cell("%%bpf timed --duration 0.6 -D TARGET={os.getpid()}\n" + GETPPID)
        took = time.monotonic() - t0
    assert 0.6 <= took < 10
    probe = shell.user_ns["timed"]
    assert probe.closed  # detached after the wait, data kept
    assert not probe.running
    assert len(probe.df) > 0
    assert (probe.df["pid"] == os.getpid()).all()
    assert "timed [########################] " in cap.stdout  # full progress bar
    assert "done;" in cap.stdout
    shown = [o.data for o in cap.outputs]
    assert any("ks_arrival_ns" in d.get("text/plain", "") for d in shown)  # the first rows
    st = probe.stats["ks_magic_ev"]
    assert st["attempted"] == st["received"] + st["dropped"]


@pytest.mark.kernel
def test_line_variables_expand_and_limit_blocks_until_enough_events(shell: Shell) -> None:
    shell.run_cell("target = os.getpid()")
    cell = "%%bpf limited --limit 25 --quiet -D TARGET={os.getpid()} -D ALSO=$target\n" + GETPPID.replace(
        "if (pid != TARGET)", "if (pid != TARGET || pid != ALSO)"
    )
    with getppid_calls(), capture_output() as cap:
        shell.run_cell(cell)
    probe = shell.user_ns["limited"]
    assert probe.cflags == (f"-DTARGET={os.getpid()}", f"-DALSO={os.getpid()}")
    assert len(probe.df) >= 25
    assert set(probe.df["pid"]) == {os.getpid()}
    assert cap.stdout == ""  # --quiet
    assert not cap.outputs


@pytest.mark.kernel
def test_no_start_loads_and_attaches_without_draining(shell: Shell) -> None:
    with capture_output() as cap:
        shell.run_cell("%%bpf later --no-start -D TARGET={os.getpid()}\n" + GETPPID)
    probe = shell.user_ns["later"]
    assert probe.loaded
    assert not probe.running
    assert probe.attach_points() == ["tracepoint:syscalls:sys_enter_getppid"]
    assert "loaded, not started" in shown(cap)
    with getppid_calls():
        probe.start()
        wait_for(lambda: len(probe.df) > 0, what="rows after start()")


@pytest.mark.kernel
def test_rerunning_a_named_cell_closes_the_old_probe(shell: Shell) -> None:
    cell = "%%bpf again -D TARGET={os.getpid()}\n" + GETPPID
    with capture_output(), getppid_calls():
        shell.run_cell(cell)
        old = shell.user_ns["again"]
        wait_for(lambda: len(old.df) > 0)
        shell.run_cell(cell)
    new = shell.user_ns["again"]
    assert new is not old
    assert old.closed  # the old rows stay readable
    assert len(old.df) > 0
    assert new.running
    assert shell.magics.probes["again"] is new
    assert old not in shell.magics.probes.values()  # a re-run lets go of the old probe


@pytest.mark.kernel
def test_ctrl_c_during_duration_stops_cleanly_and_keeps_rows(shell: Shell) -> None:
    def interrupt_when_rows_arrive() -> None:
        def receiving() -> bool:
            p = shell.user_ns.get("intr")
            return (isinstance(p, Probe) and p.running
                    and sum(ms.store.received for ms in p.outputs.values()) > 0)

        wait_for(receiving, timeout=20, what="the --duration cell to receive rows")
        os.kill(os.getpid(), signal.SIGINT)  # what Jupyter's interrupt button sends the kernel

    t = threading.Thread(target=interrupt_when_rows_arrive)
    with getppid_calls(), capture_output() as cap:
        t.start()
        t0 = time.monotonic()
        shell.run_cell("%%bpf intr --duration 60 -D TARGET={os.getpid()}\n" + GETPPID)  # does not raise
        took = time.monotonic() - t0
        t.join()
    assert took < 20
    probe = shell.user_ns["intr"]
    assert probe.closed
    assert not probe.running
    assert len(probe.df) > 0
    st = probe.stats["ks_magic_ev"]
    assert st["attempted"] == st["received"] + st["dropped"]
    assert "interrupted after" in cap.stdout
    assert not [t for t in threading.enumerate() if t.name.startswith("kernelscope-")]


# --- errors: short, specific, the cell's line, nothing left attached ----------------------


def _fails(shell: Shell, cell: str) -> tuple[str, str]:
    """Run a failing cell; return the UsageError's text and what the user saw on stderr."""
    with capture_output() as cap, pytest.raises(UsageError) as info:
        shell.run_cell(cell)
    return str(info.value), cap.stderr


@pytest.mark.kernel
def test_compile_error_names_the_cell_line_with_clang_words(shell: Shell) -> None:
    before = bpf_objects(), fd_count()
    msg, seen = _fails(shell, """%%bpf broken
struct ev { u32 pid; };
BPF_RINGBUF_OUTPUT(ks_magic_ev, 8);
TRACEPOINT_PROBE(sched, sched_process_exec) {
    struct ev e = {.pid = undeclared_thing};
    ks_magic_ev.ringbuf_output(&e, sizeof(e), 0);
    return 0;
}
""")
    assert msg.startswith("%%bpf broken: compile error")
    assert "line 5: error: use of undeclared identifier 'undeclared_thing'" in msg
    assert "    5 |     struct ev e = {.pid = undeclared_thing};" in msg
    assert len(msg.splitlines()) <= 6
    assert "UsageError" in seen
    assert "Traceback" not in seen
    assert "broken" not in shell.user_ns
    assert_nothing_attached(*before)


@pytest.mark.kernel
def test_verifier_rejection_shows_the_log_tail_and_the_line(shell: Shell) -> None:
    before = bpf_objects(), fd_count()
    msg, seen = _fails(shell, """%%bpf unchecked
struct ev { u64 v; };
BPF_RINGBUF_OUTPUT(ks_magic_vf, 8);
BPF_HASH(ks_magic_h, u32, u64);
TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 k = 0;
    u64 *v = ks_magic_h.lookup(&k);
    struct ev e = {.v = *v};
    ks_magic_vf.ringbuf_output(&e, sizeof(e), 0);
    return 0;
}
""")
    assert msg.startswith("%%bpf unchecked: line 8: the verifier rejected "
                          "tracepoint__sched__sched_process_exec")
    assert "    8 |     struct ev e = {.v = *v};" in msg
    assert "invalid mem access 'map_value_or_null'" in msg
    assert len(msg.splitlines()) <= magic.MAX_MESSAGE_LINES + 1
    assert "Traceback" not in seen
    assert_nothing_attached(*before)  # BCC had created the maps before the verifier said no
    wait_for(lambda: not system_maps("ks_magic_vf"), what="the rejected program's maps to be freed")


@pytest.mark.kernel
def test_unknown_tracepoint_names_close_matches(shell: Shell) -> None:
    before = bpf_objects(), fd_count()
    msg, seen = _fails(shell, """%%bpf typo
BPF_RINGBUF_OUTPUT(ks_magic_ev, 8);
TRACEPOINT_PROBE(sched, sched_process_exec) { return 0; }
TRACEPOINT_PROBE(sched, sched_proces_exit) { return 0; }
""")
    assert msg.startswith("%%bpf typo: line 4: no tracepoint sched:sched_proces_exit on this kernel")
    assert "did you mean sched:sched_process_exit" in msg
    assert "    4 | TRACEPOINT_PROBE(sched, sched_proces_exit) { return 0; }" in msg
    assert "Traceback" not in seen
    assert_nothing_attached(*before)


@pytest.mark.kernel
def test_output_map_without_a_submitted_struct_fails_with_nothing_attached(shell: Shell) -> None:
    before = bpf_objects(), fd_count()
    msg, _ = _fails(shell, """%%bpf nothing
BPF_RINGBUF_OUTPUT(ks_magic_ev, 8);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) { return 0; }
""")
    assert "ks_magic_ev: BCC found no struct submitted to this map" in msg
    assert_nothing_attached(*before)  # loaded and attached, then released


def test_missing_privileges_say_how_to_fix(shell: Shell, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: this process is root, so the capability read is what changes. The real
    # path is the same (host.prepare() checks capabilities before BCC is touched).
    monkeypatch.setattr(host, "effective_caps", lambda: 0)
    before = bpf_objects(), fd_count()
    msg, seen = _fails(shell, "%%bpf noperm -D TARGET=1\n" + GETPPID)
    assert msg.startswith("%%bpf noperm: loading BPF programs needs root, or CAP_BPF and CAP_PERFMON")
    assert "setcap cap_bpf,cap_perfmon+ep" in msg
    assert "Traceback" not in seen
    assert_nothing_attached(*before)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("%%bpf 1abc", "NAME must be a Python identifier"),
        ("%%bpf x --duration 0", "--duration must be positive"),
        ("%%bpf x --no-start --limit 5", "--no-start cannot be combined"),
        ("%%bpf x -D 9X=1", "-D expects NAME=VALUE"),
        ("%%bpf x -D TARGET={no_such_name}", "-D TARGET={no_such_name} did not expand"),
        ("%%bpf x --pages many", "invalid int value"),
    ],
)
def test_bad_lines_are_usage_errors(shell: Shell, line: str, expected: str) -> None:
    msg, seen = _fails(shell, line + "\n" + GETPPID)
    assert expected in msg
    assert "Traceback" not in seen


def test_help_lists_every_flag() -> None:
    doc = magic.BPFMagics.bpf.__doc__ or ""
    assert "%%bpf [--pages N]" in doc
    for flag in ("--pages", "--duration", "--limit", "--max-rows", "-D NAME=VALUE", "--no-start",
                 "--quiet", "--perf-wakeup", "--reorder"):
        assert flag in doc


@pytest.mark.kernel
def test_struct_reads_warn_when_headers_do_not_match(shell: Shell, monkeypatch: pytest.MonkeyPatch) -> None:
    cell = """%%bpf deref{n} -D TARGET={{os.getpid()}}
#include <linux/sched.h>
struct ev {{ u32 pid; u32 tgid; }};
BPF_RINGBUF_OUTPUT(ks_magic_ev, 8);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {{
    struct task_struct *t = (struct task_struct *)bpf_get_current_task();
    struct ev e = {{.pid = bpf_get_current_pid_tgid() >> 32, .tgid = t->tgid}};
    ks_magic_ev.ringbuf_output(&e, sizeof(e), 0);
    return 0;
}}
"""
    shell.magics.layout = None  # as in a fresh session
    with capture_output() as cap:
        shell.run_cell(cell.format(n=1))
    headers = host.find_headers()
    assert headers is not None
    warnings = [t for o in cap.outputs if (t := o.data.get("text/plain", "")).startswith("WARNING")]
    if headers.matches_kernel and shell.magics.layout is not None and shell.magics.layout.mismatch is False:
        assert warnings == []
        return
    # This project's machines: 6.1 headers, 6.18 kernel (PLATFORM.md).
    assert len(warnings) == 1
    text = warnings[0]
    assert "line 6: this cell reads kernel structs (struct task_struct)" in text
    assert "task_struct.tgid" in text or "may not match" in text
    for alternative in ("tracepoint args", "BPF helpers", "CO-RE backend"):
        assert alternative in text
    assert text.removeprefix("WARNING: ") in shell.user_ns["deref1"].warnings

    def no_second_run() -> list[Any]:
        raise AssertionError("the header check ran twice in one session")

    monkeypatch.setattr(doctor, "run_checks", no_second_run)
    with capture_output() as cap:
        shell.run_cell(cell.format(n=2))
    assert any(o.data.get("text/plain", "").startswith("WARNING") for o in cap.outputs)


@pytest.mark.kernel
def test_safe_cell_gets_no_header_warning(shell: Shell) -> None:
    shell.magics.layout = magic.LayoutVerdict(True, "pretend mismatch")
    with capture_output() as cap:
        shell.run_cell("%%bpf safe --no-start -D TARGET={os.getpid()}\n" + GETPPID)
    assert not any(o.data.get("text/plain", "").startswith("WARNING") for o in cap.outputs)
    shell.magics.layout = None


# --- lifecycle ----------------------------------------------------------------------------


@pytest.mark.kernel
def test_hundred_reruns_leave_no_programs_maps_or_fds(shell: Shell) -> None:
    program = GETPPID.replace("ks_magic_ev", "ks_rerun_ev")

    def cell(flags: str) -> str:
        return f"%%bpf rerun {flags} -D TARGET={{os.getpid()}}\n{program}"

    with capture_output():
        shell.run_cell(cell(""))  # warm-up: BCC import, header caches
        shell.run_cell("%bpf_stop rerun")
    base_objects, base_fds = bpf_objects(), fd_count()
    live_objects = None
    old: list[weakref.ref[Probe]] = []
    t0 = time.monotonic()
    with capture_output(), getppid_calls(0.005):
        for i in range(100):
            running = i % 10 == 0  # most runs only load + attach + close: the costly part
            shell.run_cell(cell("" if running else "--no-start"))
            probe = shell.user_ns["rerun"]
            assert probe.loaded
            assert probe.running == running
            assert probe.attach_points() == ["tracepoint:syscalls:sys_enter_getppid"]
            old.append(weakref.ref(probe))
            objects = bpf_objects()
            live_objects = live_objects or objects
            assert objects == live_objects, f"run {i}: {objects} != {live_objects}"
            if running:  # system-wide too, now and then (bpftool costs a process per call)
                wait_for(lambda: len(system_maps("ks_rerun_ev")) == 1, what="one ks_rerun_ev map")
    took = time.monotonic() - t0
    with capture_output():
        shell.run_cell("%bpf_stop rerun")
    assert bpf_objects() == base_objects
    assert fd_count() == base_fds
    wait_for(lambda: not system_maps("ks_rerun_ev"), what="every ks_rerun_ev map to be freed")
    assert all(r() is None or r().closed for r in old)  # type: ignore[union-attr]
    assert took < 180, f"100 re-runs took {took:.0f} s"  # a hang guard: 55 s quiet, 101 s loaded
    print(f"100 re-runs: {took:.1f} s")


@pytest.mark.kernel
def test_stop_all_and_unload_close_everything(shell: Shell) -> None:
    with capture_output(), getppid_calls():
        shell.run_cell("%%bpf one -D TARGET={os.getpid()}\n" + GETPPID)
        shell.run_cell("%%bpf two -D TARGET={os.getpid()}\n" + GETPPID)
        one, two = shell.user_ns["one"], shell.user_ns["two"]
        api = Probe(GETPPID, cflags=[f"-DTARGET={os.getpid()}"], name="api").start()  # Python API
        wait_for(lambda: len(one.df) and len(two.df) and len(api.df))
    listing = shell.run_cell("%bpf_list")
    assert set(listing.loc[listing["state"] == "running", "name"]) == {"one", "two", "api"}
    with pytest.raises(UsageError, match=r"several probes are live \(.*\): name one, or use --all"):
        shell.run_cell("%bpf_stop")
    with pytest.raises(UsageError, match="no probe named 'nope'"):
        shell.run_cell("%bpf_stop nope")
    with capture_output() as cap:
        shell.run_cell("%bpf_stop two")
    assert two.closed
    assert not one.closed
    assert "two: stopped" in cap.stdout

    shell.ip.run_line_magic("unload_ext", "kernelscope")
    try:
        assert one.closed
        assert api.closed
        assert len(one.df) > 0
        assert not [t for t in threading.enumerate() if t.name.startswith("kernelscope-")]
        with pytest.raises(UsageError, match="not found"):
            shell.run_cell("%%bpf three\n" + GETPPID)
    finally:
        shell.ip.run_line_magic("load_ext", "kernelscope")
    with capture_output() as cap:
        assert shell.run_cell("%bpf_list") is None  # api is closed; one and two were not made here
    assert cap.stdout == "no probes\n"


@pytest.mark.kernel
def test_list_shows_stopped_probes_with_their_rows_until_let_go(shell: Shell) -> None:
    shell.run_cell("%reset -f")  # earlier tests' probes, stopped, are still bound to their names
    shell.run_cell("import gc, os")
    shell.run_cell("gc.collect()")
    with capture_output() as cap:
        assert shell.run_cell("%bpf_list") is None
    assert cap.stdout == "no probes\n"  # not a table of headers

    with getppid_calls(), capture_output():
        shell.run_cell("%%bpf kept --limit 5 --quiet -D TARGET={os.getpid()}\n" + GETPPID)
        api = Probe(GETPPID, cflags=[f"-DTARGET={os.getpid()}"], name="api").start()
        wait_for(lambda: len(api.df) > 0, what="rows of the Python-made probe")
        api.stop()  # stopped, still loaded and attached
    kept = shell.user_ns["kept"]
    assert kept.closed  # --limit detached it
    listing = shell.run_cell("%bpf_list").set_index("name")
    assert sorted(listing.index) == ["api", "kept"]
    assert listing.loc["kept", "state"] == listing.loc["api", "state"] == "stopped"
    assert listing.loc["kept", "rows"] == len(kept.df) >= 5
    assert listing.loc["api", "rows"] == len(api.df) > 0
    assert listing.loc["kept", "attached"] == ""  # detached, its rows kept
    assert listing.loc["api", "attached"] == "tracepoint:syscalls:sys_enter_getppid"

    with capture_output() as cap:
        shell.run_cell("%bpf_stop kept")
    assert "kept: was already stopped" in cap.stdout
    api.close()  # closed: it goes
    assert list(shell.run_cell("%bpf_list")["name"]) == ["kept"]
    shell.run_cell("del kept")  # let go of by its name: it goes too
    del kept
    shell.run_cell("gc.collect()")
    with capture_output() as cap:
        assert shell.run_cell("%bpf_list") is None
    assert cap.stdout == "no probes\n"


TICKS = """%%bpf {name} --perf-event {prog} {flags}
#include <uapi/linux/bpf_perf_event.h>
BPF_ARRAY(ks_magic_ticks, u64, 1);
int on_tick(struct bpf_perf_event_data *ctx) {{
    ks_magic_ticks.increment(0);
    return 0;
}}
"""


@pytest.mark.kernel
def test_perf_event_flag_attaches_a_sampler_on_every_cpu(shell: Shell) -> None:
    with capture_output():
        shell.run_cell(TICKS.format(name="ticks", prog="on_tick", flags="--freq 199"))
    probe = shell.user_ns["ticks"]
    assert sorted(probe.attach_points()) == sorted(f"perf_event:cpu-clock:freq=199:cpu{c}"
                                                   for c in os.sched_getaffinity(0))
    assert not [w for w in probe.warnings if "is not attached" in w]

    def ticked() -> int:
        return int(probe.maps["ks_magic_ticks"].frame()["value"].sum())

    wait_for(lambda: ticked() > 0, timeout=10, what="a sample")
    with capture_output():
        shell.run_cell("%bpf_stop ticks")
    assert probe.closed


@pytest.mark.kernel
def test_perf_event_flag_mistakes_are_usage_errors_leaving_nothing_attached(shell: Shell) -> None:
    before = bpf_objects(), fd_count()
    bad = TICKS.replace("{name}", "badticks")
    msg, _ = _fails(shell, bad.format(prog="on_tick", flags="--freq 0"))
    assert msg == "%%bpf: --freq must be positive, got 0"
    msg, _ = _fails(shell, bad.format(prog="on_tick", flags="").replace("--perf-event on_tick", "--freq 99"))
    assert msg == "%%bpf: --freq is the sampling rate of --perf-event PROG: name the program too"
    msg, _ = _fails(shell, bad.format(prog="on-tick", flags=""))
    assert msg == "%%bpf: --perf-event takes a program's C function name, got 'on-tick'"
    msg, seen = _fails(shell, bad.format(prog="no_such_prog", flags=""))
    assert msg.startswith("%%bpf badticks: ")
    assert "no_such_prog" in msg
    assert "Traceback" not in seen
    assert "badticks" not in shell.user_ns
    assert_nothing_attached(*before)


# --- discovery -------------------------------------------------------------------------------


@pytest.mark.kernel
def test_tracepoints_magic_matches_globs_regexes_and_substrings(shell: Shell) -> None:
    exits = shell.run_cell("%bpf_tracepoints sched:*exit*")
    assert "sched:sched_process_exit" in set(exits["tracepoint"])
    assert all(t.startswith("sched:") for t in exits["tracepoint"])
    regex = shell.run_cell("%bpf_tracepoints ^syscalls:sys_enter_(openat|close)$")
    assert set(regex["tracepoint"]) == {"syscalls:sys_enter_openat", "syscalls:sys_enter_close"}
    assert "syscalls:sys_enter_openat" in set(shell.run_cell("%bpf_tracepoints openat")["tracepoint"])
    with capture_output() as cap:
        assert shell.run_cell("%bpf_tracepoints no_such_thing_anywhere").empty
    assert "no tracepoint matches" in cap.stdout


@pytest.mark.kernel
def test_format_magic_shows_fields_and_marks_common_ones(shell: Shell) -> None:
    fmt = shell.run_cell("%bpf_format sched:sched_process_exec")
    fields = fmt.fields.set_index("field")
    assert list(fields.index[:4]) == ["common_type", "common_flags", "common_preempt_count", "common_pid"]
    assert fields["common"].sum() == 4
    assert fields.loc["pid", "type"] == "pid_t"
    assert fields.loc["pid", "size"] == 4
    assert fields.loc["filename", "type"] == "__data_loc char[]"
    assert "TP_DATA_LOC_READ_STR" in fields.loc["filename", "bcc"]
    assert "(common)" in fmt._repr_html_()
    with pytest.raises(UsageError, match="did you mean sched:sched_switch"):
        shell.run_cell("%bpf_format sched:sched_swich")
    with pytest.raises(UsageError, match="usage: %bpf_format CATEGORY:EVENT"):
        shell.run_cell("%bpf_format")


@pytest.mark.kernel
def test_discovery_magics_record_then_replay_with_no_tracefs(shell: Shell, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNELSCOPE_CAPTURES", str(tmp_path))
    monkeypatch.setenv("KERNELSCOPE_MODE", "record")
    live = shell.run_cell("%bpf_tracepoints sched:*")
    live_fmt = shell.run_cell("%bpf_format sched:sched_process_exec")
    assert len(list(tmp_path.glob("*.json"))) == 2

    monkeypatch.setenv("KERNELSCOPE_MODE", "replay")  # and no tracefs: Binder's situation

    def no_tracefs(*args: object) -> None:
        raise AssertionError("replay read tracefs")

    monkeypatch.setattr(discover, "events_dir", no_tracefs)
    monkeypatch.setattr(host, "ensure_tracefs", no_tracefs)
    again = shell.run_cell("%bpf_tracepoints sched:*")
    assert isinstance(again, pd.DataFrame)
    assert again.equals(live)
    fmt = shell.run_cell("%bpf_format sched:sched_process_exec")
    assert isinstance(fmt, discover.TracepointFormat)
    assert fmt.args_fields().equals(live_fmt.args_fields())
    assert repr(fmt) == repr(live_fmt)
    with pytest.raises(UsageError) as info:
        shell.run_cell("%bpf_tracepoints syscalls:*")
    missing = tmp_path / (discover.capture_name("tracepoints", "syscalls:*") + ".json")
    assert str(info.value).startswith("%bpf_tracepoints: replay mode: no recorded list of tracepoints")
    assert f"{missing} is missing" in str(info.value)
    assert "KERNELSCOPE_MODE=record" in str(info.value)


def test_os_errors_in_magics_are_usage_errors_not_tracebacks(shell: Shell,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: object, **kwargs: object) -> Any:
        raise PermissionError(13, "Permission denied", "/sys/kernel/tracing/events")

    monkeypatch.setattr(discover, "tracepoints", refused)
    monkeypatch.setattr(discover, "tracepoint_format", refused)
    said = f"PermissionError: Permission denied: /sys/kernel/tracing/events (uid {os.geteuid()})"
    for cell in ("%bpf_tracepoints sched:*", "%bpf_format a:b"):
        msg, seen = _fails(shell, cell)
        assert msg == f"{cell.split()[0]}: {said}"
        assert "Traceback" not in seen
    monkeypatch.setattr(Probe, "load", refused)
    msg, seen = _fails(shell, "%%bpf refused -D TARGET=1\n" + GETPPID)
    assert msg.startswith("%%bpf refused: PermissionError: Permission denied: /sys/kernel/tracing/events")
    assert "Traceback" not in seen


def test_internal_errors_in_a_probe_are_not_usage_errors(shell: Shell,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # A corrupt buffer or a broken invariant is kernelscope's fault, not the cell's: it keeps its
    # traceback and says to report it, rather than reading as the user's mistake.
    for fault in (CorruptBufferError("corrupt ring: record length 99999 at byte 8"),
                  ValueError("internal layout error")):
        def broken(*args: object, fault: Exception = fault, **kwargs: object) -> Any:
            raise fault

        monkeypatch.setattr(probe_module.Probe, "load", broken)
        with pytest.raises(type(fault)) as info:
            shell.run_cell("%%bpf broken -D TARGET=1\n" + GETPPID)
        assert not isinstance(info.value, UsageError)
        assert isinstance(info.value, InternalError) == isinstance(fault, InternalError)
        assert magic.INTERNAL_NOTE in getattr(info.value, "__notes__", [])
    with pytest.raises(UsageError, match="--pages must be a power of two"):
        shell.run_cell("%%bpf x --pages 3\n" + GETPPID)


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="becoming uid 65534 needs root")
def test_as_uid_65534_tracefs_refusals_are_usage_errors_naming_the_fix(shell: Shell) -> None:
    from nobody import NOBODY, run_as_nobody

    host.import_bcc()  # the child cannot read /root, where this venv's interpreter may live
    expected = f"tracefs at {host.TRACEFS} is not readable by uid {NOBODY}"
    for cell in ("%bpf_tracepoints sched:*", "%bpf_format sched:sched_switch"):
        out = run_as_nobody(lambda cell=cell: shell.run_cell(cell))
        assert out.error == "UsageError", out.traceback
        assert expected in out.message
        assert "CAP_BPF and CAP_PERFMON alone do not open tracefs" in out.message
    # with the capabilities that load programs, the tracepoint check still needs tracefs
    cell = "%%bpf nobody -D TARGET=1\n" + GETPPID
    out = run_as_nobody(lambda: shell.run_cell(cell), caps=(host.CAP_BPF, host.CAP_PERFMON))
    assert out.error == "UsageError", out.traceback
    assert out.message.startswith(f"%%bpf nobody: {expected}")
    out = run_as_nobody(lambda: shell.run_cell(cell))  # no capabilities at all
    assert out.error == "UsageError", out.traceback
    assert "loading BPF programs needs root, or CAP_BPF and CAP_PERFMON" in out.message


@pytest.mark.kernel
def test_record_mode_shows_no_banner_and_replay_mode_does(shell: Shell, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNELSCOPE_CAPTURES", str(tmp_path))
    monkeypatch.setenv("KERNELSCOPE_MODE", "record")
    with capture_output() as cap:
        assert mode.setup_notebook("ignored") == "record"  # KERNELSCOPE_CAPTURES is set already
    assert not cap.outputs  # a committed notebook reads as a live run
    with getppid_calls(), capture_output() as cap:
        shell.run_cell(f"%%bpf recd --limit 5 -D TARGET={os.getpid()}\n{GETPPID}")
    assert "recording" not in shown(cap)
    assert "kernelscope is" not in shown(cap)
    assert (tmp_path / "recd.parquet").exists()
    monkeypatch.setenv("KERNELSCOPE_MODE", "replay")
    with capture_output() as cap:
        assert mode.setup_notebook("ignored") == "replay"
    assert f"kernelscope is replaying recorded captures from {tmp_path}/" in cap.outputs[0].data["text/html"]


# --- the display helpers, without a frontend ------------------------------------------------


class Recorder:
    """Stands in for IPython's DisplayHandle: keeps what each update showed."""

    def __init__(self) -> None:
        self.shown: list[dict[str, str]] = []

    def update(self, obj: dict[str, str], **kwargs: Any) -> None:
        self.shown.append(obj)


@pytest.mark.kernel
def test_status_line_refreshes_in_a_thread_until_the_probe_stops() -> None:
    probe = Probe(GETPPID, cflags=[f"-DTARGET={os.getpid()}"], name="st").start()
    rec = Recorder()
    status = StatusLine(probe, "st", handle=rec, interval=0.05).start()
    try:
        with getppid_calls():
            wait_for(lambda: len(rec.shown) >= 3 and "/s" in rec.shown[-1]["text/plain"], what="refreshes")
        assert rec.shown[-1]["text/plain"].startswith("st: running")
        assert status.alive
        probe.stop()
        wait_for(lambda: not status.alive, what="the status thread to end with the probe")
        assert rec.shown[-1]["text/plain"].startswith("st: stopped")
        assert "/s" not in rec.shown[-1]["text/plain"]
    finally:
        status.stop()
        probe.close()


def test_progress_bar_text_and_throttling() -> None:
    class Fake:
        outputs: dict[str, Any] = {}  # noqa: RUF012
        closed, running, loaded, started_at, error = False, True, True, 1.0, None

    fake = Fake()
    lines: list[str] = []
    out = SimpleNamespace(write=lines.append, flush=lambda: None, isatty=lambda: True)
    now = [0.0]
    bar = Progress(fake, "p", duration=4.0, limit=None, live=False, out=out, clock=lambda: now[0])
    bar(100, 1.0)
    bar(150, 1.1)  # too soon after the last redraw: skipped
    now[0] = 1.0
    bar(200, 2.0)
    bar.finish("done")
    assert len(lines) == 3
    assert lines[0] == "\rp [######..................] 1.0/4 s, 100 events, 100/s, 0 dropped"
    assert lines[1].startswith("\rp [############............] 2.0/4 s, 200 events")
    assert lines[2].endswith("  done\n")


# --- in a real Jupyter kernel ---------------------------------------------------------------


class KernelSession:
    """Runs cells in a fresh ipykernel and collects the iopub messages they produce."""

    def __init__(self, kc: Any) -> None:
        self.kc = kc

    def messages(self, until: Any, timeout: float = 30) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while not until(out):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; got {[m['msg_type'] for m in out]}"
            out.append(self.kc.get_iopub_msg(timeout=left))
        return out

    def run(self, code: str, timeout: float = 30) -> list[dict[str, Any]]:
        msg_id = self.kc.execute(code)
        msgs = self.messages(lambda ms: any(_idle(m, msg_id) for m in ms), timeout)
        reply = self.kc.get_shell_msg(timeout=timeout)
        assert reply["content"]["status"] == "ok", reply["content"]
        return msgs


def _idle(m: dict[str, Any], msg_id: str) -> bool:
    return (m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
            and m["parent_header"].get("msg_id") == msg_id)


def _text(m: dict[str, Any]) -> str:
    return str(m["content"].get("data", {}).get("text/plain", m["content"].get("text", "")))


@contextlib.contextmanager
def jupyter_kernel() -> Iterator[tuple[Any, Any, KernelSession]]:
    """A real ipykernel started from the repository's root: (manager, client, session)."""
    manager = pytest.importorskip("jupyter_client.manager")
    km, kc = manager.start_new_kernel(kernel_name="python3", cwd=str(Path(__file__).parents[1]))
    try:
        yield km, kc, KernelSession(kc)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.mark.kernel
def test_in_jupyter_the_status_line_updates_in_place_and_interrupt_keeps_rows() -> None:
    with jupyter_kernel() as (km, kc, k):
        k.run("%load_ext kernelscope\nimport os, threading, time\n"
              "threading.Thread(target=lambda: [time.sleep(0.001) or os.getppid() for _ in iter(int, 1)],"
              " daemon=True).start()")
        first = k.run("%%bpf live -D TARGET={os.getpid()}\n" + GETPPID)
        shown = [m for m in first if m["msg_type"] == "display_data"]
        assert len(shown) == 1
        display_id = shown[0]["content"]["transient"]["display_id"]

        def updates(ms: list[dict[str, Any]]) -> list[str]:
            return [_text(m) for m in ms if m["msg_type"] == "update_display_data"
                    and m["content"]["transient"]["display_id"] == display_id]

        later = k.messages(lambda ms: len(updates(ms)) >= 3, timeout=10)  # ~2 Hz, after the cell ended
        assert all(u.startswith("live: running") and "/s" in u for u in updates(later))
        stop = k.run("%bpf_stop live")
        assert updates(stop)[-1].startswith("live: closed")

        msg_id = kc.execute("%%bpf intr --duration 60 -D TARGET={os.getpid()}\n" + GETPPID)
        k.messages(lambda ms: any(m["msg_type"] == "update_display_data" and " 0 events" not in _text(m)
                                  and _text(m).startswith("intr [") for m in ms), timeout=20)
        km.interrupt_kernel()  # the notebook's stop button: SIGINT to the kernel
        t0 = time.monotonic()
        end = k.messages(lambda ms: any(_idle(m, msg_id) for m in ms), timeout=20)
        assert time.monotonic() - t0 < 10
        assert kc.get_shell_msg(timeout=5)["content"]["status"] == "ok"  # no traceback, no error
        assert any("interrupted after" in _text(m) for m in end)
        check = k.run("print(intr.closed, intr.running, len(intr.df) > 0)")
        assert "True False True" in "".join(_text(m) for m in check)


@pytest.mark.kernel
def test_in_jupyter_examples_arrive_as_the_next_cell_and_run() -> None:
    from kernelscope import examples

    with jupyter_kernel() as (_, kc, k):
        k.run("%load_ext kernelscope")
        msg_id = kc.execute("%bpf_examples opens")
        printed = k.messages(lambda ms: any(_idle(m, msg_id) for m in ms))
        reply = kc.get_shell_msg(timeout=30)["content"]
        assert reply["status"] == "ok"
        # ipykernel sends set_next_input as a payload of the reply: JupyterLab makes it a new cell
        assert reply["payload"] == [{"source": "set_next_input", "text": examples.get("opens"),
                                     "replace": False}]
        assert "example opens is in the next cell" in "".join(_text(m) for m in printed)
        k.run(reply["payload"][0]["text"])  # the inserted cell, run as the user would
        check = k.run("print(opens.running, sorted(opens.attach_points()))")
        assert ("True ['tracepoint:syscalls:sys_enter_openat', 'tracepoint:syscalls:sys_exit_openat']"
                in "".join(_text(m) for m in check))


@pytest.mark.kernel
def test_replay_flag_and_replay_mode_bind_the_recorded_frame(shell: Shell, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    with getppid_calls(), capture_output():
        shell.run_cell(f"%%bpf rec --limit 20 -D TARGET={os.getpid()}\n{GETPPID}")
    live = shell.user_ns["rec"]
    path = live.save(tmp_path / "rec.parquet")
    with capture_output():
        shell.run_cell(f"%%bpf again --replay {path}\n{GETPPID}")
    again = shell.user_ns["again"]
    assert type(again).__name__ == "Replay"
    assert again.df.equals(live.df)
    # the mode switch: the same cell, untouched, replays captures/<name>.parquet
    monkeypatch.setenv("KERNELSCOPE_MODE", "replay")
    monkeypatch.setenv("KERNELSCOPE_CAPTURES", str(tmp_path))
    with capture_output() as out:
        shell.run_cell(f"%%bpf rec --limit 20 -D TARGET={os.getpid()}\n{GETPPID}")
    shown = out.stdout + " ".join(o.data.get("text/plain", "") for o in out.outputs)
    assert "replaying recorded captures" in shown
    assert shell.user_ns["rec"].df.equals(live.df)


# --- the CO-RE (libbpf) backend through the magic ------------------------------------------

CORE_CELL = r"""%%bpf {name} {flags}
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
struct ev {{ u32 pid; u32 ppid; }};
struct {{ __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096 * 16); }} ks_core_ev SEC(".maps");
SEC("tp/syscalls/sys_enter_getppid")
int on_getppid(void *ctx) {{
    struct task_struct *t = (struct task_struct *)bpf_get_current_task();
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != TARGET) return 0;
    struct ev *e = bpf_ringbuf_reserve(&ks_core_ev, sizeof(*e), 0);
    if (!e) return 0;
    e->pid = pid;
    e->ppid = BPF_CORE_READ(t, real_parent, tgid);
    {body}
    bpf_ringbuf_submit(e, 0);
    return 0;
}}
"""


@pytest.mark.kernel
@pytest.mark.parametrize("flags", ["", "--libbpf"])
def test_core_cell_is_picked_by_sec_or_flag_and_reads_struct_fields_without_a_warning(
        shell: Shell, flags: str) -> None:
    shell.magics.layout = magic.LayoutVerdict(True, "pretend mismatch")  # would warn for a BCC cell
    cell = CORE_CELL.format(name="co", flags=f"{flags} --limit 20 -D TARGET={{os.getpid()}}", body="")
    with getppid_calls(), capture_output() as cap:
        shell.run_cell(cell)
    probe = shell.user_ns["co"]
    assert probe.backend == "libbpf"
    assert probe.closed  # --limit: blocked, then stopped and detached
    assert len(probe.df) >= 20
    assert (probe.df["pid"] == os.getpid()).all()
    assert (probe.df["ppid"] == os.getppid()).all()  # real_parent->tgid, relocated by CO-RE
    assert not any(o.data.get("text/plain", "").startswith("WARNING") for o in cap.outputs)


@pytest.mark.kernel
def test_core_cell_errors_name_the_cell_line_and_leave_nothing_attached(shell: Shell) -> None:
    before = bpf_objects(), fd_count()
    msg, seen = _fails(shell, CORE_CELL.format(name="cobroken", flags="-D TARGET=1",
                                               body="e->pid = undeclared_thing;"))
    assert msg.startswith("%%bpf cobroken: compile error")
    assert "line 16: error: use of undeclared identifier 'undeclared_thing'" in msg
    assert "Traceback" not in seen
    msg, _ = _fails(shell, CORE_CELL.format(name="coverif", flags="-D TARGET=1",
                                            body="e->pid = *(u32 *)(long)bpf_get_prandom_u32();"))
    assert msg.startswith("%%bpf coverif: line 16: the verifier rejected on_getppid")
    assert "    16 |     e->pid = *(u32 *)(long)bpf_get_prandom_u32();" in msg
    assert "invalid mem access" in msg
    assert_nothing_attached(*before)


@pytest.mark.kernel
def test_bcc_flag_forces_bcc_and_both_flags_are_refused(shell: Shell) -> None:
    msg, _ = _fails(shell, CORE_CELL.format(name="cobcc", flags="--bcc -D TARGET=1", body=""))
    assert msg.startswith("%%bpf cobcc: compile error")  # BCC has no SEC(".maps") maps or vmlinux.h
    msg, _ = _fails(shell, "%%bpf x --libbpf --bcc\nint x;")
    assert "choose one of --libbpf and --bcc" in msg


@pytest.mark.kernel
def test_set_gives_core_globals_their_values_before_load(shell: Shell) -> None:
    cell = r"""%%bpf coset --limit 10 --set targ_tgid={os.getpid()} --set tag=0x2a
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
const volatile pid_t targ_tgid = 0;
const volatile u64 tag = 0;
struct ev { u32 pid; u64 tag; };
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096 * 16); } ks_core_set SEC(".maps");
SEC("tp/syscalls/sys_enter_getppid")
int on_getppid(void *ctx) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != targ_tgid) return 0;
    struct ev *e = bpf_ringbuf_reserve(&ks_core_set, sizeof(*e), 0);
    if (!e) return 0;
    e->pid = pid;
    e->tag = tag;
    bpf_ringbuf_submit(e, 0);
    return 0;
}
"""
    with getppid_calls(), capture_output():
        shell.run_cell(cell)
    df = shell.user_ns["coset"].df
    assert len(df) >= 10
    assert (df["pid"] == os.getpid()).all()
    assert (df["tag"] == 42).all()
    msg, _ = _fails(shell, "%%bpf x --set 9lives=1\nint x;")
    assert "--set expects NAME=VALUE with NAME a C identifier" in msg


def test_ring_pages_not_a_power_of_two_are_the_users_mistake(shell: Shell) -> None:
    """A ring size in pages that is not a power of two is a user's mistake: a UsageError
    naming the rule, never an internal error."""
    cell = "%%bpf badpages --no-start --pages 3\n" + GETPPID.replace("TARGET", "0")
    with capture_output(), pytest.raises(UsageError, match="power of two"):
        shell.run_cell(cell)


@pytest.mark.kernel
@pytest.mark.parametrize("backend", ["bcc", "libbpf"])
def test_verbose_shows_the_verifiers_whole_log(shell: Shell, backend: str) -> None:
    from test_verifier_messages import BCC_CASES, CORE_CASES

    _, body, line, _, words = (BCC_CASES if backend == "bcc" else CORE_CASES)[0]
    short, _ = _fails(shell, f"%%bpf vm --{backend}\n{body}")
    assert short.splitlines()[-1] == magic.VERBOSE_HINT
    whole, _ = _fails(shell, f"%%bpf vm --{backend} --verbose\n{body}")
    assert whole.startswith(f"%%bpf vm: line {line + 1}: the verifier rejected ")
    assert re.search(r"^processed \d+ insns", whole, re.M)
    assert words in whole
    assert len(whole.splitlines()) > len(short.splitlines())
