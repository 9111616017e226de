"""Stack traces with symbols: a counting map keyed by (pid, comm, stack ids) and a stack-trace map
read into one DataFrame row per distinct stack.

    df = probe.stacks("counts", "stacks")      # pid, comm, ..., stack, user_stack, kernel_stack, count
    probe.flamegraph("counts", "stacks")       # kernelscope.flame's interactive flame graph

The program keeps a BPF_MAP_TYPE_STACK_TRACE map (key: u32 stack id; value: u64 addresses,
innermost first, zero after the last) and a hash map whose key holds a pid (or tgid), a comm
and `user_stack_id`/`kern_stack_id` as bpf_get_stackid() returned them, in the style of
libbpf-tools profile.h and offcputime.h. A negative id is an error of bpf_get_stackid:
-EFAULT means there is no stack of that kind (a sample taken in user mode has no kernel
stack, a kernel thread no user stack) and is left out, as BCC's and libbpf-tools' profile
do; any other (-EEXIST: a hash collision, -ENOMEM ...) shows as `[missing user stack]` or
`[missing kernel stack]`. Both are counted in `df.attrs["stack_errors"]`.

User addresses are named from the process's ELF objects (kernelscope.symbols), which must be
read while it lives: each call on a running probe, and stop(), snapshot the pids in the
counting map, so stacks of a process that exited later still resolve.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import symbols
from .backends.libbpf import possible_cpus
from .errors import KernelscopeError, SchemaError
from .maps import syscall
from .schema import _columns

if TYPE_CHECKING:
    from .probe import Probe

__all__ = ["Raw", "ctypes_dtype", "flamegraph", "frames", "read_raw", "remember", "stack_frame"]

USER_FIELDS = ("user_stack_id", "user_stack", "ustack_id", "ustack")
KERNEL_FIELDS = ("kern_stack_id", "kernel_stack_id", "kstack_id", "kern_stack", "kernel_stack", "kstack")
PID_FIELDS = ("tgid", "pid")  # user addresses belong to a process (tgid); libbpf-tools' profile key
COUNT_KINDS = {"hash", "lru_hash", "percpu_hash", "lru_percpu_hash"}
ERRNO_NAMES = {errno.EFAULT: "EFAULT", errno.EEXIST: "EEXIST", errno.ENOMEM: "ENOMEM", errno.EINVAL: "EINVAL"}


@dataclass
class Raw:
    """What a counting map and a stack-trace map held: decoded keys and values, and each stack
    id's addresses (innermost first, as the kernel stores them)."""

    keys: np.ndarray
    values: np.ndarray
    stacks: dict[int, np.ndarray]
    user_field: str | None
    kernel_field: str | None
    pid_field: str | None
    value_scalar: bool


@dataclass
class _Memory:
    """What stop() kept of a probe: symbol snapshot and, per (counts, stacks), the raw maps."""

    snapshot: symbols.Snapshot = field(default_factory=symbols.Snapshot)
    raw: dict[tuple[str, str], Raw] = field(default_factory=dict)


_memory: weakref.WeakKeyDictionary[Any, _Memory] = weakref.WeakKeyDictionary()


def _mem(probe: Probe) -> _Memory:
    if probe not in _memory:
        _memory[probe] = _Memory()
    return _memory[probe]


# --- reading the maps ------------------------------------------------------------------------


def ctypes_dtype(ctype: Any) -> np.dtype:
    """The numpy dtype of a BCC table's ctypes Key/Leaf: char[N] as S{N}, BCC's __pad fields kept
    as bytes (dropped from columns later)."""
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure | ctypes.Union):
        names, formats, offsets = [], [], []
        for fname, ftype, *_ in ctype._fields_:
            names.append(fname)
            formats.append(ctypes_dtype(ftype))
            offsets.append(getattr(ctype, fname).offset)
        return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                         "itemsize": ctypes.sizeof(ctype)})
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Array):
        if ctype._type_ is ctypes.c_char:
            return np.dtype(f"S{ctype._length_}")
        return np.dtype((ctypes_dtype(ctype._type_), (ctype._length_,)))
    return np.dtype(ctype)


def _dtypes(probe: Probe, name: str, info: syscall.Info) -> tuple[np.dtype, np.dtype]:
    """Key and value dtypes of map `name`: BCC's ctypes, or the CO-RE object's BTF by the type
    ids the kernel keeps for the map."""
    prog = probe.program
    assert prog is not None
    if prog.backend == "bcc":
        table = prog.bpf[name.encode()]
        # a per-CPU table's Leaf is BCC's array of every CPU's value; sLeaf is one value
        return ctypes_dtype(table.Key), ctypes_dtype(table.sLeaf if info.per_cpu else table.Leaf)
    types = prog.types()  # type: ignore[attr-defined]
    out = []
    for tid, size in ((info.btf_key_type_id, info.key_size), (info.btf_value_type_id, info.value_size)):
        if tid:
            out.append(types.dtype(types.by_id[tid], name))
        else:
            out.append(np.dtype({4: "<u4", 8: "<u8"}.get(size, f"V{size}")))
    return out[0], out[1]


def _field(names: Sequence[str], wanted: Sequence[str]) -> str | None:
    return next((w for w in wanted if w in names), None)


def read_raw(probe: Probe, counts: str = "counts", stacks: str = "stacks") -> Raw:
    """Read counting map `counts` and stack-trace map `stacks` of a loaded probe."""
    prog = probe.program
    if prog is None:
        raise KernelscopeError("probe is not loaded: start() it (or load()) before reading its stacks")
    fds = {}
    for name in (counts, stacks):
        try:
            fds[name] = prog.map_fd(name)
        except (KeyError, LookupError) as e:
            raise KernelscopeError(f"the program has no map {name!r}: pass counts= and stacks= "
                                   "with the names of its counting map and its stack-trace map") from e
    sinfo, cinfo = syscall.info(fds[stacks]), syscall.info(fds[counts])
    if sinfo.kind != "stack_trace":
        raise KernelscopeError(f"map {stacks!r} is a {sinfo.kind} map, not BPF_MAP_TYPE_STACK_TRACE: "
                               "pass stacks= the name of the program's stack-trace map")
    if cinfo.kind not in COUNT_KINDS:
        raise KernelscopeError(f"map {counts!r} is a {cinfo.kind} map: pass counts= the hash map keyed "
                               "by (pid, ..., user_stack_id, kern_stack_id)")
    kdt, vdt = _dtypes(probe, counts, cinfo)
    names = kdt.names or ()
    user, kern = _field(names, USER_FIELDS), _field(names, KERNEL_FIELDS)
    if user is None and kern is None:
        raise SchemaError(f"map {counts!r}: its key ({', '.join(names) or 'a scalar'}) has no stack id "
                          f"field; name one {USER_FIELDS[0]} or {KERNEL_FIELDS[0]} (an int from "
                          "bpf_get_stackid)")
    ncpus = possible_cpus() if cinfo.per_cpu else 1
    vsize = syscall.value_bytes(cinfo.value_size, cinfo.per_cpu, ncpus)
    got = syscall.read_all(fds[counts], cinfo.key_size, vsize, cinfo.max_entries)
    keys = np.ascontiguousarray(got.keys).view(kdt).reshape(-1)
    values = _values(got.values, vdt, cinfo.per_cpu, ncpus)
    st = syscall.read_all(fds[stacks], 4, sinfo.value_size, sinfo.max_entries)
    ids = np.ascontiguousarray(st.keys).view("<u4").reshape(-1)
    addrs = np.ascontiguousarray(st.values).view("<u8").reshape(len(ids), -1)
    table = {int(i): row[row != 0] for i, row in zip(ids.tolist(), addrs, strict=True)}
    return Raw(keys, values, table, user, kern, _field(names, PID_FIELDS), vdt.names is None)


def _values(raw: np.ndarray, vdt: np.dtype, per_cpu: bool, ncpus: int) -> np.ndarray:
    """Values as records of `vdt`; per-CPU values summed over CPUs (numeric fields)."""
    if not per_cpu:
        return np.ascontiguousarray(raw).view(vdt).reshape(-1)
    stride = -(-vdt.itemsize // 8) * 8
    cells = np.ascontiguousarray(raw).reshape(len(raw), ncpus, stride)[:, :, : vdt.itemsize]
    per = np.ascontiguousarray(cells).view(vdt).reshape(len(raw), ncpus)
    out = per[:, 0].copy()
    for name in vdt.names or ((None,)):
        col = per if name is None else per[name]
        if col.dtype.kind in "iuf":
            summed = col.sum(axis=1).astype(col.dtype)
            if name is None:
                out = summed
            else:
                out[name] = summed
    return out


# --- symbols -------------------------------------------------------------------------------


def _pids(raw: Raw) -> set[int]:
    return set() if raw.pid_field is None else {int(p) for p in np.unique(raw.keys[raw.pid_field])}


def remember(probe: Probe, counts: str | None = None, stacks: str | None = None) -> None:
    """Keep what is needed to name a probe's stacks later: the maps as they are now and the
    symbols of every process in them. stop() calls it with no names: then every pair of a
    counting map and a stack-trace map the program declares is kept."""
    if probe.program is None:
        return
    pairs = [(counts, stacks)] if counts and stacks else _pairs(probe)
    mem = _mem(probe)
    for c, s in pairs:
        try:
            raw = read_raw(probe, c, s)
        except (KernelscopeError, OSError, ValueError):  # not a (pid, stack ids) key after all
            continue
        mem.raw[(c, s)] = raw
        mem.snapshot.take(_pids(raw))


def _map_names(probe: Probe) -> list[str]:
    prog = probe.program
    if prog is None:
        return []
    if prog.backend != "bcc":
        return list(prog.maps)  # type: ignore[attr-defined]  # core.CoreProgram: name -> map
    return re.findall(r"\bBPF_(?:HASH|LRU_HASH|PERCPU_HASH|LRU_PERCPU_HASH|STACK_TRACE|TABLE)\s*\(\s*"
                      r"(?:\"\w+\"\s*,\s*[^,]+,\s*[^,]+,\s*)?(\w+)", probe.source)


def _pairs(probe: Probe) -> list[tuple[str, str]]:
    """(counting map, stack-trace map) pairs: every hash map with a stack id in its key, each
    with the program's stack-trace maps."""
    prog = probe.program
    assert prog is not None
    kinds: dict[str, str] = {}
    for name in _map_names(probe):
        try:
            kinds[name] = syscall.info(prog.map_fd(name)).kind
        except (KeyError, LookupError, OSError):
            continue
    stack_maps = [n for n, k in kinds.items() if k == "stack_trace"]
    return [(c, s) for c, k in kinds.items() if k in COUNT_KINDS for s in stack_maps]


class _Namer:
    """Names addresses, caching each: kernel ones by kallsyms, user ones by the snapshot."""

    def __init__(self, snapshot: symbols.Snapshot, since: float | None) -> None:
        self.snapshot = snapshot
        self.kernel: symbols.KernelSymbols | None = None
        self.warnings: list[str] = []
        try:
            self.kernel = symbols.kernel(since=since)
        except symbols.KallsymsError as e:
            self.warnings.append(str(e))
        self.memo: dict[tuple[int, int], symbols.Resolved] = {}

    def user(self, pid: int, addrs: np.ndarray) -> list[symbols.Resolved]:
        out = []
        for a in addrs.tolist():
            hit = self.memo.get((pid, a))
            if hit is None:
                hit = self.memo[(pid, a)] = self.snapshot.resolve(pid, a)
            out.append(hit)
        return out

    def kern(self, addrs: np.ndarray) -> list[symbols.Resolved]:
        if self.kernel is None:
            return [symbols.Resolved(a, None, "", 0) for a in addrs.tolist()]
        return self.kernel.resolve_many(addrs)


def _missing(kind: str, stack_id: int, stacks: dict[int, np.ndarray]) -> tuple[str, ...] | None:
    """The placeholder for a stack id that names no stack (None: it does name one)."""
    if stack_id >= 0:
        return None if stack_id in stacks else (f"[missing {kind} stack]",)
    return () if -stack_id == errno.EFAULT else (f"[missing {kind} stack]",)


def _error_name(stack_id: int, stacks: dict[int, np.ndarray]) -> str | None:
    if stack_id >= 0:
        return None if stack_id in stacks else "not in the stack map"
    return ERRNO_NAMES.get(-stack_id, f"errno {-stack_id}")


# --- frames ----------------------------------------------------------------------------------


def _snapshot_for(probe: Probe, raw: Raw) -> symbols.Snapshot:
    snap = _mem(probe).snapshot
    pids = _pids(raw)
    # running: refresh every live pid (new mappings); stopped: only pids never seen (a pid
    # seen before may since belong to another process)
    snap.take(pids if probe.running else (p for p in pids if p not in snap))
    return snap


def _raw(probe: Probe, counts: str, stacks: str) -> Raw:
    """The maps now while the probe runs; as stop() found them once it stopped (its programs
    stay attached until close(), still counting, as a stopped probe's counters do not)."""
    kept = _mem(probe).raw.get((counts, stacks))
    if probe.running or (kept is None and probe.loaded):
        return read_raw(probe, counts, stacks)
    raw = kept
    if raw is None:
        raise KernelscopeError(f"no stacks kept for maps {counts!r} and {stacks!r}: the probe was "
                               "never started, or has other map names (pass counts= and stacks=)")
    return raw


def stack_frame(probe: Probe, counts: str = "counts", stacks: str = "stacks",
                value: str | Sequence[str] | None = None) -> pd.DataFrame:
    """One row per key of map `counts`: its key columns, `stack` (root first: user frames then
    kernel frames), `user_stack`, `kernel_stack` (tuples of names, root first) and the value
    columns (all, or those named by `value`; a scalar value is column `count`, or `value` when
    that is one name). On a running probe: the maps now; once stopped (also after close()):
    as stop() found them. Rows are sorted by the first numeric value column, largest first.
    `df.attrs["stack_errors"]`: {"user EFAULT": rows, ...}; `["warnings"]`."""
    raw = _raw(probe, counts, stacks)
    snap = _snapshot_for(probe, raw)
    namer = _Namer(snap, probe.started_at)
    data: dict[str, object] = {}
    _columns(raw.keys, "", data)
    data = {k: v for k, v in data.items() if not k.startswith("__pad")}
    n = len(raw.keys)
    user_col: list[tuple[str, ...]] = []
    kern_col: list[tuple[str, ...]] = []
    errors: dict[str, int] = {}
    pids = raw.keys[raw.pid_field].tolist() if raw.pid_field else [0] * n
    for kind, fname, out in (("user", raw.user_field, user_col), ("kernel", raw.kernel_field, kern_col)):
        ids = raw.keys[fname].tolist() if fname else [-errno.EFAULT] * n
        cache: dict[tuple[int, int], tuple[str, ...]] = {}
        for sid, pid in zip(ids, pids, strict=True):
            err = _error_name(sid, raw.stacks) if fname else None
            if err is not None:
                errors[f"{kind} {err}"] = errors.get(f"{kind} {err}", 0) + 1
            hit = cache.get((sid, pid if kind == "user" else 0))
            if hit is None:
                hit = _missing(kind, sid, raw.stacks)
                if hit is None:
                    addrs = raw.stacks[sid][::-1]  # root first
                    names = namer.user(pid, addrs) if kind == "user" else namer.kern(addrs)
                    hit = tuple(n for r in names for n in r.names)
                cache[(sid, pid if kind == "user" else 0)] = hit
            out.append(hit)
    data["stack"] = [u + k for u, k in zip(user_col, kern_col, strict=True)]
    data["user_stack"] = user_col
    data["kernel_stack"] = kern_col
    values = _value_columns(raw, value)
    data.update(values)
    df = pd.DataFrame(data)
    weight = next((c for c, v in values.items() if np.asarray(v).dtype.kind in "iuf"), None)
    if weight is not None:  # the heaviest stacks first, as a profile is read
        df = df.sort_values(weight, ascending=False, kind="stable", ignore_index=True)
    df.attrs["stack_errors"] = errors
    df.attrs["warnings"] = namer.warnings + [f"pid {p}: {why}" for p, why in snap.missed.items()
                                             if p in set(pids)]
    return df


def _value_columns(raw: Raw, value: str | Sequence[str] | None) -> dict[str, object]:
    if raw.value_scalar:
        name = value if isinstance(value, str) else "count"
        return {name: raw.values}
    cols: dict[str, object] = {}
    _columns(raw.values, "", cols)
    cols = {k: v for k, v in cols.items() if not k.startswith("__pad")}
    if value is None:
        return cols
    wanted = [value] if isinstance(value, str) else list(value)
    unknown = [w for w in wanted if w not in cols]
    if unknown:
        raise SchemaError(f"value={unknown}: the counting map's value has columns {list(cols)}")
    return {w: cols[w] for w in wanted}


def frames(probe: Probe, counts: str = "counts", stacks: str = "stacks") -> pd.DataFrame:
    """The long form: one row per frame of each stack the counting map refers to, columns
    `stack_id, pid, depth` (0 = outermost caller), `address, symbol, module, offset, kind`
    ('user' | 'kernel'), `inline` (True for a function the compiler inlined at that address, read
    from the object's DWARF when it has some; its `offset` is 0).
    `pid` is the process a user stack was named for (-1 for kernel stacks)."""
    raw = _raw(probe, counts, stacks)
    namer = _Namer(_snapshot_for(probe, raw), probe.started_at)
    rows: list[tuple[Any, ...]] = []
    seen: set[tuple[str, int, int]] = set()
    n = len(raw.keys)
    pids = raw.keys[raw.pid_field].tolist() if raw.pid_field else [0] * n
    for kind, fname in (("user", raw.user_field), ("kernel", raw.kernel_field)):
        if fname is None:
            continue
        for sid, pid in zip(raw.keys[fname].tolist(), pids, strict=True):
            who = pid if kind == "user" else -1
            if sid not in raw.stacks or (kind, sid, who) in seen:
                continue
            seen.add((kind, sid, who))
            addrs = raw.stacks[sid][::-1]
            named = namer.user(pid, addrs) if kind == "user" else namer.kern(addrs)
            depth = 0
            for r in named:
                rows.append((sid, who, depth, r.address, r.symbol, r.module, r.offset, kind, False))
                for fn in r.inlined:  # inlined at that address: one more frame each, same address
                    depth += 1
                    rows.append((sid, who, depth, r.address, fn, r.module, 0, kind, True))
                depth += 1
    cols = ["stack_id", "pid", "depth", "address", "symbol", "module", "offset", "kind", "inline"]
    df = pd.DataFrame(rows, columns=cols)
    return df.astype({"stack_id": "int64", "pid": "int64", "depth": "int64", "address": "uint64",
                      "offset": "int64", "inline": bool})


def flamegraph(probe: Probe, counts: str = "counts", stacks: str = "stacks", value: str | None = None,
               **kw: Any) -> Any:
    """`Probe.flamegraph`: kernelscope.flame.flamegraph of the stacks frame, weighted by `value`
    (the counting map's value column; `count` for a scalar value)."""
    flame = importlib.import_module("kernelscope.flame")  # plotly and the renderer: only when drawn

    df = stack_frame(probe, counts, stacks)
    if value is None:
        value = "count" if "count" in df.columns else next(
            c for c in df.columns[::-1] if df[c].dtype.kind in "iuf")
    return flame.flamegraph(df, stack="stack", value=value, **kw)
