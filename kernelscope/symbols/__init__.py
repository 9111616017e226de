"""Names for the addresses in stack traces: kernel symbols (/proc/kallsyms) and user symbols
(a process's ELF objects, found through /proc/PID/maps), captured while processes live.

    ks = symbols.kernel()                 # KernelSymbols, cached; symbols.kernel(refresh=True)
    ks.resolve(addr).name                 # 'do_sys_openat2'
    snap = symbols.snapshot([pid])        # while the process runs
    snap.resolve(pid, addr).name          # 'burn', also after the process exited
"""

from __future__ import annotations

import threading
import time

from .elf import ElfSymbolError, ElfSymbols
from .kallsyms import KallsymsError, KernelSymbols, Resolved
from .process import Mapping, ProcessSymbols, Snapshot, parse_maps, snapshot

__all__ = ["ElfSymbolError", "ElfSymbols", "KallsymsError", "KernelSymbols", "Mapping", "ProcessSymbols",
           "Resolved", "Snapshot", "kernel", "parse_maps", "snapshot"]

_kernel: KernelSymbols | None = None
_read_at = 0.0
_lock = threading.Lock()


def kernel(refresh: bool = False, since: float | None = None) -> KernelSymbols:
    """The kernel's text symbols, read once; again with refresh=True, or when the table was
    read before `since` (time.monotonic(): a probe's start, so its own BPF programs, which
    kallsyms lists as bpf_prog_<tag>_<name>, are in it)."""
    global _kernel, _read_at
    with _lock:
        if _kernel is None or refresh or (since is not None and _read_at < since):
            _read_at = time.monotonic()
            _kernel = KernelSymbols.load()
        return _kernel
