"""The doctor's table: one `Check` per row, the report, and its text and HTML renderings."""

from __future__ import annotations

import html
import platform
import shutil
import textwrap
from dataclasses import dataclass, field
from typing import Any

from .. import host

# Checks that must pass for kernelscope's main path (tracepoint -> ring buffer -> DataFrame).
BASICS = ("privileges", "bcc", "kernel headers", "tracefs", "tracepoint", "ringbuf")



@dataclass
class Check:
    """One line of the doctor's table. `ok` is None when the check could not be decided."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def required(self) -> bool:
        return self.name in BASICS

    @property
    def status(self) -> str:
        if self.ok is None:
            return "?"
        if self.ok:
            return "ok"
        return "FAIL" if self.required else "no"



@dataclass
class DoctorReport:
    """The doctor's findings; renders as a text table, and as HTML in notebooks."""

    checks: list[Check]
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every basic check passed (what `kernelscope doctor`'s exit code says)."""
        return all(c.ok is True for c in self.checks if c.required)

    def __getitem__(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def __str__(self) -> str:
        return render_text(self.checks, self.seconds)

    def _repr_html_(self) -> str:
        return render_html(self.checks, self.seconds)



_COLORS = {"ok": "#1a7f37", "FAIL": "#cf222e", "no": "#9a6700", "?": "#6e7781"}



def render_text(checks: list[Check], seconds: float | None = None) -> str:
    """The doctor's table for a terminal: status, check, detail, and a fix line where useful."""
    width = max(60, min(shutil.get_terminal_size((110, 24)).columns, 140))
    name_w = max(len(c.name) for c in checks) + 2 if checks else 16
    indent = " " * (7 + name_w)
    head = f"kernelscope doctor: kernel {host.kernel_release()} ({platform.machine()})"
    if seconds is not None:
        head += f", {seconds:.1f} s"
    lines = [head, ""]
    for c in checks:
        mark = "*" if c.required else " "
        first = f"{c.status:<5}{mark} {c.name:<{name_w}}"
        wrapped = textwrap.wrap(c.detail, width - len(indent), break_on_hyphens=False) or [""]
        lines.append(first + wrapped[0])
        lines += [indent + w for w in wrapped[1:]]
        if c.fix and c.ok is not True:
            lines += textwrap.wrap(c.fix, width, initial_indent=indent + "fix: ",
                                   subsequent_indent=indent + "     ", break_on_hyphens=False)
    missing = [c.name for c in checks if c.required and c.ok is not True]
    lines.append("")
    if missing:
        lines.append(f"* basics missing: {', '.join(missing)}; kernelscope cannot run probes "
                     "until they are fixed.")
    else:
        lines.append("* basics work: kernelscope can compile, attach tracepoints and drain "
                     "ring buffers here.")
    return "\n".join(lines)



def render_html(checks: list[Check], seconds: float | None = None) -> str:
    """The same table as HTML for notebooks (used by DoctorReport._repr_html_)."""
    e = html.escape
    rows = []
    for c in checks:
        fix = (f"<div style='color:#57606a;font-size:90%'>fix: {e(c.fix)}</div>"
               if c.fix and c.ok is not True else "")
        rows.append(
            f"<tr><td style='color:{_COLORS[c.status]};font-weight:bold'>{e(c.status)}</td>"
            f"<td>{e(c.name)}{' *' if c.required else ''}</td>"
            f"<td style='text-align:left'>{e(c.detail)}{fix}</td></tr>"
        )
    missing = [c.name for c in checks if c.required and c.ok is not True]
    verdict = (f"basics missing: {e(', '.join(missing))}" if missing
               else "basics (*) work: kernelscope can run probes here")
    took = f", {seconds:.1f} s" if seconds is not None else ""
    return (
        f"<div><b>kernelscope doctor</b>: kernel {e(host.kernel_release())}{e(took)}"
        "<table><thead><tr><th>status</th><th>check</th><th style='text-align:left'>detail</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table><p>{verdict}</p></div>"
    )
