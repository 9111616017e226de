"""`probe.globals`: a CO-RE program's global variables by name, read and written at run time.

libbpf keeps a program's globals in array maps of one element, `.bss` (zero-initialised),
`.data` and `.rodata` (`const volatile`, frozen by the kernel after load), each variable at
its ELF offset in the value (kernelscope.backends.maptypes builds the value dtype from that).
Reads and writes go through an mmap of the map (libbpf creates these maps BPF_F_MMAPABLE),
so writing one variable cannot overwrite another that the program changes meanwhile; a map
that cannot be mapped is read and written whole (lookup, then update).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, MutableMapping
from typing import Any

import numpy as np

from ..errors import ClosedError, KernelscopeError, UnknownNameError
from . import syscall, types
from .table import Maps

SECTIONS = (".bss", ".data", ".rodata")
BPF_F_MMAPABLE = 1 << 10
BCC_INSTEAD = ("BCC programs have no global variables kernelscope can reach: keep the value in a "
               "one-element array, BPF_ARRAY(targ, u32, 1), read it with `targ.lookup(&zero)` in the "
               "program, and set it with probe.maps['targ'].update(0, value)")


def value_of(arr: np.ndarray) -> Any:
    """A variable as Python: int/float, str for char[], numpy for arrays and structs."""
    dt = arr.dtype
    if dt.kind == "S":
        return types.python(arr)
    if dt.names or arr.ndim or dt.kind == "V":
        return arr.copy()
    return arr.item()


class Globals(MutableMapping[str, Any]):
    """Global variables of the program by name (kernelscope's own left out)."""

    def __init__(self, maps: Maps, backend: str) -> None:
        self._maps = maps
        self._backend = backend

    def _where(self) -> dict[str, tuple[str, int, np.dtype]]:
        """name -> (section, offset, dtype)."""
        if self._backend == "bcc":
            raise KernelscopeError(BCC_INSTEAD)
        out = {}
        for section in SECTIONS:
            if section not in self._maps:
                continue
            dt = self._maps[section].value_dtype
            fields = dt.fields or {}
            for name in dt.names or ():
                out[name] = (section, int(fields[name][1]), fields[name][0])
        return out

    def _find(self, name: str) -> tuple[str, int, np.dtype]:
        where = self._where()
        if name not in where:
            raise UnknownNameError(f"no global variable {name!r} in the program (globals: "
                                   f"{', '.join(where) or 'none'})")
        return where[name]

    def __getitem__(self, name: str) -> Any:
        section, offset, dt = self._find(name)
        m = self._maps[section]
        snap = self._maps.snapshot(section)
        fd = m.fd
        if snap is None and fd is not None and self._mappable(fd):
            with self._mapped(fd, m.value_size, write=False) as mem:
                data = bytes(mem[offset: offset + dt.itemsize])
        else:
            value = m.read().values
            if not len(value):
                raise KernelscopeError(f"{section} holds no value")
            data = value[0, offset: offset + dt.itemsize].tobytes()
        # through a one-field struct: numpy cannot view bytes as an array type (int arr[4]) itself
        return value_of(np.frombuffer(data, np.dtype([("v", dt)]))[0]["v"])

    def __setitem__(self, name: str, value: Any) -> None:
        section, offset, dt = self._find(name)
        if section == ".rodata":
            raise KernelscopeError(f"{name} is a `const volatile` global (.rodata): the kernel froze it at "
                                   f"load. Set it before load with Probe(..., globals={{{name!r}: ...}}), or "
                                   "declare it without `const` to change it at run time")
        m = self._maps[section]
        fd = m.fd
        if fd is None:
            raise ClosedError(f"{name}: writing a global needs the loaded program "
                                   + ("(this is a replay)" if self._maps.replay else "(the probe is closed)"))
        data = types.encode(value, dt, f"global {name}")
        if self._mappable(fd):
            with self._mapped(fd, m.value_size, write=True) as mem:
                mem[offset: offset + len(data)] = data
        else:
            raw = syscall.lookup(fd, bytes(4), m.value_size)
            if raw is None:
                raise KernelscopeError(f"{section} holds no value")
            raw = raw[:offset] + data + raw[offset + len(data):]
            syscall.update(fd, bytes(4), raw)
        self._maps.refresh(section)

    @staticmethod
    def _mappable(fd: int) -> bool:
        return bool(syscall.info(fd).flags & BPF_F_MMAPABLE)

    @staticmethod
    def _mapped(fd: int, size: int, write: bool) -> mmap.mmap:
        length = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
        return mmap.mmap(fd, length, mmap.MAP_SHARED, prot)

    def __delitem__(self, name: str) -> None:
        raise KernelscopeError(f"global {name!r} cannot be deleted; set it to 0 instead")

    def __iter__(self) -> Iterator[str]:
        return iter(self._where())

    def __len__(self) -> int:
        return len(self._where())

    def __repr__(self) -> str:
        try:
            return "Globals(" + ", ".join(f"{n}={self[n]!r}" for n in self) + ")"
        except (KernelscopeError, OSError) as e:
            return f"<Globals: {e}>"

