"""Names for the addresses in stack traces: kernel symbols (/proc/kallsyms) and user symbols
(a process's ELF objects, found through /proc/PID/maps), captured while processes live.

    ks = symbols.kernel()                 # KernelSymbols, cached; symbols.kernel(refresh=True)
    ks.resolve(addr).name                 # 'do_sys_openat2'
    snap = symbols.snapshot([pid])        # while the process runs
    snap.resolve(pid, addr).name          # 'burn', also after the process exited
"""

from __future__ import annotations

import threading

from .elf import ElfSymbolError, ElfSymbols
from .kallsyms import KallsymsError, KernelSymbols, Resolved
from .process import Mapping, ProcessSymbols, Snapshot, parse_maps, snapshot

__all__ = ["ElfSymbolError", "ElfSymbols", "KallsymsError", "KernelSymbols", "Mapping", "ProcessSymbols",
           "Resolved", "Snapshot", "kernel", "parse_maps", "snapshot"]

_kernel: KernelSymbols | None = None
_lock = threading.Lock()


def kernel(refresh: bool = False) -> KernelSymbols:
    """The kernel's text symbols, read once (refresh=True re-reads: BPF programs and modules
    loaded since appear)."""
    global _kernel
    with _lock:
        if _kernel is None or refresh:
            _kernel = KernelSymbols.load()
        return _kernel
