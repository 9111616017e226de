"""Perf buffer wake-ups of a Probe with default settings, against the running kernel.

The default is a watermark (DEFAULT_WATERMARK_SHARE of each CPU's buffer) plus a read every
poll_interval: a lone event still arrives, and a burst costs the producer far fewer wake-ups
than `wakeup_events=1` (a wake-up per event, BCC's default). Each perf wake-up is an IRQ work
on the producing CPU (perf_output_wakeup -> irq_work_queue), counted in /proc/interrupts "IWI".
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kernelscope import Probe
from kernelscope.readers.perf import DEFAULT_WATERMARK_SHARE, PAGE_SIZE, PerfBufferReader

pytestmark = pytest.mark.kernel

PROGRAM = r"""
struct event_t { u64 seq; u64 ts; };
BPF_PERF_OUTPUT(events);
BPF_ARRAY(counter, u64, 1);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET_PID)
        return 0;
    int zero = 0;
    u64 *seq = counter.lookup(&zero);
    if (!seq)
        return 0;
    struct event_t e = {*seq, bpf_ktime_get_ns()};
    *seq = e.seq + 1;
    events.perf_submit(args, &e, sizeof(e));
    return 0;
}
"""
CFLAGS = [f"-DTARGET_PID={os.getpid()}"]


def irq_work(cpu: int) -> int:
    """IRQ work interrupts taken so far on `cpu` (/proc/interrupts, IWI line)."""
    lines = Path("/proc/interrupts").read_text().splitlines()
    cpus = lines[0].split()
    for line in lines[1:]:
        if line.split(":", 1)[0].strip() == "IWI":
            return int(line.split(":", 1)[1].split()[cpus.index(f"CPU{cpu}")])
    pytest.skip("this kernel's /proc/interrupts has no IWI (IRQ work) line to count perf wake-ups by")


def perf_reader(p: Probe) -> PerfBufferReader:
    reader = p.outputs["events"].reader
    assert isinstance(reader, PerfBufferReader)
    return reader


def test_default_watermark_is_a_share_of_the_buffer():
    with Probe(PROGRAM, cflags=CFLAGS, pages=16) as p:
        r = perf_reader(p)
        assert p.wakeup_events is None
        assert p.watermark_bytes is None
        assert r.watermark_bytes == int(16 * PAGE_SIZE * DEFAULT_WATERMARK_SHARE)
        assert r.batches_wakeups
    with Probe(PROGRAM, cflags=CFLAGS, pages=16, wakeup_events=1) as p:
        assert not perf_reader(p).batches_wakeups  # an explicit choice still wakes per event


def test_lone_event_arrives_within_a_few_poll_intervals(wait_for):
    """One 16-byte event is far below the watermark: only the drain's timer read brings it."""
    interval = 0.05
    with Probe(PROGRAM, cflags=CFLAGS, poll_interval=interval) as p:
        time.sleep(2 * interval)  # the drain thread is now waiting in poll
        t0 = time.monotonic()
        os.getppid()
        wait_for(lambda: p.stats["events"]["received"] == 1, timeout=10 * interval,
                 interval=interval / 10, what="the lone event, within 10 poll intervals")
        assert time.monotonic() - t0 < 10 * interval
        assert p.frame("events")["seq"].tolist() == [0]


def test_default_wakes_the_reader_far_less_than_per_event(pinned):
    """The same burst, drained live: per-event wake-ups take one IRQ work per event on the
    producing CPU; the default takes one per watermark's worth of bytes and the timer."""
    n = 20_000
    woken = {}
    for label, kw in (("default", {}), ("per event", {"wakeup_events": 1})):
        # 4 MiB per CPU holds the whole burst: this thread produces while holding the GIL, so
        # the drain thread reads mostly after it, and the count is of wake-ups, not of drops
        with Probe(PROGRAM, cflags=CFLAGS, pages=1024, **kw) as p:
            before = irq_work(pinned)
            for _ in range(n):
                os.getppid()
            woken[label] = irq_work(pinned) - before
            p.stop()
            s = p.stats["events"]
            assert s["received"] == s["attempted"] == n, (label, s)
            assert s["dropped"] == 0, (label, s)
    assert woken["per event"] >= n // 2, woken  # about one per event, other IRQ work aside
    assert woken["default"] * 20 < woken["per event"], woken


def test_reconfigure_keeps_explicit_wakeup_choices():
    """watermark_bytes=0 still means "no watermark: wake per wakeup_events", from the default
    too (then per event); an explicit watermark or event count replaces the default."""
    with Probe(PROGRAM, cflags=CFLAGS, pages=16) as p:
        p.reconfigure(watermark_bytes=0)
        assert (p.wakeup_events, p.watermark_bytes) == (1, None)
        assert not perf_reader(p).batches_wakeups
        p.reconfigure(watermark_bytes=8192)
        assert perf_reader(p).watermark_bytes == 8192
        p.reconfigure(wakeup_events=64, watermark_bytes=0)
        r = perf_reader(p)
        assert (r.wakeup_events, r.watermark_bytes) == (64, None)
        assert r.batches_wakeups


def test_stop_interrupts_the_drain_wait():
    """An idle probe's drain thread sits in poll for up to poll_interval (no data reaches the
    watermark); stop() interrupts that wait instead of sitting it out."""
    interval = 3.0
    with Probe(PROGRAM, cflags=CFLAGS, poll_interval=interval) as p:
        time.sleep(0.3)  # the drain thread has read once and waits in poll
        t0 = time.monotonic()
        p.stop()
        assert time.monotonic() - t0 < interval / 3
        assert not p.running


def test_interrupt_wakes_one_poll_only():
    p = Probe(PROGRAM, cflags=CFLAGS).load()  # loaded, not started: no drain thread polls it
    try:
        r = perf_reader(p)
        r.interrupt()
        t0 = time.monotonic()
        assert not r.poll(5.0)  # returns at once, no data
        assert time.monotonic() - t0 < 2.5
        assert not r.poll(0.05)  # the interrupt was consumed: this one waits out its timeout
        assert time.monotonic() - t0 >= 0.05
        r.close()
        r.interrupt()  # after close: nothing to wake, no error
    finally:
        p.close()
