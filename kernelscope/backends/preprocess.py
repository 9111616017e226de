"""What the compiler sees after `#include` and `#if`: `clang -E`, its lines traced back to their files.

A program's maps, output calls and SEC() names may sit in headers, or in `#if 0` blocks
that are not compiled at all; only the preprocessed text says which. clang -E keeps line
markers (`# 12 "exitsnoop.h" 2`: the next line is line 12 of exitsnoop.h), so every line of
its output knows the file and line it came from, and what is found there can be reported at
the user's line. The program's own text is named `cell` (base.CELL_FILE), as in compiles.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .base import CELL_FILE
from .guard import run_tool, temp_folder

_MARKER = re.compile(r'^#\s*(?:line\s+)?(\d+)\s+"((?:\\.|[^"\\])*)".*$', re.M)
_INCLUDE_LINE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]')
_DIR_FLAG = re.compile(r"^-(I|iquote|isystem)(.*)$")


@dataclass
class Preprocessed:
    """clang -E output cut into runs of lines, each from one file from a given line on."""

    text: str
    files: list[str]  # file names as the markers give them
    runs: list[tuple[int, int, int, int]]  # (start, end offset in text, index into files, first line)
    main: str = ""  # the file clang was given (holding the program's `#line 1 "cell"` text)

    def _run(self, pos: int) -> tuple[int, int, int, int]:
        i = bisect.bisect_right(self.runs, (pos, 1 << 62)) - 1
        return self.runs[max(i, 0)]

    def origin(self, pos: int) -> tuple[str, int]:
        """(file, line) of the character at offset `pos` of the output."""
        start, end, f, first = self._run(pos)
        if not start <= pos <= end:
            return ("", 0)  # a marker line
        return (self.files[f], first + self.text.count("\n", start, pos))

    def cell_line(self, pos: int) -> int | None:
        """The program's own line for offset `pos`, or None when it lies in a header."""
        f, line = self.origin(pos)
        return line if f == CELL_FILE else None

    def where(self, pos: int) -> str:
        """`line 12` in the program, `exitsnoop.h:40` in a header."""
        f, line = self.origin(pos)
        return f"line {line}" if f == CELL_FILE else f"{os.path.basename(f)}:{line}"

    def included(self) -> set[str]:
        """Every file the program pulled in (the program itself and clang's built-ins excluded)."""
        return {f for f in self.files if f not in (CELL_FILE, self.main) and not f.startswith("<")}

    def chunks(self, keep: Callable[[str], bool]) -> list[tuple[int, str]]:
        """(offset, text) of each run of lines from a kept file: cheap to search (vmlinux.h's
        100,000 lines are not copied), offsets still those of the whole text."""
        kept = [keep(f) for f in self.files]
        return [(start, self.text[start:end]) for start, end, f, _ in self.runs if kept[f]]

    def only(self, keep: Callable[[str], bool]) -> str:
        """The output with every line not from a kept file, and every directive line (markers,
        `#pragma`), blanked: same length and offsets, so what is found maps back to the text."""
        kept = [keep(f) for f in self.files]  # decided once per file
        parts: list[str] = []
        at = 0
        for start, end, f, _ in self.runs:
            parts.append(_blank(self.text[at:start]))  # the marker line before the run
            chunk = self.text[start:end]
            parts.append(_DIRECTIVE.sub(lambda m: " " * len(m.group(0)), chunk) if kept[f] else _blank(chunk))
            at = end
        parts.append(_blank(self.text[at:]))
        return "".join(parts)

    def cell_view(self, nlines: int) -> str:
        """The program's own lines as compiled, each at its line number: lines in inactive
        `#if` blocks, directives and headers become empty; macros are expanded."""
        view = [""] * nlines
        for start, end, f, first in self.runs:
            if self.files[f] != CELL_FILE:
                continue
            for n, text in enumerate(self.text[start:end].split("\n"), first):
                if 1 <= n <= nlines and text.strip() and not text.lstrip().startswith("#"):
                    view[n - 1] = f"{view[n - 1]} {text}" if view[n - 1] else text
        return "\n".join(view)


_DIRECTIVE = re.compile(r"^[ \t]*#.*$", re.M)


def _blank(text: str) -> str:
    return "\n".join(" " * len(line) for line in text.split("\n"))


def parse(text: str, main: str = "") -> Preprocessed:
    """Cut clang -E output at its line markers into runs of lines, each from one file."""
    files: list[str] = []
    index: dict[str, int] = {}
    runs: list[tuple[int, int, int, int]] = []
    markers = list(_MARKER.finditer(text))
    for i, m in enumerate(markers):
        name = m.group(2).encode().decode("unicode_escape") if "\\" in m.group(2) else m.group(2)
        if name not in index:
            index[name] = len(files)
            files.append(name)
        nl = text.find("\n", m.end())
        start = len(text) if nl < 0 else nl + 1
        end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
        if start <= end:
            runs.append((start, end, index[name], int(m.group(1))))
    return Preprocessed(text, files, runs, main)


def run(source: str, compiler: str, flags: Sequence[str], prefix: str = "") -> Preprocessed | None:
    """`prefix`, then `source` (as file `cell`), through `compiler -E flags`; None when the
    preprocessor fails (a missing header, a bad #if): the real compile reports that in its words."""
    with temp_folder("kernelscope-cpp-") as d:
        path = Path(d) / "cell.c"
        path.write_text(f'{prefix}#line 1 "{CELL_FILE}"\n{source}')
        try:
            proc = run_tool([compiler, "-E", *flags, str(path)], cwd=d)
        except OSError:
            return None
    return parse(proc.stdout, str(path)) if proc.returncode == 0 else None


def include_dirs(flags: Sequence[str]) -> list[Path]:
    """The folders `-I DIR`, `-IDIR`, `-iquote DIR` and `-isystem DIR` name, resolved."""
    dirs: list[Path] = []
    it = iter(flags)
    for flag in it:
        m = _DIR_FLAG.match(flag)
        if m:
            value = m.group(2) or next(it, "")
            if value:
                dirs.append(Path(value).resolve())
    return dirs


def user_file(dirs: Sequence[Path]) -> Callable[[str], bool]:
    """Whether a file is the program's own: the program itself or a header from one of `dirs`
    (the user's include path), a vmlinux.h excepted (the kernel's types, no program code)."""
    def keep(name: str) -> bool:
        if name == CELL_FILE:
            return True
        p = Path(name)
        if p.name == "vmlinux.h":
            return False
        p = p.resolve()
        return any(p.is_relative_to(d) for d in dirs)
    return keep


def cpp_only_local(source: str, flags: Sequence[str]) -> str:
    """`source` with each `#include` that is not found in the folders of `flags` blanked, for a
    preprocessor pass without the headers another compiler (BCC's) provides."""
    dirs = include_dirs(flags)
    out = []
    for line in source.split("\n"):
        m = _INCLUDE_LINE.match(line)
        if m and not (m.group(1) == '"' and any((d / m.group(2)).is_file() for d in dirs)):
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)
