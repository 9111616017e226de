"""The symbol table of an ELF64 object file: where each global lives (section, offset, size).

libbpf-style programs are configured through `const volatile` globals (`.rodata`), which
user space sets between open and load. libbpf knows the layout, but exposes it through
its BTF API; the object's symbol table says the same in a few lines of `struct` parsing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import KernelscopeError

SHT_SYMTAB = 2


@dataclass(frozen=True)
class Symbol:
    name: str
    section: str
    offset: int
    size: int


def symbols(path: str | Path) -> dict[str, Symbol]:
    """Named data/function symbols of a little-endian ELF64 relocatable object."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise KernelscopeError(f"{path}: not a little-endian ELF64 object")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def string(table: int, offset: int) -> str:
        start = sections[table][4] + offset
        return data[start:data.index(b"\0", start)].decode()

    names = [string(shstrndx, s[0]) for s in sections]
    out: dict[str, Symbol] = {}
    for s in sections:
        if s[1] != SHT_SYMTAB:
            continue
        strtab, entsize = s[6], s[9] or 24
        for off in range(s[4], s[4] + s[5], entsize):
            st_name, _info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", data, off)
            if st_name and 0 < shndx < len(names):
                name = string(strtab, st_name)
                out[name] = Symbol(name, names[shndx], value, size)
    return out
