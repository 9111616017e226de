"""Which programs of an object load and attach, and how big its maps are, set between open and
load as a tool's own loader does it (libbpf's `bpf_program__set_autoload`,
`bpf_map__set_max_entries`).

    Probe(src, skip=["sched_switch_tp"], map_sizes={"stackmap": 16384}, on_attach_error="warn")

libbpf-tools ship alternative programs for one event (a `tp_btf` one and a `raw_tp` one) and
let the loader disable one; they leave `max_entries` of stack maps and `start` hashes to the
loader. `SEC("?...")` programs are not loaded unless named. BCC auto-attaches its macro
functions (TRACEPOINT_PROBE, kprobe__...) while the BPF object is built: selection there
means not loading and not attaching some of those; BCC sizes maps in their macros only.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import SettingError, UnknownNameError
from .base import blank_comments_and_strings

ATTACH_ERRORS = ("raise", "warn")
# enum bpf_map_type (include/uapi/linux/bpf.h), for messages
MAP_TYPE_NAMES = {
    1: "HASH", 2: "ARRAY", 3: "PROG_ARRAY", 4: "PERF_EVENT_ARRAY", 5: "PERCPU_HASH", 6: "PERCPU_ARRAY",
    7: "STACK_TRACE", 8: "CGROUP_ARRAY", 9: "LRU_HASH", 10: "LRU_PERCPU_HASH", 11: "LPM_TRIE",
    12: "ARRAY_OF_MAPS", 13: "HASH_OF_MAPS", 22: "QUEUE", 23: "STACK", 24: "SK_STORAGE",
    27: "RINGBUF", 28: "INODE_STORAGE", 29: "TASK_STORAGE", 30: "BLOOM_FILTER", 31: "USER_RINGBUF",
    32: "CGRP_STORAGE",
}
STACK_TRACE = 7
RINGS = (27, 31)
# what kernelscope gives a map its program leaves at max_entries 0 (libbpf-tools' loaders set
# these: MAX_ENTRIES 10240 for hashes, stack_storage_size 1024 for stack maps); the other
# types (perf event arrays: one per CPU, set by libbpf; local storage: must be 0) are left alone
DEFAULT_ENTRIES = {1: 10240, 2: 10240, 5: 10240, 6: 10240, 7: 1024, 9: 10240, 10: 10240, 22: 10240,
                   23: 10240, 30: 10240}
STACK_DEPTH = 127  # the kernel's default perf_event_max_stack: frames per stack map value

_SEC = re.compile(r'\bSEC\s*\(\s*"([^"]+)"\s*\)')
_DECL = re.compile(r"\s*(?:[\w\s*]*?)\b(\w+)\s*\(\s*(\w*)")
_MACRO = re.compile(r"BPF_[A-Z0-9_]+")


@dataclass(frozen=True)
class Selection:
    """What the loader sets before load: `programs` (only these; None: every auto-loaded one),
    `skip` (not these), `map_sizes` ({map: max_entries}), `on_attach_error` ("raise", "warn")."""

    programs: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    map_sizes: Mapping[str, int] = field(default_factory=dict)
    on_attach_error: str = "raise"

    @classmethod
    def of(cls, programs: Iterable[str] | None = None, skip: Iterable[str] = (),
           map_sizes: Mapping[str, int] | None = None, on_attach_error: str = "raise") -> Selection:
        """Checked settings; a SettingError names the first bad one."""
        if isinstance(programs, str) or isinstance(skip, str):
            raise SettingError("programs= and skip= take a list of program names, e.g. skip=['handle_exit']")
        progs = None if programs is None else tuple(programs)
        skipped = tuple(skip or ())
        for name in (*(progs or ()), *skipped):
            if not isinstance(name, str) or not name.isidentifier():
                raise SettingError(f"a program name is a C function name, not {name!r}")
        both = sorted(set(progs or ()) & set(skipped))
        if both:
            raise SettingError(f"{', '.join(both)}: named in both programs= and skip=")
        sizes = dict(map_sizes or {})
        for name, n in sizes.items():
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n < 1 << 32:
                raise SettingError(f"map_sizes[{name!r}] must be a whole number of entries from 1 to "
                                   f"2**32-1, not {n!r}")
        if on_attach_error not in ATTACH_ERRORS:
            raise SettingError(f"on_attach_error must be one of {', '.join(map(repr, ATTACH_ERRORS))}, "
                               f"not {on_attach_error!r}")
        return cls(progs, skipped, sizes, on_attach_error)

    @property
    def warn(self) -> bool:
        return self.on_attach_error == "warn"

    def wanted(self, name: str, autoload: bool) -> bool:
        """Whether program `name` loads; `autoload`: libbpf's default (False for SEC("?..."))."""
        if name in self.skip:
            return False
        return name in self.programs if self.programs is not None else autoload

    def check_programs(self, names: Iterable[str]) -> None:
        """An UnknownNameError for a program named in programs=/skip= that the object lacks."""
        have = list(names)
        for name in (*(self.programs or ()), *self.skip):
            if name not in have:
                raise UnknownNameError(f"no program {name!r} in this object; it has "
                                       f"{', '.join(have) or 'none'} (programs=, skip=: C function names)")


NONE = Selection()


def program_lines(source: str) -> dict[str, tuple[str, int]]:
    """program name -> (its SEC name, the line of that SEC), from the cell's text; a section
    used by two programs gives each its own line. `int BPF_PROG(name, ...)` names `name`."""
    code = blank_comments_and_strings(source)
    out: dict[str, tuple[str, int]] = {}
    for m in _SEC.finditer(source):
        d = _DECL.match(code, m.end())
        if d is None or code[m.end():d.start(1)].count(";"):
            continue
        name = d.group(2) if _MACRO.fullmatch(d.group(1)) and d.group(2) else d.group(1)
        out.setdefault(name, (m.group(1), source.count("\n", 0, m.start()) + 1))
    return out


def choose_programs(obj: Any, select: Selection, notes: list[str]) -> None:
    """Set each program of the open libbpf object to load or not, as `select` says."""
    from . import libbpf

    progs = obj.programs()
    select.check_programs(p.name for p in progs)
    off = []
    for prog in progs:
        default = libbpf.autoload(prog)
        want = select.wanted(prog.name, default)
        if want != default:
            libbpf.set_autoload(prog, want)
        if not want and (default or prog.name in select.skip):
            off.append(prog.name)
    if off:
        notes.append(f"not loaded (skip=): {', '.join(off)}")


def size_maps(obj: Any, select: Selection, notes: list[str], lines: Mapping[str, int | None]) -> None:
    """max_entries from map_sizes=, else a default where the program leaves it 0, said in a
    note; a stack map's value_size (frames) too when left 0."""
    from . import libbpf

    maps = {m.name: m for m in obj.maps()}
    for name in select.map_sizes:
        if name not in maps or name.startswith("__ks_") or "." in name:
            own = [n for n in maps if not n.startswith("__ks_") and "." not in n]
            raise UnknownNameError(f"map_sizes: no map {name!r} in this object; it has "
                                   f"{', '.join(own) or 'none'}")
        if maps[name].type in RINGS:
            raise SettingError(f"map_sizes: {name} is a ring buffer; size it with pages={{{name!r}: N}}")
    for name, m in maps.items():
        want = select.map_sizes.get(name)
        kind = MAP_TYPE_NAMES.get(m.type, f"type {m.type}")
        if want is None and m.max_entries == 0 and m.type in DEFAULT_ENTRIES:
            want = DEFAULT_ENTRIES[m.type]
            at = f"line {lines[name]}: " if lines.get(name) else ""
            notes.append(f"{at}map {name} ({kind}) has max_entries 0, left to its loader: kernelscope made "
                         f"it {want:,}; choose with map_sizes={{{name!r}: N}} (%%bpf --map-size {name}=N)")
        if want is not None:
            m.set_max_entries(int(want))
        if m.type == STACK_TRACE and m.value_size == 0:
            libbpf.set_value_size(m, STACK_DEPTH * 8)
            notes.append(f"map {name} (STACK_TRACE) has no value_size: kernelscope made it {STACK_DEPTH} "
                         "frames (8 bytes each)")


def map_lines(source: str) -> dict[str, int | None]:
    """map name -> the line of its `} name SEC(".maps")` declaration."""
    return {m.group(1): source.count("\n", 0, m.start()) + 1
            for m in re.finditer(r"\}\s*(\w+)\s+SEC\s*\(\s*\"\.maps\"", source)}


# BCC's auto-attached functions: name prefix -> how BCC attaches it (bcc.BPF._trace_autoload)
_BCC_AUTO = (("kprobe__", "kprobe"), ("kretprobe__", "kretprobe"), ("tracepoint__", "tracepoint"),
             ("raw_tracepoint__", "raw_tracepoint"), ("kfunc__", "kfunc"), ("kretfunc__", "kretfunc"),
             ("lsm__", "lsm"))


def bcc_loader(bpf_class: Any, select: Selection, notes: list[str]) -> Any:
    """A subclass of bcc.BPF whose auto-attach (TRACEPOINT_PROBE, RAW_TRACEPOINT_PROBE,
    kprobe__..., done while the object is built) loads and attaches only the selected
    functions and, with on_attach_error="warn", notes a failed attach instead of raising."""
    lib = sys.modules[bpf_class.__module__].lib

    class SelectingBPF(bpf_class):
        def _trace_autoload(self) -> None:
            names = [lib.bpf_function_name(self.module, i).decode()
                     for i in range(lib.bpf_num_functions(self.module))]
            select.check_programs(names)
            off = []
            for name in names:
                kind = next((k for p, k in _BCC_AUTO if name.startswith(p)), None)
                if kind is None:
                    continue
                if not select.wanted(name, True):
                    off.append(name)
                    continue
                try:
                    _bcc_attach(self, kind, name)
                except Exception as e:  # BCC raises bare Exception
                    if not select.warn:
                        raise
                    notes.append(f"{name} was not attached (on_attach_error='warn'): {e}")
            if off:
                notes.append(f"not loaded (skip=): {', '.join(off)}")

    return SelectingBPF


def _bcc_attach(bpf: Any, kind: str, name: str) -> None:
    """Load and attach one auto-attached BCC function, as BCC would by its name."""
    fn = name.encode()
    rest = name.split("__", 1)[1].encode()
    if kind in ("kprobe", "kretprobe"):
        loaded = bpf.load_func(fn, bpf.KPROBE)
        attach = bpf.attach_kprobe if kind == "kprobe" else bpf.attach_kretprobe
        attach(event=bpf.fix_syscall_fnname(rest), fn_name=loaded.name)
    elif kind == "tracepoint":
        loaded = bpf.load_func(fn, bpf.TRACEPOINT)
        bpf.attach_tracepoint(tp=rest.replace(b"__", b":"), fn_name=loaded.name)
    elif kind == "raw_tracepoint":
        loaded = bpf.load_func(fn, bpf.RAW_TRACEPOINT)
        bpf.attach_raw_tracepoint(tp=rest, fn_name=loaded.name)
    else:
        getattr(bpf, f"attach_{kind}")(fn_name=fn)
