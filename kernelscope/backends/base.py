"""What every backend keeps and shares: the `Program` contract `Probe` calls, and the helpers
both the BCC and the CO-RE backend use (source scanning, compiler diagnostics, fd-2 capture).

`Probe` knows only `Program` and `Backend`; a backend module (backends.bcc, backends.core)
is a `Backend`: `prepare()` reads the cell, `open_program()` compiles, loads and attaches it.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import VerifierError

CELL_FILE = "cell"  # the file name `#line 1 "cell"` gives the user's source in diagnostics
# a cell line N counted as N * TP_ENTRY_SCALE + k: the line of a BCC TRACEPOINT_PROBE, which BCC
# moves down k lines by inserting the tracepoint's args struct in front of it
TP_ENTRY_SCALE = 1_000_000

COMMENT_OR_STRING = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)
_DIAG = re.compile(
    r"^(?P<file>[^:\n]+):(?P<line>\d+):(?P<col>\d+): (?P<kind>error|warning|fatal error): (?P<msg>.*)$",
    re.M,
)


class OutputMapLike(Protocol):
    name: str
    kind: str
    index: int
    pages: int | None
    line: int | None


class Prepared(Protocol):
    """A cell read by a backend before loading: its output maps, user rings and event types."""

    @property
    def maps(self) -> Mapping[str, Any]: ...  # name -> rewrite.OutputMap
    @property
    def user_rings(self) -> Mapping[str, Any]: ...
    @property
    def event_types(self) -> Mapping[str, str]: ...


class Program(Protocol):
    """A loaded, attached program, as `Probe` uses it whatever the backend."""

    backend: str  # "bcc" or "libbpf"
    notes: list[str]  # what the user should know about the load (shown as warnings)
    counts_discards: bool  # False: the program cannot count bpf_ringbuf_discard(); readers do
    output_decl: str  # how this backend declares an output map, for "declares no ..." warnings
    bpf: Any  # the bcc.BPF object (BCC), None otherwise

    def event_dtype(self, name: str) -> np.dtype: ...
    def named_dtype(self, ctype: str, where: str) -> np.dtype: ...
    def map_fd(self, name: str) -> int: ...
    def ring_size(self, name: str) -> int: ...
    def perf_set_fd(self, name: str) -> Callable[[int, int], None]: ...
    def set_gate(self, value: int) -> None: ...
    def counters(self) -> dict[str, dict[str, int]]: ...
    def attach_points(self) -> list[str]: ...
    def attach_uprobe(self, name: str, sym: str = "", fn_name: str = "", **kw: Any) -> None: ...
    def attach_tracepoint(self, tp: str, fn_name: str) -> None: ...
    # attach kinds of backends.attach: perf events, USDT, XDP, tc, tail calls, iterators
    def attach_perf_event(self, fn_name: str, event: str | tuple[int, int] = "cpu-clock",
                          freq: int | None = None, period: int | None = None,
                          cpus: Sequence[int] | None = None) -> None: ...
    def attach_usdt(self, target: str | int, probe: str, fn_name: str) -> None: ...
    def attach_xdp(self, fn_name: str, ifname: str, mode: str = "skb") -> None: ...
    def attach_tc(self, fn_name: str, ifname: str, direction: str = "ingress") -> None: ...
    def attach_prog_array(self, map_name: str, programs: Mapping[int, str] | Sequence[str]) -> None: ...
    def iter_read(self, fn_name: str) -> bytes: ...
    def program_fd(self, fn_name: str) -> int: ...
    def map_update(self, name: str, key: Any, value: Any) -> None: ...
    def map_lookup(self, name: str, key: Any) -> bytes: ...
    def map_update_batch(self, name: str, keys: Any, values: Any) -> int: ...
    def map_types(self) -> list[Any]: ...  # every map with its types (backends.maptypes.MapType)
    def close(self) -> None: ...


class Backend(Protocol):
    """A backend module: backends.bcc or backends.core."""

    def prepare(self, source: str, pages: int | dict[str, int] | None = None,
                globals_: Mapping[str, Any] | None = None, cflags: Sequence[str] = ()) -> Any: ...
    def open_program(self, prepared: Any, source: str, cflags: tuple[str, ...],
                     usdt: Sequence[tuple[str | int, str, str]],
                     globals_: Mapping[str, Any], *, select: Any = ...) -> Program: ...


# --- source scanning -------------------------------------------------------------------


def blank_comments_and_strings(src: str) -> str:
    """Same length and line structure, but comments and literals blanked out."""
    return COMMENT_OR_STRING.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), src)


def _const(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.BinOp):
        a, b = _const(node.left), _const(node.right)
        if isinstance(node.op, ast.LShift):
            return a << b
        if isinstance(node.op, ast.Mult):
            return a * b
    raise ValueError("not a constant")


def int_or_none(text: str) -> int | None:
    """The value of a page-count expression such as `64` or `1 << 4`; None for macros."""
    try:
        return _const(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError):
        return None


def packed(value: Any, size: int, what: str, pad: bool = False) -> bytes:
    """`value` as exactly `size` bytes: ints little-endian; strings and bytes as given, or
    NUL-padded with `pad` (a char[N] global)."""
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
        if pad and len(data) < size:
            data += b"\0" * (size - len(data))
    elif isinstance(value, (int, np.integer)):
        data = int(value).to_bytes(size, "little", signed=int(value) < 0)
    else:
        data = np.asarray(value).tobytes()
    if len(data) != size:
        raise ValueError(f"{what}: {len(data)} bytes given, the map's is {size}")
    return data


# --- compiler diagnostics ----------------------------------------------------------------


_saved_fd2: list[int] = []  # the real fd 2 while capture_fd2() redirects it (innermost last)


@contextlib.contextmanager
def capture_fd2() -> Iterator[list[str]]:
    """Collect what C++ code writes to fd 2 during the block (BCC's clang and verifier logs).

    libbcc and clang write to the descriptor, bypassing sys.stderr; Python's buffered stderr
    is flushed on both sides so its own text lands where it was written.
    """
    from .guard import deferred_interrupts  # guard imports this module

    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        sys.stderr.flush()
        with deferred_interrupts():  # a Ctrl-C between dup and the try would lose `saved`
            saved = os.dup(2)
            os.dup2(tmp.fileno(), 2)
            _saved_fd2.append(saved)
        try:
            yield out
        finally:
            sys.stderr.flush()
            with deferred_interrupts():
                _saved_fd2.remove(saved)
                os.dup2(saved, 2)
                os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode("utf-8", "replace"))


@dataclass
class Diagnostic:
    line: int | None  # 1-based line in the user's source
    col: int
    kind: str
    message: str
    excerpt: str  # the source line clang quoted


def _user_line(reported: int, excerpt: str, source_lines: list[str]) -> int | None:
    """Map a clang line back to the user's source.

    `#line 1 "cell"` makes clang count from the user's first line, but BCC inserts
    tracepoint struct definitions before TRACEPOINT_PROBE, shifting later lines; clang
    quotes the offending line, so the quote (nearest match to the reported line) wins.
    """
    text = excerpt.strip()
    if reported >= TP_ENTRY_SCALE:
        reported //= TP_ENTRY_SCALE
    if text:
        hits = [i + 1 for i, s in enumerate(source_lines) if s.strip() == text]
        if hits:
            return min(hits, key=lambda n: abs(n - reported))
    return reported if 1 <= reported <= len(source_lines) else None


def parse_diagnostics(log: str, user_source: str) -> list[Diagnostic]:
    lines = user_source.splitlines()
    diags = []
    log_lines = log.splitlines()
    for i, raw in enumerate(log_lines):
        m = _DIAG.match(raw)
        if not m:
            continue
        excerpt = log_lines[i + 1] if i + 1 < len(log_lines) else ""
        in_cell = m["file"] in (CELL_FILE, "/virtual/main.c")
        line = _user_line(int(m["line"]), excerpt, lines) if in_cell else None
        diags.append(Diagnostic(line, int(m["col"]), m["kind"], m["msg"], excerpt))
    return diags


def format_diag(d: Diagnostic, source_lines: list[str], headers: str = "in BCC's headers") -> str:
    where = f"line {d.line}" if d.line else headers
    text = f"{where}: {d.kind}: {d.message}"
    if d.line and d.line <= len(source_lines):
        text += f"\n    {d.line} | {source_lines[d.line - 1].rstrip()}"
    return text


def host_permission_hint() -> str:
    from .. import host
    from ..errors import BPFPermissionError

    try:
        host.require_privileges()
    except BPFPermissionError as e:
        return str(e)
    return "the kernel refused the operation (EPERM)"


# --- verifier logs -------------------------------------------------------------------------

# lines of a verifier log that are not its verdict: instructions, line notes, register
# states, call frames, statistics
_NOT_REASON = re.compile(
    r"^(\d+: |;|from \d+ to \d+|processed \d+ insns|verification time|stack depth|func#|frame\d|"
    r"caller:|callee:|last_idx|regs=|parent |mark_precise|R\d+[_=]|bpf: |libbpf: |-- |"
    r"arg#\d+ reference type)")
# an instruction the verifier followed: `6: (79) r1 = *(u64 *)(r0 +0)`, with the registers it
# changed after `; ` at log level 1 (`   ; R1_w=scalar()`), or after a jump the state at its
# target (`3: (25) if r0 > 0x1 goto pc-3 1: R0=scalar(umin=2) R10=fp0`)
_INSN = re.compile(r"^(?P<idx>\d+): \((?P<op>[0-9a-f]{2})\) (?P<insn>.*?)"
                   r"(?:\s+; (?P<state>.*)|\s(?P<target>\d+: (?:R\d|frame\d).*))?$")
_GAVE_UP = re.compile(r"too large|too complex|infinite loop|back-edge|loop is not bounded", re.I)
_LOOP = re.compile(r"\b(?:while|for)\s*\(|\bdo\s*\{")
_HELPER_DEFS = "/usr/include/bpf/bpf_helper_defs.h"  # libbpf-dev: one line per BPF helper


def _verdict(lines: Sequence[str]) -> tuple[int, int | None, list[str]]:
    """(the index of the `processed N insns` line, of the last instruction before it, and
    what the verifier said between them, line by line)."""
    end = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("processed ")), len(lines))
    last = next((i for i in range(end - 1, -1, -1) if _INSN.match(lines[i])), None)
    start = 0 if last is None else last + 1
    return end, last, [s.strip() for s in lines[start:end] if s.strip() and not _NOT_REASON.match(s.strip())]


def verifier_reason(log: str) -> str:
    """The verifier's verdict: what it said after the last instruction it followed, before its
    `processed N insns` statistics, lines joined by "; " (`invalid access to map value, ...;
    R0 min value is outside of the allowed memory range`); in a log without instructions, the
    last line that is neither a line note, a register state nor a statistic."""
    _, last, said = _verdict(log.splitlines())
    if not said:
        return ""
    return "; ".join(said) if last is not None else said[-1]


def processed_insns(log: str) -> int | None:
    m = re.search(r"processed (\d+) insns", log)
    return int(m.group(1)) if m else None


def last_cell_line(log: str, nlines: int) -> int | None:
    """The last `; @ cell:N` line note of a verifier log that is a line of the cell."""
    found = [int(n) for n in re.findall(r"@ cell:(\d+)", log) if 1 <= int(n) <= nlines]
    return found[-1] if found else None


def gave_up(reason: str) -> bool:
    """Whether the verifier stopped because the program was too long or too complex for it to
    follow to the end (1,000,000 instructions), rather than because of a fault it found."""
    return bool(_GAVE_UP.search(reason))


def gave_up_text(reason: str, log: str, source: str, seconds: float) -> tuple[str, int | None]:
    """Why the verifier gave up, in words a user can act on, and the cell line to point at:
    the loop it was following (its last line note) or, when the log has none, the cell's loops."""
    lines = source.splitlines()
    n = processed_insns(log)
    followed = f" after following {n:,} instructions" if n else ""
    took = f"; the load took {seconds:.1f} s" if seconds >= 0.1 else ""
    line = last_cell_line(log, len(lines))
    loops = [i + 1 for i, s in enumerate(blank_comments_and_strings(source).splitlines()) if _LOOP.search(s)]
    if line is None and loops:
        line = loops[-1] if len(loops) == 1 else None
        where = (f" (the loop at line {loops[0]})" if len(loops) == 1 else
                 f" (loops at lines {', '.join(map(str, loops))})")
    else:
        where = f" (at line {line})" if line else ""
    return (f"the verifier gave up{followed} (its limit is 1,000,000{took}): {reason}. This is what a loop "
            f"does whose end the verifier cannot prove{where}: bound it by a constant "
            "(`for (int i = 0; i < 64 && cond; i++)`) or use bpf_loop()", line)


def helper_names() -> list[str]:
    try:
        with open(_HELPER_DEFS) as f:
            return re.findall(r"\(\*(bpf_\w+)\)", f.read())
    except OSError:
        return []


def undeclared_calls(diags: Sequence[Diagnostic]) -> tuple[str, int | None]:
    """clang's "implicit declaration of function 'f'" warnings, as the cause of a failed load:
    an undeclared function is not a BPF helper, so the program calls nothing the kernel knows
    (BCC's verifier then sees a call into itself). Empty when there are none."""
    import difflib

    found = [d for d in diags if d.kind == "warning" and "implicit declaration" in d.message and d.line]
    if not found:
        return "", None
    helpers = helper_names()
    parts = []
    for d in found:
        m = re.search(r"function '(\w+)'", d.message)
        name = m.group(1) if m else "a function"
        close = difflib.get_close_matches(name, helpers, n=1)
        hint = f"; did you mean {close[0]}()?" if close else ""
        parts.append(f"line {d.line}: {name}() is neither a BPF helper nor a function of the program "
                     f"(clang: {d.message}){hint}")
    return "\n".join(parts), found[0].line


# --- verifier log excerpts ---------------------------------------------------------------

# a line note (BTF line info, printed when the source line changes): `; TEXT @ FILE:LINE`,
# FILE reduced to its base name, TEXT empty when the compiler had no text for the line
_NOTE = re.compile(r"^; (?P<text>.*?) ?@ (?P<file>\S+):(?P<line>\d+)$")
# where a path the verifier follows starts, with the whole register state
_PATH = re.compile(r"^(?:from \d+ to \d+[^:]*:|\d+: (?:R\d|frame\d))")
_REG = re.compile(r"(?<![\w-])(R\d+)(?:_[rwD]+)?=")
_PRELUDE_FILES = ("main.c", "<kernelscope>")  # kernelscope's code around the cell (BCC, CO-RE)


@dataclass
class VerifierExcerpt:
    """What a verifier rejection shows: the log lines that explain it, by cell line."""

    lines: list[str]  # the excerpt, ready to print
    line: int | None  # the cell line of the instruction the verifier refused
    verdict: list[str]  # the verifier's own words after that instruction


def _registers(state: str) -> dict[str, str]:
    """`R0_w=map_value(off=0,ks=4) R10=fp0` -> {"R0": "map_value(off=0,ks=4)", "R10": "fp0"};
    a value runs to the first space outside brackets (`var_off=(0x0; 0xff)` has one inside)."""
    out: dict[str, str] = {}
    pos = 0
    while (m := _REG.search(state, pos)) is not None:
        depth, j = 0, m.end()
        while j < len(state) and (depth or not state[j].isspace()):
            depth += (state[j] in "([") - (state[j] in ")]")
            j += 1
        out.setdefault(m.group(1), state[m.end():j])
        pos = j
    return out


def _used(insn: str, verdict: Sequence[str]) -> list[str]:
    """The registers a refused instruction read (the verdict's first): the source of an
    assignment, and the address of a store; never r10, the frame pointer."""
    dst, eq, src = insn.partition(" = ")
    read = (src + (dst if dst.lstrip().startswith("*(") else "")) if eq else insn
    regs = re.findall(r"\bR(\d+)\b", " ".join(verdict)) + re.findall(r"\br(\d+)\b", read)
    return [f"R{n}" for n in dict.fromkeys(regs) if n != "10"]


def _state_at(lines: Sequence[str], at: int, regs: Sequence[str]) -> dict[str, str]:
    """The last value the log gives each of `regs` before line `at`, on the path it is on."""
    found: dict[str, str] = {}
    for raw in reversed(lines[:at]):
        m = _INSN.match(raw)
        state = (m["state"] or m["target"] or "") if m else raw if _PATH.match(raw) else ""
        for reg, value in _registers(state).items():
            if reg in regs:
                found.setdefault(reg, value)
        if _PATH.match(raw) or len(found) == len(regs):
            break
    return {r: found[r] for r in regs if r in found}


def note_cell_line(text: str, file: str, line: int, source_lines: Sequence[str]) -> int | None:
    """The cell line a line note names, or None when it names none: another file, line 0
    (code the compiler made up), a number past the cell, or a line whose text differs
    from the cell's (then the cell line with that text nearest to it, when there is one).
    A TRACEPOINT_PROBE line, counted from N * TP_ENTRY_SCALE, is line N."""
    if line >= TP_ENTRY_SCALE:
        line //= TP_ENTRY_SCALE
    if file != CELL_FILE or not 1 <= line <= len(source_lines):
        return None
    said = " ".join(text.split())
    if not said or " ".join(source_lines[line - 1].split()) == said:
        return line
    hits = [i + 1 for i, s in enumerate(source_lines) if " ".join(s.split()) == said]
    return min(hits, key=lambda n: abs(n - line)) if hits else None


def _note_text(m: re.Match[str], source_lines: Sequence[str]) -> tuple[int | None, str]:
    n = note_cell_line(m["text"], m["file"], int(m["line"]), source_lines)
    if n is not None:
        return n, f"    {n} | {source_lines[n - 1].rstrip()}"
    if m["file"] in _PRELUDE_FILES:
        return None, "    (kernelscope's accounting code)"
    if m["file"] == CELL_FILE:
        return None, "    (code the compiler added, no line of the cell)"
    return None, f"    {m['file']}:{m['line']}" + (f": {m['text'].strip()}" if m["text"].strip() else "")


def _steps_back(lines: Sequence[str], failed: int, steps: int, source_lines: Sequence[str]) -> list[str]:
    """The last `steps` instructions up to line `failed` on its path, with the notes among them
    and the one in force at the first."""
    shown: list[str] = []  # newest first
    insns = 0
    for raw in reversed(lines[:failed + 1]):
        if (m := _INSN.match(raw)) is not None:
            if insns < steps:
                shown.append(f"        {m['idx']}: ({m['op']}) {m['insn']}")
            insns += 1
        elif (note := _NOTE.match(raw)) is not None:
            shown.append(_note_text(note, source_lines)[1])
            if insns >= steps:
                break
        elif _PATH.match(raw):
            break
    return shown[::-1]


def _last_in_cell(lines: Sequence[str], end: int, source_lines: Sequence[str]) -> int | None:
    """The last instruction before line `end` under a line note that names a cell line."""
    for j in range(end - 1, -1, -1):
        note = _NOTE.match(lines[j])
        if note is None or _note_text(note, source_lines)[0] is None:
            continue
        run = range(j + 1, next((k for k in range(j + 1, end) if _NOTE.match(lines[k])), end))
        last = next((k for k in reversed(run) if _INSN.match(lines[k])), None)
        if last is not None:
            return last
    return None


def verifier_excerpt(log: str, source: str, budget: int = 10, steps: int = 4,
                     gave_up: bool = False) -> VerifierExcerpt:
    """The lines of a verifier log that explain its verdict, in at most `budget` lines: the
    last instructions it followed on the failing path (at most `steps`), each under the cell
    line it came from (a line note that names no cell line says what it is instead), the
    state of the registers the refused instruction used, then the verifier's own words
    (and BCC's hint). With `gave_up` (the verifier stopped counting, it refused nothing) the
    instructions end at the last one of a cell line: the loop it was following."""
    lines = log.splitlines()
    end, failed, verdict = _verdict(lines)
    if failed is None:
        return VerifierExcerpt([], None, [])
    hints = [s.strip() for s in lines[end + 1:] if s.startswith("HINT: ")]  # BCC's, after the log
    said = [f"  {s}" for s in verdict + hints] or ["  (the verifier said no more)"]
    source_lines = source.splitlines()
    state: list[str] = []
    if gave_up:
        failed = _last_in_cell(lines, end, source_lines) or failed
    else:
        m = _INSN.match(lines[failed])
        assert m is not None
        regs = _state_at(lines, failed, _used(m["insn"], verdict))
        state = ["        refused, with " + ", ".join(f"{r}={v}" for r, v in regs.items())] if regs else []
    line = None
    for raw in reversed(lines[:failed]):  # the note in force at that instruction
        if (note := _NOTE.match(raw)) is not None:
            line = note_cell_line(note["text"], note["file"], int(note["line"]), source_lines)
            if line is not None or int(note["line"]) != 0 or note["file"] != CELL_FILE:
                break  # a line 0 note is code the compiler made up: the line before it counts
    for n in range(steps, 0, -1):
        body = _steps_back(lines, failed, n, source_lines)
        if len(body) + len(state) + len(said) <= budget:
            break
    out = [*body, *state, *said]
    return VerifierExcerpt(out[-budget:] if budget > 0 else [], line, verdict)


def rejection(headline: str, vlog: str, source: str, log: str | None = None,
              line: int | None = None) -> VerifierError:
    """The VerifierError for a program the verifier refused: `headline`, then the excerpt of
    its log `vlog` that explains it, the whole message at most VerifierError.MAX_LINES lines;
    `log` (default `vlog`) is kept whole on the error; `line` is the cell line to name when
    the log's line notes name none (a log without its instructions)."""
    budget = VerifierError.MAX_LINES - len(headline.splitlines()) - 1  # the closing hint
    found = verifier_excerpt(vlog, source, budget=budget, gave_up=gave_up(verifier_reason(vlog)))
    return VerifierError(headline, log=vlog if log is None else log, excerpt=found.lines,
                         line=line if found.line is None else found.line)
