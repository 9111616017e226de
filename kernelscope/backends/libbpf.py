"""A small ctypes layer over Debian's libbpf (libbpf.so.1, 1.1+): objects, maps, programs, links.

No maintained Python binding of libbpf exists (PyPI's candidates are unmaintained or wrap
a vendored libbpf), and kernelscope needs only a few dozen calls: open an object file,
size its maps, set its globals, load, attach each program by its SEC() name, read and
write map elements. (User ring buffers are written by kernelscope.readers.user_ring directly.)
libbpf >= 1.0 returns NULL or a negative errno and sets errno on failure; every wrapper
here turns that into an OSError with libbpf's words.
libbpf reports verifier logs and CO-RE relocation failures through its print callback;
`captured_log()` installs kernelscope's own for the duration of a call (BCC, which loads
the same libbpf.so.1, installs its own callback whenever it loads a program).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno as _errno
import os
import sys
import threading
from collections.abc import Iterator
from functools import cache
from typing import Any

from ..errors import SetupError

c_void_p, c_char_p, c_int, c_uint, c_size_t = (
    ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_size_t)

# enum bpf_map_type (include/uapi/linux/bpf.h): the one table of map kinds (kernelscope.maps too)
MAP_TYPES = {
    1: "hash", 2: "array", 3: "prog_array", 4: "perf_event_array", 5: "percpu_hash",
    6: "percpu_array", 7: "stack_trace", 8: "cgroup_array", 9: "lru_hash", 10: "lru_percpu_hash",
    11: "lpm_trie", 12: "array_of_maps", 13: "hash_of_maps", 14: "devmap", 15: "sockmap",
    16: "cpumap", 17: "xskmap", 18: "sockhash", 19: "cgroup_storage", 20: "reuseport_sockarray",
    21: "percpu_cgroup_storage", 22: "queue", 23: "stack", 24: "sk_storage", 25: "devmap_hash",
    26: "struct_ops", 27: "ringbuf", 28: "inode_storage", 29: "task_storage", 30: "bloom_filter",
    31: "user_ringbuf", 32: "cgrp_storage",
}
PERCPU_MAP_TYPES = {5, 6, 10, 21}  # percpu hash, percpu array, lru percpu hash, percpu cgroup storage
PERCPU_KINDS = {MAP_TYPES[t] for t in PERCPU_MAP_TYPES}
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_MAP_TYPE_RINGBUF = 27
BPF_MAP_TYPE_USER_RINGBUF = 31

_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "libbpf_major_version": (c_uint, []),
    "libbpf_minor_version": (c_uint, []),
    "libbpf_num_possible_cpus": (c_int, []),
    "libbpf_set_print": (c_void_p, [c_void_p]),
    "bpf_object__open_file": (c_void_p, [c_char_p, c_void_p]),
    "bpf_object__load": (c_int, [c_void_p]),
    "bpf_object__close": (None, [c_void_p]),
    "bpf_object__next_map": (c_void_p, [c_void_p, c_void_p]),
    "bpf_object__next_program": (c_void_p, [c_void_p, c_void_p]),
    "bpf_map__name": (c_char_p, [c_void_p]),
    "bpf_map__type": (c_int, [c_void_p]),
    "bpf_map__fd": (c_int, [c_void_p]),
    "bpf_map__max_entries": (c_uint, [c_void_p]),
    "bpf_map__set_max_entries": (c_int, [c_void_p, c_uint]),
    "bpf_map__value_size": (c_uint, [c_void_p]),
    "bpf_map__key_size": (c_uint, [c_void_p]),
    "bpf_map__btf_key_type_id": (ctypes.c_uint32, [c_void_p]),
    "bpf_map__btf_value_type_id": (ctypes.c_uint32, [c_void_p]),
    "bpf_map__initial_value": (c_void_p, [c_void_p, ctypes.POINTER(c_size_t)]),
    "bpf_map_update_batch": (c_int, [c_int, c_void_p, c_void_p, ctypes.POINTER(ctypes.c_uint32), c_void_p]),
    "bpf_program__name": (c_char_p, [c_void_p]),
    "bpf_program__section_name": (c_char_p, [c_void_p]),
    "bpf_program__set_log_level": (c_int, [c_void_p, c_uint]),
    "bpf_program__set_log_buf": (c_int, [c_void_p, c_void_p, c_size_t]),
    "bpf_program__attach": (c_void_p, [c_void_p]),
    "bpf_program__attach_tracepoint": (c_void_p, [c_void_p, c_char_p, c_char_p]),
    "bpf_program__attach_uprobe_opts": (c_void_p, [c_void_p, c_int, c_char_p, c_size_t, c_void_p]),
    "bpf_link__destroy": (c_int, [c_void_p]),
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, ctypes.c_uint64]),
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    # element access on any map fd (kernelscope.maps.syscall)
    "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_map_lookup_and_delete_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_lookup_batch": (c_int, [c_int, c_void_p, c_void_p, c_void_p, c_void_p,
                                     ctypes.POINTER(ctypes.c_uint32), c_void_p]),
    "bpf_map_lookup_and_delete_batch": (c_int, [c_int, c_void_p, c_void_p, c_void_p, c_void_p,
                                                ctypes.POINTER(ctypes.c_uint32), c_void_p]),
    "bpf_map_delete_batch": (c_int, [c_int, c_void_p, ctypes.POINTER(ctypes.c_uint32), c_void_p]),
    "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, ctypes.POINTER(ctypes.c_uint32)]),
}


@cache
def lib() -> Any:
    """libbpf.so.1 with argument and result types set; SetupError naming the package if absent."""
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        so = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise SetupError(f"libbpf is not installed ({e}): apt-get install libbpf1 libbpf-dev") from None
    missing = []
    for fn, (restype, argtypes) in _SIGNATURES.items():
        f = getattr(so, fn, None)
        if f is None:
            missing.append(fn)
            continue
        f.restype, f.argtypes = restype, argtypes
    if missing:
        raise SetupError(
            f"{name} is too old for kernelscope's CO-RE backend (lacks {', '.join(missing[:3])}); "
            "libbpf 1.1 or later is needed"
        )
    return so


LIBBPF_DEBUG = 2  # enum libbpf_print_level: WARN 0, INFO 1, DEBUG 2
_PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_void_p, c_void_p)  # (level, fmt, va_list)
_tls = threading.local()


@cache
def _libc() -> Any:
    libc = ctypes.CDLL(None)
    libc.vasprintf.argtypes = [ctypes.POINTER(c_void_p), c_void_p, c_void_p]
    libc.vasprintf.restype = c_int
    libc.free.argtypes = [c_void_p]
    return libc


def _on_print(level: int, fmt: int, args: int) -> int:
    if level >= LIBBPF_DEBUG:
        return 0
    out = c_void_p()
    n = _libc().vasprintf(ctypes.byref(out), fmt, args)  # x86_64/arm64: va_list passes as a pointer
    if n < 0 or not out.value:
        return 0
    text = ctypes.string_at(out.value, n).decode("utf-8", "replace")
    _libc().free(out)
    sinks = getattr(_tls, "sinks", None)
    if sinks:
        sinks[-1].append(text)
    else:
        sys.stderr.write(text)
    return 0


_CALLBACK = _PRINT_FN(_on_print)


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    """Collect libbpf's warnings (verifier log, relocation errors) printed during the block."""
    sinks = getattr(_tls, "sinks", None)
    if sinks is None:
        sinks = _tls.sinks = []
    out: list[str] = []
    sinks.append(out)
    lib().libbpf_set_print(ctypes.cast(_CALLBACK, c_void_p))
    try:
        yield out
    finally:
        sinks.pop()


def version() -> str:
    so = lib()
    return f"{so.libbpf_major_version()}.{so.libbpf_minor_version()}"


def possible_cpus() -> int:
    n = int(lib().libbpf_num_possible_cpus())
    if n <= 0:
        raise _oserror(-n, "libbpf_num_possible_cpus")
    return n


def _oserror(err: int, what: str) -> OSError:
    err = abs(err) or _errno.EINVAL
    return OSError(err, f"{what}: {os.strerror(err)}")


def check(ret: int, what: str) -> int:
    if ret < 0:
        raise _oserror(ret, what)
    return ret


def check_ptr(ptr: int | None, what: str) -> int:
    if not ptr:
        raise _oserror(ctypes.get_errno(), what)
    return ptr


class UprobeOpts(ctypes.Structure):
    """struct bpf_uprobe_opts (libbpf.h, 1.1)."""

    _fields_ = [("sz", c_size_t), ("ref_ctr_offset", c_size_t), ("bpf_cookie", ctypes.c_uint64),
                ("retprobe", ctypes.c_bool), ("func_name", c_char_p)]


class Map:
    """A map of an open object (pointer into libbpf's bpf_object; valid until it closes)."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr
        so = lib()
        self.name: str = so.bpf_map__name(ptr).decode()
        self.type: int = so.bpf_map__type(ptr)

    @property
    def kind(self) -> str:
        return MAP_TYPES.get(self.type, f"type {self.type}")

    @property
    def fd(self) -> int:
        return int(lib().bpf_map__fd(self.ptr))

    @property
    def key_size(self) -> int:
        return int(lib().bpf_map__key_size(self.ptr))

    @property
    def value_size(self) -> int:
        return int(lib().bpf_map__value_size(self.ptr))

    @property
    def max_entries(self) -> int:
        return int(lib().bpf_map__max_entries(self.ptr))

    @property
    def btf_key_type_id(self) -> int:
        return int(lib().bpf_map__btf_key_type_id(self.ptr))

    @property
    def btf_value_type_id(self) -> int:
        return int(lib().bpf_map__btf_value_type_id(self.ptr))

    def initial_value(self) -> tuple[int, int]:
        """(address, size) of a global-data map's contents before load (what skeletons write to)."""
        size = c_size_t()
        ptr = check_ptr(lib().bpf_map__initial_value(self.ptr, ctypes.byref(size)),
                        f"{self.name}: initial value")
        return ptr, int(size.value)

    def set_max_entries(self, n: int) -> None:
        check(lib().bpf_map__set_max_entries(self.ptr, n), f"{self.name}: set max_entries {n}")


class Program:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr
        so = lib()
        self.name: str = so.bpf_program__name(ptr).decode()
        self.section: str = so.bpf_program__section_name(ptr).decode()


class Object:
    """A BPF object file opened with libbpf: maps and programs, load, close."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.ptr: int | None = check_ptr(lib().bpf_object__open_file(os.fsencode(path), None),
                                         f"open {path}")
        self.links: list[tuple[str, int]] = []  # (attach point, bpf_link *)
        self._logs: dict[str, Any] = {}

    def _each(self, next_fn: Any) -> list[int]:
        """Pointers from libbpf's `bpf_object__next_*(obj, prev)` iteration, in order."""
        out: list[int] = []
        item = None
        while item := next_fn(self.ptr, item):
            out.append(item)
        return out

    def maps(self) -> list[Map]:
        return [Map(m) for m in self._each(lib().bpf_object__next_map)]

    def programs(self) -> list[Program]:
        return [Program(p) for p in self._each(lib().bpf_object__next_program)]

    def set_logs(self, level: int, size: int) -> dict[str, Any]:
        """Give every program a verifier log of `size` bytes at `level` (1: every instruction,
        4: statistics and the verdict only), before load(); program name -> its buffer.

        With a level set, libbpf loads once; left at 0 it loads without a log and, on failure,
        again with one that it doubles and reloads while the kernel says it is too small, so a
        program the verifier gives up on is verified several times over (25 s, not 1).
        """
        logs = {}
        so = lib()
        for prog in self.programs():
            buf = ctypes.create_string_buffer(size)
            check(so.bpf_program__set_log_level(prog.ptr, level), f"{prog.name}: log level")
            check(so.bpf_program__set_log_buf(prog.ptr, buf, size), f"{prog.name}: log buffer")
            logs[prog.name] = buf
        self._logs = logs  # libbpf writes into them: they live as long as the object
        return logs

    def load(self) -> None:
        check(lib().bpf_object__load(self.ptr), "load")

    def attach(self, prog: Program, point: str) -> None:
        link = check_ptr(lib().bpf_program__attach(prog.ptr), f"attach {prog.name} ({prog.section})")
        self.links.append((point, link))

    def attach_tracepoint(self, prog: Program, category: str, event: str) -> None:
        link = check_ptr(
            lib().bpf_program__attach_tracepoint(prog.ptr, category.encode(), event.encode()),
            f"attach {prog.name} to tracepoint {category}:{event}",
        )
        self.links.append((f"tracepoint:{category}:{event}", link))

    def attach_uprobe(self, prog: Program, binary: str, func: str = "", offset: int = 0, *, pid: int = -1,
                      retprobe: bool = False) -> None:
        """Attach to `func` (libbpf resolves the ELF symbol) plus `offset`, in `binary`."""
        opts = UprobeOpts(ctypes.sizeof(UprobeOpts), 0, 0, retprobe, func.encode() if func else None)
        label = f"{binary}:{func or hex(offset)}"
        link = check_ptr(
            lib().bpf_program__attach_uprobe_opts(prog.ptr, pid, binary.encode(), offset, ctypes.byref(opts)),
            f"attach {prog.name} to uprobe {label}",
        )
        self.links.append((f"{'uretprobe' if retprobe else 'uprobe'}:{label}", link))

    def close(self) -> None:
        so = lib()
        for _, link in self.links:
            so.bpf_link__destroy(link)
        self.links.clear()
        if self.ptr:
            so.bpf_object__close(self.ptr)
            self.ptr = None


def map_update(fd: int, key: bytes, value: bytes, what: str = "map update") -> None:
    """One BPF_MAP_UPDATE_ELEM syscall."""
    ret = lib().bpf_map_update_elem(fd, key, value, 0)
    if ret < 0:
        raise _oserror(ctypes.get_errno() or -ret, what)


def map_lookup(fd: int, key: bytes, size: int, what: str = "map lookup") -> bytes:
    """One BPF_MAP_LOOKUP_ELEM syscall; `size` bytes of value (all CPUs' for per-CPU maps)."""
    value = ctypes.create_string_buffer(size)
    ret = lib().bpf_map_lookup_elem(fd, key, value)
    if ret < 0:
        raise _oserror(ctypes.get_errno() or -ret, what)
    return value.raw


def map_update_batch(fd: int, keys: bytes, values: bytes, count: int, what: str = "batch update") -> int:
    """One BPF_MAP_UPDATE_BATCH syscall (Linux 5.6) for `count` packed keys and values."""
    n = ctypes.c_uint32(count)
    ret = lib().bpf_map_update_batch(fd, keys, values, ctypes.byref(n), None)
    if ret < 0:
        raise _oserror(ctypes.get_errno() or -ret, f"{what} ({n.value} of {count} done)")
    return int(n.value)


# --- program selection and map sizing (bpf_program__set_autoload, bpf_map__set_value_size) ----

_SIGNATURES.update({
    "bpf_program__autoload": (ctypes.c_bool, [c_void_p]),
    "bpf_program__set_autoload": (c_int, [c_void_p, ctypes.c_bool]),
    "bpf_map__set_value_size": (c_int, [c_void_p, ctypes.c_uint32]),
})


def autoload(prog: Program) -> bool:
    """Whether libbpf will load `prog` (False for SEC("?...") and after set_autoload(False))."""
    return bool(lib().bpf_program__autoload(prog.ptr))


def set_autoload(prog: Program, on: bool) -> None:
    """Load `prog` with the object or not (before load, as a tool's loader does)."""
    check(lib().bpf_program__set_autoload(prog.ptr, on), f"{prog.name}: set autoload")


def set_value_size(m: Map, n: int) -> None:
    check(lib().bpf_map__set_value_size(m.ptr, n), f"{m.name}: set value_size {n}")


# --- attach kinds (kernelscope.backends.attach): perf events, USDT, iterators, links -------

class LinkCreateOpts(ctypes.Structure):
    """struct bpf_link_create_opts (bpf.h, libbpf 1.1): sz, flags, then fields left zero."""

    _fields_ = [("sz", c_size_t), ("flags", ctypes.c_uint32), ("iter_info", c_void_p),
                ("iter_info_len", ctypes.c_uint32), ("target_btf_id", ctypes.c_uint32),
                ("_union", ctypes.c_uint64 * 4)]


BPF_TC_INGRESS, BPF_TC_EGRESS = 1, 2  # enum bpf_tc_attach_point


class TcHook(ctypes.Structure):
    """struct bpf_tc_hook (libbpf.h): the clsact qdisc of one interface."""

    _fields_ = [("sz", c_size_t), ("ifindex", c_int), ("attach_point", c_int), ("parent", ctypes.c_uint32)]


class TcOpts(ctypes.Structure):
    """struct bpf_tc_opts (libbpf.h): one filter; bpf_tc_attach fills handle and priority."""

    _fields_ = [("sz", c_size_t), ("prog_fd", c_int), ("flags", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("handle", ctypes.c_uint32), ("priority", ctypes.c_uint32)]


_ATTACH_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "bpf_program__fd": (c_int, [c_void_p]),
    "bpf_program__attach_perf_event": (c_void_p, [c_void_p, c_int]),
    "bpf_program__attach_usdt": (c_void_p, [c_void_p, c_int, c_char_p, c_char_p, c_char_p, c_void_p]),
    "bpf_program__attach_iter": (c_void_p, [c_void_p, c_void_p]),
    "bpf_link__fd": (c_int, [c_void_p]),
    "bpf_link_create": (c_int, [c_int, c_int, c_int, c_void_p]),
    "bpf_iter_create": (c_int, [c_int]),
    "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, ctypes.POINTER(ctypes.c_uint32)]),
    "bpf_link_update": (c_int, [c_int, c_int, c_void_p]),
    "bpf_tc_hook_create": (c_int, [c_void_p]),
    "bpf_tc_attach": (c_int, [c_void_p, c_void_p]),
    "bpf_tc_detach": (c_int, [c_void_p, c_void_p]),
}
_SIGNATURES.update(_ATTACH_SIGNATURES)
