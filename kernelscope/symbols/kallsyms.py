"""Kernel symbols from /proc/kallsyms: sorted address arrays, looked up with np.searchsorted.

Each line is `ADDRESS TYPE NAME [MODULE]`; text symbols (types t/T, w/W) are kept, the module
name is the bracketed word (`[bpf]` for loaded BPF programs, `[ext4]` for a module). The kernel
prints every address as zero to a reader without CAP_SYSLOG when kptr_restrict is 1 (and to
everyone when it is 2): such a table cannot resolve anything, and KernelSymbols says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import KernelscopeError

KALLSYMS = Path("/proc/kallsyms")
TEXT_TYPES = frozenset("tTwW")
# kallsyms has no sizes: a symbol runs to the next one. An address this far past the symbol
# before it is in no function kallsyms knows (a BPF program loaded since the table was read,
# the end of a text area), and naming it after that symbol would be wrong.
MAX_OFFSET = 1 << 20


class KallsymsError(KernelscopeError):
    """/proc/kallsyms cannot resolve addresses (unreadable, or every address shown as zero)."""


@dataclass(frozen=True)
class Resolved:
    """One address resolved: `symbol` (None when unknown), `module`, `offset` from the symbol,
    `inlined`: the functions inlined there (from DWARF), outermost first."""

    address: int
    symbol: str | None
    module: str
    offset: int
    inlined: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The frame's name in a stack: the symbol, else `[module+0xOFF]` or `0xADDR`."""
        if self.symbol is not None:
            return self.symbol
        if self.module:
            return f"[{self.module}+{self.offset:#x}]"
        return f"{self.address:#x}"

    @property
    def names(self) -> tuple[str, ...]:
        """The frame's names in a stack: its function, then those inlined into it."""
        return (self.name, *self.inlined)


class KernelSymbols:
    """The kernel's text symbols at one moment (BPF programs come and go: `load()` again)."""

    def __init__(self, addresses: np.ndarray, names: list[str], modules: list[str]) -> None:
        order = np.argsort(addresses, kind="stable")
        self.addresses = addresses[order]
        self.names = [names[i] for i in order]
        self.modules = [modules[i] for i in order]

    @classmethod
    def load(cls, path: Path = KALLSYMS) -> KernelSymbols:
        try:
            text = path.read_text()
        except OSError as e:
            raise KallsymsError(f"{path}: {e.strerror}: kernel stacks cannot be named without it") from e
        addrs: list[int] = []
        names: list[str] = []
        mods: list[str] = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 3 or parts[1] not in TEXT_TYPES:
                continue
            addrs.append(int(parts[0], 16))
            names.append(parts[2])
            mods.append(parts[3].strip("[]") if len(parts) > 3 else "")
        arr = np.array(addrs, dtype=np.uint64)
        if len(arr) == 0 or not arr.any():
            raise KallsymsError(
                f"{path} shows every address as 0: the kernel hides kernel addresses from this reader "
                "(kptr_restrict, /proc/sys/kernel/kptr_restrict; CAP_SYSLOG needed when it is 1). Run as "
                "root (or with CAP_SYSLOG) to name kernel frames; they are shown as raw addresses meanwhile")
        return cls(arr, names, mods)

    def __len__(self) -> int:
        return len(self.addresses)

    def resolve(self, address: int) -> Resolved:
        """The symbol at or before `address` (kallsyms gives no sizes: a symbol runs to the next)."""
        return self.resolve_many(np.array([address], dtype=np.uint64))[0]

    def resolve_many(self, addresses: np.ndarray) -> list[Resolved]:
        addrs = np.asarray(addresses, dtype=np.uint64)
        idx = np.searchsorted(self.addresses, addrs, side="right") - 1
        out = []
        for a, i in zip(addrs.tolist(), idx.tolist(), strict=True):
            if i < 0 or a - int(self.addresses[i]) >= MAX_OFFSET:
                out.append(Resolved(a, None, "", 0))
            else:
                out.append(Resolved(a, self.names[i], self.modules[i] or "kernel",
                                    a - int(self.addresses[i])))
        return out

    def address_of(self, name: str) -> int | None:
        """The first address of text symbol `name`, or None."""
        try:
            return int(self.addresses[self.names.index(name)])
        except ValueError:
            return None
