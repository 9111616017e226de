"""The drain loop's pieces: what is kept per output map, how full a reader is, the thread.

`Probe.poll_once()` is the loop's body; `_drain_thread` runs it holding only a weak
reference to the probe, so a forgotten probe is still collected and closed.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .backends.rewrite import OutputMap
from .errors import ClosedError
from .order import OrderTracker, Reorderer
from .schema import Schema
from .store import FrameStore

if TYPE_CHECKING:
    from .probe import Probe


@dataclass
class MapState:
    """Everything kept per output map: its reader, rows and counters."""

    om: OutputMap
    schema: Schema
    store: FrameStore
    reader: Any = None
    order: OrderTracker | None = None
    reorder: Reorderer | None = None
    lost_records: int = 0
    lost_by_cpu: dict[int, int] = field(default_factory=dict)
    discarded_seen: int = 0
    batches: int = 0
    pages: int = 0
    history: deque[dict[str, float]] = field(default_factory=lambda: deque(maxlen=100_000))
    carried: dict[str, int] = field(default_factory=dict)  # counters of programs replaced by reconfigure()
    marks: list[dict[str, Any]] = field(default_factory=list)  # {"t", "what"}: settings changes, for plots



def fill_bytes(reader: Any) -> int:
    """Bytes waiting in a reader's buffer(s): perf readers report a {cpu: bytes} dict."""
    if reader is None or reader.closed:
        return 0
    fill = reader.fill_bytes()
    return sum(fill.values()) if isinstance(fill, dict) else int(fill)



def _drain_thread(ref: weakref.ReferenceType[Probe], stop: threading.Event) -> None:
    while not stop.is_set():
        probe = ref()
        if probe is None:
            return
        try:
            probe.poll_once(probe.poll_interval)
        except ClosedError:
            return
        except Exception as e:  # keep the error for the user, stop draining
            probe.error = e
            return
        finally:
            del probe
