"""stop() on the running kernel: the RCU barrier that replaced the grace sleep still accounts
for every event, with a producer still running, and a full ring is drained into reserved memory."""

from __future__ import annotations

import time

import numpy as np
import pytest
from producers import paused, ring_program

from kernelscope import Probe, grace

pytestmark = pytest.mark.kernel


def test_stop_under_a_running_producer_accounts_every_event(monkeypatch, wait_for) -> None:
    barriers: list[bool] = []
    real = grace.rcu_barrier

    def recording() -> bool:
        barriers.append(real())
        return barriers[-1]

    monkeypatch.setattr(grace, "rcu_barrier", recording)
    prod = paused(3_000_000)
    p = Probe(ring_program(pages=16), cflags=prod.cflags).start()
    try:
        assert prod.proc.stdin is not None
        prod.proc.stdin.write("go\n")
        prod.proc.stdin.flush()
        wait_for(lambda: p.stats["events"]["received"] > 20_000, timeout=30)
        p.stop()
        assert prod.proc.poll() is None, "the producer finished before stop(): make it longer"
        st = p.stats["events"]
        assert st["attempted"] == st["received"] + st["dropped"], st
        assert st["in_flight"] == 0
        assert len(p.df) == st["received"]
        time.sleep(0.05)  # the producer keeps calling getppid(): counters stay frozen
        assert p.stats["events"] == st
        seq = p.df["ks_seq"].to_numpy()
        assert (seq == np.arange(len(seq))).all()
    finally:
        prod.proc.kill()
        prod.proc.wait()
        p.close()
    if (__import__("os").cpu_count() or 1) > 1:
        assert barriers == [True]  # membarrier, not the sleep


def test_a_full_ring_drains_into_reserved_memory_with_exact_times() -> None:
    prod = paused(40_000)
    p = Probe(ring_program(pages=256), cflags=prod.cflags)
    try:
        p.load()
        prod.go()
        p.start()
        p.stop()
        st = p.stats["events"]
        assert st["attempted"] == 40_000 == st["received"] + st["dropped"]
        df = p.df
        assert len(df) == st["received"] > 0
        want = df["ts"].to_numpy().astype(np.int64) + p.outputs["events"].schema.epoch_offset_ns
        assert (df["ks_time"].to_numpy().view(np.int64) == want).all()
        assert st["inversions"] == 0
        assert df["ts"].is_monotonic_increasing
        per_event = st["memory_bytes"] / st["received"]
        # the record in its ring slot (8-byte header + 32-byte struct), arrival, ks_time
        assert per_event == p.outputs["events"].schema.dtype.itemsize + 8 + 8 + 8
    finally:
        p.close()


@pytest.mark.parametrize(("pages", "max_rows", "reserved"), [
    (256, None, True),  # 1 MiB ring: room for a full ring faulted in at load
    (1 << 15, None, False),  # 128 MiB: beyond RESERVE_RING_BYTES, nothing faulted in ahead
    (256, 100, False),  # the store keeps 100 rows: no room for a ring's worth
])
def test_drain_memory_is_faulted_in_only_for_rings_it_is_worth_it(pages, max_rows, reserved) -> None:
    prod = paused(10)
    p = Probe(ring_program(pages=pages), cflags=prod.cflags, max_rows=max_rows)
    try:
        p.load()
        ms = p._drain.maps["events"]
        ring_rows = pages * 4096 // 40
        assert (ms.reader.parser.arena.free_bytes >= ring_rows * 32) == reserved
        assert (ms.store.reserved_bytes >= ring_rows * 16) == reserved
    finally:
        prod.proc.kill()
        prod.proc.wait()
        p.close()
