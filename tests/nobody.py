"""Run a function as an unprivileged user for real: a forked child that drops to uid 65534.

Root bypasses file permissions, so what Binder's user sees (tracefs refused) can only be
checked by a process that is not root. The child is a fork of the test process, so it needs
no interpreter or files that uid 65534 could not read (a venv's python may live under
/root); import what the function needs before calling `run_as_nobody`. With `caps`, the
child keeps those capabilities (e.g. CAP_BPF and CAP_PERFMON) as uid 65534.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import select
import signal
import struct
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NOBODY = 65534
PR_SET_KEEPCAPS = 8
_CAP_VERSION_3 = 0x20080522


@dataclass
class Outcome:
    """What the child's function returned, or the exception it raised (by name and message)."""

    value: Any = None
    error: str | None = None  # the exception's class name
    classes: tuple[str, ...] = ()  # every class name in its MRO, to check what it is a kind of
    message: str = ""
    traceback: str = ""


def can_drop_privileges() -> bool:
    return os.geteuid() == 0


def _keep_only(caps: tuple[int, ...]) -> None:
    """Set this process's effective and permitted capabilities to `caps` exactly (capset(2))."""
    mask = 0
    for cap in caps:
        mask |= 1 << cap
    header = struct.pack("Ii", _CAP_VERSION_3, 0)
    words = [mask & 0xFFFFFFFF, mask >> 32]
    data = struct.pack("6I", words[0], words[0], 0, words[1], words[1], 0)  # eff, perm, inh x2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.capset(ctypes.c_char_p(header), ctypes.c_char_p(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _child(fn: Callable[[], Any], caps: tuple[int, ...], groups: tuple[int, ...] = ()) -> Outcome:
    libc = ctypes.CDLL(None, use_errno=True)
    if caps and libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups(list(groups))
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    if caps:
        _keep_only(caps)
    try:
        return Outcome(value=fn())
    except BaseException as e:  # reported to the parent, which decides what it means
        return Outcome(error=type(e).__name__, classes=tuple(c.__name__ for c in type(e).__mro__),
                       message=str(e), traceback=traceback.format_exc())


def run_as_nobody(fn: Callable[[], Any], caps: tuple[int, ...] = (), timeout: float = 60.0,
                  groups: tuple[int, ...] = ()) -> Outcome:
    """Call `fn` in a forked child running as uid/gid 65534 with no groups (or `groups`); its Outcome.

    The value `fn` returns must pickle. Needs root in the parent (to change uid). A child
    that does not answer within `timeout` s (a lock another thread held at the fork) is killed.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            try:
                out = _child(fn, caps, groups)
            except BaseException as e:
                out = Outcome(error="setup failed", message=repr(e), traceback=traceback.format_exc())
            data = pickle.dumps(out)
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    with os.fdopen(r, "rb", buffering=0) as f:
        while True:
            ready, _, _ = select.select([f], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"the uid {NOBODY} child gave no answer within {timeout} s")
            chunk = f.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        raise AssertionError(f"the uid {NOBODY} child died without an answer (wait status {status})")
    out = pickle.loads(b"".join(chunks))
    if out.error == "setup failed":
        raise AssertionError(f"could not become uid {NOBODY}: {out.message}\n{out.traceback}")
    return out
