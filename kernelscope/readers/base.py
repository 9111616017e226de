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

PAGE_SIZE = 4096
# A ring's size is a u32 in the kernel (max_entries) and a power of two, so 2 GiB = 2^19 pages
# is the largest ring; a perf buffer of that many pages per CPU is more than any host maps.
MAX_PAGES = 2**19


def check_pages(pages: object, where: str = "pages") -> int:
    """`pages` as an int, or a SettingError saying what a buffer size must be.

    A buffer holds a power of two of pages (1, 2, 4, ... MAX_PAGES): the kernel maps ring and
    perf data areas of that size only.
    """
    if isinstance(pages, bool) or not isinstance(pages, (int, np.integer)):
        raise SettingError(f"{where} must be a whole number of pages, a power of two such as 64, "
                           f"not {pages!r} ({type(pages).__name__})")
    n = int(pages)
    if n < 1 or n & (n - 1):
        lower = 1 << max(0, n.bit_length() - 1) if n > 0 else 1
        nearest = f"{lower} or {lower * 2}" if n > 1 else "1"
        raise SettingError(f"{where} must be a power of two (1, 2, 4, ...), got {n}: try {nearest}")
    if n > MAX_PAGES:
        raise SettingError(f"{where} = {n} pages ({n * PAGE_SIZE / 2**30:.0f} GiB) is more than a "
                           f"buffer can hold: at most {MAX_PAGES} pages (2 GiB, the kernel's limit "
                           "for a ring buffer)")
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
