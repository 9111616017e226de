"""What the kernel's refusal of a CO-RE load means, by the layer that failed: a section name
libbpf cannot type, a map the kernel could not create, a CO-RE relocation, a permission, the
verifier giving up on a loop, or the verifier's verdict. Each names its program or map and
the cell line of its declaration.
"""

from __future__ import annotations

import difflib
import errno as _errno
import os
import re
from typing import Any

from .. import host
from ..errors import (
    BPFPermissionError,
    KernelscopeError,
    MapCreateError,
    RelocationError,
    SectionError,
    SettingError,
    UnsupportedError,
)
from .base import gave_up, gave_up_text, host_permission_hint, last_cell_line, rejection, verifier_reason
from .guard import PAGE
from .selection import MAP_TYPE_NAMES, map_lines, program_lines

# BTF-attached BPF tracing programs, which a locked-down kernel refuses even to root
TRACING_SECTIONS = ("fentry", "fexit", "fmod_ret", "lsm", "tp_btf", "iter", "freplace")


# libbpf's words for a program whose SEC() name it cannot type (1.1; newer versions)
_NO_TYPE = re.compile(r"prog '(\w+)': missing BPF prog type, check ELF section name '([^']*)'|"
                      r"sec '([^']*)': failed to find program type")
# the section prefixes libbpf knows (libbpf.c section_defs), for close matches
SECTION_KINDS = ("tp", "tracepoint", "raw_tp", "raw_tracepoint", "tp_btf", "raw_tp.w", "kprobe",
                 "kretprobe", "ksyscall", "kretsyscall", "kprobe.multi", "kretprobe.multi", "uprobe",
                 "uretprobe", "uprobe.s", "uretprobe.s", "usdt", "fentry", "fexit", "fmod_ret", "lsm",
                 "iter", "perf_event", "xdp", "tc", "classifier", "action", "socket", "sk_skb", "sk_msg",
                 "cgroup_skb/ingress", "cgroup_skb/egress", "syscall", "struct_ops", "freplace")

MapShape = tuple[int, int, int, int]  # (type, max_entries, key_size, value_size)


def map_shapes(obj: Any) -> dict[str, MapShape]:
    """What each map of an opened object was to be created as, kept for an error after close."""
    return {m.name: (m.type, m.max_entries, m.key_size, m.value_size) for m in obj.maps()}


def before_verifier(log: str) -> bool:
    """Whether libbpf stopped before any program reached the verifier (a map it could not
    create, a section it cannot type): a second load with a fuller log would say no more."""
    return bool(re.search(r"map '\w+': failed to create", log) or _NO_TYPE.search(log))


def _section_refused(log: str, user_source: str) -> SectionError | None:
    m = _NO_TYPE.search(log)
    if not m:
        return None
    progs = program_lines(user_source)
    sec = m.group(2) if m.group(1) else m.group(3)
    name = m.group(1) or next((n for n, (s, _) in progs.items() if s == sec), "")
    line = progs[name][1] if name in progs else next((ln for s, ln in progs.values() if s == sec), None)
    kind = sec.split("/")[0]
    close = difflib.get_close_matches(kind, SECTION_KINDS, n=2)
    hint = f"; did you mean {' or '.join(repr(c + '/') for c in close)}?" if close else ""
    at = f"line {line}: " if line else ""
    who = f" of program {name}" if name else ""
    return SectionError(
        f'{at}libbpf cannot tell the program type from SEC("{sec}"){who}: {kind!r} is not a section '
        f'kind it knows{hint} (e.g. SEC("tp/CATEGORY/EVENT"), SEC("tp_btf/EVENT"), SEC("raw_tp/EVENT"), '
        'SEC("uprobe"))')


def _map_refused(log: str, prepared: Any, user_source: str = "",
                 shapes: dict[str, MapShape] | None = None) -> KernelscopeError | None:
    m = re.search(r"map '(\w+)': failed to create: ([^(\n]*)", log)
    if not m:
        return None
    name, why = m.group(1), m.group(2).strip()
    om = prepared.maps.get(name) or prepared.user_rings.get(name)
    line = om.line if om is not None and om.line else map_lines(user_source).get(name)
    at = f"line {line}: " if line else ""
    if om is not None and om.kind != "perf" and om.pages:
        size = f"a ring buffer of {om.pages:,} pages ({om.pages * PAGE:,} bytes)"
        hint = " Use fewer pages." if "memory" in why else ""
        return SettingError(f"{at}{name}: the kernel could not create {size}: {why}.{hint}")
    shape = (shapes or {}).get(name)
    if shape is None:
        return MapCreateError(f"{at}the kernel refused to create map {name}: {why}")
    kind, entries, key, value = shape
    what = (f"a BPF_MAP_TYPE_{MAP_TYPE_NAMES.get(kind, kind)} of max_entries {entries:,}, "
            f"{key}-byte keys, {value}-byte values")
    hint = (f" (max_entries 0: set it in the map, or map_sizes={{{name!r}: N}} / --map-size {name}=N)"
            if entries == 0 else f" (a smaller map_sizes={{{name!r}: N}} may fit)" if "memory" in why else "")
    return MapCreateError(f"{at}the kernel refused to create map {name}, {what}: {why}{hint}")


def _field_line(relo: list[str], prog: str, user_source: str) -> int | None:
    """The cell line in program `prog` that reads the first field libbpf could not relocate."""
    m = re.search(r"\b(?:struct|union) \w+\.([\w.]+)", relo[0])
    start = program_lines(user_source).get(prog)
    if not m or start is None:
        return None
    field = m.group(1).split(".")[-1]
    lines = user_source.splitlines()
    hits = (i + 1 for i in range(start[1], len(lines)) if re.search(rf"\b{field}\b", lines[i]))
    return next(hits, None)


def classify_load(err: OSError, log: str, prepared: Any, user_source: str = "", *,
                   vlog: str = "", seconds: float = 0.0, maps: dict[str, MapShape] | None = None,
                   nprogs: int = 1) -> KernelscopeError:
    """A specific error for a failed load, by the layer that failed. `log`: what libbpf printed;
    `vlog`: the verifier's log of the failed program (from its own buffer), else taken from
    libbpf's print; `maps`: map_shapes() of the object; `nprogs`: how many programs it loaded."""
    section = _section_refused(log, user_source)
    if section is not None:
        return section
    refused = _map_refused(log, prepared, user_source, maps)
    if refused is not None:
        return refused
    progs = re.findall(r"prog '(\w+)': BPF program load failed", log)
    name = progs[0] if progs else "the program"
    relo = re.findall(r"failed to resolve CO-RE relocation (.*)", log + vlog)
    if relo:
        fields = dict.fromkeys(f"{m.group(1)} {m.group(2)} has no {m.group(3)}" for m in
                               (re.search(r"\b(struct|union) (\w+)\.([\w.\[\]]+)", r) for r in relo) if m)
        said = f" ({'; '.join(fields)})" if fields else ""
        line = _field_line(relo, name, user_source)
        full = f"{log}\n{vlog}"
        if line:  # the verifier's last line note is the instruction before the poisoned read
            full = re.sub(r"@ cell:(\d+)", r"@ cell line \1", full)
        return RelocationError(
            f"{f'line {line}: ' if line else ''}CO-RE relocation failed for {name}{said}: a field or type "
            "the program reads does not exist in the running kernel's BTF (guard optional fields with "
            "bpf_core_field_exists()):\n" + "\n".join(dict.fromkeys(relo)), log=full)
    if err.errno == _errno.EPERM:
        if os.geteuid() != 0 and not host.has_bpf_privileges():
            return BPFPermissionError(host_permission_hint())
        tracing = [s for s, _ in prepared.sections if s.split("/")[0].split(".")[0] in TRACING_SECTIONS]
        found = host.lockdown_mode()
        lock = found[0] if found else None
        if tracing:
            return UnsupportedError(
                f"the kernel refused to load {name} (EPERM) although we are root: "
                f"{', '.join(tracing)} programs are BPF tracing programs (BTF-attached)"
                + (f", which this kernel refuses (lockdown is '{lock}')" if lock and lock != "none" else "")
                + ". Use a tracepoint (SEC(\"tp/...\")) or raw tracepoint instead.",
                feature=f"lockdown={lock}" if lock else "BPF tracing programs")
    if not vlog.strip():
        vlog = log.split("-- BEGIN PROG LOAD LOG --", 1)[-1].split("-- END PROG LOAD LOG --", 1)[0]
    reason = verifier_reason(vlog)
    if gave_up(reason):
        text, line = gave_up_text(reason, vlog, user_source, seconds)
        at = f"line {line}: " if line and last_cell_line(vlog, len(user_source.splitlines())) is None else ""
        return rejection(f"{at}{name}: {text}", vlog, user_source, whole_log(log, vlog), line=line)
    # the errno (EACCES, "Permission denied", for most verdicts) says only that it refused
    alone = (f"\n(to load the other programs without it: skip=[{name!r}], %%bpf --skip {name})"
             if nprogs > 1 and progs else "")
    return rejection(f"the verifier rejected {name}: {reason or os.strerror(err.errno or 0)}{alone}", vlog,
                     user_source, whole_log(log, vlog))


def whole_log(libbpf_log: str, vlog: str) -> str:
    """What libbpf printed and the verifier's log, once: libbpf prints a failed program's log
    between BEGIN/END PROG LOAD LOG lines, from the same buffer."""
    if vlog.strip() and vlog.strip() in libbpf_log:
        return libbpf_log
    return f"{libbpf_log}\n{vlog}"
