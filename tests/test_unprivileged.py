"""The `kernelscope` command as a user without root, for real (uid 65534, see nobody.py).

Refusals end as one line on stderr and a nonzero exit, naming the cause and the fix. The
discovery functions and the magics have their own uid 65534 tests (test_discover.py,
test_magic.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nobody import NOBODY, run_as_nobody

from kernelscope import Probe, cli, host, tracepoints
from kernelscope.errors import TracefsAccessError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="becoming uid 65534 needs root")

PROGRAM = Path(__file__).resolve().parents[1] / "bpf" / "exec_exit_openat.c"


def _cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(list(argv))
    return code, err.getvalue()


@pytest.fixture(scope="module")
def imported() -> None:
    """What the child imports lazily, imported here: it may not read this venv's interpreter."""
    import kernelscope.backends.core
    import kernelscope.captures.record  # noqa: F401

    host.import_bcc()


@needs_root
@pytest.mark.kernel
@pytest.mark.usefixtures("imported")
def test_record_with_bpf_capabilities_but_no_tracefs_access_is_one_line() -> None:
    source = PROGRAM.read_text()  # the child may not be able to read the checkout
    record = Path("/tmp") / f"ks-unprivileged-{os.getpid()}.c"
    record.write_text(source)
    record.chmod(0o644)
    try:
        out = run_as_nobody(lambda: _cli("record", str(record), "--duration", "1", "-o", "/tmp/x.parquet"),
                            caps=(host.CAP_BPF, host.CAP_PERFMON))
    finally:
        record.unlink()
    assert out.error is None, out.traceback
    code, err = out.value
    assert code != 0
    assert err.count("\n") == 1  # one line
    assert err.startswith(f"kernelscope record: tracefs at {host.TRACEFS} is not readable by uid {NOBODY}")
    assert "CAP_BPF and CAP_PERFMON alone do not open tracefs" in err
    assert "Traceback" not in err


@needs_root
@pytest.mark.usefixtures("imported")
def test_setup_without_privileges_is_one_line() -> None:
    out = run_as_nobody(lambda: _cli("setup"))
    assert out.error is None, out.traceback
    code, err = out.value
    assert code != 0
    assert err.count("\n") == 1
    assert err.startswith("kernelscope setup: loading BPF programs needs root, or CAP_BPF and CAP_PERFMON")


def test_an_os_error_the_cli_does_not_name_is_still_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(args: object) -> int:
        raise PermissionError(13, "Permission denied", "/sys/kernel/tracing/events")

    monkeypatch.setattr(cli, "cmd_setup", refused)
    code, err = _cli("setup")
    assert code == cli.EXIT_ERROR
    assert err == ("kernelscope setup: PermissionError: [Errno 13] Permission denied: "
                   "'/sys/kernel/tracing/events'\n")


CAPS = (host.CAP_BPF, host.CAP_PERFMON)
GETPPID_BCC = """
struct ev { u32 pid; };
BPF_RINGBUF_OUTPUT(ks_unpriv_ev, 16);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    struct ev e = {.pid = bpf_get_current_pid_tgid() >> 32};
    if (e.pid == TARGET) ks_unpriv_ev.ringbuf_output(&e, sizeof(e), 0);
    return 0;
}
"""
GETPPID_CORE = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096 * 4); } ks_unpriv_core SEC(".maps");
struct ev { u32 pid; };
SEC("tp/syscalls/sys_enter_getppid")
int ks_unpriv_core_tp(void *ctx) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != TARGET) return 0;
    struct ev *e = bpf_ringbuf_reserve(&ks_unpriv_core, sizeof(*e), 0);
    if (!e) return 0;
    e->pid = pid;
    bpf_ringbuf_submit(e, 0);
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""
SOURCES = {"bcc": GETPPID_BCC, "libbpf": GETPPID_CORE}


@pytest.fixture
def nobody_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A cache folder uid 65534 may write (the CO-RE backend keeps vmlinux.h there; $HOME is /root)."""
    from kernelscope.backends import toolchain

    with tempfile.TemporaryDirectory(prefix="ks-unpriv-") as folder:
        os.chmod(folder, 0o777)
        monkeypatch.setattr(toolchain, "CACHE", Path(folder) / "vmlinux")
        yield Path(folder)


def _received(backend: str) -> int:
    """Load, attach and run a getppid probe of `backend`; the rows it received (50 expected)."""
    p = Probe(SOURCES[backend], backend=backend, cflags=[f"-DTARGET={os.getpid()}"]).start()
    try:
        for _ in range(50):
            os.getppid()
        time.sleep(0.3)
        p.stop()
        return len(p.df)
    finally:
        p.close()


@needs_root
@pytest.mark.kernel
@pytest.mark.parametrize("backend", ["bcc", "libbpf"])
@pytest.mark.usefixtures("imported", "nobody_cache")
def test_probe_with_bpf_capabilities_but_no_tracefs_access_is_a_kernelscope_error(backend: str) -> None:
    out = run_as_nobody(lambda: _received(backend), caps=CAPS, timeout=120)
    assert out.error == "TracefsAccessError", out.traceback
    assert "KernelscopeError" in out.classes
    assert out.message.startswith(f"tracefs at {host.TRACEFS} is not readable by uid {NOBODY}")
    assert f"`{TracefsAccessError.group_command(host.TRACEFS)}`" in out.message
    assert "mode=755 alone is not enough" in out.message


@needs_root
@pytest.mark.kernel
@pytest.mark.usefixtures("imported")
def test_doctor_with_bpf_capabilities_reports_tracefs_access_as_a_verdict() -> None:
    def doctor() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = cli.main(["doctor"])
        return code, out.getvalue(), err.getvalue()

    out = run_as_nobody(doctor, caps=CAPS, timeout=180)
    assert out.error is None, out.traceback
    code, table, err = out.value
    assert code == cli.EXIT_ERROR
    assert err == ""
    assert "Traceback" not in table
    rows = _rows(table)
    assert rows["privileges"].startswith("ok"), table
    assert rows["tracefs"].startswith("FAIL"), table
    assert f"mounted at {host.TRACEFS}, but uid {NOBODY} may not read it" in rows["tracefs"]
    assert TracefsAccessError.group_command(host.TRACEFS) in rows["tracefs"]
    assert f"(uid {NOBODY} may not read tracefs)" in rows["tracepoint"]
    assert "the doctor's probe failed" not in table  # the probe ran: raw tracepoints need no tracefs
    assert rows["raw tracepoint"].startswith("ok"), table
    assert "apt-get install clang" not in rows["co-re"]  # the toolchain is not what is missing


def _rows(table: str) -> dict[str, str]:
    """The doctor's table as {check: its text, wrapped lines joined}."""
    rows: dict[str, str] = {}
    name = ""
    for line in table.splitlines():
        if line[:4] in ("ok  ", "FAIL", "no  ", "?   "):
            name = line[7:25].strip()
            rows[name] = line.rstrip()
        elif name and line.startswith(" " * 7):
            rows[name] += " " + line.strip()
    return rows


def _remount(tracefs: Path, mode: int, gid: int) -> None:
    subprocess.run(["mount", "-o", f"remount,mode={mode:o},gid={gid}", str(tracefs)], check=True)


@contextlib.contextmanager
def tracefs_readable_by_group(gid: int) -> Iterator[None]:
    """Apply the remount the error message recommends, then put tracefs's mode and group back.

    mode=750 with a group no other test uses: uid 65534 without that group is refused as before,
    so tests running at the same time see the same tracefs.
    """
    top = os.stat(host.TRACEFS)
    command = TracefsAccessError.group_command(host.TRACEFS, gid).split()
    subprocess.run(command, check=True)
    try:
        yield
    finally:
        _remount(host.TRACEFS, stat.S_IMODE(top.st_mode), top.st_gid)
    after = os.stat(host.TRACEFS)
    assert (stat.S_IMODE(after.st_mode), after.st_gid) == (stat.S_IMODE(top.st_mode), top.st_gid)


@needs_root
@pytest.mark.kernel
@pytest.mark.parametrize("backend", ["bcc", "libbpf"])
def test_the_recommended_tracefs_fix_lets_a_capable_user_trace(backend: str, nobody_cache: Path) -> None:
    group = 64_999  # a group id nothing on these machines uses
    with tracefs_readable_by_group(group):
        member = _in_a_new_process(backend, nobody_cache, (group,))
        outsider = _in_a_new_process(backend, nobody_cache, ())
    assert member["error"] is None, member["traceback"]
    assert member["value"] == 50
    assert outsider["error"] == "TracefsAccessError", outsider["traceback"]


_FRESH = """
import dataclasses, json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_unprivileged as t
from nobody import run_as_nobody
from kernelscope.backends import toolchain
toolchain.CACHE = Path({cache!r})
out = run_as_nobody(lambda: t._received({backend!r}), caps=t.CAPS, timeout=120, groups={groups!r})
print(json.dumps(dataclasses.asdict(out)))
"""


def _in_a_new_process(backend: str, cache: Path, groups: tuple[int, ...]) -> dict:
    """run_as_nobody(_received) from a new root process, not from this one: libbpf decides once
    per process whether to reach tracefs through /sys/kernel/debug/tracing (it exists, for
    root), and a child forked after this process loaded CO-RE programs inherits that answer,
    which uid 65534 (who cannot enter /sys/kernel/debug) cannot use. A user's own process
    makes the decision as that user."""
    import json
    import sys

    code = _FRESH.format(tests=str(Path(__file__).parent), cache=str(cache / "vmlinux"),
                         backend=backend, groups=groups)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                         check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_root
def test_a_visible_but_unreadable_tracepoint_is_a_tracefs_error() -> None:
    """A tracefs remounted mode=755 alone: its files can be found, but stay root:root 0440."""
    base = Path(tempfile.mkdtemp(prefix="ks-unpriv-"))
    try:
        fmt = base / "tracing" / "events" / "sched" / "sched_switch" / "format"
        fmt.parent.mkdir(parents=True)
        fmt.write_text("name: sched_switch\n")
        for folder in (base, *fmt.parents[:4]):
            folder.chmod(0o755)
        fmt.chmod(0o440)
        out = run_as_nobody(lambda: tracepoints.check_tracepoint("sched", "sched_switch",
                                                                 events=fmt.parents[2]))
        assert out.error == "TracefsAccessError", out.traceback or out.value
        assert f"({fmt}: Permission denied)" in out.message
        assert tracepoints.check_tracepoint("sched", "sched_switch", events=fmt.parents[2]) is None
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=True)


@needs_root
@pytest.mark.kernel
@pytest.mark.parametrize("backend", ["bcc", "libbpf"])
@pytest.mark.usefixtures("imported", "nobody_cache")
def test_the_magic_with_bpf_capabilities_but_no_tracefs_access_is_a_usage_error(backend: str) -> None:
    """A %%bpf cell of either backend, run by an IPython shell as uid 65534 with the capabilities."""
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    ip = InteractiveShell.instance(config=config)
    ip.run_line_magic("load_ext", "kernelscope")
    try:
        cell = f"%%bpf unpriv -D TARGET={os.getpid()}\n{SOURCES[backend]}"

        def run() -> str:
            result = ip.run_cell(cell, silent=True)
            error = result.error_in_exec
            return f"{type(error).__name__}: {error}"

        out = run_as_nobody(run, caps=CAPS, timeout=120)
    finally:
        ip.run_line_magic("unload_ext", "kernelscope")
    assert out.error is None, out.traceback
    kind, _, message = out.value.partition(": ")
    assert kind == UsageError.__name__  # IPython shows a UsageError as its message alone
    assert message.startswith(f"%%bpf unpriv: tracefs at {host.TRACEFS} is not readable by uid {NOBODY}")
    assert TracefsAccessError.group_command(host.TRACEFS) in message
