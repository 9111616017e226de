"""Helpers shared by the tests: waiting without bare sleeps, and leak counters.

Import as `from util import wait_for` (pytest puts tests/ on sys.path), or use the fixtures of
the same names from conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kernelscope.errors import UnsupportedError

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.01, what: str = ""
) -> T:
    """Poll `predicate` until it returns something truthy and return that; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            name = what or getattr(predicate, "__name__", "condition")
            raise AssertionError(f"timed out after {timeout} s waiting for {name}")
        time.sleep(interval)


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


@dataclass(frozen=True)
class BPFCounts:
    """BPF programs, maps and links held open by this process (from /proc/self/fdinfo)."""

    progs: int
    maps: int
    links: int

    def __sub__(self, other: BPFCounts) -> BPFCounts:
        return BPFCounts(self.progs - other.progs, self.maps - other.maps,
                         self.links - other.links)


def bpf_object_counts() -> BPFCounts:
    """Count this process's BPF fds by kind; other processes' programs do not disturb it.

    The kernel marks each kind in fdinfo: `prog_type:` for programs, `map_type:` for maps,
    `link_type:` for links (a link's fdinfo also names its prog, so links are checked first).
    """
    progs = maps = links = 0
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                info = f.read()
        except OSError:  # closed between listdir and open (including listdir's own fd)
            continue
        if "link_type:" in info:
            links += 1
        elif "prog_type:" in info:
            progs += 1
        elif "map_type:" in info:
            maps += 1
    return BPFCounts(progs, maps, links)


def system_bpf_ids() -> tuple[set[int], set[int]]:
    """Ids of every BPF program and map loaded system-wide, from `bpftool -j`.

    The kernel frees programs after an RCU grace period, so a just-closed program may still
    be listed for a moment: compare with wait_for, not once.
    """
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"

    def ids(kind: str) -> set[int]:
        out = subprocess.run([bpftool, "-j", kind, "list"], capture_output=True, text=True,
                             check=True).stdout
        return {int(o["id"]) for o in json.loads(out or "[]")}

    return ids("prog"), ids("map")


def refusal(source: str, **probe_kwargs: object) -> UnsupportedError | None:
    """Start and close a probe of `source`: the UnsupportedError the kernel's refusal raised, or None."""
    from kernelscope import Probe

    try:
        Probe(source, **probe_kwargs).start().close()  # type: ignore[arg-type]
    except UnsupportedError as e:
        return e
    return None


def usdt_gc_program(section: str = "usdt") -> str:
    """A CO-RE program reading python:gc__start's generation argument into ring `gcs`;
    SEC("usdt") is attached by hand, SEC("usdt/BINARY:python:gc__start") by libbpf."""
    return r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/usdt.bpf.h>
struct ev { u32 pid; s32 gen; };
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096 * 4); } gcs SEC(".maps");
SEC("SECTION")
int BPF_USDT(on_gc, int generation) {
    struct ev *e = bpf_ringbuf_reserve(&gcs, sizeof(*e), 0);
    if (!e) return 0;
    e->pid = bpf_get_current_pid_tgid() >> 32;
    e->gen = generation;
    bpf_ringbuf_submit(e, 0);
    return 0;
}
""".replace("SECTION", section)
