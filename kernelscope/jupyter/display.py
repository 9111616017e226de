"""What `%%bpf` shows while a probe runs: a status line that refreshes in place, a progress bar.

Both read only counters the drain thread already keeps (each map's frame store and its
sampled history), never the kernel: the status thread makes no syscalls, so it cannot race
with a probe being closed, and it sleeps on an Event between refreshes (about 2 Hz).
"""

from __future__ import annotations

import contextlib
import contextvars
import html
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from IPython.display import display

from .. import printk
from ..results import Results

Bundle = dict[str, str]

STATUS_INTERVAL = 0.5  # seconds between refreshes of a status line
PROGRESS_INTERVAL = 0.25  # seconds between redraws of a progress bar
BAR_WIDTH = 24


class Handle(Protocol):
    """The part of IPython's DisplayHandle used here (tests pass a recorder)."""

    def update(self, obj: Any, **kwargs: Any) -> None: ...


def live_output(shell: Any) -> bool:
    """True when an output can be replaced in place: a Jupyter kernel, not a terminal.

    In a terminal, DisplayHandle.update prints a new copy each time, so status lines are
    shown once and progress is drawn with carriage returns instead.
    """
    return shell is not None and getattr(shell, "kernel", None) is not None


@dataclass
class Counts:
    """A probe's totals over all output maps, from the drain thread's own bookkeeping."""

    state: str
    received: int
    dropped: int
    lost: int
    rows: int
    elapsed: float
    error: str = ""
    sent: int = 0  # records written into user ring buffers (CO-RE probes)
    printk: tuple[int, int] = (0, 0)  # bpf_printk lines received, lost (kernelscope.printk)


def dropped(probe: Results) -> int:
    """Events dropped so far over all output maps, as of the drain loop's last sample."""
    return sum(int(ms.history[-1]["dropped"]) for ms in list(probe.outputs.values()) if ms.history)


def counts(probe: Results) -> Counts:
    received = lost = rows = 0
    for ms in list(probe.outputs.values()):
        received += ms.store.received
        rows += len(ms.store)
        if ms.history:
            lost += int(ms.history[-1]["lost_records"])
    if probe.closed:
        state = "closed"
    elif probe.running:
        state = "running"
    elif probe.loaded:
        state = "stopped" if probe.started_at else "loaded, not started"
    else:
        state = "new"
    started = probe.started_at
    elapsed = time.monotonic() - started if started and probe.running else 0.0
    err = f"{type(probe.error).__name__}: {probe.error}" if probe.error is not None else ""
    sent = sum(r.sent for r in probe.user_rings.values())
    ch = printk.channel(probe)
    pk = (ch.received, ch.counts()["lost"]) if ch is not None else (0, 0)
    return Counts(state, received, dropped(probe), lost, rows, elapsed, err, sent, pk)


def _n(x: float) -> str:
    return f"{x:,.0f}"


class StatusLine:
    """A one-line summary of a probe (state, events, rate, drops) that refreshes in place.

    `update_once()` does one refresh and says whether to keep going (tests call it
    directly); `start()` runs it every STATUS_INTERVAL in a daemon thread holding only a
    weak reference to the probe, until the probe stops or closes or `stop()` is called.
    """

    def __init__(self, probe: Any, name: str, handle: Handle | None = None,
                 interval: float = STATUS_INTERVAL) -> None:
        self._ref = weakref.ref(probe)
        self.name = name
        self.handle = handle
        self.interval = interval
        self.updates = 0
        self._prev: tuple[float, int] | None = None
        self._rate: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._final: Bundle | None = None

    # --- rendering -----------------------------------------------------------------------

    def _measure(self, c: Counts) -> None:
        now = time.monotonic()
        if self._prev is not None and c.state == "running":
            dt = now - self._prev[0]
            if dt > 0:
                self._rate = (c.received - self._prev[1]) / dt
        elif c.state != "running":
            self._rate = None
        self._prev = (now, c.received)

    def text(self, c: Counts) -> str:
        parts = [f"{self.name}: {c.state}"]
        if c.state == "running":
            parts[0] += f" {c.elapsed:.0f} s"
        parts.append(f"{_n(c.received)} events")
        if self._rate is not None:
            parts.append(f"{_n(self._rate)}/s")
        drop = f"{_n(c.dropped)} dropped"
        if c.lost:
            drop += f" (+{_n(c.lost)} lost records)"
        parts.append(drop)
        if c.rows != c.received:
            parts.append(f"{_n(c.rows)} rows kept")
        if c.sent:
            parts.append(f"{_n(c.sent)} sent (user ring)")
        if any(c.printk):
            lost = f" ({_n(c.printk[1])} lost)" if c.printk[1] else ""
            parts.append(f"{_n(c.printk[0])} printk lines{lost}")
        line = " | ".join(parts)
        if c.state in ("running", "loaded, not started"):
            line += f"  ({self.name}.df grows; %bpf_stop {self.name})"
        if c.error:
            line += f"\nerror: {c.error}"
        return line

    def bundle(self) -> Bundle:
        probe = self._ref()
        if probe is None:
            return self._final or {"text/plain": f"{self.name}: gone"}
        c = counts(probe)
        self._measure(c)
        text = self.text(c)
        color = {"running": "#1a7f37", "closed": "#6e7781", "stopped": "#6e7781"}.get(c.state, "#9a6700")
        first, _, rest = text.partition("\n")
        err = f"<div style='color:#cf222e'>{html.escape(rest)}</div>" if rest else ""
        dot = "&#9679;" if c.state == "running" else "&#9675;"
        out = {
            "text/plain": text,
            "text/html": (f"<div style='font-family:monospace;font-size:90%'>"
                          f"<span style='color:{color}'>{dot}</span> {html.escape(first)}{err}</div>"),
        }
        if c.state != "running":
            self._final = out
        return out

    # --- refreshing ----------------------------------------------------------------------

    def show(self) -> StatusLine:
        """Display the line now (once); keeps the handle for later updates."""
        handle = display(self.bundle(), raw=True, display_id=True)
        if self.handle is None:
            self.handle = handle
        return self

    def update_once(self) -> bool:
        """Refresh the displayed line; False once the probe is no longer running."""
        probe = self._ref()
        running = probe is not None and probe.running
        del probe
        if self.handle is not None:
            self.handle.update(self.bundle(), raw=True)
            self.updates += 1
        return running

    def start(self) -> StatusLine:
        """Refresh in a daemon thread until the probe stops. Idempotent."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        # Run in a copy of the cell's context: ipykernel keeps the parent message (which
        # cell an output belongs to) in a contextvar, which a bare thread would not see.
        ctx = contextvars.copy_context()
        self._thread = threading.Thread(target=ctx.run, args=(self._run,), daemon=True,
                                        name=f"kernelscope-status-{self.name}")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.update_once():
                    return
            except Exception:  # a display failure must not kill the kernel's output
                return

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, final_update: bool = True) -> None:
        """Stop refreshing (joins the thread); one last refresh shows the final counts."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=2)
        self._thread = None
        if final_update and self.handle is not None:
            with contextlib.suppress(Exception):  # the frontend may be gone (shutdown)
                self.handle.update(self.bundle(), raw=True)


class Progress:
    """The `progress(received, elapsed)` callback of Probe.wait: a text bar, redrawn ~4 Hz.

    In a notebook it replaces one output in place; in a terminal it redraws with a
    carriage return; elsewhere (pytest, nbconvert without a kernel) it prints the end only.
    """

    def __init__(self, probe: Any, name: str, duration: float | None, limit: int | None, *,
                 live: bool, quiet: bool = False, out: Any = None,
                 interval: float = PROGRESS_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ref = weakref.ref(probe)
        self.name = name
        self.duration = duration
        self.limit = limit
        self.live = live
        self.quiet = quiet
        self.out = out if out is not None else sys.stdout
        self.interval = interval
        self.clock = clock
        self.handle: Any = None
        self.received = 0
        self.elapsed = 0.0
        self._last_draw = -1.0
        self._tty = bool(getattr(self.out, "isatty", lambda: False)())

    def fraction(self) -> float:
        f = 0.0
        if self.duration:
            f = max(f, self.elapsed / self.duration)
        if self.limit:
            f = max(f, self.received / self.limit)
        return min(f, 1.0)

    def text(self, end: str = "") -> str:
        filled = round(self.fraction() * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        goal = []
        if self.duration is not None:
            goal.append(f"{self.elapsed:.1f}/{self.duration:g} s")
        else:
            goal.append(f"{self.elapsed:.1f} s")
        if self.limit is not None:
            goal.append(f"{_n(self.received)}/{_n(self.limit)} events")
        else:
            goal.append(f"{_n(self.received)} events")
        rate = self.received / self.elapsed if self.elapsed > 0 else 0.0
        probe = self._ref()
        drops = dropped(probe) if probe is not None else 0
        line = f"{self.name} [{bar}] " + ", ".join(goal) + f", {_n(rate)}/s, {_n(drops)} dropped"
        return line + (f"  {end}" if end else "")

    def __call__(self, received: int, elapsed: float) -> None:
        self.received, self.elapsed = received, elapsed
        if self.quiet:
            return
        now = self.clock()
        if now - self._last_draw < self.interval:
            return
        self._last_draw = now
        self._draw(self.text(), final=False)

    def finish(self, end: str) -> None:
        """Draw the last state with a closing note ("done", "interrupted", ...)."""
        if not self.quiet:
            self._draw(self.text(end), final=True)

    def _draw(self, text: str, final: bool) -> None:
        if self.live:
            bundle = {"text/plain": text,
                      "text/html": f"<pre style='margin:0'>{html.escape(text)}</pre>"}
            if self.handle is None:
                self.handle = display(bundle, raw=True, display_id=True)
            else:
                self.handle.update(bundle, raw=True)
        elif self._tty:
            self.out.write("\r" + text + ("\n" if final else ""))
            self.out.flush()
        elif final:
            print(text, file=self.out)


def show_warning(text: str) -> None:
    """A warning the user cannot miss: an amber box in notebooks, a plain line elsewhere."""
    display({
        "text/plain": f"WARNING: {text}",
        "text/html": ("<div style='border-left:4px solid #d97706;background:#fffbeb;"
                      f"padding:4px 8px;margin:2px 0'>&#9888; {html.escape(text)}</div>"),
    }, raw=True)
