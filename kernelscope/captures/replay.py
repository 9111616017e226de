"""Replaying a capture through the same interface as a live `Probe`.

    r = kernelscope.captures.replay.replay("capture.parquet", speed=1.0).start()
    r.df, r.stats, r.history()          # as on a Probe, growing at the recorded pace

`speed=None` releases everything at once. No BPF, no root: this is how notebooks run on
Binder and in CI's replay mode.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

import numpy as np

from ..backends.rewrite import OutputMap
from ..drain import MapState
from ..errors import ClosedError, KernelscopeError
from ..maps.table import Maps
from ..readers.batch import Batch, take_records
from ..results import Results
from ..schema import Schema
from ..store import FrameStore
from .capture import Capture, MapCapture, load


class Replay(Results):
    """A capture played back: frames, stats and history as the live probe had them."""

    def __init__(
        self, capture: Capture, speed: float | None = 1.0, name: str | None = None, path: str | None = None
    ) -> None:
        if speed is not None and speed <= 0:
            raise ValueError("speed must be positive (or None for all at once)")
        self.capture: Capture = capture
        self.speed = speed
        self.path = path
        self.name = name or capture.settings.get("name")
        self.source = capture.source
        self.backend = str(capture.settings.get("backend", "bcc"))
        self.warnings: list[str] = list(capture.warnings)
        self.error: BaseException | None = None
        self.closed = False
        self.outputs: dict[str, MapState] = {}
        self._maps = Maps(tables=capture.tables)
        self._pos: dict[str, int] = {}
        for i, (mname, mc) in enumerate(capture.maps.items()):
            schema = Schema(mc.dtype, per_cpu=mc.kind == "perf", epoch_offset_ns=mc.epoch_offset_ns)
            ms = MapState(OutputMap(mname, mc.kind, i, mc.pages or None), schema, FrameStore(schema))
            ms.pages = mc.pages
            self.outputs[mname] = ms
            self._pos[mname] = 0
        self.started_at = None  # monotonic seconds of start(), as on a Probe
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- Probe-like lifecycle ----------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def loaded(self) -> bool:
        return True

    @property
    def done(self) -> bool:
        return all(self._pos[n] >= len(mc.records) for n, mc in self.capture.maps.items())

    def state(self) -> str:
        return (
            "closed" if self.closed else "replaying" if self.running else "replayed" if self.done else "ready"
        )

    def elapsed(self) -> float:
        """Seconds of recorded time played so far."""
        if self.started_at is None:
            return 0.0
        if self.speed is None:
            return math.inf
        return (time.monotonic() - self.started_at) * self.speed

    def load(self) -> Replay:
        return self

    def start(self) -> Replay:
        if self.closed:
            raise ClosedError("this replay is closed")
        if self.started_at is None:
            self.started_at = time.monotonic()
        if self.speed is None:
            self.poll_once()
            return self
        if not self.running and not self.done:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="kernelscope-replay", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set() and not self.done:
            self.poll_once()
            self._stop.wait(0.05)

    def poll_once(self, timeout: float = 0.0) -> int:
        """Release every recorded event whose arrival time has come."""
        if self.started_at is None:
            self.started_at = time.monotonic()
        horizon = self.elapsed()
        total = 0
        for name, mc in self.capture.maps.items():
            ms = self.outputs[name]
            if len(ms.marks) < len(mc.marks):  # reloads, shown in the plots as the recording reaches them
                ms.marks[:] = [m for m in mc.marks if m["t"] <= horizon]
            start = self._pos[name]
            end = (
                len(mc.records)
                if horizon == math.inf
                else int(np.searchsorted(mc.arrival_ns, self.capture.started_ns + horizon * 1e9,
                                         side="right"))
            )
            if end <= start:
                continue
            cpu = mc.cpu[start:end] if mc.cpu is not None else None
            # group by recorded arrival so each chunk keeps its arrival time
            arrivals = mc.arrival_ns[start:end]
            for a in np.unique(arrivals):
                sel = arrivals == a
                ms.store.append(
                    Batch(take_records(mc.records[start:end], sel), cpu[sel] if cpu is not None else None),
                    int(a),
                )  # the recorded clock, as recorded
            ms.batches += 1
            self._pos[name] = end
            total += end - start
        return total

    def stop(self) -> Replay:
        """Stop replaying; an all-at-once replay (speed None) first releases everything,
        as a live probe's stop() drains what its buffers still hold."""
        if self.speed is None and not self.closed:
            self.poll_once()
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        return self

    def close(self) -> None:
        self.stop()
        self.closed = True

    def __enter__(self) -> Replay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reconfigure(self, **settings: Any) -> Replay:
        """A capture's buffers cannot change; the recorded run is what it is."""
        raise KernelscopeError("a replayed capture cannot be reconfigured: record it again with new settings")

    def wait(self, duration: float | None = None, limit: int | None = None, progress: Any = None) -> Replay:
        """Like Probe.wait: block for `duration` s of recorded time or `limit` events."""
        if self.speed is None:
            self.start()
        else:
            self.start()
            t0 = time.monotonic()
            while self.running:
                received = sum(ms.store.received for ms in self.outputs.values())
                if progress:
                    progress(received, time.monotonic() - t0)
                if (duration is not None and self.elapsed() >= duration) or (
                    limit is not None and received >= limit
                ):
                    break
                time.sleep(0.05)
        self.stop()
        return self

    # --- what the live probe reported ----------------------------------------------------

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        """The recorded stats as they were at the replay's current time (final once done)."""
        out = {}
        horizon = self.elapsed()
        for name, mc in self.capture.maps.items():
            ms = self.outputs[name]
            if self.done:
                st = dict(mc.stats)
            else:
                st = dict(mc.stats)
                sample = _sample_at(mc, horizon)
                for key in ("attempted", "dropped", "fill_bytes", "lost_records"):
                    if key in sample:
                        st[key] = int(sample[key])
                st["received"] = ms.store.received
                st["in_flight"] = st.get("attempted", 0) - st["received"] - st.get("dropped", 0)
            st["stored"] = len(ms.store)
            st["replayed"] = True
            out[name] = st
        return out

    def history(self, name: str | None = None) -> Any:
        import pandas as pd

        ms = self._map(name)
        mc = self.capture.maps[ms.om.name]
        horizon = self.elapsed()
        return pd.DataFrame([h for h in mc.history if h["t"] <= horizon])

    def attach_points(self) -> list[str]:
        return [f"replay of {self.path or 'a capture'}"]

    @property
    def send_stats(self) -> dict[str, dict[str, Any]]:
        """The user ring buffer counts the live probe had when it stopped."""
        recorded = self.capture.settings.get("send_stats") or {}
        return {name: {**st, "replayed": True} for name, st in recorded.items()}

    def send(self, name: str | None = None, records: Any = None, timeout: float = 0.0) -> int:
        """Check records against the recorded sample struct; returns how many there are.

        A replay reaches no kernel: nothing is sent, and what the program echoed back is in
        the capture's frames. Malformed records still fail as they would live.
        """
        from ..readers.user_ring import choose_ring, to_records
        from .capture import dtype_from_json

        dtypes = self.capture.settings.get("user_ring_dtypes") or {}
        name, records = choose_ring(name, records, dtypes, "the recorded program")
        return len(to_records(records, dtype_from_json(dtypes[name]), f"send to {name}"))


def _sample_at(mc: MapCapture, t: float) -> dict[str, float]:
    best: dict[str, float] = {}
    for h in mc.history:
        if h["t"] <= t:
            best = h
        else:
            break
    return best


def replay(path: str | os.PathLike[str], speed: float | None = 1.0, name: str | None = None) -> Replay:
    """Open a capture for replay: same interface as a live Probe (start, df, stats, history)."""
    return Replay(load(path), speed=speed, name=name, path=str(path))
