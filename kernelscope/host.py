"""What the host offers kernelscope, and the one-time fixes it can make itself.

Three things stand between a fresh Debian machine and a loaded BCC program: the `bcc`
Python package (Debian only, not PyPI), kernel headers where BCC looks for them
(/lib/modules/$(uname -r)/build and .../source), and a mounted tracefs.

Only `prepare()` (what `kernelscope setup` runs, as root) changes the host: each `ensure_*`
function fixes what it can, returns a sentence saying what it changed (or that nothing
needed changing), never replaces a link or file it finds, and raises a `SetupError`
subclass saying how to fix what it cannot. `check()` (what every `Probe.load()` runs) only
looks, and raises the same errors naming the command that fixes them.
The roots (MODULES, SRC, TRACEFS) are read at call time, so tests can point them elsewhere.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import glob
import gzip
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .errors import (
    BCCMissingError,
    BPFPermissionError,
    HeadersMissingError,
    SetupError,
    TracefsAccessError,
)

DEBIAN_BCC = Path("/usr/lib/python3/dist-packages/bcc")
TRACEFS = Path("/sys/kernel/tracing")
DEBUGFS = Path("/sys/kernel/debug")
MODULES = Path("/lib/modules")
SRC = Path("/usr/src")

CAP_PERFMON = 38
CAP_BPF = 39
CAP_SYS_ADMIN = 21


def kernel_release() -> str:
    return platform.release()


def cache_dir(part: str) -> Path:
    """kernelscope's cache folder `part` ($XDG_CACHE_HOME/kernelscope/PART, ~/.cache by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kernelscope" / part


def bcc_shim_dir() -> Path:
    """A folder holding only a link to Debian's `bcc` package, safe to put on sys.path."""
    return cache_dir("pylib")


@functools.cache
def import_bcc() -> ModuleType:
    """Import BCC's Python package, exposing Debian's copy alone if it is not on sys.path yet.

    Adding all of /usr/lib/python3/dist-packages would shadow the venv's numpy and pandas
    with Debian's older builds, so only a folder with a `bcc` symlink is added.
    """
    try:
        import bcc  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        if not DEBIAN_BCC.is_dir():
            raise BCCMissingError(
                "BCC's Python bindings are not installed. Run `make setup`, or "
                "`apt-get install python3-bpfcc libbpfcc` (BCC is not on PyPI: the PyPI "
                "packages named bcc are unrelated)."
            ) from None
        shim = bcc_shim_dir()
        link = shim / "bcc"
        try:
            shim.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(DEBIAN_BCC)
        except OSError as e:
            raise BCCMissingError(f"cannot expose Debian's bcc package at {link}: {e}") from e
        sys.path.append(str(shim))
        try:
            import bcc
        except (ImportError, OSError) as e:
            raise BCCMissingError(
                f"Debian's bcc package is present but does not import ({e}); "
                "`apt-get install --reinstall python3-bpfcc libbpfcc` usually fixes it."
            ) from e
    return bcc


def bcc_version() -> str | None:
    try:
        return str(import_bcc().__version__)
    except (SetupError, AttributeError):
        return None


# --- privileges -------------------------------------------------------------------------


def effective_caps() -> int:
    """The effective capability mask of this process, from /proc/self/status."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def has_bpf_privileges(caps: int | None = None) -> bool:
    caps = effective_caps() if caps is None else caps
    if caps & (1 << CAP_SYS_ADMIN):
        return True
    return bool(caps & (1 << CAP_BPF)) and bool(caps & (1 << CAP_PERFMON))


def require_privileges(caps: int | None = None) -> None:
    if not has_bpf_privileges(caps):
        raise BPFPermissionError(
            "loading BPF programs needs root, or CAP_BPF and CAP_PERFMON: run Jupyter as "
            "root, or `sudo setcap cap_bpf,cap_perfmon+ep $(readlink -f .venv/bin/python)`. "
            "Without them, notebooks can still replay recorded captures."
        )


# --- kernel headers ---------------------------------------------------------------------


@dataclass(frozen=True)
class Headers:
    build: Path  # generated headers and .config (Debian's -amd64 folder)
    source: Path  # the bulk of include/ and arch/ (Debian's -common folder)
    version: str  # UTS_RELEASE of the headers, e.g. 6.1.0-56-amd64

    @property
    def matches_kernel(self) -> bool:
        return self.version == kernel_release()


def headers_version(build: Path) -> str | None:
    for rel in ("include/generated/utsrelease.h", "include/config/kernel.release"):
        p = build / rel
        if p.is_file():
            text = p.read_text(errors="replace")
            m = re.search(r'UTS_RELEASE\s+"([^"]+)"', text)
            return m.group(1) if m else text.strip() or None
    return None


def installed_headers(src: Path | None = None) -> list[Headers]:
    """Debian header packages under /usr/src, newest first (exact match to the kernel first)."""
    src = SRC if src is None else src
    found = []
    for build in sorted(glob.glob(str(src / "linux-headers-*")), reverse=True):
        b = Path(build)
        if b.name.endswith("-common") or not (b / "Makefile").exists():
            continue
        common = Path(re.sub(r"-[a-z0-9]+$", "-common", str(b)))
        source = common if common.is_dir() else b
        version = headers_version(b)
        if version:
            found.append(Headers(b, source, version))
    release = kernel_release()
    found.sort(key=lambda h: h.version != release)
    return found


def find_headers(modules: Path | None = None) -> Headers | None:
    """The headers BCC will compile with: /lib/modules/$(uname -r)/build (and /source)."""
    modules = MODULES if modules is None else modules
    build = modules / kernel_release() / "build"
    if not (build / "Makefile").exists():
        return None
    source = modules / kernel_release() / "source"
    version = headers_version(build) or "unknown"
    return Headers(build.resolve(), source.resolve() if source.exists() else build.resolve(), version)


def _no_headers(release: str) -> HeadersMissingError:
    return HeadersMissingError(
        f"no kernel headers for {release}: BCC needs them to compile. Run "
        "`make setup`, or `apt-get install linux-headers-amd64` (or the exact "
        f"linux-headers-{release} where the archive has it), then `kernelscope setup` as root."
    )


def _differ_note(have: Headers) -> str:
    return "" if have.matches_kernel else (
        f"; running kernel {kernel_release()}: struct layouts may differ (`kernelscope doctor`)"
    )


def _describe(path: Path) -> str:
    """What is at `path`, in words: `a link to X`, `a link to X, which does not exist`, `a folder`."""
    if path.is_symlink():
        dest = os.readlink(path)
        return f"a link to {dest}" + ("" if path.exists() else ", which does not exist")
    return "a folder" if path.is_dir() else "a file"


def check_headers(modules: Path | None = None, src: Path | None = None) -> Headers:
    """The headers BCC will find, or HeadersMissingError saying the command that provides them."""
    have = find_headers(modules)
    if have is not None:
        return have
    modules = MODULES if modules is None else modules
    build = modules / kernel_release() / "build"
    installed = installed_headers(src)
    if not installed:
        raise _no_headers(kernel_release())
    there = f" ({build} is {_describe(build)})" if build.is_symlink() or build.exists() else ""
    raise HeadersMissingError(
        f"BCC finds no kernel headers at {build}{there}; headers {installed[0].version} are "
        f"installed under {installed[0].build.parent}: run `kernelscope setup` as root, which "
        "links them there (kernelscope changes the host only in `kernelscope setup`)."
    )


def ensure_headers(modules: Path | None = None, src: Path | None = None) -> str:
    """Make BCC find headers: link the best installed Debian headers under /lib/modules.

    Returns what was changed. BCC looks only in /lib/modules/$(uname -r)/{build,source};
    Debian installs 6.1 headers for a 6.1 kernel there, not for a custom kernel. A `build` or
    `source` entry that is already there and is not the link this would make is never
    replaced: it is someone else's (a module build, another kernel's package), so it is
    left alone and reported with the command that would replace it.
    """
    modules = MODULES if modules is None else modules
    have = find_headers(modules)
    if have is not None:
        return f"kernel headers: {have.build} ({have.version}), unchanged{_differ_note(have)}"
    candidates = installed_headers(src)
    if not candidates:
        raise _no_headers(kernel_release())
    best = candidates[0]
    target = modules / kernel_release()
    wanted = {"build": best.build, "source": best.source}
    foreign = {
        name: _describe(target / name) for name, dest in wanted.items()
        if ((target / name).is_symlink() or (target / name).exists())
        and not ((target / name).is_symlink() and Path(os.readlink(target / name)) == dest)
    }
    if foreign:
        shown = "; ".join(f"{target / name} is {what}" for name, what in foreign.items())
        replace = " && ".join(f"ln -sfn {wanted[n]} {target / n}" for n in foreign)
        raise HeadersMissingError(
            f"BCC finds no usable kernel headers at {target}/build and kernelscope left what is "
            f"there alone (it replaces nothing it did not make): {shown}. To use the installed "
            f"headers {best.version} instead, as root: {replace}"
        )
    done = []
    try:
        if not target.is_dir():
            target.mkdir(parents=True)
            done.append(f"created {target}")
        for name, dest in wanted.items():
            link = target / name
            if not link.is_symlink():
                link.symlink_to(dest)
                done.append(f"linked {link} -> {dest}")
    except OSError as e:
        raise HeadersMissingError(
            f"headers {best.version} are installed but cannot be linked into {target} ({e}); "
            f"as root: ln -s {best.build} {target}/build && ln -s {best.source} {target}/source"
        ) from e
    note = "" if best.matches_kernel else (
        f"; they are for {best.version}, not {kernel_release()}: programs that read kernel "
        "structs directly may get wrong values (see `kernelscope doctor`)"
    )
    return "; ".join(done) + note


# --- tracefs ----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(fstype: str, target: Path) -> None:
    if _libc.mount(b"nodev", str(target).encode(), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def is_mounted(path: Path, fstype: str) -> bool:
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[1] == str(path) and parts[2] == fstype:
                return True
    except OSError:
        pass
    return False


def not_mounted_error(path: Path, why: str = "") -> SetupError:
    """The SetupError for tracefs not mounted at `path`, naming the command that mounts it."""
    return SetupError(
        f"tracefs is not mounted at {path}{why}; as root: `kernelscope setup` or "
        f"`mount -t tracefs nodev {path}`. Without it, notebooks can still replay recorded "
        "captures (KERNELSCOPE_MODE=replay)."
    )


def check_tracefs(tracefs: Path | None = None) -> Path:
    """tracefs's events/ folder, or SetupError (not mounted) / TracefsAccessError (not readable).

    Readable means this process may list events/; single tracepoints are checked where a
    program names them (tracepoints.check_tracepoint), since their files are 0440.
    """
    tracefs = TRACEFS if tracefs is None else tracefs
    if not is_mounted(tracefs, "tracefs"):
        raise not_mounted_error(tracefs)
    events = tracefs / "events"
    try:
        with os.scandir(events) as entries:
            next(entries, None)
    except PermissionError as e:
        raise TracefsAccessError(tracefs, e) from None
    except OSError as e:
        raise not_mounted_error(tracefs, f" as expected ({events}: {e.strerror})") from None
    return events


def ensure_tracefs(tracefs: Path | None = None) -> str:
    """Mount tracefs when it is not mounted; returns what was changed.

    debugfs is not mounted: BCC (0.26, Python and libbcc) and libbpf look for tracing files
    under /sys/kernel/debug/tracing first and use /sys/kernel/tracing when that is absent, so
    tracefs alone is enough for both backends.
    """
    tracefs = TRACEFS if tracefs is None else tracefs
    if is_mounted(tracefs, "tracefs"):
        return f"tracefs already mounted at {tracefs}, unchanged"
    try:
        _mount("tracefs", tracefs)
    except OSError as e:
        why = f": mounting it failed ({e.strerror})"
        if e.errno in (errno.EPERM, errno.EACCES):
            why += f": it needs CAP_SYS_ADMIN, which this process (uid {os.geteuid()}) lacks"
        raise not_mounted_error(tracefs, why) from e
    return f"mounted tracefs at {tracefs}"


def prepare(backend: str = "bcc") -> list[str]:
    """Change the host so probes can load (`kernelscope setup`); returns what was changed.

    Mounts tracefs and links kernel headers for BCC; the CO-RE backend ("libbpf") needs
    neither BCC nor kernel headers, only tracefs. Nothing else in kernelscope changes the host.
    """
    require_privileges()
    if backend != "bcc":
        return [ensure_tracefs()]
    notes = [ensure_tracefs(), ensure_headers()]
    import_bcc()
    return notes


def check(backend: str = "bcc") -> None:
    """What `Probe.load()` runs: raise what stops a probe loading, naming the fix; change nothing.

    BPFPermissionError (no root, CAP_BPF or CAP_PERFMON), SetupError (tracefs not mounted),
    HeadersMissingError (BCC finds no headers: `kernelscope setup` links them), BCCMissingError.
    Whether this process may read a tracepoint's files is checked where the program names it.
    """
    require_privileges()
    tracefs = TRACEFS
    if not is_mounted(tracefs, "tracefs"):
        raise not_mounted_error(tracefs)
    if backend == "bcc":
        check_headers()
        import_bcc()


# --- kernel configuration ---------------------------------------------------------------

CONFIG_GZ = Path("/proc/config.gz")
LOCKDOWN = Path("/sys/kernel/security/lockdown")


def kernel_config() -> tuple[dict[str, str], str] | None:
    """The running kernel's build options and where they were read from, or None if hidden.

    Options that are off appear as "n" (the file says `# CONFIG_X is not set`), so a
    missing feature can be named rather than guessed.
    """
    for path, opener in ((CONFIG_GZ, gzip.open), (Path(f"/boot/config-{kernel_release()}"), open)):
        try:
            with opener(path, "rt") as f:
                text = f.read()
        except OSError:
            continue
        options = {}
        for line in text.splitlines():
            if line.startswith("CONFIG_") and "=" in line:
                key, _, value = line.partition("=")
                options[key] = value
            elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                options[line[2:].split()[0]] = "n"
        return options, str(path)
    return None


def lockdown_mode() -> tuple[str, str] | None:
    """Kernel lockdown ("none", "integrity" or "confidentiality") and how it was found.

    securityfs is often not mounted, so the forced mode in the kernel config is the fallback.
    """
    try:
        text = LOCKDOWN.read_text()
        m = re.search(r"\[(\w+)\]", text)
        if m:
            return m.group(1), str(LOCKDOWN)
    except OSError:
        pass
    found = kernel_config()
    if found is None:
        return None
    options, source = found
    for mode in ("confidentiality", "integrity"):
        if options.get(f"CONFIG_LOCK_DOWN_KERNEL_FORCE_{mode.upper()}") == "y":
            return mode, f"CONFIG_LOCK_DOWN_KERNEL_FORCE_{mode.upper()}=y in {source}"
    return None
