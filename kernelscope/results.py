"""`Results`: what a probe or a replayed capture shows: frames, stats, history, its HTML table."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from .drain import MapState


class Results:
    """Reading what arrived: shared by live probes and replayed captures."""

    maps: dict[str, MapState]

    def _map(self, name: str | None) -> MapState:
        if name is None:
            if len(self.maps) != 1:
                raise KeyError(
                    f"this probe has {len(self.maps)} output maps ({', '.join(self.maps) or 'none'}): "
                    "name one, e.g. probe.frame('events')"
                )
            return next(iter(self.maps.values()))
        try:
            return self.maps[name]
        except KeyError:
            raise KeyError(
                f"no output map {name!r}; this probe has {', '.join(self.maps) or 'none'}"
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

    name: str | None
    closed: bool

    def state(self) -> str:
        return "results"

    def widget(self, **kwargs: Any) -> Any:
        """The live control and plot panel (kernelscope.jupyter.widgets.panel): buffer sizes, wake-ups,
        reorder window, pause/resume/stop/clear, rates, drops, fill, ordering and latency."""
        from .jupyter.widgets import panel

        return panel(self, **kwargs)

    @property
    def running(self) -> bool:
        return False

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
        for ms in [self._map(name)] if name else list(self.maps.values()):
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
            f"<{type(self).__name__} {getattr(self, 'name', None) or ''} {self.state()}; "
            + "; ".join(parts)
            + ">"
        )

    def _repr_html_(self) -> str:
        rows = []
        stats = self.stats
        for name, ms in self.maps.items():
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
        warnings: list[str] = getattr(self, "warnings", [])
        error = getattr(self, "error", None)
        warn = "".join(f"<p style='color:#b45309'>&#9888; {html.escape(w)}</p>" for w in warnings)
        err = f"<p style='color:#b91c1c'>error: {html.escape(str(error))}</p>" if error else ""
        label = html.escape(getattr(self, "name", None) or "")
        backend = html.escape(str(getattr(self, "backend", "bcc")))
        sends = ""
        send_stats: dict[str, dict[str, Any]] = getattr(self, "send_stats", {})
        if send_stats:
            keys = ("sent", "drained", "pending", "full", "fill_bytes", "capacity_bytes")
            srows = "".join(
                f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{st.get(k, '')}</td>" for k in keys)
                + "</tr>" for n, st in send_stats.items())
            sends = ("<table><thead><tr><th>user ring</th>" + "".join(f"<th>{k}</th>" for k in keys)
                     + f"</tr></thead><tbody>{srows}</tbody></table>")
        return (
            f"<div><b>{type(self).__name__} {label}</b> ({self.state()}, {backend} backend); attached to "
            f"{html.escape(attach)}{warn}{err}<table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{sends}</div>"
        )
