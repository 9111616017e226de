"""PerfBufferReader against the running kernel: a real BCC program, real per-CPU perf rings.

Needs root (or CAP_BPF + CAP_PERFMON). Elsewhere these tests skip saying why; with
KERNELSCOPE_REQUIRE_BPF=1 (this project's CI) they fail instead, since a skip there would
hide that nothing was tested.
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kernelscope import host
from kernelscope.errors import ClosedError, SetupError
from kernelscope.readers.perf import PAGE_SIZE, PerfBufferReader

pytestmark = pytest.mark.kernel

EVENT = np.dtype([("seq", "<u8"), ("ts", "<u8"), ("pid", "<u4"), ("tid", "<u4"),
                  ("cpu", "<u4"), ("pad", "<u4")])
RECORD_BYTES = 48  # perf header 8 + raw_size 4 + 32-byte event padded to 36

PROGRAM = r"""
struct event_t { u64 seq; u64 ts; u32 pid; u32 tid; u32 cpu; u32 pad; };
BPF_PERF_OUTPUT(events);
BPF_ARRAY(counter, u64, 1);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != TARGET_PID)
        return 0;
    int zero = 0;
    u64 *seq = counter.lookup(&zero);
    if (!seq)
        return 0;
    struct event_t e = {};
    e.seq = *seq;          /* one producing thread: no atomics needed */
    *seq = e.seq + 1;
    e.ts = bpf_ktime_get_ns();
    e.pid = id >> 32;
    e.tid = (u32)id;
    e.cpu = bpf_get_smp_processor_id();
    events.perf_submit(args, &e, sizeof(e));
    return 0;
}
"""


def _unavailable(reason: str) -> None:
    if os.environ.get("KERNELSCOPE_REQUIRE_BPF") == "1":
        pytest.fail(f"KERNELSCOPE_REQUIRE_BPF=1 but real-kernel tests cannot run: {reason}",
                    pytrace=False)
    pytest.skip(reason)


class Program:
    """The loaded BCC program: produce(n) makes n events from this process."""

    def __init__(self) -> None:
        if not host.has_bpf_privileges():
            _unavailable("loading BPF programs and per-CPU perf events needs root, or "
                         "CAP_BPF and CAP_PERFMON")
        try:
            host.check()
            bcc = host.import_bcc()
        except SetupError as e:
            _unavailable(f"host not ready for BCC: {e}")
        self.bpf = bcc.BPF(text=PROGRAM.encode(), cflags=[f"-DTARGET_PID={os.getpid()}"])
        self.table = self.bpf[b"events"]
        self.counter = self.bpf[b"counter"]

    def set_cpu_fd(self, cpu: int, fd: int) -> None:
        self.table[ctypes.c_int(cpu)] = ctypes.c_int(fd)

    def reset(self) -> None:
        self.counter[ctypes.c_int(0)] = ctypes.c_ulonglong(0)

    @staticmethod
    def produce(n: int) -> None:
        for _ in range(n):
            os.getppid()


@pytest.fixture(scope="module")
def prog() -> Iterator[Program]:
    p = Program()
    yield p
    p.bpf.cleanup()


@pytest.fixture
def reader(prog: Program) -> Iterator[Callable[..., PerfBufferReader]]:
    made: list[PerfBufferReader] = []

    def make(**kwargs: Any) -> PerfBufferReader:
        r = PerfBufferReader(prog.set_cpu_fd, EVENT, **kwargs)
        made.append(r)
        return r

    prog.reset()
    yield make
    for r in made:
        r.close()


def drain(r: PerfBufferReader) -> tuple[np.ndarray, np.ndarray, int]:
    recs, cpus, lost = [], [], 0
    while True:
        b = r.read()
        if not len(b) and not b.lost:
            break
        recs.append(b.records)
        assert b.cpu is not None
        cpus.append(b.cpu)
        lost += b.lost
    if not recs:
        return np.empty(0, EVENT), np.empty(0, np.int16), 0
    return np.concatenate(recs), np.concatenate(cpus), lost


def test_every_event_arrives_once(prog, reader):
    n = 20_000
    r = reader(wakeup_events=1)  # poll() below waits for a wake-up, not the drain's timer
    got, cpu_parts, lost = [], [], 0
    for _ in range(n // 1000):
        prog.produce(1000)
        assert r.poll(1.0)
        b = r.read()
        got.append(b.records)
        cpu_parts.append(b.cpu)
        lost += b.lost
        assert b.lost_by_cpu == {}
    recs, cpus = np.concatenate(got), np.concatenate(cpu_parts)
    assert lost == 0
    assert len(recs) == n
    assert (recs["pid"] == os.getpid()).all()
    assert np.array_equal(np.sort(recs["seq"]), np.arange(n))
    assert cpus.dtype == np.int16
    assert np.array_equal(cpus, recs["cpu"])  # the reader's CPU tag is the producing CPU
    for c in np.unique(cpus):
        mine = recs[cpus == c]
        assert (np.diff(mine["ts"].astype(np.int64)) > 0).all(), f"ts not increasing, cpu {c}"
        assert (np.diff(mine["seq"].astype(np.int64)) > 0).all()


def test_tiny_buffer_reports_what_it_dropped(prog, reader, pinned):
    r = reader(pages=1)
    per_ring = PAGE_SIZE // RECORD_BYTES
    n = 5_000
    prog.produce(n)  # no reads while producing: the ring fills, the rest is dropped
    recs, cpus, lost = drain(r)
    assert len(recs) == per_ring
    assert lost == 0  # the kernel reports drops ahead of the next sample that fits
    assert np.array_equal(recs["seq"], np.arange(per_ring))
    prog.produce(1)
    b = r.read()
    assert len(b) == 1
    assert b.lost == n - per_ring
    assert b.lost_by_cpu == {pinned: n - per_ring}
    assert b.records["seq"].tolist() == [n]
    assert len(recs) + b.lost + 1 == n + 1
    assert (cpus == pinned).all()
    assert set(b.cpu.tolist()) == {pinned}


def test_fill_and_capacity(prog, reader, pinned):
    r = reader(pages=4)
    assert r.capacity_bytes == 4 * PAGE_SIZE * len(r.cpus)
    assert r.fill_by_cpu() == dict.fromkeys(r.cpus, 0)
    assert r.fill_bytes() == 0
    prog.produce(10)
    assert r.fill_by_cpu()[pinned] == 10 * RECORD_BYTES
    assert r.fill_bytes() == 10 * RECORD_BYTES  # the sum over CPUs, an int like a ring's
    assert len(r.read()) == 10
    assert r.fill_by_cpu()[pinned] == 0


def test_wakeup_events_batches_wakeups(prog, reader, pinned):
    r = reader(wakeup_events=16)
    assert not r.poll(0)
    prog.produce(10)
    assert not r.poll(0.05)  # 10 < 16 samples: no wakeup yet, but data is there
    prog.produce(6)
    assert r.poll(1.0)
    assert len(r.read()) == 16


def test_watermark_wakes_on_bytes(prog, reader, pinned):
    r = reader(pages=4, watermark_bytes=2048)
    prog.produce(2048 // RECORD_BYTES - 1)
    assert not r.poll(0.05)
    prog.produce(2)
    assert r.poll(1.0)
    assert len(r.read()) == 2048 // RECORD_BYTES + 1


def perf_mappings() -> int:
    return Path("/proc/self/maps").read_text().count("perf_event")


def test_close_releases_everything_and_is_final(prog, reader, fd_count):
    fds, maps = fd_count(), perf_mappings()
    r = reader()
    assert fd_count() == fds + len(r.cpus) + 2  # perf events, epoll, eventfd
    assert perf_mappings() == maps + len(r.cpus)
    prog.produce(5)
    r.close()
    assert r.closed
    assert fd_count() == fds
    assert perf_mappings() == maps
    with pytest.raises(ClosedError):
        r.read()
    with pytest.raises(ClosedError):
        r.poll(0)
    with pytest.raises(ClosedError):
        r.fill_bytes()
    with pytest.raises(ClosedError):
        r.fill_by_cpu()
    r.close()  # a second close does nothing
    prog.produce(5)  # the map still points at the closed events: harmless


def test_garbage_collected_reader_frees_its_fds(prog, fd_count):
    gc.collect()  # earlier tests' garbage must not be freed mid-measurement
    fds, maps = fd_count(), perf_mappings()
    r = PerfBufferReader(prog.set_cpu_fd, EVENT)
    assert fd_count() > fds
    del r
    gc.collect()
    assert fd_count() == fds
    assert perf_mappings() == maps


def test_context_manager_closes(prog, fd_count):
    fds = fd_count()
    with PerfBufferReader(prog.set_cpu_fd, EVENT, pages=2) as r:
        prog.produce(3)
        assert len(r.read()) == 3
    assert r.closed
    assert fd_count() == fds


def test_failing_set_cpu_fd_leaves_nothing_open(fd_count):
    if not host.has_bpf_privileges():
        _unavailable("per-CPU perf events need root or CAP_PERFMON")
    fds = fd_count()

    def refuse(cpu: int, fd: int) -> None:
        raise RuntimeError("map update refused")

    with pytest.raises(RuntimeError, match="refused"):
        PerfBufferReader(refuse, EVENT)
    assert fd_count() == fds


def test_exit_after_stop_without_close_is_quiet(tmp_path):
    """At interpreter exit the reader's own finalizer may run before the probe's, which then
    closes the reader: that close must not write to the already closed wake-up eventfd."""
    import subprocess
    import sys

    script = tmp_path / "leave_open.py"
    script.write_text(
        "import os\n"
        "from kernelscope import Probe, lab\n"
        "p = Probe(lab.getppid_program('perf'), pages=4, cflags=[f'-DTARGET={os.getpid()}']).start()\n"
        "os.getppid()\n"
        "p.stop()\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
