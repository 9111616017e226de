"""A map's snapshots over time: a daemon thread reads the map every `every` s; `history()` is
one tidy frame (a `snapshot_time` column, then the map frame's columns), so a rate per key is
a `groupby(key).diff()` away. The column is not `time`, which a map's value may have as a field
(`struct { u64 time; u64 n; }`). The last `max_samples` snapshots are kept (default 1000)."""

from __future__ import annotations

import threading
import warnings
from collections import deque
from collections.abc import Callable

import pandas as pd

from ..errors import KernelscopeError

TIME = "snapshot_time"
MAX_SAMPLES = 1000


class WatchError(RuntimeWarning):
    """A watch's read failed and its thread ended; history() keeps what was seen before."""


class Watch:
    """Snapshots of `read()`; `sample()` takes one (tests call it without the thread)."""

    def __init__(self, read: Callable[[], pd.DataFrame], every: float, name: str = "",
                 max_samples: int = MAX_SAMPLES) -> None:
        if not every > 0:
            raise KernelscopeError(f"watch(every={every}): give a positive interval in seconds")
        if not (isinstance(max_samples, int) and max_samples > 0):
            raise KernelscopeError(f"watch(max_samples={max_samples!r}): give a positive number of snapshots")
        self._read = read
        self.every = float(every)
        self.name = name
        self.samples: deque[tuple[pd.Timestamp, pd.DataFrame]] = deque(maxlen=max_samples)
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
            except Exception as e:  # keep what was seen; history() says why it ended
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
        """The snapshots as one frame; warns (WatchError) when a read ended the thread."""
        with self._lock:
            samples = list(self.samples)
        if self.error is not None:
            warnings.warn(f"watch of {self.name} stopped: reading the map failed "
                          f"({type(self.error).__name__}: {self.error})", WatchError, stacklevel=3)
        if not samples:
            return pd.DataFrame({TIME: pd.Series([], dtype="datetime64[ns]")})
        parts = [pd.concat([pd.DataFrame({TIME: [t] * len(f)}, index=f.index), f], axis=1)
                 for t, f in samples]
        return pd.concat(parts, ignore_index=True)
