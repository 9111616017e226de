"""Per-CPU perf buffer reader for BPF_PERF_OUTPUT maps, parsing each CPU's ring in batches.

Two layers, like cilium/ebpf `perf/reader.go`: `PerfRing` knows only the memory layout of
one CPU's perf mmap area and turns the pending bytes into a structured numpy array;
`PerfBufferReader` opens one perf event per CPU, stores its fd in the program's perf event
array, waits with epoll and owns the lifecycle. Per-event Python callbacks (BCC's
`open_perf_buffer`) are the bottleneck this module exists to avoid.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import platform
import select
import struct
import threading
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..errors import BPFPermissionError, ClosedError, CorruptBufferError, KernelscopeError, SettingError
from .base import Resources, check_pages
from .batch import Arena, Batch, copy_records, opaque

__all__ = [
    "DEFAULT_WATERMARK_SHARE",
    "PerfBufferReader",
    "PerfEventAttr",
    "PerfRing",
    "online_cpus",
]

PAGE_SIZE = mmap.PAGESIZE
# With no wake-up setting, the kernel wakes the reader each time this share of a CPU's buffer
# has been written (perf_event_attr.watermark), and the drain reads every poll_interval anyway.
# A wake-up per event is an IRQ work on the producer's CPU for every sample (3-8x slower
# producer); at a quarter, a 4 MiB buffer and 48-byte samples wake ~170 times a second at
# 3.6 M samples/s, and three quarters stay free for what arrives while the reader wakes up.
DEFAULT_WATERMARK_SHARE = 0.25

# --- kernel ABI (include/uapi/linux/perf_event.h) -----------------------------------------

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400  # _IO('$', 0)
PERF_ATTR_SIZE_VER5 = 112
PERF_ATTR_SIZE_VER7 = 128

PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9

# perf_event_open has no libc wrapper; its number differs per architecture.
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "riscv64": 241, "ppc64le": 319}

# struct perf_event_mmap_page: four u64 control fields follow 1 KiB of counter-reading
# fields, at byte 1024. Indices into them:
_MMAP_CTL = 1024
_HEAD = 0  # data_head: bytes ever written, stored by the kernel after the records it covers
_TAIL = 1  # data_tail: bytes ever consumed, stored by us; the kernel may overwrite below it
_OFFSET = 2  # data_offset: start of the data area (kernel >= 4.1, else 0)
_SIZE = 3  # data_size: size of the data area (kernel >= 4.1, else 0)
_MMAP_CTL_END = _MMAP_CTL + 4 * 8

# struct perf_event_header {u32 type; u16 misc; u16 size;} then, for a PERF_SAMPLE_RAW-only
# sample, u32 raw_size and the raw bytes; PERF_RECORD_LOST is {header; u64 id; u64 lost}.
_HEADER = struct.Struct("<IHH")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER_SIZE = 8
_SAMPLE_PAYLOAD = 12  # header + u32 raw_size
_LOST_SIZE = 24
# The first 12 bytes of a sample seen as one u64 (type | misc << 32 | size << 48) and raw_size.
_SAMPLE_HEAD = np.dtype({"names": ["word", "raw"], "formats": ["<u8", "<u4"], "offsets": [0, 8],
                         "itemsize": 12})
_MISC_MASK = ~np.uint64(0xFFFF << 32)  # misc carries cpumode bits that may vary per record

# Bit positions of perf_event_attr's flags bitfield (one u64 in the uapi struct).
ATTR_FLAG_BITS = {
    "disabled": 0, "inherit": 1, "pinned": 2, "exclusive": 3, "exclude_user": 4,
    "exclude_kernel": 5, "exclude_hv": 6, "exclude_idle": 7, "mmap": 8, "comm": 9,
    "freq": 10, "inherit_stat": 11, "enable_on_exec": 12, "task": 13, "watermark": 14,
    "precise_ip": 15,  # two bits: 15-16
    "mmap_data": 17, "sample_id_all": 18, "exclude_host": 19, "exclude_guest": 20,
    "exclude_callchain_kernel": 21, "exclude_callchain_user": 22, "mmap2": 23,
    "comm_exec": 24, "use_clockid": 25, "context_switch": 26, "write_backward": 27,
    "namespaces": 28, "ksymbol": 29, "bpf_event": 30, "aux_output": 31, "cgroup": 32,
    "text_poke": 33, "build_id": 34, "inherit_thread": 35, "remove_on_exec": 36,
    "sigtrap": 37,
}


class _SampleUnion(ctypes.Union):
    _fields_ = [("sample_period", ctypes.c_uint64), ("sample_freq", ctypes.c_uint64)]


class _WakeupUnion(ctypes.Union):
    _fields_ = [("wakeup_events", ctypes.c_uint32), ("wakeup_watermark", ctypes.c_uint32)]


class _Config1Union(ctypes.Union):
    _fields_ = [("bp_addr", ctypes.c_uint64), ("kprobe_func", ctypes.c_uint64),
                ("uprobe_path", ctypes.c_uint64), ("config1", ctypes.c_uint64)]


class _Config2Union(ctypes.Union):
    _fields_ = [("bp_len", ctypes.c_uint64), ("kprobe_addr", ctypes.c_uint64),
                ("probe_offset", ctypes.c_uint64), ("config2", ctypes.c_uint64)]


class PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr up to sig_data (PERF_ATTR_SIZE_VER7, 128 bytes).

    The C bitfield (disabled, inherit, ..., watermark, ...) is the single u64 `flags`;
    `set_flag` sets a bit by its uapi name (ATTR_FLAG_BITS).
    """

    _anonymous_ = ("_sample", "_wakeup", "_config1", "_config2")
    # For type checkers: ctypes creates these attributes from _fields_.
    type: int
    size: int
    config: int
    sample_period: int
    sample_type: int
    flags: int
    wakeup_events: int
    wakeup_watermark: int
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("_sample", _SampleUnion),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("_wakeup", _WakeupUnion),
        ("bp_type", ctypes.c_uint32),
        ("_config1", _Config1Union),
        ("_config2", _Config2Union),
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64),
        ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16),
        ("reserved_2", ctypes.c_uint16),
        ("aux_sample_size", ctypes.c_uint32),
        ("reserved_3", ctypes.c_uint32),
        ("sig_data", ctypes.c_uint64),
    ]

    def set_flag(self, name: str, value: int = 1) -> None:
        bit = ATTR_FLAG_BITS[name]
        width = 2 if name == "precise_ip" else 1
        mask = ((1 << width) - 1) << bit
        self.flags = (self.flags & ~mask) | ((value << bit) & mask)

    def flag(self, name: str) -> int:
        width = 2 if name == "precise_ip" else 1
        return (self.flags >> ATTR_FLAG_BITS[name]) & ((1 << width) - 1)


assert ctypes.sizeof(PerfEventAttr) == PERF_ATTR_SIZE_VER7


def bpf_output_attr(wakeup_events: int = 1, watermark_bytes: int | None = None) -> PerfEventAttr:
    """The attr of a BPF output event: software event, raw samples, every output a sample."""
    attr = PerfEventAttr()
    attr.type = PERF_TYPE_SOFTWARE
    attr.size = ctypes.sizeof(PerfEventAttr)
    attr.config = PERF_COUNT_SW_BPF_OUTPUT
    attr.sample_type = PERF_SAMPLE_RAW
    attr.sample_period = 1
    # Opened disabled and enabled once its fd is in the map: bpf_perf_event_output()
    # refuses (-EOPNOTSUPP) an event that is not enabled on the current CPU.
    attr.set_flag("disabled")
    if watermark_bytes is not None:
        attr.set_flag("watermark")
        attr.wakeup_watermark = watermark_bytes
    else:
        attr.wakeup_events = wakeup_events
    return attr


# --- one CPU's ring ---------------------------------------------------------------------


class PerfRing:
    """Parser over one CPU's perf mmap area: 1 metadata page then 2^n data pages.

    `area` is any writable buffer (the mmap'd memory, or a bytearray in tests). The data
    area is mapped once, not twice, so a record may wrap at its end. Records are parsed in
    place: runs of same-size samples become strided numpy views of the area, validated
    vectorised and copied once into the caller's array; anything else (LOST records, short
    payloads) goes record by record, and only a record that wraps is stitched through a
    small copy. Both paths give the same records.
    """

    def __init__(self, area: object, dtype: np.dtype | type | str, *,
                 page_size: int = PAGE_SIZE, fast: bool = True) -> None:
        mem = np.frombuffer(area, dtype=np.uint8)  # type: ignore[call-overload]
        if not mem.flags.writeable:
            raise ValueError("the perf area must be writable: data_tail is written back")
        if len(mem) < max(page_size, _MMAP_CTL_END):
            raise ValueError(f"perf area of {len(mem)} bytes has no room for its metadata page")
        self.dtype = _record_dtype(dtype)
        self._opaque = opaque(self.dtype)
        self.fast = fast
        # data_head, data_tail, data_offset, data_size: aligned u64s, so each int() read and
        # item store is one 8-byte access the kernel cannot see half-done.
        self._ctl: np.ndarray | None = mem[_MMAP_CTL:_MMAP_CTL_END].view("<u8")
        offset, size = int(self._ctl[_OFFSET]), int(self._ctl[_SIZE])
        if not (offset and size):  # kernels before 4.1 leave both zero: data follows page 0
            offset, size = page_size, len(mem) - page_size
        if size <= 0 or size & (size - 1) or offset + size > len(mem):
            raise ValueError(f"bad perf data area: offset {offset}, size {size}, "
                             f"mapping {len(mem)} bytes (size must be a power of two)")
        self._data: np.ndarray | None = mem[offset:offset + size]
        self._size = size

    @property
    def capacity(self) -> int:
        """Bytes in the data area: what can be pending before the kernel drops samples."""
        return self._size

    def pending_bytes(self) -> int:
        ctl = self._control()
        return int(ctl[_HEAD]) - int(ctl[_TAIL])

    def head(self) -> int:
        """data_head now: a record boundary (the kernel stores it after whole records only)."""
        return int(self._control()[_HEAD])

    def release(self) -> None:
        """Drop every view of the area (before it is unmapped); later reads raise ClosedError."""
        self._ctl = None
        self._data = None

    def read(self, max_bytes: int | None = None) -> tuple[np.ndarray, int]:
        """Parse and consume pending records: (records of `dtype`, samples reported lost).

        With `max_bytes`, consume whole records up to that many bytes (at least one record,
        so a caller always makes progress); otherwise everything pending.
        """
        pieces, lost, tail = self.parse(max_bytes=max_bytes)
        out = np.empty(sum(len(p) for p in pieces), dtype=self._opaque)
        fill(out, pieces)
        self.consume(tail)  # after the copy: from then on the kernel may overwrite it
        return out.view(self.dtype), lost

    def parse(self, upto: int | None = None, max_bytes: int | None = None
              ) -> tuple[list[np.ndarray], int, int]:
        """Parse the records from data_tail to `upto` (a data_head read earlier; None: now),
        or whole records up to `max_bytes`, without consuming them.

        Returns (pieces, samples lost, the data_tail that consumes them). Pieces are arrays of
        the opaque record dtype, some of them views of the area: copy them (`fill`) before
        `consume`, which lets the kernel overwrite their bytes.
        """
        ctl = self._control()
        # data_head is read once, before the data: the kernel stores it (release) only
        # after the records below it are complete. x86 is TSO, so loads stay in order.
        head = int(ctl[_HEAD]) if upto is None else upto
        tail = int(ctl[_TAIL])
        pending = head - tail
        if pending == 0:
            return [], 0, tail
        if not 0 < pending <= self._size:
            ctl[_TAIL] = int(ctl[_HEAD])
            raise CorruptBufferError(f"corrupt perf ring: data_head {head}, data_tail {tail}, "
                                     f"data area {self._size} bytes")
        n = pending
        if max_bytes is not None and max_bytes < pending:
            first = _HEADER.unpack_from(self._gather(tail, _HEADER_SIZE).data)[2]
            n = min(pending, max(max_bytes, first))
        try:
            pieces, lost, used = self._parse_region(tail, n, whole=n == pending)
        except CorruptBufferError:
            ctl[_TAIL] = head  # skip what cannot be parsed so the next batch starts clean
            raise
        return pieces, lost, tail + used

    def consume(self, tail: int) -> None:
        """Store data_tail: the bytes below it are the kernel's again."""
        self._control()[_TAIL] = tail

    # -- internals --

    def _control(self) -> np.ndarray:
        if self._ctl is None:
            raise ClosedError("the perf ring was released")
        return self._ctl

    def _area(self) -> np.ndarray:
        if self._data is None:
            raise ClosedError("the perf ring was released")
        return self._data

    def _gather(self, pos: int, n: int) -> np.ndarray:
        """A copy of the n bytes at counter `pos`, joined across the end of the data area."""
        data = self._area()
        # data_head/data_tail count bytes forever; the position is modulo the power-of-two size.
        start = pos & (self._size - 1)
        first = min(n, self._size - start)
        if n <= first:
            return data[start:start + n].copy()
        return np.concatenate((data[start:], data[:n - first]))

    def _parse_region(self, tail: int, n: int, *, whole: bool) -> tuple[list[np.ndarray], int, int]:
        """The n bytes from counter `tail`: in place up to the end of the data area, the one
        record across it (if any) through `_gather`, then in place from the start."""
        data = self._area()
        pieces: list[np.ndarray] = []
        lost = used = 0
        while used < n:
            start = (tail + used) & (self._size - 1)
            span = min(n - used, self._size - start)
            last = span == n - used
            got, nlost, pos = self._parse(data[start:start + span], whole=whole and last)
            pieces += got
            lost += nlost
            used += pos
            if last or used == n:
                break
            if pos == span:
                continue  # a record ends exactly at the end of the data area
            # One record runs across the end: its header (maybe split too) says how long.
            size = _HEADER.unpack_from(self._gather(tail + used, _HEADER_SIZE).data)[2]
            if size > n - used and not whole:
                break  # the rest did not fit in max_bytes
            if size < _HEADER_SIZE or size > n - used:
                raise CorruptBufferError(f"corrupt perf record at byte {used}: size {size}, "
                                         f"{n - used} bytes pending")
            got, nlost, _ = self._parse(self._gather(tail + used, size), whole=True)
            pieces += [np.array(p) for p in got]  # own the copy, not a view of the gather
            lost += nlost
            used += size
        return pieces, lost, used

    def _parse(self, buf: np.ndarray, *, whole: bool) -> tuple[list[np.ndarray], int, int]:
        """Records of the contiguous bytes `buf`: (pieces, lost, bytes parsed). Without `whole`
        it stops before a record that does not fit in `buf`."""
        dtype, itemsize, op = self.dtype, self.dtype.itemsize, self._opaque
        n = len(buf)
        mv = buf.data
        pieces: list[np.ndarray] = []
        lost = 0
        pos = 0
        while n - pos >= _HEADER_SIZE:
            rtype, _misc, size = _HEADER.unpack_from(mv, pos)
            if size < _HEADER_SIZE:
                raise CorruptBufferError(f"corrupt perf record at byte {pos}: size {size}")
            if pos + size > n:
                if whole:
                    raise CorruptBufferError(f"perf record at byte {pos} of size {size} runs "
                                             f"past data_head ({n} bytes pending)")
                break  # the rest is past max_bytes, or across the end of the data area
            if rtype == PERF_RECORD_SAMPLE:
                if size < _SAMPLE_PAYLOAD:
                    raise CorruptBufferError(f"perf sample at byte {pos} too short: {size}")
                raw = _U32.unpack_from(mv, pos + _HEADER_SIZE)[0]
                if raw > size - _SAMPLE_PAYLOAD:
                    raise CorruptBufferError(f"perf sample at byte {pos}: raw_size {raw} "
                                             f"exceeds record size {size}")
                if self.fast and raw >= itemsize:
                    kmax = (n - pos) // size
                    k = _uniform_run(buf, pos, size, kmax) if kmax > 1 else 1
                    pieces.append(np.ndarray((k,), dtype=op, buffer=buf,
                                             offset=pos + _SAMPLE_PAYLOAD, strides=(size,)))
                    pos += k * size
                    continue
                # raw_size counts padding to 8 bytes, which the kernel skips without
                # writing: bytes past what the program submitted are stale ring contents.
                start = pos + _SAMPLE_PAYLOAD
                pieces.append(copy_records(buf[start:start + raw], dtype).view(op))
            elif rtype == PERF_RECORD_LOST:
                if size < _LOST_SIZE:
                    raise CorruptBufferError(f"perf LOST record at byte {pos} too short: {size}")
                lost += _U64.unpack_from(mv, pos + 16)[0]
            # Other record types (THROTTLE, ...) carry no samples and are skipped.
            pos += size
        if whole and pos != n:
            raise CorruptBufferError(f"{n - pos} stray bytes at the end of the perf ring batch")
        return pieces, lost, pos


def fill(out: np.ndarray, pieces: list[np.ndarray]) -> None:
    """Copy record pieces (opaque dtype, strided views or arrays) into `out`, in order."""
    i = 0
    for p in pieces:
        out[i:i + len(p)] = p
        i += len(p)


_RUN_WINDOW = 32768  # headers compared per numpy call: the temporaries (256 KiB) stay in cache


def _uniform_run(buf: np.ndarray, pos: int, size: int, kmax: int) -> int:
    """How many records from `pos` have the same type, size and raw_size as the one there.

    Reads the header words at a stride of `size`, vectorised, in windows that grow from a
    few records to _RUN_WINDOW, so a mixed batch costs a few comparisons per record and a
    uniform one a single pass whose temporaries fit in cache.
    """
    heads = np.ndarray((kmax,), dtype=_SAMPLE_HEAD, buffer=buf, offset=pos, strides=(size,))
    words, raws = heads["word"], heads["raw"]
    want_word = words[0] & _MISC_MASK
    want_raw = raws[0]
    k, step = 1, 64
    while k < kmax:
        end = min(kmax, k + step)
        ok = (words[k:end] & _MISC_MASK) == want_word
        ok &= raws[k:end] == want_raw
        if not ok.all():
            return k + int(np.argmin(ok))
        k, step = end, min(step * 8, _RUN_WINDOW)
    return kmax


def _record_dtype(dtype: np.dtype | type | str) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.itemsize == 0 or dt.hasobject:
        raise ValueError(f"event dtype must be a fixed-size plain struct, not {dt}")
    return dt


# --- syscalls -----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _os_error(what: str, err: int) -> KernelscopeError:
    msg = f"{what}: {os.strerror(err)}"
    if err == errno.ENOMEM:
        return SettingError(f"{msg}: the kernel cannot map a perf buffer this large; choose fewer pages "
                            "per CPU (each CPU gets its own buffer of that size)")
    if err in (errno.EPERM, errno.EACCES):
        return BPFPermissionError(
            f"{msg}. Per-CPU perf events need root or CAP_PERFMON (see "
            "/proc/sys/kernel/perf_event_paranoid), and the buffers count against "
            "/proc/sys/kernel/perf_event_mlock_kb without CAP_IPC_LOCK."
        )
    return KernelscopeError(msg)


def perf_event_open(attr: PerfEventAttr, cpu: int, pid: int = -1, group_fd: int = -1,
                    what: str = "BPF output") -> int:
    """perf_event_open(2) with PERF_FLAG_FD_CLOEXEC; raises BPFPermissionError on EPERM/EACCES.
    `what` names the event in errors (a BPF output buffer, or a sampling event)."""
    nr = _NR_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise KernelscopeError(f"perf_event_open syscall number unknown on {platform.machine()}")
    fd = _libc.syscall(ctypes.c_long(nr), ctypes.byref(attr), ctypes.c_long(pid),
                       ctypes.c_long(cpu), ctypes.c_long(group_fd),
                       ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        raise _os_error(f"perf_event_open({what}, cpu {cpu})", ctypes.get_errno())
    return int(fd)


def _map_shared(fd: int, length: int) -> int:
    addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        raise _os_error(f"mmap of {length} bytes of perf buffer", ctypes.get_errno())
    return int(addr)


def online_cpus(text: str | None = None) -> list[int]:
    """CPU ids from /sys/devices/system/cpu/online (or `text` in its "0-3,5" format)."""
    if text is None:
        text = Path("/sys/devices/system/cpu/online").read_text()
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


# --- public reader ------------------------------------------------------------------------


class PerfBufferReader:
    """Reads a BPF_PERF_OUTPUT map: one perf event and mmap'd ring per CPU, batches out.

    `set_cpu_fd(cpu, fd)` stores each CPU's perf event fd in the program's perf event
    array; with BCC, `table = bpf["events"]` and
    `lambda cpu, fd: table.__setitem__(ctypes.c_int(cpu), ctypes.c_int(fd))`.
    The kernel wakes `poll` after `wakeup_events` samples on a CPU, or, with
    `watermark_bytes`, each time that many bytes have been written; with neither, at
    DEFAULT_WATERMARK_SHARE of the buffer. `read` drains every CPU anyway.
    One thread reads and polls; `close` may come from any thread and wakes a blocked poll.

    Drops are reported the way the kernel reports them: a PERF_RECORD_LOST written ahead
    of the next sample that fits, so samples dropped after the last one delivered are
    counted only once that CPU's program emits again.
    """

    def __init__(
        self,
        set_cpu_fd: Callable[[int, int], None],
        dtype: np.dtype | type | str,
        pages: int = 64,
        *,
        wakeup_events: int | None = None,
        watermark_bytes: int | None = None,
        cpus: Iterable[int] | None = None,
    ) -> None:
        pages = check_pages(pages, "perf buffer pages per CPU")
        if wakeup_events is None and watermark_bytes is None:
            watermark_bytes = max(8, int(pages * PAGE_SIZE * DEFAULT_WATERMARK_SHARE))
        wakeup_events = 1 if wakeup_events is None else wakeup_events
        if wakeup_events < 1:
            raise ValueError(f"wakeup_events must be at least 1, not {wakeup_events}")
        if watermark_bytes is not None and not 0 < watermark_bytes <= pages * PAGE_SIZE:
            raise ValueError(f"watermark_bytes must be in 1..{pages * PAGE_SIZE} "
                             f"(the buffer size), not {watermark_bytes}")
        self.dtype = _record_dtype(dtype)
        self._opaque = opaque(self.dtype)
        self._arena = Arena(grow=Arena.GROW)  # where each read copies its records
        self.wakeup_events = wakeup_events
        self.watermark_bytes = watermark_bytes
        self.cpus = tuple(sorted(set(online_cpus() if cpus is None else cpus)))
        self._rings: list[PerfRing] = []
        self._closed = False
        self._close_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._wake_fd = -1
        res = self._res = Resources()
        self._finalizer = weakref.finalize(self, res.release)
        try:
            self._epoll = select.epoll()
            res.push(self._epoll.close)
            self._wake_fd = res.fd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            self._epoll.register(self._wake_fd, select.EPOLLIN)
            attr = bpf_output_attr(wakeup_events, watermark_bytes)
            length = (1 + pages) * PAGE_SIZE
            for cpu in self.cpus:
                fd = res.fd(perf_event_open(attr, cpu))
                addr = _map_shared(fd, length)
                res.push(functools.partial(_libc.munmap, addr, length))
                self._rings.append(PerfRing((ctypes.c_char * length).from_address(addr),
                                            self.dtype))
                set_cpu_fd(cpu, fd)
                try:
                    fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
                except OSError as e:
                    raise _os_error(f"enabling the perf event of cpu {cpu}",
                                    e.errno or errno.EIO) from e
                self._epoll.register(fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise

    @property
    def batches_wakeups(self) -> bool:
        """True unless the kernel wakes the reader for every sample: the drain then waits for
        a wake-up or its timer (poll_interval) instead of reading whatever is pending."""
        return self.watermark_bytes is not None or self.wakeup_events > 1

    # -- reading --

    def poll(self, timeout: float | None = None) -> bool:
        """Wait until the kernel wakes some CPU's ring (True) or `timeout` s pass (False).

        A wakeup comes after `wakeup_events` samples or `watermark_bytes` bytes on one CPU,
        so fewer can be pending while this says False; `read` drains them regardless.
        Raises ClosedError if the reader is closed, also when `close` interrupts the wait.
        """
        with self._poll_lock:
            if self._closed:
                raise ClosedError("the perf buffer reader is closed")
            events = self._epoll.poll(-1 if timeout is None else timeout)
            if self._closed:
                raise ClosedError("the perf buffer reader was closed while polling")
            if any(fd == self._wake_fd for fd, _ in events):
                with contextlib.suppress(BlockingIOError):  # an interrupt(): reset it
                    os.eventfd_read(self._wake_fd)
            return any(fd != self._wake_fd for fd, _ in events)

    def interrupt(self) -> None:
        """Make a blocked (or the next) `poll` return False now; from any thread. The drain
        calls it when it is told to stop, so stop() need not wait out a poll_interval."""
        with self._close_lock:
            # at interpreter exit the finalizer may have closed the eventfd already
            if not self._closed and self._finalizer.alive:
                os.eventfd_write(self._wake_fd, 1)

    def read(self) -> Batch:
        """Drain every CPU once: records in arrival order per CPU, CPU by CPU.

        Records of different CPUs are not merged by time (the rings carry no common
        clock); put a timestamp in the event and sort if order across CPUs matters.
        Every CPU's data_head is taken before any is parsed, so one pass covers the same
        instant on all CPUs: a reader descheduled mid-pass does not let later CPUs run
        ahead, and cross-CPU disorder stays within one poll interval.
        """
        with self._read_lock:
            if self._closed:
                raise ClosedError("the perf buffer reader is closed")
            heads = [ring.head() for ring in self._rings]
            pieces: list[np.ndarray] = []
            counts: list[int] = []
            cpus: list[int] = []
            tails: list[tuple[PerfRing, int]] = []
            lost_by_cpu: dict[int, int] = {}
            for cpu, ring, head in zip(self.cpus, self._rings, heads, strict=True):
                got, lost, tail = ring.parse(upto=head)
                if not (got or lost) and tail == head:
                    continue
                tails.append((ring, tail))
                if lost:
                    lost_by_cpu[cpu] = lost
                if got:
                    pieces += got
                    counts.append(sum(len(p) for p in got))
                    cpus.append(cpu)
            if not tails:
                return Batch(np.empty(0, dtype=self.dtype), np.empty(0, dtype=np.int16))
            # One copy per run, straight into the batch; then every CPU's data_tail once.
            out = self._arena.take(sum(counts), self._opaque)
            fill(out, pieces)
            for ring, tail in tails:
                ring.consume(tail)
        cpu_col = (np.full(counts[0], cpus[0], dtype=np.int16) if len(cpus) == 1
                   else np.repeat(np.array(cpus, dtype=np.int16), counts))
        return Batch(out.view(self.dtype), cpu_col, sum(lost_by_cpu.values()), lost_by_cpu,
                     runs=tuple(counts))

    def fill_bytes(self) -> int:
        """Bytes waiting in all CPUs' rings."""
        return sum(self.fill_by_cpu().values())

    def fill_by_cpu(self) -> dict[int, int]:
        """Bytes waiting in each CPU's ring."""
        with self._read_lock:
            if self._closed:
                raise ClosedError("the perf buffer reader is closed")
            return {cpu: ring.pending_bytes()
                    for cpu, ring in zip(self.cpus, self._rings, strict=True)}

    @property
    def capacity_bytes(self) -> int:
        """Total data area over all CPUs."""
        return sum(ring.capacity for ring in self._rings)

    # -- lifecycle --

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Wake a blocked poll, unmap the rings and close the fds; a second call does nothing.

        The perf event array entries keep pointing at the (now unread) events until the
        map slot is overwritten or the map is freed; samples sent there are discarded.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            # at interpreter exit this reader's finalizer may already have closed the fds
            if self._wake_fd >= 0 and self._finalizer.alive:
                os.eventfd_write(self._wake_fd, 1)
            with self._poll_lock, self._read_lock:
                for ring in self._rings:
                    ring.release()
                self._finalizer()

    def __enter__(self) -> PerfBufferReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.cpus)} CPUs"
        return f"<PerfBufferReader {state}, {self.capacity_bytes} bytes, dtype {self.dtype}>"
