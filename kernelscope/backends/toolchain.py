"""The CO-RE toolchain: clang, a vmlinux.h for the running kernel, libbpf's headers brought
up to what current libbpf-tools sources use, and the `-mcpu` the kernel accepts.

Debian 12 ships libbpf 1.1 and bpftool 7.1. Sources written against newer releases use
`BPF_UPROBE`/`BPF_URETPROBE` (bpf_tracing.h), `bpf_ksym_exists` (bpf_helpers.h) and kfunc
prototypes (a vmlinux.h from bpftool >= 7.5 declares them). kernelscope's include/ folder
shadows the two libbpf headers: each includes the installed one (`#include_next`) and then
defines only what it lacks; the kfunc prototypes are generated from the kernel's BTF into the
cached vmlinux.h, as bpftool 7.5 does.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import tempfile
from functools import cache
from pathlib import Path

from .. import host
from ..errors import SchemaError, SetupError
from . import btf
from .guard import run_tool

CACHE = host.cache_dir("vmlinux")
INCLUDE = Path(__file__).parent / "include"  # bpf/bpf_helpers.h, bpf/bpf_tracing.h shadows
HELPER_DEFS = Path("/usr/include/bpf/bpf_helper_defs.h")
VMLINUX_FORMAT = 2  # bump when what vmlinux_dir() writes changes: 2 = with kfunc prototypes
_HELPER_NAME = re.compile(r"\(\s*\*\s*(?:const\s+)?(\w+)\s*\)\s*\(")


def vmlinux_dir() -> Path:
    """A folder holding vmlinux.h for the running kernel, generated from its BTF once, cached
    (per user and cache folder: a process that changed uid must not reuse root's folder),
    with `extern __weak __ksym` prototypes of the kernel's kfuncs at its end."""
    euid = os.geteuid()
    try:
        return _vmlinux_dir(euid, CACHE)
    except PermissionError:  # a cache folder this user may not use (another user's $HOME)
        spare = Path(tempfile.gettempdir()) / f"kernelscope-vmlinux-{euid}"
        spare.mkdir(mode=0o700, exist_ok=True)
        if spare.stat().st_uid != euid:
            raise SetupError(f"cannot use {CACHE} for vmlinux.h (permission denied), and {spare} belongs "
                             "to another user: set XDG_CACHE_HOME to a folder of yours") from None
        return _vmlinux_dir(euid, spare)


@cache
def _vmlinux_dir(_euid: int, cache_root: Path) -> Path:
    if not btf.VMLINUX.is_file():
        raise SetupError(f"no {btf.VMLINUX}: this kernel has no BTF (CONFIG_DEBUG_INFO_BTF), "
                         "which CO-RE programs need; use the BCC backend (no SEC() sections)")
    digest = hashlib.sha256(btf.VMLINUX.read_bytes()).hexdigest()[:16]
    folder = cache_root / f"{host.kernel_release()}-{digest}-v{VMLINUX_FORMAT}"
    header = folder / "vmlinux.h"
    if header.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    proc = run_tool([btf.require_bpftool(), "btf", "dump", "file", str(btf.VMLINUX), "format", "c"],
                    text=False)
    if proc.returncode != 0:
        raise SetupError(f"bpftool could not dump the kernel's BTF as C: "
                         f"{proc.stderr.decode(errors='replace').strip()}")
    text = proc.stdout.decode()
    if "BPF_NO_KFUNC_PROTOTYPES" not in text:  # bpftool < 7.5: add them
        text = with_kfuncs(text, btf.kfunc_prototypes(btf.Types.load(btf.VMLINUX), helper_names()))
    tmp = header.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(header)
    return folder


def with_kfuncs(vmlinux_h: str, prototypes: str) -> str:
    """vmlinux.h with kfunc prototypes before its closing include guard, behind the switch
    bpftool uses (`#define BPF_NO_KFUNC_PROTOTYPES` before including it turns them off)."""
    block = ("#ifndef BPF_NO_KFUNC_PROTOTYPES\n/* kfuncs of the running kernel (kernelscope, from BTF "
             "decl tags \"bpf_kfunc\") */\n" + prototypes + "#endif /* BPF_NO_KFUNC_PROTOTYPES */\n\n")
    end = vmlinux_h.rfind("#endif /* __VMLINUX_H__ */")
    return vmlinux_h[:end] + block + vmlinux_h[end:] if end >= 0 else vmlinux_h + block


def helper_names() -> frozenset[str]:
    """BPF helpers libbpf's bpf_helper_defs.h declares: never redeclared as kfuncs."""
    try:
        return frozenset(_HELPER_NAME.findall(HELPER_DEFS.read_text()))
    except OSError:
        return frozenset()


@cache
def clang() -> str:
    for name in ("clang", "clang-16", "clang-15", "clang-14"):
        for d in [*os.environ.get("PATH", "/usr/bin").split(os.pathsep), "/usr/bin"]:
            if os.access(os.path.join(d, name), os.X_OK):
                return os.path.join(d, name)
    raise SetupError("clang is not installed: apt-get install clang (or run `make setup`)")


# --- -mcpu -----------------------------------------------------------------------------------

# Tiny socket-filter programs, one per BPF ISA level clang can target: the kernel loads one
# only if its verifier knows every instruction in it. (code, dst | src << 4, off, imm)
_ISA_PROBES: dict[str, list[tuple[int, int, int, int]]] = {
    # v3: 32-bit jumps (Linux 5.1) and atomics that return the old value (5.12)
    "v3": [(0xB7, 0, 0, 0), (0x7B, 10 | 0 << 4, -8, 0), (0xB7, 1, 0, 1),
           (0xDB, 10 | 1 << 4, -8, 0x01), (0xA6, 1, 0, 1), (0x95, 0, 0, 0)],
    # v2: the "less than" conditional jumps (Linux 4.14)
    "v2": [(0xB7, 0, 0, 0), (0xB7, 1, 0, 0), (0xA5, 1, 0, 1), (0x95, 0, 0, 0)],
}
_V1_PROBE = [(0xB7, 0, 0, 0), (0x95, 0, 0, 0)]  # r0 = 0; exit: loads wherever loading is allowed


class _Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("regs", ctypes.c_uint8), ("off", ctypes.c_int16),
                ("imm", ctypes.c_int32)]


def _loads(insns: list[tuple[int, int, int, int]]) -> bool:
    from . import libbpf

    prog = (_Insn * len(insns))(*[_Insn(*i) for i in insns])
    load = libbpf.lib().bpf_prog_load
    load.restype = ctypes.c_int
    load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t,
                     ctypes.c_void_p]
    fd = load(1, b"ks_isa", b"GPL", ctypes.addressof(prog), len(insns), None)  # 1: SOCKET_FILTER
    if fd < 0:
        return False
    os.close(fd)
    return True


def kernel_mcpu() -> str:
    """The newest BPF ISA (clang's -mcpu) the running kernel's verifier accepts: probed once
    per process and user. Where this process may load nothing at all (no CAP_BPF, unprivileged
    BPF off), the probe tells nothing, and v3 is kept: no program of this user loads anyway."""
    return _kernel_mcpu(os.geteuid())


@cache
def _kernel_mcpu(_euid: int) -> str:
    if not _loads(_V1_PROBE):
        return "v3"
    return next((cpu for cpu, insns in _ISA_PROBES.items() if _loads(insns)), "v1")


def mcpu_flags(cflags: tuple[str, ...]) -> list[str]:
    """`-mcpu=` for a CO-RE compile: the cell's own (`cflags=["-mcpu=v1"]`) when it gives one,
    else the kernel's newest (v3 here: atomics that return a value need it). Neither is right
    for every program: v3 implies 32-bit sub-registers (alu32), and some programs' bounds
    checks are lost in 32-bit arithmetic (libbpf-tools' cpufreq is rejected under v3, and its
    Makefile builds it with clang's default, v1; its softirqs needs v3)."""
    if any(f.startswith("-mcpu") for f in cflags):
        return []
    return [f"-mcpu={kernel_mcpu()}"]


def compile_flags(cflags: tuple[str, ...]) -> list[str]:
    """clang's flags for a CO-RE object, the cell's own `cflags` last."""
    return ["-g", "-O2", "-target", "bpf", *mcpu_flags(cflags), "-D__TARGET_ARCH_x86",
            "-I", str(INCLUDE), "-I", str(vmlinux_dir()), f"-I/usr/include/{os.uname().machine}-linux-gnu",
            "-Wno-compare-distinct-pointer-types", "-Wno-unused-value", "-Wno-gnu-statement-expression",
            *cflags]


_TYPE_NAME = re.compile(r"^(?:(?:struct|union|enum)\s+)?[A-Za-z_]\w*$")


def anchored_type(source: Path, ctype: str, cflags: tuple[str, ...],
                  where: str) -> tuple[btf.Types, dict[str, object]]:
    """C type `ctype` as laid out in the compiled `source`, when the object's BTF lacks it.

    clang puts a type in BTF only when a global, a map or a function signature uses it; an
    event struct used by local variables alone is missing. Compiling the same source with one
    global pointer to the type added (as prepare()'s anchors do) gives its exact layout.
    """
    name = " ".join(ctype.split())
    if not _TYPE_NAME.match(name):
        raise SchemaError(f"{where}: {ctype!r} is not a C type name; give `struct NAME`, `union NAME` "
                          "or a typedef name, or a numpy dtype")
    probe = source.with_name("named_type.c")
    probe.write_text(f'#include "{source.name}"\n#line 1 "<kernelscope dtypes>"\n'
                     f"{name} *__ks_named_type __attribute__((used));\n")
    out = probe.with_suffix(".o")
    proc = run_tool([clang(), *compile_flags(cflags), "-c", str(probe), "-o", str(out)], cwd=source.parent)
    if proc.returncode != 0:
        said = next((ln.split("error:", 1)[1].strip() for ln in proc.stderr.splitlines() if "error:" in ln),
                    proc.stderr.strip())
        raise SchemaError(f"{where}: no type {name!r} in the program ({said}); name a struct, union or "
                          "typedef the cell or its headers define")
    types = btf.Types.load(out)
    var = types.var("__ks_named_type")
    t = types.resolve(types.resolve(var["type_id"])["type_id"]) if var else None
    if t is None or t["kind"] == "FWD":
        raise SchemaError(f"{where}: no type {name!r} in the program (it is never defined); name a "
                          "struct, union or typedef the cell or its headers define")
    return types, t
