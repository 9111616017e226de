"""The live panel: buffer controls that reload the probe, and plots that follow it a few times a second.

    panel(probe)        # the panel of a probe or replay: display it (last line of a cell)

Controls: pages per output map (powers of two), poll interval, wake-up strategy (ring
buffer: kernel notification or timer; perf buffer: every N events or a watermark),
reorder window, and pause / resume / stop / clear. A change calls `probe.reconfigure()`,
which reloads the program keeping rows and exact counts and marks the change in the plots.
A program with aggregation maps also gets a maps area (`kernelscope.jupyter.mapview`): a
chosen map's top-N keys and its histogram, read at each refresh; one with output maps an events
area (`kernelscope.jupyter.eventview`): the latest rows and the top-N values of a chosen column,
read from the store's newest chunks only. "save capture" writes NAME-YYYYmmdd-HHMMSS.capture.parquet
(a capture that replays), "export Parquet" / "export CSV" each output map's frame, in the
working folder (the notebook's); the message line says where, or why not.

The plots are one plotly FigureWidget (a grid of subplots) fed by `Panel.refresh()`, which
a daemon thread calls every `interval` seconds while the probe runs, and once more after it
stops. A refresh reads only the drain loop's bookkeeping (`kernelscope.jupyter.plots`: history
samples and the latest thousand rows), so it costs the same after a billion events as after
ten; and it waits for the page to have drawn the previous one (`Echo`), so a slow browser
never falls behind.

The panel's output persists. While the probe runs (or is paused from the panel) the output
holds the widget plus an HTML fallback; once the probe stops (or closes, or the kernel shuts
down) the panel replaces it, in the same output, by a final static rendering: the header, the
stats table (attempted / received / dropped ...) and the plots as a PNG (kaleido) or plotly
HTML, with no widget in the bundle. So a saved notebook, nbconvert and GitHub show the final
state, not "Error displaying widget: model not found". A probe started again brings the live
panel back into the same output. The final rendering ends with the call that shows the panel
again (`panel(NAME)`, NAME as the user's namespace knows the probe): `panel()` gives the same
Panel for the same probe, and displayed again it follows the probe in the new output, which is
how a notebook reopened while its kernel still holds the probe gets the panel back. Every output
showing the panel (up to MAX_OUTPUTS, the newest) gets each live and final rendering, so none
is left holding the widget once the probe stops.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import html
import os
import re
import shutil
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anywidget
import ipywidgets as w
import traitlets

# FigureWidget's first import takes seconds (plotly.io pulls nbformat and jsonschema): paid at
# import time, before a probe is started, rather than while one drains
from plotly.graph_objects import FigureWidget

from ..captures import capture as capture_file
from ..captures.atomic import atomic_path, check_destination
from ..captures.replay import Replay
from ..probe import Probe
from ..readers.perf import DEFAULT_WATERMARK_SHARE
from ..results import Results
from . import eventview, mapview, plots

REFRESH_INTERVAL = 0.4  # seconds between plot refreshes while the probe runs
STOP_SETTLE = 1.0  # seconds a probe must stay stopped before the panel's final refresh
LIVE_SAMPLE = 1_000  # latest rows per map in the live ordering and latency plots (SVG points)
LIVE_POINTS = 400  # history samples per live time series (longer runs are strided)
# A browser redraws the plots in 0.05-0.5 s (software rendering on a busy machine: the upper
# end). The updater sends no new plot data until the page has echoed a mark sent after the
# last (`Echo`), so a slow page never builds a backlog; it waits at most ACK_WAIT.
ACK_WAIT = 3.0
_ECHO_ESM = """
export default {
  render({ model }) {
    // after the next frame: every message sent before `seq` has been applied and drawn
    const echo = () => requestAnimationFrame(() => setTimeout(() => {
      model.set("ack", model.get("seq"));
      model.save_changes();
    }, 0));
    model.on("change:seq", echo);
    echo();
  },
};
"""
POLL_CHOICES = (("5 ms", 0.005), ("20 ms", 0.02), ("50 ms", 0.05), ("100 ms", 0.1), ("250 ms", 0.25),
                ("1 s", 1.0))
REORDER_OFF = -1  # Dropdown values cannot be None (None means "nothing selected")
REORDER_CHOICES = (("off", REORDER_OFF), ("1 ms", 1_000_000), ("10 ms", 10_000_000),
                   ("100 ms", 100_000_000), ("1 s", 1_000_000_000))
# perf buffer wake-ups: ("events", n) = wakeup_events n; ("fraction", d) = watermark at size/d
PERF_WAKEUP_CHOICES = (("every event", ("events", 1)), ("every 16 events", ("events", 16)),
                       ("every 256 events", ("events", 256)), ("buffer 1/4 full", ("fraction", 4)),
                       ("buffer 1/2 full", ("fraction", 2)))
RING_WAKEUP_CHOICES = (("adaptive: paced reads (default)", "adaptive"), ("kernel notifies (epoll)", "epoll"),
                       ("timer: every poll interval", "timer"))
MAX_PAGES = 4096  # 16 MiB ring, or 16 MiB per CPU for a perf buffer
STATIC_MODES = ("auto", "png", "html", "none")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# At a kernel shutdown jupyter_client sends SIGTERM 2.5 s after its request (half of
# shutdown_wait_time); a kaleido PNG takes 5-7 s here, so the final rendering sent then has the
# table only, and the panel waits at most this long for a rendering under way to end
SHUTDOWN_LOCK_WAIT = 0.5
# what the export buttons write, in the kernel's working folder (the notebook's, in Jupyter):
# NAME-YYYYmmdd-HHMMSS.capture.parquet (a capture: replays), NAME-...-MAP.parquet / .csv (frames)
EXPORTS = {"capture": "save capture", "parquet": "export Parquet", "csv": "export CSV"}
MAX_SAME_NAME = 1_000  # NAME-...-2 up to -1000 in one second, then an error
MAX_OUTPUTS = 16  # outputs a panel shown again and again keeps following (each gets the final rendering)
_PANELS: weakref.WeakValueDictionary[int, Panel] = weakref.WeakValueDictionary()


def panel(results: Results, *, interval: float = REFRESH_INTERVAL, sample: int = LIVE_SAMPLE,
          static: str = "auto", folder: str | Path | None = None) -> Panel:
    """The control and plot panel of a live Probe (or, read-only, of a Replay).

    `interval`: seconds between plot refreshes while events flow; `sample`: latest rows per
    map drawn in the ordering and latency plots. `static`: what the output
    shows without a widget front end once the probe has stopped: "png" (kaleido), "html"
    (plotly.js inlined, ~4.5 MB), "auto" (PNG when kaleido works, else HTML) or "none".
    `folder`: where the save and export buttons write (default: the working folder, which in
    Jupyter is the notebook's).

    Asked again for the same probe (and settings), it gives the same panel: displayed again,
    it follows the probe in the new output (how a reopened notebook gets its live panel back).
    """
    known = _PANELS.get(id(results))
    if (known is not None and known.results is results and not known.closed_widget
            and (known.interval, known.sample, known.static, known.folder)
            == (interval, sample, static, Path(folder) if folder is not None else None)):
        return known
    made = Panel(results, interval=interval, sample=sample, static=static, folder=folder)
    _PANELS[id(results)] = made
    return made


def export_stem(results: Results, folder: Path, when: float | None = None) -> Path:
    """`folder`/NAME-YYYYmmdd-HHMMSS: where an export made now goes (NAME: the probe's name)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", results.name or "") or "kernelscope"
    return folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}"


class ExportError(RuntimeError):
    """An export failed at map `name`'s file `path`; the files in `written` (earlier maps') are
    whole and kept."""

    def __init__(self, name: str, path: Path, cause: BaseException, written: list[Path]) -> None:
        self.name, self.path, self.cause, self.written = name, path, cause, list(written)
        done = ("; wrote (whole, kept) " + ", ".join(str(p) for p in written) if written
                else "; nothing written")
        super().__init__(f"map {name!r}: {path} not written: {type(cause).__name__}: {cause}{done}")


def _names(path: Path) -> Iterator[Path]:
    """`path`, then with -2, -3 ... before its suffixes (two exports in one second)."""
    stem, suffix = path.name.split(".", 1)[0], "".join("." + s for s in path.name.split(".")[1:])
    yield path
    for n in range(2, MAX_SAME_NAME + 1):
        yield path.with_name(f"{stem}-{n}{suffix}")
    raise FileExistsError(f"{path}: {MAX_SAME_NAME} files of that name and its -N variants exist already")


def _publish(path: Path, write: Callable[[Path], object]) -> Path:
    """Write a file with `write(tmp)` and give it `path`, or the first free of path-2, -3 ...;
    returns the name it got. A file that has the name is never replaced, not even one another
    kernel gave it a moment ago (two kernels exporting the same name in the same second).

    The file is written whole beside the name first (atomic_path), then hard-linked to the
    name: link() fails when the name exists, so taking a name is atomic. On a file system
    without hard links the name is reserved by an exclusive create (O_EXCL), then replaced.
    """
    stage = path.with_name(f".{path.name}.{uuid.uuid4().hex}.stage")
    with atomic_path(stage) as tmp:
        write(tmp)
    try:
        for name in _names(path):
            try:
                os.link(stage, name)
            except FileExistsError:
                continue
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                try:
                    os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                except FileExistsError:
                    continue
                os.replace(stage, name)
            return name
    finally:
        stage.unlink(missing_ok=True)
    raise AssertionError("unreachable: _names ends by raising")  # pragma: no cover


def _write_frame(df: Any, kind: str, tmp: Path) -> None:
    if kind == "parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False)


def page_choices(current: int, kind: str) -> list[tuple[str, int]]:
    """Powers of two up to MAX_PAGES (plus the current size), labelled with their bytes."""
    sizes = sorted({1 << i for i in range(MAX_PAGES.bit_length())} | ({current} if current else set()))
    per = " per CPU" if kind == "perf" else ""
    return [(f"{p} ({plots._bytes(p * plots.PAGE)}{per})", p) for p in sizes]


def _with_current(choices: tuple[tuple[str, Any], ...], current: Any, label: str) -> list[tuple[str, Any]]:
    out = list(choices)
    if current not in [v for _, v in out]:
        out.append((label, current))
    return out


class Echo(anywidget.AnyWidget):
    """An invisible widget whose browser side echoes `seq` into `ack` once it has drawn a frame."""

    _esm = _ECHO_ESM
    seq = traitlets.Int(0).tag(sync=True)
    ack = traitlets.Int(-1).tag(sync=True)


class Panel(w.VBox):
    """Controls and live plots for one probe; `refresh()` redraws, `updates` counts redraws."""

    def __init__(self, results: Results, *, interval: float = REFRESH_INTERVAL, sample: int = LIVE_SAMPLE,
                 static: str = "auto", folder: str | Path | None = None) -> None:
        if static not in STATIC_MODES:
            raise ValueError(f"static must be one of {', '.join(STATIC_MODES)}, not {static!r}")
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.results = results
        self.interval = interval
        self.sample = sample
        self.static = static
        self.folder = Path(folder) if folder is not None else None  # exports: None = the working folder
        self.exported: list[Path] = []  # files the last export wrote
        self.clock: Callable[[], float] = time.time  # the time export names carry (tests fix it)
        self.closed_widget = False  # close() ran: the widget models are gone
        self.live = plots.is_live(results)
        self.updates = 0  # plot refreshes done (tests: it stops growing after stop())
        self.error: BaseException | None = None
        self._lock = threading.RLock()  # one refresh at a time (updater thread, button handlers)
        self._syncing = False  # set while controls are set from the probe: no reconfigure then
        self._final_done = False  # the refresh that follows a stop has been made
        self._stopped_since: float | None = None
        self._applying = False  # a reconfigure() from a control is under way
        self._handles: list[Any] = []  # display handles of the outputs showing the panel, oldest first
        self._static_html: str | None = None
        self._static_for: tuple[Any, ...] | None = None
        self._static_lock = threading.RLock()
        self._shell: Any = None  # the IPython shell whose post_execute runs _after_cell
        self.shown: str | None = None  # what the displayed output holds: "live" or "final"
        self.paused = False  # stopped by the panel's pause button: stays live, resumable
        self._shutdown_note = ""  # why the final rendering was made early ("kernel shut down")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sent_at: float | None = None  # when plot data last went to the front end
        self.skipped = 0  # refreshes skipped while the browser was still drawing the last one
        self.echo = Echo(layout=w.Layout(display="none"))

        self.header = w.HTML(layout=w.Layout(width="100%"))
        self.header.add_class("ks-header")
        self.stats = w.HTML(layout=w.Layout(width="100%"))
        self.stats.add_class("ks-stats")
        self.message = w.HTML()
        self.message.add_class("ks-message")
        # no fixed width: the widget sizes the plots to the panel (and follows window resizes),
        # so the plot toolbar at the top right stays inside it
        data, layout = plots.spec(results, sample=sample, max_points=LIVE_POINTS, width=None)
        # one FigureWidget for all plots: each one carries plotly.js (~5 MB) to the browser
        self.figure = FigureWidget(data=data, layout=layout)
        self.figure.add_class("ks-plots")
        self._sent = (layout["annotations"], layout["shapes"])
        controls = self._build_controls()
        # the events area (output maps' latest rows, top-N of a column) and the maps area
        # (programs with aggregation maps: counts, histograms)
        self.events = eventview.EventView(results) if results.outputs else None
        self.mapview = mapview.MapView(results) if mapview.names(results) else None
        areas = [a for a in (self.events, self.mapview) if a is not None]
        super().__init__([self.header, controls, self.message, self.stats, self.figure, *areas, self.echo],
                         layout=w.Layout(width="100%"))
        self.add_class("kernelscope-panel")
        self._sync_controls()
        self._refresh_text()
        if self.events is not None:
            self.events.refresh()
        if self.mapview is not None:
            self.mapview.refresh()
        self.start()

    # --- controls ------------------------------------------------------------------------------

    def _build_controls(self) -> w.Widget:
        r = self.results
        style = {"description_width": "initial"}
        self.pages: dict[str, w.Dropdown] = {}
        for name, ms in r.outputs.items():
            dd = w.Dropdown(options=page_choices(ms.pages, ms.om.kind), value=ms.pages or None,
                            description=f"{name} pages", style=style,
                            tooltip="buffer size; a change reloads the program (rows and counts carry on)",
                            layout=w.Layout(width="auto"))
            dd.add_class(f"ks-pages-{name}")
            dd.observe(self._on_pages, names="value")
            self.pages[name] = dd
        kinds = {ms.om.kind for ms in r.outputs.values()}
        poll = r.poll_interval
        self.poll = w.Dropdown(options=_with_current(POLL_CHOICES, poll, f"{poll * 1000:g} ms"), value=poll,
                               description="poll", style=style, layout=w.Layout(width="auto"),
                               tooltip="drain loop: longest wait for data, and the period of timer wake-ups")
        self.poll.add_class("ks-poll")
        self.poll.observe(self._on_poll, names="value")
        wakeup = r.wakeup
        self.ring_wakeup = w.Dropdown(options=_with_current(RING_WAKEUP_CHOICES, wakeup, wakeup),
                                      value=wakeup, description="ring wake-up", style=style,
                                      layout=w.Layout(width="auto"))
        self.ring_wakeup.add_class("ks-ring-wakeup")
        self.ring_wakeup.observe(self._on_ring_wakeup, names="value")
        self.perf_wakeup = w.Dropdown(options=list(PERF_WAKEUP_CHOICES), description="perf wake-up",
                                      style=style, layout=w.Layout(width="auto"))
        self.perf_wakeup.add_class("ks-perf-wakeup")
        self.perf_wakeup.observe(self._on_perf_wakeup, names="value")
        self.reorder = w.Dropdown(options=list(REORDER_CHOICES), description="reorder window", style=style,
                                  layout=w.Layout(width="auto"),
                                  tooltip="hold events this long and release them in timestamp order")
        self.reorder.add_class("ks-reorder")
        self.reorder.observe(self._on_reorder, names="value")
        self.buttons: dict[str, w.Button] = {}
        tips = {"pause": "stop delivering and draining; counts stay exact",
                "resume": "deliver and drain again",
                "stop": "stop, then detach the program and free its buffers (rows stay readable)",
                "clear": "forget stored rows (counted as evicted; the counts go on)"}
        for name, icon in (("pause", "pause"), ("resume", "play"), ("stop", "stop"), ("clear", "eraser")):
            b = w.Button(description=name, icon=icon, tooltip=tips[name], layout=w.Layout(width="auto"))
            b.add_class(f"ks-{name}")
            b.on_click(lambda _b, name=name: self._on_button(name))
            self.buttons[name] = b
        tips = {"capture": "write a capture (Parquet, replays without BPF) to the working folder",
                "parquet": "write each output map's frame to a Parquet file in the working folder",
                "csv": "write each output map's frame to a CSV file in the working folder"}
        for kind, label in EXPORTS.items():
            b = w.Button(description=label, icon="save" if kind == "capture" else "download",
                         tooltip=tips[kind], layout=w.Layout(width="auto"))
            b.add_class(f"ks-export-{kind}")
            b.on_click(lambda _b, kind=kind: self._on_export(kind))
            self.buttons[kind] = b
        rows: list[w.Widget] = [*self.pages.values(), self.poll]
        if "ringbuf" in kinds:
            rows.append(self.ring_wakeup)
        if "perf" in kinds:
            rows.append(self.perf_wakeup)
        if any(ms.schema.time_field for ms in r.outputs.values()):
            rows.append(self.reorder)
        box = w.VBox([w.HBox(rows, layout=w.Layout(flex_flow="row wrap")),
                      w.HBox(list(self.buttons.values()), layout=w.Layout(flex_flow="row wrap"))])
        box.add_class("ks-controls")
        return box

    def _sync_controls(self) -> None:
        """Set every control from the probe's settings, and enable what applies now."""
        r = self.results
        closed = r.closed
        self._syncing = True
        try:
            for name, dd in self.pages.items():
                ms = r.outputs[name]
                if ms.pages and ms.pages not in dd.options:
                    dd.options = page_choices(ms.pages, ms.om.kind)
                if ms.pages:
                    dd.value = ms.pages
            if self.live:
                if r.poll_interval not in [v for _, v in self.poll.options]:
                    self.poll.options = _with_current(POLL_CHOICES, r.poll_interval,
                                                      f"{r.poll_interval * 1000:g} ms")
                self.poll.value = r.poll_interval
                self.ring_wakeup.value = r.wakeup
                self.perf_wakeup.value = self._perf_mode()
                self.reorder.value = REORDER_OFF if r.reorder_ns is None else r.reorder_ns
        finally:
            self._syncing = False
        editable = self.live and not closed
        for c in (*self.pages.values(), self.poll, self.ring_wakeup, self.perf_wakeup, self.reorder):
            c.disabled = not editable
        running = r.running
        self.buttons["pause"].disabled = closed or not running
        self.buttons["resume"].disabled = closed or running
        self.buttons["stop"].disabled = closed
        self.buttons["clear"].disabled = False
        for kind in EXPORTS:
            self.buttons[kind].disabled = False  # a closed probe's rows stay readable

    def _perf_mode(self) -> tuple[str, int]:
        r = self.results
        if r.watermark_bytes:
            size = self._perf_buffer_bytes()
            d = max(1, round(size / r.watermark_bytes)) if size else 2
            mode = ("fraction", d)
        elif r.wakeup_events is None:  # the default: a watermark at a share of the buffer
            mode = ("fraction", round(1 / DEFAULT_WATERMARK_SHARE))
        else:
            mode = ("events", int(r.wakeup_events))
        if mode not in [v for _, v in self.perf_wakeup.options]:
            label = f"every {mode[1]} events" if mode[0] == "events" else f"buffer 1/{mode[1]} full"
            self.perf_wakeup.options = [*self.perf_wakeup.options, (label, mode)]
        return mode

    def _perf_buffer_bytes(self, pages: dict[str, int] | None = None) -> int:
        """Bytes of the smallest per-CPU perf buffer: a watermark must fit in every one."""
        sizes = [(pages or {}).get(n, ms.pages) * plots.PAGE
                 for n, ms in self.results.outputs.items() if ms.om.kind == "perf"]
        return min(sizes) if sizes else 0

    def _on_pages(self, change: dict[str, Any]) -> None:
        if self._syncing:
            return
        pages = {n: int(dd.value) for n, dd in self.pages.items()}
        kw: dict[str, Any] = {"pages": pages}
        mode = self.perf_wakeup.value
        # a watermark set by hand follows the buffer size (the default one does by itself)
        if mode and mode[0] == "fraction" and self.results.watermark_bytes:
            kw["watermark_bytes"] = max(1, self._perf_buffer_bytes(pages) // mode[1])
        self.apply(**kw)

    def _on_poll(self, change: dict[str, Any]) -> None:
        if not self._syncing:
            self.apply(poll_interval=float(change["new"]))

    def _on_ring_wakeup(self, change: dict[str, Any]) -> None:
        if not self._syncing:
            self.apply(wakeup=change["new"])

    def _on_perf_wakeup(self, change: dict[str, Any]) -> None:
        if self._syncing or not change["new"]:
            return
        how, n = change["new"]
        if how == "fraction":
            self.apply(watermark_bytes=max(1, self._perf_buffer_bytes() // n))
        else:
            self.apply(wakeup_events=int(n), watermark_bytes=0)

    def _on_reorder(self, change: dict[str, Any]) -> None:
        if not self._syncing:
            value = int(change["new"])
            self.apply(reorder_ns=None if value == REORDER_OFF else value)

    def apply(self, **settings: Any) -> None:
        """Reconfigure the probe with `settings` (as Probe.reconfigure), showing progress and errors.

        `watermark_bytes=0` turns a perf watermark off (wake up every `wakeup_events` instead).
        """
        r = self.results
        if not isinstance(r, Probe):  # a replay's settings are what was recorded
            return
        self._say("reloading the program with the new settings ...")
        t0 = time.monotonic()
        self._applying = True
        try:
            with self._lock:
                r.reconfigure(**settings)  # watermark_bytes=0 turns the watermark off
        except Exception as e:
            self.error = e
            self._say(f"could not apply {settings}: {type(e).__name__}: {e}", error=True)
        else:
            self.error = None
            self._say(f"reloaded in {time.monotonic() - t0:.1f} s" if r.loaded else "settings saved")
        finally:
            self._applying = False
        self._sync_controls()
        self.refresh()
        self.start()

    def _on_button(self, name: str) -> None:
        r = self.results
        try:
            if name == "pause":
                r.pause()
                self.paused = True  # after pause() returns: until then the updater sees it running
            elif name == "resume":
                self.paused = False
                r.resume()
                self.start()
            elif name == "stop":
                self.paused = False  # stopped for good: the final rendering follows
                r.stop()
                if hasattr(r, "close") and self.live:
                    r.close()
            elif name == "clear":
                if hasattr(r, "clear"):
                    r.clear()
                else:
                    for ms in r.outputs.values():
                        ms.store.clear()
            self._say(f"{name}: done")
        except Exception as e:
            self.error = e
            self._say(f"{name}: {type(e).__name__}: {e}", error=True)
        self._sync_controls()
        self.refresh()

    def _on_export(self, kind: str) -> None:
        """A save or export button: write the files, say where (or why not) in the message line."""
        what = {"capture": "a capture", "parquet": "Parquet", "csv": "CSV"}[kind]
        self._say(f"writing {what} ({self._rows_text()}) ...")  # seconds for a million rows: say so now
        t0 = time.monotonic()
        try:
            paths = self.export(kind)
        except Exception as e:
            self.error = e
            self._say(f"{EXPORTS[kind]}: {type(e).__name__}: {e}", error=True)
            return
        self.error = None
        took = f"in {time.monotonic() - t0:.1f} s"
        if kind == "capture":
            self._say(f"saved capture {paths[0]} ({self._rows_text()}) {took}; it replays without BPF: "
                      f"kernelscope.captures.replay.replay({paths[0].name!r})")
        else:
            self._say(f"{EXPORTS[kind]}: wrote " + ", ".join(str(p) for p in paths) + f" {took}")

    def _rows_text(self) -> str:
        rows = [f"{n}: {len(ms.store):,} rows" for n, ms in self.results.outputs.items()]
        return ", ".join(rows) or "maps only"

    def export(self, kind: str) -> list[Path]:
        """Write what the panel shows to the working folder (or `folder`); returns the files.

        "capture": NAME-YYYYmmdd-HHMMSS.capture.parquet, a capture that replays (a replay: a copy
        of the file it replays). "parquet" / "csv": one file per output map,
        NAME-YYYYmmdd-HHMMSS-MAP.parquet / .csv, its whole frame (a program with no output map:
        its aggregation maps' frames). Files appear whole or not at all, and never replace one:
        a name taken (an export in the same second, here or in another kernel) gets -2, -3 ...
        A map whose file fails raises ExportError naming it and the files written before it,
        which are kept (whole, and `exported` lists them).
        """
        if kind not in EXPORTS:
            raise ValueError(f"export kind must be one of {', '.join(EXPORTS)}, not {kind!r}")
        r = self.results
        stem = export_stem(r, (self.folder or Path.cwd()).resolve(), self.clock())
        if kind == "capture":
            path = check_destination(stem.with_name(stem.name + ".capture.parquet"))
            write: Callable[[Path], object]
            if isinstance(r, Probe):
                def write(tmp: Path) -> None:
                    with self._lock:  # not during a refresh's read of the same stores
                        r.save(tmp)
            elif isinstance(r, Replay) and r.path is not None and Path(r.path).is_file():
                source = r.path
                def write(tmp: Path) -> None:  # the file it replays, byte for byte (checksums too)
                    shutil.copyfile(source, tmp)
            elif r.capture is not None:
                cap = r.capture
                def write(tmp: Path) -> None:
                    capture_file.save(cap, tmp)
            else:
                raise TypeError(f"{type(r).__name__} has no capture to save")
            self.exported = [_publish(path, write)]
            return self.exported
        frames = ({n: r.frame(n) for n in r.outputs} if r.outputs
                  else {n: r.maps[n].frame() for n in mapview.names(r)})
        if not frames:
            raise ValueError("nothing to export: no output maps and no aggregation maps")
        out: list[Path] = []
        self.exported = out
        for name, df in frames.items():
            path = stem.with_name(f"{stem.name}-{name}.{kind}")
            try:
                check_destination(path, f".{kind}")
                out.append(_publish(path, functools.partial(_write_frame, df, kind)))
            except Exception as e:  # say which files were written, and which one was not
                raise ExportError(name, path, e, out) from e
        return out

    def _say(self, text: str, error: bool = False) -> None:
        colour = "#b91c1c" if error else "#374151"
        self.message.value = f"<span style='color:{colour};font-size:90%'>{html.escape(text)}</span>"

    # --- plots -----------------------------------------------------------------------------------

    def browser_busy(self) -> bool:
        """True while a page showing the panel has not drawn the last update yet (<= ACK_WAIT s).

        A page that never echoed (none is open, or no widget front end) is never waited for.
        """
        echo = self.echo
        if echo.ack < 0 or echo.ack >= echo.seq or self._sent_at is None:
            return False
        return time.monotonic() - self._sent_at < ACK_WAIT

    def refresh(self, wait_for_browser: bool = False) -> None:
        """Redraw the plots and the stats from what the probe has now.

        With `wait_for_browser` (the updater), the plots are left alone while the browser is
        still drawing the previous update; the stats table is refreshed either way.
        """
        with self._lock:
            if wait_for_browser and self.browser_busy():
                self.skipped += 1
                self._refresh_text()
                return
            data, layout = plots.spec(self.results, sample=self.sample, max_points=LIVE_POINTS, width=None)
            fig = self.figure
            same = len(data) == len(fig.data) and all(
                d["meta"] == t.meta for d, t in zip(data, fig.data, strict=True))
            if not same:  # maps, CPUs or marks changed the set of traces: send them anew
                fig.data = ()
                fig.add_traces(data)
            with fig.batch_update():
                if same:
                    for d, t in zip(data, fig.data, strict=True):
                        t.x, t.y = d["x"], d["y"]
                        if "customdata" in d:
                            t.customdata = d["customdata"]
                sent = (layout["annotations"], layout["shapes"])
                if sent != self._sent:  # titles carry counts; marks add lines
                    fig.layout.annotations, fig.layout.shapes = sent
                    self._sent = sent
            if self.events is not None:  # the newest chunks only
                self.events.refresh()
            if self.mapview is not None:  # one batch read of the chosen map
                self.mapview.refresh()
            self._sent_at = time.monotonic()
            self.echo.seq += 1  # sent after the plot data: echoed once the page has drawn it
            self._refresh_text()
            self.updates += 1

    def state(self) -> str:
        """The probe's state as the header says it: "paused" after the pause button, until it runs."""
        st = plots.state(self.results)
        return "paused" if self.paused and st == "stopped" else st

    def _header_html(self, note: str = "") -> str:
        r = self.results
        label = html.escape(r.name or type(r).__name__)
        err = r.error
        errtext = f" <span style='color:#b91c1c'>drain error: {html.escape(str(err))}</span>" if err else ""
        extra = f" <span class='ks-note'>({html.escape(note)})</span>" if note else ""
        return f"<b>kernelscope</b> {label}: <span class='ks-state'>{self.state()}</span>{extra}{errtext}"

    def _refresh_text(self) -> None:
        self.header.value = self._header_html()
        self.stats.value = plots.stats_table(self.results)

    # --- the updater thread --------------------------------------------------------------------

    def start(self) -> Panel:
        """Refresh the plots every `interval` s while the probe runs (daemon thread). Idempotent."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        # a copy of the cell's context: ipykernel keeps the parent message in a contextvar
        ctx = contextvars.copy_context()
        self._thread = threading.Thread(target=ctx.run, args=(_updater, weakref.ref(self), self._stop),
                                        name="kernelscope-panel", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop refreshing (joins the updater thread)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        self._thread = None

    @property
    def updating(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def tick(self) -> bool:
        """One step of the updater: refresh while the probe runs, once more after it stops.

        A stop counts once it has lasted STOP_SETTLE seconds and no reload is under way
        (reconfigure() stops and restarts the probe); then, unless it was the pause button,
        the output becomes the final rendering. While stopped nothing is redrawn; the thread
        keeps watching, so a start from code brings the live panel back, and it ends once the
        probe is closed. Returns False when there is nothing more to follow.
        """
        r = self.results
        now = time.monotonic()
        if r.running or self._applying:
            if r.running and not self._applying:
                self.paused = False  # started again, from the panel or from code
                if self.shown == "final":  # the live panel comes back into the same output
                    self._show_live()
            self.refresh(wait_for_browser=True)
            self._final_done = False
            self._stopped_since = None
            return True
        if self._stopped_since is None:
            self._stopped_since = now
        closed = r.closed
        if not closed and now - self._stopped_since < STOP_SETTLE:
            return True
        if not self._final_done:
            self.refresh()
            self._sync_controls()
            self._final_done = True
        # a page shows the panel (without one, _after_cell does this as the cell ends)
        if self.echo.ack >= 0 and not self.paused:
            self.finish()
        return not closed

    def close(self) -> None:
        self.closed_widget = True
        self._unhook()
        self.stop()
        self.figure.close()
        if self.events is not None:
            self.events.close()
        if self.mapview is not None:
            self.mapview.close()
        self.echo.close()
        super().close()

    # --- the output: live widget, then the final static rendering ---------------------------------

    def static_snapshot(self, png: bool = True) -> str:
        """The stats table and plots as HTML that needs no widget front end or script (PNG).

        "html" mode inlines plotly.js (~4.5 MB) instead; `png=False` leaves the plots out
        (when there is no time left to draw them: kernel shutdown).
        """
        r = self.results
        mode = self.static
        maps = self.mapview.static_html() if self.mapview is not None else ""
        if self.events is not None:
            maps = self.events.static_html() + maps
        table = plots.stats_table(r)
        if mode == "none" or not png:
            return table + maps
        if mode in ("auto", "png"):
            image = plots.static_png(r)
            if image is not None:
                return table + plots.png_html(image) + maps
            if mode == "png":
                return f"{table}<p>(no PNG: kaleido or a Chromium for it is missing)</p>{maps}"
        return plots.static_html(r) + maps

    def _key(self) -> tuple[Any, ...]:
        """What the final rendering shows: a new one is made when this changes."""
        key: tuple[Any, ...] = (self.state(), self._shutdown_note,
                                *((ms.store.received, len(ms.marks)) for ms in self.results.outputs.values()))
        if self.mapview is not None:  # another map or N chosen: a new copy
            key += ((self.mapview.name, self.mapview.top.value),)
        if self.events is not None:
            ev = self.events
            key += ((ev.choose.value, ev.n.value, ev.column.value, ev.top.value),)
        return key

    def finish(self, png: bool = True) -> None:
        """Replace the displayed output by the final static rendering, once per new state.

        The bundle has no widget in it, so a saved notebook shows it whether or not a kernel
        (or the widget's model) is there. `png=False`: the stats table without the plots.
        """
        with self._static_lock:
            self._finish(png)

    def _finish(self, png: bool) -> None:
        key = (*self._key(), png)
        if self._static_for != key:  # drawn once per state; a failed send is retried alone
            self._static_html = self.static_snapshot(png=png)
            if not png and self.static != "none":
                self._static_html += ("<p><i>The plots are not drawn at a kernel shutdown (too little time): "
                                      "stop the probe first to keep a picture of them.</i></p>")
            self._static_for = key
        elif self.shown == "final":
            return
        if self._send_all(self.final_bundle()):
            self.shown = "final"

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

    def _show_live(self) -> None:
        with self._static_lock:
            self._send_all(self.live_bundle())
            self.shown = "live"
            self._static_for = None

    def _after_cell(self) -> None:
        """IPython's post_execute: with no page showing the panel (nbconvert, nbclient), put the
        final rendering into the output now, as part of the cell that stopped the probe.

        Such runners keep only messages of the cell being executed, so an update sent later
        from the updater thread would be lost.
        """
        try:
            if self.echo.ack >= 0 or self.results.running or self.paused:
                return
            self.finish()
            if self.results.closed:
                self._unhook()
        except Exception as e:  # an event callback must not disturb the user's cells
            self.error = e

    def _on_exit(self, change: dict[str, Any]) -> None:
        """The shell's `exit_now` turned True (kernel shutdown or restart, `exit`): stop the
        probe for its exact final counts and leave the final rendering in the output."""
        if not change.get("new") or self.shown == "final":  # a stopped probe's is made already
            return
        try:
            self._stop.set()  # the updater ends; not joined: it may be drawing, the lock waits for it
            if self.results.running and self.results.live:
                with self._lock:
                    self.results.stop()
            self._shutdown_note = "kernel shut down"
            self.paused = False
            # no time for the plots (see SHUTDOWN_LOCK_WAIT); nor to wait for a PNG being drawn
            held = self._static_lock.acquire(timeout=SHUTDOWN_LOCK_WAIT)
            try:
                self._finish(png=False)
            finally:
                if held:
                    self._static_lock.release()
        except Exception as e:  # the kernel is going away: never in its way
            self.error = e

    def _unhook(self) -> None:
        if self._shell is not None:
            with contextlib.suppress(ValueError):
                self._shell.events.unregister("post_execute", self._after_cell)
            with contextlib.suppress(ValueError):
                self._shell.unobserve(self._on_exit, names="exit_now")
            self._shell = None

    def live_bundle(self) -> dict[str, Any]:
        """The widget, with an HTML fallback of the counts at this moment (for a front end
        without widgets; the final rendering replaces it when the probe stops)."""
        data: dict[str, Any] = dict(super()._repr_mimebundle_() or {})
        note = ("<p><i>kernelscope panel: live plots need a Jupyter widget front end; the final state "
                "replaces this once the probe stops.</i></p>")
        data["text/html"] = (f"<div class='kernelscope-static'>{self._header_html()}"
                             f"{plots.stats_table(self.results)}{note}</div>")
        data["text/plain"] = repr(self)
        return data

    def moved_bundle(self) -> dict[str, Any]:
        """What an output that no longer follows the panel keeps (shown in MAX_OUTPUTS later
        outputs since): the counts at this moment, and no widget."""
        note = (f"<p><i>kernelscope panel: shown again in {MAX_OUTPUTS} later outputs; this one keeps the "
                f"counts of that moment. <code>{html.escape(self.reattach_call())}</code> shows it "
                "again.</i></p>")
        return {"text/html": (f"<div class='kernelscope-static kernelscope-moved'>{self._header_html()}"
                              f"{plots.stats_table(self.results)}{note}</div>"),
                "text/plain": repr(self)}

    def final_bundle(self) -> dict[str, Any]:
        """The final static rendering: HTML and text only, no widget model to look for."""
        body = self._static_html if self._static_html is not None else self.static_snapshot()
        header = self._header_html(self._shutdown_note)
        call = self.reattach_call()
        return {
            "text/html": (f"<div class='kernelscope-static kernelscope-final'>"
                          f"<div class='ks-header'>{header}</div>{body}{self._reattach_html(call)}</div>"),
            "text/plain": f"{self!r}\n{call}",
        }

    def variable(self) -> str:
        """The name the probe has in the user's namespace (the %%bpf name, `probe = ...`), else
        its own name: what the reattach line tells the user to pass to panel()."""
        shell = self._shell
        if shell is not None:
            with contextlib.suppress(RuntimeError):  # the namespace changed while read (a cell runs)
                for key, value in list(shell.user_ns.items()):
                    if value is self.results and key.isidentifier() and not key.startswith("_"):
                        return key
        name = self.results.name
        return name if name and name.isidentifier() else "probe"

    def reattach_call(self) -> str:
        """The code that shows this panel again, live, in the kernel that ran it."""
        return f"from kernelscope.jupyter.widgets import panel; panel({self.variable()})"

    def _reattach_html(self, call: str) -> str:
        r, var = self.results, html.escape(self.variable())
        if r.closed:
            then = f"its final counts; the probe is closed, its rows stay readable as <code>{var}.df</code>"
        elif r.live:
            then = f"it follows the probe again once <code>{var}.start()</code> runs"
        else:
            then = "the replay's panel"
        return (f"<p class='ks-reattach' style='color:#6b7280;font-size:90%'>While the kernel that ran this "
                f"is up, <code>{html.escape(call)}</code> shows the panel again ({then}).</p>")

    def _bundle(self) -> dict[str, Any]:
        return self.final_bundle() if self.shown == "final" else self.live_bundle()

    def __repr__(self) -> str:  # from bookkeeping only: it may run in the updater thread
        r = self.results
        maps = "; ".join(f"{n}: {s.get('received', 0):,} received, {s.get('dropped', 0):,} dropped"
                         for n, s in plots.summary(r).items())
        return f"<kernelscope panel: {r.name or type(r).__name__} {self.state()}; {maps}>"

    def _ipython_display_(self) -> None:
        """Display as a widget, replaced in the same output by the final rendering on stop."""
        from IPython import get_ipython
        from IPython.display import display

        self.shown = "live"
        handle = display(self.live_bundle(), raw=True, display_id=True)
        with self._static_lock:
            if handle is not None:
                self._handles.append(handle)
            # every output showing the panel gets the final rendering; beyond MAX_OUTPUTS the
            # oldest is made static now (a saved notebook must find no widget in it)
            while len(self._handles) > MAX_OUTPUTS:
                with contextlib.suppress(Exception):
                    self._handles.pop(0).update(self.moved_bundle(), raw=True)
        shell = get_ipython()
        if shell is not None and self._shell is None:
            self.hook(shell)
        # shown again (panel(probe) in a reopened notebook): follow the probe in this output;
        # a stopped one's final rendering comes back here once the updater has seen it
        self._final_done = False
        self.start()

    def hook(self, shell: Any) -> None:
        """Follow `shell`'s cells (post_execute) and its shutdown (`exit_now`)."""
        shell.events.register("post_execute", self._after_cell)
        shell.observe(self._on_exit, names="exit_now")
        self._shell = shell


def _updater(ref: weakref.ReferenceType[Panel], stop: threading.Event) -> None:
    """Call `panel.tick()` every interval until it says there is nothing left to follow."""
    panel = ref()
    if panel is None:
        return
    interval = panel.interval
    del panel
    while True:
        panel = ref()
        if panel is None:
            return
        try:
            if not panel.tick():
                return
        except Exception as e:  # keep the kernel's output clean; show it in the panel
            panel.error = e
            with contextlib.suppress(Exception):
                panel._say(f"plot refresh failed: {type(e).__name__}: {e}", error=True)
            return
        finally:
            del panel
        if stop.wait(interval):
            return
