"""The user ring buffer writer on fake rings built from the documented layout.

kernel/bpf/ringbuf.c (`__bpf_user_ringbuf_peek`) and libbpf src/ringbuf.c: consumer_pos at
offset 0 of page 0, producer_pos at offset 0 of page 1, data from page 2 (mapped twice),
samples of {u32 len; u32 pad} + payload rounded up to 8 bytes, BUSY = bit 31, DISCARD = bit 30.
The kernel side is played by kernelscope's ring buffer *reader*, which parses that same
layout: what the writer publishes, a reader must get back, in order.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelscope.readers.ring import BUSY, DISCARD, RingParser
from kernelscope.readers.user_ring import RingWriter, sample_span

SAMPLE = np.dtype([("seq", "<u4"), ("value", "<i8")], align=True)  # 16 bytes: span 24


class Ring:
    """A fake user ring: the writer's and the kernel's views of one layout."""

    def __init__(self, size: int, start: int = 0) -> None:
        self.size = size
        self.consumer = bytearray(8)
        self.producer = bytearray(8 + 2 * size)  # producer_pos, then the data area twice
        self.consumer[:8] = self.producer[:8] = start.to_bytes(8, "little")
        self.writer = RingWriter(self.consumer, self.producer, size, data_offset=8)
        self.kernel = RingParser(self.consumer, self.producer, size, SAMPLE, data_offset=8)

    @property
    def prod(self) -> int:
        return int.from_bytes(self.producer[:8], "little")

    def write(self, records: np.ndarray) -> int:
        """Write, then do what the double mapping does for free: both copies hold the bytes."""
        before = self.prod
        k = self.writer.write(records)
        data = memoryview(self.producer)[8:]
        lo = before & (self.size - 1)
        for off in range(lo, lo + self.prod - before):
            twin = off - self.size if off >= self.size else off + self.size
            data[twin] = data[off]
        return k


def samples(lo: int, n: int) -> np.ndarray:
    a = np.zeros(n, SAMPLE)
    a["seq"] = np.arange(lo, lo + n)
    a["value"] = -a["seq"].astype(np.int64) * 3
    return a


def test_span_is_header_plus_payload_rounded_to_eight() -> None:
    assert [sample_span(s) for s in (1, 8, 16, 17, 24)] == [16, 16, 24, 32, 32]


def test_a_batch_is_published_with_one_producer_store_and_no_busy_bits() -> None:
    r = Ring(256)
    assert r.write(samples(0, 5)) == 5
    assert r.prod == 5 * 24
    data = np.frombuffer(r.producer, np.uint8, offset=8)
    headers = [int(data[i * 24: i * 24 + 4].view("<u4")[0]) for i in range(5)]
    assert headers == [16] * 5  # the length; BUSY and DISCARD clear
    assert not any(h & (BUSY | DISCARD) for h in headers)
    got = r.kernel.read()
    assert got.records["seq"].tolist() == [0, 1, 2, 3, 4]
    assert got.records["value"].tolist() == [0, -3, -6, -9, -12]


def test_a_full_ring_takes_what_fits_and_nothing_more() -> None:
    r = Ring(128)  # 128 // 24 = 5 samples, 8 bytes left over
    assert r.write(samples(0, 9)) == 5
    assert r.writer.pending_bytes() == 120
    assert r.write(samples(5, 1)) == 0  # 8 bytes free: not one more sample
    r.kernel.read()  # the kernel drains: room again
    assert int.from_bytes(r.consumer[:8], "little") == 120
    assert r.write(samples(5, 4)) == 4


def test_a_batch_that_wraps_at_an_exact_byte_reads_back_whole() -> None:
    r = Ring(256, start=256 - 8)  # 8 bytes before the end
    assert r.write(samples(0, 4)) == 4  # 96 bytes from offset 248: 88 of them past the end
    got = r.kernel.read()
    assert got.records["seq"].tolist() == [0, 1, 2, 3]
    assert got.records["value"].tolist() == [0, -3, -6, -9]
    # sample 1 starts at ring offset 248 + 24 - 256 = 16: its header sits at the start of the area
    assert int.from_bytes(r.producer[8 + 16: 8 + 20], "little") == 16


def test_a_sample_bigger_than_the_ring_is_refused() -> None:
    r = Ring(64)
    big = np.zeros(1, [("blob", "u1", 60)])  # span 72 > 64
    with pytest.raises(ValueError, match="60-byte sample does not fit the ring"):
        r.writer.write(big)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.booleans()), min_size=1, max_size=40),
       st.integers(0, 63))
def test_everything_written_is_read_back_in_order_and_never_overfills(
        steps: list[tuple[int, bool]], start_slot: int) -> None:
    size = 256
    r = Ring(size, start=start_slot * 8)
    sent: list[int] = []
    got: list[int] = []
    nxt = 0
    for n, drain in steps:
        k = r.write(samples(nxt, n))
        assert 0 <= k <= n
        sent += list(range(nxt, nxt + k))
        nxt += k
        assert r.writer.pending_bytes() <= size
        if k < n:
            assert size - r.writer.pending_bytes() < sample_span(SAMPLE.itemsize)  # it stopped only when full
        if drain:
            got += r.kernel.read().records["seq"].tolist()
    got += r.kernel.read().records["seq"].tolist()
    assert got == sent


def test_a_batch_written_in_several_steps_wraps_mid_step_and_reads_back_whole() -> None:
    r = Ring(256, start=256 - 64)
    r.writer.STEP_BYTES = 48  # two samples a step: five steps, the second one (240..288) across the end
    assert r.write(samples(0, 9)) == 9
    got = r.kernel.read()
    assert got.records["seq"].tolist() == list(range(9))
    assert got.records["value"].tolist() == [-3 * i for i in range(9)]


def test_headers_are_the_length_then_zero_over_whatever_the_area_held() -> None:
    r = Ring(256)
    r.producer[8:] = b"\xff" * (2 * 256)  # stale bytes of earlier laps
    assert r.write(samples(0, 3)) == 3
    words = np.frombuffer(r.producer, "<u4", offset=8)
    assert [int(w) for w in words[: 3 * 6 : 6]] == [16, 16, 16]  # u32 len, BUSY/DISCARD clear
    assert [int(w) for w in words[1: 3 * 6 : 6]] == [0, 0, 0]  # the u32 after it, as libbpf writes
    assert r.kernel.read().records["seq"].tolist() == [0, 1, 2]


def test_payloads_not_a_multiple_of_eight_and_strided_records_are_written_whole() -> None:
    odd = np.dtype([("seq", "<u4"), ("tag", "S7")])  # 11 bytes: span 24, 5 bytes of padding
    size = 128
    consumer, producer = bytearray(8), bytearray(8 + 2 * size)
    writer = RingWriter(consumer, producer, size, data_offset=8)
    kernel = RingParser(consumer, producer, size, odd, data_offset=8)
    a = np.zeros(10, odd)
    a["seq"] = np.arange(10)
    a["tag"] = [f"t{i}".encode() for i in range(10)]
    assert writer.write(a[::2]) == 5  # every other record: a view with a stride of 22 bytes
    got = kernel.read().records
    assert got["seq"].tolist() == [0, 2, 4, 6, 8]
    assert got["tag"].tolist() == [b"t0", b"t2", b"t4", b"t6", b"t8"]
