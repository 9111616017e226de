"""What this process holds in the kernel: BPF programs, maps, links and perf events, by fd.

Counting system-wide (`bpftool prog list`) is wrong when other processes load programs
at the same time; a program or map lives only while some fd (or attachment fd) holds it,
so this process's fds are the exact measure of what it leaks.
"""

from __future__ import annotations

import os
from collections import Counter


def kernel_objects() -> Counter[str]:
    kinds: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the fd listdir itself used, now closed
        if target.startswith("anon_inode:"):
            kinds[target.removeprefix("anon_inode:").strip("[]")] += 1
    return kinds


def bpf_objects() -> Counter[str]:
    """Only the BPF side: bpf-prog, bpf-map, bpf_link, perf_event."""
    return Counter({k: v for k, v in kernel_objects().items() if k.startswith(("bpf", "perf_event"))})


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd")) - 1
