"""RingParser against fake rings laid out like the kernel's (kernel/bpf/ringbuf.c)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelscope.readers.batch import copy_records
from kernelscope.readers.ring import BUSY, DISCARD, HDR, RingParser, record_span

PAGE = 4096
DTYPE = np.dtype([("pid", "<u4"), ("seq", "<u4"), ("ts", "<u8"), ("comm", "S16")])  # 32 bytes


class FakeRing:
    """consumer page, producer page, then `size` data bytes mapped twice (kept in sync)."""

    def __init__(self, size: int, start: int = 0) -> None:
        self.size = size
        self.consumer = bytearray(PAGE)
        self.producer = bytearray(PAGE + 2 * size)
        self.cons = self.prod = start
        self._set(self.consumer, 0, start)
        self._set(self.producer, 0, start)

    @staticmethod
    def _set(buf: bytearray, off: int, value: int, width: int = 8) -> None:
        buf[off : off + width] = value.to_bytes(width, "little")

    def _write(self, pos: int, data: bytes) -> None:
        # write through both mappings of the data area, as the MMU would show it
        for i, b in enumerate(data):
            off = (pos + i) & (self.size - 1)
            self.producer[PAGE + off] = b
            self.producer[PAGE + self.size + off] = b

    def commit(self, payload: bytes, flags: int = 0) -> int:
        """Reserve + write one record; returns its position. Raises when the ring is full."""
        span = record_span(len(payload))
        used = self.prod - int.from_bytes(self.consumer[:8], "little")
        if used + span > self.size:
            raise OverflowError("full")
        pos = self.prod
        self._write(pos, (len(payload) | flags).to_bytes(4, "little") + b"\0\0\0\0")
        self._write(pos + HDR, payload + b"\0" * (span - HDR - len(payload)))
        self.prod += span
        self._set(self.producer, 0, self.prod)
        return pos

    def parser(self) -> RingParser:
        return RingParser(self.consumer, self.producer, self.size, DTYPE)


def drain(parser: RingParser, into: list[np.ndarray]) -> int:
    """Read until a pass consumes nothing; returns the records discarded on the way."""
    discarded = 0
    while True:
        res = parser.read()
        into.append(res.records)
        discarded += res.discarded
        if not res.consumed:
            return discarded


def event(i: int) -> np.ndarray:
    rec = np.zeros(1, DTYPE)
    rec["pid"], rec["seq"], rec["ts"], rec["comm"] = 100 + i, i, 1000 + i, f"p{i}".encode()
    return rec


def test_fixed_size_batch_is_one_pass() -> None:
    ring = FakeRing(4096)
    for i in range(50):
        ring.commit(event(i).tobytes())
    res = ring.parser().read()
    assert list(res.records["seq"]) == list(range(50))
    assert res.consumed == 50 * record_span(32)
    assert int.from_bytes(ring.consumer[:8], "little") == ring.prod


def test_record_wrapping_at_exact_byte_is_contiguous() -> None:
    size = 4096
    span = record_span(32)
    # start so that the third record's header is the ring's last 8 bytes
    start = size - 2 * span - HDR
    ring = FakeRing(size, start=start)
    for i in range(5):
        ring.commit(event(i).tobytes())
    res = ring.parser().read()
    assert list(res.records["seq"]) == list(range(5))
    assert list(res.records["comm"]) == [f"p{i}".encode() for i in range(5)]


def test_busy_record_stops_the_batch_and_is_read_later() -> None:
    ring = FakeRing(4096)
    ring.commit(event(0).tobytes())
    busy_pos = ring.commit(event(1).tobytes(), flags=BUSY)
    ring.commit(event(2).tobytes())
    parser = ring.parser()
    res = parser.read()
    assert list(res.records["seq"]) == [0]
    assert res.busy
    assert parser.consumer_pos == busy_pos
    # the producer commits: clear BUSY in place
    ring._write(busy_pos, (32).to_bytes(4, "little"))
    res = parser.read()
    assert list(res.records["seq"]) == [1, 2]
    assert parser.consumer_pos == ring.prod


def test_discarded_records_are_skipped_and_counted() -> None:
    ring = FakeRing(4096)
    for i in range(6):
        ring.commit(event(i).tobytes(), flags=DISCARD if i % 2 else 0)
    res = ring.parser().read()
    assert list(res.records["seq"]) == [0, 2, 4]
    assert res.discarded == 3


def test_short_and_long_records_are_padded_or_cut() -> None:
    ring = FakeRing(4096)
    ring.commit(event(7).tobytes()[:12])  # pid, seq, 4 bytes of ts
    ring.commit(event(8).tobytes() + b"extra bytes")
    res = ring.parser().read()
    assert list(res.records["seq"]) == [7, 8]
    assert res.records["comm"][0] == b""
    assert res.records["comm"][1] == b"p8"


def test_size_must_be_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        RingParser(bytearray(PAGE), bytearray(PAGE + 6000), 3000, DTYPE)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("commit"), st.integers(min_value=0, max_value=80), st.booleans()),
        st.tuples(
            st.just("read"), st.one_of(st.none(), st.integers(min_value=8, max_value=1024)), st.just(False)
        ),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    plan=ops,
    start=st.integers(min_value=0, max_value=1024 // 8 - 1),
    laps=st.integers(min_value=0, max_value=3),
    busy_at=st.one_of(st.none(), st.integers(min_value=0, max_value=79)),
)
def test_any_sequence_round_trips(plan, start, laps, busy_at) -> None:
    """Any mix of sizes, discards, partial reads, a BUSY record and wrap-arounds: every
    committed, non-discarded record comes out once, in order, truncated or zero-padded to
    the struct; nothing is read past a BUSY record until it commits; a full ring drops."""
    size = 1024
    ring = FakeRing(size, start=start * 8 + laps * (1 << 32))
    parser = ring.parser()
    want: list[bytes] = []
    got: list[np.ndarray] = []
    discarded_want = discarded_got = 0
    busy: tuple[int, int, int] | None = None  # (position, length, index) of a record being written
    for i, (op, arg, discard) in enumerate(plan):
        if op == "read":
            res = parser.read(arg)
            got.append(res.records)
            discarded_got += res.discarded
            continue
        payload = (event(i).tobytes() + bytes(80))[:arg]
        flags = (DISCARD if discard else 0) | (BUSY if busy_at == i and busy is None else 0)
        try:
            pos = ring.commit(payload, flags)
        except OverflowError:
            continue  # the kernel drops a record that does not fit
        if flags & BUSY:
            busy = (pos, arg, i)
            want.append(b"BUSY")
        elif discard:
            discarded_want += 1
        else:
            want.append(payload)
    if busy is not None:
        # everything up to the BUSY record is readable; nothing after it
        before = want.index(b"BUSY")
        discarded_got += drain(parser, got)
        assert parser.consumer_pos == busy[0]
        ring._write(busy[0], busy[1].to_bytes(4, "little"))  # the producer commits it
        want[before] = (event(busy[2]).tobytes() + bytes(80))[: busy[1]]
    discarded_got += drain(parser, got)
    records = np.concatenate(got) if got else np.empty(0, DTYPE)
    expected = np.concatenate([copy_records(p, DTYPE) for p in want]) if want else np.empty(0, DTYPE)
    assert records.tobytes() == expected.tobytes()
    assert discarded_got == discarded_want
    assert parser.consumer_pos == ring.prod


def test_a_record_longer_than_what_was_reserved_is_corruption():
    from kernelscope.errors import CorruptBufferError, InternalError

    ring = FakeRing(4096)
    ring.commit(b"\x01" * 32)
    ring._write(ring.prod, (5000).to_bytes(4, "little") + bytes(4))  # committed, runs past producer_pos
    ring.prod += 16
    ring._set(ring.producer, 0, ring.prod)
    parser = ring.parser()
    with pytest.raises(CorruptBufferError, match="corrupt ring buffer") as e:
        parser.read()
    assert isinstance(e.value, InternalError)  # a fault of the buffer, not the user's mistake
    assert parser.consumer_pos == parser.producer_pos  # the next read starts clean
    ring.commit(b"\x02" * 32)
    assert len(parser.read().records) == 1


@pytest.mark.parametrize(("cons", "prod"), [(100, 8), (0, 2 * 4096)])
def test_impossible_positions_are_corruption(cons, prod):
    from kernelscope.errors import CorruptBufferError

    ring = FakeRing(4096, start=cons)
    ring._set(ring.producer, 0, prod)
    parser = ring.parser()
    with pytest.raises(CorruptBufferError, match="producer_pos"):
        parser.read()
    assert parser.consumer_pos == prod
    assert len(parser.read().records) == 0


class _CommittedMeanwhile(np.ndarray):
    """Ring headers as the reader sees them while a producer works: the first reduction
    still sees a BUSY record, which is committed before the next read of the headers."""

    def min(self, *a, **k):  # type: ignore[override]
        return np.asarray(self).min(*a, **k)

    def max(self, *a, **k):  # type: ignore[override]
        out = np.asarray(self).max(*a, **k)
        self[:] = 32  # the producer commits the BUSY record now
        return out


def test_a_record_committed_between_header_reads_is_a_whole_run() -> None:
    from kernelscope.readers.ring import BUSY, committed_run

    lens = np.full(8, 32, dtype="<u4")
    lens[5] = BUSY | 32
    live = lens.view(_CommittedMeanwhile)
    assert committed_run(live, 32) == 8
    lens[5] = BUSY | 32
    assert committed_run(lens, 32) == 5
