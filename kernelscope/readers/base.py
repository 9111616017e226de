"""What every buffer reader keeps: the typed `Reader` contract, and the release of what it owns.

The ring reader (readers/ring.py) and the perf reader (readers/perf.py) are two implementations
of one role, like cilium/ebpf's `ringbuf.Reader` and `perf.Reader`: the drain loop never asks
which one it holds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import SettingError
from .batch import Batch

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# A ring's size goes to the kernel as the map's max_entries, a u32, and is a power of two: so
# 2^31 bytes (2^19 pages of 4 KiB) is the largest ring; no host maps a perf buffer that large.
MAX_BUFFER_BYTES = 1 << 31
MAX_PAGES = MAX_BUFFER_BYTES // PAGE_SIZE


def powers_around(n: int) -> str:
    """The powers of two either side of `n` ("2 or 4"), for a message."""
    if n < 1:
        return "1"
    low = 1 << (n.bit_length() - 1)
    return f"{low} or {low * 2}"


def human_bytes(nbytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:g} {unit}"
    return f"{nbytes} bytes"


def check_pages(pages: object, what: str = "pages", where: str = "") -> int:
    """`pages` as an int, or a SettingError saying what a buffer size must be.

    Ring and perf buffers hold a power of two of pages (the kernel maps no other size), at
    most MAX_PAGES. `what` names the setting ("events: ring buffer pages"), `where` how it
    was given ("BPF_RINGBUF_OUTPUT(events, 3)", "pages=3").
    """
    given = f" (in {where})" if where else ""
    if isinstance(pages, bool) or not isinstance(pages, (int, np.integer)):
        raise SettingError(f"{what} must be a whole number of pages, a power of two such as 64, "
                           f"not {pages!r} ({type(pages).__name__}){given}")
    n = int(pages)
    if n < 1 or n & (n - 1):
        raise SettingError(f"{what} must be a power of two, got {n}{given}: the kernel refuses other "
                           f"sizes. Use {powers_around(n)}.")
    if n > MAX_PAGES:
        raise SettingError(
            f"{what}: a buffer of {n:,} pages ({human_bytes(n * PAGE_SIZE)}){given} is larger than the "
            f"kernel allows: a ring's size is a 32-bit byte count, so at most {MAX_PAGES:,} pages "
            f"({human_bytes(MAX_BUFFER_BYTES)}) of {PAGE_SIZE} bytes, and it must fit in memory. "
            "Use fewer pages.")
    return n


@runtime_checkable
class Reader(Protocol):
    """A reader of one output map's buffer(s), used by one draining thread.

    - `read()` consumes what is pending and returns it as one `Batch`; samples the kernel
      dropped and records it discarded are counts in that batch, not log lines.
    - `poll(timeout)` waits up to `timeout` seconds (None: no limit) for the kernel's wake-up:
      True when there is data to read, False when the time ran out.
    - `fill_bytes()` is how many bytes wait in the buffer (all CPUs of a perf buffer);
      `capacity_bytes` how many it holds before the kernel drops samples.
    - `close()` may come from any thread and is idempotent; it wakes a blocked `poll`, which
      then raises `ClosedError`, as `read`, `poll` and `fill_bytes` do from then on.
    """

    @property
    def closed(self) -> bool:
        """True once `close()` was called."""
        ...

    @property
    def capacity_bytes(self) -> int:
        """Bytes the buffer holds (perf: the data areas of all CPUs)."""
        ...

    def poll(self, timeout: float | None, /) -> bool:
        """Wait for data; True if there is some, False on timeout; ClosedError once closed."""
        ...

    def read(self) -> Batch:
        """Consume everything pending as one batch; ClosedError once closed."""
        ...

    def fill_bytes(self) -> int:
        """Bytes waiting to be read; ClosedError once closed."""
        ...

    def close(self) -> None:
        """Wake a blocked poll and free the kernel-side objects; a second call does nothing."""
        ...


class Resources:
    """What a reader owns in the kernel's name (mappings, fds, an epoll), released once.

    Each `push` adds a release function; `release()` runs them in reverse order (the last
    acquired first: a parser's views before the mapping they point into, the mapping before
    its fd) and ignores what is already gone. It holds no reference to the reader, so a
    `weakref.finalize(reader, resources.release)` frees a forgotten reader too.
    """

    def __init__(self) -> None:
        self._releases: list[Callable[[], object]] = []

    def push(self, release: Callable[[], object]) -> None:
        self._releases.append(release)

    def fd(self, fd: int) -> int:
        """Own `fd`: closed on release. Returns it."""
        self.push(lambda: os.close(fd))
        return fd

    def release(self) -> None:
        while self._releases:
            # BufferError: a stray numpy view still exists; the mapping goes with that view.
            with contextlib.suppress(OSError, BufferError, ValueError):
                self._releases.pop()()
