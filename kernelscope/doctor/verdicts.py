"""What a probe run's counts mean: one Check per attach kind and per map kind, with the reason and the fix.

The probe program (checks.py) fills a ProbeResult; these functions only read it.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from .. import host
from ..errors import SetupError, TracefsAccessError
from .report import Check

# Indexes into the program's `hits` array, one counter per attach kind.
HITS = ("tracepoint", "raw tracepoint", "kprobe", "fentry", "uprobe", "usdt")
MAP_KINDS = ("ringbuf", "perf event array")


@dataclass
class ProbeResult:
    compiled: bool = False
    compile_error: str = ""  # why nothing could be probed, as a sentence
    dropped: dict[str, str] = field(default_factory=dict)  # part -> why it was left out
    attached: dict[str, str | None] = field(default_factory=dict)  # kind -> error or None
    errnos: dict[str, int] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)  # kind -> what it attached to
    hits: dict[str, int] = field(default_factory=dict)
    ring_events: int = 0
    perf_events: int = 0
    layout: dict[str, int] = field(default_factory=dict)
    bcc_log: str = ""


def attach_checks(res: ProbeResult) -> list[Check]:
    checks = []
    for kind in HITS:
        target = res.targets.get(kind, "")
        hits = res.hits.get(kind, 0)
        data = {"target": target, "hits": hits}
        if not res.compiled:
            checks.append(Check(kind, False, res.compile_error, data=data))
            continue
        if kind == "usdt" and "usdt" not in res.attached:
            if "usdt" in res.dropped:
                checks.append(Check(kind, False, res.dropped["usdt"], data=data))
            else:
                checks.append(Check(
                    kind, None,
                    "unknown: no USDT-enabled binary found (looked for a Python built with "
                    "dtrace markers, e.g. Debian's /usr/bin/python3)", data=data))
            continue
        if kind == "fentry" and "fentry" not in res.attached:
            why = res.dropped.get("fentry", "no BTF function to attach to")
            checks.append(Check(kind, False, why, _fentry_fix(), data=data))
            continue
        error = res.attached.get(kind)
        if error is None:
            if hits:
                checks.append(Check(kind, True, f"{target}: attached, fired {hits}x", data=data))
            else:
                checks.append(Check(kind, False, f"{target}: attached but never fired",
                                    data=data))
            continue
        data["error"] = error
        data["bcc_log"] = res.bcc_log
        if kind == "kprobe":
            why, fix = _kprobe_reason(error)
        elif kind == "fentry":
            why, fix = _fentry_reason(error, res.errnos.get(kind, 0))
        elif kind == "tracepoint" and not host.is_mounted(host.TRACEFS, "tracefs"):
            why, fix = (f"{error} (tracefs is not mounted)", "run `kernelscope setup`")
        elif kind == "tracepoint" and (denied := _tracefs_denied()) is not None:
            why, fix = (f"{error} (uid {denied.uid} may not read tracefs)", "see the tracefs row")
        else:
            why, fix = error, ""
        data["reason"] = why
        checks.append(Check(kind, False, f"{target}: {why}", fix, data=data))
    return checks


def _tracefs_denied() -> TracefsAccessError | None:
    try:
        host.check_tracefs()
    except TracefsAccessError as e:
        return e
    except SetupError:
        pass
    return None


def _kprobe_reason(error: str) -> tuple[str, str]:
    config = host.kernel_config()
    if config is not None:
        options, source = config
        for option in ("CONFIG_KPROBES", "CONFIG_KPROBE_EVENTS"):
            if options.get(option, "n") == "n":
                return (
                    f"{option} is not set in the running kernel ({source})",
                    f"needs a kernel built with {option}=y; tracepoints and raw tracepoints "
                    "work without it",
                )
    return error, "check that the function exists and is not inlined or notrace"


def _fentry_reason(error: str, err: int) -> tuple[str, str]:
    if err == errno.EPERM and host.has_bpf_privileges():
        lockdown = host.lockdown_mode()
        if lockdown is not None and lockdown[0] != "none":
            mode, source = lockdown
            return (
                f"the kernel refused the tracing program with EPERM although this process is "
                f"privileged; kernel lockdown is '{mode}' ({source})",
                _fentry_fix(),
            )
        return ("the kernel refused the tracing program with EPERM although this process is "
                "privileged (an LSM policy?)", _fentry_fix())
    config = host.kernel_config()
    if config is not None:
        options, source = config
        for option in ("CONFIG_DEBUG_INFO_BTF", "CONFIG_BPF_JIT",
                       "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS"):
            if options.get(option, "n") == "n":
                return f"{error}; {option} is not set ({source})", _fentry_fix()
    return error, _fentry_fix()


def _fentry_fix() -> str:
    return "not fixable from user space on this kernel; use tracepoints or raw tracepoints"


def map_checks(res: ProbeResult) -> list[Check]:
    if not res.compiled:
        why = res.compile_error
        return [Check("ringbuf", False, why), Check("perf event array", False, why)]
    checks = []
    if "ringbuf" in res.dropped:
        checks.append(Check("ringbuf", False, f"BPF_RINGBUF_OUTPUT: {res.dropped['ringbuf']}",
                            "ring buffers need Linux 5.8 or later; use perf buffers"))
    else:
        checks.append(_delivery("ringbuf", "BPF_RINGBUF_OUTPUT", res.ring_events, res))
    checks.append(_delivery("perf event array", "BPF_PERF_OUTPUT", res.perf_events, res))
    return checks


def _delivery(name: str, macro: str, events: int, res: ProbeResult) -> Check:
    """A map kind works when the probe's events came through it."""
    if events:
        return Check(name, True, f"{macro} delivered {events} event(s)", data={"events": events})
    return Check(name, False, f"{macro} delivered no events" + _tracepoint_note(res))


def _tracepoint_note(res: ProbeResult) -> str:
    return "" if res.attached.get("tracepoint") is None else " (its tracepoint did not attach)"
