"""Attach kinds beyond what a SEC() name or a BCC macro attaches: perf events (sampling), XDP
and tc on a named interface, CO-RE USDT and uprobes by name, iterators, tail-call arrays.

Both backends share what the kernel sees: a sampling perf event opened per CPU, a BPF link
(`bpf_link_create`) for XDP and tcx, read through `bpf_iter_create` for iterators. What each
backend adds is how it gets a program's fd (libbpf's `bpf_program__fd`, BCC's `load_func`).
Whatever is attached here is owned by an `Attachments` and detached when it closes (a link
or a perf event detaches its program when its last fd is closed).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import fcntl
import os
import re
import shutil
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AttachError, KernelscopeError, SettingError, UnknownNameError
from ..readers.perf import PerfEventAttr, online_cpus, perf_event_open
from . import libbpf

PERF_TYPE_HARDWARE, PERF_TYPE_SOFTWARE = 0, 1
EVENTS = {  # name (as perf(1) spells it) -> (perf_event_attr.type, .config)
    "cpu-clock": (PERF_TYPE_SOFTWARE, 0), "task-clock": (PERF_TYPE_SOFTWARE, 1),
    "page-faults": (PERF_TYPE_SOFTWARE, 2), "context-switches": (PERF_TYPE_SOFTWARE, 3),
    "cpu-migrations": (PERF_TYPE_SOFTWARE, 4),
    "cycles": (PERF_TYPE_HARDWARE, 0), "instructions": (PERF_TYPE_HARDWARE, 1),
    "cache-references": (PERF_TYPE_HARDWARE, 2), "cache-misses": (PERF_TYPE_HARDWARE, 3),
    "branch-instructions": (PERF_TYPE_HARDWARE, 4), "branch-misses": (PERF_TYPE_HARDWARE, 5),
}
PERF_EVENT_IOC_ENABLE = 0x2400  # _IO('$', 0)
PERF_EVENT_IOC_SET_BPF = 0x40042408  # _IOW('$', 8, __u32)
CPU_PMU = Path("/sys/bus/event_source/devices/cpu")

# enum bpf_attach_type (include/uapi/linux/bpf.h)
BPF_XDP, BPF_TCX_INGRESS, BPF_TCX_EGRESS = 37, 46, 47
ENOTSUPP = 524  # the kernel's internal "operation not supported" that bpf() may return
XDP_MODES = {"skb": 1 << 1, "native": 1 << 2, "hw": 1 << 3}  # XDP_FLAGS_{SKB,DRV,HW}_MODE


class Attachments:
    """What was attached by hand: fds (links, perf events: closing one detaches it) and, for
    netlink tc filters, the call that removes one."""

    def __init__(self) -> None:
        self.undo: list[tuple[str, Callable[[], object]]] = []  # (attach point, detach)
        self.closed = False

    def add(self, point: str, fd: int) -> None:
        self.undo.append((point, lambda: os.close(fd)))

    def add_undo(self, point: str, detach: Callable[[], object]) -> Callable[[], object]:
        self.undo.append((point, detach))
        return detach

    def give_up(self, detach: Callable[[], object]) -> None:
        """Stop owning an attachment (handed over to another program)."""
        self.undo = [(p, d) for p, d in self.undo if d is not detach]

    def points(self) -> list[str]:
        return [point for point, _ in self.undo]

    def close(self) -> None:
        self.closed = True
        for _, detach in reversed(self.undo):
            with contextlib.suppress(OSError):
                detach()
        self.undo.clear()


# --- perf events ------------------------------------------------------------------------


def sampling_attr(event: str | tuple[int, int], freq: int | None, period: int | None) -> PerfEventAttr:
    """A sampling event: every `period` events, or `freq` samples a second (99 if neither)."""
    if freq is not None and period is not None:
        raise SettingError("attach_perf_event: give freq= (samples per second) or period= (events "
                           "per sample), not both")
    if isinstance(event, str):
        if event not in EVENTS:
            raise UnknownNameError(f"unknown perf event {event!r}; known: {', '.join(EVENTS)} "
                                   "(or a (type, config) pair of perf_event_attr)")
        kind, config = EVENTS[event]
    else:
        kind, config = event
    attr = PerfEventAttr()
    attr.type, attr.size, attr.config = kind, ctypes.sizeof(PerfEventAttr), config
    if period is not None:
        if period < 1:
            raise SettingError(f"attach_perf_event: period={period}: must be at least 1")
        attr.sample_period = period
    else:
        freq = 99 if freq is None else freq
        if freq < 1:
            raise SettingError(f"attach_perf_event: freq={freq}: must be at least 1 (samples a second)")
        attr.sample_period = freq  # the same u64 as sample_freq
        attr.set_flag("freq")
    return attr


def open_sampling(event: str | tuple[int, int], freq: int | None, period: int | None,
                  cpus: Sequence[int] | None, pid: int = -1) -> list[tuple[int, int]]:
    """(cpu, perf event fd) for each CPU (all online ones by default), opened enabled."""
    attr = sampling_attr(event, freq, period)
    chosen = list(online_cpus() if cpus is None else cpus)
    out: list[tuple[int, int]] = []
    try:
        for cpu in chosen:
            try:
                out.append((cpu, perf_event_open(attr, cpu, pid, what=f"perf event {event}")))
            except KernelscopeError as e:
                if attr.type == PERF_TYPE_HARDWARE and not CPU_PMU.exists():
                    raise AttachError(f"perf event {event!r}: this machine has no hardware PMU (no "
                                      f"{CPU_PMU}; usual in a VM): use a software event such as "
                                      "event='cpu-clock'") from None
                raise AttachError(f"perf event {event!r} on CPU {cpu}: {e}") from None
    except BaseException:
        for _, fd in out:
            os.close(fd)
        raise
    return out


def perf_label(event: str | tuple[int, int], freq: int | None, period: int | None, cpu: int) -> str:
    rate = f"period={period}" if period is not None else f"freq={99 if freq is None else freq}"
    return f"perf_event:{event}:{rate}:cpu{cpu}"


def attach_perf_fds(prog_fd: int, fds: list[tuple[int, int]], labels: list[str], into: Attachments) -> None:
    """Run `prog_fd` on each perf event (PERF_EVENT_IOC_SET_BPF), as libbcc does; all or none:
    on a failure every fd is closed, which detaches the CPUs done so far."""
    try:
        for _, fd in fds:
            fcntl.ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
            fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError as e:
        for _, fd in fds:
            os.close(fd)
        raise AttachError(f"could not attach the program to a perf event: {os.strerror(e.errno or 0)} "
                          "(is it a perf_event program?)") from None
    for (_, fd), label in zip(fds, labels, strict=True):
        into.add(label, fd)


# --- XDP and tc -------------------------------------------------------------------------


def ifindex(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        have = sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else []
        raise UnknownNameError(f"no network interface {ifname!r} in this network namespace (it has "
                               f"{', '.join(have) or 'none'}; `ip link` lists them)") from None


def link_create(prog_fd: int, target: int, attach_type: int, flags: int, what: str) -> int:
    opts = libbpf.LinkCreateOpts(sz=ctypes.sizeof(libbpf.LinkCreateOpts), flags=flags)
    fd = libbpf.lib().bpf_link_create(prog_fd, target, attach_type, ctypes.byref(opts))
    if fd < 0:
        err = ctypes.get_errno() or -fd
        raise AttachError(f"{what}: {os.strerror(err)}" + _link_hint(attach_type, err))
    return int(fd)


def _link_hint(attach_type: int, err: int) -> str:
    if err == _errno.EBUSY and attach_type == BPF_XDP:
        return " (the interface already has an XDP program in another mode; `ip link set DEV xdp off`)"
    if err in (_errno.EINVAL, ENOTSUPP) and attach_type != BPF_XDP:
        return " (tcx links need Linux 6.6 or later; is the program SEC(\"tc\")/SCHED_CLS?)"
    if err == _errno.EOPNOTSUPP and attach_type == BPF_XDP:
        return " (the driver has no native XDP: use mode='skb')"
    return ""


@dataclass
class _XdpLink:
    fd: int
    prog_fd: int  # the program it runs
    owner: Attachments
    detach: Callable[[], object]


_XDP: dict[int, _XdpLink] = {}  # ifindex -> this process's XDP link there (one per interface)


def xdp(prog_fd: int, name: str, ifname: str, mode: str, into: Attachments) -> None:
    """An XDP link. An interface runs one XDP program, so where this process's own link is
    there already (a reloaded probe's old program, or another probe's), the link is switched
    to the new program (bpf_link_update) and handed back if it closes while the old one runs."""
    if mode not in XDP_MODES:
        raise SettingError(f"attach_xdp: mode={mode!r}; use one of {', '.join(XDP_MODES)}")
    index = ifindex(ifname)
    point = f"xdp:{ifname}:{mode}"
    old = _XDP.get(index)
    if old is not None and not old.owner.closed:
        libbpf.check(libbpf.lib().bpf_link_update(old.fd, prog_fd, None), f"XDP {name} on {ifname}: update")
        old.owner.give_up(old.detach)
        _own_xdp(index, old.fd, prog_fd, point, into, back=old)
        return
    fd = link_create(prog_fd, index, BPF_XDP, XDP_MODES[mode], f"XDP {name} on {ifname} ({mode})")
    _own_xdp(index, fd, prog_fd, point, into, back=None)


def _own_xdp(index: int, fd: int, prog_fd: int, point: str, into: Attachments, *,
             back: _XdpLink | None) -> None:
    def detach() -> None:
        if _XDP.get(index) is link:
            del _XDP[index]
        if back is not None and not back.owner.closed:  # the previous program still runs: its link again
            libbpf.lib().bpf_link_update(fd, back.prog_fd, None)
            _own_xdp(index, fd, back.prog_fd, point, back.owner, back=None)
        else:
            os.close(fd)

    link = _XdpLink(fd, prog_fd, into, detach)
    _XDP[index] = link
    into.add_undo(point, detach)


TCX = True  # try a tcx link first; False: only the netlink filter older kernels have


def tc(prog_fd: int, name: str, ifname: str, direction: str, into: Attachments) -> None:
    """A tcx link (Linux 6.6+); where the kernel has none, a direct-action filter on the clsact
    qdisc through netlink (bpf_tc_hook_create + bpf_tc_attach), removed on close."""
    types = {"ingress": BPF_TCX_INGRESS, "egress": BPF_TCX_EGRESS}
    if direction not in types:
        raise SettingError(f"attach_tc: direction={direction!r}; use 'ingress' or 'egress'")
    index = ifindex(ifname)
    what = f"tc {name} on {ifname} {direction}"
    if TCX:
        link_opts = libbpf.LinkCreateOpts(sz=ctypes.sizeof(libbpf.LinkCreateOpts))
        fd = libbpf.lib().bpf_link_create(prog_fd, index, types[direction], ctypes.byref(link_opts))
        if fd >= 0:
            into.add(f"tc:{ifname}:{direction}", fd)
            return
        if (ctypes.get_errno() or -fd) not in (_errno.EINVAL, ENOTSUPP):
            raise AttachError(f"{what}: {os.strerror(ctypes.get_errno() or -fd)}")
    so = libbpf.lib()
    point = libbpf.BPF_TC_INGRESS if direction == "ingress" else libbpf.BPF_TC_EGRESS
    hook = libbpf.TcHook(sz=ctypes.sizeof(libbpf.TcHook), ifindex=index, attach_point=point)
    ret = so.bpf_tc_hook_create(ctypes.byref(hook))
    if ret < 0 and -ret != _errno.EEXIST:  # EEXIST: the interface has its clsact qdisc already
        raise AttachError(f"{what}: could not add the clsact qdisc: {os.strerror(-ret)}")
    opts = libbpf.TcOpts(sz=ctypes.sizeof(libbpf.TcOpts), prog_fd=prog_fd)
    ret = so.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts))
    if ret < 0:
        raise AttachError(f"{what}: {os.strerror(-ret)} (is the program SEC(\"tc\")/SCHED_CLS?)")
    gone = libbpf.TcOpts(sz=ctypes.sizeof(libbpf.TcOpts), handle=opts.handle, priority=opts.priority)
    into.add_undo(f"tc:{ifname}:{direction}",
                  lambda: so.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(gone)))


# --- iterators --------------------------------------------------------------------------


def read_iter(link_fd: int, what: str) -> bytes:
    """Everything one pass of the iterator writes (bpf_iter_create, then read to EOF)."""
    fd = libbpf.lib().bpf_iter_create(link_fd)
    if fd < 0:
        raise AttachError(f"{what}: bpf_iter_create: {os.strerror(ctypes.get_errno() or -fd)}")
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


# --- CO-RE (libbpf) ---------------------------------------------------------------------


def core_perf_event(obj: libbpf.Object, prog: libbpf.Program, event: str | tuple[int, int], *,
                    freq: int | None, period: int | None, cpus: Sequence[int] | None) -> None:
    """bpf_program__attach_perf_event on one sampling event per CPU, all or none; each link
    owns its perf event fd (destroying the link closes it)."""
    fds = open_sampling(event, freq, period, cpus)
    made: list[tuple[str, int]] = []
    try:
        for cpu, fd in fds:
            link = libbpf.lib().bpf_program__attach_perf_event(prog.ptr, fd)
            if not link:
                raise AttachError(f"perf event {event} -> {prog.name} on CPU {cpu}: "
                                  f"{os.strerror(ctypes.get_errno())} (is it SEC(\"perf_event\")?)")
            made.append((perf_label(event, freq, period, cpu), link))
    except BaseException:
        for _, link in made:
            libbpf.lib().bpf_link__destroy(link)
        for _, fd in fds[len(made):]:
            os.close(fd)
        raise
    obj.links.extend(made)


def core_usdt(obj: libbpf.Object, prog: libbpf.Program, target: str | int, probe: str) -> None:
    """bpf_program__attach_usdt for a BCC-style (binary path or pid, "provider:name") pair."""
    provider, _, name = probe.rpartition(":")
    if not provider:
        raise SettingError(f"USDT probe {probe!r}: the CO-RE backend needs 'provider:name' "
                           "(`readelf -n BINARY` lists them under stapsdt)")
    pid, binary = (target, f"/proc/{target}/exe") if isinstance(target, int) else (-1, str(target))
    if isinstance(target, str) and "/" not in target:
        binary = shutil.which(target) or target
    with libbpf.captured_log() as log:
        link = libbpf.lib().bpf_program__attach_usdt(prog.ptr, pid, binary.encode(), provider.encode(),
                                                     name.encode(), None)
        err = ctypes.get_errno()
    if not link:
        detail = "".join(log).strip()
        raise AttachError(f"USDT probe {probe} in {target} -> {prog.name}: {os.strerror(err)}"
                          + (f"\n{detail}" if detail else ""))
    obj.links.append((f"usdt:{target}:{probe}", link))


def core_uprobe(obj: libbpf.Object, prog: libbpf.Program, binary: str, sym: str, *, pid: int = -1,
                addr: int = 0, retprobe: bool | None = None) -> None:
    """A uprobe by symbol (or address); `sym` and `retprobe` default to what the SEC() name says
    (SEC("uretprobe/readline"): readline, a return probe)."""
    kind, _, rest = prog.section.partition("/")
    if not sym and not addr:
        sym = rest.rpartition(":")[2].split("+")[0]
        if not sym:
            raise SettingError(f"{prog.name} (SEC(\"{prog.section}\")): name the function: "
                               f"attach_uprobe({binary!r}, 'FUNCTION', {prog.name!r})")
    if retprobe is None:
        retprobe = kind.startswith("uretprobe")
    path = binary if "/" in binary else (shutil.which(binary) or binary)
    with libbpf.captured_log() as log:
        try:
            obj.attach_uprobe(prog, path, sym, addr, pid=pid, retprobe=retprobe)
            return
        except OSError as e:
            err = e
    detail = "".join(log).strip()
    raise AttachError(f"uprobe {binary}:{sym or hex(addr)} -> {prog.name}: {err}\n{detail}") from None


def core_iter(prog: libbpf.Program) -> bytes:
    link = libbpf.lib().bpf_program__attach_iter(prog.ptr, None)
    if not link:
        raise AttachError(f"{prog.name} (SEC(\"{prog.section}\")): could not attach the iterator: "
                          f"{os.strerror(ctypes.get_errno())} (is it SEC(\"iter/...\")?)")
    try:
        return read_iter(libbpf.lib().bpf_link__fd(link), prog.name)
    finally:
        libbpf.lib().bpf_link__destroy(link)


def prog_type(fd: int) -> int:
    """The program type of a loaded program's fd (the first u32 of struct bpf_prog_info)."""
    info, size = ctypes.c_uint32(0), ctypes.c_uint32(4)
    libbpf.check(libbpf.lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
                 "program info")
    return int(info.value)


def program_fd(prog: libbpf.Program) -> int:
    fd = int(libbpf.lib().bpf_program__fd(prog.ptr))
    if fd < 0:
        raise AttachError(f"{prog.name} is not loaded (a `?` section or one deselected has no fd)")
    return fd


class CoreAttach:
    """The attach calls of core.CoreProgram, over its libbpf object (`obj`), its `notes` and
    the `attached` links it made by hand; `program()` and `map_update()` are CoreProgram's."""

    obj: libbpf.Object
    notes: list[str]
    attached: Attachments

    def program(self, name: str) -> libbpf.Program:
        raise NotImplementedError

    def map_update(self, name: str, key: Any, value: Any) -> None:
        raise NotImplementedError

    def attach_uprobe(self, name: str, sym: str = "", fn_name: str = "", **kw: Any) -> None:
        core_uprobe(self.obj, self.program(fn_name), name, sym, **kw)
        drop_note(self.notes, fn_name)

    def attach_perf_event(self, fn_name: str, event: str | tuple[int, int] = "cpu-clock",
                          freq: int | None = None, period: int | None = None,
                          cpus: Sequence[int] | None = None) -> None:
        core_perf_event(self.obj, self.program(fn_name), event, freq=freq, period=period, cpus=cpus)
        drop_note(self.notes, fn_name)

    def attach_usdt(self, target: str | int, probe: str, fn_name: str) -> None:
        core_usdt(self.obj, self.program(fn_name), target, probe)
        drop_note(self.notes, fn_name)

    def attach_xdp(self, fn_name: str, ifname: str, mode: str = "skb") -> None:
        xdp(self.program_fd(fn_name), fn_name, ifname, mode, self.attached)
        drop_note(self.notes, fn_name)

    def attach_tc(self, fn_name: str, ifname: str, direction: str = "ingress") -> None:
        tc(self.program_fd(fn_name), fn_name, ifname, direction, self.attached)
        drop_note(self.notes, fn_name)

    def attach_prog_array(self, map_name: str, programs: Mapping[int, str] | Sequence[str]) -> None:
        for index, name in prog_array_items(programs):
            self.map_update(map_name, index, self.program_fd(name))
            drop_note(self.notes, name)

    def iter_read(self, fn_name: str) -> bytes:
        return core_iter(self.program(fn_name))

    def program_fd(self, fn_name: str) -> int:
        return program_fd(self.program(fn_name))


# --- what an unattached program needs -----------------------------------------------------


def unattached_note(name: str, section: str, label: str | None = None) -> str:
    """Which call attaches program `name` of SEC(`section`), when its SEC() name alone cannot
    (`label` says what the program is, SEC("...") by default)."""
    kind, _, rest = section.partition("/")
    kind = kind.lstrip("?")
    label = label or 'SEC("' + section + '")'
    head = f"{name} ({label}) is not attached:"
    if kind == "perf_event":
        return f"{head} attach it with probe.attach_perf_event({name!r}, event='cpu-clock', freq=99)"
    if kind.startswith("xdp"):
        return f"{head} attach it with probe.attach_xdp({name!r}, 'IFNAME', mode='skb')"
    if kind in ("tc", "tcx", "classifier", "action") or kind.startswith("tcx"):
        direction = "egress" if "egress" in section else "ingress"
        return f"{head} attach it with probe.attach_tc({name!r}, 'IFNAME', direction={direction!r})"
    if kind in ("uprobe", "uretprobe", "uprobe.s", "uretprobe.s"):
        sym = rest.rpartition(":")[2] or "FUNCTION"
        ret = ", retprobe=True" if kind.startswith("uretprobe") else ""
        why = " (libbpf 1.1 needs BINARY:FUNCTION in the section)" if rest else ""
        return (f"{head}{why} attach it with probe.attach_uprobe('/path/to/binary', {sym!r}, "
                f"{name!r}{ret})")
    if kind == "usdt":
        return (f"{head} attach it with usdt=[(BINARY or PID, 'provider:name', {name!r})] in "
                f"Probe(...), or probe.attach_usdt(BINARY or PID, 'provider:name', {name!r})")
    if kind in ("tp", "tracepoint", "raw_tp", "raw_tracepoint"):
        return (f"{head} attach it with probe.attach_tracepoint('CATEGORY:EVENT', {name!r}), or put "
                f"it in a tail-call array with probe.attach_prog_array('MAP', {{0: {name!r}}})")
    if kind == "iter":
        return f"{head} read it with probe.iter_read({name!r})"
    return (f"{head} kernelscope has no attach call for this kind; its fd is "
            f"probe.program.program_fd({name!r}) for your own")


_BCC_CTX = {
    r"struct\s+bpf_perf_event_data\s*\*": "perf_event", r"struct\s+xdp_md\s*\*": "xdp",
    r"struct\s+__sk_buff\s*\*": "tc",
}


def bcc_unattached_notes(code: str) -> list[str]:
    """Notes for BCC functions whose context says a kind BCC never attaches by itself (`code`:
    the source with comments and strings blanked)."""
    notes = []
    for pattern, kind in _BCC_CTX.items():
        for m in re.finditer(r"\bint\s+(\w+)\s*\(\s*" + pattern, code):
            ctx = " ".join(m.group(0).split("(", 1)[1].split()).rstrip("*").strip()
            note = unattached_note(m.group(1), kind, f"a function of {ctx} *")
            if kind == "tc":  # __sk_buff is also a socket filter's context
                note += (" if it is a tc classifier; a socket filter attaches with BCC's "
                         "BPF.attach_raw_socket(probe.bpf.load_func(...), 'IFNAME')")
            notes.append(note)
    return notes


def drop_note(notes: list[str], name: str) -> None:
    """Forget the unattached-program note of `name` (it is attached now)."""
    notes[:] = [n for n in notes if not (n.startswith(f"{name} (") and " is not attached:" in n)]


def prog_array_items(programs: Mapping[int, str] | Sequence[str]) -> list[tuple[int, str]]:
    if isinstance(programs, Mapping):
        return sorted((int(k), str(v)) for k, v in programs.items())
    return list(enumerate(programs))
