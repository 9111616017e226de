"""`kernelscope doctor`: what this host can do with eBPF, each item probed for real.

Every attach kind and map kind is tried by loading one small BCC program (compiled once,
about 2 s, most of it parsing kernel headers) and attaching its functions one by one, so a
failure names the kind that failed and the reason, not just "BPF does not work". Nothing
is cached between runs and everything loaded is unloaded before `run_checks` returns.
This module runs the probes; verdicts.py reads their counts into rows, report.py renders them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from .. import host
from ..backends import btf
from ..backends.bcc import capture_fd2, release_bpf
from ..errors import BPFPermissionError, KernelscopeError, SetupError, TracefsAccessError
from .report import Check, DoctorReport
from .verdicts import HITS, MAP_KINDS, ProbeResult, attach_checks, map_checks

BTF_VMLINUX = btf.VMLINUX

# Struct members whose layout is compared between the headers BCC compiles with and the
# running kernel's BTF. None means sizeof(struct). (struct file would need linux/fs.h, which
# adds about a second to the compile.)
LAYOUT_FIELDS: tuple[tuple[str, str | None], ...] = (
    ("task_struct", None),
    ("task_struct", "pid"),
    ("task_struct", "tgid"),
    ("task_struct", "real_parent"),
    ("task_struct", "exit_code"),
    ("task_struct", "comm"),
    ("mm_struct", "pgd"),
    ("mm_struct", "mmap_base"),
)

LAYOUT_WARNING = (
    "programs that read task->tgid get garbage; use tracepoint args, helpers, or the CO-RE backend"
)

BPF_MAP_CREATE = 0
BPF_MAP_TYPE_USER_RINGBUF = 31
SYS_BPF = {"x86_64": 321, "aarch64": 280}

USDT_CHILD = "import sys, gc; print('ready', flush=True); sys.stdin.readline(); gc.collect()"
USDT_PROBE = "python:gc__start"


def report() -> DoctorReport:
    start = time.monotonic()
    checks = run_checks()
    return DoctorReport(checks, time.monotonic() - start)


def run_checks() -> list[Check]:
    """Probe the host; returns one Check per row of the table, in table order."""
    checks = [
        _check_privileges(),
        _check_bcc(),
        _check_headers(),
        _check_tracefs(),
        _check_btf(),
    ]
    skip = _why_not_probed({c.name: c for c in checks})
    if skip:
        checks += [Check(kind, None, f"not probed: {skip}") for kind in HITS]
        checks += [Check(kind, None, f"not probed: {skip}") for kind in MAP_KINDS]
        checks.append(_check_user_ringbuf())
        checks.append(Check("co-re", None, f"not probed: {skip}"))
        checks.append(Check("header layout", None, f"not probed: {skip}"))
        return checks

    btf_thread = _Background(_btf_layout)  # overlaps the compile
    try:
        result = _ProbeRun().run()
    except Exception as e:  # a diagnostic tool reports its own failure as a row, not a traceback
        result = ProbeResult(compile_error=f"the doctor's probe failed: {type(e).__name__}: {e}")
    checks += attach_checks(result)
    checks += map_checks(result)
    checks.append(_check_user_ringbuf())
    checks.append(_check_core())
    checks.append(_check_layout(result, btf_thread.join()))
    return checks


# --- basic checks -----------------------------------------------------------------------


def _check_privileges() -> Check:
    caps = host.effective_caps()
    names = [
        n
        for n, bit in (("CAP_SYS_ADMIN", host.CAP_SYS_ADMIN), ("CAP_BPF", host.CAP_BPF),
                       ("CAP_PERFMON", host.CAP_PERFMON))
        if caps & (1 << bit)
    ]
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    try:
        host.require_privileges(caps)
    except BPFPermissionError as e:
        return Check("privileges", False, f"{who} without CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN",
                     str(e), data={"caps": caps})
    return Check("privileges", True, f"{who} with {', '.join(names)}", data={"caps": caps})


def _check_bcc() -> Check:
    try:
        bcc = host.import_bcc()
    except SetupError as e:
        return Check("bcc", False, "BCC's Python bindings do not import", str(e))
    where = Path(str(bcc.__file__)).parent
    version = getattr(bcc, "__version__", "unknown")
    return Check("bcc", True, f"BCC {version} from {where.resolve()}", data={"version": version})


def _check_headers() -> Check:
    release = host.kernel_release()
    found = host.find_headers()
    if found is None:
        installed = host.installed_headers()
        if installed:
            return Check(
                "kernel headers", False,
                f"headers {installed[0].version} are installed but BCC cannot find them "
                f"(nothing at {host.MODULES}/{release}/build)",
                "run `kernelscope setup` (links them under /lib/modules)",
            )
        return Check(
            "kernel headers", False, f"no kernel headers for {release}",
            f"run `make setup`, or apt-get install linux-headers-amd64 (or linux-headers-{release})",
        )
    data = {"path": str(found.build), "version": found.version, "kernel": release}
    if found.matches_kernel:
        return Check("kernel headers", True, f"{found.build} ({found.version})", data=data)
    return Check(
        "kernel headers", True,
        f"{found.build}: headers {found.version}, running kernel {release} (versions differ; "
        "see header layout)",
        data=data,
    )


def _check_tracefs() -> Check:
    """Mounted, and readable by this process: CAP_BPF and CAP_PERFMON do not open tracefs."""
    for path in (host.TRACEFS, host.DEBUGFS / "tracing"):
        if host.is_mounted(path, "tracefs"):
            try:
                host.check_tracefs(path)
            except TracefsAccessError as e:
                return Check("tracefs", False, f"mounted at {path}, but uid {e.uid} may not read it "
                             "(tracepoints cannot be checked or attached)", str(e), data={"uid": e.uid})
            except SetupError as e:
                return Check("tracefs", False, f"mounted at {path}, but unusable", str(e))
            return Check("tracefs", True, f"mounted at {path}")
    return Check(
        "tracefs", False, f"tracefs is not mounted at {host.TRACEFS}",
        f"run `kernelscope setup`, or as root: mount -t tracefs nodev {host.TRACEFS}",
    )


def _check_btf() -> Check:
    if BTF_VMLINUX.is_file():
        size = BTF_VMLINUX.stat().st_size
        return Check("btf", True, f"{BTF_VMLINUX} ({size / 2**20:.1f} MiB)")
    return Check(
        "btf", False, f"no {BTF_VMLINUX}: the kernel was built without CONFIG_DEBUG_INFO_BTF",
        "fentry and CO-RE need a kernel with CONFIG_DEBUG_INFO_BTF=y",
    )


def _why_not_probed(basics: dict[str, Check]) -> str:
    for name, why in (
        ("privileges", "needs root or CAP_BPF+CAP_PERFMON"),
        ("bcc", "BCC does not import"),
        ("kernel headers", "BCC has no kernel headers to compile with"),
    ):
        if basics[name].ok is not True:
            return why
    return ""


# --- the probe program ------------------------------------------------------------------


class _ProbeRun:
    """Compile one program with a function per attach kind, attach each, trigger, read back."""

    def __init__(self) -> None:
        self.bcc = host.import_bcc()
        self.result = ProbeResult()
        self.usdt_binary = _find_usdt_binary()
        self.fentry_target = _fentry_target()

    def run(self) -> ProbeResult:
        child: subprocess.Popen[bytes] | None = None
        bpf = None
        log: list[str] = []
        try:
            with capture_fd2() as log:
                usdt = None
                if self.usdt_binary is not None:
                    child, usdt = self._start_usdt_child(self.usdt_binary)
                bpf = self._compile(usdt)
                if bpf is not None:
                    self._attach_all(bpf, usdt is not None)
                    self._trigger(child)
                    self._collect(bpf)
        finally:
            if bpf is not None:
                release_bpf(bpf)
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()
            if child is not None and child.stdin is not None:
                child.stdin.close()
            if child is not None and child.stdout is not None:
                child.stdout.close()
        self.result.bcc_log += "".join(log)
        return self.result

    # compile ---------------------------------------------------------------------------

    def _compile(self, usdt: Any) -> Any:
        """Compile with every part; on failure, once more with only the core parts."""
        made: list[Any] = []

        class _DoctorBPF(self.bcc.BPF):  # type: ignore[name-defined]
            """BPF that attaches nothing by itself, so each attach is tried and reported alone."""

            def __init__(self, **kwargs: Any) -> None:
                made.append(self)  # reachable for cleanup even when __init__ fails halfway
                super().__init__(**kwargs)

            def _trace_autoload(self) -> None:
                pass

        parts = {"ringbuf", "layout"}
        if self.fentry_target:
            parts.add("fentry")
        if usdt is not None:
            parts.add("usdt")
        for attempt in (parts, set()):
            log: list[str] = []
            try:
                with capture_fd2() as log:
                    bpf = _DoctorBPF(
                        text=_program(attempt, self.fentry_target).encode(),
                        usdt_contexts=[usdt] if "usdt" in attempt else [],
                    )
            except Exception as e:  # BCC raises bare Exception for compile and USDT errors
                for half_made in made:
                    release_bpf(half_made)
                made.clear()
                error = _first_error("".join(log)) or str(e)
                if not attempt:
                    self.result.compile_error = f"the probe program did not compile: {error}"
                    return None
                for part in parts:
                    self.result.dropped[part] = f"the program with it failed to build: {error}"
                continue
            self.result.compiled = True
            self.result.bcc_log += "".join(log)
            return bpf
        return None

    def _start_usdt_child(self, binary: Path) -> tuple[subprocess.Popen[bytes] | None, Any]:
        try:
            child = subprocess.Popen(
                [str(binary), "-I", "-S", "-c", USDT_CHILD],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )
        except OSError as e:
            self.result.dropped["usdt"] = f"cannot run {binary}: {e}"
            return None, None
        assert child.stdout is not None
        child.stdout.readline()  # the interpreter is up and its probes are mapped
        try:
            usdt = self.bcc.USDT(pid=child.pid)
            usdt.enable_probe(USDT_PROBE, "on_usdt")
        except Exception as e:  # bcc.USDTException subclasses bare Exception
            self.result.dropped["usdt"] = f"{USDT_PROBE} in {binary}: {e}".strip()
            return child, None
        self.result.targets["usdt"] = f"{USDT_PROBE} in {binary} (pid {child.pid})"
        return child, usdt

    # attach ----------------------------------------------------------------------------

    def _attach_all(self, bpf: Any, with_usdt: bool) -> None:
        BPF = self.bcc.BPF
        libc = BPF.find_library(b"c")
        libc_path = libc.decode() if isinstance(libc, bytes) else str(libc)
        kprobe_fn = _syscall_function("getppid") or bpf.get_syscall_fnname(b"getppid").decode()
        steps: dict[str, tuple[str, Callable[[], Any]]] = {
            "tracepoint": (
                "syscalls:sys_enter_getppid",
                lambda: bpf.attach_tracepoint(tp=b"syscalls:sys_enter_getppid",
                                              fn_name=b"on_tracepoint"),
            ),
            "raw tracepoint": (
                "sys_enter",
                lambda: bpf.attach_raw_tracepoint(tp=b"sys_enter", fn_name=b"on_raw_tracepoint"),
            ),
            "kprobe": (
                kprobe_fn,
                lambda: bpf.attach_kprobe(event=kprobe_fn.encode(), fn_name=b"on_kprobe"),
            ),
            "uprobe": (
                f"getpid in {libc_path}",
                lambda: bpf.attach_uprobe(name=b"c", sym=b"getpid", fn_name=b"on_uprobe",
                                          pid=os.getpid()),
            ),
        }
        if self.fentry_target and "fentry" not in self.result.dropped:
            steps["fentry"] = (self.fentry_target, lambda: self._attach_fentry(bpf))
        for kind, (target, attach) in steps.items():
            self.result.targets[kind] = target
            try:
                attach()
            except Exception as e:  # BCC raises bare Exception for every attach failure
                self.result.attached[kind] = str(e)
                self.result.errnos[kind] = ctypes.get_errno()
            else:
                self.result.attached[kind] = None
        if with_usdt:
            self.result.attached["usdt"] = None  # BCC attached it while compiling

    def _attach_fentry(self, bpf: Any) -> None:
        name = f"kfunc__{self.fentry_target}".encode()
        try:
            bpf.load_func(name, self.bcc.BPF.TRACING)
        except Exception:
            # BCC words every EPERM as "Need super-user privileges", even for root.
            err = ctypes.get_errno()
            raise OSError(err, f"loading a tracing (fentry) program failed: "
                               f"{errno.errorcode.get(err, err)} ({os.strerror(err)})") from None
        bpf.attach_kfunc(fn_name=name)

    # trigger and read back -------------------------------------------------------------

    def _trigger(self, child: subprocess.Popen[bytes] | None) -> None:
        os.getppid()  # tracepoint, raw tracepoint, kprobe; the tracepoint emits one event
        os.getpid()  # uprobe on libc's getpid
        os.getpgid(0)  # fentry
        if child is not None and child.stdin is not None:
            with suppress(OSError):
                child.stdin.write(b"go\n")
                child.stdin.flush()
            with suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)

    def _collect(self, bpf: Any) -> None:
        res = self.result
        counts = {"ring": 0, "perf": 0}

        def on_ring(_ctx: Any, _data: Any, _size: int) -> None:
            counts["ring"] += 1

        def on_perf(_cpu: int, _data: Any, _size: int) -> None:
            counts["perf"] += 1

        has_ring = "ringbuf" not in res.dropped
        if has_ring:
            bpf[b"ring_out"].open_ring_buffer(on_ring)
        bpf[b"perf_out"].open_perf_buffer(on_perf)
        os.getppid()  # buffers opened after the first trigger: emit once more
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not (
            counts["perf"] and (counts["ring"] or not has_ring)
        ):
            if has_ring:
                bpf.ring_buffer_poll(20)
            bpf.perf_buffer_poll(20)
        res.ring_events, res.perf_events = counts["ring"], counts["perf"]
        hits = bpf[b"hits"]
        res.hits = {kind: int(hits[hits.Key(i)].value) for i, kind in enumerate(HITS)}
        if "layout" not in res.dropped:
            table = bpf[b"layout"]
            values = [int(table[table.Key(i)].value) for i in range(len(LAYOUT_FIELDS) + 1)]
            if values[-1]:  # the program sets the last slot once it has filled the rest
                pairs = zip(LAYOUT_FIELDS, values[:-1], strict=True)
                res.layout = {_field_name(s, m): v for (s, m), v in pairs}


def _program(parts: set[str], fentry_target: str) -> str:
    """The doctor's BPF program: one function per attach kind, each counting its own hits."""
    fills = []
    for i, (struct_name, member) in enumerate(LAYOUT_FIELDS):
        what = (f"sizeof(struct {struct_name})" if member is None
                else f"offsetof(struct {struct_name}, {member})")
        fills.append(f"    put_layout({i}, {what});")
    fills.append(f"    put_layout({len(LAYOUT_FIELDS)}, 1);")
    idx = {kind: i for i, kind in enumerate(HITS)}
    src = [
        "#include <linux/sched.h>",
        "#include <linux/mm_types.h>",
        f"BPF_ARRAY(hits, u64, {len(HITS)});",
        "BPF_PERF_OUTPUT(perf_out);",
        f"static __always_inline int mine(void) "
        f"{{ return (bpf_get_current_pid_tgid() >> 32) == {os.getpid()}; }}",
        "static __always_inline void count(int i) "
        "{ int k = i; u64 *v = hits.lookup(&k); if (v) __sync_fetch_and_add(v, 1); }",
    ]
    if "layout" in parts:
        src += [
            f"BPF_ARRAY(layout, u64, {len(LAYOUT_FIELDS) + 1});",
            "static __always_inline void put_layout(int i, u64 v) "
            "{ int k = i; u64 val = v; layout.update(&k, &val); }",
            "static __always_inline void fill_layout(void) {",
            *fills,
            "}",
        ]
    else:
        src.append("static __always_inline void fill_layout(void) {}")
    ring = ""
    if "ringbuf" in parts:
        src.append("BPF_RINGBUF_OUTPUT(ring_out, 1);")
        ring = "ring_out.ringbuf_output(&marker, sizeof(marker), 0);"
    src += [
        "int on_tracepoint(void *ctx) {",
        f"    if (!mine()) return 0; count({idx['tracepoint']}); fill_layout();",
        f"    u64 marker = 0x6b736370; {ring}",
        "    perf_out.perf_submit(ctx, &marker, sizeof(marker));",
        "    return 0;",
        "}",
        "int on_raw_tracepoint(struct bpf_raw_tracepoint_args *ctx) "
        f"{{ if (mine()) {{ count({idx['raw tracepoint']}); fill_layout(); }} return 0; }}",
        f"int on_kprobe(struct pt_regs *ctx) {{ if (mine()) count({idx['kprobe']}); return 0; }}",
        f"int on_uprobe(struct pt_regs *ctx) {{ if (mine()) count({idx['uprobe']}); return 0; }}",
        f"int on_usdt(struct pt_regs *ctx) {{ count({idx['usdt']}); return 0; }}",
    ]
    if "fentry" in parts:
        src.append(f"KFUNC_PROBE({fentry_target}) "
                   f"{{ if (mine()) count({idx['fentry']}); return 0; }}")
    return "\n".join(src) + "\n"


def _syscall_function(name: str) -> str:
    """The kernel function behind a syscall, without BCC's slow /proc/kallsyms lookup."""
    prefix = {"x86_64": "__x64_sys_", "aarch64": "__arm64_sys_"}.get(platform.machine())
    return prefix + name if prefix else ""


def _field_name(struct_name: str, member: str | None) -> str:
    return f"sizeof({struct_name})" if member is None else f"{struct_name}.{member}"


def _fentry_target() -> str:
    """A kernel function this process can call that the running kernel's BTF describes."""
    try:
        strings = BTF_VMLINUX.read_bytes()
    except OSError:
        return ""
    for name in (_syscall_function("getpgid"), "__do_sys_getpgid", "do_getpgid"):
        if name and b"\0" + name.encode() + b"\0" in strings:
            return name
    return ""


# --- USDT -------------------------------------------------------------------------------


def _find_usdt_binary() -> Path | None:
    """A Python interpreter built with dtrace markers (Debian's is; pyenv's usually is not)."""
    seen = set()
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if not candidate:
            continue
        try:  # an interpreter under a folder this user may not search (/root/.pyenv) is no candidate
            path = Path(candidate).resolve()
            if path in seen or not path.is_file():
                continue
        except OSError:
            continue
        seen.add(path)
        if _elf_has_section(path, b".note.stapsdt"):
            return path
    return None


def _elf_has_section(path: Path, name: bytes) -> bool:
    """True when the 64-bit ELF file at `path` has a section called `name`."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:
                return False
            end = "<" if head[5] == 1 else ">"
            (shoff,) = struct.unpack_from(end + "Q", head, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", head, 0x3A)
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            str_off, str_size = struct.unpack_from(end + "QQ", table, shstrndx * shentsize + 0x18)
            f.seek(str_off)
            names = f.read(str_size)
    except (OSError, struct.error):
        return False
    for i in range(shnum):
        (sh_name,) = struct.unpack_from(end + "I", table, i * shentsize)
        if names[sh_name:names.find(b"\0", sh_name)] == name:
            return True
    return False


def _check_user_ringbuf() -> Check:
    """Create a BPF_MAP_TYPE_USER_RINGBUF map with bpf(2) directly: BCC has no such map type."""
    bcc_version = host.bcc_version() or "?"
    bcc_has_it = False
    with suppress(SetupError):
        bcc_has_it = hasattr(host.import_bcc().table, "BPF_MAP_TYPE_USER_RINGBUF")
    nr = SYS_BPF.get(platform.machine())
    if nr is None:
        return Check("user ringbuf", None, f"unknown: no bpf(2) number for {platform.machine()}")
    # union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, ...
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("IIII", attr, 0, BPF_MAP_TYPE_USER_RINGBUF, 0, 0, 4096)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(BPF_MAP_CREATE), attr,
                      ctypes.c_uint(len(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.EPERM and not host.has_bpf_privileges():
            return Check("user ringbuf", None, "not probed: needs root or CAP_BPF")
        return Check("user ringbuf", False,
                     f"the kernel refused BPF_MAP_TYPE_USER_RINGBUF: {os.strerror(err)} "
                     "(needs Linux 6.1 or later)")
    os.close(fd)
    bcc_note = ("BCC can declare it too" if bcc_has_it else
                f"BCC {bcc_version} cannot declare it (unsupported map type); "
                "use the libbpf/CO-RE backend")
    return Check("user ringbuf", True, f"the kernel creates BPF_MAP_TYPE_USER_RINGBUF; {bcc_note}",
                 data={"bcc_supports": bcc_has_it})


CORE_PROBE = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
struct ev { u32 pid; u32 tgid; u32 ppid; };
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096 * 4); } ks_doctor_core SEC(".maps");
SEC("tp/syscalls/sys_enter_getppid")
int ks_doctor_core_tp(void *ctx) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != TARGET) return 0;
    struct task_struct *t = (struct task_struct *)bpf_get_current_task();
    struct ev *e = bpf_ringbuf_reserve(&ks_doctor_core, sizeof(*e), 0);
    if (!e) return 0;
    e->pid = pid;
    e->tgid = BPF_CORE_READ(t, tgid);
    e->ppid = BPF_CORE_READ(t, real_parent, tgid);
    bpf_ringbuf_submit(e, 0);
    return 0;
}
"""


def _check_core() -> Check:
    """Compile, load and run a CO-RE program that reads task_struct; are the values right?"""
    from ..backends.core import clang
    from ..backends.libbpf import version
    from ..probe import Probe

    fix = "apt-get install clang libbpf-dev bpftool (or `make setup`)"
    try:
        tools = f"clang ({clang()}), libbpf {version()}"
        p = Probe(CORE_PROBE, cflags=[f"-DTARGET={os.getpid()}"], backend="libbpf").start()
        try:
            for _ in range(3):
                os.getppid()
            p.stop()
            df = p.df
        finally:
            p.close()
    except KernelscopeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, TracefsAccessError):  # the toolchain is not what is missing
            return Check("co-re", None, f"not probed: uid {e.uid} may not read tracefs (see tracefs)")
        return Check("co-re", False, f"the CO-RE backend failed: {first}", fix)
    if len(df) != 3:
        return Check("co-re", False, f"a CO-RE program ran, but {len(df)} of 3 events arrived")
    right = bool((df["tgid"] == os.getpid()).all() and (df["ppid"] == os.getppid()).all())
    if not right:
        return Check("co-re", False, f"{tools}: task->tgid read {int(df['tgid'][0])}, expected {os.getpid()}")
    return Check("co-re", True, f"{tools}; vmlinux.h from this kernel's BTF: task->tgid and "
                 "real_parent->tgid read right (%%bpf cells with SEC(...), probe.send)")


# --- header layout vs BTF ---------------------------------------------------------------


def _btf_layout() -> dict[str, int] | str:
    """Sizes and byte offsets of LAYOUT_FIELDS in the running kernel, or why they are unknown."""
    if btf.bpftool() is None:
        return "bpftool is not installed (apt-get install bpftool)"
    if not BTF_VMLINUX.is_file():
        return f"no {BTF_VMLINUX}"
    try:
        types = btf.Types.load(BTF_VMLINUX)
    except KernelscopeError as e:
        return str(e)
    out = {}
    for struct_name, member in LAYOUT_FIELDS:
        t = types.find(f"struct {struct_name}")
        if t is None:
            continue
        if member is None:
            out[_field_name(struct_name, None)] = int(t["size"])
            continue
        bits = _member_bits(t, member, types.by_id)
        if bits is not None:
            out[_field_name(struct_name, member)] = bits // 8
    return out


def _member_bits(t: dict[str, Any], member: str, by_id: dict[int, dict[str, Any]]) -> int | None:
    """Bit offset of `member` in struct/union `t`, looking inside anonymous members."""
    for m in t.get("members", []):
        if m["name"] == member:
            return int(m["bits_offset"])
    for m in t.get("members", []):
        inner = by_id.get(m["type_id"])
        if m["name"] == "(anon)" and inner is not None and inner["kind"] in ("STRUCT", "UNION"):
            bits = _member_bits(inner, member, by_id)
            if bits is not None:
                return int(m["bits_offset"]) + bits
    return None


def _check_layout(res: ProbeResult, btf: dict[str, int] | str | None) -> Check:
    if not res.compiled or "layout" in res.dropped:
        why = res.compile_error or f"the layout probe did not build: {res.dropped['layout']}"
        return Check("header layout", None, f"unknown: {why}")
    if not res.layout:
        return Check("header layout", None, "unknown: the layout probe never ran")
    if not isinstance(btf, dict):
        return Check("header layout", None, f"unknown: cannot read the kernel's BTF: {btf}",
                     data={"headers": res.layout})
    rows = {k: (v, btf.get(k)) for k, v in res.layout.items()}
    differ = {k: hv for k, hv in rows.items() if hv[1] is not None and hv[0] != hv[1]}
    data = {"headers": res.layout, "btf": btf, "differ": sorted(differ)}
    compared = sum(1 for _, b in rows.values() if b is not None)
    if not differ:
        return Check("header layout", True,
                     f"headers agree with the kernel's BTF on {compared} sizes/offsets", data=data)
    shown = ", ".join(f"{k} {h} vs {b}" for k, (h, b) in differ.items())
    return Check(
        "header layout", False,
        f"headers and kernel disagree on {len(differ)} of {compared} (headers vs BTF, bytes): "
        f"{shown}. {LAYOUT_WARNING}",
        f"install headers built for {host.kernel_release()} (Debian: "
        f"linux-headers-{host.kernel_release()}, where the archive has it), or avoid reading "
        "kernel structs: "
        f"{LAYOUT_WARNING.split('; ', 1)[1]}",
        data=data,
    )


# --- helpers ----------------------------------------------------------------------------


class _Background:
    """Run a function in a thread (the BTF dump overlaps the BCC compile, which drops the GIL)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except Exception as e:  # reported in the table, not raised from the thread
            self._value = f"{type(e).__name__}: {e}"

    def join(self) -> Any:
        self._thread.join()
        return self._value


def _first_error(log: str) -> str:
    for line in log.splitlines():
        if "error:" in line:
            return line.split("error:", 1)[1].strip()
    return ""
