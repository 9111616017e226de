"""`probe.maps`: every map of the loaded program by name, each readable as a DataFrame.

    p.maps                      # name, kind, key/value types, entries / max_entries
    p.maps["counts"].frame()    # one row per key, decoded with the program's own types
    p.maps["counts"].drain()    # read and delete (the tools' periodic "read and reset")

Keys and values are decoded with the types the program declared (BCC's table Key/Leaf,
CO-RE's BTF), reads go through kernelscope.maps.syscall (BPF_MAP_LOOKUP_BATCH where the
kernel has it). At stop() every aggregation map is snapshotted (`Maps.freeze`): what the
user reads after stop() is the stop-time state even though the programs stay attached and
in-place updates go on (`frame(live=True)` reads the kernel). A replay's maps are those
snapshots.
"""

from __future__ import annotations

import html
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .. import hist as _hist
from ..backends import libbpf
from ..captures.tables import TableCapture
from ..errors import ClosedError, KernelscopeError, UnknownNameError
from . import syscall, types
from .watch import MAX_SAMPLES, Watch

OUTPUT_KINDS = {"ringbuf": "probe.df / probe.frame(name)", "perf_event_array": "probe.df / probe.frame(name)",
                "user_ringbuf": "probe.send(name, records)"}
READABLE = {"hash", "array", "percpu_hash", "percpu_array", "stack_trace", "lru_hash", "lru_percpu_hash",
            "lpm_trie"}
ARRAYS = {"array", "percpu_array"}  # every index exists: nothing can be deleted, only zeroed


@dataclass(frozen=True)
class Spec:
    """What is known of one map, live or replayed."""

    name: str
    kind: str
    key_dtype: np.dtype
    value_dtype: np.dtype
    max_entries: int
    per_cpu: bool
    ncpus: int
    typed: bool  # False: the program gave no key or value type

    @property
    def key_size(self) -> int:
        return self.key_dtype.itemsize

    @property
    def value_size(self) -> int:
        return self.value_dtype.itemsize

    @property
    def value_bytes(self) -> int:
        return syscall.value_bytes(self.value_size, self.per_cpu, self.ncpus)


@dataclass
class Snapshot:
    keys: np.ndarray  # (n, key_size) uint8
    values: np.ndarray  # (n, value_bytes) uint8
    taken_ns: int


def _checked(name: str, what: str, dt: np.dtype | None, size: int) -> np.dtype | None:
    """The program's type for a map's key or value if it has the kernel's size, else None (a
    warning): reads hand the kernel buffers of the dtype's size, so a smaller one would be
    written past."""
    if dt is not None and dt.itemsize != size:
        warnings.warn(f"map {name}: the program's {what} type {types.show(dt)} has {dt.itemsize} bytes, "
                      f"the kernel's {what} {size}; showing it as {types.show(types.untyped(size))}",
                      MapTypeWarning, stacklevel=3)
        return None
    return dt


class MapTypeWarning(UserWarning):
    """The program's declared type of a map disagrees with the kernel's size for it."""


class Map:
    """One map of the program: `frame()`, element access, watch and histogram."""

    def __init__(self, owner: Maps, spec: Spec) -> None:
        self._owner = owner
        self.spec = spec
        self._watch: Watch | None = None

    name = property(lambda self: self.spec.name)
    kind = property(lambda self: self.spec.kind)
    key_dtype = property(lambda self: self.spec.key_dtype)
    value_dtype = property(lambda self: self.spec.value_dtype)
    key_size = property(lambda self: self.spec.key_size)
    value_size = property(lambda self: self.spec.value_size)
    max_entries = property(lambda self: self.spec.max_entries)
    per_cpu = property(lambda self: self.spec.per_cpu)

    @property
    def fd(self) -> int | None:
        """The map's fd (owned by the probe), or None after close and in a replay."""
        return self._owner.fd(self.name)

    def __repr__(self) -> str:
        s = self.spec
        return (f"<Map {s.name} {s.kind} key {types.show(s.key_dtype)} value {types.show(s.value_dtype)} "
                f"max_entries {s.max_entries}>")

    # --- reading -----------------------------------------------------------------------

    def _check_readable(self) -> None:
        if self.kind in OUTPUT_KINDS:
            raise KernelscopeError(f"{self.name} is a {self.kind} map: its records are read by "
                                   f"{OUTPUT_KINDS[self.kind]}, not as a map frame")
        if self.kind not in READABLE:
            raise KernelscopeError(f"{self.name}: kernelscope does not read {self.kind} maps as frames "
                                   f"(it reads {', '.join(sorted(READABLE))})")

    def _live_fd(self, what: str) -> int:
        fd = self.fd
        if fd is None:
            raise ClosedError(f"{self.name}: {what} needs the live map, and "
                              + ("this is a replay" if self._owner.replay else "the probe is closed"))
        return fd

    def read(self, live: bool = False, delete: bool = False) -> syscall.Elements:
        """The raw elements: the stop-time snapshot after stop() (unless `live`), else the kernel's."""
        self._check_readable()
        snap = None if live or delete else self._owner.snapshot(self.name)
        if snap is not None:
            return syscall.Elements(snap.keys, snap.values, 0, False)
        fd = self._live_fd("reading")
        s = self.spec
        return syscall.read_all(fd, s.key_size, s.value_bytes, s.max_entries, delete=delete)

    def frame(self, per_cpu: bool = False, live: bool = False) -> pd.DataFrame:
        """One row per key: key columns, then value columns; per-CPU values summed over CPUs
        (`per_cpu=True`: a `cpu` column, one row per key and CPU). After stop(), the map as it
        was at stop() (`live=True`: as the kernel has it now)."""
        return self._decode(self.read(live=live), per_cpu)

    def _decode(self, got: syscall.Elements, per_cpu: bool = False) -> pd.DataFrame:
        s = self.spec
        if per_cpu and not s.per_cpu:
            raise KernelscopeError(f"{self.name} is a {s.kind} map, not a per-CPU one: use frame()")
        return types.decode(got.keys, got.values, s.key_dtype, s.value_dtype, per_cpu=s.per_cpu,
                            ncpus=s.ncpus, by_cpu=per_cpu)

    @property
    def df(self) -> pd.DataFrame:
        return self.frame()

    def records(self, got: syscall.Elements) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of `got` as records of the map's dtypes (per-CPU values summed)."""
        s = self.spec
        keys = types.records(got.keys, s.key_dtype)
        if s.per_cpu:
            return keys, types.summed(types.per_cpu_values(got.values, s.value_dtype, s.ncpus))
        return keys, types.records(got.values, s.value_dtype)

    def items(self, live: bool = False) -> list[tuple[Any, Any]]:
        """(key, value) pairs as Python values (ints, str, dicts of fields, arrays)."""
        keys, vals = self.records(self.read(live=live))
        return [(types.python(k), types.python(v)) for k, v in zip(keys, vals, strict=True)]

    def keys(self, live: bool = False) -> list[Any]:
        keys, _ = self.records(self.read(live=live))
        return [types.python(k) for k in keys]

    def __len__(self) -> int:
        return len(self.read().keys)

    def lookup(self, key: Any, live: bool = False) -> Any:
        """The value of `key` (summed over CPUs for a per-CPU map), or None when absent."""
        kb = types.encode(key, self.key_dtype, f"{self.name} key")
        snap = None if live else self._owner.snapshot(self.name)
        if snap is not None:
            hit = np.flatnonzero((snap.keys == np.frombuffer(kb, np.uint8)).all(axis=1))
            raw = snap.values[hit[0]].tobytes() if len(hit) else None
        else:
            self._check_readable()
            raw = syscall.lookup(self._live_fd("lookup"), kb, self.spec.value_bytes)
        if raw is None:
            return None
        got = syscall.Elements(np.frombuffer(kb, np.uint8)[None], np.frombuffer(raw, np.uint8)[None],
                               1, False)
        return types.python(self.records(got)[1][0])

    # --- writing (the kernel's map; after stop() the snapshot is taken again) ----------------

    def _value_bytes(self, value: Any, per_cpu: Sequence[Any] | None = None) -> bytes:
        s = self.spec
        if per_cpu is not None and not s.per_cpu:
            raise KernelscopeError(f"{self.name} is a {s.kind} map, not a per-CPU one: give one value, "
                                   "not per_cpu=")
        if not s.per_cpu:
            return types.encode(value, s.value_dtype, f"{self.name} value")
        stride = syscall.percpu_stride(s.value_size)
        if per_cpu is not None:
            per = list(per_cpu)
            if len(per) != s.ncpus:
                raise KernelscopeError(f"{self.name}: per_cpu= gives {len(per)} values; this host has "
                                       f"{s.ncpus} possible CPUs (one value each)")
        else:  # a list is the value itself (an array value), never one value per CPU
            per = [value]
        out = bytearray(stride * s.ncpus)  # one value: CPU 0 holds it, so the summed frame shows it
        for cpu, v in enumerate(per):
            at = cpu * stride
            out[at: at + s.value_size] = types.encode(v, s.value_dtype, f"{self.name} value")
        return bytes(out)

    def _changed(self) -> None:
        self._owner.refresh(self.name)

    def update(self, key: Any, value: Any = None, *, per_cpu: Sequence[Any] | None = None) -> None:
        """Set `key` to `value` (an int, a dict of fields, a numpy record, a list for an array
        value). Per-CPU maps: `value` is put on CPU 0 (the others zeroed), or give
        `per_cpu=[one value per possible CPU]` instead."""
        if (value is None) == (per_cpu is None):
            raise KernelscopeError(f"{self.name}.update: give either a value or per_cpu=[...], one of them")
        self._check_readable()
        syscall.update(self._live_fd("update"), types.encode(key, self.key_dtype, f"{self.name} key"),
                       self._value_bytes(value, per_cpu))
        self._changed()

    def __setitem__(self, key: Any, value: Any) -> None:
        self.update(key, value)

    def __getitem__(self, key: Any) -> Any:
        value = self.lookup(key)
        if value is None:
            raise KeyError(key)
        return value

    def delete(self, key: Any) -> bool:
        """Remove `key`; False when it was not there (array maps: set to zero)."""
        self._check_readable()
        fd = self._live_fd("delete")
        kb = types.encode(key, self.key_dtype, f"{self.name} key")
        if self.kind in ARRAYS:
            syscall.update(fd, kb, bytes(self.spec.value_bytes))
            done = True
        else:
            done = syscall.delete(fd, kb)
        self._changed()
        return done

    def _write_zeros(self, keys: np.ndarray) -> None:
        if not len(keys):
            return
        zeros = np.zeros((len(keys), self.spec.value_bytes), np.uint8)
        fd = self._live_fd("zero")
        try:
            libbpf.map_update_batch(fd, np.ascontiguousarray(keys).tobytes(), zeros.tobytes(), len(keys),
                                    f"{self.name}: zero")
        except OSError:  # no BPF_MAP_UPDATE_BATCH for this map type: one by one
            for k in keys:
                syscall.update(fd, k.tobytes(), zeros[0].tobytes())

    def clear(self) -> None:
        """Delete every element (array maps: every value set to zero)."""
        if self.kind in ARRAYS:
            self.zero()
            return
        self.drain()

    def zero(self) -> None:
        """Set the value of every existing key to zero."""
        self._write_zeros(self.read(live=True).keys)
        self._changed()

    def drain(self) -> pd.DataFrame:
        """Read and delete every element (BPF_MAP_LOOKUP_AND_DELETE_BATCH where the kernel has it)
        and return them as a frame: the periodic "read and reset" of the tools. Array maps are
        read, then zeroed (two steps: an update in between is lost)."""
        if self.kind in ARRAYS:
            got = self.read(live=True)
            self._write_zeros(got.keys)
        else:
            got = self.read(delete=True)
        self._changed()
        return self._decode(got)

    # --- watching, histograms --------------------------------------------------------

    def watch(self, every: float = 1.0, max_samples: int = MAX_SAMPLES) -> Map:
        """Snapshot the map every `every` s in a background thread until the probe stops (or
        unwatch()); history() gives the last `max_samples` of them as one tidy frame."""
        if self._watch is None or not self._watch.running:
            self._live_fd("watching")
            self._watch = Watch(lambda: self.frame(live=True), every, self.name, max_samples)
            self._owner.watching(self._watch)
            self._watch.start()
        return self

    def unwatch(self) -> Map:
        if self._watch is not None:
            self._watch.stop()
        return self

    def history(self) -> pd.DataFrame:
        """The watched snapshots: a `snapshot_time` column, then the map frame's columns (a
        WatchError warning when a failed read ended the watch)."""
        if self._watch is None:
            raise KernelscopeError(f"{self.name} is not watched: call "
                                   f"probe.maps[{self.name!r}].watch(every=1.0)")
        return self._watch.history()

    def hist(self, layout: str | None = None, **kw: Any) -> Any:
        """The map as a histogram (kernelscope.hist.from_map_frame): BPF_HISTOGRAM maps
        (log2 by default) or libbpf-tools `struct hist { __u32 slots[N]; }` values."""
        kw.setdefault("name", self.name)  # the map's name hints at the unit (e.g. "dist_usecs")
        df = self.frame()
        vdt = self.value_dtype
        if not len(df) and vdt.names and "slots" in vdt.names and (layout or "log2") == "log2":
            # nothing counted yet: an empty histogram of the value's slots (its frame has no
            # arrays to recognise the layout by)
            n = vdt["slots"].shape[0] if vdt["slots"].shape else 1
            unit = kw.get("unit") or _hist.guess_unit(self.name)
            return _hist.Histogram.log2(np.zeros(n, np.int64), unit, rule=kw.get("rule", "libbpf-tools"))
        return _hist.from_map_frame(df, layout=layout or "log2", **kw)


class Maps(Mapping[str, Map]):
    """Every map of the program by name (kernelscope's own accounting maps left out)."""

    def __init__(self, program: Callable[[], Any] | None = None,
                 tables: Mapping[str, TableCapture] | None = None) -> None:
        self._program = program  # () -> the loaded Program or None; None for a replay
        self._prog_ref: weakref.ref[Any] | None = None  # the program the specs are of
        self._lock = threading.RLock()
        self._specs: dict[str, Spec] = {}
        self._fds: dict[str, int] = {}
        self._maps: dict[str, Map] = {}
        self._frozen: dict[str, Snapshot] | None = None
        self._watches: list[Watch] = []
        self.replay = program is None
        if tables:
            self._frozen = {}
            for name, tc in tables.items():
                self._specs[name] = Spec(name, tc.kind, tc.key_dtype, tc.value_dtype, tc.max_entries,
                                         tc.per_cpu, tc.ncpus, tc.typed)
                self._frozen[name] = Snapshot(tc.keys, tc.values, tc.taken_ns)

    # --- what the program has ------------------------------------------------------------

    def _prog(self) -> Any:
        return self._program() if self._program is not None else None

    def _sync(self) -> None:
        """Specs and fds of the loaded program (again after a reload by reconfigure()). The
        program is recognised by a weak reference, not id(): a reloaded program can get the
        freed one's address. Locked: the watch thread, the panel updater and the user call it."""
        with self._lock:
            prog = self._prog()
            if prog is None:
                self._fds = {}
                if self._program is not None and not self._specs:
                    raise KernelscopeError("probe is not loaded: call start() or load() first")
                return
            if self._prog_ref is not None and self._prog_ref() is prog:
                return
            self._load_specs(prog)

    def _load_specs(self, prog: Any) -> None:
        ncpus = libbpf.possible_cpus()
        specs, fds = {}, {}
        for mt in prog.map_types():
            info = syscall.info(mt.fd)
            key, value = mt.key, mt.value
            if info.kind in READABLE:  # the maps kernelscope reads into buffers of these sizes
                key = _checked(mt.name, "key", key, info.key_size)
                value = _checked(mt.name, "value", value, info.value_size)
            typed = key is not None and value is not None
            if info.kind == "stack_trace" and value is None:  # value_size = depth * 8: addresses
                value = np.dtype(("<u8", (info.value_size // 8,)))
            key = key if key is not None else types.untyped(info.key_size)
            value = value if value is not None else types.untyped(info.value_size)
            specs[mt.name] = Spec(mt.name, info.kind, key, value, info.max_entries, info.per_cpu, ncpus,
                                  typed)
            fds[mt.name] = mt.fd
        self._specs, self._fds, self._prog_ref = specs, fds, weakref.ref(prog)
        self._maps = {n: m for n, m in self._maps.items() if n in specs and m.spec == specs[n]}

    def fd(self, name: str) -> int | None:
        with self._lock:
            self._sync()
            return self._fds.get(name)

    def __getitem__(self, name: str) -> Map:
        with self._lock:
            self._sync()
            if name not in self._specs:
                have = ", ".join(self._specs) or "none"
                raise UnknownNameError(f"no map {name!r}; this program has {have}")
            if name not in self._maps:
                self._maps[name] = Map(self, self._specs[name])
            return self._maps[name]

    def __contains__(self, name: object) -> bool:
        # Mapping's own __contains__ catches only KeyError, and UnknownNameError is a LookupError
        self._sync()
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        self._sync()
        return iter(list(self._specs))

    def __len__(self) -> int:
        self._sync()
        return len(self._specs)

    def aggregations(self) -> list[str]:
        """The maps a frame can read (not output buffers), in declaration order."""
        self._sync()
        return [n for n, s in self._specs.items() if s.kind in READABLE]

    # --- stop-time snapshots -------------------------------------------------------------

    def snapshot(self, name: str) -> Snapshot | None:
        return None if self._frozen is None else self._frozen.get(name)

    def _take(self, name: str) -> Snapshot:
        got = self[name].read(live=True)
        return Snapshot(got.keys, got.values, time.time_ns())

    def freeze(self) -> None:
        """Snapshot every aggregation map and stop the watches (Probe.stop())."""
        for w in self._watches:
            w.stop()
        self._watches.clear()
        if self._prog() is None:
            return
        frozen = {}
        for name in self.aggregations():
            try:
                frozen[name] = self._take(name)
            except (OSError, KernelscopeError):  # a map the kernel will not list: read live
                continue
        self._frozen = frozen

    def thaw(self) -> None:
        """Read the kernel's maps again (Probe.start())."""
        if not self.replay:
            self._frozen = None

    def refresh(self, name: str) -> None:
        """After a write while frozen: the snapshot of `name` shows the write."""
        if self._frozen is not None and name in self._frozen and self._prog() is not None:
            self._frozen[name] = self._take(name)

    def watching(self, w: Watch) -> None:
        self._watches = [x for x in self._watches if x.running] + [w]

    def captured(self) -> dict[str, TableCapture]:
        """Every aggregation map as a capture holds it: the stop-time snapshot, or read now."""
        out: dict[str, TableCapture] = {}
        if self._prog() is None and self._frozen is None:
            return out
        for name in self.aggregations() if self._prog() is not None else list(self._frozen or {}):
            s = self._specs[name]
            snap = self.snapshot(name) or self._take(name)
            out[name] = TableCapture(name, s.kind, s.key_dtype, s.value_dtype, s.max_entries, s.ncpus,
                                     s.per_cpu, snap.keys, snap.values, snap.taken_ns, s.typed)
        return out

    # --- display -------------------------------------------------------------------------

    def _rows(self) -> list[tuple[str, str, str, str, str]]:
        rows = []
        for name in self:
            s = self._specs[name]
            if s.kind in READABLE:
                try:
                    entries = str(len(self[name].read().keys))
                except (OSError, KernelscopeError) as e:
                    entries = f"? ({e})"
            else:
                entries = "-"
            rows.append((name, s.kind + (" (output)" if s.kind in OUTPUT_KINDS else ""),
                         types.show(s.key_dtype), types.show(s.value_dtype), f"{entries} / {s.max_entries}"))
        return rows

    def __repr__(self) -> str:
        try:
            rows = self._rows()
        except KernelscopeError as e:
            return f"<Maps: {e}>"
        width = max((len(r[0]) for r in rows), default=4)
        lines = [f"{r[0]:<{width}}  {r[1]:<16} key {r[2]}  value {r[3]}  entries {r[4]}" for r in rows]
        return "Maps" + (" (snapshot)" if self._frozen is not None else "") + ":\n  " + "\n  ".join(lines)

    def _repr_html_(self) -> str:
        try:
            rows = self._rows()
        except KernelscopeError as e:
            return f"<p>{html.escape(str(e))}</p>"
        head = "".join(f"<th>{h}</th>" for h in ("map", "kind", "key", "value", "entries / max_entries"))
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                       for r in rows)
        note = " (stop-time snapshot)" if self._frozen is not None else ""
        return (f"<div><b>maps</b>{note}<table><thead><tr>{head}</tr></thead>"
                f"<tbody>{body}</tbody></table></div>")
