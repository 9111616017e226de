"""The spec table of the libbpf-tools check: per tool, the options its own loader (the tool's
`.c` file, cited per row) sets, a trigger that makes known events, and a ground-truth check.

Options follow each loader's defaults (no command-line flags) unless a row says otherwise;
a loader's run-time choice (`tracepoint_exists()`, `probe_tp_btf()`) is made here the same way
it makes it, on this kernel. Stack-trace maps: the loaders also set their value size
(`bpf_map__set_value_size(stackmap, perf_max_stack_depth * 8)` = 127 * 8); kernelscope has no
option for that, so those rows rely on kernelscope's default and say so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import spec_events
import spec_maps
from spec_base import N, Opts, Run


@dataclass(frozen=True)
class Spec:
    name: str
    trigger: str
    check: str
    options: Callable[[Run], Opts]
    exercise: Callable[[Run], tuple[bool, str]]

    @property
    def bpf(self) -> str:
        return f"{self.name}.bpf.c"

    @property
    def loader(self) -> str:
        return f"libbpf-tools/{self.name}.c"


def _spec(name: str, trigger: str, check: str) -> Spec:
    mod = spec_events if hasattr(spec_events, f"{name}_run") else spec_maps
    return Spec(name, trigger, check, getattr(mod, f"{name}_opts"), getattr(mod, f"{name}_run"))


SPECS = [
    _spec("execsnoop", f"exec /bin/true x{N}", "rows with the child's ppid, comm 'true' == N"),
    _spec("exitsnoop", f"sh -c 'exit 3' x{N}", "rows with ppid == N, exit_code 3"),
    _spec("opensnoop", f"open a known path x{N}", "rows with pid and fname == path == N"),
    _spec("statsnoop", f"stat a missing path x{N}", "rows with pid and pathname == N, ret -2"),
    _spec("sigsnoop", f"kill(sleep, SIGCONT) x{N}", "rows with tpid, sig 18 == N"),
    _spec("syncsnoop", f"sync() x{N}", "rows with comm, SYS_SYNC == N"),
    _spec("mountsnoop", "mount+umount a tmpfs in a private mount ns",
          "mount and umount rows, src 'kscheck-src'"),
    _spec("tcpstates", "TCP connection on 127.0.0.1", ">= 2 transitions to ESTABLISHED on the port"),
    _spec("tcplife", "TCP connection on 127.0.0.1, 1000 B each way",
          "2 sessions, rx_b/tx_b = 1000 B + SYN/FIN"),
    _spec("tcppktlat", "TCP connection on 127.0.0.1", ">= 1 row on the port"),
    _spec("runqlat", "200 x sleep(2 ms)", "histogram total vs the sleeper's context switches"),
    _spec("runqslower", "100 x sleep(2 ms)", "rows of the sleeper vs its context switches"),
    _spec("cpudist", "busy 1 s sharing CPU 0 with a hog",
          "histogram total vs the child's nonvoluntary switches"),
    _spec("softirqs", "TCP transfer on 127.0.0.1, 1 s", "counts total vs /proc/softirqs delta"),
    _spec("hardirqs", "fsync'd writes, 1 s", "counts vs /proc/interrupts (numbered IRQs) delta"),
    _spec("syscount", "getpriority() x1000", "count for nr 140 in [1000, 2000)"),
    _spec("biolatency", "50 fsync'd writes on vda", "histogram total vs /sys/block/*/stat delta"),
    _spec("bitesize", "50 fsync'd writes by comm ks-bite",
          "total vs /sys/block/*/stat delta; that comm >= 50"),
    _spec("offcputime", "10 x sleep(50 ms)", "off-CPU time of the tgid in [0.5, 1) s"),
    _spec("wakeuptime", "10 x sleep(50 ms)", "blocked time of target comm in [0.5, 1) s"),
    _spec("futexctn", "20 FUTEX_WAITs woken by a thread", "contended waits on that word in 1-20"),
    _spec("profile", "busy loop 2 s", "samples of the pid ~ 49 Hz x 2 s"),
    _spec("runqlen", "a spinner on each CPU, 2 s", "samples ~ 99 Hz x 2 s x CPUs"),
    _spec("memleak", "malloc(4321) x10 kept, x10 freed", "allocs entries of size 4321 == 10"),
    _spec("bashreadline", "type a line into bash -i on a pty", "1 row with that line"),
    _spec("gethostlatency", f"getaddrinfo('localhost') x{N}", "rows with pid and host == N"),
    _spec("javagc", "none (no JVM)", "loads; attach needs a JVM"),
]
