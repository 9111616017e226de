"""PerfRing parsing on fake perf mmap areas built in memory, written the way the kernel does."""

from __future__ import annotations

import ctypes
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelscope.errors import ClosedError, KernelscopeError
from kernelscope.readers import perf as perfbuf
from kernelscope.readers.batch import concat_records, copy_records
from kernelscope.readers.perf import (
    PERF_RECORD_LOST,
    PERF_RECORD_SAMPLE,
    PerfBufferReader,
    PerfEventAttr,
    PerfRing,
    bpf_output_attr,
    online_cpus,
)

META = 4096  # the metadata page
PAD_BYTE = 0xEE  # stands in for the stale bytes the kernel leaves in a sample's padding


def align8(n: int) -> int:
    return (n + 7) & ~7


def sample_record(payload: bytes, misc: int = 0) -> bytes:
    """PERF_RECORD_SAMPLE with PERF_SAMPLE_RAW: header, u32 raw_size, payload padded to 8."""
    raw_size = align8(len(payload) + 4) - 4
    raw = payload + bytes([PAD_BYTE]) * (raw_size - len(payload))
    return struct.pack("<IHHI", PERF_RECORD_SAMPLE, misc, 12 + raw_size, raw_size) + raw


def lost_record(lost: int, event_id: int = 7) -> bytes:
    return struct.pack("<IHHQQ", PERF_RECORD_LOST, 0, 24, event_id, lost)


def raw_of(payload: bytes) -> bytes:
    """What the reader sees of a payload: raw_size bytes, padding included."""
    return sample_record(payload)[12:]


class FakeArea:
    """One CPU's perf area in a bytearray: metadata page then `size` data bytes.

    `output` follows the kernel's perf_output_begin: a sample that does not fit is counted
    lost, and the count goes out as a PERF_RECORD_LOST ahead of the next sample that fits.
    """

    def __init__(self, size: int = 512, start: int = 0, layout: bool = True) -> None:
        self.buf = bytearray(META + size)
        self.size = size
        self.head = start
        self.pending_lost = 0
        if layout:
            struct.pack_into("<QQ", self.buf, 1040, META, size)
        struct.pack_into("<QQ", self.buf, 1024, start, start)
        self.samples: list[bytes] = []  # payloads written, in order
        self.reported_lost = 0  # sum over LOST records written

    @property
    def tail(self) -> int:
        return struct.unpack_from("<Q", self.buf, 1032)[0]

    @property
    def published_head(self) -> int:
        return struct.unpack_from("<Q", self.buf, 1024)[0]

    def free(self) -> int:
        return self.size - (self.head - self.tail)

    def put(self, rec: bytes) -> None:
        pos = self.head % self.size
        first = min(len(rec), self.size - pos)
        self.buf[META + pos:META + pos + first] = rec[:first]
        self.buf[META:META + len(rec) - first] = rec[first:]
        self.head += len(rec)

    def output(self, payload: bytes, misc: int = 0) -> bool:
        rec = sample_record(payload, misc)
        need = len(rec) + (24 if self.pending_lost else 0)
        if self.free() < need:
            self.pending_lost += 1
            return False
        if self.pending_lost:
            self.put(lost_record(self.pending_lost))
            self.reported_lost += self.pending_lost
            self.pending_lost = 0
        self.put(rec)
        self.samples.append(payload)
        return True

    def publish(self) -> None:
        struct.pack_into("<Q", self.buf, 1024, self.head)

    def expected(self, dtype: np.dtype) -> np.ndarray:
        return concat_records([copy_records(raw_of(p), dtype) for p in self.samples], dtype)


def payload(i: int, n: int) -> bytes:
    return bytes((i * 31 + j * 7 + 1) & 0xFF for j in range(n))


_INNER = np.dtype({"names": ["a", "b"], "formats": ["u1", "<u4"], "offsets": [0, 4],
                   "itemsize": 8})
DTYPES = [
    np.dtype("u1"),
    np.dtype([("a", "<u8"), ("b", "<u4"), ("c", "u1")]),  # 13 bytes, odd
    np.dtype([("seq", "<u8"), ("ts", "<u8"), ("pid", "<u4"), ("tid", "<u4"), ("cpu", "<u4"),
              ("pad", "<u4")]),  # 32 bytes, the kernel test's event
    np.dtype([("x", "<u4", (10,))]),
    # nested struct with padding, as the C compiler lays it out: must survive concatenation
    np.dtype({"names": ["x", "y"], "formats": ["<u8", _INNER], "offsets": [0, 8],
              "itemsize": 24}),
]


def read_all(ring: PerfRing, max_bytes: int | None) -> tuple[np.ndarray, int]:
    parts, lost = [], 0
    while ring.pending_bytes():
        recs, n = ring.read(max_bytes)
        parts.append(recs)
        lost += n
    return concat_records(parts, ring.dtype), lost


op = st.one_of(
    st.tuples(st.just("sample"), st.integers(0, 90), st.just(1)),
    st.tuples(st.just("lost"), st.integers(1, 10**6), st.just(1)),
    # runs of same-size samples: the vectorised path, ending at any point
    st.tuples(st.just("run"), st.integers(0, 90), st.integers(2, 120)),
)


@settings(max_examples=300, deadline=None)
@given(
    # data area size and where the counters start: any byte, so records wrap anywhere
    layout=st.tuples(st.sampled_from([256, 512, 1024, 8192]), st.integers(0, 1 << 20)),
    rounds=st.lists(st.lists(op, max_size=40), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    max_bytes=st.one_of(st.none(), st.integers(1, 300)),
    misc=st.integers(0, 0xFFFF),
)
def test_roundtrip_matches_what_was_written(layout, rounds, dtype, max_bytes, misc):
    """Any sequence of samples, runs and losses, read whole or in max_bytes pieces."""
    area = FakeArea(*layout)
    fast_ring = PerfRing(area.buf, dtype)
    for i, ops in enumerate(rounds):
        area.samples.clear()
        area.reported_lost = 0
        for j, (kind, arg, count) in enumerate(ops):
            if kind == "lost":
                area.pending_lost += arg
                continue
            for k in range(count):
                area.output(payload(i * 100 + j + k, arg), misc=(misc + k) & 0xFFFF)
        area.publish()
        # Same bytes through the per-record path only: results must be identical.
        slow_ring = PerfRing(bytearray(area.buf), dtype, fast=False)
        slow, slow_lost = read_all(slow_ring, None)
        recs, n = read_all(fast_ring, max_bytes)
        assert recs.dtype == dtype
        assert recs.tobytes() == area.expected(dtype).tobytes()
        assert recs.tobytes() == slow.tobytes()
        assert n == slow_lost == area.reported_lost
        assert area.tail == area.published_head == area.head
    assert fast_ring.pending_bytes() == 0


@pytest.mark.parametrize("wrap_at", range(48))
def test_record_wrapping_at_each_byte(wrap_at):
    """A 48-byte sample (32-byte payload) whose first `wrap_at` bytes sit before the end."""
    dtype = DTYPES[2]
    size = 256
    area = FakeArea(size, start=3 * size - wrap_at)  # counters need not start at 0
    p = payload(1, 32)
    assert area.output(p)
    assert area.output(payload(2, 32))
    area.publish()
    recs, lost = PerfRing(area.buf, dtype).read()
    assert recs.tobytes() == area.expected(dtype).tobytes()
    assert lost == 0
    assert area.tail == area.head


def test_uniform_batch_takes_the_vectorised_path(monkeypatch):
    """Same-size samples (wrapping, varying misc) never go through the per-record copy."""

    def per_record(*_args: object) -> None:
        raise AssertionError("slow path used for a uniform batch")

    monkeypatch.setattr(perfbuf, "copy_records", per_record)
    dtype = DTYPES[2]
    area = FakeArea(4096, start=4096 - 200)
    for i in range(80):
        assert area.output(payload(i, 32), misc=i % 3)
    area.publish()
    recs, lost = PerfRing(area.buf, dtype).read()
    assert len(recs) == 80
    assert lost == 0
    monkeypatch.undo()
    assert recs.tobytes() == area.expected(dtype).tobytes()


@pytest.mark.parametrize("run", [1, 2, 8, 9, 10, 72, 73, 74, 100])
@pytest.mark.parametrize("breaker", ["lost", "longer", "shorter", "end"])
def test_uniform_run_ends_exactly_where_the_size_changes(run, breaker):
    dtype = DTYPES[2]
    area = FakeArea(8192, start=8192 - 1000)
    for i in range(run):
        area.output(payload(i, 32))
    if breaker == "lost":
        area.pending_lost = 3
    elif breaker != "end":
        area.output(payload(500, 40 if breaker == "longer" else 24))
    for i in range(run):
        area.output(payload(1000 + i, 32))
    area.publish()
    recs, lost = PerfRing(area.buf, dtype).read()
    assert recs.tobytes() == area.expected(dtype).tobytes()
    assert lost == area.reported_lost


def test_lost_records_interleaved_with_samples():
    dtype = DTYPES[1]
    area = FakeArea(512)
    area.output(payload(0, 13))
    area.pending_lost = 5
    area.output(payload(1, 13))
    area.output(payload(2, 13))
    area.pending_lost = 1000
    area.output(payload(3, 13))
    area.publish()
    for fast in (True, False):
        buf = bytearray(area.buf)
        recs, lost = PerfRing(buf, dtype, fast=fast).read()
        assert lost == 1005
        assert recs.tobytes() == area.expected(dtype).tobytes()


def test_kernel_drop_semantics_full_ring_then_lost_record():
    """Overfill without reading: later samples are lost, reported ahead of the next one."""
    dtype = DTYPES[2]
    area = FakeArea(256)
    written = sum(area.output(payload(i, 32)) for i in range(20))
    area.publish()
    ring = PerfRing(area.buf, dtype)
    recs, lost = ring.read()
    assert len(recs) == written == 5  # 5 * 48 bytes fit in 256
    assert lost == 0  # not reported until a sample fits again
    assert area.output(payload(99, 32))
    area.publish()
    recs, lost = ring.read()
    assert len(recs) == 1
    assert lost == 15
    assert written + lost + 1 == 21


def test_short_payloads_are_zero_padded_like_copy_records():
    dtype = DTYPES[3]  # 40 bytes
    area = FakeArea(512)
    for n in (0, 1, 5, 39, 40, 41, 64):
        area.output(payload(n, n))
    area.publish()
    recs, _ = PerfRing(area.buf, dtype).read()
    assert recs.tobytes() == area.expected(dtype).tobytes()
    # raw_size 4 for an empty payload: 4 stale padding bytes, then zeros
    assert recs.view(np.uint8).reshape(-1, 40)[0].tolist() == [PAD_BYTE] * 4 + [0] * 36


def test_other_record_types_are_skipped():
    dtype = DTYPES[0]
    area = FakeArea(256)
    area.output(b"\x01")
    area.put(struct.pack("<IHHQQ", 5, 0, 24, 123, 0))  # PERF_RECORD_THROTTLE
    area.output(b"\x02")
    area.publish()
    recs, lost = PerfRing(area.buf, dtype).read()
    assert recs.tolist() == [1, 2]
    assert lost == 0


def test_max_bytes_reads_whole_records_and_always_progresses():
    dtype = DTYPES[2]
    area = FakeArea(1024, start=1000)
    for i in range(10):
        area.output(payload(i, 32))
    area.publish()
    ring = PerfRing(area.buf, dtype)
    recs, _ = ring.read(max_bytes=1)  # smaller than a record: still one record
    assert len(recs) == 1
    recs, _ = ring.read(max_bytes=100)  # 48-byte records: two fit
    assert len(recs) == 2
    assert area.tail == 1000 + 3 * 48
    rest, _ = ring.read()
    assert len(rest) == 7
    assert ring.pending_bytes() == 0


def test_empty_ring():
    ring = PerfRing(FakeArea(256).buf, DTYPES[1])
    recs, lost = ring.read()
    assert recs.dtype == DTYPES[1]
    assert len(recs) == 0
    assert lost == 0
    assert ring.capacity == 256


def test_layout_defaults_when_data_offset_and_size_are_zero():
    area = FakeArea(8192, layout=False)  # pre-4.1 kernels: data follows the first page
    area.output(payload(0, 32))
    area.publish()
    ring = PerfRing(area.buf, DTYPES[2], page_size=4096)
    assert ring.capacity == 8192
    recs, _ = ring.read()
    assert recs.tobytes() == area.expected(DTYPES[2]).tobytes()


def test_works_over_ctypes_memory_like_the_real_mapping():
    area = FakeArea(512, start=500)
    for i in range(4):
        area.output(payload(i, 32))
    area.publish()
    mem = (ctypes.c_char * len(area.buf)).from_buffer(area.buf)
    recs, _ = PerfRing(mem, DTYPES[2]).read()
    assert recs.tobytes() == area.expected(DTYPES[2]).tobytes()


@pytest.mark.parametrize(
    "record",
    [
        struct.pack("<IHH", PERF_RECORD_SAMPLE, 0, 0),  # size 0 would loop forever
        struct.pack("<IHHI", PERF_RECORD_SAMPLE, 0, 16, 200) + bytes(4),  # raw_size > record
        struct.pack("<IHH", PERF_RECORD_SAMPLE, 0, 64),  # runs past data_head
    ],
)
def test_corrupt_records_raise_and_are_skipped(record):
    area = FakeArea(256)
    area.put(record)
    area.publish()
    ring = PerfRing(area.buf, DTYPES[0])
    with pytest.raises(KernelscopeError, match="perf"):
        ring.read()
    assert area.tail == area.head  # the next batch starts clean
    assert area.output(b"\x05")
    area.publish()
    assert ring.read()[0].tolist() == [5]


def test_head_behind_tail_is_corruption():
    area = FakeArea(256, start=100)
    struct.pack_into("<Q", area.buf, 1024, 50)
    with pytest.raises(KernelscopeError, match="corrupt"):
        PerfRing(area.buf, DTYPES[0]).read()


def test_bad_areas_and_dtypes_are_refused():
    with pytest.raises(ValueError, match="writable"):
        PerfRing(bytes(8192), DTYPES[0])
    with pytest.raises(ValueError, match="metadata"):
        PerfRing(bytearray(100), DTYPES[0])
    bad = FakeArea(256)
    struct.pack_into("<QQ", bad.buf, 1040, META, 300)
    with pytest.raises(ValueError, match="power of two"):
        PerfRing(bad.buf, DTYPES[0])
    with pytest.raises(ValueError, match="fixed-size"):
        PerfRing(FakeArea(256).buf, np.dtype("O"))


def test_released_ring_raises_closed():
    ring = PerfRing(FakeArea(256).buf, DTYPES[0])
    ring.release()
    with pytest.raises(ClosedError):
        ring.read()
    with pytest.raises(ClosedError):
        ring.pending_bytes()


# --- pieces of the public layer that need no kernel ----------------------------------------


def test_online_cpus_parsing():
    assert online_cpus("0\n") == [0]
    assert online_cpus("0-3,5,7-8\n") == [0, 1, 2, 3, 5, 7, 8]
    assert online_cpus() == sorted(online_cpus())


def test_perf_event_attr_layout_matches_uapi():
    assert ctypes.sizeof(PerfEventAttr) == 128  # PERF_ATTR_SIZE_VER7
    offsets = {"config": 8, "sample_period": 16, "sample_type": 24, "flags": 40,
               "wakeup_events": 48, "bp_type": 52, "config1": 56, "config2": 64,
               "clockid": 92, "aux_watermark": 104, "sig_data": 120}
    for name, off in offsets.items():  # members of the anonymous unions included
        assert getattr(PerfEventAttr, name).offset == off, name
    attr = bpf_output_attr(watermark_bytes=4096)
    assert attr.flags == (1 << 0) | (1 << 14)  # disabled, watermark
    assert attr.wakeup_watermark == 4096
    assert attr.sample_type == 1 << 10
    assert attr.config == 10
    assert attr.type == 1
    assert attr.sample_period == 1
    attr.set_flag("precise_ip", 3)
    assert attr.flag("precise_ip") == 3
    assert attr.flags >> 15 & 3 == 3
    attr.set_flag("disabled", 0)
    assert attr.flag("disabled") == 0
    assert bpf_output_attr(wakeup_events=16).wakeup_events == 16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pages": 3}, "power of two"),
        ({"pages": 0}, "power of two"),
        ({"wakeup_events": 0}, "wakeup_events"),
        ({"pages": 1, "watermark_bytes": 1 << 20}, "watermark_bytes"),
        ({"dtype": np.dtype("O")}, "fixed-size"),
    ],
)
def test_reader_validates_arguments_before_opening_anything(kwargs, match):
    calls: list[tuple[int, int]] = []
    args = {"dtype": DTYPES[0], **kwargs}
    with pytest.raises(ValueError, match=match):
        PerfBufferReader(lambda cpu, fd: calls.append((cpu, fd)), **args)
    assert calls == []


def test_corruption_is_an_internal_error_not_the_users():
    from kernelscope.errors import CorruptBufferError, InternalError

    area = FakeArea(256)
    area.put(struct.pack("<IHH", PERF_RECORD_SAMPLE, 0, 0))
    area.publish()
    with pytest.raises(CorruptBufferError) as e:
        PerfRing(area.buf, DTYPES[0]).read()
    assert isinstance(e.value, InternalError)
    assert not isinstance(e.value, ValueError)


@settings(max_examples=150, deadline=None)
@given(
    layout=st.tuples(st.sampled_from([256, 1024, 4096]), st.integers(0, 1 << 16)),
    ops=st.lists(op, max_size=30),
    dtype=st.sampled_from(DTYPES),
)
def test_records_are_owned_copies_parsed_in_place(layout, ops, dtype):
    """Parsed in place, copied once: the records share no memory with the area, and only a
    record that runs across the end of the data area is stitched through a copy."""
    area = FakeArea(*layout)
    for j, (kind, arg, count) in enumerate(ops):
        if kind == "lost":
            area.pending_lost += arg
            continue
        for k in range(count):
            area.output(payload(j + k, arg))
    area.publish()
    ring = PerfRing(area.buf, dtype)
    gathered: list[int] = []
    gather = PerfRing._gather

    def counting(self: PerfRing, pos: int, n: int) -> np.ndarray:
        gathered.append(n)
        return gather(self, pos, n)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PerfRing, "_gather", counting)
        recs, lost = ring.read()
    assert recs.tobytes() == area.expected(dtype).tobytes()
    assert lost == area.reported_lost
    assert not np.shares_memory(recs, np.frombuffer(area.buf, np.uint8))
    # at most one record (header first) is stitched, and only when the region wraps
    start = layout[1]  # data_tail before the read: the first byte of the region
    wraps = start % area.size + (area.head - start) > area.size
    assert len(gathered) <= (2 if wraps else 0)
    assert sum(gathered) <= 8 + 12 + 96 + 8
    area.buf[META:] = bytes([0xA5]) * area.size  # the kernel reuses the area: records stay
    assert recs.tobytes() == area.expected(dtype).tobytes()


def test_parse_consumes_nothing_until_consume():
    """parse(upto=head read earlier) takes exactly the records below that head; data_tail moves
    only on consume, so the kernel cannot overwrite records not yet copied."""
    dtype = DTYPES[2]
    area = FakeArea(1024, start=1024 - 100)  # the region wraps
    for i in range(5):
        area.output(payload(i, 32))
    area.publish()
    ring = PerfRing(area.buf, dtype)
    head = ring.head()
    area.output(payload(99, 32))  # arrives after the snapshot
    area.publish()
    pieces, lost, tail = ring.parse(upto=head)
    assert (lost, tail) == (0, head)
    assert area.tail == 1024 - 100  # not consumed yet
    out = np.empty(sum(len(p) for p in pieces), dtype=perfbuf.opaque(dtype))
    perfbuf.fill(out, pieces)
    ring.consume(tail)
    assert out.view(dtype).tobytes() == area.expected(dtype)[:5].tobytes()
    assert ring.pending_bytes() == 48
    assert ring.read()[0].tobytes() == area.expected(dtype)[5:].tobytes()


@pytest.mark.parametrize("where", ["first", "middle", "last", "across the end"])
def test_lost_record_inside_a_run(where):
    """A LOST record splits a run of same-size samples wherever it falls, the wrap included."""
    dtype = DTYPES[2]
    area = FakeArea(4096, start=4096 - 48 * 20 - 8)  # sample 21 crosses the end of the area
    at = {"first": 0, "middle": 10, "last": 39, "across the end": 20}[where]
    for i in range(40):
        if i == at:
            area.pending_lost = 7
        area.output(payload(i, 32))
    area.publish()
    recs, lost = PerfRing(area.buf, dtype).read()
    assert lost == 7
    assert recs.tobytes() == area.expected(dtype).tobytes()
    assert area.tail == area.head
