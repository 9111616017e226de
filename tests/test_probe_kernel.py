"""Probe on the running kernel: real programs, real buffers, exact accounting."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from producers import paused, perf_program, ring_program, run_to_completion
from util import BPFCounts, bpf_object_counts, fd_count, refusal

from kernelscope import (
    AttachError,
    ClosedError,
    CompileError,
    Probe,
    SettingError,
    UnsupportedError,
    VerifierError,
)
from kernelscope.tracepoints import config_option

pytestmark = pytest.mark.kernel


def assert_accounted(stats: dict, made: int) -> None:
    assert stats["attempted"] == made
    assert stats["attempted"] == stats["received"] + stats["dropped"], stats
    assert stats["in_flight"] == 0


def open_fds() -> int:
    return fd_count()


def bpf_prog_ids() -> BPFCounts:
    return bpf_object_counts()


def test_ring_buffer_delivers_every_event_with_right_columns() -> None:
    p, prod = run_to_completion(ring_program(pages=256), 20_000)
    st = p.stats["events"]
    assert_accounted(st, 20_000)
    df = p.df
    assert len(df) == st["received"]
    assert st["received"] > 0
    assert (df["pid"] == prod.pid).all()
    assert set(df["comm"]) == {
        "python" if "python" in os.path.basename(os.sys.executable) else df["comm"][0]
    }
    assert df["ts"].is_monotonic_increasing  # one thread: reservation order is time order
    assert st["inversions"] == 0
    assert list(df["ks_seq"]) == list(range(len(df)))
    assert str(df["ks_time"].dtype).startswith("datetime64")
    assert abs(df["ks_time"].iloc[0].timestamp() - time.time()) < 120


def test_overloaded_tiny_ring_drops_and_still_balances() -> None:
    prod = paused(50_000)
    # loaded but not drained while the child runs: a 4 KiB ring holds ~100 records
    p = Probe(ring_program(pages=1), cflags=prod.cflags).load()
    try:
        prod.go()
        p.stop()
        st = p.stats["events"]
        assert_accounted(st, 50_000)
        assert st["dropped"] > 40_000
        assert 0 < st["received"] <= 4096 // 40 + 1
    finally:
        p.close()


def test_perf_buffer_counts_lost_records_like_the_program() -> None:
    """The kernel writes PERF_RECORD_LOST only once the buffer has room again, ahead of the
    next sample: so its count lags the program's count until something more is sent."""
    burst = paused(30_000, cpu=0)
    p = Probe(
        perf_program().replace("TARGET", "TARGET || (id >> 32) == LATER"),
        pages=1,
        cflags=[*burst.cflags, "-DLATER=0"],
    ).load()
    try:
        burst.go()  # nobody reads: one page per CPU overflows
        p.poll_once()
        st = p.stats["events"]
        assert st["dropped"] > 20_000
        assert st["lost_records"] == 0  # not reported yet: no room was free to say so
    finally:
        p.close()

    burst = paused(30_000, cpu=0)
    trickle = paused(5, cpu=0)
    src = perf_program().replace("!= TARGET", "!= TARGET && (id >> 32) != LATER")
    p = Probe(src, pages=1, cflags=[*burst.cflags, f"-DLATER={trickle.pid}"]).load()
    try:
        burst.go()
        p.poll_once()  # drain: room again; the next sample carries the LOST record before it
        assert p.stats["events"]["fill_bytes"] == 0
        trickle.go()
        p.stop()
        st = p.stats["events"]
        assert_accounted(st, 30_005)
        assert st["dropped"] > 20_000
        assert st["lost_records"] == st["dropped"]  # the kernel's PERF_RECORD_LOST agrees
        df = p.df
        assert (df["ks_cpu"] == 0).all()
        assert (df["cpu"] == 0).all()
    finally:
        p.close()


def test_perf_buffer_live_drain_marks_cpu() -> None:
    p, _ = run_to_completion(perf_program(), 5_000, pages=64)
    st = p.stats["events"]
    assert_accounted(st, 5_000)
    df = p.df
    assert (df["ks_cpu"].astype(int) == df["cpu"].astype(int)).all()


def test_reserve_submit_discard_is_accounted() -> None:
    src = r"""
    struct event { u64 n; u64 ts; };
    BPF_RINGBUF_OUTPUT(events, 64);
    BPF_ARRAY(count, u64, 1);
    TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
      if ((bpf_get_current_pid_tgid() >> 32) != TARGET) return 0;
      u32 k = 0; u64 *c = count.lookup(&k); if (!c) return 0;
      u64 n = __sync_fetch_and_add(c, 1);
      struct event *e = events.ringbuf_reserve(sizeof(struct event));
      if (!e) return 0;
      e->n = n; e->ts = bpf_ktime_get_ns();
      if (n % 3 == 0) { events.ringbuf_discard(e, 0); return 0; }
      events.ringbuf_submit(e, 0);
      return 0;
    }"""
    p, _ = run_to_completion(src, 3_000)
    st = p.stats["events"]
    assert st["discarded"] == 1_000
    assert st["attempted"] == 2_000 == st["received"] + st["dropped"]
    assert not (p.df["n"] % 3 == 0).any()


def test_max_rows_keeps_newest_and_counts_evicted() -> None:
    p, _ = run_to_completion(ring_program(pages=64), 2_000, max_rows=500)
    st = p.stats["events"]
    assert st["stored"] == 500
    assert st["evicted"] == st["received"] - 500
    assert p.df["ks_seq"].iloc[-1] == st["received"] - 1
    assert p.df["ts"].is_monotonic_increasing


def test_stop_freezes_counters_and_start_resumes() -> None:
    prod = paused(1_000)
    p = Probe(ring_program(), cflags=prod.cflags).start()
    p.stop()
    before = p.stats["events"]["attempted"]
    prod.go()  # events made while stopped are neither attempted nor received
    assert p.stats["events"]["attempted"] == before == 0
    prod2 = paused(500)
    p.close()
    with Probe(ring_program(), cflags=prod2.cflags) as p2:
        p2.stop()
        p2.start()
        prod2.go()
        p2.stop()
        assert_accounted(p2.stats["events"], 500)


def test_close_releases_programs_maps_and_fds() -> None:
    # warm up BCC's own one-time state (libbcc, tracefs handles) before counting
    Probe(ring_program(), cflags=["-DTARGET=1"]).start().close()
    gc.collect()  # earlier tests' probes must not be collected mid-measurement
    fds, progs = open_fds(), bpf_prog_ids()
    for src in (ring_program(), perf_program()):
        p = Probe(src, cflags=["-DTARGET=1"]).start()
        assert bpf_prog_ids().progs > progs.progs
        p.close()
        p.close()  # twice is a no-op
    assert bpf_prog_ids() == progs
    assert open_fds() == fds
    with pytest.raises(ClosedError):
        p.poll_once()
    assert p.df.empty  # data stays readable


def test_garbage_collected_probe_is_closed() -> None:
    Probe(ring_program(), cflags=["-DTARGET=1"]).start().close()
    gc.collect()  # earlier tests' probes must not be collected mid-measurement
    fds, progs = open_fds(), bpf_prog_ids()
    p = Probe(ring_program(), cflags=["-DTARGET=1"]).start()
    del p
    gc.collect()
    deadline = time.monotonic() + 5
    while (bpf_prog_ids() != progs or open_fds() != fds) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert bpf_prog_ids() == progs
    assert open_fds() == fds


def test_compile_error_names_the_user_line() -> None:
    src = (
        "BPF_RINGBUF_OUTPUT(events, 8);\nTRACEPOINT_PROBE(syscalls, sys_enter_getppid) {\n  return nope;\n}\n"
    )
    progs = bpf_prog_ids()
    with pytest.raises(CompileError) as exc:
        Probe(src).load()
    assert exc.value.line == 3
    assert "nope" in str(exc.value)
    assert "line 3" in str(exc.value)
    assert bpf_prog_ids() == progs


def test_compile_error_after_tracepoint_struct_insertion_still_maps_to_the_cell() -> None:
    src = (
        "struct e { u32 x; };\n"
        "BPF_RINGBUF_OUTPUT(events, 8);\n"
        "TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {\n"
        "  struct e v = {};\n"
        "  events.ringbuf_output(&v, sizeof(v), 0);\n"
        "  v.x = undefined_variable_here;\n"
        "  return 0;\n"
        "}\n"
    )
    with pytest.raises(CompileError) as exc:
        Probe(src).load()
    assert exc.value.line == 6


def test_call_to_undeclared_function_points_at_the_warning() -> None:
    src = "TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {\n  undefined_function_here(1);\n  return 0;\n}\n"
    with pytest.raises(VerifierError) as exc:
        Probe(src).load()
    assert "line 2" in str(exc.value)
    assert "implicit declaration of function 'undefined_function_here'" in str(exc.value)


def test_verifier_rejection_shows_the_log_tail() -> None:
    src = (
        "TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {\n"
        "  int *p = (int *)(long)bpf_get_current_pid_tgid();\n"
        "  return *p;\n"
        "}\n"
    )
    progs = bpf_prog_ids()
    with pytest.raises(VerifierError) as exc:
        Probe(src).load()
    assert "invalid mem access" in str(exc.value)
    assert bpf_prog_ids() == progs


def test_unknown_tracepoint_suggests_close_matches() -> None:
    src = "TRACEPOINT_PROBE(syscalls, sys_enter_getppidd) { return 0; }\n"
    with pytest.raises(AttachError, match=r"no tracepoint syscalls:sys_enter_getppidd.*sys_enter_getppid"):
        Probe(src).load()


@pytest.mark.skipif(config_option("CONFIG_KPROBES") == "y", reason="this kernel has CONFIG_KPROBES")
def test_kprobe_without_config_kprobes_names_the_option() -> None:
    with pytest.raises(UnsupportedError) as exc:
        Probe("int kprobe__do_sys_openat2(void *ctx) { return 0; }").load()
    assert exc.value.feature == "CONFIG_KPROBES"


def test_nested_struct_and_arrays_become_columns() -> None:
    src = r"""
    struct inner { u16 a; u8 b; };
    struct event { u32 pid; struct inner in; u64 arr[3]; char comm[16]; };
    BPF_RINGBUF_OUTPUT(events, 8);
    TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
      if ((bpf_get_current_pid_tgid() >> 32) != TARGET) return 0;
      struct event e = {};
      e.pid = 7; e.in.a = 513; e.in.b = 9; e.arr[0] = 1; e.arr[2] = 3;
      __builtin_memcpy(e.comm, "hello", 6);
      events.ringbuf_output(&e, sizeof(e), 0);
      return 0;
    }"""
    df = run_to_completion(src, 3)[0].df
    assert list(df.columns[:5]) == ["pid", "in.a", "in.b", "arr", "comm"]
    assert df["in.a"].tolist() == [513] * 3
    assert df["in.b"].tolist() == [9] * 3
    assert [list(a) for a in df["arr"]] == [[1, 0, 3]] * 3
    assert df["comm"].tolist() == ["hello"] * 3
    assert np.dtype(df["pid"].dtype) == np.uint32


def test_reconfigure_reloads_with_new_size_and_keeps_rows_and_counts() -> None:
    first, second = paused(3_000), paused(2_000)
    src = ring_program(pages=64).replace("!= TARGET", "!= TARGET && (id >> 32) != SECOND")
    with Probe(src, cflags=[*first.cflags, f"-DSECOND={second.pid}"]) as p:
        first.go()
        p.stop()
        assert p.stats["events"]["capacity_bytes"] == 64 * 4096
        p.start()
        p.reconfigure(pages=8)
        assert p.running
        st = p.stats["events"]
        assert st["capacity_bytes"] == 8 * 4096
        assert st["pages"] == 8
        assert st["reloads"] == 1
        assert p.outputs["events"].marks[0]["what"] == "pages default -> 8"
        second.go()
        p.stop()
        st = p.stats["events"]
        assert_accounted(st, 5_000)
        assert st["stored"] == st["received"]
        assert set(p.df["pid"]) <= {first.pid, second.pid}
        assert list(p.df["ks_seq"]) == list(range(st["received"]))


@pytest.mark.parametrize("bad", [3, 2**20, "16", 2.0, 0])
def test_reconfigure_with_a_bad_size_leaves_the_probe_running_as_it_was(bad: object) -> None:
    """Settings are checked before anything is torn down: the old program keeps running."""
    prod = paused(2_000)
    with Probe(ring_program(pages=64), cflags=prod.cflags) as p:
        with pytest.raises(SettingError, match="pages"):
            p.reconfigure(pages=bad)
        assert p.running
        assert p.pages is None
        assert p.stats["events"]["reloads"] == 0
        prod.go()
        p.stop()
        assert_accounted(p.stats["events"], 2_000)
        assert p.stats["events"]["capacity_bytes"] == 64 * 4096
        p.start()  # and it starts again, no other reconfigure needed
        assert p.running


def test_a_replacement_the_kernel_refuses_restores_the_previous_program() -> None:
    """2^19 pages per CPU of perf buffer pass the checks, but the kernel cannot map them
    (ENOMEM): the probe comes back with its old size, running, and counts on exactly."""
    first, second = paused(1_000), paused(1_000)
    src = perf_program().replace("!= TARGET", "!= TARGET && (id >> 32) != SECOND")
    with Probe(src, pages=8, cflags=[*first.cflags, f"-DSECOND={second.pid}"]) as p:
        first.go()
        with pytest.raises(SettingError, match="cannot map a perf buffer this large") as e:
            p.reconfigure(pages=2**19)
        assert "previous settings" in "".join(getattr(e.value, "__notes__", []))
        assert p.running
        assert p.pages == 8
        second.go()
        p.stop()
        st = p.stats["events"]
        assert_accounted(st, 2_000)
        assert st["pages"] == 8
        assert st["reloads"] == 0
        assert set(p.df["pid"]) == {first.pid, second.pid}


def test_functions_attached_by_hand_are_attached_again_after_reconfigure() -> None:
    src = r"""
    struct event { u32 pid; };
    BPF_RINGBUF_OUTPUT(events, 16);
    int on_getppid(void *ctx) {
      u32 pid = bpf_get_current_pid_tgid() >> 32;
      if (pid != TARGET) return 0;
      struct event e = {.pid = pid};
      events.ringbuf_output(&e, sizeof(e), 0);
      return 0;
    }"""
    prod = paused(300)
    with Probe(src, cflags=prod.cflags) as p:
        p.attach_tracepoint("syscalls:sys_enter_getppid", "on_getppid")
        p.reconfigure(pages=32)
        assert p.attach_points() == ["tracepoint:syscalls:sys_enter_getppid"]
        prod.go()
        p.stop()
        assert_accounted(p.stats["events"], 300)
        assert p.stats["events"]["capacity_bytes"] == 32 * 4096


@pytest.mark.parametrize(("setting", "value"), [("pages", "16"), ("pages", 2.0), ("pages", {"events": 6}),
                                                ("wakeup", "sometimes"), ("wakeup_events", 0),
                                                ("poll_interval", 0), ("reorder_ns", -1)])
def test_a_bad_setting_is_a_setting_error_naming_it(setting: str, value: object) -> None:
    with pytest.raises(SettingError, match=setting.split("_", maxsplit=1)[0]):
        Probe(ring_program(), **{setting: value})


def test_raw_tracepoint_probe_attaches_and_delivers() -> None:
    src = r"""
    struct event { u64 ts; u32 pid; u32 id; };
    BPF_RINGBUF_OUTPUT(events, 16);
    RAW_TRACEPOINT_PROBE(sys_enter) {
      u32 pid = bpf_get_current_pid_tgid() >> 32;
      if (pid != TARGET) return 0;
      struct event e = {.ts = bpf_ktime_get_ns(), .pid = pid, .id = ctx->args[1]};
      events.ringbuf_output(&e, sizeof(e), 0);
      return 0;
    }"""
    prod = paused(500)
    with Probe(src, cflags=prod.cflags) as p:
        assert p.attach_points() == ["raw_tracepoint:sys_enter"]
        prod.go()
        p.stop()
        st = p.stats["events"]
        assert st["attempted"] == st["received"] + st["dropped"]
        assert (p.df["id"] == 110).sum() == 500  # __NR_getppid on x86_64


def test_no_wakeup_submissions_are_drained_by_the_timer() -> None:
    """BPF_RB_NO_WAKEUP never notifies epoll; wakeup='timer' polls every poll_interval."""
    src = ring_program(pages=256).replace("sizeof(e), 0)", "sizeof(e), BPF_RB_NO_WAKEUP)")
    prod = paused(5_000)
    with Probe(src, wakeup="timer", poll_interval=0.02, cflags=prod.cflags) as p:
        prod.go()
        deadline = time.monotonic() + 5
        while p.stats["events"]["received"] < 5_000 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert p.stats["events"]["received"] == 5_000  # arrived before any stop()
        p.stop()
        assert_accounted(p.stats["events"], 5_000)


def test_records_of_other_sizes_are_padded_into_the_struct() -> None:
    """Programs may submit fewer bytes than the struct: the slow path pads with zeros."""
    src = r"""
    struct event { u64 n; u64 ts; u64 extra; };
    BPF_RINGBUF_OUTPUT(events, 64);
    BPF_ARRAY(count, u64, 1);
    TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
      if ((bpf_get_current_pid_tgid() >> 32) != TARGET) return 0;
      u32 k = 0; u64 *c = count.lookup(&k); if (!c) return 0;
      struct event e = {.n = __sync_fetch_and_add(c, 1), .ts = bpf_ktime_get_ns(), .extra = 7};
      if (e.n % 2) events.ringbuf_output(&e, 16, 0);
      else events.ringbuf_output(&e, sizeof(e), 0);
      return 0;
    }"""
    p, _ = run_to_completion(src, 1_000)
    df = p.df
    assert_accounted(p.stats["events"], 1_000)
    assert sorted(df["n"]) == list(range(1_000))
    assert (df.loc[df["n"] % 2 == 1, "extra"] == 0).all()
    assert (df.loc[df["n"] % 2 == 0, "extra"] == 7).all()


def test_usdt_probe_from_python_attaches_while_compiling() -> None:
    python = "/usr/bin/python3.11"
    if not os.path.exists(python):
        pytest.fail(f"{python} (Debian's python3.11, built with USDT markers) is missing")
    child = subprocess.Popen(
        [
            python,
            "-I",
            "-S",
            "-c",
            "import sys, gc; print('ready', flush=True); sys.stdin.readline(); gc.collect()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        src = r"""
        struct event { u64 ts; u32 pid; u32 pad; };
        BPF_RINGBUF_OUTPUT(events, 8);
        int on_gc(struct pt_regs *ctx) {
          struct event e = {.ts = bpf_ktime_get_ns(), .pid = bpf_get_current_pid_tgid() >> 32};
          events.ringbuf_output(&e, sizeof(e), 0);
          return 0;
        }"""
        with Probe(src, usdt=[(child.pid, "python:gc__start", "on_gc")]) as p:
            child.stdin.write("go\n")
            child.stdin.flush()
            child.wait(10)
            p.stop()
            assert p.stats["events"]["received"] >= 1
            assert set(p.df["pid"]) == {child.pid}
    finally:
        child.kill()
        child.wait()


def test_unknown_kernel_function_is_named() -> None:
    with pytest.raises(AttachError, match="no kernel function no_such_function_here"):
        Probe("KFUNC_PROBE(no_such_function_here) { return 0; }").load()


def test_fentry_is_refused_with_the_reason_on_this_kernel() -> None:
    refused = refusal("KFUNC_PROBE(do_sys_openat2) { return 0; }")
    if refused is None:
        pytest.skip("this kernel allows fentry (KFUNC_PROBE): nothing to refuse")
    assert "lockdown" in refused.feature or "program type" in refused.feature


def test_timer_mode_reads_once_per_interval_even_under_load() -> None:
    """wakeup='timer' is a consumer that looks every poll_interval, however busy the ring."""
    from kernelscope import lab

    with lab.Burst("timer", 1_000_000) as burst:
        p = Probe(lab.getppid_program("ring", pages=4096), wakeup="timer", poll_interval=0.1,
                  cflags=burst.cflags)
        try:
            p.start()
            t0 = time.monotonic()
            burst.go()
            time.sleep(0.15)
            elapsed = time.monotonic() - t0
            p.stop()
            st = p.stats["events"]
            assert_accounted(st, 1_000_000)
            # one read per interval (+ the final drain), not one per wake-up
            assert st["batches"] <= elapsed / 0.1 + 3
        finally:
            p.close()


def test_default_pacing_reads_a_burst_in_few_reads_and_counts_exactly() -> None:
    """The default ring pacing ("adaptive") leaves the ring unread between reads, so a burst
    is read in a few large batches, where an eager reader (wakeup="epoll") reads as often as
    the kernel wakes it; counts stay exact either way."""
    from kernelscope import lab

    batches = {}
    for wakeup in ("adaptive", "epoll"):
        with lab.Burst(f"pacing_{wakeup}", 1_000_000) as burst:
            p = Probe(lab.getppid_program("ring", pages=4096), cflags=burst.cflags,
                      **({} if wakeup == "adaptive" else {"wakeup": wakeup}))
            try:
                assert p.wakeup == wakeup
                p.start()
                burst.go()
                p.stop()
                st = p.stats["events"]
                assert_accounted(st, 1_000_000)
                batches[wakeup] = st["batches"]
                if wakeup == "adaptive":
                    assert st["batches"] * 100 < st["received"], st
            finally:
                p.close()
    # idle, ~100x fewer; with every CPU busy the producer runs in slices, each restarting the pacing
    assert batches["adaptive"] * 3 < batches["epoll"], batches


def test_default_pacing_delivers_a_lone_event_at_once(wait_for) -> None:
    """After a burst has been read in paced batches, a lone event is not left for a pause:
    a read that found nothing waits for the kernel's wake-up, which comes with the event."""
    from kernelscope import lab

    poll = 2.0
    lone = paused(1)
    with lab.Burst("pacing_then_lone", 300_000) as burst:
        src = lab.getppid_program("ring", pages=1024)
        p = Probe(src, poll_interval=poll, cflags=[*burst.cflags, f"-DTARGET2={lone.pid}"])
        try:
            p.start()
            burst.go()

            def burst_accounted() -> bool:  # read, or dropped if the machine is busy
                st = p.stats["events"]
                return st["received"] + st["dropped"] == 300_000

            wait_for(burst_accounted, timeout=10)
            before = p.stats["events"]["received"]
            lone.go()
            wait_for(lambda: p.stats["events"]["received"] == before + 1, timeout=poll)
            p.stop()
            assert_accounted(p.stats["events"], 300_001)
            df = p.df
            last = df[df["pid"] == lone.pid]
            assert len(last) == 1
            latency = int(last["ks_arrival_ns"].iloc[0]) - int(last["ts"].iloc[0])
            assert 0 < latency < poll * 1e9 / 4, latency  # well within poll_interval: not a paced read
            assert p.stats["events"]["batches"] * 100 < 300_001
        finally:
            p.close()


def test_default_pacing_delivers_sparse_events_at_once() -> None:
    """Events that trickle in (here groups of 3 calls 1 ms apart, 50 groups a second: far below
    PACE_MIN_RATE) are read as the kernel notifies, not held for a pacing pause: they
    arrive well within poll_interval."""
    from kernelscope import lab
    from kernelscope.drain import PACE_MIN_RATE

    poll, groups, gap = 1.0, 20, 0.02
    assert 3 / gap < PACE_MIN_RATE
    child = subprocess.Popen(
        [sys.executable, "-c",
         f"import os, sys, time; sys.stdin.read(1)\nfor _ in range({groups}):\n"
         "    for _ in range(3):\n        os.getppid(); time.sleep(0.001)\n"
         f"    time.sleep({gap})"],
        stdin=subprocess.PIPE, text=True)
    p = Probe(lab.getppid_program("ring", pages=64), poll_interval=poll, cflags=[f"-DTARGET={child.pid}"])
    try:
        p.start()
        child.communicate("g", timeout=30)
        p.stop()
        assert_accounted(p.stats["events"], 3 * groups)
        df = p.df
        latency = (df["ks_arrival_ns"].astype(np.int64) - df["ts"].astype(np.int64)) / 1e9
        assert (latency > 0).all()
        # paced reads would hold many of them for up to `poll`; read as notified, each waits
        # only for one wake-up of the drain thread
        assert latency.quantile(0.9) < poll / 20, latency.describe()
    finally:
        p.close()


def test_stopping_a_stopped_probe_keeps_what_the_first_stop_found(tmp_path, monkeypatch) -> None:
    """The programs stay attached after stop() and go on counting in their maps; a second
    stop(), or close() after stop(), must not read them again (the maps, stacks and stats are
    the first stop's), nor save a record-mode capture again."""
    child = paused(300)
    src = """
    BPF_HASH(calls, u32, u64);
    TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
        u32 pid = bpf_get_current_pid_tgid() >> 32;
        calls.increment(pid);
        return 0;
    }
    """
    monkeypatch.setenv("KERNELSCOPE_MODE", "record")
    monkeypatch.setenv("KERNELSCOPE_CAPTURES", str(tmp_path))
    p = Probe(src, name="twice").start()
    try:
        child.go()
        p.stop()
        first = p.maps["calls"].frame().sort_values("key", ignore_index=True)
        saved = (tmp_path / "twice.parquet").stat().st_mtime_ns
        for _ in range(50):
            os.getppid()  # this process's calls: the attached program counts them
        assert int(p.maps["calls"].frame(live=True)["value"].sum()) > int(first["value"].sum())
        time.sleep(0.01)
        p.stop()
        p.close()
        after = p.maps["calls"].frame().sort_values("key", ignore_index=True)
        assert after.equals(first)
        assert (tmp_path / "twice.parquet").stat().st_mtime_ns == saved
    finally:
        p.close()
