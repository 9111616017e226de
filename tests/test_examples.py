"""The shipped examples (kernelscope.examples, `%bpf_examples`) through the real magic.

Each example's cell is taken from what `%bpf_examples NAME` put into the next input (the
text a notebook user gets), run as a `%%bpf` cell on the running kernel, and checked against
activity the test makes itself: a child that execs and exits with a known status, files it
opens, a TCP connection to 127.0.0.1, a child's syscalls and reads of known sizes, a program
with a known hot function for the CPU profile.
"""

from __future__ import annotations

import os
import platform
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output
from shell import Shell, shell_fixtures
from util import wait_for

from kernelscope import Probe, examples, lab
from kernelscope.hist import Histogram

# getppid's number, for the syscall count of a child that calls it a known number of times
GETPPID_NR = {"x86_64": 110, "aarch64": 173}


shell, no_probes_left = shell_fixtures("import os")


def inserted(shell: Shell, name: str) -> tuple[str, str]:
    """Run `%bpf_examples NAME`: the text it put into the next input, and what it printed."""
    shell.ip.rl_next_input = None
    with capture_output() as cap:
        assert shell.run_cell(f"%bpf_examples {name}") is None
    text = shell.ip.rl_next_input
    shell.ip.rl_next_input = None
    assert isinstance(text, str)
    return text, cap.stdout


def run_example(shell: Shell, name: str, extra: str = "") -> Probe:
    """The example's cell, as `%bpf_examples` inserted it (`extra` appended to its %%bpf line),
    run through the magic: the probe it bound to the example's name, running."""
    text, _ = inserted(shell, name)
    assert text == examples.get(name)
    if extra:
        line, nl, body = text.partition("\n")
        text = f"{line} {extra}{nl}{body}"
    with capture_output() as cap:
        assert shell.run_cell(text) is None  # returns at once: the probe runs on
    probe = shell.user_ns[name]
    assert isinstance(probe, Probe)
    assert probe.running, cap.stdout
    assert not [w for w in probe.warnings if "garbage" in w]  # nothing reads kernel structs by BCC
    return probe


def wait_frame(rows: Callable[[], pd.DataFrame | None], what: str) -> pd.DataFrame:
    """The frame `rows()` returns once it returns one (a DataFrame has no truth value)."""
    def found() -> list[pd.DataFrame] | None:
        df = rows()
        return None if df is None else [df]

    return wait_for(found, timeout=10, what=what)[0]


def stop(shell: Shell, name: str) -> None:
    with capture_output() as cap:
        shell.run_cell(f"%bpf_stop {name}")
    assert f"{name}: stopped" in cap.stdout


# --- the list, the cells, the errors ----------------------------------------------------------


def test_listing_gives_one_line_per_example_with_what_it_shows(shell: Shell) -> None:
    with capture_output() as cap:
        assert shell.run_cell("%bpf_examples") is None
    lines = cap.stdout.splitlines()
    assert len(lines) == len(examples.names()) + 1  # the examples, then how to insert one
    for line, ex in zip(lines, examples.all_examples(), strict=False):
        assert line.split()[0] == ex.name
        assert ex.summary in line
    assert lines[-1] == "%bpf_examples NAME puts one into the next cell"
    assert examples.names() == ["exec_exit", "opens", "tcp_states", "syscall_counts", "read_sizes",
                                "bash_commands", "profile"]


def test_every_example_is_a_bpf_cell_binding_its_name_from_a_shipped_file() -> None:
    package = Path(examples.__file__).parent
    for ex in examples.all_examples():
        cell = examples.get(ex.name)
        line, _, body = cell.partition("\n")
        assert line.split()[:2] == ["%%bpf", ex.name]
        assert body == (package / ex.file).read_text()
        assert body.startswith("//")  # it says what it shows and what to read
        assert ex.read.split(".")[0] == ex.name
        assert "kprobe" not in body.lower()  # neither works on this kernel
        assert "fentry" not in body.lower()


def test_inserting_an_example_sets_the_next_input_and_prints_one_hint(shell: Shell) -> None:
    text, printed = inserted(shell, "opens")
    assert text == examples.get("opens")
    assert text.startswith("%%bpf opens")
    assert printed == "example opens is in the next cell: run it, then read opens.df\n"
    assert "opens" not in shell.user_ns  # nothing ran yet


def test_unknown_or_several_names_are_usage_errors_listing_the_names(shell: Shell) -> None:
    with pytest.raises(UsageError) as info:
        shell.run_cell("%bpf_examples openz")
    msg = str(info.value)
    assert msg.startswith("%bpf_examples: no example 'openz'; did you mean 'opens'? examples: ")
    assert all(n in msg for n in examples.names())
    with pytest.raises(examples.UnknownExampleError,
                       match="no example 'nothing_like_it'; examples: exec_exit, opens"):
        examples.get("nothing_like_it")
    with pytest.raises(UsageError, match=r"usage: %bpf_examples \[NAME\], one name"):
        shell.run_cell("%bpf_examples opens profile")


# --- each example on the running kernel -------------------------------------------------------


@pytest.mark.kernel
def test_exec_exit_shows_the_file_run_the_parent_and_the_exit_status(shell: Shell) -> None:
    probe = run_example(shell, "exec_exit")
    t0 = time.monotonic_ns()
    exits3 = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
    exits3.wait()
    took = time.monotonic_ns() - t0
    killed = subprocess.Popen(["/bin/sleep", "30"])
    killed.kill()
    killed.wait()

    def rows(pid: int) -> pd.DataFrame | None:
        df = probe.df
        mine = df[df["pid"] == pid]
        return mine if set(mine["event"]) == {"exec", "exit"} else None

    mine = wait_frame(lambda: rows(exits3.pid), "the child's exec and exit")
    ex = mine[mine["event"] == "exec"].iloc[0]
    assert (ex["filename"], ex["comm"], ex["ppid"]) == ("/bin/sh", "sh", os.getpid())
    end = mine[mine["event"] == "exit"].iloc[0]
    assert (end["exit_code"], end["signal"], end["ppid"], end["comm"]) == (3, 0, os.getpid(), "sh")
    assert 0 < end["lifetime_ns"] <= took  # from its fork to its exit, inside our Popen..wait
    gone = wait_frame(lambda: rows(killed.pid), "the killed child's exit")
    assert gone[gone["event"] == "exit"]["signal"].tolist() == [signal.SIGKILL]
    stop(shell, "exec_exit")
    st = probe.stats["events"]
    assert st["attempted"] == st["received"] + st["dropped"]


@pytest.mark.kernel
def test_opens_shows_each_path_with_its_fd_or_errno(shell: Shell, tmp_path: Path) -> None:
    there = tmp_path / "opened-by-the-example-test.txt"
    there.write_text("x")
    missing = tmp_path / "not-there.txt"
    probe = run_example(shell, "opens")
    there.read_text()
    with pytest.raises(FileNotFoundError):
        missing.read_text()

    def ours() -> pd.DataFrame | None:
        df = probe.df
        mine = df[(df["pid"] == os.getpid()) & df["path"].isin([str(there), str(missing)])]
        return mine if set(mine["path"]) == {str(there), str(missing)} else None

    mine = wait_frame(ours, "both opens").set_index("path")
    assert mine.loc[str(there), "ret"] >= 0  # an fd
    assert mine.loc[str(there), "flags"] & os.O_ACCMODE == os.O_RDONLY
    assert mine.loc[str(missing), "ret"] == -2  # -ENOENT


@pytest.mark.kernel
def test_tcp_states_follow_a_connection_to_localhost_by_name(shell: Shell) -> None:
    probe = run_example(shell, "tcp_states")
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    cport = client.getsockname()[1]
    client.close()  # the client closes first: FIN_WAIT1 here, CLOSE_WAIT on the other end
    conn.close()
    server.close()

    def side(sport: int, dport: int, *wanted: str) -> pd.DataFrame | None:
        """Every row of the socket with these ports (its first may have no port yet)."""
        df = probe.df
        socks = df.loc[(df["sport"] == sport) & (df["dport"] == dport), "skaddr"]
        mine = df[df["skaddr"].isin(socks)].sort_values("ts")
        return mine if set(wanted) <= set(mine["newstate"]) else None

    out = wait_frame(lambda: side(cport, port, "SYN_SENT", "ESTABLISHED", "FIN_WAIT1"), "the client's states")
    states = out["newstate"].tolist()
    assert states[:3] == ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1"]
    assert out["oldstate"].iloc[0] == "CLOSE"
    assert set(out["saddr"]) == set(out["daddr"]) == {"127.0.0.1"}
    assert set(out["family"]) == {socket.AF_INET}
    assert out["skaddr"].nunique() == 1  # one socket
    back = wait_frame(lambda: side(port, cport, "CLOSE_WAIT", "LAST_ACK", "CLOSE"),
                      "the accepted socket's states")
    assert back["newstate"].tolist() == ["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"]
    listen = probe.df[(probe.df["sport"] == port) & (probe.df["newstate"] == "LISTEN")]
    assert len(listen) == 1


@pytest.mark.kernel
def test_syscall_counts_count_a_childs_calls_exactly(shell: Shell) -> None:
    nr = GETPPID_NR.get(platform.machine())
    if nr is None:
        pytest.skip(f"getppid's syscall number on {platform.machine()} is not in this test's table")
    calls = 5000
    probe = run_example(shell, "syscall_counts")
    child = subprocess.Popen([sys.executable, "-c", f"import os\nfor _ in range({calls}): os.getppid()"])
    assert child.wait(timeout=30) == 0
    comm = Path(sys.executable).name[:15]  # the kernel's comm: the file exec'd, 15 bytes at most

    def mine() -> pd.DataFrame | None:
        counts = probe.maps["counts"].frame()
        rows = counts[counts["pid"] == child.pid]
        return rows if (rows["nr"] == nr).any() else None

    wait_frame(mine, "the child's counts")
    stop(shell, "syscall_counts")
    counts = probe.maps["counts"].frame()  # as stop() found them
    rows = counts[counts["pid"] == child.pid]
    # exact: one counter for its getppid() calls after the exec (before it, it had our comm)
    assert rows.loc[rows["nr"] == nr, ["comm", "value"]].values.tolist() == [[comm, calls]]
    per_process = counts.groupby(["pid", "comm"])["value"].sum()  # what the cell's comment suggests
    assert per_process.loc[(child.pid, comm)] > calls  # its start-up made calls too


READER = """
import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
fd = os.open("/dev/zero", os.O_RDONLY)
print(os.getpid(), flush=True)
signal.sigwait({signal.SIGUSR1})
for n in SIZES:
    os.read(fd, n)
"""


@pytest.mark.kernel
def test_read_sizes_histogram_holds_exactly_the_reads_made(shell: Shell) -> None:
    sizes = [100] * 10 + [5000] * 20 + [65535] * 6 + [65536] * 4 + [3] * 9
    child = subprocess.Popen([sys.executable, "-c", READER.replace("SIZES", repr(sizes))],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        pid = int(child.stdout.readline())  # it waits for SIGUSR1, reading nothing
        probe = run_example(shell, "read_sizes", f"-D TARGET={pid}")
        child.send_signal(signal.SIGUSR1)
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
    stop(shell, "read_sizes")
    h = probe.maps["read_bytes"].hist(unit="bytes")
    truth = Histogram.of(np.array(sizes), unit="bytes")  # the same log2 rule on the sizes read
    got = h.frame().set_index(["low", "high"])["count"]
    want = truth.frame().set_index(["low", "high"])["count"]
    assert got.sum() == len(sizes)
    assert (got.reindex(want.index, fill_value=0) == want).all(), (got, want)


def _read_until(fd: int, marker: bytes, seen: bytearray) -> None:
    """Read a pty until `marker` has appeared (again) in what it printed."""
    want = seen.count(marker) + 1
    deadline = time.monotonic() + 10
    while seen.count(marker) < want:
        if time.monotonic() > deadline:
            raise AssertionError(f"bash printed no {marker!r}: {bytes(seen)!r}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            seen += os.read(fd, 4096)


@pytest.mark.kernel
def test_bash_commands_shows_a_line_typed_into_an_interactive_bash(shell: Shell) -> None:
    probe = run_example(shell, "bash_commands")
    assert probe.attach_points() == ["uretprobe:/bin/bash:readline"]
    prompt = b"ks-ready$ "
    pid, fd = pty.fork()
    if pid == 0:  # the child: an interactive bash on a terminal, so it reads with readline()
        os.execve("/bin/bash", ["bash", "--norc", "--noprofile", "-i"],
                  {"PS1": prompt.decode(), "TERM": "dumb", "PATH": "/usr/bin:/bin"})
    seen = bytearray()
    try:
        _read_until(fd, prompt, seen)
        os.write(fd, b"echo typed-by-the-test\n")
        _read_until(fd, prompt, seen)
        os.write(fd, b"exit 0\n")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0

    def typed() -> pd.DataFrame | None:
        df = probe.df
        mine = df[df["pid"] == pid]
        return mine if len(mine) == 2 else None

    lines = wait_frame(typed, "both lines typed")
    assert lines["line"].tolist() == ["echo typed-by-the-test", "exit 0"]
    assert set(lines["uid"]) == {os.getuid()}


@pytest.mark.kernel
def test_profile_samples_a_known_hot_function_on_every_cpu(shell: Shell) -> None:
    work = lab.Workload(naps=5, nap_ms=100)
    try:
        probe = run_example(shell, "profile")
        timers = [a for a in probe.attach_points() if a.startswith("perf_event:cpu-clock:freq=99:")]
        assert len(timers) == len(os.sched_getaffinity(0))  # one sampling timer per CPU
        made = work.go()  # a thread named "burner" spins in burn() while the main one naps
        stop(shell, "profile")  # while it lives: its symbols are kept
    finally:
        work.exit()
    df: Any = probe.stacks()
    burner = df[df["tid"] == made["burner"]]
    samples = int(burner["count"].sum())
    in_burn = int(burner.loc[burner["stack"].map(lambda s: "burn" in s), "count"].sum())
    assert samples > 0
    assert in_burn > samples / 2, burner[["stack", "count"]]  # most of its samples are in burn()
    assert set(burner["comm"]) == {"burner"}
