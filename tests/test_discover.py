"""Tracepoint discovery: pattern matching and tracefs format files, on text the tests write."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernelscope import tracepoints as discover
from kernelscope.errors import KernelscopeError, TracefsAccessError

EXEC_FORMAT = """name: sched_process_exec
ID: 365
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:pid_t old_pid;\toffset:16;\tsize:4;\tsigned:1;

print fmt: "filename=%s pid=%d old_pid=%d", __get_str(filename), REC->pid, REC->old_pid
"""

SWITCH_FIELDS = """ID: 372
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:const char * filename;\toffset:24;\tsize:8;\tsigned:0;
\tfield:unsigned long args[6];\toffset:32;\tsize:48;\tsigned:0;
"""

NAMES = [
    "sched:sched_process_exec",
    "sched:sched_process_exit",
    "sched:sched_switch",
    "syscalls:sys_enter_openat",
    "syscalls:sys_exit_openat",
    "syscalls:sys_enter_close",
]


def test_format_file_fields_types_offsets_and_common_marks() -> None:
    fmt = discover.parse_format(EXEC_FORMAT, "sched", "sched_process_exec")
    assert fmt.id == 365
    assert fmt.name == "sched:sched_process_exec"
    assert fmt.print_fmt.startswith('"filename=%s')
    rows = fmt.fields.to_dict("records")
    assert [(r["field"], r["type"], r["offset"], r["size"], r["signed"], r["common"]) for r in rows] == [
        ("common_type", "unsigned short", 0, 2, False, True),
        ("common_flags", "unsigned char", 2, 1, False, True),
        ("common_preempt_count", "unsigned char", 3, 1, False, True),
        ("common_pid", "int", 4, 4, True, True),
        ("filename", "__data_loc char[]", 8, 4, False, False),
        ("pid", "pid_t", 12, 4, True, False),
        ("old_pid", "pid_t", 16, 4, True, False),
    ]
    assert list(fmt.args_fields()["field"]) == ["filename", "pid", "old_pid"]
    assert fmt.fields.set_index("field").loc["pid", "bcc"] == "args->pid"
    assert "bpf_get_current_pid_tgid" in fmt.fields.set_index("field").loc["common_pid", "bcc"]


def test_arrays_and_pointers_keep_their_c_types() -> None:
    fields = discover.parse_format(SWITCH_FIELDS, "x", "y").fields.set_index("field")
    assert fields.loc["prev_comm", "type"] == "char[16]"
    assert fields.loc["filename", "type"] == "const char *"
    assert fields.loc["args", "type"] == "unsigned long[6]"
    assert "bpf_probe_read_user_str" in fields.loc["filename", "bcc"]
    assert "bpf_probe_read_kernel" in fields.loc["prev_comm", "bcc"]


def test_format_renders_as_text_and_html() -> None:
    fmt = discover.parse_format(EXEC_FORMAT, "sched", "sched_process_exec")
    text = repr(fmt)
    first = text.splitlines()[0]
    assert first == "tracepoint sched:sched_process_exec (id 365); common_* fields are marked *"
    assert "*common_pid" in text
    assert " old_pid" in text
    page = fmt._repr_html_()
    assert page.count("(common)") == 4
    assert "TRACEPOINT_PROBE(sched, sched_process_exec)" in page


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (None, NAMES),
        ("sched:*", NAMES[:3]),
        ("*openat", ["syscalls:sys_enter_openat", "syscalls:sys_exit_openat"]),
        ("sys_enter_*", ["syscalls:sys_enter_openat", "syscalls:sys_enter_close"]),  # event-only glob
        ("OPENAT", ["syscalls:sys_enter_openat", "syscalls:sys_exit_openat"]),  # substring, any case
        ("^sched:sched_process_(exec|exit)$", NAMES[:2]),  # regex syntax
        ("/exit/", ["sched:sched_process_exit", "syscalls:sys_exit_openat"]),  # explicit regex
        ("nothing", []),
    ],
)
def test_patterns(pattern: str | None, expected: list[str]) -> None:
    assert discover.match(pattern, NAMES) == expected


def test_bad_regex_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="bad regular expression"):
        discover.match("/(unclosed/", NAMES)


def _events(tmp_path: Path) -> Path:
    for name in NAMES:
        cat, ev = name.split(":")
        d = tmp_path / cat / ev
        d.mkdir(parents=True)
        (d / "format").write_text(EXEC_FORMAT.replace("sched_process_exec", ev))
    (tmp_path / "sched" / "enable").write_text("0\n")  # files next to events are not events
    return tmp_path


def test_tracepoints_from_an_events_folder(tmp_path: Path) -> None:
    df = discover.tracepoints("sched:*", events=_events(tmp_path))
    assert list(df.columns) == ["tracepoint", "category", "event"]
    assert list(df["event"]) == ["sched_process_exec", "sched_process_exit", "sched_switch"]


def test_unknown_tracepoint_names_close_matches(tmp_path: Path) -> None:
    events = _events(tmp_path)
    assert discover.tracepoint_format("syscalls/sys_enter_openat", events=events).id == 365
    with pytest.raises(discover.UnknownTracepointError, match="did you mean sched:sched_switch"):
        discover.tracepoint_format("sched:sched_swtich", events=events)
    with pytest.raises(ValueError, match="expected CATEGORY:EVENT"):
        discover.tracepoint_format("sched_switch", events=events)


# --- record and replay: what the magics found is saved, and read back without tracefs ----


@pytest.fixture
def recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Record `sched:*` and one format from a fake tracefs, then leave no tracefs at all."""
    events = _events(tmp_path / "tracing" / "events")
    captures = tmp_path / "captures"
    monkeypatch.setenv("KERNELSCOPE_CAPTURES", str(captures))
    monkeypatch.setenv("KERNELSCOPE_MODE", "record")
    monkeypatch.setattr(discover, "events_dir", lambda: events)
    discover.tracepoints("sched:*")
    discover.tracepoint_format("sched:sched_process_exec")
    monkeypatch.setattr(discover, "events_dir", lambda: tmp_path / "no-tracefs-here" / "events")
    monkeypatch.setenv("KERNELSCOPE_MODE", "replay")
    return captures


def test_record_saves_beside_the_captures_and_replay_reads_them_back(recorded: Path) -> None:
    saved = sorted(p.name for p in recorded.iterdir())
    assert saved == sorted([discover.capture_name("tracepoints", "sched:*") + ".json",
                            discover.capture_name("format", "sched:sched_process_exec") + ".json"])
    df = discover.tracepoints("sched:*")  # no tracefs now: the saved copy answers
    assert list(df.columns) == ["tracepoint", "category", "event"]
    assert list(df["event"]) == ["sched_process_exec", "sched_process_exit", "sched_switch"]
    fmt = discover.tracepoint_format("sched/sched_process_exec")  # same tracepoint, other spelling
    assert isinstance(fmt, discover.TracepointFormat)
    assert fmt.id == 365
    assert list(fmt.args_fields()["field"]) == ["filename", "pid", "old_pid"]
    text = json.loads((recorded / (discover.capture_name("format", "sched:sched_process_exec") + ".json"))
                      .read_text())["format"]
    assert text.startswith("name: sched_process_exec")  # the kernel's own text, parsed again


def test_replay_without_a_recording_names_the_missing_file_and_how_to_record(recorded: Path) -> None:
    missing = recorded / (discover.capture_name("tracepoints", "syscalls:*") + ".json")
    with pytest.raises(KernelscopeError) as info:
        discover.tracepoints("syscalls:*")
    assert str(missing) in str(info.value)
    assert "KERNELSCOPE_MODE=record" in str(info.value)
    assert "'syscalls:*'" in str(info.value)
    with pytest.raises(KernelscopeError, match=r"format of sched:sched_switch: .*format\.sched_sched_switch"):
        discover.tracepoint_format("sched:sched_switch")


def test_live_mode_saves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = _events(tmp_path / "tracing" / "events")
    monkeypatch.setenv("KERNELSCOPE_CAPTURES", str(tmp_path / "captures"))
    monkeypatch.setenv("KERNELSCOPE_MODE", "live")
    monkeypatch.setattr(discover, "events_dir", lambda: events)
    assert len(discover.tracepoints()) == len(NAMES)
    assert discover.tracepoint_format("sched:sched_switch").event == "sched_switch"
    assert not (tmp_path / "captures").exists()


@given(st.one_of(st.none(), st.text(max_size=200)))
def test_capture_names_stay_inside_the_captures_folder_and_apart(pattern: str | None) -> None:
    name = discover.capture_name("tracepoints", pattern)
    assert re.fullmatch(r"tracepoints\.[A-Za-z0-9_.-]+", name), name
    assert "/" not in name
    assert ".." not in name
    assert len(name) < 100
    if pattern:  # the hash keeps patterns that share their safe characters apart
        assert name != discover.capture_name("tracepoints", pattern + "*")


# --- tracefs this user may not read -------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="becoming uid 65534 needs root")


@needs_root
def test_an_unreadable_tracefs_folder_names_the_cause_and_the_fix() -> None:
    from nobody import NOBODY, run_as_nobody

    # pytest's temporary folders are root-only; this one is searchable by everyone but its
    # tracing/ folder is root-only, as the real tracefs is.
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"ks-discover-{os.getpid()}"
    base.mkdir(mode=0o755)
    try:
        os.chmod(base, 0o755)
        events = _events(base / "tracing" / "events")
        os.chmod(base / "tracing", 0o700)
        for call in (lambda: discover.tracepoints("sched:*", events=events),
                     lambda: discover.tracepoint_format("sched:sched_switch", events=events)):
            out = run_as_nobody(call)
            assert out.error == "TracefsAccessError", out.traceback
            assert "PermissionError" in out.classes
            assert f"tracefs at {base / 'tracing'} is not readable by uid {NOBODY}" in out.message
            assert "run as root" in out.message
            assert "CAP_BPF and CAP_PERFMON alone do not open tracefs" in out.message
        assert discover.tracepoints("sched:*", events=events)["event"].tolist()[0] == "sched_process_exec"
    finally:
        for root, dirs, _ in os.walk(base, topdown=False):
            for d in dirs:
                (Path(root) / d).chmod(0o755)
        shutil.rmtree(base)


@needs_root
@pytest.mark.kernel
def test_the_real_tracefs_refuses_uid_65534_with_a_kernelscope_error(monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    from nobody import NOBODY, run_as_nobody

    from kernelscope import host
    from kernelscope import tracepoints as _compile

    monkeypatch.setenv("KERNELSCOPE_MODE", "live")
    for call in (lambda: discover.tracepoints("sched:*"),
                 lambda: discover.tracepoint_format("sched:sched_switch"),
                 lambda: _compile.check_tracepoint("sched", "sched_switch"),
                 lambda: _compile.check_raw_tracepoint("sched_switch")):
        out = run_as_nobody(call)
        assert out.error == "TracefsAccessError", out.traceback
        assert f"tracefs at {host.TRACEFS} is not readable by uid {NOBODY}" in out.message
    assert issubclass(TracefsAccessError, KernelscopeError)  # what the magic and the CLI catch
