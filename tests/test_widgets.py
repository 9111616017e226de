"""The live panel and its plots: plot data from known events, controls that reload real probes.

The first group builds replays in memory (no BPF); the real-kernel group drives the panel's
controls and checks the kernel's side: new buffer sizes (stats and `bpftool map show`),
plots that follow a stream and stop following it after stop(), buttons, the reorder window.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pandas as pd
import pytest
from producers import Producer, paused, perf_program, ring_program
from programs import LOG2L
from util import wait_for

from kernelscope import Probe
from kernelscope.captures.capture import Capture, MapCapture
from kernelscope.captures.replay import Replay
from kernelscope.captures.tables import TableCapture
from kernelscope.jupyter import plots, widgets
from kernelscope.readers.batch import Batch
from kernelscope.schema import Schema
from kernelscope.store import FrameStore

EVENT = np.dtype([("ts", "<u8"), ("pid", "<u4"), ("cpu", "<u4")])
STARTED_NS = 5_000_000_000


def capture(ts: list[int], arrival_ns: list[int], *, cpu: list[int] | None = None, kind: str = "ringbuf",
            history: list[dict[str, float]] | None = None, name: str = "events") -> Capture:
    """A one-map capture: events with these timestamps (ns since start) read at these times."""
    n = len(ts)
    rec = np.zeros(n, EVENT)
    rec["ts"] = np.array(ts, dtype=np.uint64) + STARTED_NS
    mc = MapCapture(name, kind, EVENT, rec, np.arange(n), np.array(arrival_ns, dtype=np.int64) + STARTED_NS,
                    np.array(cpu, dtype=np.int16) if cpu is not None else None,
                    stats={"kind": kind, "attempted": n, "received": n, "dropped": 0, "capacity_bytes": 4096,
                           "pages": 1, "inversions": 0},
                    history=history or [], pages=1)
    return Capture({name: mc}, source="// test", settings={}, started_ns=STARTED_NS)


def replayed(cap: Capture) -> Replay:
    return Replay(cap, speed=None).start()


# --- plot data from known events (no BPF) -------------------------------------------------------

def test_ordering_marks_rows_older_than_an_earlier_arrival() -> None:
    ts = [10, 20, 50, 30, 40, 60]
    r = replayed(capture(ts, [100] * 6, cpu=[0, 0, 1, 0, 0, 1], kind="perf"))
    o = plots.ordering(r, "events")
    assert o is not None
    assert list(o["late"]) == [False, False, False, True, True, False]
    assert o["inversions"] == 2
    assert list(o["seq"]) == list(range(6))
    assert np.allclose(o["s"], np.array(ts) / 1e9)  # seconds since the recording started
    assert plots.ordering_title(r, "events") == "events (perf): 2 of the latest 6 out of order"
    traces = {t["meta"]: t for t in plots.ordering_traces(r, "events")}
    assert set(traces) == {"events:cpu0", "events:cpu1", "events:late"}  # a colour per CPU
    assert list(traces["events:late"]["x"]) == [3, 4]


def test_ordering_is_bounded_to_the_latest_rows() -> None:
    r = replayed(capture(list(range(0, 10_000, 10)), [1] * 1000))
    o = plots.ordering(r, "events", sample=100)
    assert o is not None
    assert o["rows"] == 100
    assert list(o["seq"]) == list(range(900, 1000))


def test_tail_takes_the_last_chunks_without_merging_the_store() -> None:
    store = FrameStore(Schema(EVENT))
    for i in range(50):
        rec = np.zeros(10, EVENT)
        rec["ts"] = np.arange(i * 10, i * 10 + 10)
        store.append(Batch(rec), arrival_ns=1000 + i)
    r = replayed(capture([1], [1]))
    r.outputs["events"].store = store
    t = plots.tail(r, "events", 25)
    assert list(t["seq"]) == list(range(475, 500))
    assert t["ts"] is not None
    assert list(t["ts"]) == list(range(475, 500))
    assert list(t["arrival_ns"][:5]) == [1047] * 5
    assert len(store._chunks) + len(store._open) == 50  # tail merged nothing


def test_latency_is_arrival_minus_timestamp() -> None:
    # 100 events stamped at 1 ms, read at 1.5 ms: 500 us each
    r = replayed(capture([1_000_000] * 100, [1_500_000] * 100))
    lat = plots.latency(r, "events")
    assert lat is not None
    assert lat["rows"] == 100
    assert lat["p50"] == pytest.approx(500.0)
    (hit,) = np.nonzero(lat["counts"])[0]
    assert lat["edges"][hit] <= 500 < lat["edges"][hit + 1]
    assert "events 500 us/500 us" in plots.latency_title(r)


def test_rates_come_from_the_sampled_counters() -> None:
    history = [{"t": i * 0.5, "attempted": 1000 * i, "received": 800 * i, "dropped": 200 * i,
                "fill_bytes": 1024, "lost_records": 0} for i in range(5)]
    r = replayed(capture([1], [1], history=history))
    rates = plots.rates(r, "events")
    assert list(rates["t"]) == [0.5, 1.0, 1.5, 2.0]
    assert np.allclose(rates["received"], 1600)
    assert np.allclose(rates["dropped"], 400)
    fill = plots.fill(r, "events")
    assert np.allclose(fill["fraction"], 0.25)  # 1 KiB waiting in a 4 KiB buffer


def test_fill_uses_the_buffer_size_each_sample_had() -> None:
    history = [{"t": float(i), "fill_bytes": 2048, "attempted": 0, "received": 0, "dropped": 0,
                "lost_records": 0} for i in range(6)]
    r = replayed(capture([1], [1], history=history))
    ms = r.outputs["events"]
    ms.pages = 1  # a 4 KiB ring now; 8 pages until t=2, 2 pages until t=4
    ms.marks = [{"t": 2.0, "what": "pages {'events': 8} -> {'events': 2}"},
                {"t": 3.0, "what": "reorder_ns None -> 1000000"},
                {"t": 4.0, "what": "pages {'events': 2} -> {'events': 1}"}]
    r.capture.maps["events"].stats["capacity_bytes"] = 4096
    assert list(plots.fill(r, "events")["fraction"]) == [1 / 16, 1 / 16, 1 / 4, 1 / 4, 1 / 2, 1 / 2]
    ms.marks = [{"t": 2.0, "what": "pages default -> {'events': 1}"}]  # the size declared: unknown
    assert np.isnan(plots.fill(r, "events")["fraction"][:2]).all()


def test_reload_marks_read_short() -> None:
    assert plots.short_mark("pages {'ring': 64, 'perf': 64} -> {'ring': 1, 'perf': 64}") == "ring 64->1p"
    assert plots.short_mark("pages default -> {'events': 8}") == "events default->8p"
    assert plots.short_mark("reorder_ns None -> 10000000") == "reorder off->10ms"
    assert plots.short_mark("pages 64 -> 8; wakeup epoll -> timer") == "pages 64->8, wakeup epoll->timer"


def test_spec_sends_float_arrays_and_one_axis_pair_per_plot() -> None:
    r = replayed(capture([10, 30, 20], [100, 100, 100], cpu=[0, 1, 0], kind="perf"))
    data, layout = plots.spec(r)
    assert {str(t["x"].dtype) for t in data} == {"float64"}  # browsers have no int64 typed array
    axes = {(t["xaxis"], t["yaxis"]) for t in data}
    assert axes == {("x", "y"), ("x2", "y2"), ("x3", "y3"), ("x4", "y4")}  # rates, fill, latency, ordering
    titles = [a["text"] for a in layout["annotations"]]
    assert "events (perf): 1 of the latest 3 out of order" in titles


def test_static_html_inlines_plotly_once_and_works_offline() -> None:
    r = replayed(capture([10, 30, 20], [100, 100, 100], cpu=[0, 1, 0], kind="perf"))
    out = plots.static_html(r)
    assert not re.search(r"<script[^>]*\bsrc=", out)  # nothing fetched: plotly.js is inline
    assert len(out) > 3_000_000  # plotly.js itself is inside
    assert out.count("Plotly.newPlot") == 1
    assert "<table class='ks-stats-table'>" in out


def test_static_png_via_kaleido() -> None:
    pytest.importorskip("kaleido")
    r = replayed(capture([10, 30, 20], [100, 100, 100], cpu=[0, 1, 0], kind="perf"))
    png = plots.static_png(r)
    assert png is not None
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_panel_of_a_replay_is_read_only_and_ends_as_a_static_rendering_without_a_widget() -> None:
    r = replayed(capture([10, 30, 20], [100, 100, 100], cpu=[0, 1, 0], kind="perf"))
    pn = widgets.panel(r, static="html")
    try:
        assert all(dd.disabled for dd in pn.pages.values())
        assert pn.reorder.disabled
        assert pn.poll.disabled
        live = pn.live_bundle()
        assert live[widgets.WIDGET_MIME]["model_id"] == pn.model_id
        assert "live plots need a" in live["text/html"]
        handle = Recorder()
        pn._handles, pn.shown = [handle], "live"  # as if displayed, with no page showing it (nbconvert)
        pn._after_cell()  # IPython's post_execute: the cell that showed the finished replay ends
        assert pn.shown == "final"
        (final,) = handle.bundles
        assert set(final) == {"text/html", "text/plain"}  # nothing that needs a widget model
        assert pn.model_id not in json.dumps(final)
        html = final["text/html"]
        assert "kernelscope-final" in html
        assert "Plotly.newPlot" in html
        assert "<td>3</td><td>3</td><td>0</td>" in html  # attempted, received, dropped
        pn._after_cell()  # nothing changed: the output is not sent again
        assert len(handle.bundles) == 1
    finally:
        pn.close()


def test_fill_is_drawn_in_percent_with_plotlys_own_decimals() -> None:
    """A fixed ".0%" read "0%, 0%, 0%" below 1 % fill; plotly's own format adds the decimals."""
    history = [{"t": i * 0.5, "attempted": 0, "received": 0, "dropped": 0, "fill_bytes": 8 * i,
                "lost_records": 0} for i in range(3)]
    r = replayed(capture([1], [1], history=history))
    data, layout = plots.spec(r)
    (fill,) = [t for t in data if t["meta"] == "events:fill"]
    assert list(fill["y"]) == [0, 100 * 8 / 4096, 100 * 16 / 4096]  # 0.2 % and 0.4 % of 4 KiB
    axis = layout[f"yaxis{fill['yaxis'][1:]}"]
    assert axis["ticksuffix"] == "%"
    assert "tickformat" not in axis
    assert all("tickformat" not in v for k, v in layout.items() if k.startswith(("xaxis", "yaxis")))
    assert "width" not in plots.spec(r, width=None)[1]  # the live panel: as wide as the page lets it


class Recorder:
    """Stands in for IPython's DisplayHandle: keeps what the panel displays."""

    def __init__(self) -> None:
        self.bundles: list[dict[str, Any]] = []

    def update(self, obj: Any, **kwargs: Any) -> None:
        self.bundles.append(obj)


def table(name: str, kind: str, keys: np.ndarray, values: np.ndarray) -> TableCapture:
    """A map snapshot as a capture holds it (one CPU, 64 entries): the records' own dtypes."""
    raw_keys, raw_values = (a.view(np.uint8).reshape(len(a), -1) for a in (keys, values))
    return TableCapture(name, kind, keys.dtype, values.dtype, 64, 1, False, raw_keys, raw_values, 0)


def test_maps_area_ranks_by_the_first_numeric_value_and_reads_slots_as_histograms() -> None:
    key = np.dtype([("pid", "<u4"), ("comm", "S8")])
    value = np.dtype([("count", "<u8"), ("slots", "<u4", (4,))])
    keys = np.array([(4242, b"a"), (7, b"b"), (99, b"c")], key)
    values = np.array([(5, [1, 2, 2, 0]), (30, [0, 0, 10, 20]), (12, [12, 0, 0, 0])], value)
    # a BPF_ARRAY of counters whose slot 0 is used: BCC's bpf_log2l never fills it, so no histogram
    counters = table("counters", "array", np.arange(3, dtype="<i4"), np.array([9, 1, 2], "<u8"))
    cap = capture([1], [1])
    cap.tables = {"tally": table("tally", "hash", keys, values), "counters": counters}
    pn = widgets.panel(replayed(cap), static="none")
    try:
        view = pn.mapview
        assert view is not None
        view.top.value = 2
        assert view.rows is not None
        assert view.rows["pid"].tolist() == [7, 99]  # by count, the slots array left aside
        assert "<tr><td>7</td><td>b</td><td>30</td><td>[0, 0, 10, 20]</td></tr>" in view.table.value
        assert "captured snapshot" in view.table.value
        assert sum(sum(b) for b in view.bars().values()) == values["count"].sum()  # each count is its slots
        view.choose.value = "counters"
        assert view.rows is not None
        assert view.rows["value"].tolist() == [9, 2]
        assert view.bars() == {}
        assert "counters" in pn.static_snapshot()
    finally:
        pn.close()


def test_page_choices_are_powers_of_two_with_sizes() -> None:
    choices = widgets.page_choices(64, "ringbuf")
    assert [p for _, p in choices] == [1 << i for i in range(13)]
    assert choices[0][0] == "1 (4 KiB)"
    assert widgets.page_choices(3, "perf")[2] == ("3 (12 KiB per CPU)", 3)  # an odd current size stays


# --- real kernel: the panel drives a probe -------------------------------------------------------

def map_info(probe: Probe, name: str) -> dict[str, Any]:
    """`bpftool map show` for one of the probe's maps, found by the id behind its fd."""
    fd = probe.program.map_fd(name)  # either backend
    with open(f"/proc/self/fdinfo/{fd}") as f:
        map_id = int(re.search(r"^map_id:\s*(\d+)", f.read(), re.M).group(1))  # type: ignore[union-attr]
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    out = subprocess.run([bpftool, "-j", "map", "show", "id", str(map_id)], capture_output=True, text=True,
                         check=True).stdout
    return dict(json.loads(out))


def two_target_ring(pages: int = 64) -> str:
    return ring_program(pages).replace("!= TARGET", "!= TARGET && (id >> 32) != SECOND")


@pytest.mark.kernel
def test_pages_control_reloads_the_program_with_the_new_size() -> None:
    first, second = paused(5_000), paused(5_000)
    p = Probe(two_target_ring(64), cflags=[*first.cflags, f"-DSECOND={second.pid}"]).start()
    pn = widgets.panel(p, interval=0.05, static="none")
    try:
        first.go()
        assert map_info(p, "events")["max_entries"] == 64 * 4096
        pn.pages["events"].value = 8  # what a user's pick in the dropdown does
        st = p.stats["events"]
        assert (st["pages"], st["capacity_bytes"], st["reloads"]) == (8, 8 * 4096, 1)
        info = map_info(p, "events")
        assert info["type"] == "ringbuf"
        assert info["max_entries"] == 8 * 4096
        assert p.running
        assert "reloaded" in pn.message.value
        assert plots.marks(p)[0][1] == "pages default -> {'events': 8}"
        second.go()
        p.stop()
        st = p.stats["events"]
        assert st["attempted"] == 10_000 == st["received"] + st["dropped"]  # counts carried over
        pn.refresh()
        assert "events default-&gt;8p" in str(pn.figure.layout.annotations)  # the reload, marked
        assert "<td>8</td><td>32 KiB</td>" in pn.stats.value
    finally:
        p.close()
        pn.close()


@pytest.mark.kernel
def test_pages_control_reloads_a_core_program_and_its_user_ring_keeps_counting() -> None:
    from kernelscope import sources

    p = Probe(sources.read("user_ringbuf_echo.c")).start()
    pn = widgets.panel(p, interval=0.05, static="none")
    try:
        assert set(pn.pages) == {"kernel_ringbuf"}  # output maps only: the user ring is not drained here
        p.send([{"seq": i} for i in range(100)])
        os.kill(os.getpid(), 0)
        pn.pages["kernel_ringbuf"].value = 8
        assert map_info(p, "kernel_ringbuf")["max_entries"] == 8 * 4096
        assert p.backend == "libbpf"
        assert p.running
        p.send([{"seq": i} for i in range(100, 200)])
        os.kill(os.getpid(), 0)
        p.stop()
        assert p.df["seq"].tolist() == list(range(200))
        st = p.stats["kernel_ringbuf"]
        assert (st["attempted"], st["received"], st["reloads"]) == (200, 200, 1)
        assert p.send_stats["user_ringbuf"]["drained"] == 200
    finally:
        p.close()
        pn.close()


@pytest.mark.kernel
def test_perf_controls_set_pages_and_wakeups() -> None:
    prod = paused(1)
    p = Probe(perf_program(), cflags=prod.cflags, pages=4).start()
    pn = widgets.panel(p, interval=0.05, static="none")
    try:
        cpus = len(p.outputs["events"].reader.fill_by_cpu())
        pn.pages["events"].value = 16
        assert p.stats["events"]["capacity_bytes"] == 16 * 4096 * cpus
        pn.perf_wakeup.value = ("fraction", 2)  # wake up when a CPU's buffer is half full
        assert p.watermark_bytes == 8 * 4096
        pn.pages["events"].value = 2  # the watermark follows the new size
        assert p.watermark_bytes == 4096
        assert p.stats["events"]["capacity_bytes"] == 2 * 4096 * cpus
        pn.perf_wakeup.value = ("events", 16)
        assert (p.watermark_bytes, p.wakeup_events) == (None, 16)
        pn.poll.value = 0.1
        assert p.poll_interval == 0.1
        assert p.stats["events"]["reloads"] == 5
        assert p.running
        assert pn.error is None
    finally:
        prod.go()
        p.close()
        pn.close()


def rates_points(pn: widgets.Panel) -> int:
    return next(len(t.x) for t in pn.figure.data if t.meta == "events:received")


@pytest.mark.kernel
def test_plots_follow_the_stream_and_stop_after_stop() -> None:
    prod = paused(300_000)
    p = Probe(ring_program(256), cflags=prod.cflags).start()
    pn = widgets.panel(p, interval=0.05, static="html")
    handle = Recorder()
    pn._handles = [handle]  # as if displayed: the static copy goes here once the probe stops
    pn.echo.ack = 10**9  # as if a page showed the panel and kept up with it
    go = threading.Thread(target=prod.go)
    try:
        go.start()
        before = rates_points(pn)
        wait_for(lambda: rates_points(pn) > before + 5, timeout=20, what="the rates plot to grow")
        wait_for(lambda: next(len(t.x) for t in pn.figure.data if t.meta == "events:all") > 100, timeout=20,
                 what="rows in the ordering plot")
        assert pn.updates > 5
        go.join(60)
        p.stop()
        wait_for(lambda: pn._final_done, timeout=10, what="the refresh after stop()")
        wait_for(lambda: handle.bundles, timeout=20, what="the static copy after stop()")
        updates, points = pn.updates, rates_points(pn)
        received = p.stats["events"]["received"]
        time.sleep(0.5)  # ten refresh intervals in which nothing may be redrawn
        assert (pn.updates, rates_points(pn)) == (updates, points)
        assert pn.updating  # still watching, so a resume() from code is followed
        html = handle.bundles[-1]["text/html"]
        assert "Plotly.newPlot" in html
        assert f"{received:,}" in html
        assert widgets.WIDGET_MIME not in handle.bundles[-1]
        p.close()
        wait_for(lambda: not pn.updating, timeout=5, what="the updater to end with the probe")
    finally:
        go.join(60)
        p.close()
        pn.close()


@pytest.mark.kernel
def test_buttons_pause_resume_clear_and_stop() -> None:
    prod = paused(2_000)
    p = Probe(ring_program(64), cflags=prod.cflags).start()
    pn = widgets.panel(p, interval=0.05, static="none")
    handle = Recorder()
    pn._handles, pn.shown = [handle], "live"
    try:
        prod.go()
        wait_for(lambda: len(p.outputs["events"].store) == 2_000, what="every event stored")
        pn.buttons["pause"].click()
        assert not p.running
        assert pn.state() == "paused"  # not "stopped": resume goes on
        assert "<span class='ks-state'>paused</span>" in pn.header.value
        assert "paused" in repr(pn)
        assert pn.buttons["resume"].disabled is False
        pn._stopped_since = time.monotonic() - widgets.STOP_SETTLE  # paused for longer than a reload
        pn.echo.ack = 0  # a page shows the panel
        pn.tick()
        pn.echo.ack = -1  # no page (nbconvert): the end of a cell makes no final rendering either
        pn._after_cell()
        assert (pn.shown, handle.bundles) == ("live", [])  # a paused panel stays a live widget
        pn.echo.ack = 0
        pn.buttons["resume"].click()
        assert p.running
        assert pn.state() == "running"
        assert pn.buttons["pause"].disabled is False
        pn.buttons["clear"].click()
        assert len(p.outputs["events"].store) == 0
        assert p.stats["events"]["received"] == 2_000  # clearing rows keeps the counts
        pn.buttons["stop"].click()
        assert p.closed
        assert all(dd.disabled for dd in pn.pages.values())
        assert pn.buttons["resume"].disabled
        wait_for(lambda: not pn.updating, timeout=5, what="the updater to end")
        assert pn.shown == "final"  # closed: the updater left the final rendering in the output
        html = handle.bundles[-1]["text/html"]
        assert "<span class='ks-state'>closed</span>" in html
        assert "<td>2,000</td><td>2,000</td><td>0</td>" in html
    finally:
        p.close()
        pn.close()


@pytest.mark.kernel
def test_the_output_ends_with_the_counts_at_stop_and_comes_back_live_on_start() -> None:
    """The final rendering is made when the probe stops, not when the panel was shown; a
    start() from code brings the widget back into the same output."""
    prod = paused(4_000)
    p = Probe(ring_program(64), cflags=prod.cflags).start()
    pn = widgets.panel(p, interval=0.05, static="none")
    handle = Recorder()
    pn._handles, pn.shown = [handle], "live"
    pn.echo.ack = 0  # a page shows the panel
    try:
        shown = pn.live_bundle()  # what the output held at display time
        assert "<td>0</td><td>0</td><td>0</td>" in shown["text/html"]
        prod.go()
        p.stop()
        wait_for(lambda: pn.shown == "final", timeout=10, what="the final rendering after stop()")
        final = handle.bundles[-1]
        assert set(final) == {"text/html", "text/plain"}
        assert pn.model_id not in json.dumps(final)
        st = p.stats["events"]
        assert st["attempted"] == st["received"] == 4_000
        assert "<td>4,000</td><td>4,000</td><td>0</td>" in final["text/html"]
        assert "<span class='ks-state'>stopped</span>" in final["text/html"]
        assert "4,000 received" in final["text/plain"]
        p.start()
        wait_for(lambda: pn.shown == "live", timeout=10, what="the live panel back after start()")
        assert handle.bundles[-1][widgets.WIDGET_MIME]["model_id"] == pn.model_id
        p.close()
        wait_for(lambda: pn.shown == "final", timeout=10, what="the final rendering after close()")
        assert "<span class='ks-state'>closed</span>" in handle.bundles[-1]["text/html"]
    finally:
        p.close()
        pn.close()


@pytest.mark.kernel
def test_kernel_shutdown_stops_the_probe_and_leaves_the_final_rendering() -> None:
    """What a kernel shutdown or restart does first (ipykernel's do_shutdown sets the shell's
    `exit_now`): the panel stops the probe and sends the final rendering before the kernel goes."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    prod = paused(3_000)
    p = Probe(ring_program(64), cflags=prod.cflags).start()
    pn = widgets.panel(p, interval=0.05, static="auto")
    handle = Recorder()
    pn._handles, pn.shown = [handle], "live"
    pn.hook(shell)
    try:
        prod.go()
        wait_for(lambda: p.outputs["events"].store.received == 3_000, what="every event received")
        assert p.running
        shell.exit_now = True
        assert not p.running
        st = p.stats["events"]
        assert st["attempted"] == st["received"] + st["dropped"] == 3_000
        final = handle.bundles[-1]
        assert set(final) == {"text/html", "text/plain"}
        html = final["text/html"]
        assert "(kernel shut down)" in html
        assert "<td>3,000</td><td>3,000</td><td>0</td>" in html
        assert "<img" not in html  # a PNG takes longer than the kernel has left
    finally:
        shell.exit_now = False
        p.close()
        pn.close()
    assert pn._shell is None  # close() unhooked it from the shell


@pytest.mark.kernel
def test_a_real_kernel_shutdown_sends_the_final_rendering_before_the_kernel_exits(monkeypatch) -> None:
    """Through jupyter_client, as JupyterLab's "Shut Down Kernel" does: the shutdown request
    reaches ipykernel's do_shutdown, and the panel's update_display_data leaves the kernel
    before it exits (jupyter_client sends SIGTERM 2.5 s after asking)."""
    import queue

    from jupyter_client.manager import KernelManager

    tests = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(filter(None, [os.path.dirname(tests), tests, os.environ.get("PYTHONPATH")]))
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env={**os.environ, "PYTHONPATH": path})
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        kc.execute("from producers import paused, ring_program\nfrom kernelscope import Probe\n"
                   "from kernelscope.jupyter.widgets import panel\nprod = paused(3_000)\n"
                   "p = Probe(ring_program(64), cflags=prod.cflags).start()\npanel(p)")
        go = kc.execute("prod.go()")

        def messages(until: Any) -> list[dict[str, Any]]:
            got: list[dict[str, Any]] = []
            deadline = time.monotonic() + 60
            while not until(got) and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    got.append(kc.get_iopub_msg(timeout=0.2))
            return got

        def both_ran(got: list[dict[str, Any]]) -> bool:
            return any(m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
                       and m["parent_header"].get("msg_id") == go for m in got)
        shown = [m for m in messages(both_ran) if m["msg_type"] in ("display_data", "error")]
        assert [m["msg_type"] for m in shown] == ["display_data"], shown
        assert widgets.WIDGET_MIME in shown[0]["content"]["data"]
        display_id = shown[0]["content"]["transient"]["display_id"]
        km.request_shutdown()
        updates = [m for m in messages(lambda got: any(m["msg_type"] == "update_display_data" for m in got))
                   if m["msg_type"] == "update_display_data"]
        assert updates, "no final rendering before the kernel went away"
        final = updates[-1]["content"]
        assert final["transient"]["display_id"] == display_id  # the same output
        assert set(final["data"]) == {"text/html", "text/plain"}
        assert "<td>3,000</td><td>3,000</td><td>0</td>" in final["data"]["text/html"]
        assert "(kernel shut down)" in final["data"]["text/html"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def concurrent(producers: list[Producer]) -> None:
    threads = [threading.Thread(target=pr.go) for pr in producers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


@pytest.mark.kernel
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs for perf buffers to interleave")
def test_reorder_control_sorts_perf_events_from_two_cpus() -> None:
    a1, b1, a2, b2 = (paused(50_000, cpu=cpu) for cpu in (0, 1, 0, 1))
    others = " && ".join(f"(id >> 32) != {d}" for d in ("B1", "A2", "B2"))
    src = perf_program().replace("(id >> 32) != TARGET", f"(id >> 32) != TARGET && {others}")
    cflags = [*a1.cflags, f"-DB1={b1.pid}", f"-DA2={a2.pid}", f"-DB2={b2.pid}"]
    p = Probe(src, pages=256, cflags=cflags).start()
    pn = widgets.panel(p, interval=0.05, static="none")
    try:
        concurrent([a1, b1])
        wait_for(lambda: p.stats["events"]["received"] + p.stats["events"]["dropped"] == 100_000,
                 timeout=20, what="the first events")
        mixed = p.stats["events"]["inversions"]
        assert mixed > 0  # per-CPU buffers, emptied one after another: out of timestamp order
        pn.reorder.value = 1_000_000_000  # a 1 s window
        assert p.reorder_ns == 1_000_000_000
        assert p.stats["events"]["reloads"] == 1
        concurrent([a2, b2])
        p.stop()  # flushes the window
        st = p.stats["events"]
        # every event accounted for; whether a 1 MiB/CPU buffer ever filled depends on how
        # busy the machine is (a second test suite beside this one made it drop 3 %)
        assert st["attempted"] == st["received"] + st["dropped"] == 200_000, st
        assert st["received"] >= 100_000, st
        assert st["inversions"] == mixed  # the second 100,000 came out sorted
        pn.refresh()
        assert plots.ordering_title(p, "events", 5_000) == "events (perf): 0 of the latest 5,000 out of order"
    finally:
        p.close()
        pn.close()


@pytest.mark.kernel
def test_a_headless_notebook_run_keeps_the_plots_in_its_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """nbconvert/nbclient (and so GitHub) see the static copy made when the probe stopped."""
    import nbformat
    from nbclient import NotebookClient

    tests = os.path.dirname(os.path.abspath(__file__))
    cells = [
        f"import sys\nsys.path.insert(0, {tests!r})\nfrom producers import paused, ring_program\n"
        "from kernelscope import Probe\nfrom kernelscope.jupyter.widgets import panel\n"
        "prod = paused(3_000)\np = Probe(ring_program(64), cflags=prod.cflags).start()",
        "panel(p, static='html')",
        "prod.go()\np.stop()",
        "p.close()",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    root = os.path.dirname(tests)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()  # the kernel inherits the env
    (out,) = nb.cells[1].outputs
    # the output the panel was shown in holds the final rendering: nothing for a widget model
    assert set(out["data"]) == {"text/html", "text/plain"}
    html = out["data"]["text/html"]
    assert "Plotly.newPlot" in html
    assert "<td>3,000</td><td>3,000</td><td>0</td>" in html  # attempted, received, dropped
    assert "<span class='ks-state'>closed</span>" in html  # the last cell's close() is in it too


# --- real kernel: the maps area --------------------------------------------------------------------

# getppid() calls per pid of two children, and a log2 histogram of each call's running count
# (call k of a pid adds k: the buckets are known). Each child is one thread, so its calls run
# one after another and `*v += 1` needs no atomic add.
COUNTING = {
    "bcc": r"""
BPF_HASH(calls, u32, u64, 64);
BPF_HISTOGRAM(dist, int, 32);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != TARGET && pid != SECOND) return 0;
    u64 zero = 0, *v = calls.lookup_or_try_init(&pid, &zero);
    if (!v) return 0;
    *v += 1;
    dist.increment(bpf_log2l(*v));
    return 0;
}
""",
    "libbpf": r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct hist { __u32 slots[32]; };
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 64); __type(key, u32); __type(value, u64); }
    calls SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1); __type(key, u32);
         __type(value, struct hist); } dist SEC(".maps");
LOG2L
SEC("tp/syscalls/sys_enter_getppid")
int ks_calls(void *ctx) {
    u32 pid = bpf_get_current_pid_tgid() >> 32, zero = 0;
    if (pid != TARGET && pid != SECOND) return 0;
    u64 one = 1, n = 1, *v = bpf_map_lookup_elem(&calls, &pid);
    if (v) n = *v += 1;
    else bpf_map_update_elem(&calls, &pid, &one, BPF_NOEXIST);
    struct hist *h = bpf_map_lookup_elem(&dist, &zero);
    u64 slot = log2l(n);
    if (h && slot < 32) h->slots[slot] += 1;
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
""".replace("LOG2L", LOG2L),
}
BACKENDS = ["bcc", "libbpf"]


def top_rows(pn: widgets.Panel) -> list[tuple[int, int]]:
    """The (pid, calls) rows of the maps area's top-N table, as the page is sent them."""
    assert pn.mapview is not None
    cells = re.findall(r"<tr><td>([\d,]+)</td><td>([\d,]+)</td></tr>", pn.mapview.table.value)
    return [(int(a.replace(",", "")), int(b.replace(",", ""))) for a, b in cells]


@pytest.mark.kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_maps_area_shows_top_calls_and_the_histogram_and_a_replay_the_same(backend: str, tmp_path) -> None:
    from kernelscope.hist import Histogram

    few, many = paused(1_500), paused(4_000)
    p = Probe(COUNTING[backend], backend=backend, cflags=[*few.cflags, f"-DSECOND={many.pid}"]).start()
    pn = widgets.panel(p, interval=0.05, static="html")
    try:
        view = pn.mapview
        assert view is not None
        assert list(view.choose.options) == ["calls", "dist"]
        assert view.top.value == 10
        few.go()
        wait_for(lambda: top_rows(pn) == [(few.pid, 1_500)], timeout=10, what="the live table to follow")
        assert "(live)" in view.table.value  # read from the kernel by the updater, before any stop
        many.go()
        p.stop()
        pn.refresh()
        assert top_rows(pn) == [(many.pid, 4_000), (few.pid, 1_500)]  # ranked by the count
        assert "stop-time snapshot" in view.table.value
        view.top.value = 1
        assert top_rows(pn) == [(many.pid, 4_000)]
        view.top.value = 10
        assert view.bars() == {}  # a hash of counts is no histogram
        view.choose.value = "dist"
        bars = view.bars()
        assert list(bars) == ["all"]
        assert sum(bars["all"]) == 5_500  # one count per call
        # call k adds its running count k: the buckets of 1..1500 and 1..4000
        want = Histogram.of(np.r_[1:1_501, 1:4_001]).counts[0]
        assert bars["all"] == want[: len(bars["all"])].tolist()
        assert sum(want) == 5_500
        view.choose.value = "calls"
        out = Recorder()
        pn._handles = [out]
        pn._after_cell()  # the saved notebook's copy: the top-N table is in it
        saved = out.bundles[-1]["text/html"]
        assert f"<tr><td>{many.pid}</td><td>4,000</td></tr>" in saved
        path = p.save(tmp_path / "calls.parquet")
        shown = top_rows(pn)
        pn.stop()  # no updater from here: only this test's refreshes
        pn.echo.seq, pn.echo.ack, pn._sent_at = 5, 4, time.monotonic()  # a page still drawing
        reads, skipped = view.reads, pn.skipped
        pn.refresh(wait_for_browser=True)
        assert (view.reads, pn.skipped) == (reads, skipped + 1)  # the map is not read then
    finally:
        p.close()
        pn.close()
    from kernelscope.captures.replay import replay

    r = replay(path, speed=None)
    rp = widgets.panel(r, static="none")
    try:
        assert rp.mapview is not None
        assert top_rows(rp) == shown
        assert "captured snapshot" in rp.mapview.table.value
        rp.mapview.choose.value = "dist"
        assert sum(rp.mapview.bars()["all"]) == 5_500
    finally:
        rp.close()


@pytest.mark.kernel
def test_a_program_without_aggregation_maps_has_no_maps_area() -> None:
    prod = paused(10)
    p = Probe(ring_program(8), cflags=prod.cflags).start()
    pn = widgets.panel(p, interval=0.05, static="none")
    try:
        prod.go()
        assert pn.mapview is None
        assert not any("ks-maps" in c._dom_classes for c in pn.children)
        assert p.maps.aggregations() == []
    finally:
        p.close()
        pn.close()


@pytest.mark.kernel
def test_maps_area_picks_up_the_maps_once_loaded_and_shows_any_read_error() -> None:
    """A view made before load has no maps; refresh() after start() lists them (the options are
    synced on every refresh, as after reconfigure()). An error of any kind in a read is shown in
    the table rather than escaping into the updater thread."""
    from kernelscope.jupyter.mapview import MapView

    child = paused(300)
    p = Probe(COUNTING["bcc"], backend="bcc", cflags=[*child.cflags, "-DSECOND=1"])
    view = MapView(p)
    try:
        assert list(view.choose.options) == []
        p.start()
        child.go()
        view.refresh()
        assert list(view.choose.options) == ["calls", "dist"]
        assert view.choose.value == "calls"
        assert f"<td>{child.pid}</td><td>300</td>" in view.table.value
        assert view.reads == 1  # the dropdown's own change during the sync is not another read

        def broken() -> Any:  # the one pretend part: no real map makes read() raise a TypeError
            raise TypeError("decoder broke")

        view.read = broken  # type: ignore[method-assign]
        view.refresh()
        assert isinstance(view.error, TypeError)
        assert "TypeError: decoder broke" in view.table.value
        assert "TypeError: decoder broke" in view.static_html()
    finally:
        view.close()
        p.close()


# --- the events area, the export buttons, reattaching ---------------------------------------------

COMM_EVENT = np.dtype([("ts", "<u8"), ("pid", "<u4"), ("comm", "S8")])


def comm_capture() -> Capture:
    """1,000 events: pid 1 for the first 500, then pids 2 (300) and 3 (200); in the last 500,
    comm "bash" 300 times and "sh" 200 times, written with two different tails after its NUL."""
    n = 1_000
    rec = np.zeros(n, COMM_EVENT)
    rec["ts"] = np.arange(n, dtype=np.uint64) * 1_000 + STARTED_NS
    rec["pid"] = [1] * 500 + [2, 3, 2, 3, 2] * 100
    rec["comm"] = [b"init"] * 500 + [b"bash", b"sh\0xyz", b"bash", b"sh\0abc", b"bash"] * 100
    arrival = np.full(n, STARTED_NS + 100, np.int64)
    mc = MapCapture("events", "ringbuf", COMM_EVENT, rec, np.arange(n), arrival, None,
                    stats={"kind": "ringbuf", "attempted": n, "received": n, "dropped": 0,
                           "capacity_bytes": 4096, "pages": 1, "inversions": 0}, history=[], pages=1)
    return Capture({"events": mc}, source="// test", settings={}, started_ns=STARTED_NS)


def test_events_area_shows_the_latest_rows_and_a_top_n_read_from_the_tail() -> None:
    r = Replay(comm_capture(), speed=None, name="demo").start()
    r.wait()
    store = r.outputs["events"].store
    pn = widgets.panel(r, static="none")
    try:
        ev = pn.events
        assert ev is not None
        assert list(ev.column.options) == ["ts", "pid", "comm"]
        assert ev.column.value == "pid"  # the first column that is not the timestamp
        ev.n.value = 5
        assert ev.rows is not None
        assert ev.rows["ks_seq"].tolist() == [995, 996, 997, 998, 999]
        assert "the latest 5 of 1,000 stored rows" in ev.latest_table.value
        assert ev.top_rows is not None
        assert ev.top_rows.values.tolist() == [[1, 500, 0.5], [2, 300, 0.3], [3, 200, 0.2]]
        assert "all 1,000 stored rows" in ev.top_table.value
        ev.window = 500  # the top-N counts only the latest rows
        ev.column.value = "comm"
        assert ev.top_rows.values.tolist() == [["bash", 300, 0.6], ["sh", 200, 0.4]]  # cut at the NUL
        assert "the latest 500 of 1,000 rows" in ev.top_table.value
        reads = ev.reads
        pn.refresh()
        pn.refresh()
        assert ev.reads == reads  # nothing arrived, nothing chosen: the store is not read again
        assert store._last is None  # and no whole frame was ever built for it
        static = pn.static_snapshot()
        assert "<td>bash</td><td>300</td><td>60.0%</td>" in static
        assert "ks-events-rows" in static
        df = r.frame()
        tail = df.tail(5).reset_index(drop=True)
        pd.testing.assert_frame_equal(ev.rows.reset_index(drop=True), tail)  # what .tail(5) gives
        assert df.tail(500)["comm"].value_counts().to_dict() == {"bash": 300, "sh": 200}
    finally:
        pn.close()


def test_events_area_reads_the_newest_spilled_rows_when_memory_holds_fewer(tmp_path, monkeypatch) -> None:
    """All of a map spilled to Parquet but 5 rows: the latest rows and the top-N come from the
    newest segment and memory, as `.frame().tail(N)` does."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    n = 25_000
    cap = capture(list(range(n)), [100] * n)
    cap.maps["events"].records["pid"] = np.arange(n) % 3
    r = replayed(cap)
    store = r.outputs["events"].store
    store.max_bytes = 1  # as if over budget: every chunk goes to disk
    assert store.spill_some() == n
    assert store.spilled_rows == n
    assert not store.tail_chunks(1)
    more = np.zeros(5, EVENT)
    more["pid"] = 7
    store.append(Batch(more, None), STARTED_NS + 200)  # 5 rows in memory after the 25,000 spilled
    pn = widgets.panel(r, static="none")
    try:
        ev = pn.events
        assert ev is not None
        assert ev.rows is not None
        assert ev.rows["ks_seq"].tolist() == list(range(n - 5, n + 5))
        assert ev.rows["pid"].tolist() == [(n - 5 + i) % 3 for i in range(5)] + [7] * 5
        assert "the latest 10 of 25,005 stored rows" in ev.latest_table.value
        tail = r.frame().tail(10).reset_index(drop=True)
        pd.testing.assert_frame_equal(ev.rows.reset_index(drop=True), tail)
        ev.window = 1_000
        ev.top.value = 4  # a change: read again, over segment and memory
        assert "in the latest 1,000 of 25,005 rows" in ev.top_table.value
        assert ev.top_rows is not None
        got = dict(zip(ev.top_rows["pid"].tolist(), ev.top_rows["rows"].tolist(), strict=True))
        assert got == r.frame().tail(1_000)["pid"].value_counts().to_dict() == {2: 332, 0: 332, 1: 331, 7: 5}
    finally:
        pn.close()


def test_save_and_export_buttons_write_files_that_read_back_and_say_where(tmp_path) -> None:
    from kernelscope.captures.capture import save
    from kernelscope.captures.replay import replay

    r = replay(save(comm_capture(), tmp_path / "recorded.parquet"), speed=None, name="demo").start()
    r.wait()
    pn = widgets.panel(r, static="none", folder=tmp_path)
    pn.clock = lambda: 1_800_000_000.0  # every export in the same second
    try:
        pn.buttons["capture"].click()
        (saved,) = pn.exported
        assert saved.parent == tmp_path
        assert re.fullmatch(r"demo-\d{8}-\d{6}\.capture\.parquet", saved.name), saved.name
        assert f"saved capture {saved} (events: 1,000 rows)" in pn.message.value
        again = replay(saved, speed=None).start()
        again.wait()
        pd.testing.assert_frame_equal(again.frame(), r.frame())
        pn.buttons["capture"].click()  # again within the second: a new name, nothing overwritten
        assert pn.exported[0] == saved.with_name(saved.name.replace(".capture", "-2.capture"))
        assert saved.exists()
        for kind, read in (("parquet", pd.read_parquet), ("csv", pd.read_csv)):
            pn.buttons[kind].click()
            (path,) = pn.exported
            assert re.fullmatch(rf"demo-\d{{8}}-\d{{6}}-events\.{kind}", path.name), path.name
            assert str(path) in pn.message.value
            back = read(path)
            assert back["comm"].tolist() == r.frame()["comm"].tolist()
            assert back["ks_seq"].tolist() == list(range(1_000))
        files = sorted(tmp_path.iterdir())
        pn.folder = tmp_path / "gone"
        pn.buttons["csv"].click()  # the error is in the message line, and nothing else changed
        assert "#b91c1c" in pn.message.value
        assert "export CSV: ExportError: map &#x27;events&#x27;" in pn.message.value
        assert "CaptureError" in pn.message.value
        assert "does not exist" in pn.message.value
        assert "nothing written" in pn.message.value
        assert sorted(tmp_path.iterdir()) == files
    finally:
        pn.close()


def test_an_export_names_what_it_wrote_when_a_map_fails_and_never_replaces_a_file(tmp_path,
                                                                                  monkeypatch) -> None:
    one, two = capture([1, 2], [100, 100]).maps["events"], capture([3], [100], name="b").maps["b"]
    r = replayed(Capture({"events": one, "b": two}, source="// test", settings={}, started_ns=STARTED_NS))
    pn = widgets.panel(r, static="none", folder=tmp_path)
    pn.clock = lambda: 1_800_000_000.0
    stem = widgets.export_stem(r, tmp_path, pn.clock())
    good = stem.with_name(stem.name + "-events.parquet")
    frame = r.frame

    def frames(name: str = "events") -> pd.DataFrame:
        df = frame(name)
        return df.assign(bad=[object()] * len(df)) if name == "b" else df  # pyarrow cannot write it

    try:
        monkeypatch.setattr(r, "frame", frames)
        pn.buttons["parquet"].click()
        text = pn.message.value
        assert "export Parquet: ExportError: map &#x27;b&#x27;" in text
        assert f"{stem}-b.parquet not written: ArrowInvalid" in text
        assert f"wrote (whole, kept) {good}" in text
        assert pn.exported == [good]
        assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]  # no partial or staged file
        assert len(pd.read_parquet(good)) == 2
        monkeypatch.setattr(r, "frame", frame)
        # another kernel writes the same name while this one writes: its file stays, ours gets -2
        theirs = stem.with_name(stem.name + "-b.csv")
        to_csv = pd.DataFrame.to_csv

        def racing(df: pd.DataFrame, *args: Any, **kwargs: Any) -> Any:
            if not theirs.exists():
                theirs.write_text("theirs\n")
            return to_csv(df, *args, **kwargs)

        monkeypatch.setattr(pd.DataFrame, "to_csv", racing)
        pn.buttons["csv"].click()
        ours = stem.with_name(stem.name + "-b-2.csv")
        assert pn.exported == [stem.with_name(stem.name + "-events.csv"), ours], pn.message.value
        assert theirs.read_text() == "theirs\n"
        assert pd.read_csv(ours)["ks_seq"].tolist() == [0]
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    finally:
        pn.close()


def fake_displays(monkeypatch: pytest.MonkeyPatch, n: int) -> list[Recorder]:
    """`n` outputs, in order, for IPython's display() to give out: each keeps what it was shown."""
    import IPython.display

    handles = [Recorder() for _ in range(n)]
    given = iter(handles)

    def display(obj: Any, **kwargs: Any) -> Recorder:
        out = next(given)
        out.bundles.append(obj)
        return out

    monkeypatch.setattr(IPython.display, "display", display)
    return handles


def is_final(bundle: dict[str, Any], state: str) -> bool:
    return widgets.WIDGET_MIME not in bundle and f"ks-state'>{state}" in bundle.get("text/html", "")


@pytest.mark.kernel
def test_a_panel_shown_again_names_its_call_and_follows_the_probe_in_every_output(monkeypatch) -> None:
    """A reopened notebook holds the final rendering; while the kernel still has the probe, the
    call it names (panel(NAME)) shows the same panel again, which follows the probe from there,
    and so does every earlier output: shown in two cells while it runs, both end final."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    handles = fake_displays(monkeypatch, 3)
    prod = paused(1_000)
    p = Probe(ring_program(64), cflags=prod.cflags).start()
    shell.user_ns["traced"] = p
    pn = widgets.panel(p, interval=0.05, static="none")
    try:
        pn._ipython_display_()
        pn.echo.ack = 0  # a page shows the panel
        prod.go()
        wait_for(lambda: len(p.outputs["events"].store) == 1_000, what="every event stored")
        p.stop()
        wait_for(lambda: pn.shown == "final", timeout=10, what="the final rendering after stop()")
        first = handles[0].bundles[-1]
        call = "from kernelscope.jupyter.widgets import panel; panel(traced)"
        assert call in first["text/html"]
        assert call in first["text/plain"]
        assert "<code>traced.start()</code>" in first["text/html"]
        assert widgets.panel(p, interval=0.05, static="none") is pn  # the call gives this panel
        pn._ipython_display_()
        wait_for(lambda: is_final(handles[1].bundles[-1], "stopped"), timeout=10,
                 what="the stopped probe's final rendering in the new output")
        p.start()
        wait_for(lambda: all(widgets.WIDGET_MIME in h.bundles[-1] for h in handles[:2]), timeout=10,
                 what="the live panel in both outputs once the probe runs again")
        assert handles[1].bundles[-1][widgets.WIDGET_MIME]["model_id"] == pn.model_id
        pn._ipython_display_()  # a third cell shows it while it runs
        assert widgets.WIDGET_MIME in handles[2].bundles[-1]
        p.close()
        wait_for(lambda: all(is_final(h.bundles[-1], "closed") for h in handles), timeout=10,
                 what="the closed probe's final rendering in every output")
        for h in handles:  # no output is left with the widget a saved notebook cannot find
            assert "<code>traced.df</code>" in h.bundles[-1]["text/html"]
    finally:
        shell.user_ns.pop("traced", None)
        p.close()
        pn.close()


def test_a_panel_shown_in_many_outputs_makes_the_oldest_static_beyond_the_bound(monkeypatch) -> None:
    r = replayed(capture([10, 20], [100, 100]))
    handles = fake_displays(monkeypatch, widgets.MAX_OUTPUTS + 1)
    pn = widgets.panel(r, static="none")
    try:
        for _ in handles:
            pn._ipython_display_()
        assert pn._handles == handles[1:]
        moved = handles[0].bundles[-1]
        assert widgets.WIDGET_MIME not in moved
        assert "shown again in 16 later outputs" in moved["text/html"]
        assert "<td>2</td><td>2</td><td>0</td>" in moved["text/html"]
        assert all(widgets.WIDGET_MIME in h.bundles[-1] for h in handles[1:])
    finally:
        pn.close()


def test_examples_is_an_attribute_of_the_package() -> None:
    """`import kernelscope; kernelscope.examples` in a fresh interpreter, without the Jupyter face."""
    code = ("import sys, kernelscope; print(kernelscope.examples.get('opens').splitlines()[0]); "
            "print('kernelscope.jupyter' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["%%bpf opens --max-rows 100000", "False"]
