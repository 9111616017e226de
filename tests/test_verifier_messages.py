"""A verifier rejection says what the verifier refused, where, and no more (issue 19, item 6).

Each program is one a user writes by mistake, compiled by the real compiler and refused by the
real verifier, through both backends. The message is the headline, then only the log lines
that explain it: the last instructions followed, each under the cell line it came from, the
state of the registers the refused one used, the verifier's words; never a raw `; @ cell:N`
note; at most VerifierError.MAX_LINES lines. `err.log` keeps the whole log, and the magic
shows the same excerpt under its `line N:` headline.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output
from shell import Shell, ipython_shell

from kernelscope import Probe
from kernelscope.backends.base import TP_ENTRY_SCALE, note_cell_line, verifier_excerpt
from kernelscope.errors import VerifierError

QUOTE = re.compile(r"^ {4}(\d+) \| (.*)$", re.M)  # a cell line in the excerpt
INSN = re.compile(r"^ {8}(\d+: \([0-9a-f]{2}\) .*)$", re.M)  # an instruction in the excerpt

CORE_HEAD = '#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n'

# (name, source, the refused cell line, a piece of the refused instruction, the verifier's words)
BCC_CASES = [
    ("unchecked lookup",
     "BPF_HASH(ks_vm_h, u32, u64);\n"
     "TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {\n"
     "    u32 k = 0;\n"
     "    u64 *v = ks_vm_h.lookup(&k);\n"
     "    return *v;\n"
     "}\n",
     5, "(r0 +0)", "invalid mem access 'map_value_or_null'"),
    ("read past a map value",
     "BPF_ARRAY(ks_vm_a, u64, 4);\n"
     "TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {\n"
     "    u32 k = 0;\n"
     "    u64 *v = ks_vm_a.lookup(&k);\n"
     "    if (!v)\n"
     "        return 0;\n"
     "    return v[2];\n"
     "}\n",
     7, "(r0 +16)", "invalid access to map value, value_size=8 off=16 size=8"),
    ("scalar dereference",
     "TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {\n"
     "    int *p = (int *)(long)bpf_get_current_pid_tgid();\n"
     "    return *p;\n"
     "}\n",
     3, "(r0 +0)", "invalid mem access 'scalar'"),
]

CORE_CASES = [
    ("unchecked lookup",
     CORE_HEAD + "struct {\n"
     "    __uint(type, BPF_MAP_TYPE_HASH);\n"
     "    __uint(max_entries, 4);\n"
     "    __type(key, u32);\n"
     "    __type(value, u64);\n"
     "} ks_vm_h SEC(\".maps\");\n"
     'SEC("tp/syscalls/sys_enter_getppid")\n'
     "int h(void *ctx) {\n"
     "    u32 k = 0;\n"
     "    u64 *v = bpf_map_lookup_elem(&ks_vm_h, &k);\n"
     "    return *v;\n"
     "}\n",
     13, "(r0 +0)", "invalid mem access 'map_value_or_null'"),
    ("read past a map value",
     CORE_HEAD + "struct {\n"
     "    __uint(type, BPF_MAP_TYPE_ARRAY);\n"
     "    __uint(max_entries, 4);\n"
     "    __type(key, u32);\n"
     "    __type(value, u64);\n"
     "} ks_vm_a SEC(\".maps\");\n"
     'SEC("tp/syscalls/sys_enter_getppid")\n'
     "int h(void *ctx) {\n"
     "    u32 k = 0;\n"
     "    u64 *v = bpf_map_lookup_elem(&ks_vm_a, &k);\n"
     "    if (!v)\n"
     "        return 0;\n"
     "    return v[2];\n"
     "}\n",
     15, "(r0 +16)", "invalid access to map value, value_size=8 off=16 size=8"),
    ("scalar dereference",
     CORE_HEAD + 'SEC("tp/syscalls/sys_enter_getppid")\n'
     "int h(void *ctx) {\n"
     "    int *p = (int *)(long)bpf_get_current_pid_tgid();\n"
     "    return *p;\n"
     "}\n",
     6, "(r0 +0)", "invalid mem access 'scalar'"),
]

LOOP_BCC = ("struct e { u64 ts; };\n"
            "BPF_RINGBUF_OUTPUT(ks_vm_ev, 8);\n"
            "TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {\n"
            "    struct e v = {};\n"
            "    while (bpf_get_current_pid_tgid() > 1) { v.ts++; }\n"
            "    ks_vm_ev.ringbuf_output(&v, sizeof(v), 0);\n"
            "    return 0;\n"
            "}\n")
LOOP_CORE = (CORE_HEAD + 'SEC("tp/syscalls/sys_enter_getppid")\n'
             "int h(void *ctx) {\n"
             "    long n = 0;\n"
             "    while (bpf_get_current_pid_tgid() > 1) { n++; }\n"
             "    return n;\n"
             "}\n")


def rejected(source: str, backend: str) -> VerifierError:
    with pytest.raises(VerifierError) as info:
        Probe(source, backend=backend).load()
    return info.value


def check_excerpt(err: VerifierError, source: str, line: int, insn: str, words: str) -> str:
    """What every rejection's message must be; returns it."""
    text = str(err)
    shown = text.splitlines()
    assert shown[0] == err.headline.splitlines()[0]
    assert len(shown) <= VerifierError.MAX_LINES, text
    assert "cell:" not in text, text  # no raw line note, least of all `cell:0`
    assert words in text, text
    cell = source.splitlines()
    quoted = [(int(n), t) for n, t in QUOTE.findall(text)]
    assert quoted, text
    for n, quote in quoted:  # each cell-line reference is a line of the cell, quoted as it is
        assert 1 <= n <= len(cell), (n, text)
        assert cell[n - 1].rstrip() == quote, (n, quote, text)
    assert quoted[-1][0] == line, text  # the refused instruction is under its own line
    assert err.line == line
    insns = INSN.findall(text)
    assert insns, text
    assert insn in insns[-1], text  # the refused instruction is the last one shown
    for shown_insn in insns:  # the log holds every instruction shown, and more
        assert shown_insn in err.log
    assert re.search(r"^processed \d+ insns", err.log, re.M)
    assert len(err.log.splitlines()) > len(shown) - 1
    assert err.format(verbose=True).endswith(err.log.strip())
    return text


@pytest.mark.kernel
@pytest.mark.parametrize(("what", "source", "line", "insn", "words"), BCC_CASES,
                         ids=[c[0] for c in BCC_CASES])
def test_bcc_rejection_shows_the_refused_instruction_under_its_cell_line(
        what: str, source: str, line: int, insn: str, words: str) -> None:
    err = rejected(source, "bcc")
    assert err.headline.startswith("the verifier rejected tracepoint__syscalls__sys_enter_getppid: ")
    check_excerpt(err, source, line, insn, words)


@pytest.mark.kernel
@pytest.mark.parametrize(("what", "source", "line", "insn", "words"), CORE_CASES,
                         ids=[c[0] for c in CORE_CASES])
def test_core_rejection_shows_the_refused_instruction_under_its_cell_line(
        what: str, source: str, line: int, insn: str, words: str) -> None:
    err = rejected(source, "libbpf")
    assert err.headline.startswith("the verifier rejected h: ")
    check_excerpt(err, source, line, insn, words)


@pytest.mark.kernel
def test_unchecked_lookup_shows_the_register_the_verifier_refused() -> None:
    for source, backend in ((BCC_CASES[0][1], "bcc"), (CORE_CASES[0][1], "libbpf")):
        text = str(rejected(source, backend))
        assert re.search(r"refused, with R0=map_value_or_null\(", text), text


@pytest.mark.kernel
@pytest.mark.parametrize("backend", ["bcc", "libbpf"])
def test_verifier_giving_up_on_a_loop_shows_the_loop_line(backend: str) -> None:
    source, line = (LOOP_BCC, 5) if backend == "bcc" else (LOOP_CORE, 6)
    err = rejected(source, backend)
    text = str(err)
    assert "gave up" in err.headline
    assert len(text.splitlines()) <= VerifierError.MAX_LINES, text
    assert "cell:" not in text, text
    assert "BPF program is too large" in text
    assert "refused, with" not in text  # it stopped counting: no instruction was refused
    assert err.line == line
    assert re.search(r"^processed 1000001 insns", err.log, re.M)
    quoted = [(int(n), t) for n, t in QUOTE.findall(text)]
    if backend == "libbpf":  # one verifier pass, without an instruction trace: the loop's line
        assert err.headline.startswith(f"line {line}: h: ")
        assert not quoted, text
        return
    assert {n for n, _ in quoted} == {line}, text  # the loop's instructions, under its line
    insns = INSN.findall(text)
    assert len(insns) >= 2, text
    assert all(i in err.log for i in insns), text


# --- the magic ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shell() -> Iterator[Shell]:
    yield from ipython_shell()


@pytest.mark.kernel
@pytest.mark.parametrize(("backend", "case"), [("bcc", BCC_CASES[1]), ("libbpf", CORE_CASES[1])],
                         ids=["bcc", "libbpf"])
def test_the_magic_shows_the_excerpt_under_its_line(shell: Shell, backend: str, case: tuple) -> None:
    _, body, line, insn, words = case
    cell = f"%%bpf vm --{backend}\n{body}"
    with capture_output() as cap, pytest.raises(UsageError) as info:
        shell.run_cell(cell)
    msg = str(info.value)
    source = "\n" + body  # the magic counts the %%bpf line as line 1
    n = line + 1
    assert msg.startswith(f"%%bpf vm: line {n}: the verifier rejected "), msg
    assert msg.splitlines()[1] == f"    {n} | {source.splitlines()[n - 1].rstrip()}"
    assert len(msg.splitlines()) <= VerifierError.MAX_LINES + 1, msg  # + the quoted line
    assert "cell:" not in msg
    assert words in msg
    quoted = [int(q) for q, _ in QUOTE.findall(msg)]
    assert quoted[-1] == n
    assert insn in INSN.findall(msg)[-1]
    assert "Traceback" not in cap.stderr


# --- the excerpt of a log, line by line ---------------------------------------------------


def test_line_notes_that_name_no_cell_line_are_never_shown_as_one() -> None:
    source = "int a;\nint b = 1;\nreturn b;\n"
    log = ("func#0 @0\n"
           "0: R1=ctx() R10=fp0\n"
           ";  @ cell:2\n"
           "0: (b7) r1 = 1                        ; R1_w=1\n"
           ";  @ cell:0\n"
           "1: (b7) r2 = 2                        ; R2_w=2\n"
           ";  @ main.c:5\n"
           "2: (b7) r3 = 3                        ; R3_w=3\n"
           "; return b; @ cell:9\n"
           "3: (bf) r0 = r1                       ; R0_w=1\n"
           "; return b; @ cell:1\n"
           "4: (61) r0 = *(u32 *)(r1 +0)\n"
           "R1 invalid mem access 'scalar'\n"
           "processed 5 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0\n")
    found = verifier_excerpt(log, source, budget=12, steps=5)
    text = "\n".join(found.lines)
    assert "cell:" not in text
    assert "    2 | int b = 1;" in found.lines
    assert "    (code the compiler added, no line of the cell)" in found.lines  # line 0, line 9
    assert "    (kernelscope's accounting code)" in found.lines
    assert "    3 | return b;" in found.lines  # the note's text, not its number, found the line
    assert found.line == 3
    assert found.lines[-2:] == ["        refused, with R1=1", "  R1 invalid mem access 'scalar'"]
    assert note_cell_line("", "cell", 0, source.splitlines()) is None
    assert note_cell_line("int q;", "cell", 1, source.splitlines()) is None  # text in no cell line
    # BCC moves a TRACEPOINT_PROBE line N down by its args struct's lines: counted from N * 10**6
    assert note_cell_line("", "cell", 2 * TP_ENTRY_SCALE + 5, source.splitlines()) == 2
    assert note_cell_line("", "cell", 9 * TP_ENTRY_SCALE + 5, source.splitlines()) is None


def test_the_excerpt_keeps_to_its_budget_and_the_verdict() -> None:
    body = "".join(f";  @ cell:{n}\n{n}: (b7) r1 = {n}                        ; R1_w={n}\n"
                   for n in range(1, 9))
    log = body + "9: (61) r0 = *(u32 *)(r1 +0)\nR1 invalid mem access 'scalar'\nprocessed 10 insns\n"
    source = "\n".join(f"line{n};" for n in range(1, 10)) + "\n"
    for budget in (3, 5, 10):
        found = verifier_excerpt(log, source, budget=budget)
        assert len(found.lines) <= budget
        assert found.lines[-1] == "  R1 invalid mem access 'scalar'"
        assert "        9: (61) r0 = *(u32 *)(r1 +0)" in found.lines
    err = VerifierError("the verifier rejected x: R1 invalid mem access 'scalar'", log=log,
                        excerpt=verifier_excerpt(log, source).lines)
    whole = f"(the verifier's whole log, {len(log.splitlines())} lines, is this error's .log)"
    assert str(err).splitlines()[-1] == whole
    assert err.format(hint="").splitlines()[-1] == "  R1 invalid mem access 'scalar'"
    assert err.format(verbose=True) == f"{err.headline}\n{log.strip()}"
