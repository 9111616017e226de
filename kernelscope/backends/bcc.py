"""Compile and attach a BCC program, turning BCC's stderr into specific, line-accurate errors.

BCC reports clang diagnostics and verifier logs on file descriptor 2 (from C++) and then
raises a bare `Exception`; kernelscope captures fd 2 around each BCC call and raises
`CompileError`, `VerifierError`, `AttachError`, `UnsupportedError` or
`BPFPermissionError` with the compiler's or the kernel's own words and the cell's line.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import host
from .errors import (
    AttachError,
    BPFPermissionError,
    CompileError,
    KernelscopeError,
    TracefsAccessError,
    UnsupportedError,
    VerifierError,
)
from .instrument import CELL_FILE, Instrumented

_DIAG = re.compile(
    r"^(?P<file>[^:\n]+):(?P<line>\d+):(?P<col>\d+): (?P<kind>error|warning|fatal error): (?P<msg>.*)$",
    re.M,
)
_TP = re.compile(r"\bTRACEPOINT_PROBE\s*\(\s*(\w+)\s*,\s*(\w+)\s*\)")
_RAW_TP = re.compile(r"\bRAW_TRACEPOINT_PROBE\s*\(\s*(\w+)\s*\)")
_KPROBE = re.compile(r"\bint\s+(kprobe__|kretprobe__)(\w+)\s*\(")
_KFUNC = re.compile(r"\b(KFUNC_PROBE|KRETFUNC_PROBE|KMOD_RET)\s*\(\s*(\w+)")

STRUCT_DEREF = re.compile(
    r"\b(struct\s+task_struct|bpf_get_current_task\s*\(|->\s*(real_parent|mm|files|nsproxy|cred)\b)"
)


@contextlib.contextmanager
def capture_fd2() -> Iterator[list[str]]:
    """Collect what C++ code writes to fd 2 during the block (BCC's clang and verifier logs)."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield out
        finally:
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


def _format_diag(d: Diagnostic, source_lines: list[str]) -> str:
    where = f"line {d.line}" if d.line else "in BCC's headers"
    text = f"{where}: {d.kind}: {d.message}"
    if d.line and d.line <= len(source_lines):
        text += f"\n    {d.line} | {source_lines[d.line - 1].rstrip()}"
    return text


def tracefs_events() -> Path:
    return host.TRACEFS / "events"


@contextlib.contextmanager
def reading_tracefs(events: Path) -> Iterator[None]:
    """Turn a refused read under tracefs (`events` is its events/ folder) into TracefsAccessError.

    Path.exists() and is_dir() raise PermissionError rather than answer False when a parent
    folder is not searchable, as tracefs's 0700 top folder is for anyone but root.
    """
    try:
        yield
    except PermissionError as e:
        raise TracefsAccessError(events.parent, e) from None


def list_tracepoints(events: Path | None = None) -> list[str]:
    """Every `category:event` the running kernel offers (none when tracefs is not mounted)."""
    events = events or tracefs_events()
    out = []
    with reading_tracefs(events):
        try:
            cats = sorted(events.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        for cat in cats:
            if cat.is_dir():
                out += [f"{cat.name}:{ev.name}" for ev in sorted(cat.iterdir()) if (ev / "format").exists()]
    return out


def config_option(option: str) -> str | None:
    """`y`, `m`, `n` (off) or None (absent) for a CONFIG_ option; "unknown" if the config is hidden."""
    found = host.kernel_config()
    if found is None:
        return "unknown"
    return found[0].get(option)


def _line_of(source: str, pos: int) -> int:
    return source.count("\n", 0, pos) + 1


def check_tracepoint(cat: str, ev: str, line: int | None = None, events: Path | None = None,
                     known: list[str] | None = None) -> list[str] | None:
    """AttachError naming close matches when `cat:ev` is not a tracepoint of this kernel.

    Returns the list of known tracepoints when it had to read it, for the next call.
    """
    events = events or tracefs_events()
    with reading_tracefs(events):
        if (events / cat / ev / "format").exists():
            return known
    known = known if known is not None else list_tracepoints(events)
    close = difflib.get_close_matches(f"{cat}:{ev}", known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; %bpf_tracepoints PATTERN lists them"
    where = f"line {line}: " if line else ""
    raise AttachError(f"{where}no tracepoint {cat}:{ev} on this kernel{hint}")


def check_attach_points(source: str, events: Path | None = None) -> None:
    """Name an unknown tracepoint (with close matches) or a missing kernel feature up front."""
    events = events or tracefs_events()
    known: list[str] | None = None
    for m in _TP.finditer(source):
        cat, ev = m.groups()
        known = check_tracepoint(cat, ev, _line_of(source, m.start()), events, known)
    for m in _RAW_TP.finditer(source):
        known = check_raw_tracepoint(m.group(1), _line_of(source, m.start()), events, known)
    kp = _KPROBE.search(source)
    if kp:
        check_kprobes(_line_of(source, kp.start()))


def check_raw_tracepoint(name: str, line: int | None = None, events: Path | None = None,
                         known: list[str] | None = None) -> list[str]:
    known = known if known is not None else list_tracepoints(events or tracefs_events())
    if any(k.split(":", 1)[1] == name for k in known):
        return known
    close = difflib.get_close_matches(name, [k.split(":", 1)[1] for k in known], n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    where = f"line {line}: " if line else ""
    raise AttachError(f"{where}no raw tracepoint {name} on this kernel{hint}")


def check_kprobes(line: int | None = None) -> None:
    if config_option("CONFIG_KPROBES") in (None, "n"):
        where = f"line {line}: " if line else ""
        raise UnsupportedError(
            f"{where}kprobes are not available: this kernel was built "
            "without CONFIG_KPROBES. Use a tracepoint (TRACEPOINT_PROBE) or raw tracepoint instead.",
            feature="CONFIG_KPROBES",
        )


def usdt_contexts(bcc: Any, usdt: list[tuple[str | int, str, str]]) -> list[Any]:
    """BCC USDT contexts for (binary path or pid, probe name, program function) triples.

    USDT probes are attached by BCC while it compiles (the probe arguments become
    generated C), so they must be known before load, unlike uprobes.
    """
    contexts: dict[str | int, Any] = {}
    for target, probe, fn_name in usdt:
        ctx = contexts.get(target)
        try:
            if ctx is None:
                ctx = bcc.USDT(pid=target) if isinstance(target, int) else bcc.USDT(path=str(target))
                contexts[target] = ctx
            ctx.enable_probe(probe=probe, fn_name=fn_name)
        except Exception as e:  # bcc.USDTException is a bare Exception subclass
            raise AttachError(f"USDT probe {probe} in {target}: {e}") from None
    return list(contexts.values())


def load(
    instr: Instrumented,
    user_source: str,
    cflags: tuple[str, ...] = (),
    usdt: list[tuple[str | int, str, str]] | None = None,
) -> Any:
    """Compile, load and auto-attach; returns the `bcc.BPF` object or raises a specific error."""
    host.prepare()
    check_attach_points(user_source)
    bcc = host.import_bcc()
    lines = user_source.splitlines()
    contexts = usdt_contexts(bcc, usdt or [])
    with capture_fd2() as log:
        try:
            bpf = bcc.BPF(text=instr.source.encode(), cflags=list(cflags), usdt_contexts=contexts)
            # a USDT context disables its probes (clears their semaphores) when collected
            bpf.kernelscope_usdt = contexts
            return bpf
        except Exception as e:  # BCC raises bare Exception for every failure
            err = e
        except BaseException as e:  # Ctrl-C during the compile: free what BCC made so far
            _release_half_built(e, bcc.BPF)
            raise
    _release_half_built(err, bcc.BPF)
    raise _classify(str(err), log[0] if log else "", user_source, lines) from None


def _release_half_built(err: BaseException, cls: Any) -> None:
    """Free the maps (and any attached programs) of a BPF object whose __init__ raised.

    BCC creates maps before loading and attaching programs, and keeps the object alive
    through its own atexit hook, so a verifier or attach failure would otherwise leak
    them until the interpreter exits. The object is only reachable from the traceback.
    """
    tb = err.__traceback__
    while tb is not None:
        obj: Any = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, cls):
            with contextlib.suppress(Exception):
                obj.cleanup()
            atexit.unregister(obj.cleanup)
            return
        tb = tb.tb_next


def _classify(msg: str, log: str, user_source: str, lines: list[str]) -> KernelscopeError:
    diags = parse_diagnostics(log, user_source)
    errors = [d for d in diags if d.kind != "warning"]
    if "Failed to compile" in msg or (errors and "Failed to load" not in msg):
        body = "\n".join(_format_diag(d, lines) for d in errors) or log.strip()[-2000:]
        first = next((d.line for d in errors if d.line), None)
        return CompileError(f"compile error\n{body}", line=first, log=log)
    missing = re.search(r"(\S+) is not found in vmlinux BTF", log)
    if missing:
        return AttachError(
            f"no kernel function {missing.group(1)} in the running kernel's BTF (renamed, inlined "
            "or not traceable); `grep FUNCTION /proc/kallsyms` shows what exists"
        )
    if "Failed to load" in msg or "bpf: Failed to load program" in log:
        vlog = log.split("bpf: Failed to load program", 1)[-1]
        tail = "\n".join(vlog.strip().splitlines()[-12:])
        prog = re.search(r"program b?'([^']+)'", msg)
        name = prog.group(1) if prog else "the program"
        if "Operation not permitted" in log or "Need super-user" in msg:
            if os.geteuid() == 0:
                found = host.lockdown_mode()
                lock = found[0] if found else None
                return UnsupportedError(
                    f"the kernel refused to load {name} (EPERM) although we are root"
                    + (f": kernel lockdown is '{lock}', the likely reason for refusing this program "
                       "type (fentry/KFUNC_PROBE tracing programs)" if lock and lock != "none" else "")
                    + ". Use a tracepoint or raw tracepoint instead.",
                    feature=f"lockdown={lock}" if lock else "BPF program type",
                )
            return BPFPermissionError(str(host_permission_hint()))
        # clang only warns about calls to undeclared functions; the load then fails with an
        # obscure message, so the warning is the useful part.
        hints = [_format_diag(d, lines) for d in diags if d.kind == "warning" and d.line
                 and "implicit declaration" in d.message]
        hint = ("\n" + "\n".join(hints)) if hints else ""
        return VerifierError(f"the verifier rejected {name}:\n{tail}{hint}", log=vlog)
    if "Need super-user" in msg:
        return BPFPermissionError(str(host_permission_hint()))
    if "not traceable" in msg or "kprobe_events" in log:
        return UnsupportedError(
            f"{msg}. This kernel has no kprobes (CONFIG_KPROBES is not set); use a tracepoint.",
            feature="CONFIG_KPROBES",
        )
    if "Failed to attach" in msg:
        detail = log.strip().splitlines()[-1] if log.strip() else ""
        return AttachError(f"{msg}" + (f" ({detail})" if detail else ""))
    return KernelscopeError(f"{msg}\n{log.strip()[-2000:]}")


def host_permission_hint() -> str:
    try:
        host.require_privileges()
    except BPFPermissionError as e:
        return str(e)
    return "the kernel refused the operation (EPERM)"
