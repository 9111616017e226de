"""Map elements through the bpf(2) syscall, on any map fd (BCC's tables and libbpf's maps alike).

libbpf.so's thin wrappers (bpf.h: `bpf_map_lookup_batch`, `bpf_map_get_next_key`, ...) are
used rather than building `union bpf_attr` here: they are the kernel's documented calls,
one each, with errno set on failure. Whole-map reads use `BPF_MAP_LOOKUP_BATCH` (Linux 5.6:
hash, LRU and array maps and their per-CPU variants), `count` elements per syscall, and fall
back to `BPF_MAP_GET_NEXT_KEY` + `BPF_MAP_LOOKUP_ELEM` per key where the kernel has no batch
operation for the map type (stack-trace maps, older kernels).
"""

from __future__ import annotations

import ctypes
import errno as _errno
from dataclasses import dataclass

import numpy as np

from ..backends import libbpf

c_uint32 = ctypes.c_uint32


ENOTSUPP = 524  # the kernel's internal "operation not supported", seen by user space as-is


class MapInfo(ctypes.Structure):
    """struct bpf_map_info (include/uapi/linux/bpf.h), up to map_extra (Linux 5.16)."""

    _fields_ = [
        ("type", c_uint32), ("id", c_uint32), ("key_size", c_uint32), ("value_size", c_uint32),
        ("max_entries", c_uint32), ("map_flags", c_uint32), ("name", ctypes.c_char * 16),
        ("ifindex", c_uint32), ("btf_vmlinux_value_type_id", c_uint32),
        ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("btf_id", c_uint32), ("btf_key_type_id", c_uint32), ("btf_value_type_id", c_uint32),
        ("_pad", c_uint32), ("map_extra", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class Info:
    """What the kernel says about a map fd."""

    kind: str
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str  # the kernel's name: the first 15 bytes of the program's
    btf_id: int
    btf_key_type_id: int
    btf_value_type_id: int

    @property
    def per_cpu(self) -> bool:
        return self.kind in libbpf.PERCPU_KINDS


def info(fd: int) -> Info:
    """BPF_OBJ_GET_INFO_BY_FD for a map."""
    buf = MapInfo()
    size = c_uint32(ctypes.sizeof(buf))
    ret = libbpf.lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(buf), ctypes.byref(size))
    _check(ret, f"map fd {fd}: info")
    return Info(libbpf.MAP_TYPES.get(buf.type, f"type {buf.type}"), buf.id, buf.key_size, buf.value_size,
                buf.max_entries, buf.map_flags, buf.name.decode(errors="replace"), buf.btf_id,
                buf.btf_key_type_id, buf.btf_value_type_id)


def percpu_stride(value_size: int) -> int:
    """Bytes of one CPU's value in a per-CPU map's lookup buffer: the value rounded up to 8
    (the kernel copies each CPU's value with bpf_long_memcpy at round_up(value_size, 8))."""
    return -(-value_size // 8) * 8


def value_bytes(value_size: int, per_cpu: bool, ncpus: int) -> int:
    """Bytes the kernel writes for one value: per-CPU maps give every possible CPU's value,
    each rounded up to 8 bytes."""
    return percpu_stride(value_size) * ncpus if per_cpu else value_size


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno() or -ret
        raise libbpf._oserror(err, what)
    return ret


def _errno_of(ret: int) -> int:
    return ctypes.get_errno() or -ret


def next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """The key after `key` (the first key for None), or None at the end."""
    out = ctypes.create_string_buffer(key_size)
    ret = libbpf.lib().bpf_map_get_next_key(fd, key, out)
    if ret < 0:
        err = _errno_of(ret)
        if err == _errno.ENOENT:
            return None
        raise libbpf._oserror(err, f"map fd {fd}: next key")
    return out.raw


def lookup(fd: int, key: bytes, size: int) -> bytes | None:
    """The value bytes of `key`, or None when the map has no such key."""
    value = ctypes.create_string_buffer(size)
    ret = libbpf.lib().bpf_map_lookup_elem(fd, key, value)
    if ret < 0:
        err = _errno_of(ret)
        if err == _errno.ENOENT:
            return None
        raise libbpf._oserror(err, f"map fd {fd}: lookup")
    return value.raw


def update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    _check(libbpf.lib().bpf_map_update_elem(fd, key, value, flags), f"map fd {fd}: update")


def delete(fd: int, key: bytes) -> bool:
    """Delete `key`; False when it was not there."""
    ret = libbpf.lib().bpf_map_delete_elem(fd, key)
    if ret < 0:
        err = _errno_of(ret)
        if err == _errno.ENOENT:
            return False
        raise libbpf._oserror(err, f"map fd {fd}: delete")
    return True


def keys(fd: int, key_size: int) -> list[bytes]:
    """Every key, by BPF_MAP_GET_NEXT_KEY (a hash map being updated may repeat or skip keys
    that were deleted meanwhile, as the kernel documents)."""
    out: list[bytes] = []
    key = next_key(fd, None, key_size)
    while key is not None:
        out.append(key)
        key = next_key(fd, key, key_size)
    return out


@dataclass
class Elements:
    """Keys and values read from a map: `keys` is (n, key_size) uint8, `values` (n, vsize)."""

    keys: np.ndarray
    values: np.ndarray
    syscalls: int
    batched: bool


def read_all(fd: int, key_size: int, vsize: int, max_entries: int, *, delete: bool = False,
             batch: bool = True, count: int = 4096) -> Elements:
    """Every element (and, with `delete`, remove what was read): BPF_MAP_LOOKUP_BATCH
    (or LOOKUP_AND_DELETE_BATCH) `count` at a time where the kernel has it for the map,
    else key by key. `vsize`: value_bytes() for the map."""
    if batch:
        got = _read_batched(fd, key_size, vsize, max_entries, delete=delete, count=count)
        if got is not None:
            return got
    ks, vs, calls = [], [], 1
    for key in keys(fd, key_size):
        calls += 2
        if delete:
            value = ctypes.create_string_buffer(vsize)
            ret = libbpf.lib().bpf_map_lookup_and_delete_elem(fd, key, value)
            if ret < 0:
                err = _errno_of(ret)
                if err == _errno.ENOENT:
                    continue
                if err not in (_errno.EINVAL, _errno.ENOTSUP, ENOTSUPP):
                    raise libbpf._oserror(err, f"map fd {fd}: lookup and delete")
                v = lookup(fd, key, vsize)  # hash maps before Linux 5.14: look up, then delete
                if v is None:
                    continue
                globals()["delete"](fd, key)
                vs.append(v)
            else:
                vs.append(value.raw)
        else:
            v = lookup(fd, key, vsize)
            if v is None:  # deleted since next_key named it
                continue
            vs.append(v)
        ks.append(key)
    return Elements(_rows(ks, key_size), _rows(vs, vsize), calls, False)


def _rows(items: list[bytes], size: int) -> np.ndarray:
    """Equal-sized byte strings as an (n, size) uint8 array."""
    return np.frombuffer(b"".join(items), np.uint8).reshape(len(items), size)


def _read_batched(fd: int, key_size: int, vsize: int, max_entries: int, *, delete: bool,
                  count: int) -> Elements | None:
    """None when the kernel has no batch lookup for this map (the caller iterates)."""
    so = libbpf.lib()
    call = so.bpf_map_lookup_and_delete_batch if delete else so.bpf_map_lookup_batch
    step = max(1, min(count, max_entries or count))
    token_in = ctypes.create_string_buffer(max(key_size, 8))
    token_out = ctypes.create_string_buffer(max(key_size, 8))
    kparts: list[np.ndarray] = []
    vparts: list[np.ndarray] = []
    first, calls = True, 0
    while True:
        kbuf = np.empty((step, key_size), np.uint8)
        vbuf = np.empty((step, vsize), np.uint8)
        n = c_uint32(step)
        ret = call(fd, None if first else token_in, token_out, kbuf.ctypes.data, vbuf.ctypes.data,
                   ctypes.byref(n), None)
        calls += 1
        err = _errno_of(ret) if ret < 0 else 0
        if err and err != _errno.ENOENT:
            if first and err in (_errno.EINVAL, _errno.ENOTSUP, ENOTSUPP, _errno.EPERM):
                return None  # no batch operation for this map type here
            if err == _errno.ENOSPC:  # a hash bucket holds more than `step` keys: ask for more
                step *= 2
                continue
            raise libbpf._oserror(err, f"map fd {fd}: {'lookup and delete' if delete else 'lookup'} batch")
        got = int(n.value)
        if got:
            kparts.append(kbuf[:got])
            vparts.append(vbuf[:got])
        if err == _errno.ENOENT:  # the last batch (possibly empty)
            break
        ctypes.memmove(token_in, token_out, len(token_out))
        first = False
    kb = np.concatenate(kparts) if kparts else np.empty((0, key_size), np.uint8)
    vb = np.concatenate(vparts) if vparts else np.empty((0, vsize), np.uint8)
    return Elements(kb, vb, calls, True)
