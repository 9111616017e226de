"""BTF (BPF Type Format) as bpftool prints it, and event structs from it as numpy dtypes.

A CO-RE object's .BTF section describes its own types exactly as clang laid them out, so
the dtype of a CO-RE program's events comes from there rather than from the C text: no
second declaration, no guessing at alignment, typedefs and enums resolved.
`bpftool -j btf dump file F` gives the types as JSON (Debian's bpftool package).
"""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SchemaError, SetupError
from ..schema import WIDE
from .guard import run_tool

VMLINUX = Path("/sys/kernel/btf/vmlinux")

_QUALIFIERS = ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG")


@cache
def bpftool() -> str | None:
    return shutil.which("bpftool") or next(
        (p for p in ("/usr/sbin/bpftool", "/sbin/bpftool") if Path(p).exists()), None)


def require_bpftool() -> str:
    tool = bpftool()
    if tool is None:
        raise SetupError("bpftool is not installed: apt-get install bpftool (or run `make setup`)")
    return tool


class Types:
    """The types of one BTF blob, by id and by name."""

    def __init__(self, types: list[dict[str, Any]]) -> None:
        self.by_id = {t["id"]: t for t in types}
        self.by_name: dict[tuple[str, str], dict[str, Any]] = {}
        for t in types:
            if t.get("name") not in (None, "(anon)"):
                self.by_name.setdefault((t["kind"], t["name"]), t)

    @classmethod
    def load(cls, path: str | Path) -> Types:
        proc = run_tool([require_bpftool(), "-j", "btf", "dump", "file", str(path)], text=False)
        if proc.returncode != 0:
            raise SchemaError(f"bpftool could not read the BTF of {path}: "
                              f"{proc.stderr.decode(errors='replace').strip()}")
        return cls(json.loads(proc.stdout)["types"])

    def find(self, ctype: str) -> dict[str, Any] | None:
        """`struct NAME`, `union NAME`, `enum NAME` or a typedef name."""
        words = ctype.split()
        if len(words) == 2 and words[0] in ("struct", "union", "enum"):
            return self.by_name.get((words[0].upper(), words[1]))
        return self.by_name.get(("TYPEDEF", ctype.strip()))

    def var(self, name: str) -> dict[str, Any] | None:
        return self.by_name.get(("VAR", name))

    def resolve(self, type_id: int) -> dict[str, Any]:
        """Follow typedefs and qualifiers to the underlying type."""
        t = self.by_id[type_id]
        while t["kind"] in _QUALIFIERS:
            t = self.by_id[t["type_id"]]
        return t

    def dtype(self, t: dict[str, Any], where: str = "event") -> np.dtype:
        """A numpy dtype with the C layout of type `t` (char[N] -> bytes, ready for str)."""
        while t["kind"] in _QUALIFIERS:
            t = self.by_id[t["type_id"]]
        kind = t["kind"]
        if kind == "INT":
            if t["size"] == 16:  # __int128: numpy has no 16-byte integers
                return WIDE
            if t.get("nr_bits", t["size"] * 8) != t["size"] * 8:
                raise SchemaError(f"{where}: {t['nr_bits']}-bit integers are not supported")
            signed = t.get("encoding") == "SIGNED" or (t.get("encoding") == "CHAR" and t["name"] == "char")
            return np.dtype(f"{'<i' if signed else '<u'}{t['size']}")
        if kind in {"ENUM", "ENUM64"}:
            return np.dtype(f"<{'i' if t.get('encoding') == 'SIGNED' else 'u'}{t['size']}")
        if kind == "FLOAT":
            return np.dtype(f"<f{t['size']}")
        if kind == "PTR":
            return np.dtype("<u8")
        if kind == "ARRAY":
            elem = self.resolve(t["type_id"])
            if elem["kind"] == "INT" and elem["size"] == 1 and "char" in elem["name"]:
                return np.dtype(f"S{t['nr_elems']}")
            base = self.dtype(elem, where)
            return np.dtype((base, (t["nr_elems"],))) if t["nr_elems"] else np.dtype((base, (0,)))
        if kind in {"STRUCT", "UNION"}:
            names, formats, offsets = self._members(t, where, 0)
            if not names:
                raise SchemaError(f"{where}: the event struct has no fields")
            return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                             "itemsize": t["size"]})
        raise SchemaError(f"{where}: a {kind.lower()} cannot be a column; use integers, char[N], "
                          "arrays and structs, or pass dtypes={map: numpy dtype}")

    def _members(self, t: dict[str, Any], where: str,
                 base: int) -> tuple[list[str], list[np.dtype], list[int]]:
        """Fields of a struct or union at byte offset `base`; an anonymous struct or union
        member is spliced in, as C makes its members the parent's (`e.flags` for
        `struct { union { struct {...}; ... }; } e`). Union members overlap: each is a view."""
        names: list[str] = []
        formats: list[np.dtype] = []
        offsets: list[int] = []
        for m in t.get("members", []):
            name = m["name"]
            if m.get("bitfield_size"):
                raise SchemaError(f"{where}.{name}: bitfields are not supported in event structs; "
                                  "use whole integers, or pass dtypes={map: numpy dtype}")
            sub = self.resolve(m["type_id"])
            at = base + m["bits_offset"] // 8
            if name == "(anon)" and sub["kind"] in {"STRUCT", "UNION"}:
                inner = self._members(sub, where, at)
                names += inner[0]
                formats += inner[1]
                offsets += inner[2]
                continue
            names.append(name)
            formats.append(self.dtype(sub, f"{where}.{name}"))
            offsets.append(at)
        return names, formats, offsets


# --- kfunc prototypes ----------------------------------------------------------------------

KFUNC_TAG = "bpf_kfunc"  # the decl tag pahole puts on kernel functions BPF programs may call


def kfunc_prototypes(types: Types, skip: frozenset[str] = frozenset()) -> str:
    """`extern` declarations of the kernel's kfuncs (functions tagged "bpf_kfunc" in its BTF),
    weak so that `bpf_ksym_exists(f)` is false where the kernel lacks one, for the end of a
    vmlinux.h (bpftool 7.5 writes the same; Debian's 7.1 does not). `skip`: names declared
    otherwise (libbpf's helper definitions); kfuncs whose types C cannot name are left out."""
    lines = []
    tagged = sorted({t["type_id"] for t in types.by_id.values() if t["kind"] == "DECL_TAG"
                     and t["name"] == KFUNC_TAG and t.get("component_idx", -1) == -1})
    for fid in tagged:
        fn = types.by_id.get(fid)
        if fn is None or fn["kind"] != "FUNC" or fn["name"] in skip:
            continue
        proto = types.by_id[fn["type_id"]]
        params = _params(types, proto)
        decl = None if params is None else _c_decl(types, proto["ret_type_id"], f"{fn['name']}({params})")
        if decl is not None:
            lines.append(f"extern {decl} __attribute__((weak)) __attribute__((section(\".ksyms\")));")
    return "\n".join(lines) + "\n"


def _params(types: Types, proto: dict[str, Any]) -> str | None:
    out = []
    for p in proto.get("params", []):
        if p["type_id"] == 0:
            out.append("...")
            continue
        decl = _c_decl(types, p["type_id"], "")
        if decl is None:
            return None
        out.append(decl.strip())
    return ", ".join(out) or "void"


def _c_decl(types: Types, type_id: int, inner: str) -> str | None:
    """The C declaration of `inner` (a name, `*name`, `f(int)`) with type `type_id`, or None."""
    if type_id == 0:
        return f"void {inner}"
    t = types.by_id[type_id]
    kind = t["kind"]
    named = t.get("name") not in (None, "(anon)")
    if kind in {"INT", "FLOAT", "TYPEDEF"} and named:
        return f"{t['name']} {inner}"
    if kind in {"STRUCT", "UNION", "ENUM", "ENUM64", "FWD"} and named:
        tag = {"STRUCT": "struct", "UNION": "union", "FWD": "union" if t.get("fwd_kind") == "union"
               else "struct"}.get(kind, "enum")
        return f"{tag} {t['name']} {inner}"
    if kind == "PTR":
        target = types.by_id.get(t["type_id"]) if t["type_id"] else None
        if target is not None and target["kind"] == "FUNC_PROTO":
            params = _params(types, target)
            return None if params is None else _c_decl(types, target["ret_type_id"], f"(*{inner})({params})")
        return _c_decl(types, t["type_id"], f"*{inner}")
    if kind in {"CONST", "VOLATILE"}:
        word = kind.lower()
        nxt = types.by_id.get(t["type_id"]) if t["type_id"] else None
        if nxt is not None and nxt["kind"] == "PTR":
            return _c_decl(types, t["type_id"], f"{word} {inner}")
        decl = _c_decl(types, t["type_id"], inner)
        return None if decl is None else f"{word} {decl}"
    if kind in {"TYPE_TAG", "RESTRICT"}:
        return _c_decl(types, t["type_id"], inner)
    return None
