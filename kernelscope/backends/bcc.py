"""Compile and attach a BCC program, turning BCC's stderr into specific, line-accurate errors.

BCC reports clang diagnostics and verifier logs on file descriptor 2 (from C++) and then
raises a bare `Exception`; kernelscope captures fd 2 around each BCC call and raises
`CompileError`, `VerifierError`, `AttachError`, `UnsupportedError` or
`BPFPermissionError` with the compiler's or the kernel's own words and the cell's line.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .. import host
from ..errors import (
    AttachError,
    BPFPermissionError,
    CompileError,
    KernelscopeError,
    SchemaError,
    SettingError,
    UnknownNameError,
    UnsupportedError,
    VerifierError,
)
from ..readers.ring import PAGE
from ..schema import parse_structs, struct_dtype
from ..tracepoints import check_attach_points
from . import attach, preprocess
from .base import (
    Diagnostic,
    blank_comments_and_strings,
    capture_fd2,
    format_diag,
    gave_up,
    gave_up_text,
    host_permission_hint,
    last_cell_line,
    packed,
    parse_diagnostics,
    rejection,
    undeclared_calls,
    verifier_reason,
)
from .guard import check_records_fit, deferred_interrupts, slow_load_notice
from .maptypes import MapType, bcc_map_types
from .rewrite import ACCT_MAP, GATE_MAP, Instrumented, instrument, read_counters
from .selection import NONE, Selection, bcc_loader
from .toolchain import clang

__all__ = ["BCCProgram", "Diagnostic", "capture_fd2", "load", "open_program", "parse_diagnostics",
           "prepare", "release_bpf"]

def active_text(source: str, cflags: Sequence[str]) -> str:
    """The cell as BCC will compile it, each line at its own number: `#if` blocks decided by
    clang's preprocessor with the cell's defines and its local headers (those found in the
    cflags' -I folders). BCC's own headers (kernel headers, helpers.h) are left out, so their
    macros are undefined here: approximate, but never worse than the raw text, which it
    falls back to when that pass fails (a `#if` using a kernel macro)."""
    try:
        compiler = clang()
    except KernelscopeError:
        return source
    flags = ["-D__KERNEL__", "-D__BPF_TRACING__", *(f for f in cflags if f.startswith(("-D", "-U"))),
             *(f"-I{d}" for d in preprocess.include_dirs(cflags))]
    pre = preprocess.run(preprocess.cpp_only_local(source, cflags), compiler, flags)
    return source if pre is None else pre.cell_view(len(source.split("\n")))


_KFUNC = re.compile(r"\b(KFUNC_PROBE|KRETFUNC_PROBE|KMOD_RET)\s*\(\s*(\w+)")

STRUCT_DEREF = re.compile(
    r"\b(struct\s+task_struct|bpf_get_current_task\s*\(|->\s*(real_parent|mm|files|nsproxy|cred)\b)"
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
    *,
    select: Selection = NONE,
    notes: list[str] | None = None,
) -> Any:
    """Compile, load and auto-attach; returns the `bcc.BPF` object or raises a specific error.

    Call it with Ctrl-C deferred (guard.deferred_interrupts, as open_program does): BCC
    creates maps while compiling, before the object holds its module handle.
    """
    host.check()
    check_attach_points(active_text(user_source, cflags))
    bcc = host.import_bcc()
    lines = user_source.splitlines()
    contexts = usdt_contexts(bcc, usdt or [])
    relog = ""
    with capture_fd2() as log, slow_load_notice("the program") as took:
        try:
            cls = bcc.BPF if select == NONE else bcc_loader(bcc.BPF, select, [] if notes is None else notes)
            bpf = cls(text=instr.source.encode(), cflags=list(cflags), usdt_contexts=contexts)
            # a USDT context disables its probes (clears their semaphores) when collected
            bpf.kernelscope_usdt = contexts
            return bpf
        except Exception as e:  # BCC raises bare Exception for every failure
            err = e
            relog = _verifier_log(e)
        except BaseException as e:
            _release_half_built(e, bcc.BPF)
            raise
    _release_half_built(err, bcc.BPF)
    text = (log[0] if log else "") + (f"\n{relog}" if relog else "")
    raise _classify(str(err), text, user_source, lines, instr=instr, seconds=took["seconds"]) from None


def _half_built(err: BaseException, cls: Any) -> tuple[Any, Any, Any]:
    """(the BPF object whose __init__ raised, and the function and program type its failed
    load_func call was loading), from the traceback: the only place they are still reachable."""
    obj = fn = prog_type = None
    tb = err.__traceback__
    while tb is not None:
        f = tb.tb_frame
        here: Any = f.f_locals.get("self")
        if obj is None and isinstance(here, cls):
            obj = here
        if f.f_code.co_name == "load_func" and isinstance(here, cls):
            fn, prog_type = f.f_locals.get("func_name"), f.f_locals.get("prog_type")
        tb = tb.tb_next
    return obj, fn, prog_type


def _release_half_built(err: BaseException, cls: Any) -> None:
    """Free the maps (and any attached programs) of a BPF object whose __init__ raised.

    BCC creates maps before loading and attaching programs, and keeps the object alive
    through its own atexit hook, so a verifier or attach failure would otherwise leak
    them until the interpreter exits. The object is only reachable from the traceback.
    """
    obj = _half_built(err, cls)[0]
    if obj is not None:
        release_bpf(obj)


VERIFIER_LOG_BYTES = 4 << 20  # the kernel keeps the end of a longer log (Linux 6.4+), where its verdict is


def _verifier_log(err: BaseException) -> str:
    """The verifier's log for a program BCC failed to load without printing one.

    For E2BIG (the verifier's "program too large", which is also how it gives up on a loop
    it cannot prove finite, or on a call stack too deep) BCC prints only "Program too large
    (N insns), at most 4096 insns", naming the size of the code, not why; loading the same
    instructions once more with a log buffer gives the kernel's own words and line notes.
    """
    if "Failed to load BPF program" not in str(err) or "Argument list too long" not in str(err):
        return ""  # other refusals: BCC printed the verifier's log itself
    obj, fn, prog_type = _half_built(err, host.import_bcc().BPF)
    if obj is None or fn is None or prog_type is None or not getattr(obj, "module", None):
        return ""
    lib = bpf_lib()
    buf = ctypes.create_string_buffer(VERIFIER_LOG_BYTES)
    mod = obj.module
    fd = lib.bcc_func_load(mod, prog_type, fn, lib.bpf_function_start(mod, fn),
                           lib.bpf_function_size(mod, fn), lib.bpf_module_license(mod),
                           lib.bpf_module_kern_version(mod), 1, buf, len(buf), None, -1)
    if fd >= 0:
        os.close(fd)
    return buf.value.decode("utf-8", "replace")


_MAP_FAILED = re.compile(r"could not open bpf map: (\w+), error: (.*)")


def _map_failed(log: str, instr: Instrumented) -> KernelscopeError | None:
    """What the kernel refused when BCC could not create a map (reported as a compile error)."""
    m = _MAP_FAILED.search(log)
    if not m:
        return None
    name, why = m.group(1), m.group(2).strip()
    om = instr.maps.get(name)
    at = f"line {om.line}: " if om is not None and om.line else ""
    if om is not None and om.kind == "ringbuf" and om.pages:
        size = f"a ring buffer of {om.pages:,} pages ({om.pages * PAGE:,} bytes)"
        if "memory" in why:
            return SettingError(f"{at}{name}: the kernel could not allocate {size}: {why}. Use fewer pages.")
        return SettingError(f"{at}{name}: the kernel refused {size}: {why}. A ring buffer's pages must be "
                            "a power of two, and its size at most 2 GiB.")
    return KernelscopeError(f"{at}the kernel refused to create map {name}: {why}")


def _classify(msg: str, log: str, user_source: str, lines: list[str], *, instr: Instrumented | None = None,
              seconds: float = 0.0) -> KernelscopeError:
    diags = parse_diagnostics(log, user_source)
    errors = [d for d in diags if d.kind != "warning"]
    refused = _map_failed(log, instr) if instr is not None else None
    if refused is not None:
        return refused
    if "Failed to compile" in msg or (errors and "Failed to load" not in msg):
        body = "\n".join(format_diag(d, lines) for d in errors) or log.strip()[-2000:]
        first = next((d.line for d in errors if d.line), None)
        return CompileError(f"compile error\n{body}", line=first, log=log)
    missing = re.search(r"(\S+) is not found in vmlinux BTF", log)
    if missing:
        return AttachError(
            f"no kernel function {missing.group(1)} in the running kernel's BTF (renamed, inlined "
            "or not traceable); `grep FUNCTION /proc/kallsyms` shows what exists"
        )
    if "Failed to load" in msg or "bpf: Failed to load program" in log:
        return _rejected(msg, log, diags, user_source, seconds=seconds)
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


def _rejected(msg: str, log: str, diags: list[Diagnostic], user_source: str, *,
              seconds: float) -> KernelscopeError:
    """The kernel refused a program: the permission it lacks, or the verifier's verdict first."""
    start = log.find("bpf: Failed to load program")
    vlog = log[start:] if start >= 0 else log
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
    reason = verifier_reason(vlog)
    # clang only warns about calls to undeclared functions; the load then fails with an
    # obscure verdict (a call into the program itself), so the warning is the cause
    cause, _ = undeclared_calls(diags)
    if cause:
        said = f" (the verifier then refused {name}: {reason})" if reason else ""
        return VerifierError(f"{cause}{said}", log="\n".join([d.message for d in diags] + [reason]))
    if gave_up(reason):
        text, _ = gave_up_text(reason, vlog, user_source, seconds)
        at = "" if last_cell_line(vlog, len(user_source.splitlines())) else _line_prefix(text)
        return rejection(f"{at}{name}: {text}", vlog, user_source)
    return rejection(f"the verifier rejected {name}" + (f": {reason}" if reason else ""), vlog, user_source)


def _line_prefix(text: str) -> str:
    m = re.search(r"the loop at line (\d+)", text)
    return f"line {m.group(1)}: " if m else ""


def prepare(source: str, pages: int | dict[str, int] | None = None,
            globals_: Mapping[str, Any] | None = None, cflags: Sequence[str] = ()) -> Instrumented:
    """The cell with its output calls counted (see rewrite.instrument); `cflags` are BCC's at load."""
    if globals_:
        raise ValueError("globals= sets `const volatile` variables of CO-RE programs; "
                         "for BCC programs use cflags=['-DNAME=VALUE']")
    return instrument(source, pages)


def open_program(prepared: Instrumented, source: str, cflags: tuple[str, ...],
                 usdt: Sequence[tuple[str | int, str, str]] = (),
                 globals_: Mapping[str, Any] | None = None, *, select: Selection = NONE) -> BCCProgram:
    """Compile, load and attach: the `Program` Probe drives.

    Ctrl-C is deferred until the program is built (or has failed and been freed): it then
    frees what was built and propagates, so an interrupt at any point leaves nothing behind.
    """
    prog = None
    try:
        with deferred_interrupts():
            notes: list[str] = []
            bpf = load(prepared, source, cflags, list(usdt), select=select, notes=notes)
            prog = BCCProgram(bpf, prepared, source)
            prog.notes.extend(notes)
            check_records_fit(prog, prepared.maps)
    except BaseException:
        if prog is not None:
            prog.close()
        raise
    return prog


class BCCProgram:
    """A loaded `bcc.BPF` behind the interface Probe uses for either backend (base.Program)."""

    backend = "bcc"
    counts_discards = True  # the rewrite wraps bpf_ringbuf_discard() on a named map
    output_decl = "BPF_RINGBUF_OUTPUT or BPF_PERF_OUTPUT map"

    def __init__(self, bpf: Any, instrumented: Instrumented, source: str) -> None:
        self.bpf = bpf
        self.instrumented = instrumented
        self.source = source
        self.notes: list[str] = attach.bcc_unattached_notes(blank_comments_and_strings(source))
        self.attached = attach.Attachments()  # perf events, XDP and tc links made by hand

    def event_dtype(self, name: str) -> np.dtype:
        return struct_dtype(bcc_event_fields(self.bpf, name), parse_structs(self.source), name)

    def named_dtype(self, ctype: str, where: str) -> np.dtype:
        structs = parse_structs(self.source)
        if ctype not in structs:
            raise SchemaError(f"{where}: no {ctype} defined in the program")
        return struct_dtype(structs[ctype], structs, ctype)

    def map_fd(self, name: str) -> int:
        return int(self.bpf[name.encode()].get_fd())

    def ring_size(self, name: str) -> int:
        table = self.bpf[name.encode()]
        om = self.instrumented.maps[name]
        return int(table.max_entries) if hasattr(table, "max_entries") else (om.pages or 0) * PAGE

    def perf_set_fd(self, name: str) -> Callable[[int, int], None]:
        table = self.bpf[name.encode()]

        def set_fd(cpu: int, fd: int) -> None:
            table[ctypes.c_int(cpu)] = ctypes.c_int(fd)
        return set_fd

    def set_gate(self, value: int) -> None:
        self.bpf[GATE_MAP.encode()][ctypes.c_int(0)] = ctypes.c_uint32(value)

    def counters(self) -> dict[str, dict[str, int]]:
        return read_counters(self.bpf[ACCT_MAP.encode()], self.instrumented.maps)

    def attach_points(self) -> list[str]:
        bpf = self.bpf
        out = [f"tracepoint:{_text(k)}" for k in bpf.tracepoint_fds]
        out += [f"raw_tracepoint:{_text(k)}" for k in bpf.raw_tracepoint_fds]
        out += [f"kprobe:{_text(k)}" for k in bpf.kprobe_fds]
        out += [f"uprobe:{_text(k)}" for k in bpf.uprobe_fds]
        return out + self.attached.points()

    # attach kinds BCC's macros do not attach (the shared parts: kernelscope.backends.attach)
    def attach_uprobe(self, name: str, sym: str = "", fn_name: str = "", *, retprobe: bool | None = False,
                      **kw: Any) -> None:
        call = self.bpf.attach_uretprobe if retprobe else self.bpf.attach_uprobe
        with capture_fd2() as log:
            try:
                call(name=name.encode(), sym=sym.encode(), fn_name=fn_name.encode(), **kw)
                return
            except Exception as e:
                err = e
        kind = "uretprobe" if retprobe else "uprobe"
        raise AttachError(f"{kind} {name}:{sym} -> {fn_name}: {err} {''.join(log).strip()}") from None

    def _fd(self, fn_name: str, prog_type: int) -> int:
        """The fd of function `fn_name` loaded as `prog_type` (BCC loads it on first use)."""
        with capture_fd2() as log:
            try:
                return int(self.bpf.load_func(fn_name.encode(), prog_type).fd)
            except Exception as e:
                err = e
        text = "".join(log).strip()
        raise _classify(str(err), text, self.source, self.source.splitlines()) from None

    def attach_perf_event(self, fn_name: str, event: str | tuple[int, int] = "cpu-clock",
                          freq: int | None = None, period: int | None = None,
                          cpus: Sequence[int] | None = None) -> None:
        prog_fd = self._fd(fn_name, host.import_bcc().BPF.PERF_EVENT)
        fds = attach.open_sampling(event, freq, period, cpus)
        labels = [attach.perf_label(event, freq, period, cpu) for cpu, _ in fds]
        attach.attach_perf_fds(prog_fd, fds, labels, self.attached)
        attach.drop_note(self.notes, fn_name)

    def attach_usdt(self, target: str | int, probe: str, fn_name: str) -> None:
        raise AttachError(f"USDT probe {probe} -> {fn_name}: BCC attaches USDT probes while it compiles; "
                          f"pass usdt=[({target!r}, {probe!r}, {fn_name!r})] to Probe(...)")

    def attach_xdp(self, fn_name: str, ifname: str, mode: str = "skb") -> None:
        attach.xdp(self._fd(fn_name, host.import_bcc().BPF.XDP), fn_name, ifname, mode, self.attached)
        attach.drop_note(self.notes, fn_name)

    def attach_tc(self, fn_name: str, ifname: str, direction: str = "ingress") -> None:
        fd = self._fd(fn_name, host.import_bcc().BPF.SCHED_CLS)
        attach.tc(fd, fn_name, ifname, direction, self.attached)
        attach.drop_note(self.notes, fn_name)

    def attach_prog_array(self, map_name: str, programs: Mapping[int, str] | Sequence[str]) -> None:
        for index, name in attach.prog_array_items(programs):
            self.map_update(map_name, index, self.program_fd(name))

    def program_fd(self, fn_name: str) -> int:
        """The fd of `fn_name`, loaded as the type of the programs BCC attached (what a tail call
        from them needs)."""
        loaded = [attach.prog_type(f.fd) for f in self.bpf.funcs.values()]
        return self._fd(fn_name, loaded[0] if loaded else host.import_bcc().BPF.TRACEPOINT)

    def iter_read(self, fn_name: str) -> bytes:
        raise AttachError(f"{fn_name}: iterators need the CO-RE backend (SEC(\"iter/task\") and "
                          "vmlinux.h); BCC cannot load them")

    def attach_tracepoint(self, tp: str, fn_name: str) -> None:
        with capture_fd2() as log:
            try:
                self.bpf.attach_tracepoint(tp=tp.encode(), fn_name=fn_name.encode())
                return
            except Exception as e:
                err = e
        raise AttachError(f"tracepoint {tp} -> {fn_name}: {err} {''.join(log).strip()}") from None

    def _table(self, name: str) -> Any:
        try:
            return self.bpf[name.encode()]
        except KeyError:
            raise UnknownNameError(f"no map {name!r} in this program") from None

    def map_update(self, name: str, key: Any, value: Any) -> None:
        """`map[key] = value` (ints, bytes or numpy), as CoreProgram.map_update."""
        t = self._table(name)
        t[t.Key.from_buffer_copy(packed(key, ctypes.sizeof(t.Key), f"{name} key"))] = \
            t.Leaf.from_buffer_copy(packed(value, ctypes.sizeof(t.Leaf), f"{name} value"))

    def map_lookup(self, name: str, key: Any) -> bytes:
        t = self._table(name)
        return bytes(t[t.Key.from_buffer_copy(packed(key, ctypes.sizeof(t.Key), f"{name} key"))])

    def map_update_batch(self, name: str, keys: Any, values: Any) -> int:
        for k, v in zip(np.ascontiguousarray(keys), np.ascontiguousarray(values), strict=True):
            self.map_update(name, k.tobytes(), v.tobytes())
        return len(keys)

    def map_types(self) -> list[MapType]:
        return bcc_map_types(self.bpf, bpf_lib())

    def close(self) -> None:
        self.attached.close()
        release_bpf(self.bpf)



def _text(k: Any) -> str:
    return k.decode() if isinstance(k, bytes) else str(k)



def release_bpf(bpf: Any) -> None:
    """Detach and free a (possibly half-built) bcc.BPF, and drop BCC's atexit hooks for it.

    BCC registers `cleanup` when it builds the object and `donothing` when a load fails;
    either hook would keep the object (and its maps) alive until the interpreter exits.
    """
    with contextlib.suppress(Exception):
        bpf.cleanup()
    atexit.unregister(bpf.cleanup)
    atexit.unregister(bpf.donothing)
    # USDT contexts disable their probes when freed: do it now, not whenever the cyclic
    # garbage collector reaches the BPF object. Freeing the context of a process that has
    # exited makes libbcc 0.26 close an fd number it no longer owns, so it must not happen
    # at a random moment (inside another load's fd-2 capture, say).
    bpf.kernelscope_usdt = []



def bcc_event_fields(bpf: Any, name: str) -> list[tuple[str, str]]:
    """The (field, C type) list BCC recorded for what the program submits to map `name`."""
    lib = bpf_lib()
    n = lib.bpf_perf_event_fields(bpf.module, name.encode())
    fields = []
    for i in range(n):
        raw = lib.bpf_perf_event_field(bpf.module, name.encode(), i).decode()
        fname, _, ctype = raw.partition("#")
        fields.append((fname, ctype))
    if not fields:
        raise SchemaError(
            f"{name}: BCC found no struct submitted to this map (no {name}.ringbuf_output/"
            "ringbuf_reserve/perf_submit call with a struct). Submit a struct, or pass "
            "dtypes={...} to Probe."
        )
    return fields



def bpf_lib() -> Any:
    from ..host import import_bcc

    import_bcc()
    from bcc.libbcc import lib  # type: ignore[import-not-found,unused-ignore]

    return lib
