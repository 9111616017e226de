"""runqlat- and biolatency-style histograms against the kernel's own counters, both backends (issue 15).

runqlat: a child the test makes sleeps K times on one CPU beside a CPU hog; the kernel's own
account of its waits is /proc/<pid>/task/<tid>/schedstat (run_delay ns, pcount), read while
the child is blocked before and after. biolatency: the test's own O_DIRECT reads of a file on
the disk under the test's tmp folder; the kernel's account is /sys/block/<disk>/stat.
The programs are in tests/programs/.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from programs import biolatency, runqlat
from test_maps_kernel import _recursion_misses

from kernelscope import Probe, hist

pytestmark = pytest.mark.kernel
BACKENDS = ["bcc", "libbpf"]
CPU = 1 if os.cpu_count() and os.cpu_count() > 1 else 0  # child and hog share one CPU: no migration

# --- runqlat ---------------------------------------------------------------------------------

_SLEEPER = """
import sys, time
n = int(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
for _ in range(n):
    end = time.perf_counter() + 0.003
    while time.perf_counter() < end:  # long enough for the hog to preempt it, still runnable
        pass
    time.sleep(0.001)
print("done", flush=True)
sys.stdin.readline()
"""


@dataclass
class Sleeper:
    proc: subprocess.Popen[str]

    def line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()


def _blocked(pid: int) -> bool:
    """Every thread of pid asleep (S): off the runqueue, so no wait is open at a boundary."""
    states = [Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0]
              for t in os.listdir(f"/proc/{pid}/task")]
    return all(s == "S" for s in states)


def _schedstat(pid: int) -> dict[int, tuple[int, int]]:
    """tid -> (run_delay ns, pcount) from /proc/<pid>/task/<tid>/schedstat (fields 2 and 3)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        out[int(tid)] = (int(fields[1]), int(fields[2]))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_runqlat_histogram_matches_schedstat(backend: str, wait_for) -> None:
    """Tolerances. Count: the kernel adds one to pcount on every switch-in of a task it had
    marked queued (sched_info_arrive; sched_info_enqueue on wakeup, sched_info_depart for a
    prev still TASK_RUNNING), exactly the switch-ins the program times; both boundaries fall
    while the child is blocked in read(), so no wait is open at either. They differ only for
    a target preempted when its state was no longer TASK_RUNNING (kept on the runqueue, not
    marked queued): at most one sample each, counted by the program (CO-RE `odd`; BCC cannot
    read the state and bounds it by all the target's preemptions); and switch-ins the program
    was not run for, which it counts as |switch-outs - switch-ins| of the target (equal when
    every switch is seen, the target being blocked at both ends). On this 6.18 VM the CO-RE
    program was, in 3 of its first ~15 runs, one switch-in short (outs = ins + 1, schedstat one
    ahead) with recursion_misses 0, and never in ~40 runs since: not explained, so measured. The
    BCC program was once one sample short with outs = ins = pcount and no recursion miss: a
    switch-in that found no start time. Both programs count such switch-ins (`unmatched`), and
    the kernel's own recursion misses of each program bound the runs it skipped.
    Sum: each sample is ktime at the switch tracepoint minus ktime at the wakeup (or switch-out)
    tracepoint, schedstat's is rq_clock at sched_info_arrive minus rq_clock at enqueue. Both
    ends are read under the runqueue lock with interrupts off, a few microseconds of code after
    update_rq_clock, and sched_clock and CLOCK_MONOTONIC may drift apart by NTP's 500 ppm at
    most: |sum - run_delay| <= 20 us per sample + 500 ppm of the run_delay, plus, for each
    sample the count tolerance allows, the widest sample's upper bucket bound. (Seen here: the
    program's sum is 1-7 us per sample longer: its switch-in clock read comes after
    pick_next_task, the kernel's rq clock was updated before it, or not at all after a wakeup
    preemption, rq_clock_skip_update.)"""
    k = 200
    hog = subprocess.Popen(["taskset", "-c", str(CPU), sys.executable, "-c", "while True: pass"])
    child = Sleeper(subprocess.Popen(["taskset", "-c", str(CPU), sys.executable, "-c", _SLEEPER, str(k)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    try:
        assert child.line() == "ready"
        pid = child.proc.pid
        assert len(os.listdir(f"/proc/{pid}/task")) == 1  # one thread: BCC filters on its tid
        wait_for(lambda: _blocked(pid), timeout=10, what="the child blocked in readline")
        src = runqlat.BCC if backend == "bcc" else runqlat.CORE
        p = Probe(src, backend=backend, cflags=[f"-DTARGET={pid}"] if backend == "bcc" else []).start()
        try:
            if backend == "libbpf":
                p.globals["targ_tgid"] = pid
            names = (["tracepoint__sched__sched_wakeup", "tracepoint__sched__sched_wakeup_new",
                      "tracepoint__sched__sched_switch"] if backend == "bcc"
                     else ["ks_wakeup", "ks_wakeup_new", "ks_switch"])
            progs = [p.program_fd(n) for n in names]
            misses0 = [_recursion_misses(fd) for fd in progs]
            before = _schedstat(pid)
            child.send("go")
            assert child.line() == "done"
            wait_for(lambda: _blocked(pid), timeout=10, what="the child blocked again")
            after = _schedstat(pid)
            misses = [_recursion_misses(fd) - m0 for fd, m0 in zip(progs, misses0, strict=True)]
            p.stop()  # one snapshot of the maps, taken while the child still sleeps
            h = p.maps["runq_usecs"].hist()
            frame = p.maps["runq_usecs"].frame()
            if backend == "libbpf":
                g = p.globals
                total_ns, slack_events, outs, ins = g["total_ns"], g["odd"], g["outs"], g["ins"]
                unmatched = g["unmatched"]
            else:
                totals = p.maps["totals"].frame()["value"].tolist()
                total_ns, slack_events, outs, ins, unmatched = totals
        finally:
            p.close()
        child.send("exit")
        assert child.proc.wait(10) == 0
    finally:
        hog.kill()
        hog.wait()
        if child.proc.poll() is None:
            child.proc.kill()
    run_delay = sum(after[t][0] - before[t][0] for t in after)
    pcount = sum(after[t][1] - before[t][1] for t in after)

    assert isinstance(h, hist.Histogram)
    assert h.unit == "us"
    assert h.layout == "log2"
    col = "id" if backend == "bcc" else "key"
    assert set(frame[col]) == {pid}  # per task: the child's one thread, nothing else got through
    unseen = abs(outs - ins)  # switches the program was not run for (every switch-out follows a switch-in)
    # runs the kernel skipped because another BPF program was running on that CPU (recursion
    # misses, any task's): each may have lost one of the child's samples. Other probes loaded
    # at the same time make them (seen: 40 wakeup misses, one sample short, with a second test
    # run on the machine)
    skipped = sum(misses)
    # switch-ins of the child that found no start time (no wakeup or runnable switch-out seen
    # before them): each is a sample the kernel counted and the program could not time. Seen
    # about once in 20 runs here, with no recursion miss, for both programs; not explained, so
    # the programs count them
    count_tol = slack_events + unseen + skipped + unmatched
    # a skipped run can only lose a sample: the sum misses at most the samples found missing
    sum_count_tol = slack_events + unseen + unmatched + min(skipped, max(0, pcount - h.total))
    widest_us = int(h.high[np.flatnonzero(h.counts.sum(axis=0))[-1]]) + 1
    sum_tol = 20_000 * h.total + 500e-6 * run_delay + sum_count_tol * widest_us * 1000
    print(f"\n{backend} runqlat: K={k} sleeps, histogram count {h.total}, schedstat pcount delta {pcount} "
          f"(tolerance {count_tol}); summed wait {total_ns / 1e6:.3f} ms, run_delay delta "
          f"{run_delay / 1e6:.3f} ms, diff {(total_ns - run_delay) / 1e3:+.1f} us "
          f"(tolerance {sum_tol / 1e3:.1f} us); preemption bound {slack_events}, switch-outs {outs}, "
          f"switch-ins {ins} ({unmatched} with no start time), recursion misses {misses}")
    assert h.total >= k  # every sleep ends in a wakeup and a switch-in
    assert abs(h.total - pcount) <= count_tol, (h.total, pcount, count_tol)
    assert run_delay > 0  # the hog made the child wait
    assert abs(total_ns - run_delay) <= sum_tol, (total_ns, run_delay, sum_tol)
    # the buckets hold every sample and bound the total: each wait of slot i lay in [low, high] us
    per_slot = h.counts.sum(axis=0)
    low_ns = int((per_slot * h.low.astype(np.int64)).sum()) * 1000
    high_ns = int((per_slot * (h.high.astype(np.int64) + 1)).sum()) * 1000
    assert low_ns <= total_ns < high_ns, (low_ns, total_ns, high_ns)


# --- biolatency ------------------------------------------------------------------------------

BLOCK = 4096


def _disk_of(path: Path) -> tuple[str, int]:
    """(name, kernel dev_t) of the whole disk holding path (a partition's parent)."""
    st = os.stat(path)
    sysdir = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
    if (sysdir / "partition").exists():
        sysdir = sysdir.parent
    major, minor = (int(x) for x in (sysdir / "dev").read_text().split(":"))
    return sysdir.name, (major << 20) | minor


def _rw_completed(disk: str) -> tuple[int, int, int]:
    """(reads, writes completed, in flight) from /sys/block/<disk>/stat (fields 1, 5) and inflight."""
    stat = Path(f"/sys/block/{disk}/stat").read_text().split()
    inflight = Path(f"/sys/block/{disk}/inflight").read_text().split()
    return int(stat[0]), int(stat[4]), int(inflight[0]) + int(inflight[1])


def _direct_reads(path: Path, n: int) -> None:
    """n O_DIRECT reads of BLOCK bytes at distinct offsets of path: n requests to the disk."""
    buf = mmap.mmap(-1, BLOCK)  # page aligned, as O_DIRECT needs
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for i in range(n):
            assert os.preadv(fd, [buf], ((i * 7919) % n) * BLOCK) == BLOCK
    finally:
        os.close(fd)
        buf.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_biolatency_histogram_matches_disk_stat(backend: str, tmp_path) -> None:
    """Tolerance: the kernel counts a read or write in the disk's stat at its completion
    (blk_account_io_done, just after block_rq_complete in the same blk_mq_end_request), so over
    one window the histogram and the stat delta agree but for requests at the edges. The order
    is: histogram cleared, stat read, the test's reads, stat read, histogram read.
    stat - hist <= in flight at the first stat read (issued before the program saw them, or
    before the clear, and completed inside the window).
    hist - stat <= in flight at the last stat read (completed before the histogram read) plus
    what the rest of the machine completed inside the two timed gaps (clear..first read, last
    read..histogram read), at the rate its requests came in (stat delta minus the test's own,
    over the window), four times over, plus one per gap for a completion traced just before a
    stat read and accounted just after it. The test's own reads are synchronous, so none of
    them can fall in a gap."""
    n = 200
    disk, dev = _disk_of(tmp_path)
    target = tmp_path / "blocks"
    with open(target, "wb") as f:
        f.write(os.urandom(n * BLOCK))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(target, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    src = biolatency.BCC if backend == "bcc" else biolatency.CORE
    p = Probe(src, backend=backend).start()
    try:
        m = p.maps["disk_usecs"]
        key = "dev" if backend == "bcc" else "key"  # one histogram per disk, even for one disk
        m.frame()  # a first read, so the timed ones below are only the map syscalls
        t0 = time.monotonic()
        m.clear()
        r0, w0, inflight0 = _rw_completed(disk)
        g0 = time.monotonic() - t0
        _direct_reads(target, n)
        t1 = time.monotonic()
        r1, w1, inflight1 = _rw_completed(disk)
        h = m.hist(key=key)
        g1 = time.monotonic() - t1
        p.stop()
        other = p.globals["other"] if backend == "libbpf" else int(p.maps["other"].frame()["value"].iloc[0])
    finally:
        p.close()
    assert h.unit == "us"
    totals = h.totals
    assert dev in totals.index, (dev, totals)
    mine = dict(h.items())[dev]
    got = int(totals[dev])
    stat = (r1 - r0) + (w1 - w0)
    fastest_us = int(mine.low[np.flatnonzero(mine.counts)[0]])
    print(f"\n{backend} biolatency on {disk} (dev {dev >> 20}:{dev & 0xfffff}): {n} O_DIRECT reads; "
          f"histogram {got}, stat delta {stat} (reads {r1 - r0}, writes {w1 - w0}), in flight at the edges "
          f"{inflight0}/{inflight1}, other ops {other}; gaps {g0 * 1e6:.0f}/{g1 * 1e6:.0f} us, "
          f"fastest bucket from {fastest_us} us; p50 {mine.percentile(50):.0f} us")

    assert r1 - r0 >= n  # the disk saw the test's reads
    assert got >= n
    assert stat - got <= inflight0, (stat, got, inflight0)
    # the test's own reads all lie between the two stat reads (each waits for its completion):
    # only the rest of the machine's requests can fall in the gaps, at the rate they came in
    background = max(stat - n, 0) / (t1 - t0)
    extra = int(np.ceil(background * (g0 + g1) * 4)) + 2
    print(f"tolerances: stat - hist <= {inflight0}, hist - stat <= {inflight1 + extra}")
    assert stat - got <= inflight0, (stat, got, inflight0)
    assert got - stat <= inflight1 + extra, (got, stat, inflight1, extra)
