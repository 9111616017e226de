"""C event struct -> numpy dtype -> DataFrame columns, fixed once per output map.

BCC records the struct each output call site submits (`bpf_perf_event_fields`, as
"name#type" strings) for perf buffers and ring buffers alike; kernelscope builds the dtype
from that instead of asking for a second, hand-written declaration. Offsets follow the C
rules for natural alignment (x86_64 SysV), which is what clang uses for the BPF target too.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from numpy.typing import DTypeLike

from .errors import SchemaError
from .readers.batch import epoch_ns

# kernelscope's own columns start with this prefix; programs may not use it for fields.
RESERVED_PREFIX = "ks_"
SEQ = "ks_seq"
CPU = "ks_cpu"
ARRIVAL = "ks_arrival_ns"

_SCALARS: dict[str, str] = {
    "char": "i1",
    "signed char": "i1",
    "s8": "i1",
    "__s8": "i1",
    "int8_t": "i1",
    "unsigned char": "u1",
    "u8": "u1",
    "__u8": "u1",
    "uint8_t": "u1",
    "_Bool": "u1",
    "bool": "u1",
    "short": "i2",
    "s16": "i2",
    "__s16": "i2",
    "int16_t": "i2",
    "unsigned short": "u2",
    "u16": "u2",
    "__u16": "u2",
    "uint16_t": "u2",
    "__be16": "u2",
    "int": "i4",
    "s32": "i4",
    "__s32": "i4",
    "int32_t": "i4",
    "enum": "i4",
    "pid_t": "i4",
    "unsigned int": "u4",
    "u32": "u4",
    "__u32": "u4",
    "uint32_t": "u4",
    "__be32": "u4",
    "unsigned": "u4",
    "long": "i8",
    "long long": "i8",
    "s64": "i8",
    "__s64": "i8",
    "int64_t": "i8",
    "unsigned long": "u8",
    "unsigned long long": "u8",
    "u64": "u8",
    "__u64": "u8",
    "uint64_t": "u8",
    "size_t": "u8",
    "float": "f4",
    "double": "f8",
    "void *": "u8",
    "char *": "u8",
    "u8 *": "u8",
}
# A 128-bit integer (`unsigned __int128`, e.g. tcpstates' IPv6 addresses; numpy has no 16-byte
# ints): two little-endian u64 halves, columns `x.lo` and `x.hi`, aligned to 16 as in C.
# kernelscope.addresses.ip_address() turns them (or a u8[16]/u32 column) into addresses.
WIDE = np.dtype({"names": ["lo", "hi"], "formats": ["<u8", "<u8"], "offsets": [0, 8], "itemsize": 16})
_WIDE = {"__int128", "unsigned __int128", "__u128", "__s128", "u128", "s128"}
_ARRAY = re.compile(r"^(.*?)\s*\[(\d+)\]$")
# Time columns by unit: the suffix says it (`_ns`, `_us`, `_ms`), no suffix means ns, as
# bpf_ktime_get_ns() gives. Only absolute timestamps get a ks_time datetime; a duration
# (`delta_us`, `duration_ns`, `lat_ns`, `span_us`, `run_delta`) is a number, never a date.
_UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000}
_UNIT = re.compile(r"^(?P<stem>.*?)_?(?P<unit>ns|us|ms)$")
_STAMPS = re.compile(r"^(ts|timestamp|time|ktime|ts_.*|.*_ts|start|end|now|t)$")
_DURATION_WORDS = ("delta", "duration", "dur", "lat", "latency", "elapsed", "span", "wait", "total",
                   "sum", "avg", "min", "max", "runtime", "period", "interval", "timeout", "age", "diff")
_NAMESPACES = {"mnt", "pid", "net", "ipc", "uts", "user", "cgroup"}  # `mnt_ns`: a namespace id


def _scalar(ctype: str) -> tuple[np.dtype, int] | None:
    t = ctype.strip()
    t = re.sub(r"\b(const|volatile)\b\s*", "", t).strip()
    if t.startswith("enum"):
        t = "enum"
    if t.endswith("*"):
        return np.dtype("<u8"), 8
    if t in _WIDE:
        return WIDE, 16
    code = _SCALARS.get(t)
    if code is None:
        return None
    dt = np.dtype(("<" if code[1] != "1" else "") + code)
    return dt, dt.itemsize


def struct_dtype(
    fields: Iterable[tuple[str, str]],
    structs: Mapping[str, list[tuple[str, str]]] | None = None,
    name: str = "event",
) -> np.dtype:
    """Build an aligned structured dtype from (field name, C type) pairs.

    `structs` maps `struct NAME` to its own (name, type) pairs for nested structs.
    """
    dtype, _ = _layout(list(fields), structs or {}, name)
    return dtype


def _field_type(ctype: str, structs: Mapping[str, list[tuple[str, str]]], where: str) -> tuple[np.dtype, int]:
    m = _ARRAY.match(ctype.strip())
    if m:
        inner, count = m.group(1), int(m.group(2))
        if inner.strip() in ("char", "unsigned char") and "[" not in inner:
            return np.dtype(f"S{count}"), 1  # char[N]: a C string, decoded to str in frames
        base, align = _field_type(inner, structs, where)
        return np.dtype((base, (count,))), align
    scalar = _scalar(ctype)
    if scalar is not None:
        return scalar
    key = ctype.strip()
    if key.startswith(("struct ", "union ")) and key in structs:
        return _layout(structs[key], structs, key, union=key.startswith("union "))
    raise SchemaError(
        f"{where}: cannot map C type {ctype!r} to a column. Use fixed-width integer types "
        "(u8..u64, s8..s64), char[N], arrays and structs defined in the program, or pass "
        "dtypes={map: numpy dtype} to Probe."
    )


def _layout(
    fields: list[tuple[str, str]], structs: Mapping[str, list[tuple[str, str]]], name: str,
    union: bool = False,
) -> tuple[np.dtype, int]:
    names, formats, offsets = [], [], []
    offset, max_align, end = 0, 1, 0
    for fname, ctype in fields:
        dt, align = _field_type(ctype, structs, f"{name}.{fname}")
        offset = 0 if union else -(-offset // align) * align  # a union's members overlap
        names.append(fname)
        formats.append(dt)
        offsets.append(offset)
        offset += dt.itemsize
        end = max(end, offset)
        max_align = max(max_align, align)
    size = -(-end // max_align) * max_align
    if not names:
        raise SchemaError(f"{name}: the event struct has no fields")
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": size}), max_align


_STRUCT_DEF = re.compile(r"\b(struct|union)\s+(\w+)\s*\{([^{}]*)\}", re.S)
_MEMBER = re.compile(r"^\s*(.+?)\s*\b(\w+)\s*((?:\[\s*\w+\s*\])*)\s*$", re.S)


def parse_structs(source: str) -> dict[str, list[tuple[str, str]]]:
    """Struct definitions in a program's text, as BCC-style (field, type) lists.

    Only needed for nested structs: BCC describes the outer struct itself but gives a
    nested member only as "struct NAME".
    """
    src = re.sub(r"//[^\n]*|/\*.*?\*/", "", source, flags=re.S)
    out: dict[str, list[tuple[str, str]]] = {}
    for kind, sname, body in _STRUCT_DEF.findall(src):
        members: list[tuple[str, str]] = []
        for raw in body.split(";"):
            decl = raw.strip()
            if not decl:
                continue
            if ":" in decl:  # bitfields: leave the struct undefined, an error if used
                members = []
                break
            m = _MEMBER.match(decl)
            if not m:
                members = []
                break
            ctype, fname, dims = m.groups()
            ctype = " ".join(ctype.split())
            for d in re.findall(r"\[\s*(\w+)\s*\]", dims):
                ctype = f"{ctype}[{d}]"
            members.append((fname, ctype))
        if members:
            out[f"{kind} {sname}"] = members
    return out


def time_unit(name: str) -> int | None:
    """ns per unit of field `name` when it reads as an absolute timestamp (`ts`, `ts_us`,
    `start_ns`, `exit_ts`), None for anything else, durations included (`delta_us`, `lat_ns`)."""
    m = _UNIT.match(name)
    stem, scale = (m.group("stem"), _UNITS[m.group("unit")]) if m and m.group("stem") else (name, 1)
    words = name.lower().split("_")
    if any(w.startswith(_DURATION_WORDS) for w in words) or (
            m and m.group("unit") == "ns" and stem.lower() in _NAMESPACES):
        return None
    if (m and m.group("stem")) or _STAMPS.match(stem.lower()):
        return scale
    return None


def time_fields(dtype: np.dtype) -> list[str]:
    """u64 fields that read as absolute timestamps of bpf_ktime_get_ns() (in ns, us or ms)."""
    out = []
    for name in dtype.names or ():
        sub = dtype.fields[name][0]  # type: ignore[index]
        if sub == np.dtype("<u8") and time_unit(name) is not None:
            out.append(name)
    return out


def monotonic_to_epoch_ns() -> int:
    """Offset turning CLOCK_MONOTONIC ns (bpf_ktime_get_ns) into Unix-epoch ns."""
    return time.time_ns() - time.monotonic_ns()


@dataclass(frozen=True)
class Schema:
    """The fixed column layout of one output map, checked against every batch."""

    dtype: np.dtype
    per_cpu: bool = False  # perf buffers: a ks_cpu column
    epoch_offset_ns: int = field(default_factory=monotonic_to_epoch_ns)

    def __post_init__(self) -> None:
        for name in self.dtype.names or ():
            if name.startswith(RESERVED_PREFIX):
                raise SchemaError(
                    f"field {name!r}: names starting with {RESERVED_PREFIX!r} are kernelscope's "
                    "own columns (ks_seq, ks_cpu, ks_arrival_ns, ks_time); rename the field"
                )

    @property
    def time_field(self) -> str | None:
        tf = time_fields(self.dtype)
        return tf[0] if tf else None

    @property
    def columns(self) -> list[str]:
        cols = _column_names(self.dtype, "")
        cols += [SEQ, ARRIVAL]
        if self.per_cpu:
            cols.append(CPU)
        cols += ["ks_time"] if self.time_field else []
        return cols

    def check(self, records: np.ndarray) -> None:
        if records.dtype != self.dtype:
            raise SchemaError(f"batch dtype {records.dtype} does not match the map's {self.dtype}")

    def frame(
        self,
        records: np.ndarray,
        seq: np.ndarray,
        arrival_ns: np.ndarray,
        cpu: np.ndarray | None = None,
        *,
        alloc: Callable[[int, DTypeLike], np.ndarray] | None = None,
        times: np.ndarray | None = None,
    ) -> pd.DataFrame:
        """Columns named after the C fields: char[] -> str, nested structs flattened, arrays kept.

        Numeric fields are views of `records` (strided, no copy); `alloc(n, dtype)` gives the
        memory of the columns computed here (ks_time), np.empty by default; `times` is ks_time
        as int64 epoch ns when already computed (Batch.times).
        """
        self.check(records)
        data: dict[str, object] = {}
        _columns(records, "", data)
        data[SEQ] = seq
        data[ARRIVAL] = arrival_ns
        if self.per_cpu:
            data[CPU] = cpu if cpu is not None else np.full(len(records), -1, dtype=np.int16)
        tf = self.time_field
        if tf and times is not None:
            data["ks_time"] = times.view("datetime64[ns]")
        elif tf:
            out = epoch_ns(records, tf, time_unit(tf) or 1, self.epoch_offset_ns,
                           (alloc or np.empty)(len(records), np.int64))
            data["ks_time"] = out.view("datetime64[ns]")  # same values, no parsing pass
        # copy=False: one block per column, no consolidation copy (3-10x faster for big
        # frames); columns may view the stored records, which are never written in place.
        return pd.DataFrame(data, columns=self.columns, copy=False)


def _column_names(dtype: np.dtype, prefix: str) -> list[str]:
    """Flattened names, nested structs as `outer.inner`; a union also as its raw bytes."""
    cols: list[str] = []
    for name in dtype.names or ():
        sub = dtype.fields[name][0]  # type: ignore[index]
        if sub.names:
            cols += [prefix + name] if _overlaps(sub) else []
            cols += _column_names(sub, f"{prefix}{name}.")
        else:
            cols.append(prefix + name)
    return cols


def _overlaps(dtype: np.dtype) -> bool:
    """True for a union's dtype: some of its fields share bytes."""
    spans = sorted((off, off + sub.itemsize) for sub, off, *_ in dtype.fields.values())  # type: ignore[union-attr]
    return any(b[0] < a[1] for a, b in itertools.pairwise(spans))


def _columns(records: np.ndarray, prefix: str, out: dict[str, object]) -> None:
    for name in records.dtype.names or ():
        col = records[name]
        sub = records.dtype.fields[name][0]  # type: ignore[index]
        key = prefix + name
        if sub.names:
            if _overlaps(sub):  # a union: its bytes, then each member as a view of them
                raw = np.ascontiguousarray(col).view(f"V{sub.itemsize}")
                out[key] = np.array([bytes(r) for r in raw], dtype=object)
            _columns(col, key + ".", out)
        elif sub.kind == "S":
            out[key] = _decode(col)
        elif col.ndim > 1:
            out[key] = list(col)  # one small array per row, still a numpy array each
        else:
            out[key] = col


def c_strings(col: np.ndarray) -> np.ndarray:
    """char[N] values cut at the first NUL, as C reads them (bytes, same S dtype).

    numpy's S dtype only drops trailing NULs: a buffer reused for a shorter string keeps the
    older string's bytes after the NUL (a ring record's unused tail, a per-CPU scratch
    array), and those must not show up in the column.
    """
    size = col.dtype.itemsize
    if size == 0 or len(col) == 0:
        return col
    raw = np.ascontiguousarray(col).view(np.uint8).reshape(len(col), size)
    nul = raw == 0
    first = np.where(nul.any(axis=1), nul.argmax(axis=1), size)
    kept = np.where(np.arange(size) < first[:, None], raw, 0).astype(np.uint8)
    return kept.view(col.dtype).reshape(col.shape)


def _decode(col: np.ndarray) -> np.ndarray:
    return np.char.decode(c_strings(col), "utf-8", "replace").astype(object)
