"""`Results`: what a probe or a replayed capture shows: frames, stats, history, its HTML table."""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from . import printk
from . import stacks as stacks_
from .captures.capture import Capture
from .drain import MapState
from .maps.globals import Globals
from .maps.table import Maps


class Results:
    """Reading what arrived: shared by live probes and replayed captures.

    The attributes below are everything the Jupyter face (widgets, plots, status lines, the
    HTML table) reads; a subclass sets them, the defaults say what a replay lacks.
    """

    live: ClassVar[bool] = False
    """A live probe, whose settings can change (True on Probe); False for a replayed capture."""
    outputs: dict[str, MapState]
    """Output map name -> its drain state (reader, store, counters, history)."""
    _maps: Maps
    """Every map of the program (kernelscope.maps): live, or the snapshots a capture holds."""
    name: str | None = None
    """The label it shows (the %%bpf variable name), or None."""
    closed: bool = False
    """True once close() ran: the kernel side is gone, the rows stay readable."""
    error: BaseException | None = None
    """What stopped the drain thread, if anything."""
    warnings: list[str]
    """Messages shown above its table (e.g. headers that may not match the kernel)."""
    backend: str = "bcc"
    """Which backend compiled the program: "bcc" or "libbpf"."""
    started_at: float | None = None
    """Monotonic seconds of the first start(), None before."""
    capture: Capture | None = None
    """The recorded capture it replays; None on a live probe."""
    poll_interval: float = 0.05
    """Seconds the drain loop waits for data at most (live probes)."""
    wakeup: str = "adaptive"
    """Ring buffer wake-up policy (live probes)."""
    wakeup_events: int | None = None
    """Perf buffers: wake the reader after this many events; None with no watermark either:
    a watermark at a quarter of the buffer plus a read every poll_interval (live probes)."""
    watermark_bytes: int | None = None
    """Perf buffers: wake the reader at this many bytes waiting, or None (live probes)."""
    reorder_ns: int | None = None
    """Hold events this long to release them in timestamp order, or None (live probes)."""
    user_rings: Mapping[str, Any] = MappingProxyType({})
    """User ring buffers (user space -> program) by name; each has a `sent` count."""

    @property
    def maps(self) -> Maps:
        """Every map of the program by name, each readable as a frame (`maps["counts"].frame()`);
        after stop() and in a replay, as they were at stop()."""
        return self._maps

    @property
    def globals(self) -> Globals:
        """The program's global variables by name (CO-RE): read, and written (`.bss`/`.data`)."""
        return Globals(self._maps, self.backend)

    @property
    def printk(self) -> pd.DataFrame:
        """What the programs printed with bpf_printk/bpf_trace_printk (kernelscope.printk); a
        replay: the lines its capture kept."""
        return printk.frame_of(self)

    def stacks(self, counts: str = "counts", stacks: str = "stacks", value: Any = None) -> pd.DataFrame:
        """Stack traces with symbols, one row per key of counting map `counts` (kernelscope.stacks)."""
        return stacks_.stack_frame(self, counts, stacks, value)

    def flamegraph(self, counts: str = "counts", stacks: str = "stacks", value: str | None = None,
                   **kw: Any) -> Any:
        """An interactive flame graph of those stacks, weighted by `value` (kernelscope.flame)."""
        return stacks_.flamegraph(self, counts, stacks, value, **kw)

    def _map(self, name: str | None) -> MapState:
        if name is None:
            if len(self.outputs) != 1:
                raise KeyError(
                    f"this probe has {len(self.outputs)} output maps ({', '.join(self.outputs) or 'none'}): "
                    "name one, e.g. probe.frame('events')"
                )
            return next(iter(self.outputs.values()))
        try:
            return self.outputs[name]
        except KeyError:
            raise KeyError(
                f"no output map {name!r}; this probe has {', '.join(self.outputs) or 'none'}"
            ) from None

    def frame(self, name: str | None = None) -> pd.DataFrame:
        """Everything received so far from output map `name` (cached until new rows arrive)."""
        return self._map(name).store.frame()

    @property
    def df(self) -> pd.DataFrame:
        return self.frame()

    def records(self, name: str | None = None) -> np.ndarray:
        return self._map(name).store.records()

    def history(self, name: str | None = None) -> pd.DataFrame:
        """Counters sampled about every 0.1 s while draining: for rate and fill plots."""
        return pd.DataFrame(list(self._map(name).history))

    def state(self) -> str:
        """A word for its lifecycle ("running", "closed", "replayed", ...)."""
        return "results"

    @property
    def running(self) -> bool:
        """True while rows are being delivered (a drain or replay thread runs)."""
        return False

    @property
    def loaded(self) -> bool:
        """True once the program is in the kernel (a replay: always)."""
        return False

    @property
    def send_stats(self) -> dict[str, dict[str, Any]]:
        """Per user ring buffer: sent, drained, pending, full, fill and capacity bytes."""
        return {}

    def start(self) -> Results:
        raise NotImplementedError

    def stop(self) -> Results:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def pause(self) -> Results:
        """Stop delivering and draining (counts stay exact); resume() goes on."""
        return self.stop()

    def resume(self) -> Results:
        return self.start()

    def clear(self, name: str | None = None) -> None:
        """Forget stored rows (all maps, or one); counted in `evicted`, accounting unchanged."""
        for ms in [self._map(name)] if name else list(self.outputs.values()):
            ms.store.clear()

    def wait(
        self,
        duration: float | None = None,
        limit: int | None = None,
        progress: Callable[[int, float], None] | None = None,
    ) -> Results:
        raise NotImplementedError

    def attach_points(self) -> list[str]:
        return []

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        parts = [f"{n}: {s['received']} received, {s['dropped']} dropped" for n, s in self.stats.items()]
        return (
            f"<{type(self).__name__} {self.name or ''} {self.state()}; "
            + "; ".join(parts)
            + ">"
        )

    def _repr_html_(self) -> str:
        rows = []
        stats = self.stats
        for name, ms in self.outputs.items():
            st = stats.get(name, {})
            rows.append(
                "<tr>"
                + "".join(
                    f"<td>{html.escape(str(v))}</td>"
                    for v in (
                        name,
                        ms.om.kind,
                        ms.pages,
                        st.get("attempted", ""),
                        st.get("received", ""),
                        st.get("dropped", ""),
                        st.get("lost_records", ""),
                        st.get("inversions", ""),
                        ", ".join(ms.schema.columns),
                    )
                )
                + "</tr>"
            )
        attach = ", ".join(self.attach_points()) or "none"
        head = "".join(
            f"<th>{h}</th>"
            for h in (
                "map",
                "kind",
                "pages",
                "attempted",
                "received",
                "dropped",
                "lost records",
                "inversions",
                "columns",
            )
        )
        error = self.error
        warn = "".join(f"<p style='color:#b45309'>&#9888; {html.escape(w)}</p>" for w in self.warnings)
        err = f"<p style='color:#b91c1c'>error: {html.escape(str(error))}</p>" if error else ""
        label = html.escape(self.name or "")
        backend = html.escape(str(self.backend))
        sends = ""
        send_stats = self.send_stats
        if send_stats:
            keys = ("sent", "drained", "pending", "full", "fill_bytes", "capacity_bytes")
            srows = "".join(
                f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{st.get(k, '')}</td>" for k in keys)
                + "</tr>" for n, st in send_stats.items())
            sends = ("<table><thead><tr><th>user ring</th>" + "".join(f"<th>{k}</th>" for k in keys)
                     + f"</tr></thead><tbody>{srows}</tbody></table>")
        tables = ""
        if not self.outputs and self.loaded:  # a counting program: its maps are what it shows
            tables = self._maps._repr_html_()
        return (
            f"<div><b>{type(self).__name__} {label}</b> ({self.state()}, {backend} backend); attached to "
            f"{html.escape(attach)}{warn}{err}<table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{sends}{tables}</div>"
        )
