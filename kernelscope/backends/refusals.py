"""What the kernel's refusal of a CO-RE load means: a CO-RE relocation, a map it could not
create, a permission, the verifier giving up on a loop, or the verifier's verdict.
"""

from __future__ import annotations

import errno as _errno
import os
import re
from typing import Any

from .. import host
from ..errors import (
    BPFPermissionError,
    KernelscopeError,
    SettingError,
    UnsupportedError,
    VerifierError,
)
from .base import gave_up, gave_up_text, host_permission_hint, last_cell_line, verifier_reason
from .guard import PAGE

# BTF-attached BPF tracing programs, which a locked-down kernel refuses even to root
TRACING_SECTIONS = ("fentry", "fexit", "fmod_ret", "lsm", "tp_btf", "iter", "freplace")


def _map_refused(log: str, prepared: Any) -> KernelscopeError | None:
    m = re.search(r"map '(\w+)': failed to create: ([^(\n]*)", log)
    if not m:
        return None
    name, why = m.group(1), m.group(2).strip()
    om = prepared.maps.get(name) or prepared.user_rings.get(name)
    at = f"line {om.line}: " if om is not None and om.line else ""
    if om is not None and om.kind != "perf" and om.pages:
        size = f"a ring buffer of {om.pages:,} pages ({om.pages * PAGE:,} bytes)"
        hint = " Use fewer pages." if "memory" in why else ""
        return SettingError(f"{at}{name}: the kernel could not create {size}: {why}.{hint}")
    return KernelscopeError(f"{at}the kernel refused to create map {name}: {why}")


def classify_load(err: OSError, log: str, prepared: Any, user_source: str = "", *,
                   vlog: str = "", seconds: float = 0.0) -> KernelscopeError:
    """A specific error for a failed load. `log`: what libbpf printed; `vlog`: the verifier's
    log of the failed program (from its own buffer), else taken from libbpf's print."""
    progs = re.findall(r"prog '(\w+)': BPF program load failed", log)
    name = progs[0] if progs else "the program"
    relo = re.findall(r"failed to resolve CO-RE relocation (.*)", log + vlog)
    if relo:
        return VerifierError(
            f"CO-RE relocation failed for {name}: a field or type the program reads does not exist in "
            "the running kernel's BTF (guard optional fields with bpf_core_field_exists()):\n"
            + "\n".join(dict.fromkeys(relo)), log=log)
    refused = _map_refused(log, prepared)
    if refused is not None:
        return refused
    if err.errno == _errno.EPERM:
        if os.geteuid() != 0 and not host.has_bpf_privileges():
            return BPFPermissionError(host_permission_hint())
        tracing = [s for s, _ in prepared.sections if s.split("/")[0].split(".")[0] in TRACING_SECTIONS]
        found = host.lockdown_mode()
        lock = found[0] if found else None
        if tracing:
            return UnsupportedError(
                f"the kernel refused to load {name} (EPERM) although we are root: "
                f"{', '.join(tracing)} programs are BPF tracing programs (BTF-attached)"
                + (f", which this kernel refuses (lockdown is '{lock}')" if lock and lock != "none" else "")
                + ". Use a tracepoint (SEC(\"tp/...\")) or raw tracepoint instead.",
                feature=f"lockdown={lock}" if lock else "BPF tracing programs")
    if not vlog.strip():
        vlog = log.split("-- BEGIN PROG LOAD LOG --", 1)[-1].split("-- END PROG LOAD LOG --", 1)[0]
    log = f"{log}\n{vlog}"
    tail = "\n".join(vlog.strip().splitlines()[-12:])
    reason = verifier_reason(vlog)
    if gave_up(reason):
        text, line = gave_up_text(reason, vlog, user_source, seconds)
        at = f"line {line}: " if line and last_cell_line(vlog, len(user_source.splitlines())) is None else ""
        return VerifierError(f"{at}{name}: {text}\n{tail}", log=log)
    # the errno (EACCES, "Permission denied", for most verdicts) says only that it refused
    return VerifierError(f"the verifier rejected {name}: {reason or os.strerror(err.errno or 0)}\n{tail}",
                         log=log)
