"""The CO-RE backend: libbpf-style programs (`SEC("tp/...")`, `vmlinux.h`) compiled by clang.

    Probe(source, backend="libbpf")   # or automatically when the source uses SEC("...")

A cell in the style of libbpf-tools is compiled with `clang -target bpf` against a
`vmlinux.h` generated from the running kernel's BTF (cached per kernel), then opened,
sized, loaded and attached through libbpf (kernelscope.backends.libbpf). libbpf relocates every
`BPF_CORE_READ` against the running kernel, so struct fields read right even where the
installed headers belong to another kernel (BCC's weak point on this machine).

Accounting is the same as for BCC programs: every `bpf_ringbuf_reserve`,
`bpf_ringbuf_output` and `bpf_perf_event_output` on a declared map is wrapped, on its
own line, in a statement expression that checks the gate and bumps per-CPU counters;
`bpf_user_ringbuf_drain` adds the number of samples it drained. Event structs come from
the object's own BTF: the text only says which struct goes to which map (the variable a
reservation is assigned to, or the data a `*_output` call passes), and a global pointer
of that type anchors it in the BTF.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import host, tracepoints
from ..errors import (
    AttachError,
    CompileError,
    KernelscopeError,
    SchemaError,
    SettingError,
    UnknownNameError,
)
from ..folders import new_workdir
from . import attach, btf, coresource, elf, libbpf, preprocess
from .base import format_diag, gave_up, packed, parse_diagnostics, verifier_reason
from .coresource import ANCHOR, CoreSource, is_core
from .guard import check_records_fit, deferred_interrupts, remove_tree, run_tool, slow_load_notice
from .maptypes import MapType, core_map_types
from .refusals import before_verifier, classify_load, map_shapes
from .rewrite import ACCT_MAP, GATE_MAP, SLOTS
from .selection import NONE, Selection, choose_programs, map_lines, program_lines, size_maps
from .toolchain import anchored_type, clang, compile_flags

PAGE = os.sysconf("SC_PAGE_SIZE")
__all__ = ["ANCHOR", "CoreProgram", "CoreSource", "compile_object", "is_core", "load", "open_program",
           "prepare"]
CORE_INSTEAD = ('a tracepoint (SEC("tp/CATEGORY/EVENT") or SEC("tp_btf/EVENT")) or a raw tracepoint '
                '(SEC("raw_tp/EVENT"))')
KPROBE_SECTIONS = ("kprobe", "kretprobe", "ksyscall", "kretsyscall", "kprobe.multi", "kretprobe.multi")


# --- source analysis and rewriting (backends.coresource) -----------------------------------


def prepare(source: str, pages: int | dict[str, int] | None = None,
            globals_: Mapping[str, Any] | None = None, cflags: Sequence[str] = ()) -> CoreSource:
    """The program read on its preprocessed text (with `cflags`' include path and defines, as
    the compile will see it), its output calls wrapped, the prelude and type anchors added."""
    def cpp(text: str, prefix: str) -> preprocess.Preprocessed | None:
        try:
            flags = compile_flags(tuple(cflags))
            compiler = clang()
        except KernelscopeError:  # no clang or no BTF: the compile says so
            return None
        return preprocess.run(text, compiler, flags, prefix)

    return coresource.prepare(source, pages, cpp, preprocess.include_dirs(cflags))


# --- compile, load, attach -----------------------------------------------------------------


def compile_object(prepared: CoreSource, user_source: str, cflags: tuple[str, ...], out: Path) -> None:
    """clang -target bpf; a CompileError with the cell's line numbers on failure."""
    src = out.with_suffix(".i" if prepared.preprocessed else ".c")  # .i: clang -E output, compiled as is
    src.write_text(prepared.source)
    cmd = [clang(), *compile_flags(cflags), "-Wno-unused-command-line-argument",  # toolchain.py: -mcpu, -I
           "-c", str(src), "-o", str(out)]
    proc = run_tool(cmd, cwd=out.parent)
    if proc.returncode == 0:
        return
    log = proc.stderr
    lines = user_source.splitlines()
    errors = [d for d in parse_diagnostics(log, user_source) if d.kind != "warning"]
    body = "\n".join(format_diag(d, lines, headers="in a header")
                     for d in errors)
    first = next((d.line for d in errors if d.line), None)
    clash = re.findall(r"error: redefinition of '(\w+)'.*\n(?:.*\n)*?.*vmlinux\.h:\d+:\d+: note: previous",
                       log)
    if clash:
        body += (f"\n(vmlinux.h already defines {', '.join(sorted(set(clash)))}: every type of the running "
                 "kernel is in it, so give your own structs names the kernel does not use)")
    if not body:  # a backend failure: "fatal error: error in backend: line N: ..." and a crash dump
        fatal = [ln for ln in log.splitlines() if ln.startswith(("fatal error", "error"))]
        body = "\n".join(fatal[:3]) or log.strip()[:2000]
        m = re.search(r"error in backend: line (\d+):", body)
        first = int(m.group(1)) if m else None
        if first and first <= len(lines):
            body += f"\n    {first} | {lines[first - 1].rstrip()}"
    raise CompileError(f"compile error\n{body}", line=first, log=log)


def check_sections(prepared: CoreSource) -> None:
    """Name missing tracepoints and kernel features before loading, with the cell's line."""
    known: list[str] | None = None
    for sec, line in prepared.sections:
        kind, _, rest = sec.partition("/")
        if kind in ("tp", "tracepoint") and "/" in rest:
            cat, ev = rest.split("/", 1)
            known = tracepoints.check_tracepoint(cat, ev, line, known=known)
        elif kind in ("raw_tp", "raw_tracepoint") and rest:
            known = tracepoints.check_raw_tracepoint(rest, line, known=known)
        elif kind in KPROBE_SECTIONS:
            tracepoints.check_kprobes(line, instead=CORE_INSTEAD)


class CoreProgram(attach.CoreAttach):
    """A loaded and attached CO-RE object, with the interface Probe uses for any backend."""

    backend = "libbpf"
    counts_discards = False  # bpf_ringbuf_discard() names no map: the drain counts what readers skip
    output_decl = "ring buffer or perf event array map (SEC(\".maps\"))"
    bpf = None

    def __init__(self, prepared: CoreSource, obj: libbpf.Object, objfile: Path, notes: list[str],
                 cflags: tuple[str, ...] = ()) -> None:
        self.prepared = prepared
        self.cflags = cflags
        self.obj = obj
        self.objfile = objfile  # in a temporary folder of its own, removed by close()
        self.notes = notes
        self.maps = {m.name: m for m in obj.maps()}
        self.ncpus = libbpf.possible_cpus()
        self._types: btf.Types | None = None
        self.attached = attach.Attachments()  # XDP and tc links made by hand

    def types(self) -> btf.Types:
        if self._types is None:
            self._types = btf.Types.load(self.objfile)
        return self._types

    def event_dtype(self, name: str) -> np.dtype:
        """The dtype of map `name`'s records, from the type anchored in the object's BTF."""
        types = self.types()
        var = types.var(f"{ANCHOR}{name}")
        ptr = types.resolve(var["type_id"]) if var else None
        if ptr is None or not ptr["type_id"]:  # none, or `void *data` passed on: no struct named
            raise SchemaError(
                f"{name}: kernelscope could not tell which struct this map carries (it looks for "
                f"`e = bpf_ringbuf_reserve(&{name}, ...)` with `struct T *e`, or `&e` passed to "
                "bpf_ringbuf_output/bpf_perf_event_output). Pass dtypes={'" + name + "': 'struct T'} "
                "or a numpy dtype to Probe.")
        return types.dtype(types.resolve(ptr["type_id"]), self.prepared.event_types.get(name, name))

    def named_dtype(self, ctype: str, where: str) -> np.dtype:
        """The dtype of C type `ctype` (dtypes={map: "struct event"}): from the object's BTF, or,
        for a type only local variables use (clang's BTF omits those), from the same cell
        compiled again with a global pointer to it."""
        t = self.types().find(ctype)
        if t is not None:
            return self.types().dtype(t, ctype)
        types, t = anchored_type(self.objfile.with_suffix(".c"), ctype, self.cflags, where)
        return types.dtype(t, ctype)

    def map_fd(self, name: str) -> int:
        return self.maps[name].fd

    def ring_size(self, name: str) -> int:
        return self.maps[name].max_entries

    def perf_set_fd(self, name: str) -> Any:
        def set_fd(cpu: int, event_fd: int) -> None:
            self.map_update(name, cpu, event_fd)
        return set_fd

    def set_gate(self, value: int) -> None:
        self.map_update(GATE_MAP, 0, value)

    def _slots(self, nslots: int) -> list[int]:
        """The accounting slots, each summed over the CPUs (a per-CPU array of u64)."""
        return [int(np.frombuffer(self.map_lookup(ACCT_MAP, k), "<u8").sum()) for k in range(nslots)]

    def counters(self) -> dict[str, dict[str, int]]:
        """attempted/failed per output map, drained/errors per user ring, from the per-CPU slots."""
        p = self.prepared
        n = (len(p.maps) + len(p.user_rings)) * SLOTS
        if not self.obj.ptr:
            return {}
        slots = self._slots(n)
        out = {}
        for om in list(p.maps.values()) + list(p.user_rings.values()):
            b = om.index * SLOTS
            if om.kind == "user_ringbuf":
                out[om.name] = {"drained": slots[b], "drain_errors": slots[b + 1]}
            else:
                out[om.name] = {"attempted": slots[b], "failed": slots[b + 1]}
        return out

    def attach_points(self) -> list[str]:
        return [point for point, _ in self.obj.links] + self.attached.points()

    def map_update(self, name: str, key: Any, value: Any) -> None:
        """`map[key] = value` with one bpf(BPF_MAP_UPDATE_ELEM) syscall (ints, bytes or numpy)."""
        m = self._map(name)
        libbpf.map_update(m.fd, packed(key, m.key_size, f"{name} key"),
                          packed(value, m.value_size, f"{name} value"), f"update {name}")

    def map_lookup(self, name: str, key: Any) -> bytes:
        """The value bytes of `map[key]` (one bpf(BPF_MAP_LOOKUP_ELEM) syscall); for a per-CPU
        map, every possible CPU's value, each padded to 8 bytes, one after the other."""
        m = self._map(name)
        size = m.value_size
        if m.type in libbpf.PERCPU_MAP_TYPES:
            size = -(-size // 8) * 8 * self.ncpus
        return libbpf.map_lookup(m.fd, packed(key, m.key_size, f"{name} key"), size, f"lookup {name}")

    def map_update_batch(self, name: str, keys: Any, values: Any) -> int:
        """Many updates in one bpf(BPF_MAP_UPDATE_BATCH) syscall; keys/values: numpy arrays."""
        m = self._map(name)
        k, v = np.ascontiguousarray(keys), np.ascontiguousarray(values)
        if len(k) != len(v) or k.dtype.itemsize != m.key_size or v.dtype.itemsize != m.value_size:
            raise ValueError(f"{name}: need equal-length key/value arrays of {m.key_size}- and "
                             f"{m.value_size}-byte items")
        return libbpf.map_update_batch(m.fd, k.tobytes(), v.tobytes(), len(k), f"batch update {name}")

    def map_types(self) -> list[MapType]:
        return core_map_types(list(self.maps.values()), self.types(), self.objfile)

    def _map(self, name: str) -> libbpf.Map:
        if name not in self.maps:
            raise UnknownNameError(f"no map {name!r}; this program has {', '.join(self.maps)}")
        return self.maps[name]

    def program(self, name: str) -> libbpf.Program:
        progs = {p.name: p for p in self.obj.programs()}
        if name not in progs:
            raise AttachError(f"no program {name!r} in this object; it has {', '.join(progs) or 'none'}")
        return progs[name]

    def attach_tracepoint(self, tp: str, fn_name: str) -> None:
        cat_ev = tp.replace(":", " ").split()
        if len(cat_ev) != 2:
            raise AttachError(f"tracepoint {tp!r}: expected CATEGORY:EVENT")
        try:
            self.obj.attach_tracepoint(self.program(fn_name), *cat_ev)
        except OSError as e:
            raise AttachError(f"tracepoint {tp} -> {fn_name}: {e}") from None

    def close(self) -> None:
        self.attached.close()
        self.obj.close()
        remove_tree(self.objfile.parent)


def set_globals(obj: libbpf.Object, objfile: Path, values: dict[str, Any]) -> None:
    """Write `const volatile` (and other global) variables before load, as a skeleton does."""
    if not values:
        return
    syms = elf.symbols(objfile)
    maps = obj.maps()
    for name, value in values.items():
        sym = syms.get(name)
        if sym is None or sym.section not in (".rodata", ".data", ".bss") or not sym.size:
            known = sorted(s.name for s in syms.values()
                           if s.section in (".rodata", ".data", ".bss") and not s.name.startswith("__ks_"))
            raise UnknownNameError(f"no global variable {name!r} in the program (globals: "
                                   f"{', '.join(known) or 'none'}); declare it `const volatile T {name};`")
        target = next((m for m in maps if m.name.endswith(sym.section)), None)
        if target is None:
            raise KernelscopeError(f"{name}: libbpf made no map for section {sym.section}")
        addr, size = target.initial_value()
        if sym.offset + sym.size > size:
            raise KernelscopeError(f"{name}: outside {sym.section} ({size} bytes)")
        _check_global(objfile, name, value, sym.size)
        data = packed(value, sym.size, f"global {name}", pad=True)
        ctypes.memmove(addr + sym.offset, data, sym.size)


def _check_global(objfile: Path, name: str, value: Any, size: int) -> None:
    """A SettingError for a value the global cannot hold: text for a number, a number out of range."""
    if isinstance(value, str):  # bytes are raw: as many as the global has
        types = btf.Types.load(objfile)
        var = types.var(name)
        if var is None:
            return
        t = types.resolve(var["type_id"])
        if t["kind"] in ("INT", "ENUM", "ENUM64"):
            raise SettingError(f"global {name} is a {size}-byte {t['kind'].lower()} ({t.get('name')}): "
                               f"give it a number, not the text {value!r}")
    elif (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
          and not -(1 << (8 * size - 1)) <= int(value) < 1 << (8 * size)):
        raise SettingError(f"global {name} has {size} bytes: {value} does not fit")


def open_program(prepared: CoreSource, source: str, cflags: tuple[str, ...],
                 usdt: Sequence[tuple[str | int, str, str]] = (),
                 globals_: Mapping[str, Any] | None = None, *, select: Selection = NONE) -> CoreProgram:
    """Compile, load and attach: the `Program` Probe drives; `usdt` triples (binary path or
    pid, "provider:name", program) attach the SEC("usdt") programs that name no target."""
    prog = load(prepared, source, cflags, dict(globals_ or {}), select=select)
    try:
        for target, probe, fn_name in usdt:
            prog.attach_usdt(target, probe, fn_name)
    except BaseException:
        prog.close()
        raise
    return prog


def _checked_sections(prepared: CoreSource, user_source: str, select: Selection) -> CoreSource:
    """`prepared` with only the sections of programs that will load, for check_sections: a
    skipped program's tracepoint need not exist, a named `?` one must; under
    on_attach_error="warn" a kprobe program is tried (and reported by name) rather than refused."""
    lines = program_lines(user_source)
    dropped = {line for name, (sec, line) in lines.items()
               if not select.wanted(name, not sec.startswith("?"))}
    kept = []
    for sec, line in prepared.sections:
        if line in dropped or (select.warn and sec.split("/")[0] in KPROBE_SECTIONS):
            continue
        kept.append((sec.removeprefix("?"), line))
    return replace(prepared, sections=kept)


def load(prepared: CoreSource, user_source: str, cflags: tuple[str, ...] = (),
         globals_: dict[str, Any] | None = None, *, select: Selection = NONE) -> CoreProgram:
    """Compile, open, size, set globals, load and attach; every failure a specific error.

    Ctrl-C interrupts the compile; while kernel objects are made (load, attach) it is
    deferred until the program is built or freed (guard.deferred_interrupts), so an
    interrupt at any point leaves no fd, map, link or folder behind.
    """
    host.check("libbpf")
    check_sections(_checked_sections(prepared, user_source, select))
    libbpf.lib()
    workdir: Path | None = None
    obj: libbpf.Object | None = None
    prog: CoreProgram | None = None
    try:
        with deferred_interrupts():
            workdir = new_workdir()
        objfile = workdir / "cell.o"
        compile_object(prepared, user_source, cflags, objfile)
        with deferred_interrupts():
            notes: list[str] = []
            obj = _open(objfile, prepared, globals_ or {}, select=select, user_source=user_source,
                        notes=notes)
            obj = _load(obj, objfile, prepared, globals_ or {}, user_source, select=select, notes=notes)
            _attach_all(obj, prepared, notes, select=select, user_source=user_source)
            prog = CoreProgram(prepared, obj, objfile, notes, cflags)
            check_records_fit(prog, prepared.maps)
    except BaseException:
        if prog is not None:
            prog.close()
        elif obj is not None:
            obj.close()
        if workdir is not None:
            remove_tree(workdir)
        raise
    return prog


def _open(objfile: Path, prepared: CoreSource, globals_: dict[str, Any], *, select: Selection = NONE,
          user_source: str = "", notes: list[str] | None = None) -> libbpf.Object:
    """The object opened by libbpf, its programs chosen, its maps sized and its globals set:
    ready to load. `notes` gets what kernelscope chose for the program (replacing earlier ones)."""
    with libbpf.captured_log() as log:
        try:
            obj = libbpf.Object(objfile)
        except OSError as e:
            detail = "".join(log).strip()
            raise KernelscopeError(f"libbpf could not open the object: {e}\n{detail}") from None
    try:
        for m in obj.maps():
            om = prepared.maps.get(m.name) or prepared.user_rings.get(m.name)
            if om is not None and om.kind != "perf" and om.pages:
                m.set_max_entries(om.pages * PAGE)
        chosen: list[str] = []
        choose_programs(obj, select, chosen)
        size_maps(obj, select, chosen, map_lines(user_source))
        if notes is not None:
            notes[:] = chosen
        set_globals(obj, objfile, globals_)
    except BaseException:
        obj.close()
        raise
    return obj


LOG_STATS = 4  # log_level BPF_LOG_STATS: the verdict and statistics, no instruction trace
LOG_FULL = 1  # BPF_LOG_LEVEL1: every instruction followed, with the cell's line notes
FULL_LOG_BYTES = 4 << 20  # the kernel keeps the end of a longer log (Linux 6.4+), where its verdict is


def _load(obj: libbpf.Object, objfile: Path, prepared: CoreSource, globals_: dict[str, Any],
          user_source: str, *, select: Selection = NONE, notes: list[str] | None = None) -> libbpf.Object:
    """Load with a short log (one verifier pass); on a failure that is not the verifier giving
    up, load a fresh copy once more with the full log, for the instruction and line it names.

    Returns the loaded object (the fresh copy if the second load succeeded); closes the
    object on failure and raises a specific error.
    """
    logs = obj.set_logs(LOG_STATS, 1 << 16)
    err, text, took = _try_load(obj, prepared)
    if err is None:
        return obj
    short = _failed_log(text, logs)
    shapes = map_shapes(obj)
    nprogs = sum(libbpf.autoload(p) for p in obj.programs())
    obj.close()
    if gave_up(verifier_reason(short)) or err.errno == _errno.EPERM or before_verifier(text):
        raise classify_load(err, text, prepared, user_source, vlog=short, seconds=took, maps=shapes,
                             nprogs=nprogs) from None
    obj = _open(objfile, prepared, globals_, select=select, user_source=user_source, notes=notes)
    logs = obj.set_logs(LOG_FULL, FULL_LOG_BYTES)
    err2, text2, _ = _try_load(obj, prepared)
    if err2 is None:
        return obj
    obj.close()
    raise classify_load(err2, text2, prepared, user_source, vlog=_failed_log(text2, logs),
                         seconds=took, maps=shapes, nprogs=nprogs) from None


def _try_load(obj: libbpf.Object, prepared: CoreSource) -> tuple[OSError | None, str, float]:
    what = ", ".join(p.name for p in obj.programs()) or "the program"
    with libbpf.captured_log() as log, slow_load_notice(what) as took:
        try:
            obj.load()
            err = None
        except OSError as e:
            err = e
    return err, "".join(log), took["seconds"]


def _failed_log(libbpf_log: str, logs: dict[str, Any]) -> str:
    """The verifier log of the program libbpf says failed to load."""
    progs = re.findall(r"prog '(\w+)': BPF program load failed", libbpf_log)
    buf = logs.get(progs[0]) if progs else None
    if buf is None:
        return ""
    return str(buf.value.decode("utf-8", "replace"))


def attach_point(section: str) -> str:
    """`tracepoint:sched:sched_process_exit` for SEC("tp/sched/sched_process_exit"), as BCC names it."""
    kind, _, rest = section.partition("/")
    if kind in ("tp", "tracepoint"):
        return "tracepoint:" + rest.replace("/", ":", 1)
    if kind in ("raw_tp", "raw_tracepoint"):
        return "raw_tracepoint:" + rest
    return f"{kind}:{rest}" if rest else kind


def _attach_all(obj: libbpf.Object, prepared: CoreSource, notes: list[str], *, select: Selection = NONE,
                user_source: str = "") -> None:
    """Attach every loaded program libbpf can attach from its SEC() name alone; note the others.
    A failure raises an AttachError at the program's own line, or with on_attach_error="warn"
    is noted by name while the rest attach."""
    lines = {name: line for name, (_, line) in program_lines(user_source).items()}
    for prog in obj.programs():
        if not libbpf.autoload(prog):
            continue
        point = attach_point(prog.section)
        with libbpf.captured_log() as log:
            try:
                obj.attach(prog, point)
                continue
            except OSError as e:
                err = e
        text = "".join(log).strip()
        if err.errno == _errno.EOPNOTSUPP or (err.errno == _errno.EINVAL and "missing ':function" in text):
            notes.append(attach.unattached_note(prog.name, prog.section))  # which call attaches it
            continue
        line = lines.get(prog.name) or dict(prepared.sections).get(prog.section)
        where = f"line {line}: " if line else ""
        try:
            if prog.section.split("/")[0] in KPROBE_SECTIONS:
                tracepoints.check_kprobes(line, instead=CORE_INSTEAD)
            raise AttachError(f"{where}could not attach {prog.name} (SEC(\"{prog.section}\")): "
                              f"{os.strerror(err.errno or 0)}" + (f"\n{text}" if text else ""))
        except AttachError as e:
            if not select.warn:
                raise
            notes.append(f"{prog.name} was not attached (on_attach_error='warn'): {e}")
