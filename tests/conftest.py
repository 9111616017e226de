"""Shared test setup: the real-kernel group, and fixtures to wait and to check for leaks.

Tests marked `@pytest.mark.kernel` load real BPF programs. Without privileges (or when the
host cannot be prepared) they skip, saying why; with KERNELSCOPE_REQUIRE_BPF=1 (what
`make test`, and so CI, sets) they fail instead, because there a skip would hide that the
real-kernel group never ran. Skips for a kernel feature this kernel lacks (kprobes,
fentry) are the tests' own and stay skips.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import util

from kernelscope import host
from kernelscope.errors import KernelscopeError

REQUIRE_BPF = os.environ.get("KERNELSCOPE_REQUIRE_BPF") == "1"

_checked = False
_unready: str | None = None


def _kernel_ready() -> str | None:
    """None when kernel tests can run; else why not. host.check() runs once per session: it
    changes nothing (`make test` runs `kernelscope setup` first, which does)."""
    global _checked, _unready
    if not _checked:
        _checked = True
        try:
            host.check()
        except KernelscopeError as e:
            _unready = f"{type(e).__name__}: {e}"
    return _unready


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is None:
        return
    why = _kernel_ready()
    if why is None:
        return
    if REQUIRE_BPF:
        pytest.fail(f"KERNELSCOPE_REQUIRE_BPF=1 but this real-kernel test cannot run: {why}",
                    pytrace=False)
    pytest.skip(f"real-kernel test needs a prepared host (`kernelscope setup`): {why}")


def pytest_report_header(config: pytest.Config) -> str:
    mode = "fail" if REQUIRE_BPF else "skip"
    return (f"kernelscope: kernel {host.kernel_release()}, real-kernel tests {mode} "
            f"when BPF is unavailable (KERNELSCOPE_REQUIRE_BPF={int(REQUIRE_BPF)})")


@pytest.fixture
def wait_for() -> Callable[..., object]:
    """`wait_for(predicate, timeout=5.0, interval=0.01)`: poll until truthy, else fail."""
    return util.wait_for


@pytest.fixture
def fd_count() -> Callable[[], int]:
    """A function returning this process's open fd count; compare before/after for leaks."""
    return util.fd_count


@pytest.fixture
def bpf_object_counts() -> Callable[[], util.BPFCounts]:
    """A function returning BPFCounts(progs, maps, links) held open by this process."""
    return util.bpf_object_counts


@pytest.fixture
def pinned() -> Iterator[int]:
    """Run this thread on one CPU (the highest allowed) so every event it causes, and the
    wake-up the kernel queues for it, lands on that CPU; the affinity is restored after."""
    before = os.sched_getaffinity(0)
    cpu = max(before)
    os.sched_setaffinity(0, {cpu})
    yield cpu
    os.sched_setaffinity(0, before)


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows per Schema.frame() call from now on: what a FrameStore converts for a frame."""
    from kernelscope.schema import Schema

    converted: list[int] = []
    real = Schema.frame

    def counting(self, records, *a, **k):  # type: ignore[no-untyped-def]
        converted.append(len(records))
        return real(self, records, *a, **k)

    monkeypatch.setattr(Schema, "frame", counting)
    return converted
