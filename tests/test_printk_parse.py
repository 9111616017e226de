"""kernelscope.printk's text side, on trace_pipe text built here: line parsing, format strings
read from program sources, the exact-match regex and the instance's kernel glob filter."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelscope import printk
from kernelscope.errors import SettingError

HEADER = "{comm:>16}-{tid:<7} ({tgid:>7}) [{cpu:03d}] ...21 {sec:5d}.{usec:06d}: bpf_trace_printk: "


def line(msg: str, *, comm: str = "python3", tid: int = 42, tgid: int | str = 40, cpu: int = 1,
         sec: int = 12, usec: int = 345678) -> str:
    return HEADER.format(comm=comm, tid=tid, tgid=tgid, cpu=cpu, sec=sec, usec=usec) + msg + "\n"


def test_a_line_becomes_a_row_with_the_message_newline_stripped() -> None:
    got = printk.parse(line("hello 7\n"))  # the output adds a newline after the message's own
    assert got.rows == {"ts_ns": [12_345_678_000], "cpu": [1], "pid": [40], "tid": [42],
                        "comm": ["python3"], "flags": ["...21"], "message": ["hello 7"]}
    assert got.rest == ""


def test_messages_with_newlines_comms_with_dashes_and_unknown_tgids() -> None:
    text = (line("multi\nline 8", comm="my-tool -x", tid=7, tgid="-------")
            + line("<...> says hi", comm="<...>", tid=9, tgid=9, sec=13, usec=1)
            + "CPU:1 [LOST 1234 EVENTS]\n" + line("last\n\n"))
    got = printk.parse(text)
    assert got.rows["message"] == ["multi\nline 8", "<...> says hi", "last\n"]
    assert got.rows["comm"] == ["my-tool -x", "<...>", "python3"]
    assert got.rows["pid"] == [7, 9, 40]  # no tgid recorded: the tid stands in
    assert got.rows["ts_ns"][1] == 13_000_001_000
    assert got.lost_reported == 1234


def test_an_unfinished_line_waits_for_the_next_read() -> None:
    text = line("one\n") + line("two\n")
    cut = len(text) - 10
    first = printk.parse(text[:cut])
    second = printk.parse(text[cut:], first.rest)
    assert first.rows["message"] + second.rows["message"] == ["one", "two"]
    assert printk.parse(text[:20]).rows["message"] == []  # not one whole line yet
    assert printk.parse(text[20:], printk.parse(text[:20]).rest).rows["message"] == ["one", "two"]


def test_formats_are_read_from_both_styles_of_source() -> None:
    src = r'''
    // bpf_printk("commented out %d\n", 1);
    /* bpf_trace_printk("also not %d", 2); */
    int f(void *ctx) {
        bpf_trace_printk("bcc %d says \"hi\"\n", 1);
        bpf_printk("core %s" " and %llu\t%%\x41", "x", 2);
        return 0;
    }'''
    assert printk.uses_printk(src)
    assert printk.formats(src) == ['bcc %d says "hi"\n', "core %s and %llu\t%%A"]
    assert not printk.uses_printk('int f() { /* bpf_printk("x") */ return 0; } // bpf_printk("y")')


def test_a_format_passed_by_name_means_no_format_filter() -> None:
    src = 'char fmt[] = "x %d\\n"; bpf_trace_printk(fmt, sizeof(fmt), 1);'
    assert printk.uses_printk(src)
    assert printk.formats(src) is None


@pytest.mark.parametrize(("fmt", "yes", "no"), [
    ("hello %d\n", ["hello 7", "hello -12"], ["hello 7 more", "hello ", "hi 7", "hello 7\n"]),
    ("a=%llu b=%s %%\n", ["a=1 b=xyz %"], ["a=1 b=xyz", "a=1 c=2 %"]),
    ("ip %pI4 sym %ps", ["ip 10.0.0.1 sym do_sys_open"], ["ip 10.0.0.1"]),
    ("%c%x %#llx %5u", ["z1f 0xdead    42"], ["z1g 0xdead    42", "z1f 0xdead -42"]),
    ("%-8s|%5.2x", ["abc     |   ff"], ["abc"]),
])
def test_a_message_matches_its_own_format_in_full(fmt: str, yes: list[str], no: list[str]) -> None:
    m = printk.matcher([fmt])
    assert all(m.fullmatch(s) for s in yes)
    assert not any(m.fullmatch(s) for s in no)


def test_no_formats_match_nothing() -> None:
    assert printk.matcher([]).fullmatch("") is None


def test_the_kernel_glob_has_a_star_per_conversion_and_no_unquotable_characters() -> None:
    assert printk.kernel_filter(["hello %d\n"]) == 'bpf_string ~ "hello *"'
    assert printk.kernel_filter(['say "%s" [ok]*', "x%d%d\n", "x%d%d\n"]) == \
        'bpf_string ~ "say ?*? ?ok??*" || bpf_string ~ "x*"'
    assert printk.kernel_filter(["two\nlines %d"]) == 'bpf_string ~ "two?lines *"'


@pytest.mark.parametrize("bad", [0, -4, 1.5, "64", True])
def test_a_bad_buffer_size_is_a_setting_error(bad: object) -> None:
    with pytest.raises(SettingError, match="printk_kb is the per-CPU buffer"):
        printk.check_kb(bad)  # type: ignore[arg-type]


def test_a_probe_that_prints_nothing_has_an_empty_frame_with_the_columns() -> None:
    frame = printk.Printk([]).frame()
    assert list(frame.columns) == printk.COLUMNS
    assert len(frame) == 0
    assert frame.attrs["received"] == 0


_comms = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=15)
_messages = st.text(st.characters(min_codepoint=32, max_codepoint=126).filter(lambda c: c != "\n")
                    | st.just("\n"), max_size=40).filter(lambda m: "bpf_trace_printk:" not in m)


@given(st.lists(st.tuples(_comms, st.integers(1, 4_194_304), st.integers(0, 511), _messages), max_size=20),
       st.integers(0, 20), st.integers(0, 200))
@settings(max_examples=200, deadline=None)
def test_any_lines_parse_back_to_what_was_printed_across_two_reads(
        printed: list[tuple[str, int, int, str]], entry: int, into: int) -> None:
    """Lines the way the kernel writes them (the message, then a newline), the first read ending
    anywhere before an entry's message (a read returns whole entries; a cut header waits in
    `rest`): the rows are the messages, one trailing newline each stripped."""
    entries = [line(msg, comm=comm, tid=tid, tgid=tid, cpu=cpu) for comm, tid, cpu, msg in printed]
    text = "".join(entries)
    entry = min(entry, len(entries))
    head = len(entries[entry]) - len(printed[entry][3]) - 1 if entry < len(entries) else 0
    cut = sum(map(len, entries[:entry])) + min(into, head)
    first = printk.parse(text[:cut])
    second = printk.parse(text[cut:], first.rest)
    assert first.rows["message"] + second.rows["message"] == \
        [m[:-1] if m.endswith("\n") else m for *_, m in printed]
    assert first.rows["comm"] + second.rows["comm"] == [c for c, *_ in printed]
    assert first.rows["tid"] + second.rows["tid"] == [t for _, t, *_ in printed]


class _Text:
    """Stands in for an Instance on the text side: each read() hands out the next piece."""

    fd, filtered, path = 0, True, "text"

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def read(self) -> str:
        return self.pieces.pop(0) if self.pieces else ""

    def counts(self) -> dict[str, int]:
        return {"lost": 0, "taken": 0}


@given(st.lists(st.integers(0, 40), max_size=150), st.integers(1, 120), st.sets(st.integers(0, 150)))
@settings(max_examples=100, deadline=None)
def test_stored_lines_are_the_newest_max_lines_however_polls_and_frames_interleave(
        sizes: list[int], max_lines: int, frames_after: set[int]) -> None:
    """Each poll's lines become one chunk, chunks are merged past MERGE_AT and when a frame is
    made, the oldest rows are evicted past max_lines: the frame is always the newest
    max_lines lines in order, and received = stored + evicted."""
    ch = printk.Printk(["n=%d\n"], max_lines=max_lines)
    numbers = iter(range(10**6))
    pieces = ["".join(line(f"n={next(numbers)}\n") for _ in range(k)) for k in sizes]
    ch.instance = _Text(list(pieces))  # type: ignore[assignment]
    printed: list[str] = []
    for i, k in enumerate(sizes):
        ch.poll_once()
        printed += [f"n={len(printed) + j}" for j in range(k)]
        assert len(ch._chunks) <= printk.MERGE_AT + 1
        if i in frames_after:
            df = ch.frame()
            assert df.message.tolist() == printed[-max_lines:]
            assert df.attrs["stored"] + df.attrs["evicted"] == df.attrs["received"] == len(printed)
    ch.instance = None
    df = ch.frame()
    assert df.message.tolist() == printed[-max_lines:]
    assert df.attrs["evicted"] == max(0, len(printed) - max_lines)
    assert df.ts_ns.dtype == "int64"
    assert list(df.index) == list(range(len(df)))
    assert printk.Printk([]).max_lines == printk.DEFAULT_MAX_LINES
