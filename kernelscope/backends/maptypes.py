"""Every map of a loaded program with its key and value types, for `probe.maps` (kernelscope.maps).

Both backends describe a map the same way (`MapType`): the fd, and the key and value as
numpy dtypes taken from the program's own types: BCC's ctypes `Key`/`Leaf` classes (which
BCC builds from clang's view of the C types), or, for CO-RE, the BTF type ids the kernel
recorded for the map, read in the object's own BTF. A CO-RE program's global variables
live in libbpf's internal array maps (`.bss`, `.data`, `.rodata`), one value holding every
variable of the section; their value dtype has one field per variable, at its ELF offset.
kernelscope's own accounting and gate maps are left out.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import btf as _btf
from . import elf, libbpf
from .rewrite import ACCT_MAP, GATE_MAP

HIDDEN = (ACCT_MAP, GATE_MAP)
INTERNAL = (".bss", ".data", ".rodata")  # libbpf names them "<object prefix>.bss" ...
OWN_PREFIX = "__ks_"  # kernelscope's own globals (type anchors, licence)


@dataclass(frozen=True)
class MapType:
    """A map as the user names it, its fd and the program's types for its keys and values
    (None: the program gives no type; kernelscope.maps shows unsigned ints or bytes)."""

    name: str
    fd: int
    key: np.dtype | None
    value: np.dtype | None


def ctypes_dtype(ct: Any) -> np.dtype | None:
    """The numpy dtype of a ctypes type (BCC's Key/Leaf), char arrays as `S<n>`; None when
    numpy cannot read it (bitfields)."""
    try:
        return _fix_chars(np.dtype(ct))
    except (TypeError, ValueError, NotImplementedError):
        return None


def _fix_chars(dt: np.dtype) -> np.dtype:
    """numpy reads `c_char * N` as N one-byte strings; a C char array is one string."""
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        if base.kind == "S" and base.itemsize == 1 and len(shape) == 1:
            return np.dtype(f"S{shape[0]}")
        return np.dtype((_fix_chars(base), shape))
    if dt.names is None:
        return dt
    fields: dict[str, Any] = dict(dt.fields or {})
    return np.dtype({"names": list(dt.names),
                     "formats": [_fix_chars(fields[n][0]) for n in dt.names],
                     "offsets": [fields[n][1] for n in dt.names], "itemsize": dt.itemsize})


def bcc_map_types(bpf: Any, lib: Any) -> list[MapType]:
    """Every table of a loaded bcc.BPF (`lib`: libbcc), by the name the program declared."""
    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.bpf_table_fd.restype, lib.bpf_table_fd.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]
    out = []
    for i in range(int(lib.bpf_num_tables(bpf.module))):
        raw = lib.bpf_table_name(bpf.module, i)
        name = raw.decode() if raw else ""
        if not name or name in HIDDEN:
            continue
        try:
            table = bpf[name.encode()]
        except Exception:
            # types it cannot wrap (a per-CPU value not 8-byte aligned, a map type it lacks); the
            # map is there all the same: its fd from libbcc, its types untyped
            fd = int(lib.bpf_table_fd(bpf.module, name.encode()))
            if fd >= 0:
                out.append(MapType(name, fd, None, None))
            continue
        key = getattr(table, "Key", None)
        leaf = getattr(table, "sLeaf", None) or getattr(table, "Leaf", None)  # per-CPU: one CPU's
        out.append(MapType(name, int(table.get_fd()),
                           ctypes_dtype(key) if key is not None else None,
                           ctypes_dtype(leaf) if leaf is not None else None))
    return out


def _sized(types: _btf.Types, type_id: int, size: int) -> np.dtype | None:
    """The dtype of BTF type `type_id` if it is one and has `size` bytes."""
    if not type_id or type_id not in types.by_id:
        return None
    try:
        dt = types.dtype(types.resolve(type_id), "map")
    except Exception:  # a type no column can show (pointer to function, ...): raw bytes then
        return None
    return dt if dt.itemsize == size else None


def core_map_types(maps: list[libbpf.Map], types: _btf.Types, objfile: Any) -> list[MapType]:
    """Every map of a loaded CO-RE object; internal maps as `.bss`/`.data`/`.rodata`."""
    syms: dict[str, elf.Symbol] | None = None
    out = []
    for m in maps:
        if m.name in HIDDEN:
            continue
        fd = m.fd
        section = next((s for s in INTERNAL if m.name.endswith(s)), None)
        if section is None:
            if "." in m.name:  # .kconfig, .rodata.str1.1: libbpf's, not the program's
                continue
            out.append(MapType(m.name, fd, _sized(types, m.btf_key_type_id, m.key_size),
                               _sized(types, m.btf_value_type_id, m.value_size)))
            continue
        if syms is None:
            syms = elf.symbols(objfile)
        found = []  # (offset, name, dtype): the section's variables, kernelscope's own left out
        for s in syms.values():
            var = types.var(s.name)
            if s.section != section or not s.size or s.name.startswith(OWN_PREFIX) or var is None:
                continue
            dt = _sized(types, var["type_id"], s.size)
            found.append((s.offset, s.name, dt if dt is not None else np.dtype(f"V{s.size}")))
        if not found:  # only kernelscope's type anchors: not the program's
            continue
        found.sort(key=lambda f: f[0])
        value = np.dtype({"names": [f[1] for f in found], "formats": [f[2] for f in found],
                          "offsets": [f[0] for f in found], "itemsize": m.value_size})
        out.append(MapType(section, fd, np.dtype("<u4"), value))
    return out
