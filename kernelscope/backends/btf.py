"""BTF (BPF Type Format) as bpftool prints it, and event structs from it as numpy dtypes.

A CO-RE object's .BTF section describes its own types exactly as clang laid them out, so
the dtype of a CO-RE program's events comes from there rather than from the C text: no
second declaration, no guessing at alignment, typedefs and enums resolved.
`bpftool -j btf dump file F` gives the types as JSON (Debian's bpftool package).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SchemaError, SetupError

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
        proc = subprocess.run([require_bpftool(), "-j", "btf", "dump", "file", str(path)],
                              capture_output=True, check=False)
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
        if kind == "STRUCT":
            names, formats, offsets = [], [], []
            for m in t.get("members", []):
                if m.get("bitfield_size"):
                    raise SchemaError(f"{where}.{m['name']}: bitfields are not supported in event structs")
                name = m["name"]
                sub = self.resolve(m["type_id"])
                if name == "(anon)":
                    raise SchemaError(f"{where}: anonymous members are not supported in event structs")
                names.append(name)
                formats.append(self.dtype(sub, f"{where}.{name}"))
                offsets.append(m["bits_offset"] // 8)
            if not names:
                raise SchemaError(f"{where}: the event struct has no fields")
            return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                             "itemsize": t["size"]})
        raise SchemaError(f"{where}: a {kind.lower()} cannot be a column; use integers, char[N], "
                          "arrays and structs, or pass dtypes={map: numpy dtype}")
