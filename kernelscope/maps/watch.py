"""A map's snapshots over time: a daemon thread reads the map every `every` s; `history()` is
one tidy frame (a `time` column, then the map frame's columns), so a rate per key is a
`groupby(key).diff()` away."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pandas as pd

from ..errors import KernelscopeError


class Watch:
    """Snapshots of `read()`; `sample()` takes one (tests call it without the thread)."""

    def __init__(self, read: Callable[[], pd.DataFrame], every: float, name: str = "") -> None:
        if not every > 0:
            raise KernelscopeError(f"watch(every={every}): give a positive interval in seconds")
        self._read = read
        self.every = float(every)
        self.name = name
        self.samples: list[tuple[pd.Timestamp, pd.DataFrame]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def sample(self) -> None:
        frame = self._read()
        with self._lock:
            self.samples.append((pd.Timestamp.now(), frame))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as e:  # the map went away (probe closed): keep what was seen
                self.error = e
                return
            self._stop.wait(self.every)

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"kernelscope-watch-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()
        self._thread = None

    def history(self) -> pd.DataFrame:
        with self._lock:
            samples = list(self.samples)
        if not samples:
            return pd.DataFrame({"time": pd.Series([], dtype="datetime64[ns]")})
        parts = [f.assign(time=t)[["time", *f.columns]] for t, f in samples]
        return pd.concat(parts, ignore_index=True)
