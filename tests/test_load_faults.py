"""Loads that are interrupted or killed leave nothing behind (issue 13, item 4).

An interrupt sweep sends a real SIGINT to the main thread at many offsets into a BCC and a
CO-RE load, and counts this process's BPF fds (maps, programs, BTF, links, perf events)
before and after each attempt. Object folders of CO-RE probes whose process was killed
(kill -9, SIGTERM) are removed when the next process starts loading; folders of live
processes stay.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from kernelscope import Probe
from kernelscope import folders as workdir

pytestmark = pytest.mark.kernel

BCC_SRC = """
struct ev { u32 pid; u64 ts; };
BPF_RINGBUF_OUTPUT(ks_sweep_ev, 8);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    struct ev e = {.pid = bpf_get_current_pid_tgid() >> 32, .ts = bpf_ktime_get_ns()};
    if (e.pid != PID) return 0;
    ks_sweep_ev.ringbuf_output(&e, sizeof(e), 0);
    return 0;
}
"""

CORE_SRC = """
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct ev { u32 pid; u64 ts; };
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096 * 8); } ks_sweep_core SEC(".maps");
const volatile u32 target = 0;
SEC("tp/syscalls/sys_enter_getppid")
int on_getppid(void *ctx) {
    struct ev *e;
    if ((bpf_get_current_pid_tgid() >> 32) != target) return 0;
    e = bpf_ringbuf_reserve(&ks_sweep_core, sizeof(*e), 0);
    if (!e) return 0;
    e->pid = target;
    e->ts = bpf_ktime_get_ns();
    bpf_ringbuf_submit(e, 0);
    return 0;
}
"""

SWEEP_SECONDS = 20.0  # per backend: the sweep is bounded in time, not in steps


def kernel_fds() -> Counter[str]:
    """This process's fds by kind: each BPF kind (anon_inode:bpf-map, bpf-prog, btf, bpf_link,
    [perf_event]), pipes, sockets, paths and "all"."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # listdir's own fd, closed by now
            continue
        kinds["all"] += 1
        if target.startswith("anon_inode:"):
            kinds[target] += 1
        elif target.startswith(("pipe:", "socket:")):  # a tool's pipes, named in a failure
            kinds[target.split(":")[0]] += 1
        elif target.startswith("/"):  # files and folders (rmtree opens each folder it removes)
            kinds["path"] += 1
    return kinds


def make(backend: str) -> Probe:
    if backend == "bcc":
        return Probe(BCC_SRC, cflags=[f"-DPID={os.getpid()}"])
    return Probe(CORE_SRC, globals={"target": os.getpid()})


def attempt(backend: str, offset: float) -> str:
    """Load while a SIGINT is sent to the main thread `offset` s after the start; returns
    where it landed: "load" (the load was cut short) or "after" (it had finished)."""
    main = threading.main_thread().ident
    assert main is not None
    fire = threading.Thread(target=lambda: (time.sleep(offset), signal.pthread_kill(main, signal.SIGINT)))
    p = None
    loaded = False
    try:
        fire.start()
        p = make(backend)
        p.load()
        loaded = True
        fire.join()
        time.sleep(5)  # the interrupt lands here when the load finished first
        raise AssertionError(f"SIGINT at {offset:.3f} s never arrived as KeyboardInterrupt")
    except KeyboardInterrupt:
        pass
    fire.join()
    if p is not None:
        p.close()
    return "after" if loaded else "load"


@pytest.mark.parametrize("backend", ["bcc", "libbpf"])
def test_interrupt_at_any_point_of_a_load_leaks_no_fd(backend: str) -> None:
    times = []
    for _ in range(3):  # warm caches (vmlinux.h, BTF); the fastest load sets the offsets
        warm = make(backend)
        t0 = time.monotonic()
        warm.load()
        times.append(time.monotonic() - t0)
        warm.close()
    took = min(times)
    del warm
    gc.collect()
    before = kernel_fds()
    steps = max(10, min(60, int(SWEEP_SECONDS / (took + 0.15))))
    landed: Counter[str] = Counter()
    for i in range(steps):
        offset = 1.2 * took * i / (steps - 1)
        landed[attempt(backend, offset)] += 1
        gc.collect()
        after = kernel_fds()
        assert after == before, (f"SIGINT {offset:.3f} s into a {took:.2f} s {backend} load left "
                                 f"{dict(after - before)} open (and closed {dict(before - after)})")
    assert landed["load"] >= steps // 3  # the sweep did cut the load short, at many points
    print(f"{backend}: load {took:.2f} s, {steps} interrupts: {dict(landed)}")


CHILD = """
import os, sys
from kernelscope import Probe
p = Probe(sys.stdin.readline().replace("\\\\n", "\\n"), globals={"target": os.getpid()}).load()
print(p.program.objfile.parent, flush=True)
sys.stdin.readline()
p.close()
"""


def loaded_child() -> tuple[subprocess.Popen[str], Path]:
    """A process holding a CO-RE probe, and the object folder it made."""
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdin is not None
    assert child.stdout is not None
    child.stdin.write(CORE_SRC.replace("\n", "\\n") + "\n")
    child.stdin.flush()
    folder = Path(child.stdout.readline().strip())
    assert folder.name.startswith(workdir.WORK_PREFIX)
    assert folder.is_dir()
    return child, folder


def test_folders_of_killed_probes_are_removed_at_the_next_start_and_live_ones_kept() -> None:
    live, live_folder = loaded_child()
    killed, killed_folder = loaded_child()
    termed, termed_folder = loaded_child()
    killed.kill()
    termed.send_signal(signal.SIGTERM)
    assert killed.wait(10) == -signal.SIGKILL
    assert termed.wait(10) == -signal.SIGTERM
    assert killed_folder.is_dir()  # neither could clean up
    assert termed_folder.is_dir()
    starter, starter_folder = loaded_child()  # its first load sweeps the orphans
    assert not killed_folder.exists()
    assert not termed_folder.exists()
    assert live_folder.is_dir()  # its owner still runs
    for child in (live, starter):
        assert child.stdin is not None
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(10) == 0
    assert not live_folder.exists()
    assert not starter_folder.exists()


def test_remove_orphans_keeps_folders_it_cannot_attribute(tmp_path: Path) -> None:
    mine = workdir.new_workdir()
    try:
        foreign_ns = tmp_path / f"{workdir.WORK_PREFIX}1-{os.getpid()}-1-abc"  # another pid namespace
        old_style = tmp_path / f"{workdir.WORK_PREFIX}k2j3h4g5"  # made before owners were recorded
        dead = tmp_path / f"{workdir.WORK_PREFIX}{workdir._pid_namespace()}-{os.getpid()}-1-abc"  # pid reused
        for d in (foreign_ns, old_style, dead):
            d.mkdir()
        assert workdir.remove_orphans(tmp_path) == [dead]
        assert foreign_ns.is_dir()
        assert old_style.is_dir()
        assert mine.is_dir()
        assert mine not in workdir.remove_orphans()
    finally:
        mine.rmdir()
