"""Tracepoint discovery: pattern matching and tracefs format files, on text the tests write."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernelscope import discover

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
