"""`kernelscope doctor`: real probes on this kernel, and clear answers on a faked bad host."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernelscope import cli, host
from kernelscope.doctor import checks as doctor
from kernelscope.doctor.report import BASICS, Check, DoctorReport, render_text


@pytest.fixture(scope="module")
def found() -> DoctorReport:
    """One doctor run shared by the module (each run compiles a BCC program, ~2-3 s)."""
    return doctor.report()


def kprobes_configured() -> bool:
    config = host.kernel_config()
    return config is None or config[0].get("CONFIG_KPROBES", "n") != "n"


# --- on the real kernel -----------------------------------------------------------------


@pytest.mark.kernel
def test_basics_work_here(found: DoctorReport) -> None:
    for name in BASICS:
        assert found[name].ok is True, found[name]
    assert found.ok


@pytest.mark.kernel
@pytest.mark.parametrize("name", ["tracepoint", "raw tracepoint", "uprobe"])
def test_attach_kinds_that_work_here_fired(found: DoctorReport, name: str) -> None:
    check = found[name]
    assert check.ok is True, check
    assert check.data["hits"] >= 1


@pytest.mark.kernel
@pytest.mark.parametrize("name", ["ringbuf", "perf event array"])
def test_output_maps_delivered_events(found: DoctorReport, name: str) -> None:
    check = found[name]
    assert check.ok is True, check
    assert check.data["events"] >= 1


@pytest.mark.kernel
def test_kprobe_result_names_the_missing_config(found: DoctorReport) -> None:
    check = found["kprobe"]
    if kprobes_configured():
        assert check.ok is True, check
    else:
        assert check.ok is False
        assert "CONFIG_KPROBES is not set" in check.detail
        assert check.fix


@pytest.mark.kernel
def test_fentry_result_names_the_reason(found: DoctorReport) -> None:
    check = found["fentry"]
    if check.ok:
        return  # a kernel that allows fentry: nothing to explain
    assert check.ok is False
    lockdown = host.lockdown_mode()
    if "EPERM" in check.detail and lockdown is not None and lockdown[0] != "none":
        assert f"lockdown is '{lockdown[0]}'" in check.detail
    else:
        assert re.search(r"CONFIG_\w+|BTF|EPERM", check.detail), check.detail


@pytest.mark.kernel
def test_this_kernel_has_no_kprobes_and_no_fentry(found: DoctorReport) -> None:
    """PLATFORM.md's facts for this project's machines; skips elsewhere, saying so."""
    if kprobes_configured():
        pytest.skip("kernel has CONFIG_KPROBES: not this project's 6.18 machine")
    assert found["kprobe"].ok is False
    assert "CONFIG_KPROBES" in found["kprobe"].detail
    assert found["fentry"].ok is False
    assert "lockdown" in found["fentry"].detail
    assert "integrity" in found["fentry"].detail


@pytest.mark.kernel
def test_usdt_is_probed_or_says_no_binary(found: DoctorReport) -> None:
    check = found["usdt"]
    if check.ok is None:
        assert "no USDT-enabled binary found" in check.detail
    else:
        assert check.ok is True, check
        assert "gc__start" in check.detail


@pytest.mark.kernel
def test_user_ringbuf_kernel_yes_bcc_no(found: DoctorReport) -> None:
    check = found["user ringbuf"]
    assert check.ok is True, check
    if not check.data["bcc_supports"]:
        assert "cannot declare it" in check.detail


@pytest.mark.kernel
def test_header_layout_agrees_with_what_the_check_measured(found: DoctorReport) -> None:
    check = found["header layout"]
    headers, btf = check.data["headers"], check.data["btf"]
    assert set(headers) == {doctor._field_name(s, m) for s, m in doctor.LAYOUT_FIELDS}
    # tgid follows pid in every task_struct: a sanity check on both measurements
    for side in (headers, btf):
        assert side["task_struct.tgid"] == side["task_struct.pid"] + 4
    differ = sorted(k for k in headers if k in btf and headers[k] != btf[k])
    assert check.data["differ"] == differ
    if differ:
        assert check.ok is False
        assert "task->tgid get garbage" in check.detail
        assert "CO-RE" in check.fix
        for key in differ:
            assert f"{key} {headers[key]} vs {btf[key]}" in check.detail
    else:
        assert check.ok is True


@pytest.mark.kernel
def test_header_layout_mismatch_on_this_machine(found: DoctorReport) -> None:
    """6.1 headers against a 6.18 kernel: task_struct differs, as PLATFORM.md measured."""
    headers = found["kernel headers"]
    if headers.data["version"] == headers.data["kernel"]:
        pytest.skip("headers match the running kernel here")
    check = found["header layout"]
    assert check.ok is False
    assert "task_struct.tgid" in check.data["differ"]


@pytest.mark.kernel
def test_btf_offsets_match_bpftool_raw_dump(found: DoctorReport) -> None:
    """The JSON walk gives the same task_struct.tgid offset as bpftool's plain-text dump."""
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    raw = subprocess.run([bpftool, "btf", "dump", "file", str(doctor.BTF_VMLINUX), "format",
                          "raw"], capture_output=True, text=True, check=True).stdout
    block = raw.split("STRUCT 'task_struct' ", 1)[1].split("\n[", 1)[0]
    bits = int(re.search(r"'tgid' type_id=\d+ bits_offset=(\d+)", block).group(1))
    size = int(re.match(r"size=(\d+)", block).group(1))
    btf = found["header layout"].data["btf"]
    assert btf["task_struct.tgid"] == bits // 8
    assert btf["sizeof(task_struct)"] == size


@pytest.mark.kernel
def test_doctor_unloads_everything(fd_count, bpf_object_counts) -> None:
    before_fds, before_bpf = fd_count(), bpf_object_counts()
    checks = doctor.run_checks()
    assert {c.name for c in checks} >= {"tracepoint", "ringbuf", "header layout"}
    assert bpf_object_counts() == before_bpf
    assert fd_count() == before_fds


@pytest.mark.kernel
def test_a_program_that_does_not_compile_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, bpf_object_counts
) -> None:
    before = bpf_object_counts()
    monkeypatch.setattr(doctor, "_program", lambda parts, target: "this is not C;\n")
    checks = {c.name: c for c in doctor.run_checks()}
    for name in ("tracepoint", "uprobe", "ringbuf"):
        assert checks[name].ok is False
        assert "did not compile" in checks[name].detail
    assert checks["header layout"].ok is None
    assert bpf_object_counts() == before


@pytest.mark.kernel
def test_a_failing_optional_part_is_dropped_and_the_rest_still_probed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = doctor._program

    def no_ringbuf(parts: set[str], target: str) -> str:
        src = real(parts, target)
        return src + "#error ring buffers are broken here\n" if "ringbuf" in parts else src

    monkeypatch.setattr(doctor, "_program", no_ringbuf)
    checks = {c.name: c for c in doctor.run_checks()}
    assert checks["ringbuf"].ok is False
    assert "ring buffers are broken here" in checks["ringbuf"].detail
    assert checks["tracepoint"].ok is True
    assert checks["perf event array"].ok is True


@pytest.mark.kernel
def test_doctor_is_quick(found: DoctorReport) -> None:
    assert found.seconds < 10


@pytest.mark.kernel
def test_cli_doctor_exit_code_zero() -> None:
    exe = Path(sys.executable).parent / "kernelscope"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kernelscope.cli"]
    proc = subprocess.run([*cmd, "doctor"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("privileges", "tracepoint", "kprobe", "ringbuf", "header layout"):
        assert re.search(rf"^(ok|no|FAIL|\?)\s+\*?\s+{name}\b", proc.stdout, re.M), name
    assert "basics work" in proc.stdout


# --- faked bad hosts (no root needed) ----------------------------------------------------


def test_without_privileges_nothing_is_loaded_and_exit_is_nonzero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(host, "effective_caps", lambda: 0)
    checks = {c.name: c for c in doctor.run_checks()}
    assert checks["privileges"].ok is False
    assert "CAP_BPF" in checks["privileges"].fix
    for name in ("tracepoint", "kprobe", "ringbuf", "header layout"):
        assert checks[name].ok is None
        assert "not probed" in checks[name].detail

    code = cli.main(["doctor"])
    out, err = capsys.readouterr()
    assert code != 0
    assert "basics missing: privileges" in out
    assert "Traceback" not in out + err


def test_without_bcc_the_doctor_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bcc", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(host, "DEBIAN_BCC", tmp_path / "absent")
    host.import_bcc.cache_clear()
    try:
        checks = {c.name: c for c in doctor.run_checks()}
    finally:
        host.import_bcc.cache_clear()
    assert checks["bcc"].ok is False
    assert "python3-bpfcc" in checks["bcc"].fix
    assert checks["tracepoint"].ok is None


def test_without_headers_the_doctor_says_how_to_get_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "find_headers", lambda: None)
    monkeypatch.setattr(host, "installed_headers", list)
    checks = {c.name: c for c in doctor.run_checks()}
    assert checks["kernel headers"].ok is False
    assert "linux-headers-amd64" in checks["kernel headers"].fix
    assert "not probed" in checks["tracepoint"].detail


def test_unmounted_tracefs_is_a_failed_basic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "is_mounted", lambda path, fstype: False)
    check = doctor._check_tracefs()
    assert check.ok is False
    assert check.required
    assert "kernelscope setup" in check.fix


# --- rendering ---------------------------------------------------------------------------


def sample() -> list[Check]:
    return [
        Check("privileges", True, "root"),
        Check("kprobe", False, "CONFIG_KPROBES is not set", "use tracepoints"),
        Check("usdt", None, "unknown: no USDT-enabled binary found"),
        Check("tracepoint", False, "<no> & such", "run `kernelscope setup`"),
    ]


def test_text_table_shows_status_fix_and_verdict() -> None:
    text = render_text(sample(), 1.25)
    lines = text.splitlines()
    assert "1.2 s" in lines[0] or "1.3 s" in lines[0]
    assert re.search(r"^ok\s+\*\s+privileges\s+root$", text, re.M)
    assert re.search(r"^no\s+kprobe\s+CONFIG_KPROBES is not set$", text, re.M)
    assert re.search(r"^\?\s+usdt\s+unknown", text, re.M)
    assert re.search(r"^FAIL\s+\*\s+tracepoint", text, re.M)
    assert "fix: use tracepoints" in text
    assert "basics missing: tracepoint" in lines[-1]


def test_html_report_escapes_and_renders_in_notebooks() -> None:
    rep = DoctorReport(sample(), 0.5)
    out = rep._repr_html_()
    assert "<table" in out
    assert "&lt;no&gt; &amp; such" in out
    assert "fix: run `kernelscope setup`" in out
    assert "basics missing" in out
    assert not rep.ok
    assert str(rep) == render_text(rep.checks, 0.5)
    with pytest.raises(KeyError):
        rep["no such check"]
