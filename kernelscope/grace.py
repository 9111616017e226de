"""Waiting out the BPF programs that were already running when a probe's gate closed.

A program that read the gate as open before `stop()` closed it may still be reserving or
submitting records. Non-sleepable BPF programs run inside an RCU read-side critical section
(rcu_read_lock() or preemption disabled, preempted ones included), so one synchronize_rcu()
after the gate write waits for every one of them: `membarrier(MEMBARRIER_CMD_GLOBAL)` runs
exactly that from user space (kernel/sched/membarrier.c; only when more than one CPU is
online, and it fails with EINVAL under nohz_full). Sleepable programs (SEC("uprobe.s/..."),
"lsm.s", "fentry.s", ...) run under RCU tasks trace instead, which no system call waits for:
for them, and whenever membarrier is unavailable, a fixed sleep of GRACE stays the wait.
ctypes releases the GIL during the call: the drain thread reads on meanwhile.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import time

GRACE = 0.02  # seconds: the fallback wait, a guess the barrier replaces where it can
MEMBARRIER_CMD_GLOBAL = 1
_NR_MEMBARRIER = {"x86_64": 324, "aarch64": 283}
# SEC("uprobe.s/..."), SEC("lsm.s/..."), SEC("?fentry.s/..."): the ".s" kinds are sleepable
_libc = ctypes.CDLL(None, use_errno=True)  # once: stop() need not look libc up each time
_libc.syscall.restype = ctypes.c_long
_SLEEPABLE = re.compile(r'SEC\(\s*"\??[A-Za-z_]+(?:\.[A-Za-z_]+)*\.s(?:/|")')


def sleepable(source: str) -> bool:
    """True if the program text declares a sleepable BPF program."""
    return bool(_SLEEPABLE.search(source))


def rcu_barrier() -> bool:
    """synchronize_rcu() through membarrier(MEMBARRIER_CMD_GLOBAL); False when it did not run
    (unknown architecture, ENOSYS, EINVAL under nohz_full, a single online CPU)."""
    # platform.machine() is the kernel's: a 32-bit Python on it has other syscall numbers
    nr = _NR_MEMBARRIER.get(platform.machine()) if ctypes.sizeof(ctypes.c_void_p) == 8 else None
    if nr is None or os.sysconf("SC_NPROCESSORS_ONLN") < 2:  # os.cpu_count() can be overridden
        return False
    return int(_libc.syscall(ctypes.c_long(nr), ctypes.c_int(MEMBARRIER_CMD_GLOBAL), ctypes.c_uint(0),
                            ctypes.c_int(0))) == 0


def wait_out(sleepable: bool = False) -> bool:
    """Return once every program that saw the gate open has finished (call it right after
    closing the gate). True if the RCU barrier did it; False if it slept GRACE instead."""
    started = time.monotonic()
    try:
        ok = rcu_barrier()
    except OSError:
        ok = False
    if sleepable or not ok:
        rest = GRACE - (time.monotonic() - started)
        if rest > 0:
            time.sleep(rest)
    return ok
