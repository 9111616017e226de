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

import errno
import importlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import symbols
from .errors import KernelscopeError, SchemaError, UnknownNameError
from .maps import types as _types

if TYPE_CHECKING:
    from .results import Results as Probe  # a live probe or a replayed capture

__all__ = ["Raw", "captured", "flamegraph", "frames", "read_raw", "remember", "stack_frame"]

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
    """What stop() kept of a probe: the symbols of the processes in its stacks."""

    snapshot: symbols.Snapshot = field(default_factory=symbols.Snapshot)


_memory: weakref.WeakKeyDictionary[Any, _Memory] = weakref.WeakKeyDictionary()


def _mem(probe: Probe) -> _Memory:
    if probe not in _memory:
        _memory[probe] = _Memory()
    return _memory[probe]


# --- reading the maps ------------------------------------------------------------------------


def _field(names: Sequence[str], wanted: Sequence[str]) -> str | None:
    return next((w for w in wanted if w in names), None)


def read_raw(probe: Probe, counts: str = "counts", stacks: str = "stacks", live: bool = False) -> Raw:
    """Counting map `counts` and stack-trace map `stacks`, read through `probe.maps`: the
    kernel's maps while the probe runs (or with `live`), as stop() found them once stopped (the
    programs stay attached until close(), still counting)."""
    try:
        cm, sm = probe.maps[counts], probe.maps[stacks]
    except UnknownNameError as e:
        raise KernelscopeError(f"{e}: pass counts= and stacks= with the names of its counting map "
                               "and its stack-trace map") from None
    if sm.kind != "stack_trace":
        raise KernelscopeError(f"map {stacks!r} is a {sm.kind} map, not BPF_MAP_TYPE_STACK_TRACE: "
                               "pass stacks= the name of the program's stack-trace map")
    if cm.kind not in COUNT_KINDS:
        raise KernelscopeError(f"map {counts!r} is a {cm.kind} map: pass counts= the hash map keyed "
                               "by (pid, ..., user_stack_id, kern_stack_id)")
    names = cm.key_dtype.names or ()
    user, kern = _field(names, USER_FIELDS), _field(names, KERNEL_FIELDS)
    if user is None and kern is None:
        raise SchemaError(f"map {counts!r}: its key ({', '.join(names) or 'a scalar'}) has no stack id "
                          f"field; name one {USER_FIELDS[0]} or {KERNEL_FIELDS[0]} (an int from "
                          "bpf_get_stackid)")
    keys, values = cm.records(cm.read(live=live))  # per-CPU values summed over CPUs
    st = sm.read(live=live)
    ids = np.ascontiguousarray(st.keys).view("<u4").reshape(-1)
    # explicit width: before the first sample the map is empty and reshape(0, -1) fails
    addrs = np.ascontiguousarray(st.values).view("<u8").reshape(len(ids), sm.value_size // 8)
    table = {int(i): row[row != 0] for i, row in zip(ids.tolist(), addrs, strict=True)}
    return Raw(keys, values, table, user, kern, _field(names, PID_FIELDS), cm.value_dtype.names is None)


# --- symbols -------------------------------------------------------------------------------


def stack_ids(raw: Raw, fname: str) -> list[int]:
    """A key's stack-id column as bpf_get_stackid() returned it: a signed int (a key that
    declares `u32 user_stack_id` stores -EFAULT as 4294967282), so signed of its own width."""
    col = np.ascontiguousarray(raw.keys[fname])
    if col.dtype.kind == "u":
        col = col.view(np.dtype(f"<i{col.dtype.itemsize}"))
    return col.tolist()


def _pids(raw: Raw) -> set[int]:
    return set() if raw.pid_field is None else {int(p) for p in np.unique(raw.keys[raw.pid_field])}


def remember(probe: Probe, counts: str | None = None, stacks: str | None = None) -> None:
    """Keep the symbols of every process in a probe's stacks while they live (stop() calls it
    with no names: every pair of a counting map and a stack-trace map the program declares)."""
    if not probe.live or probe.closed or not probe.loaded:
        return
    pairs = [(counts, stacks)] if counts and stacks else _pairs(probe)
    mem = _mem(probe)
    for c, s in pairs:
        try:
            raw = read_raw(probe, c, s, live=True)
        except (KernelscopeError, OSError, ValueError):  # not a (pid, stack ids) key after all
            continue
        mem.snapshot.take(_pids(raw))


def _pairs(probe: Probe) -> list[tuple[str, str]]:
    """(counting map, stack-trace map) pairs: every hash map with a stack id in its key, each
    with the program's stack-trace maps."""
    kinds = {name: probe.maps[name].kind for name in probe.maps}
    stack_maps = [n for n, k in kinds.items() if k == "stack_trace"]
    return [(c, s) for c, k in kinds.items() if k in COUNT_KINDS
            and _field(probe.maps[c].key_dtype.names or (), USER_FIELDS + KERNEL_FIELDS)
            for s in stack_maps]


def captured(probe: Probe) -> dict[str, pd.DataFrame]:
    """The stacks frames a capture keeps (Probe.save): per pair, the frame and its long form,
    symbols already named (a replay elsewhere has neither the processes nor their files)."""
    out: dict[str, pd.DataFrame] = {}
    for c, s in _pairs(probe):
        try:
            out[f"stacks:{c}:{s}"] = stack_frame(probe, c, s)
            out[f"stack_frames:{c}:{s}"] = frames(probe, c, s)
        except (KernelscopeError, OSError, ValueError):
            continue
    return out


def _saved(probe: Probe, kind: str, counts: str, stacks: str) -> pd.DataFrame | None:
    """In a replay, the frame its capture kept (None on a live probe)."""
    cap = probe.capture
    if cap is None:
        return None
    df = cap.frames.get(f"{kind}:{counts}:{stacks}")
    if df is None:
        kept = sorted({k.split(":", 1)[1] for k in cap.frames if k.startswith("stacks:")})
        raise KernelscopeError(f"this capture keeps no stacks of maps {counts!r} and {stacks!r} "
                               f"(it keeps {', '.join(kept) or 'none'}; stacks are saved by Probe.save)")
    return df.copy()


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


def stack_frame(probe: Probe, counts: str = "counts", stacks: str = "stacks",
                value: str | Sequence[str] | None = None) -> pd.DataFrame:
    """One row per key of map `counts`: its key columns, `stack` (root first: user frames then
    kernel frames), `user_stack`, `kernel_stack` (tuples of names, root first) and the value
    columns (all, or those named by `value`; a scalar value is column `count`, or `value` when
    that is one name). On a running probe: the maps now; once stopped (also after close()):
    as stop() found them. Rows are sorted by the first numeric value column, largest first.
    `df.attrs["stack_errors"]`: {"user EFAULT": rows, ...}; `["warnings"]`."""
    saved = _saved(probe, "stacks", counts, stacks)
    if saved is not None:
        return _pick_values(saved, value)
    raw = read_raw(probe, counts, stacks)
    snap = _snapshot_for(probe, raw)
    namer = _Namer(snap, probe.started_at)
    data: dict[str, object] = dict(_types.columns(raw.keys, "key"))
    n = len(raw.keys)
    user_col: list[tuple[str, ...]] = []
    kern_col: list[tuple[str, ...]] = []
    errors: dict[str, int] = {}
    pids = raw.keys[raw.pid_field].tolist() if raw.pid_field else [0] * n
    for kind, fname, out in (("user", raw.user_field, user_col), ("kernel", raw.kernel_field, kern_col)):
        ids = stack_ids(raw, fname) if fname else [-errno.EFAULT] * n
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
    df.attrs["value_columns"] = list(values)
    df.attrs["warnings"] = namer.warnings + [f"pid {p}: {why}" for p, why in snap.missed.items()
                                             if p in set(pids)]
    return df


def _value_columns(raw: Raw, value: str | Sequence[str] | None) -> dict[str, object]:
    if raw.value_scalar:
        name = value if isinstance(value, str) else "count"
        return {name: raw.values}
    cols: dict[str, object] = dict(_types.columns(raw.values))
    if value is None:
        return cols
    wanted = [value] if isinstance(value, str) else list(value)
    unknown = [w for w in wanted if w not in cols]
    if unknown:
        raise SchemaError(f"value={unknown}: the counting map's value has columns {list(cols)}")
    return {w: cols[w] for w in wanted}


def _pick_values(df: pd.DataFrame, value: str | Sequence[str] | None) -> pd.DataFrame:
    """A saved stacks frame with only the value columns `value` names (all for None)."""
    have = list(df.attrs.get("value_columns", []))
    if value is None or not have:
        return df
    wanted = [value] if isinstance(value, str) else list(value)
    if len(have) == 1 and isinstance(value, str) and value not in df.columns:
        return df.rename(columns={have[0]: value})  # a scalar value, named by the caller
    unknown = [w for w in wanted if w not in have]
    if unknown:
        raise SchemaError(f"value={unknown}: the counting map's value has columns {have}")
    return df.drop(columns=[c for c in have if c not in wanted])


def frames(probe: Probe, counts: str = "counts", stacks: str = "stacks") -> pd.DataFrame:
    """The long form: one row per frame of each stack the counting map refers to, columns
    `stack_id, pid, depth` (0 = outermost caller), `address, symbol, module, offset, kind`
    ('user' | 'kernel'), `inline` (True for a function the compiler inlined at that address, read
    from the object's DWARF when it has some; its `offset` is 0).
    `pid` is the process a user stack was named for (-1 for kernel stacks)."""
    saved = _saved(probe, "stack_frames", counts, stacks)
    if saved is not None:
        return saved
    raw = read_raw(probe, counts, stacks)
    namer = _Namer(_snapshot_for(probe, raw), probe.started_at)
    rows: list[tuple[Any, ...]] = []
    seen: set[tuple[str, int, int]] = set()
    n = len(raw.keys)
    pids = raw.keys[raw.pid_field].tolist() if raw.pid_field else [0] * n
    for kind, fname in (("user", raw.user_field), ("kernel", raw.kernel_field)):
        if fname is None:
            continue
        for sid, pid in zip(stack_ids(raw, fname), pids, strict=True):
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
        have = df.attrs.get("value_columns", list(df.columns))
        numeric = [c for c in have if c in df.columns and df[c].dtype.kind in "iuf"]
        if "count" in df.columns:
            value = "count"
        elif numeric:
            value = numeric[-1]
        else:
            raise SchemaError(f"flamegraph: the counting map {counts!r} has no numeric value column to "
                              f"weigh stacks by (its value columns: {have}); "
                              "pass value= one of the frame's numeric columns")
    return flame.flamegraph(df, stack="stack", value=value, **kw)
