"""The function symbols of one ELF object (executable or shared library), found by ELF address.

pyelftools reads the structure (section and program headers, notes); the symbol tables
themselves (.symtab and .dynsym) are read as numpy arrays of Elf64_Sym, so a libc's few
thousand symbols load in milliseconds. A process maps an object by FILE OFFSET; the PT_LOAD
program headers say which ELF virtual address each file offset is loaded as, which is what
symbols are keyed by, for position-independent objects and fixed-address executables alike.
The GNU build-id (.note.gnu.build-id) names the object's contents: objects with the same
build-id have the same symbols, so it is the cache key.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection, SymbolTableSection

from ..errors import KernelscopeError
from . import inline

ELF64_SYM = np.dtype([("st_name", "<u4"), ("st_info", "u1"), ("st_other", "u1"), ("st_shndx", "<u2"),
                      ("st_value", "<u8"), ("st_size", "<u8")])
STT_FUNC, STT_GNU_IFUNC = 2, 10


class ElfSymbolError(KernelscopeError):
    """A file is not an ELF object kernelscope can read symbols from."""


@dataclass(frozen=True)
class Segment:
    """A PT_LOAD program header: file bytes [offset, offset+filesz) load at vaddr."""

    offset: int
    vaddr: int
    filesz: int


@dataclass(eq=False)
class ElfSymbols:
    """Sorted function symbols (start, size, name) of one object, and its load segments."""

    path: str
    build_id: str
    segments: list[Segment]
    starts: np.ndarray
    sizes: np.ndarray
    names: list[str]
    pie: bool  # ET_DYN: a shared library or a position-independent executable
    inline: inline.InlineRanges | None = None  # inlined calls, from DWARF when it is there

    def inlined(self, vaddr: int) -> tuple[str, ...]:
        """Functions inlined at `vaddr`, outermost first (() without DWARF)."""
        return () if self.inline is None else self.inline.at(vaddr)

    def vaddr(self, file_offset: int) -> int | None:
        """The ELF virtual address file byte `file_offset` is loaded as (None: in no PT_LOAD)."""
        for s in self.segments:
            if s.offset <= file_offset < s.offset + max(s.filesz, 1):
                return file_offset - s.offset + s.vaddr
        return None

    def lookup(self, vaddr: int) -> tuple[str, int] | None:
        """(symbol, offset into it) for an ELF virtual address, or None. A symbol of size 0
        (hand-written assembly) covers up to the next symbol."""
        i = int(np.searchsorted(self.starts, np.uint64(vaddr), side="right")) - 1
        if i < 0:
            return None
        off = vaddr - int(self.starts[i])
        size = int(self.sizes[i])
        if size and off >= size:
            return None
        return self.names[i], off

    def address_of(self, name: str) -> int | None:
        try:
            return int(self.starts[self.names.index(name)])
        except ValueError:
            return None


def read(data: bytes, path: str) -> ElfSymbols:
    """The symbols of the ELF object whose bytes are `data` (`path` only names it)."""
    try:
        elf = ELFFile(io.BytesIO(data))
        segments = [Segment(int(seg["p_offset"]), int(seg["p_vaddr"]), int(seg["p_filesz"]))
                    for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
        build_id = _build_id(elf) or "sha1:" + hashlib.sha1(data).hexdigest()
        starts, sizes, names = _functions(elf, data)
        pie = elf["e_type"] == "ET_DYN"
    except (ELFError, ValueError, KeyError) as e:
        raise ElfSymbolError(f"{path}: not an ELF object kernelscope can read ({e})") from e
    return ElfSymbols(path, build_id, segments, starts, sizes, names, pie, inline.read(elf))


def _build_id(elf: ELFFile) -> str | None:
    for sec in elf.iter_sections():
        if isinstance(sec, NoteSection):
            for note in sec.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return str(note["n_desc"])
    return None


def _functions(elf: ELFFile, data: bytes) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Defined FUNC/IFUNC symbols of .symtab and .dynsym, sorted by address, one name per
    address: of aliases (getpid and __getpid), the one with the fewest leading underscores."""
    starts: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    names: list[str] = []
    for secname in (".symtab", ".dynsym"):
        sec = elf.get_section_by_name(secname)
        if not isinstance(sec, SymbolTableSection) or sec["sh_type"] == "SHT_NOBITS":
            continue
        strtab = elf.get_section(sec["sh_link"])
        strings = data[strtab["sh_offset"]:strtab["sh_offset"] + strtab["sh_size"]]
        raw = data[sec["sh_offset"]:sec["sh_offset"] + sec["sh_size"]]
        if elf.elfclass == 64 and elf.little_endian:
            syms = np.frombuffer(raw[: len(raw) // ELF64_SYM.itemsize * ELF64_SYM.itemsize], ELF64_SYM)
        else:  # ELF32 or big-endian: pyelftools' own parser (slower, rare here)
            syms = np.array([(s["st_name"], _info(s), 0, _shndx(s), s["st_value"], s["st_size"])
                             for s in sec.iter_symbols()], dtype=ELF64_SYM)
        kind = syms["st_info"] & 0xF
        keep = syms[((kind == STT_FUNC) | (kind == STT_GNU_IFUNC)) & (syms["st_shndx"] != 0)
                    & (syms["st_value"] != 0)]
        starts.append(keep["st_value"])
        sizes.append(keep["st_size"])
        for off in keep["st_name"].tolist():
            end = strings.find(b"\0", off)
            names.append(strings[off:end if end >= 0 else None].decode("utf-8", "replace"))
    if not starts:
        return np.empty(0, np.uint64), np.empty(0, np.uint64), []
    start = np.concatenate(starts)
    size = np.concatenate(sizes)
    underscores = np.array([len(n) - len(n.lstrip("_")) for n in names], dtype=np.int64)
    order = np.lexsort((underscores, start))
    start, size = start[order], size[order]
    first = np.ones(len(start), bool)
    first[1:] = start[1:] != start[:-1]  # aliases (memcpy@@GLIBC, __memcpy): the first name
    keep_idx = order[first]
    return start[first], size[first], [names[i] for i in keep_idx.tolist()]


def _info(sym: object) -> int:
    info = sym["st_info"]  # type: ignore[index]
    types = {"STT_FUNC": STT_FUNC, "STT_GNU_IFUNC": STT_GNU_IFUNC}
    return types.get(info["type"], 0)


def _shndx(sym: object) -> int:
    shndx = sym["st_shndx"]  # type: ignore[index]
    return 0 if shndx == "SHN_UNDEF" else 1


# --- the per-build-id cache ---------------------------------------------------------------

CACHE_OBJECTS = 256  # objects kept (least recently used dropped): a snapshot keeps its own
_cache: OrderedDict[str, ElfSymbols] = OrderedDict()
_by_file: OrderedDict[tuple[int, int, int, int], ElfSymbols] = OrderedDict()
_lock = threading.Lock()


def _keep(table: OrderedDict[Any, ElfSymbols], key: Any, syms: ElfSymbols) -> ElfSymbols:
    """`table[key]` (the existing entry if there is one), most recently used, within the bound."""
    syms = table.setdefault(key, syms)
    table.move_to_end(key)
    while len(table) > CACHE_OBJECTS:
        table.popitem(last=False)
    return syms


def load_fd(fd: int, path: str) -> ElfSymbols:
    """The symbols of the object open at `fd`: parsed once per build-id (a file seen before,
    same device, inode, size and mtime, is not even read again)."""
    st = os.fstat(fd)
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _lock:
        if ident in _by_file:
            return _keep(_by_file, ident, _by_file[ident])
    with os.fdopen(os.dup(fd), "rb") as f:
        data = f.read()
    syms = read(data, path)
    with _lock:
        syms = _keep(_cache, syms.build_id, syms)
        return _keep(_by_file, ident, syms)


def load(path: str) -> ElfSymbols:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return load_fd(fd, path)
    finally:
        os.close(fd)


def cached(build_id: str) -> ElfSymbols | None:
    return _cache.get(build_id)
