"""The live panel of a fleet probe: per-host lines and the per-host table, then its final state.

    fp.panel()      # display it (last line of a cell); `%%bpf NAME --fleet CLIENT` shows it

While the fleet probe runs, a daemon thread redraws every `interval` seconds (no faster than the
probe pulls) from what the pulls kept (`FleetProbe.history()`, `table()`): each host's received
rate, its received and dropped counts so far, and the table with the "all (N)" row; a host in
error is marked so, with its error. On `stop()` or `close()` of the probe the panel replaces the
live view, in the same output, by a final static rendering (the table and the plots as a PNG or
plotly HTML, no widget in the bundle), as the single-probe panel (kernelscope.jupyter.widgets)
does, so a saved notebook shows the final state; every output showing the panel (up to
MAX_OUTPUTS, the newest) gets it. A kernel shutdown leaves the table alone there.
"""

from __future__ import annotations

import contextlib
import contextvars
import html
import threading
import weakref
from typing import TYPE_CHECKING, Any

import ipywidgets as w
from plotly.graph_objects import Figure, FigureWidget

from ..jupyter import plots as single
from ..jupyter.widgets import LIVE_POINTS, MAX_OUTPUTS, REFRESH_INTERVAL, STATIC_MODES
from . import plots

if TYPE_CHECKING:
    from .fleet import FleetProbe

_PANELS: weakref.WeakValueDictionary[int, FleetPanel] = weakref.WeakValueDictionary()


def panel(fp: FleetProbe, *, interval: float | None = None, static: str = "auto") -> FleetPanel:
    """The live panel of `fp` (the same one when asked again with the same settings).

    `interval`: seconds between redraws (default: REFRESH_INTERVAL, or the probe's pull
    interval when longer). `static`: the final rendering's plots, "png" (kaleido), "html"
    (plotly.js inlined, ~4.5 MB), "auto" (PNG when kaleido works, else HTML) or "none".
    """
    known = _PANELS.get(id(fp))
    if known is not None and known.fp is fp and not known.closed_widget and (
            interval is None or known.interval == interval) and known.static == static:
        return known
    made = FleetPanel(fp, interval=interval, static=static)
    _PANELS[id(fp)] = made
    return made


class FleetPanel(w.VBox):
    """Header, per-host table and per-host plots of one fleet probe; `refresh()` redraws."""

    def __init__(self, fp: FleetProbe, *, interval: float | None = None, static: str = "auto") -> None:
        if static not in STATIC_MODES:
            raise ValueError(f"static must be one of {', '.join(STATIC_MODES)}, not {static!r}")
        if interval is not None and interval <= 0:
            raise ValueError("interval must be positive (seconds between redraws)")
        self.fp = fp
        self.interval = interval if interval is not None else max(REFRESH_INTERVAL, fp.interval)
        self.static = static
        self.updates = 0  # redraws done
        self.error: BaseException | None = None  # what stopped the redraws, if anything did
        self.shown: str | None = None  # what the displayed output holds: "live" or "final"
        self.closed_widget = False
        self._note = ""  # why the final rendering was made early ("kernel shut down")
        self._handles: list[Any] = []  # display handles of the outputs showing the panel, oldest first
        self._shell: Any = None
        self._lock = threading.RLock()  # one redraw at a time
        self._static_lock = threading.RLock()
        self._static_html: str | None = None
        self._static_for: tuple[Any, ...] | None = None
        self._sent_final: tuple[Any, ...] | None = None  # what the output's final rendering shows
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.header = w.HTML(layout=w.Layout(width="100%"))
        self.header.add_class("ks-header")
        self.table = w.HTML(layout=w.Layout(width="100%"))
        self.table.add_class("ks-stats")
        data, layout = plots.spec(fp, max_points=LIVE_POINTS, width=None)
        self.figure = FigureWidget(data=data, layout=layout)
        self.figure.add_class("ks-plots")
        super().__init__([self.header, self.table, self.figure], layout=w.Layout(width="100%"))
        self.add_class("kernelscope-panel")
        self._refresh_text()
        fp.views.append(weakref.WeakMethod(self._probe_stopped))

    # --- redraws -------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Redraw the lines and the table from what the fleet probe's pulls kept."""
        with self._lock:
            data = plots.traces(self.fp, max_points=LIVE_POINTS)
            fig = self.figure
            if [t.meta for t in fig.data] != [d["meta"] for d in data]:  # a host's first stats
                with fig.batch_update():
                    fig.data = ()
                    fig.add_traces(data)
            else:
                with fig.batch_update():
                    for t, d in zip(fig.data, data, strict=True):
                        t.x, t.y = d["x"], d["y"]
            self._refresh_text()
            self.updates += 1

    def state(self) -> str:
        fp = self.fp
        return "closed" if fp.closed else "running" if fp.running else "stopped"

    def _header_html(self) -> str:
        fp = self.fp
        name = html.escape(str(fp.probe_args.get("name") or fp.key))
        failed = f", {len(fp.errors)} in error" if fp.errors else ""
        note = f" <span class='ks-note'>({html.escape(self._note)})</span>" if self._note else ""
        return (f"<b>kernelscope fleet</b> {name}: <span class='ks-state'>{self.state()}</span> on "
                f"{len(fp.workers)} hosts{failed}{note}")

    def _refresh_text(self) -> None:
        self.header.value = self._header_html()
        self.table.value = self.fp.table_html()

    def tick(self) -> bool:
        """One step of the updater: redraw while the probe runs (pulling the counts first when
        it is not live). False: nothing left to follow. The final rendering is made by the
        probe's stop() (its last pulls come after it stops running), or here once every host
        is in error (no stop() is coming)."""
        fp = self.fp
        if fp.running:
            if not fp.live:
                fp.poll_once(limit=0)  # the counts only: rows stay on the hosts until asked for
            self.refresh()
            return True
        if not fp.hosts:
            self._probe_stopped()
        return False

    def start(self) -> FleetPanel:
        """Redraw every `interval` s while the probe runs (daemon thread). Idempotent."""
        if (self._thread is not None and self._thread.is_alive()) or not self.fp.running:
            return self
        self._stop.clear()
        ctx = contextvars.copy_context()  # ipykernel keeps the cell's parent message in a contextvar
        self._thread = threading.Thread(target=ctx.run, args=(_updater, weakref.ref(self), self._stop),
                                        name=f"kernelscope-fleet-panel-{self.fp.key}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop redrawing (joins the updater thread)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        self._thread = None

    @property
    def updating(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _probe_stopped(self) -> None:
        """The fleet probe stopped or closed (its stop() calls this): last redraw, final rendering."""
        if self.closed_widget:
            return
        try:
            self._stop.set()
            self.refresh()
            self.finish()
        except Exception as e:  # the probe's stop() must not fail for its view
            self.error = e

    def close(self) -> None:
        self.closed_widget = True
        self._unhook()
        self.stop()
        self.figure.close()
        super().close()

    # --- the output: live widget, then the final static rendering ---------------------------------

    def static_figure(self) -> Figure:
        """The per-host lines as a plain plotly Figure (what `FleetProbe.figure()` gives)."""
        return Figure(*plots.spec(self.fp))

    def static_snapshot(self, png: bool = True) -> str:
        """The table and the plots as HTML needing no widget front end (a PNG, or plotly HTML in
        "html" mode); `png=False` leaves the plots out (no time to draw them: kernel shutdown)."""
        table = self.fp.table_html()
        if self.static == "none" or not png:
            return table
        fig = self.static_figure()
        if self.static in ("auto", "png"):
            image: bytes | None = None
            with contextlib.suppress(Exception):  # no kaleido, or no usable browser for it
                image = fig.to_image(format="png")
            if image is not None:
                return table + single.png_html(image, alt="kernelscope fleet plots")
            if self.static == "png":
                return f"{table}<p>(no PNG: kaleido or a Chromium for it is missing)</p>"
        return table + fig.to_html(full_html=False, include_plotlyjs=True, config={"displaylogo": False})

    def _key(self, png: bool) -> tuple[Any, ...]:
        """What the final rendering's body shows: a new one is drawn when this changes (not when
        the probe only goes from stopped to closed: that is the header's)."""
        fp = self.fp
        return (png, tuple(sorted(fp.errors.items())),
                tuple((n, a["received"], a["dropped"]) for n, a in sorted(fp.total.items())))

    def finish(self, png: bool = True) -> None:
        """Replace the displayed output by the final static rendering, once per new state."""
        with self._static_lock:
            key = self._key(png)
            if self._static_for != key:
                self._static_html = self.static_snapshot(png=png)
                self._static_for = key
            sent = (key, self._header_html())
            if self.shown == "final" and self._sent_final == sent:
                return
            if self._send_all(self.final_bundle()):
                self.shown = "final"
                self._sent_final = sent

    def _send_all(self, bundle: dict[str, Any]) -> bool:
        """Put `bundle` into every output showing the panel; True if any took it."""
        sent = False
        for handle in list(self._handles):
            try:
                handle.update(bundle, raw=True)
            except Exception:  # the front end may be gone; the others still count
                continue
            sent = True
        return sent

    def live_bundle(self) -> dict[str, Any]:
        """The widget, with an HTML fallback of the table now (for a front end without widgets)."""
        data: dict[str, Any] = dict(super()._repr_mimebundle_() or {})
        note = ("<p><i>kernelscope fleet panel: live plots need a Jupyter widget front end; the final "
                "state replaces this once the fleet probe stops.</i></p>")
        data["text/html"] = (f"<div class='kernelscope-static'>{self._header_html()}"
                             f"{self.fp.table_html()}{note}</div>")
        data["text/plain"] = repr(self)
        return data

    def moved_bundle(self) -> dict[str, Any]:
        """What an output that no longer follows the panel keeps (shown in MAX_OUTPUTS later
        outputs since): the table at this moment, and no widget."""
        note = (f"<p><i>kernelscope fleet panel: shown again in {MAX_OUTPUTS} later outputs; this one keeps "
                "the counts of that moment.</i></p>")
        return {"text/html": (f"<div class='kernelscope-static kernelscope-moved'>{self._header_html()}"
                              f"{self.fp.table_html()}{note}</div>"), "text/plain": repr(self)}

    def final_bundle(self) -> dict[str, Any]:
        """The final static rendering: HTML and text only, no widget model to look for."""
        body = self._static_html if self._static_html is not None else self.static_snapshot()
        return {"text/html": (f"<div class='kernelscope-static kernelscope-final'>"
                              f"<div class='ks-header'>{self._header_html()}</div>{body}</div>"),
                "text/plain": f"{self!r}\n{self.fp.table().to_string(index=False)}"}

    def __repr__(self) -> str:
        fp = self.fp
        got = "; ".join(f"{n}: {a['received']:,} received, {a['dropped']:,} dropped"
                        for n, a in sorted(fp.total.items()))
        return f"<kernelscope fleet panel: {len(fp.workers)} hosts {self.state()}; {got}>"

    def _ipython_display_(self) -> None:
        """Display as a widget, replaced in the same output by the final rendering on stop."""
        from IPython import get_ipython
        from IPython.display import display

        if not self.fp.running:  # stopped already: the final state straight away, in this output only
            self.refresh()
            self.finish()
            display(self.final_bundle(), raw=True)
            return
        handle = display(self.live_bundle(), raw=True, display_id=True)
        if handle is not None:
            self._handles.append(handle)
        # every output showing the panel gets the final rendering; beyond MAX_OUTPUTS the oldest is
        # made static now (a saved notebook must find no widget in it)
        while len(self._handles) > MAX_OUTPUTS:
            with contextlib.suppress(Exception):
                self._handles.pop(0).update(self.moved_bundle(), raw=True)
        self.shown = "live"
        shell = get_ipython()
        if shell is not None and self._shell is None:
            shell.observe(self._on_exit, names="exit_now")
            self._shell = shell
        self.start()

    def _on_exit(self, change: dict[str, Any]) -> None:
        """Kernel shutdown or restart: leave the table as it stands in the output (the hosts'
        probes are freed by the fleet probe's finalizer; there is no time to stop them here)."""
        if not change.get("new") or self.shown == "final":
            return
        try:
            self._stop.set()
            self._note = "kernel shut down"
            self.finish(png=False)
        except Exception as e:  # the kernel is going away: never in its way
            self.error = e

    def _unhook(self) -> None:
        if self._shell is not None:
            with contextlib.suppress(ValueError):
                self._shell.unobserve(self._on_exit, names="exit_now")
            self._shell = None


def _updater(ref: weakref.ReferenceType[FleetPanel], stop: threading.Event) -> None:
    """Call `panel.tick()` every interval until it says there is nothing left to follow."""
    while True:
        view = ref()
        if view is None:
            return
        interval = view.interval
        try:
            if not view.tick():
                return
        except Exception as e:  # keep the kernel's output clean; show it in the panel
            view.error = e
            with contextlib.suppress(Exception):
                view.header.value = (view._header_html() + " <span style='color:#b91c1c'>redraw failed: "
                                     f"{html.escape(f'{type(e).__name__}: {e}')}</span>")
            return
        finally:
            del view
        if stop.wait(interval):
            return
