"""The ring drain's fast path without a kernel: prefaulted arenas, timestamps stamped while the
records are in cache, frames whose numeric columns view the stored records, honest memory."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_ringbuf_fake import DTYPE, FakeRing, event

from kernelscope.grace import GRACE, rcu_barrier, sleepable, wait_out
from kernelscope.readers.batch import Arena, Batch, Stamper, packed
from kernelscope.readers.ring import RingParser, record_span
from kernelscope.schema import Schema
from kernelscope.store import FrameStore, sequence

OFFSET = 1_700_000_000 * 10**9


def stamped_parser(ring: FakeRing, rows: int = 1000) -> RingParser:
    p = RingParser(ring.consumer, ring.producer, ring.size, DTYPE)
    p.reserve()
    p.stamper = Stamper(DTYPE, "ts", 1, OFFSET, rows)
    return p


def test_arena_slices_never_overlap_and_fall_back_when_used_up() -> None:
    a = Arena(4096)
    x = a.take(10, np.int64)
    y = a.give_back(a.take(100, np.int64), 3)  # the unused 97 go back
    z = a.take(400, np.int64)  # fits only because the 97 came back
    assert not np.shares_memory(x, y)
    assert not np.shares_memory(y, z)
    assert not np.shares_memory(x, z)
    assert all(np.shares_memory(v, a._buf) for v in (x, y, z))
    buf = a._buf
    big = a.take(10_000, np.int64)  # more than is left: a fresh array, and the arena goes
    assert not np.shares_memory(big, buf)
    assert len(big) == 10_000
    assert a.free_bytes == 0
    assert len(a.take(1, np.int64)) == 1
    assert np.shares_memory(x, buf)  # what was handed out stays valid


def test_a_growing_arena_carves_later_slices_out_of_new_blocks() -> None:
    a = Arena(4096, grow=1 << 20)
    first = a.take(100, np.int64)
    assert a.free_bytes == 4096 - 800  # faulted in ahead
    x = a.take(1000, np.int64)  # does not fit: a new block, not faulted in ahead
    y = a.take(1000, np.int64)
    assert a.free_bytes == 0
    assert x.base is y.base is a._buf
    assert len(a._buf) == 1 << 20
    assert not np.shares_memory(first, x)
    assert not np.shares_memory(x, y)
    big = a.take(1 << 18, np.int64)  # more than a block: a block of its own size
    assert len(big) == 1 << 18
    assert big.base is a._buf
    x[:] = 1
    y[:] = 2
    assert (x == 1).all()
    assert not np.shares_memory(big, y)


def test_reads_copy_into_the_arena_keep_padding_and_stamp_times() -> None:
    ring = FakeRing(1 << 16)
    for i in range(300):
        ring.commit(event(i).tobytes())
    p = stamped_parser(ring)
    first = p.read()
    for i in range(300, 700):
        ring.commit(event(i).tobytes())
    second = p.read()
    for res, lo, hi in ((first, 0, 300), (second, 300, 700)):
        assert list(res.records["seq"]) == list(range(lo, hi))
        assert np.shares_memory(res.records, p.arena._buf)  # the prefaulted memory
        assert not np.shares_memory(res.records, np.frombuffer(ring.producer, np.uint8))  # owned
        assert res.times is not None
        assert res.ordered
        assert (res.times == res.records["ts"].astype(np.int64) + OFFSET).all()
        want = b"".join(event(i).tobytes() for i in range(lo, hi))
        assert res.records.tobytes() == want  # byte for byte, padding included
    assert not np.shares_memory(first.records, second.records)
    assert first.records.strides == (record_span(DTYPE.itemsize),)  # views of the ring's slots


# a struct with padding (bytes 4-7 and 16-23) the program fills: the bytes must survive
PADDED = np.dtype({"names": ["pid", "ts"], "formats": ["<u4", "<u8"], "offsets": [0, 8], "itemsize": 24})


def padded_event(i: int) -> bytes:
    raw = bytearray(bytes([0xA0 + i % 16]) * PADDED.itemsize)
    raw[0:4] = (100 + i).to_bytes(4, "little")
    raw[8:16] = (1000 + i).to_bytes(8, "little")
    return bytes(raw)


def test_records_in_ring_slots_keep_their_padding_when_packed_stored_and_evicted() -> None:
    ring = FakeRing(1 << 18)
    for i in range(CHUNK):
        ring.commit(padded_event(i))
    res = RingParser(ring.consumer, ring.producer, ring.size, PADDED).read()
    want = b"".join(padded_event(i) for i in range(CHUNK))
    assert res.records.strides == (record_span(PADDED.itemsize),)  # 24 + its 8-byte header
    flat = packed(res.records)
    assert flat.flags.c_contiguous
    assert flat.view(np.uint8).tobytes() == want  # numpy's own copy() would lose the padding
    s = FrameStore(Schema(PADDED), max_rows=CHUNK - 100)
    s.append(Batch(res.records), 1)  # a big batch is stored as it came: slots and all
    assert s.memory_bytes == (CHUNK - 100) * (PADDED.itemsize + 8)  # packed records, arrival
    kept = s.records()
    assert kept.flags.c_contiguous  # max_rows evicted part of the chunk: the rest was packed
    assert kept.view(np.uint8).tobytes() == want[100 * PADDED.itemsize:]
    whole = FrameStore(Schema(PADDED))
    whole.append(Batch(res.records), 1)
    slot = record_span(PADDED.itemsize)
    assert whole.memory_bytes == CHUNK * (slot + 8)  # the headers between records are counted
    assert packed(whole.records()).view(np.uint8).tobytes() == want


CHUNK = 5000  # records: a batch the store keeps as one chunk (more than CHUNK_ROWS)


def test_a_decreasing_timestamp_or_a_record_of_another_size_is_reported() -> None:
    ring = FakeRing(1 << 16)
    for ts in (5, 6, 4, 7):
        e = event(0)
        e["ts"] = ts
        ring.commit(e.tobytes())
    res = stamped_parser(ring).read()
    assert res.times is not None
    assert not res.ordered
    ring.commit(event(1).tobytes())
    ring.commit(b"short")  # another size: the slow path, no times from the reader
    ring.commit(event(2).tobytes())
    p = stamped_parser(ring)
    res = p.read()
    assert len(res.records) == 3
    assert res.times is None
    assert not res.ordered


def test_store_frames_reader_times_and_computes_the_missing_ones() -> None:
    schema = Schema(DTYPE, epoch_offset_ns=OFFSET)
    s = FrameStore(schema)
    stamper = s.stamper(100)
    assert stamper is not None
    r = np.concatenate([event(i) for i in range(10)])
    times = stamper.compute(r, np.empty(10, np.int64))
    s.append(Batch(r, times=times, ordered=True), 1)
    s.append(Batch(np.concatenate([event(i) for i in range(10, 15)])), 2)  # no times: computed
    df = s.frame()
    want = pd.to_datetime(df["ts"].astype(np.int64) + OFFSET, unit="ns")
    assert (df["ks_time"].to_numpy() == want.to_numpy()).all()
    assert list(df["ks_seq"]) == list(range(15))


def test_a_whole_drain_is_framed_without_copying_and_counted_once() -> None:
    n = 50_000
    s = FrameStore(Schema(DTYPE))
    s.reserve(n)
    r = np.concatenate([event(i) for i in range(n)])
    stamper = s.stamper(n)
    assert stamper is not None
    s.append(Batch(r, times=stamper.compute(r, np.empty(n, np.int64))), 7)
    raw = s.memory_bytes
    assert raw == n * (DTYPE.itemsize + 8 + 8)  # record, arrival time, ks_time
    df = s.frame()
    assert np.shares_memory(df["pid"].to_numpy(), r)  # a view of the stored records
    assert np.shares_memory(df["ks_arrival_ns"].to_numpy(), s.chunk().arrival_ns)
    # only what the frame added is counted: ks_seq (8 B) and the decoded comm strings
    added = s.memory_bytes - raw
    assert n * 8 <= added < n * (8 + 40)
    assert (df["pid"] == r["pid"]).all()
    assert (df["ks_arrival_ns"] == 7).all()
    # more rows: the columns become buffers of their own, and are counted as such
    s.append(Batch(np.concatenate([event(i) for i in range(10)])), 8)
    df2 = s.frame()
    assert len(df2) == n + 10
    assert not np.shares_memory(df2["pid"].to_numpy(), r)
    # the stamped times went once the view had its own ks_time: nothing is counted twice
    assert s.memory_bytes == len(s) * (DTYPE.itemsize + 8) + s._view.nbytes
    assert s._view.nbytes > (n + 10) * (4 + 4 + 8 + 8 + 8 + 8)
    pd.testing.assert_frame_equal(df2.iloc[:n], df)


def test_second_frame_after_k_rows_converts_k_rows(conversions) -> None:
    s = FrameStore(Schema(DTYPE))
    s.reserve(20_000)
    s.append(Batch(np.concatenate([event(i) for i in range(20_000)])), 1)
    converted = conversions
    s.frame()
    assert sum(converted) == 20_000
    for k in (1, 37, 5000):
        converted.clear()
        for j in range(k):
            s.append(Batch(event(j)), 2)
        assert len(s.frame()) == len(s)
        assert sum(converted) == k


def test_sequence_fills_in_place() -> None:
    out = np.empty(200_000, np.int64)
    assert sequence(out, 17) is out
    assert (out == np.arange(17, 200_017)).all()


def test_sleepable_sections_are_recognised() -> None:
    assert sleepable('SEC("uprobe.s/bin:f") int f(void *c) { return 0; }')
    assert sleepable('SEC("?lsm.s/file_open")')
    assert sleepable('SEC("fentry.s/do_sys_open")')
    assert not sleepable('SEC("uprobe/bin:f")')
    assert not sleepable('SEC("tp/syscalls/sys_enter_getppid")')
    assert not sleepable("TRACEPOINT_PROBE(syscalls, sys_enter_getppid) { return 0; }")


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2,
                    reason="membarrier(MEMBARRIER_CMD_GLOBAL) skips synchronize_rcu() on one CPU")
def test_membarrier_runs_here_and_sleepable_programs_still_sleep() -> None:
    import time

    assert rcu_barrier()
    assert wait_out()
    t = time.monotonic()
    assert wait_out(sleepable=True)
    assert time.monotonic() - t >= GRACE * 0.99  # RCU tasks trace: no barrier waits for it


def test_record_span_of_the_bench_event() -> None:
    assert record_span(32) == 40


def test_without_membarrier_the_wait_is_the_grace_sleep(monkeypatch) -> None:
    import time

    from kernelscope import grace

    monkeypatch.setattr(grace, "rcu_barrier", lambda: False)  # ENOSYS, EINVAL under nohz_full
    t = time.monotonic()
    assert not grace.wait_out()
    assert time.monotonic() - t >= GRACE * 0.99


def test_one_record_reads_under_max_rows_keep_memory_bytes_exact() -> None:
    """A one-record ring read is strided (its slot) though numpy calls it contiguous: the
    store must pack it, so evicting it takes off what storing it added (found in review:
    memory_bytes went to -320 after 100 such reads)."""
    ring = FakeRing(1 << 16)
    s = FrameStore(Schema(PADDED), max_rows=10)
    parser = RingParser(ring.consumer, ring.producer, ring.size, PADDED)
    for i in range(100):
        ring.commit(padded_event(i))
        res = parser.read()
        assert res.records.strides == (record_span(PADDED.itemsize),)
        s.append(Batch(res.records), i)
        assert s.memory_bytes == len(s) * (PADDED.itemsize + 8)
    assert packed(s.records()).view(np.uint8).tobytes() == b"".join(padded_event(i) for i in range(90, 100))


def test_padding_survives_partial_eviction_of_contiguous_rows_and_the_reorder_merge() -> None:
    from kernelscope.order import Reorderer

    raw = np.frombuffer(b"".join(padded_event(i) for i in range(200)), dtype=PADDED)

    def own(a: np.ndarray) -> np.ndarray:  # numpy's copy() would lose the padding itself
        return packed(a, copy=True)

    def raw_bytes(a: np.ndarray) -> bytes:
        return a.view(np.uint8).tobytes()  # of uint8: every byte as stored

    s = FrameStore(Schema(PADDED), max_rows=150)
    s.append(Batch(own(raw[:100])), 1)  # contiguous rows (a perf batch, say)
    s.append(Batch(own(raw[100:])), 2)  # evicts half of the first chunk
    assert raw_bytes(s.records()) == raw_bytes(raw[50:])
    r = Reorderer("ts", 10**9)  # holds both: the second push merges
    r.push(Batch(own(raw[100:])))
    r.push(Batch(own(raw[:100])))  # older: merged in front
    assert raw_bytes(packed(r.flush().records)) == raw_bytes(raw)


def test_records_are_handed_out_contiguous_and_a_released_growing_arena_grows_no_more() -> None:
    ring = FakeRing(1 << 18)
    for i in range(CHUNK):
        ring.commit(padded_event(i))
    res = RingParser(ring.consumer, ring.producer, ring.size, PADDED).read()
    s = FrameStore(Schema(PADDED))
    s.append(Batch(res.records), 1)
    out = s.records()
    assert out.strides == (PADDED.itemsize,)
    assert out.view(np.uint8).tobytes() == b"".join(padded_event(i) for i in range(CHUNK))
    a = Arena(0, grow=1 << 20)
    a.release()
    assert a.take(10, np.int64).base is not a._buf  # a fresh array, not a new block


def test_a_timestamp_with_bit_63_set_is_not_called_in_order() -> None:
    """-1 ("unset") then 5 decrease as u64, but increase as int64 ks_time."""
    recs = np.zeros(2, DTYPE)
    recs["ts"] = [2**64 - 1, 5]
    st = Stamper(DTYPE, "ts", 1, OFFSET)
    st.reset()
    st.stamp(recs.view(np.dtype((np.void, DTYPE.itemsize))), np.empty(2, np.int64))
    assert not st.ordered
