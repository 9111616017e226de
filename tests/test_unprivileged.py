"""The `kernelscope` command as a user without root, for real (uid 65534, see nobody.py).

Refusals end as one line on stderr and a nonzero exit, naming the cause and the fix. The
discovery functions and the magics have their own uid 65534 tests (test_discover.py,
test_magic.py).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
from nobody import NOBODY, run_as_nobody

from kernelscope import cli, host

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
