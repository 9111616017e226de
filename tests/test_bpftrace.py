"""%%bpftrace and kernelscope.bpftrace: real bpftrace scripts against what the test makes happen.

A target child process blocks SIGUSR1, says it is ready, waits for the signal, then makes
exactly the syscalls the test asks for; the scripts filter on its pid, so the counts and the
histogram are known exactly. The parsing tests feed bpftrace's JSON lines by hand.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output
from nobody import can_drop_privileges, run_as_nobody
from shell import Shell, shell_fixtures
from util import wait_for

from kernelscope.bpftrace import Bpftrace, BpftraceMissingError, live_runs, parse, replay
from kernelscope.bpftrace.run import _Child

shell, no_probes_left = shell_fixtures()


# --- helpers ---------------------------------------------------------------------------------


class Target:
    """A python child that runs `code` once told to (SIGUSR1), so a script can filter on its pid
    and be attached before anything happens."""

    def __init__(self, code: str) -> None:
        prelude = ("import os, signal, sys\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
                   "sys.stdout.write('ready\\n'); sys.stdout.flush()\nsignal.sigwait({signal.SIGUSR1})\n")
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", prelude + textwrap.dedent(code)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "ready\n"
        self.pid = self.proc.pid
        self.comm = Path(f"/proc/{self.pid}/comm").read_text().strip()

    def run(self) -> None:
        """Go, and wait until it is done."""
        self.proc.send_signal(signal.SIGUSR1)
        assert self.proc.wait(30) == 0


def bpftrace_children() -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is this test process and whose command is
    bpftrace (or setpriv about to become it), zombies included."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if int(ppid) == me and comm in ("bpftrace", "setpriv"):
            found.append((int(entry), state))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.fixture(autouse=True)
def no_bpftrace_left() -> Iterator[None]:
    yield
    assert bpftrace_children() == []
    assert live_runs() == []
    assert not [t for t in threading.enumerate() if t.name.startswith("kernelscope-bpftrace")]


# --- parsing (no bpftrace) -----------------------------------------------------------------


def test_printf_formats_name_their_columns() -> None:
    script = textwrap.dedent(r'''
        // printf("not this one %d\n", 1);
        tracepoint:syscalls:sys_enter_openat { printf("open pid=%d file=%s\n", pid, str(args->filename)); }
        tracepoint:syscalls:sys_enter_read { printf("%-16s %6u %x\n", comm, args->count, $flags); }
    ''')
    f1, f2 = parse.printf_formats(script)
    assert [f.name for f in f1.fields] == ["pid", "file"]
    assert [f.name for f in f2.fields] == ["comm", "count", "flags"]
    assert f1.line == 3
    rec = f2.record("bash                 17 1f\n")
    assert rec is not None
    assert (rec["comm"][0], int(rec["count"][0]), int(rec["flags"][0])) == (b"bash", 17, 0x1F)
    assert f1.record("bash                 17 1f\n") is None
    assert parse.map_keys("@x[pid, comm] = count(); @y[args->fd] = sum(1); @z = hist(1);") == {
        "@x": ["pid", "comm"], "@y": ["fd"]}


def test_stream_split_anywhere_gives_the_same_rows_and_maps() -> None:
    """Lines cut at every byte: each chunk's whole lines are parsed when they are whole."""
    fmts = parse.printf_formats('BEGIN { printf("n=%d s=%s\\n", 1, "a"); }')
    lines = [b'{"type": "attached_probes", "data": {"probes": 2}}', b'',
             b'{"type": "printf", "data": "n=1 s=a b\\n"}', b'{"type": "printf", "data": "n=-5 s=\\n"}',
             b'{"type": "printf", "data": "free text\\n"}', b'{"type": "lost_events", "data": {"events": 3}}',
             b'{"type": "map", "data": {"@k": {"7,a,b": 2, "8,c": 5}}}',
             b'{"type": "hist", "data": {"@h": [{"max": -1, "count": 1}, {"min": 0, "max": 0, "count": 2}, '
             b'{"min": 1, "max": 1, "count": 0}, {"min": 2, "max": 3, "count": 4}]}}']
    data = b"\n".join(lines) + b"\n"
    for cut in (1, 7, 50, len(data) - 1):
        outputs = {"printf": parse_output(fmts[0])}
        child = _Child(fmts, outputs, None)
        child.feed(data[:cut])
        child.feed(data[cut:])
        df = outputs["printf"].store.frame()
        assert df[["n", "s"]].values.tolist() == [[1, "a b"], [-5, ""]]
        assert child.outputs["printf_other"].store.frame()["text"].tolist() == ["free text"]
        assert (child.lost, child.attached) == (3, 2)
        keys = parse.map_frame(child.snapshots["@k"][-1], ["pid", "comm"])
        assert keys.values.tolist() == [[7, "a,b", 2], [8, "c", 5]]  # commas kept in the last key
        h = parse.histogram(parse.map_frame(child.snapshots["@h"][-1]), ("hist", ["x"]))
        assert h.low.tolist()[1:] == [0, 1, 2]
        assert h.counts[0].tolist() == [1, 2, 0, 4]


def as_binder(path: Path) -> tuple[list[list[int]], int]:
    os.environ["PATH"] = "/nonexistent"  # no bpftrace to find
    r = replay(path)
    return r.hist("@bytes").counts.tolist(), len(r.df)


def parse_output(fmt: parse.Format) -> object:
    from kernelscope.bpftrace.run import _new_output

    return _new_output("printf", 0, fmt.dtype, None)


def test_keyed_lhist_on_one_grid_with_open_buckets() -> None:
    data = {"a": [{"max": -1, "count": 1}, {"min": 0, "max": 9, "count": 2}],
            "b": [{"min": 30, "max": 39, "count": 3}, {"min": 100, "count": 4}]}
    h = parse.histogram(parse.hist_buckets(data, ["comm"]), ("lhist", ["x", "0", "100", "10"]))
    assert h.layout == "linear"
    assert h.step == 10
    assert h.low.tolist()[1:] == list(range(0, 101, 10))
    assert h.counts.sum(axis=1).tolist() == [3, 7]
    assert h.keys is not None
    assert h.keys["comm"].tolist() == ["a", "b"]


def test_error_locations_from_stderr() -> None:
    e = parse.script_error("ERROR: couldn't set RLIMIT_MEMLOCK for bpftrace.\n"
                           "stdin:4:3-6: ERROR: syntax error, unexpected identifier\n  foo bar }\n  ~~~\n", 1)
    assert isinstance(e, parse.BpftraceScriptError)
    assert (e.line, e.col, e.message) == (4, 3, "syntax error, unexpected identifier")
    said = parse.stderr_messages(["ERROR: couldn't set RLIMIT_MEMLOCK for bpftrace.",
                                  "stdin:1:5-7: WARNING: x", "BEGIN { }", "    ~~", "WARNING: y"])
    assert said == ["stdin:1:5-7: WARNING: x\nBEGIN { }\n    ~~", "WARNING: y"]
    e = parse.script_error("stdin:1-2: ERROR: tracepoint not found: a:b\n", 1)
    assert isinstance(e, parse.BpftraceScriptError)
    assert (e.line, e.col) == (2, None)
    e = parse.script_error("ERROR: bpftrace currently only supports running as the root user.\n", 1)
    assert "root user" in str(e)
    assert "KERNELSCOPE_MODE=replay" in str(e)


def test_missing_bpftrace_names_the_package(shell: Shell, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BpftraceMissingError, match="apt-get install bpftrace"):
        Bpftrace("BEGIN { exit(); }", bpftrace="/nonexistent/bpftrace").start()
    monkeypatch.setenv("KERNELSCOPE_BPFTRACE", "/nonexistent/bpftrace")
    with pytest.raises(UsageError, match="apt-get install bpftrace"):
        shell.run_cell("%%bpftrace nope\nBEGIN { exit(); }")


# --- real bpftrace ---------------------------------------------------------------------------


@pytest.mark.kernel
def test_counts_match_the_calls_made(shell: Shell) -> None:
    """37 getppid() and 11 getpgrp() from one process: both printf formats get exactly their
    rows, the count() maps and the interval snapshots agree, and nothing is lost."""
    target = Target("[os.getppid() for _ in range(37)]\n[os.getpgrp() for _ in range(11)]\n")
    with capture_output():
        shell.run_cell(f"""%%bpftrace calls
tracepoint:syscalls:sys_enter_getppid /pid == {target.pid}/ {{
  @calls[comm, pid] = count(); printf("getppid pid=%d tid=%d\\n", pid, tid); }}
tracepoint:syscalls:sys_enter_getpgrp /pid == {target.pid}/ {{
  @pgrp = count(); printf("%s %d\\n", comm, pid); }}
interval:ms:100 {{ print(@calls); }}
""")
    bt = shell.user_ns["calls"]
    assert bt.loaded
    assert bt.running
    listed = shell.run_cell("%bpf_list")
    assert "calls" in listed["name"].tolist()
    target.run()
    with capture_output():
        shell.run_cell("%bpf_stop calls")
    assert not bt.running
    assert bt.returncode == 0
    ppid, pgrp = bt.frame("printf1"), bt.frame("printf2")
    assert len(ppid) == 37
    assert set(ppid["pid"]) == set(ppid["tid"]) == {target.pid}
    assert len(pgrp) == 11
    assert set(pgrp["pid"]) == {target.pid}
    assert set(pgrp["comm"]) == {target.comm}
    calls = bt.map("@calls")
    assert calls[["comm", "pid", "value"]].values.tolist() == [[target.comm, target.pid, 37]]
    assert bt.map("@pgrp")["value"].tolist() == [11]
    snaps = bt.snapshots("@calls")
    assert snaps["value"].is_monotonic_increasing
    assert snaps["value"].iloc[-1] == 37
    st = bt.stats
    for name in ("printf1", "printf2"):
        assert st[name]["attempted"] == st[name]["received"] + st[name]["dropped"]
    assert (st["printf1"]["received"], st["printf2"]["received"], bt.lost_events) == (37, 11, 0)


@pytest.mark.kernel
def test_hist_matches_the_reads_made(shell: Shell, tmp_path: Path) -> None:
    """read() sizes the target chose: hist() and lhist() put each in the bucket holding it, and
    the saved run replays the same frames, maps and histograms."""
    sizes = [1] * 3 + [100] * 5 + [4096] * 7 + [70000] * 2 + [0] * 4
    target = Target(f"fd = os.open('/dev/zero', os.O_RDONLY)\nfor n in {sizes}: os.read(fd, n)\n")
    bt = Bpftrace(f"""tracepoint:syscalls:sys_enter_read /pid == {target.pid}/ {{
  @bytes = hist(args->count); @lin = lhist(args->count, 0, 5000, 1000); printf("%d\\n", args->count); }}""",
                  name="reads").start()
    target.run()
    bt.stop()
    for name in ("@bytes", "@lin"):
        h = bt.hist(name)
        expected = [sum(lo <= s <= hi for s in sizes) for lo, hi in zip(h.low, h.high, strict=True)]
        assert h.counts[0].tolist() == expected
        assert h.total == len(sizes)
    assert bt.hist("@lin").layout == "linear"
    assert bt.hist("@bytes").layout == "log2"
    assert sorted(bt.df["count"].tolist()) == sorted(sizes)
    path = bt.save(tmp_path / "reads.parquet")
    r = replay(path)
    pd.testing.assert_frame_equal(r.df, bt.df)
    assert r.hist("@bytes") == bt.hist("@bytes")
    assert r.hist("@lin") == bt.hist("@lin")
    assert r.stats["printf"]["received"] == len(sizes)
    with capture_output():
        shell.run_cell(f"%%bpftrace again --replay {path}\n// the recorded script is used")
    assert shell.user_ns["again"].hist("@bytes") == bt.hist("@bytes")
    if can_drop_privileges():  # Binder's user: no bpftrace, no BPF, no root
        shared = Path(tempfile.mkdtemp(prefix="ks-bt-"))
        try:
            shared.chmod(0o755)
            (shared / "reads.parquet").write_bytes(path.read_bytes())
            (shared / "reads.parquet").chmod(0o644)
            out = run_as_nobody(lambda: as_binder(shared / "reads.parquet"))
        finally:
            shutil.rmtree(shared)
        assert out.error is None, out.traceback
        assert out.value == (bt.hist("@bytes").counts.tolist(), len(sizes))


@pytest.mark.kernel
def test_lost_events_are_the_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A printf per call into a 1-page perf buffer loses most of 100,000 calls; the rows
    received plus bpftrace's lost_events are every call, exactly (stop() waits until each CPU's
    buffer has been read, so the last losses are reported too)."""
    calls = 100_000
    monkeypatch.setenv("BPFTRACE_PERF_RB_PAGES", "1")
    target = Target(f"[os.getppid() for _ in range({calls})]\n")
    bt = Bpftrace(f'tracepoint:syscalls:sys_enter_getppid /pid == {target.pid}/ {{ @n = count(); '
                  'printf("%d\\n", tid); }').start()
    target.run()
    bt.stop()
    st = bt.stats["printf"]
    assert bt.map("@n")["value"].tolist() == [calls]  # the map counts in the kernel: no loss
    assert st["dropped"] == bt.lost_events > 0
    assert st["attempted"] == st["received"] + st["dropped"] == calls
    assert len(bt.df) == st["received"]


@pytest.mark.kernel
def test_pid_run_ends_when_its_process_exits() -> None:
    """bpftrace -p PID: the run ends by itself when that process exits, and wait() returns then."""
    target = Target("[os.getppid() for _ in range(5)]\n")
    bt = Bpftrace(f"tracepoint:syscalls:sys_enter_getppid /pid == {target.pid}/ {{ @n = count(); }}",
                  pid=target.pid).start()
    target.run()
    bt.wait(duration=60)
    assert bt.returncode == 0
    assert bt.map("@n")["value"].tolist() == [5]
    assert bt.stats == {}  # no printf: nothing streamed, nothing to lose


@pytest.mark.kernel
def test_error_shows_bpftrace_message_at_the_cell_line(shell: Shell) -> None:
    with pytest.raises(UsageError) as e:
        shell.run_cell("%%bpftrace bad\nBEGIN {\n  @x = count();\n  nosuchthing(1);\n}\n")
    text = str(e.value)
    assert "line 4:3: Unknown function: nosuchthing" in text
    assert "    4 |   nosuchthing(1);" in text
    with pytest.raises(UsageError, match=r"line 3: tracepoint not found: syscalls:sys_enter_nope"):
        shell.run_cell("%%bpftrace bad\n// a comment\ntracepoint:syscalls:sys_enter_nope { @x = count(); }\n")
    assert "bad" not in shell.user_ns


@pytest.mark.kernel
def test_reruns_and_stops_leave_no_bpftrace(shell: Shell) -> None:
    """100 runs: 95 started and closed at once (killed while bpftrace is still starting, the
    cheap part), 5 full cell re-runs that attach and replace each other; none leaves a child."""
    script = "tracepoint:syscalls:sys_enter_getppid { @n = count(); }"
    for _ in range(95):
        bt = Bpftrace(script).start(wait=False)
        bt.close()
        assert bt.returncode is not None
    pids = set()
    with capture_output():
        for _ in range(5):
            shell.run_cell(f"%%bpftrace again\n{script}")
            run = shell.user_ns["again"]
            assert run.loaded
            assert run._child.proc is not None
            pids.add(run._child.proc.pid)
            assert [p for p, _ in bpftrace_children()] == [run._child.proc.pid]
        shell.run_cell("%bpf_stop --all")
    assert len(pids) == 5
    assert bpftrace_children() == []


@pytest.mark.kernel
def test_ctrl_c_in_a_blocking_cell_stops_and_keeps_the_maps(shell: Shell) -> None:
    def interrupt() -> None:
        wait_for(lambda: any(r.loaded for r in live_runs()), timeout=30, what="bpftrace to attach")
        os.getppid()
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with capture_output() as out:
        shell.run_cell(f"%%bpftrace waited --duration 60\ntracepoint:syscalls:sys_enter_getppid "
                       f"/pid == {os.getpid()}/ {{ @n = count(); }}")
    assert "interrupted after" in out.stdout
    bt = shell.user_ns["waited"]
    assert bt.closed
    assert bt.returncode is not None  # reaped (0 unless bpftrace took over STOP_TIMEOUT to exit)
    assert bt.map("@n")["value"].tolist() == [1]


@pytest.mark.kernel
def test_no_orphan_when_the_kernel_process_dies() -> None:
    """A Jupyter kernel killed outright (SIGKILL, no atexit): bpftrace dies with it."""
    code = ("import os, sys\nfrom kernelscope.bpftrace import Bpftrace\n"
            "bt = Bpftrace('tracepoint:syscalls:sys_enter_getppid { @n = count(); }').start()\n"
            "print(bt._child.proc.pid, flush=True)\nos.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout.split()[0])
    wait_for(lambda: not alive(child), timeout=10, what=f"bpftrace {child} to end")


# --- review fixes (issue 16) -----------------------------------------------------------------

INT64_MAX = 2**63 - 1


@pytest.mark.kernel
def test_real_output_big_hist_lhist_printf_formats_keys_and_positional() -> None:
    """One BEGIN run through real bpftrace 0.17: hist() values >= 2**31 (printed as {min:
    -2**31, max: 0}) in a top bucket up to the int64 limit; an lhist whose max is no multiple of
    its step has no overlapping bucket; a bare "%s\\n" does not take the other formats' lines,
    %-6d matches; a string key with commas stays whole; $1 comes from `positional`."""
    bt = Bpftrace(textwrap.dedent(r'''
        BEGIN {
          printf("%s\n", "free text");
          printf("n=%-6d|\n", $1);
          printf("%d %s\n", 7, "ab");
          @big = hist(5); @big = hist(2147483648); @big = hist(1099511627776);
          @l = lhist(92, 0, 95, 10); @l = lhist(3, 0, 95, 10);
          @k["a,b", 1] = count(); @k["c", 2] = count(); @k["d", 3] = count();
          exit();
        }'''), positional=[42])
    assert bt.argv()[-2:] == ["-", "42"]
    bt.wait(duration=30)
    assert bt.returncode == 0
    assert bt.frame("printf1")["f0"].tolist() == ["free text"]
    assert bt.frame("printf2")["n"].tolist() == [42]
    assert bt.frame("printf3")[["f0", "f1"]].values.tolist() == [[7, "ab"]]
    assert "printf_other" not in bt.outputs
    big = bt.map("@big")
    assert big[big["count"] > 0][["low", "high", "count"]].values.tolist() == [
        [4, 7, 1], [2**31, INT64_MAX, 2]]
    assert (big["low"] > 0).all()
    h = bt.hist("@big")
    assert h.counts.sum() == 3
    assert (h.low[-1], h.high[-1]) == (2**31, INT64_MAX)
    lh = bt.hist("@l")
    assert (lh.high[:-1] < lh.low[1:]).all()  # no bucket overlaps the next
    assert (lh.low[-2], lh.high[-2], lh.low[-1]) == (80, 89, 90)  # 92 was counted from 90 up
    assert lh.counts.sum() == 2
    keys = bt.map("@k")
    assert keys.sort_values("key1")[["key0", "key1", "value"]].values.tolist() == [
        ["a,b", 1, 1], ["c", 2, 1], ["d", 3, 1]]
    assert "ambiguous_keys" not in keys.attrs


def test_map_keys_with_commas_go_to_the_string_key() -> None:
    kinds = parse.map_key_kinds('@k[pid, comm, cpu] = count(); @j[$a, $b] = count();')
    assert kinds == {"@k": ["n", "s", "n"], "@j": [None, None]}
    snap = parse.Snapshot(0.0, "map", {"7,a,b,c,1": 2, "8,x,0": 5})
    frame = parse.map_frame(snap, ["pid", "comm", "cpu"], kinds["@k"])
    assert frame.values.tolist() == [[7, "a,b,c", 1, 2], [8, "x", 0, 5]]
    both = parse.map_frame(parse.Snapshot(0.0, "map", {"a,b,c": 1}), ["a", "b"], kinds["@j"])
    assert both.attrs["ambiguous_keys"] == ["a,b,c"]


@pytest.mark.kernel
def test_error_columns_and_an_unclosed_block(shell: Shell) -> None:
    """printf formats are tagged in the script bpftrace runs; its error columns and the line
    it quotes are still the cell's. An unclosed block points at the cell's end."""
    line = 'BEGIN { printf("%d a\\n", 1); printf("%s\\n", "x"); @q = nosuch(3); }'
    with pytest.raises(UsageError) as e:
        shell.run_cell(f"%%bpftrace bad\n{line}\n")
    text = str(e.value)
    assert f"line 2:{line.index('nosuch') + 1}: Unknown function: nosuch" in text
    assert f"    2 | {line}\n      | {' ' * line.index('nosuch')}~~~~~~" in text
    assert "\x1e" not in text
    with pytest.raises(UsageError) as e:
        shell.run_cell("%%bpftrace bad\nBEGIN {\n  @x = count();\n")
    text = str(e.value)
    assert "at the end of the cell (an unclosed block?)" in text
    assert "    3 |   @x = count();" in text
    assert "sys_enter_close" not in text


def test_bpftrace_line_positional_parameters() -> None:
    from kernelscope.jupyter.magic import split_bpftrace_line

    assert split_bpftrace_line("x --duration 1 -- -B full -- 5 -6") == (
        "x --duration 1", ["-B", "full"], ["5", "-6"])
    assert split_bpftrace_line("x -- 5 -q eth0") == ("x", ["-q"], ["5", "eth0"])
    assert split_bpftrace_line("x") == ("x", [], [])


@pytest.mark.kernel
def test_stop_hand_shake_in_a_pid_namespace() -> None:
    """In a new PID namespace (getpid() is 1 there, bpftrace sees root-namespace pids) the
    hand-shake is answered by every CPU and nothing is taken off the lost count."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed for this test")
    code = ("import os\nfrom kernelscope.bpftrace import Bpftrace\n"
            "bt = Bpftrace('BEGIN { }').start()\nok = bt._child.drain()\nc = bt._child\n"
            "bt.stop()\nprint(os.getpid(), ok, c.sync_works, c.sync_sent == c.sync_received > 0,"
            " bt.lost_events, bt.warnings == [])\n")
    proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "True", "True", "True", "0", "True"]


@pytest.mark.kernel
def test_unanswered_hand_shake_warns_and_subtracts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernelscope.bpftrace import run

    monkeypatch.setattr(run, "SYNC_FIRST_TIMEOUT", 0.3)
    never = "\ntracepoint:syscalls:sys_enter_close /pid == 0/ {}\n"  # a probe that answers nothing
    monkeypatch.setattr(run, "sync_probe", lambda token: never)
    bt = Bpftrace("BEGIN { }").start()
    bt._child.lost_reported = 3  # as if bpftrace had reported 3 losses
    bt.stop()
    assert bt._child.sync_works is False
    assert bt._child.sync_sent > 0
    assert bt.lost_events == 3
    assert run.SYNC_WARNING in bt.warnings


@pytest.mark.kernel
def test_collected_run_in_the_spawner_thread_does_not_deadlock() -> None:
    """A run collected in the spawner thread (a cyclic GC while Popen allocates, _spawn()
    holding the lock and waiting) is killed and reaped there without taking the lock."""
    from kernelscope.bpftrace import run

    a = Bpftrace("BEGIN { }").start(wait=False)
    with run._spawner_lock:
        assert run._spawner is not None
        run._spawner.submit(run._finish, a._child).result(timeout=10)
    assert not a._child.has_child
    a.close()


@pytest.mark.kernel
def test_record_mode_save_failure_is_kept_and_replay_honours_the_speed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture that cannot be saved: stop() raises, close() does not, and the run says why
    (warnings, save_error). A run recorded, then replayed under KERNELSCOPE_REPLAY_SPEED."""
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("KERNELSCOPE_MODE", "record")
    monkeypatch.setenv("KERNELSCOPE_CAPTURES", str(tmp_path / "afile" / "sub"))
    bt = Bpftrace("BEGIN { @n = count(); }", name="rec").start()
    bt.close()
    assert isinstance(bt.save_error, NotADirectoryError)
    assert any("capture of rec was not saved" in w for w in bt.warnings)
    assert bt.map("@n")["value"].tolist() == [1]
    monkeypatch.setenv("KERNELSCOPE_CAPTURES", str(tmp_path))
    bt = Bpftrace("BEGIN { @n = count(); }", name="rec").start()
    bt.close()
    assert bt.save_error is None
    monkeypatch.setenv("KERNELSCOPE_MODE", "replay")
    monkeypatch.setenv("KERNELSCOPE_REPLAY_SPEED", "2")
    r = Bpftrace("ignored in replay mode", name="rec")
    assert r.speed == 2.0
    assert r.map("@n")["value"].tolist() == [1]
    r.close()


def test_messages_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernelscope.bpftrace import run

    monkeypatch.setattr(run, "MAX_MESSAGES", 3)
    child = _Child([], {}, None)
    child.feed(b"".join(b'{"type": "time", "data": "%d\\n"}\n' % i for i in range(5)))
    assert [t for _, _, t in child.messages] == ["2\n", "3\n", "4\n"]
    assert child.messages_dropped == 2


@pytest.mark.kernel
def test_no_orphan_without_setpriv(tmp_path: Path) -> None:
    """No setpriv on PATH: prctl(PR_SET_PDEATHSIG) in the child still ends bpftrace with the
    kernel process that started it."""
    bpftrace = shutil.which("bpftrace")
    assert bpftrace is not None
    code = ("import os, sys\nfrom kernelscope.bpftrace import Bpftrace\n"
            "bt = Bpftrace('tracepoint:syscalls:sys_enter_getppid { @n = count(); }').start()\n"
            "print(bt._child.proc.pid, bt.argv()[0], flush=True)\nos.kill(os.getpid(), 9)\n")
    env = {**os.environ, "PATH": str(tmp_path), "KERNELSCOPE_BPFTRACE": bpftrace}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=False, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child, argv0 = proc.stdout.split()
    assert argv0 == bpftrace
    wait_for(lambda: not alive(int(child)), timeout=10, what=f"bpftrace {child} to end")


def test_untagged_lines_and_stats_keyed_count() -> None:
    """A line without a tag (a script run before tags, system()...) goes to %d before %s when
    both fit; stats() keyed by the string "count" is still a keyed map."""
    fm = parse.printf_formats('BEGIN { printf("%s\\n", comm); } END { printf("%d\\n", pid); }')
    assert list(parse.dispatch([{"type": "printf", "data": "1234\n"}], fm, 0).rows) == [1]
    tagged = parse.dispatch([{"type": "printf", "data": "\x1e0\x1f1234\n"}], fm, 0)
    assert list(tagged.rows) == [0]
    snap = parse.Snapshot(0.0, "stats", {"count": {"count": 1, "average": 4, "total": 4}})
    assert parse.map_frame(snap, ["k"]).values.tolist() == [["count", 1, 4, 4]]

