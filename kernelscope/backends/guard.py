"""What keeps a load safe and explained, for both backends: Ctrl-C deferred while kernel
objects are being made, a notice while the verifier runs long, and the size checks the
kernel would otherwise fail obscurely (ring pages, records larger than their ring).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import KernelscopeError, SettingError
from ..readers.base import PAGE_SIZE as PAGE
from ..readers.base import check_pages
from . import base

RING_HEADER = 8  # struct bpf_ringbuf_hdr: u32 len (BUSY, DISCARD bits), u32 pg_off
SLOW_LOAD_NOTICE_S = 3.0  # seconds before "the verifier is still checking ..." is shown
SLOW_LOAD_EVERY_S = 5.0


# --- Ctrl-C --------------------------------------------------------------------------------

_deferring = threading.local()


def run_tool(cmd: list[str], *, text: bool = True, cwd: str | os.PathLike[str] | None = None
             ) -> subprocess.CompletedProcess[Any]:
    """subprocess.run(cmd, capture_output=True) that Ctrl-C cannot make leak: the child is
    started with SIGINT deferred (Popen makes its pipes before it can store them, and an
    interrupt in between loses their fds), then waited for interruptibly. An interrupt,
    including one held back while the child started, kills and reaps the child and closes
    its pipes before it propagates (a Popen dropped with its child running is kept alive in
    subprocess._active, pipes open, until a later Popen reaps it)."""
    proc: subprocess.Popen[Any] | None = None
    try:
        with deferred_interrupts():
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text, cwd=cwd)
        out, err = proc.communicate()
    except BaseException:
        if proc is not None:
            with deferred_interrupts():
                proc.kill()
                with proc:  # closes the pipes and waits for the child
                    pass
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C, a Jupyter interrupt) until the block ends, then deliver it.

    A load makes kernel objects inside C calls (BCC creates its maps while compiling, before
    `BPF.module` is set; libbpf returns a link pointer that Python must still store): a
    KeyboardInterrupt raised between the C call returning and its result being stored loses
    the only handle to those objects, and their fds stay open for the life of the process.
    Deferring the signal lets the block finish (or fail) with every object reachable; the
    caller frees them when the re-delivered interrupt propagates out of the block. Ctrl-C
    cannot cut a C call short anyway, so it waits only for the rest of the block.
    Only the main thread receives KeyboardInterrupt; elsewhere this does nothing.
    """
    if (threading.current_thread() is not threading.main_thread() or getattr(_deferring, "on", False)
            or signal.getsignal(signal.SIGINT) is None):  # None: a handler Python cannot put back
        yield
        return
    pending: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, _frame: pending.append(signum))
    except (ValueError, OSError):  # not the main interpreter
        yield
        return
    _deferring.on = True
    try:
        yield
    finally:
        _deferring.on = False
        signal.signal(signal.SIGINT, previous)
        if pending:
            # the handler the caller had (KeyboardInterrupt by default) runs here, in this frame
            signal.raise_signal(signal.SIGINT)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """shutil.rmtree(path, ignore_errors=True) with Ctrl-C deferred: rmtree opens each folder
    as an fd before its try block, and an interrupt in between loses that fd for the life of
    the process."""
    with deferred_interrupts():
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def temp_folder(prefix: str) -> Iterator[str]:
    """tempfile.TemporaryDirectory, removed with Ctrl-C deferred (remove_tree)."""
    with deferred_interrupts():
        d = tempfile.mkdtemp(prefix=prefix)
    try:
        yield d
    finally:
        remove_tree(d)


# --- slow verifier runs ----------------------------------------------------------------------


def _notify(text: str) -> None:
    stream = sys.stderr
    if stream is None:  # no console (pythonw, some daemons)
        return
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd == 2 and base._saved_fd2:  # fd 2 is being captured (BCC): write to the real one
        os.write(base._saved_fd2[-1], text.encode())
        return
    stream.write(text)
    stream.flush()


@contextlib.contextmanager
def slow_load_notice(what: str) -> Iterator[dict[str, float]]:
    """While the block runs, say every few seconds that the verifier is still checking `what`.

    The kernel's verifier may follow a program for up to a million instructions before it
    gives up (an unbounded loop); the syscall gives no progress, so a thread says it is still
    working. Yields a dict whose "seconds" the block's caller can read when it ends.
    """
    done = threading.Event()
    took = {"seconds": 0.0}
    t0 = time.monotonic()

    def tell() -> None:
        wait = SLOW_LOAD_NOTICE_S
        while not done.wait(wait):
            _notify(f"kernelscope: the verifier is still checking {what} "
                    f"({time.monotonic() - t0:.0f} s so far; it gives up after 1,000,000 instructions)\n")
            wait = SLOW_LOAD_EVERY_S

    thread = threading.Thread(target=tell, name="kernelscope-load-notice", daemon=True)
    thread.start()
    try:
        yield took
    finally:
        took["seconds"] = time.monotonic() - t0
        done.set()
        thread.join()


# --- sizes -----------------------------------------------------------------------------------


def check_ring_pages(name: str, pages: int, line: int | None, where: str) -> None:
    """A SettingError unless `pages` makes a ring buffer the kernel can create (readers.base's
    check, the message led by the cell line and the map). `where`: how the size was given,
    e.g. "BPF_RINGBUF_OUTPUT(events, 3)" or "pages=3"."""
    at = f"line {line}: " if line else ""
    check_pages(pages, f"{at}{name}: ring buffer pages", where)


def check_ring_bytes(name: str, nbytes: int, line: int | None, where: str) -> None:
    """As check_ring_pages, for a size in bytes (a CO-RE map's `max_entries`)."""
    at = f"line {line}: " if line else ""
    if nbytes < PAGE or nbytes % PAGE or nbytes & (nbytes - 1):
        low = max(PAGE, 1 << max(0, nbytes.bit_length() - 1))
        ways = f"{low} or {low * 2}" if low < nbytes else f"{low}"
        raise SettingError(
            f"{at}{name}: a ring buffer's max_entries is its size in bytes, which the kernel wants to be "
            f"a power of two and a multiple of the page size ({PAGE}); got {nbytes} in {where}. "
            f"Use {ways} ({PAGE} * a power of two).")
    check_ring_pages(name, nbytes // PAGE, line, where)


def ring_record_bytes(size: int) -> int:
    """Bytes a record of `size` takes in a ring buffer: its header, padded to 8 bytes."""
    return -(-(size + RING_HEADER) // 8) * 8


def check_records_fit(prog: Any, maps: Mapping[str, base.OutputMapLike]) -> None:
    """A SettingError for a ring buffer smaller than one record of its event struct.

    The kernel refuses (the reservation returns NULL, the output call -E2BIG) every record
    larger than the whole ring, so such a probe would count 100 % drops and receive nothing.
    """
    for name, om in maps.items():
        if om.kind != "ringbuf":
            continue
        try:
            dtype = prog.event_dtype(name)
        except KernelscopeError:
            continue  # no struct found: Probe reports that, or uses the dtype it was given
        need, ring = ring_record_bytes(dtype.itemsize), prog.ring_size(name)
        if need <= ring:
            continue
        pages = 1 << max(0, (-(-need // PAGE) - 1).bit_length())
        have = ring // PAGE
        at = f"line {om.line}: " if om.line else ""
        raise SettingError(
            f"{at}{name}: one event is {dtype.itemsize:,} bytes ({need:,} in the ring with its "
            f"{RING_HEADER}-byte header), more than the whole ring buffer holds ({ring:,} bytes = "
            f"{have} page{'s' if have != 1 else ''}): the kernel would drop every event. "
            f"Give it at least {pages} pages (pages={pages}, or in the declaration), "
            "or send a smaller struct.")
