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

CELL_FILE = "cell"  # the file name `#line 1 "cell"` gives the user's source in diagnostics

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
    def map_update(self, name: str, key: Any, value: Any) -> None: ...
    def map_lookup(self, name: str, key: Any) -> bytes: ...
    def map_update_batch(self, name: str, keys: Any, values: Any) -> int: ...
    def close(self) -> None: ...


class Backend(Protocol):
    """A backend module: backends.bcc or backends.core."""

    def prepare(self, source: str, pages: int | dict[str, int] | None = None,
                globals_: Mapping[str, Any] | None = None) -> Any: ...
    def open_program(self, prepared: Any, source: str, cflags: tuple[str, ...],
                     usdt: Sequence[tuple[str | int, str, str]],
                     globals_: Mapping[str, Any]) -> Program: ...


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


@contextlib.contextmanager
def capture_fd2() -> Iterator[list[str]]:
    """Collect what C++ code writes to fd 2 during the block (BCC's clang and verifier logs).

    libbcc and clang write to the descriptor, bypassing sys.stderr; Python's buffered stderr
    is flushed on both sides so its own text lands where it was written.
    """
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield out
        finally:
            sys.stderr.flush()
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
