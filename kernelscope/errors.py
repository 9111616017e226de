"""Exception classes: every failure a user can fix has its own type and a message saying how."""

from __future__ import annotations

import os
from collections.abc import Sequence


class KernelscopeError(Exception):
    """Base class of every error kernelscope raises on purpose."""


class SetupError(KernelscopeError):
    """The host lacks something kernelscope needs (BCC, headers, tracefs); the message says how to fix it."""


class BCCMissingError(SetupError, ImportError):
    """Debian's BCC Python bindings (python3-bpfcc) cannot be imported."""


class HeadersMissingError(SetupError):
    """BCC cannot find kernel headers for the running kernel."""


class BPFPermissionError(KernelscopeError, PermissionError):
    """Loading or attaching needs root, or CAP_BPF and CAP_PERFMON."""


class TracefsAccessError(SetupError, PermissionError):
    """This process may not read tracefs, where the kernel lists tracepoints and their formats.

    tracefs is mounted root-only (the top folder 0700, files 0440 or 0640 root:root), and
    reading it is a file permission check, not a capability one: CAP_BPF and CAP_PERFMON do
    not open it. `group_command` is the remount that does (checked on Linux 6.18: with it, a
    uid in that group with CAP_BPF and CAP_PERFMON loads and attaches tracepoint probes;
    mode=755 alone is not enough, the files stay root:root 0440).
    """

    def __init__(self, tracefs: os.PathLike[str] | str, denied: OSError | None = None,
                 uid: int | None = None) -> None:
        self.tracefs = str(tracefs)
        self.uid = os.geteuid() if uid is None else uid
        where = f" ({denied.filename}: {denied.strerror})" if denied is not None and denied.filename else ""
        super().__init__(
            f"tracefs at {self.tracefs} is not readable by uid {self.uid}{where}: run as root, or give "
            f"this user read access, as root: `{self.group_command(self.tracefs)}` with the user in "
            "group GID (tracefs's files are group-readable; mode=755 alone is not enough), until the "
            "next reboot; CAP_BPF and CAP_PERFMON alone do not open tracefs. "
            "Without it, notebooks can still replay recorded captures (KERNELSCOPE_MODE=replay)."
        )

    @staticmethod
    def group_command(tracefs: os.PathLike[str] | str, gid: int | str = "GID") -> str:
        """The remount that lets group `gid` read tracefs (its top folder 0750, files group `gid`)."""
        return f"mount -o remount,mode=750,gid={gid} {tracefs}"


class CompileError(KernelscopeError):
    """clang rejected the program. `line` is the line in the user's source, when known."""

    def __init__(self, message: str, line: int | None = None, log: str = "") -> None:
        super().__init__(message)
        self.line = line
        self.log = log


class VerifierError(KernelscopeError):
    """The kernel's verifier rejected the program.

    The message is `headline` (the verdict) and `excerpt`: the few log lines that explain it
    (the last instructions followed, under the cell lines they came from, the state of the
    registers the failing one used, the verifier's own words), at most MAX_LINES lines in all.
    `log` holds the verifier's whole log; `format(verbose=True)` shows it. `line` is the cell
    line of the failing instruction, when the log's line info names one.
    """

    MAX_LINES = 12  # of the message, headline included

    def __init__(self, message: str, log: str = "", *, excerpt: Sequence[str] = (),
                 line: int | None = None) -> None:
        self.headline = message
        self.log = log
        self.excerpt = list(excerpt)
        self.line = line
        super().__init__(self.format())

    def format(self, verbose: bool = False, hint: str | None = None) -> str:
        """The message: the headline and the excerpt, or with `verbose` the whole log. `hint`
        replaces the closing line saying where the whole log is (`None`: this error's `.log`)."""
        if verbose and self.log.strip():
            return f"{self.headline}\n{self.log.strip()}"
        if not self.excerpt:
            return self.headline
        n = len(self.log.strip().splitlines())
        more = hint if hint is not None else f"(the verifier's whole log, {n:,} lines, is this error's .log)"
        return "\n".join([self.headline, *self.excerpt, *([more] if more else [])])


class RelocationError(VerifierError):
    """libbpf could not relocate a CO-RE read: a field or type of the program is not in the kernel's BTF."""


class MapCreateError(KernelscopeError):
    """The kernel refused to create one of the program's maps; the message names it, its type and size."""


class SectionError(KernelscopeError):
    """libbpf cannot tell a program's type from its SEC("...") name; the message names the section."""


class AttachError(KernelscopeError):
    """A probe could not be attached (unknown tracepoint, kernel lacks the attach kind, ...)."""


class UnknownTracepointError(AttachError, LookupError):
    """No such tracepoint (or raw tracepoint) on the running kernel; the message names close matches."""


class UnsupportedError(AttachError):
    """The running kernel lacks a feature; `feature` names it (e.g. CONFIG_KPROBES)."""

    def __init__(self, message: str, feature: str = "") -> None:
        super().__init__(message)
        self.feature = feature


class SettingError(KernelscopeError, ValueError):
    """A setting (KERNELSCOPE_MODE, ...) has a value kernelscope cannot use; the message lists valid ones."""


class UnknownNameError(KernelscopeError, LookupError):
    """The program has no map, global or user ring buffer by that name; the message lists those it has."""


class SchemaError(KernelscopeError):
    """An output map's event type cannot be turned into a numpy dtype."""


class ClosedError(KernelscopeError):
    """The probe or reader was closed; its data stays readable, the kernel side is gone."""


class CaptureError(KernelscopeError):
    """A file is not a kernelscope capture, is of a version this kernelscope cannot read, or is missing."""


class UserRingFullError(KernelscopeError):
    """A user ring buffer had no room left; `sent` records went in, `remaining` did not."""

    def __init__(self, message: str, sent: int, remaining: int) -> None:
        super().__init__(message)
        self.sent = sent
        self.remaining = remaining


class InternalError(KernelscopeError):
    """A fault inside kernelscope (not the user's doing): a bug, or a buffer in an impossible state."""


class CorruptBufferError(InternalError):
    """A ring or perf buffer holds what the kernel never writes (a bad record length, impossible
    positions); the reader skipped the damaged bytes so the next read starts clean."""


class CaptureMissingError(CaptureError, FileNotFoundError):
    """There is no capture file at the path given."""


class CaptureDamagedError(CaptureError):
    """A capture's bytes are not what was saved (a checksum fails, the file is cut short)."""


class PrintkAccessError(SetupError, PermissionError):
    """bpf_printk output is read from a private tracefs instance, which needs root to make."""

    def __init__(self, path: os.PathLike[str] | str, denied: OSError) -> None:
        self.path = str(path)
        super().__init__(
            f"cannot make the tracefs instance {self.path} that bpf_printk output is read from "
            f"({denied.strerror}, uid {os.geteuid()}): making instances needs root (tracefs's instances/ "
            "folder is root's, whatever its mount mode); run as root, or send the values through a ring "
            "buffer (BPF_RINGBUF_OUTPUT / BPF_MAP_TYPE_RINGBUF) instead of bpf_printk"
        )
