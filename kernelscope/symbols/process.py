"""User-space symbols of a process: its executable mappings (/proc/PID/maps) and their ELF objects.

A stack-trace map holds bare addresses; naming them needs the process's memory layout, which
is gone once the process exits. BCC's symbol cache (src/cc/bcc_syms.cc, ProcSyms) reads
/proc/PID/maps when it is first asked about a pid, and opens each object by path when first
needed, so a short-lived process that exited before its stacks are printed resolves to
"[unknown]". `snapshot(pids)` instead reads the maps and parses each object's symbols while
the process lives (objects are opened through /proc/PID/map_files, so a binary deleted or
replaced since it started, or one in another mount namespace, is still the one mapped), and
keeps them for later.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import elf
from .kallsyms import Resolved


@dataclass(frozen=True)
class Mapping:
    """One executable mapping: [start, end) maps file bytes from `offset` of `path`."""

    start: int
    end: int
    offset: int
    path: str


def parse_maps(text: str) -> list[Mapping]:
    """The executable file-backed mappings of a /proc/PID/maps text ([vdso] kept, by name)."""
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or "x" not in parts[1]:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append(Mapping(lo, hi, int(parts[2], 16), parts[5].strip()))
    return out


@dataclass
class ProcessSymbols:
    """One process's executable mappings and, for those that are ELF files, their symbols."""

    pid: int
    comm: str
    mappings: list[Mapping]
    objects: dict[str, elf.ElfSymbols | None] = field(default_factory=dict)  # path -> symbols
    errors: dict[str, str] = field(default_factory=dict)  # path -> why it has no symbols

    @classmethod
    def read(cls, pid: int) -> ProcessSymbols:
        """Read /proc/PID/maps and parse every mapped object now (raises OSError when the
        process is gone)."""
        with open(f"/proc/{pid}/maps") as f:
            maps = parse_maps(f.read())
        comm = ""
        with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        me = cls(pid, comm, maps)
        for m in maps:
            if m.path in me.objects:
                continue
            if m.path.startswith("/"):
                me.objects[m.path] = me._open(m)
            elif m.path == "[vdso]":
                me.objects[m.path] = me._vdso(m)
        return me

    def _vdso(self, m: Mapping) -> elf.ElfSymbols | None:
        """The vDSO (clock_gettime, gettimeofday ...): an ELF image the kernel maps into every
        process, read from its memory."""
        try:
            with open(f"/proc/{self.pid}/mem", "rb") as f:
                f.seek(m.start)
                return elf.read(f.read(m.end - m.start), "[vdso]")
        except (OSError, elf.ElfSymbolError) as e:
            self.errors[m.path] = str(e)
            return None

    def _open(self, m: Mapping) -> elf.ElfSymbols | None:
        name = m.path.removesuffix(" (deleted)")
        tries = (f"/proc/{self.pid}/map_files/{m.start:x}-{m.end:x}", f"/proc/{self.pid}/root{name}", name)
        why = ""
        for path in tries:
            try:
                return elf.load(path)
            except elf.ElfSymbolError as e:
                self.errors[m.path] = str(e)
                return None
            except OSError as e:
                why = why or f"{path}: {e.strerror}"
        self.errors[m.path] = why
        return None

    def resolve(self, address: int) -> Resolved:
        """The function at user address `address`, or a `[module+0xOFF]` placeholder."""
        for m in self.mappings:
            if m.start <= address < m.end:
                file_off = address - m.start + m.offset
                module = os.path.basename(m.path.removesuffix(" (deleted)")).strip("[]")
                syms = self.objects.get(m.path)
                vaddr = None if syms is None else syms.vaddr(file_off)
                if syms is None or vaddr is None:
                    return Resolved(address, None, module, file_off)
                hit = syms.lookup(vaddr)
                if hit is None:
                    return Resolved(address, None, module, vaddr)
                return Resolved(address, hit[0], module, hit[1], syms.inlined(vaddr))
        return Resolved(address, None, "", 0)


class Snapshot:
    """Symbols of processes captured while they lived, by pid; add more with `take()`.

    A pid captured once is kept (a later `take` of the same pid refreshes it only while it
    still runs), so stacks of a process that exited since still resolve.
    """

    def __init__(self) -> None:
        self.processes: dict[int, ProcessSymbols] = {}
        self.missed: dict[int, str] = {}  # pid -> why it could not be read

    def take(self, pids: Iterable[int]) -> Snapshot:
        for pid in {int(p) for p in pids if int(p) > 0}:
            try:
                self.processes[pid] = ProcessSymbols.read(pid)
                self.missed.pop(pid, None)
            except OSError as e:
                if pid not in self.processes:
                    self.missed[pid] = (f"/proc/{pid}/maps: {e.strerror} "
                                        "(exited before its symbols were read?)")
        return self

    def __contains__(self, pid: int) -> bool:
        return pid in self.processes

    def resolve(self, pid: int, address: int) -> Resolved:
        proc = self.processes.get(pid)
        if proc is None:
            return Resolved(address, None, "", 0)
        return proc.resolve(address)


def snapshot(pids: Iterable[int]) -> Snapshot:
    """Read the memory layout and symbols of processes `pids` now, for resolving later."""
    return Snapshot().take(pids)
