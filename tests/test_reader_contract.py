"""The `Reader` contract both buffer readers keep, on fake buffers built by the test (no kernel).

The ring reader maps a memfd laid out like a ring map (timer wake-ups: a memfd cannot be
polled); the perf reader gets eventfds for perf events and anonymous shared mappings for
their rings. Like cilium/ebpf's `TestPerfReaderClose`: close wakes a blocked poll, which
raises ClosedError; a second close does nothing; reading after close raises.
"""

from __future__ import annotations

import gc
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from kernelscope.errors import ClosedError
from kernelscope.readers import perf
from kernelscope.readers.base import Reader
from kernelscope.readers.batch import Batch
from kernelscope.readers.perf import PERF_RECORD_SAMPLE, PerfBufferReader
from kernelscope.readers.ring import HDR, PAGE, RingBufferReader, record_span

DTYPE = np.dtype([("pid", "<u4"), ("seq", "<u4")])
RING_SIZE = 4 * PAGE


class FakeRingMap:
    """A memfd with a ring map's layout: consumer page, producer page, data area (twice)."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("fake-ringbuf", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, 2 * PAGE + 2 * RING_SIZE)
        self.mem = mmap.mmap(self.fd, 2 * PAGE + 2 * RING_SIZE)

    def produce(self, pid: int) -> None:
        prod = struct.unpack_from("<Q", self.mem, PAGE)[0]
        off = 2 * PAGE + (prod & (RING_SIZE - 1))
        struct.pack_into("<IIII", self.mem, off, DTYPE.itemsize, 0, pid, 0)
        struct.pack_into("<Q", self.mem, PAGE, prod + record_span(DTYPE.itemsize))

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)


class FakePerf:
    """Stands in for perf_event_open/mmap/ioctl: an eventfd per CPU, an anonymous ring each."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fds: dict[int, int] = {}
        self.areas: dict[int, int] = {}

        def open_event(attr: object, cpu: int) -> int:
            self.fds[cpu] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            return self.fds[cpu]

        def map_shared(fd: int, length: int) -> int:
            addr = perf._libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE,
                                   mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, -1, 0)
            assert addr not in (None, perf._MAP_FAILED)
            cpu = next(c for c, f in self.fds.items() if f == fd)
            self.areas[cpu] = int(addr)
            return int(addr)

        monkeypatch.setattr(perf, "perf_event_open", open_event)
        monkeypatch.setattr(perf, "_map_shared", map_shared)
        monkeypatch.setattr(perf.fcntl, "ioctl", lambda fd, req, arg: 0)

    def produce(self, cpu: int, pid: int) -> None:
        """One PERF_RECORD_SAMPLE in cpu's ring (data follows page 0: data_offset is 0), then
        the wake-up the kernel would send."""
        addr = self.areas[cpu]
        ctl = (perf.ctypes.c_uint64 * 4).from_address(addr + 1024)
        head = ctl[0]
        rec = struct.pack("<IHHIII", PERF_RECORD_SAMPLE, 0, 24, 8, pid, 0) + bytes(4)
        perf.ctypes.memmove(addr + PAGE + (head & (2 * PAGE - 1)), rec, len(rec))
        ctl[0] = head + len(rec)
        os.eventfd_write(self.fds[cpu], 1)


@pytest.fixture(params=["ring", "perf"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make(kind: str, monkeypatch: pytest.MonkeyPatch,
         fd_count: Callable[[], int]) -> Iterator[Callable[..., tuple[Reader, Callable[[int], None]]]]:
    """make() -> (reader, produce(pid)): a fresh reader of `kind` and a way to give it a record;
    closed at teardown unless make(keep=False)."""
    made: list[Reader] = []
    rings: list[FakeRingMap] = []
    fds_before = [0]

    def new(keep: bool = True) -> tuple[Reader, Callable[[int], None]]:
        gc.collect()  # earlier tests' garbage (a probe's fds) is freed now, not during the count
        if kind == "ring":
            ring = FakeRingMap()
            rings.append(ring)
            fds_before[0] = fd_count()
            reader: Reader = RingBufferReader(ring.fd, RING_SIZE, DTYPE, wakeup="timer")
            produce = ring.produce
        else:
            fake = FakePerf(monkeypatch)
            fds_before[0] = fd_count()
            reader = PerfBufferReader(lambda cpu, fd: None, DTYPE, pages=2, cpus=[0, 1])

            def produce(pid: int) -> None:
                fake.produce(1, pid)
        if keep:
            made.append(reader)
        return reader, produce

    new.fds_before = fds_before  # type: ignore[attr-defined]  # [fd count before the last reader]
    yield new
    for r in made:
        r.close()
    for ring in rings:
        ring.close()


def _in_epoll_wait(tid: int) -> bool:
    # /proc/<tid>/syscall starts with the number of the syscall the thread is blocked in.
    nr = Path(f"/proc/self/task/{tid}/syscall").read_text().split()[0]
    return nr in {"232", "281", "441"}  # epoll_wait, epoll_pwait, epoll_pwait2 (x86_64)


def test_both_keep_the_protocol(make):
    r, produce = make()
    assert isinstance(r, Reader)
    assert not r.closed
    assert r.fill_bytes() == 0
    assert isinstance(r.capacity_bytes, int)
    assert r.capacity_bytes > 0
    assert r.poll(0) is False
    produce(7)
    assert r.fill_bytes() > 0
    assert r.poll(0) is True
    batch = r.read()
    assert isinstance(batch, Batch)
    assert batch.records["pid"].tolist() == [7]
    assert (batch.lost, batch.discarded) == (0, 0)
    assert r.fill_bytes() == 0


def test_close_wakes_a_blocked_poll_which_raises(make, wait_for):
    r, _ = make()
    outcome: list[BaseException | bool] = []
    tid: list[int] = []

    def wait() -> None:
        tid.append(threading.get_native_id())
        try:
            outcome.append(r.poll(None))
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    wait_for(lambda: bool(tid) and _in_epoll_wait(tid[0]), what="poll blocked in epoll_wait")
    r.close()
    t.join(5.0)
    assert not t.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], ClosedError)


def test_after_close_everything_raises_and_close_again_does_nothing(make, fd_count):
    r, produce = make()
    fds = make.fds_before[0]
    assert fd_count() > fds
    produce(1)
    r.close()
    assert r.closed
    for call in (r.read, lambda: r.poll(0), r.fill_bytes):
        with pytest.raises(ClosedError):
            call()
    r.close()  # a second close does nothing
    assert r.closed
    assert fd_count() == fds  # every fd the reader opened is closed


def test_a_forgotten_reader_frees_its_fds(make, fd_count):
    r, _ = make(keep=False)
    fds = make.fds_before[0]
    assert fd_count() > fds
    del r
    gc.collect()
    assert fd_count() == fds


def test_header_size_matches_user_ring():
    from kernelscope.readers import user_ring

    assert user_ring.HDR == HDR == 8
    assert user_ring.sample_span is record_span
