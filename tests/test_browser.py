"""The widget panel in a real browser: JupyterLab runs notebooks/widget-demo.ipynb, Chromium watches it.

The test starts JupyterLab on 127.0.0.1 (free port, its own token, a temporary root holding a
copy of the notebook), drives Debian's Chromium with Playwright, runs every cell, and checks
what a user would see: the live plots' data (plotly's `gd.data`, read from the page) grows,
shrinking the ring buffer from the panel's page-size control reloads the probe (the stats
table shows the new size and a reload) and makes drops rise, growing it again stops them,
perf-buffer events arrive out of timestamp order while ring-buffer events do not, and the
reorder window sorts both; the maps area lists the program's `calls` map, one row per load
generator, and its counts go on rising; every axis's tick labels differ from each other and the
plot toolbar lies inside the panel. Then the panel's stop button closes the probe: its output
turns into the final static rendering (the counts at the end and a PNG of the plots, no widget),
the notebook is saved, the kernel shut down, the notebook opened again, and the saved output
shows that final panel, not "Error displaying widget: model not found". (A shutdown with the
probe still running is test_widgets' real-kernel shutdown test.)
Before the stop: the events area lists the latest rows (moving on) and the two load generators
as the top pids; paused, the "save capture" button writes demo-YYYYmmdd-HHMMSS.capture.parquet
beside the notebook, which replays (kernelscope.captures.replay) with every row the probe had
and its exact counts. After the save, the notebook is opened again while the kernel still holds
the probe: the final rendering names `panel(probe)`, and that call run in a new cell shows the
panel again. Last, in the reopened notebook's new kernel, `%bpf_examples opens` puts the
example's cell below, and run, its status line counts opens.
Screenshots go to test-artifacts/ (panel-live.png, panel-events.png, panel-export.png,
panel-final.png, panel-reattached.png, panel-saved-reopened.png, examples-inserted.png ...).

Needs: Debian's `chromium` (never a downloaded browser) and PyPI's `playwright`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from util import wait_for

from kernelscope.jupyter.widgets import page_choices

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "widget-demo.ipynb"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# what this machine's Chromium needs headless as root, and no calls home (the network is closed)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REQUIRED = os.environ.get("KERNELSCOPE_REQUIRE_BPF") == "1"  # CI: a missing browser is a failure


def _missing(why: str) -> None:
    if REQUIRED:
        pytest.fail(f"the browser test cannot run: {why}", pytrace=False)
    pytest.skip(why)


@dataclass
class Lab:
    url: str
    token: str
    proc: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, method: str = "GET") -> Any:
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """JupyterLab serving a temporary copy of the demo notebook; kernels shut down afterwards."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    port, token = _free_port(), secrets.token_hex(16)
    paths = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
                     ("IPYTHONDIR", "ipython")):
        paths[var] = str(tmp_path / sub)  # nothing from the user's own Jupyter setup
    # no "get notified about Jupyter news?" toast over the screenshots' corner
    notification = (tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
                    / "notification.jupyterlab-settings")
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    log = tmp_path / "jupyterlab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run cells by command
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **paths}, cwd=root, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    lab = Lab(f"http://127.0.0.1:{port}", token, proc, log)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"JupyterLab exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            lab.api("/api/status")
        except OSError:
            return False
        return True

    try:
        wait_for(up, timeout=60, interval=0.2, what="JupyterLab to answer")
        yield lab
    finally:
        try:  # kernels first: the probe and the notebook's load generators end with them
            for k in lab.api("/api/kernels"):
                lab.api(f"/api/kernels/{k['id']}", method="DELETE")
        except OSError:
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(log, ARTIFACTS / "jupyterlab.log")


# --- reading the page ---------------------------------------------------------------------------

# the stats table by its column names: the live panel's, or the final rendering's
LIVE_STATS = ".kernelscope-panel .ks-stats table.ks-stats-table"
FINAL = ".kernelscope-final"
FINAL_STATS = f"{FINAL} table.ks-stats-table"
STATS_JS = """(selector) => {
  const out = {};
  const table = document.querySelector(selector);
  if (!table) return out;
  const heads = [...table.querySelectorAll('thead th')].map(th => th.innerText.trim());
  for (const tr of table.querySelectorAll('tbody tr')) {
    const c = [...tr.children].map(td => td.innerText.trim());
    out[c[0]] = Object.fromEntries(heads.slice(1).map((h, i) => [h, c[i + 1]]));
  }
  return out;
}"""
# plotly keeps a figure's traces on its div as `data` (typed arrays from the widget's buffers);
# kernelscope names each trace in `meta` ("ring:received", "perf:cpu1", ...)
PLOTS = ".kernelscope-panel .ks-plots.js-plotly-plot"
TRACE_LENGTHS_JS = """() => {
  const gd = document.querySelector('__PLOTS__');
  if (!gd || !gd.data) return {};
  return Object.fromEntries(gd.data.map(t => [t.meta, t.x ? t.x.length : 0]));
}""".replace("__PLOTS__", PLOTS)
LAST_X_JS = """(meta) => {
  const gd = document.querySelector('__PLOTS__');
  const t = gd && gd.data ? gd.data.find(t => t.meta === meta) : null;
  return t && t.x && t.x.length ? t.x[t.x.length - 1] : null;
}""".replace("__PLOTS__", PLOTS)
TITLES_JS = """() => {
  const gd = document.querySelector('__PLOTS__');
  return gd && gd.layout && gd.layout.annotations ? gd.layout.annotations.map(a => a.text) : [];
}""".replace("__PLOTS__", PLOTS)


# every axis's tick labels, by axis id ("y2" is the fill plot's): plotly draws them in g.<id>tick
TICKS_JS = """() => {
  const gd = document.querySelector('__PLOTS__');
  if (!gd || !gd._fullLayout) return {};
  const out = {};
  for (const k of Object.keys(gd._fullLayout).filter(k => /^[xy]axis\\d*$/.test(k))) {
    const id = gd._fullLayout[k]._id;
    out[id] = [...gd.querySelectorAll(`g.${id}tick text`)].map(t => t.textContent);
  }
  return out;
}""".replace("__PLOTS__", PLOTS)
# right edges (px) of the output area, the panel, the plots and their toolbar
EDGES_JS = """() => {
  const panel = document.querySelector('.kernelscope-panel');
  const bar = document.querySelector('__PLOTS__ .modebar');
  const right = e => e ? e.getBoundingClientRect().right : null;
  return {output: right(panel.closest('.jp-OutputArea-output')), panel: right(panel),
          plots: right(document.querySelector('__PLOTS__')), modebar: right(bar)};
}""".replace("__PLOTS__", PLOTS)


# the events area: the latest rows table (its header and rows) and the top-N table
EVENTS_JS = """() => {
  const rows = sel => [...document.querySelectorAll(`.kernelscope-panel .ks-events ${sel} tbody tr`)]
    .map(tr => [...tr.children].map(td => td.innerText.trim()));
  const head = [...document.querySelectorAll('.kernelscope-panel .ks-events .ks-events-rows thead th')]
    .map(th => th.innerText.trim());
  return {head, latest: rows('.ks-events-rows'), top: rows('.ks-events-topn')};
}"""
# the maps area: the chosen map's top-N table, one list of cell texts per row
MAPS_JS = """() => [...document.querySelectorAll('.kernelscope-panel .ks-maps .ks-maps-top tbody tr')]
  .map(tr => [...tr.children].map(td => td.innerText.trim()))"""


def _int(text: str) -> int:
    digits = re.sub(r"[^0-9]", "", text)
    return int(digits) if digits else 0


def stats(page: Any, selector: str = LIVE_STATS) -> dict[str, dict[str, Any]]:
    raw = page.evaluate(STATS_JS, selector)
    return {name: {k: (v if k in ("kind", "capacity") else _int(v)) for k, v in row.items()}
            for name, row in raw.items()}


def out_of_order(page: Any) -> dict[str, int]:
    """From the ordering plot's subplot titles: rows out of timestamp order, per map."""
    out = {}
    for title in page.evaluate(TITLES_JS):
        m = re.match(r"(\w+) \(\w+\): ([\d,]+) of the latest", title)
        if m:
            out[m.group(1)] = _int(m.group(2))
    return out


def until(page: Any, check: Any, what: str, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
    """The stats table, once `check(stats)` holds."""
    def ready() -> dict[str, dict[str, Any]] | None:
        s = stats(page)
        return s if set(s) == {"ring", "perf"} and check(s) else None

    return wait_for(ready, timeout=timeout, interval=0.25, what=what)


def choose(page: Any, control: str, label: str) -> None:
    page.select_option(f".kernelscope-panel .{control} select", label=label)


def shot(page: Any, name: str, selector: str = ".kernelscope-panel") -> Path:
    """The panel as the user sees it (a clip of the page: the panel never stops moving)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.eval_on_selector(selector, "e => e.scrollIntoView({block: 'start'})")
    box = page.locator(selector).bounding_box()
    viewport = page.viewport_size
    clip = {"x": max(box["x"], 0), "y": max(box["y"], 0), "width": min(box["width"], viewport["width"]),
            "height": min(box["height"], viewport["height"] - max(box["y"], 0))}
    page.screenshot(path=str(path), clip=clip)
    return path


# --- the test -----------------------------------------------------------------------------------

def test_widget_demo_in_jupyterlab(lab: Lab) -> None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the Python package `playwright` is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")

    (ARTIFACTS / "browser-failure.png").unlink(missing_ok=True)
    t0 = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1500})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            _drive(page, lab)
        except BaseException:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "browser-failure.png"), full_page=True)
            print("browser console errors:", *errors[:20], sep="\n  ")
            raise
        finally:
            browser.close()
    assert time.monotonic() - t0 < 180


def _drive(page: Any, lab: Lab) -> None:
    t0 = time.monotonic()

    def step(what: str) -> None:  # progress in the test's output (pytest -s, or on failure)
        print(f"[{time.monotonic() - t0:5.1f} s] {what}", flush=True)

    step("open the notebook")
    page.goto(f"{lab.url}/lab/tree/{NOTEBOOK.name}?token={lab.token}")
    page.wait_for_function(
        "() => window.jupyterapp?.shell?.currentWidget?.context?.sessionContext?.session?.kernel",
        timeout=60_000)
    step("kernel up; run all cells")
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    page.wait_for_selector(PLOTS, timeout=90_000)

    step("panel shown")
    # the live plots follow the stream: the rates plot gains points, received keeps rising
    before = until(page, lambda s: all(m["received"] for m in s.values()), "events in the panel's stats")
    x0 = page.evaluate(LAST_X_JS, "ring:received") or 0.0
    wait_for(lambda: (page.evaluate(LAST_X_JS, "ring:received") or 0.0) > x0 + 1.0, timeout=30,
             interval=0.25, what="the rates plot to move on by a second")
    until(page, lambda s: s["ring"]["received"] > before["ring"]["received"] + 10_000, "more events received")
    lengths = page.evaluate(TRACE_LENGTHS_JS)
    assert lengths.get("ring:all", 0) > 0, lengths
    assert lengths.get("perf:cpu0", 0) + lengths.get("perf:cpu1", 0) > 0, lengths

    step("plots move")
    # the maps area: the program's `calls` map, one row per load generator, counting on
    assert page.eval_on_selector(".kernelscope-panel .ks-maps-choose select", "e => e.value") == "calls"

    def top_calls() -> list[int] | None:
        rows = page.evaluate(MAPS_JS)
        return [_int(r[1]) for r in rows] if len(rows) == 2 and all(_int(r[1]) for r in rows) else None

    calls = wait_for(top_calls, timeout=20, interval=0.25, what="two load generators in the maps table")
    assert calls == sorted(calls, reverse=True)  # ranked by the count
    wait_for(lambda: sum(top_calls() or [0]) > sum(calls), timeout=20, interval=0.25,
             what="the maps table to follow the counts")
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator(".kernelscope-panel .ks-maps").screenshot(path=str(ARTIFACTS / "panel-maps.png"))
    # perf buffers: CPUs interleave out of timestamp order; the ring keeps reservation order
    def perf_out_of_order() -> dict[str, int] | None:
        o = out_of_order(page)
        return o if o.get("perf", 0) > 0 else None

    order = wait_for(perf_out_of_order, timeout=20, interval=0.25, what="perf events out of order")
    assert order["ring"] < order["perf"], order
    s = stats(page)
    assert s["perf"]["inversions"] > max(10 * s["ring"]["inversions"], 100), s
    # readable ticks at any scale: no axis repeats a label ("0%, 0%, 0%" below 1 % fill)
    ticks = page.evaluate(TICKS_JS)
    assert ticks.get("y2"), ticks  # the fill plot's axis is drawn
    for axis, labels in ticks.items():
        assert len(labels) == len(set(labels)), (axis, labels)
    assert all(t.endswith("%") for t in ticks["y2"]), ticks["y2"]
    # the plots fit the panel and the panel its output area: the toolbar is not clipped
    edges = page.evaluate(EDGES_JS)
    assert edges["modebar"] is not None, edges
    assert edges["modebar"] <= edges["plots"] <= edges["panel"] + 1 <= edges["output"] + 2, edges
    shot(page, "panel-live.png")

    step("ordering seen")
    # shrink the ring buffer from the panel: the program reloads with 1 page and drops rise
    choose(page, "ks-pages-ring", page_choices(64, "ringbuf")[0][0])
    s = until(page, lambda s: s["ring"]["pages"] == 1 and s["ring"]["reloads"] == 1,
              "the ring buffer reloaded with 1 page")
    assert s["ring"]["capacity"] == "4 KiB"
    until(page, lambda t: t["ring"]["dropped"] > s["ring"]["dropped"] + 5_000, "ring buffer drops to rise")
    wait_for(lambda: page.evaluate(LAST_X_JS, "ring:dropped"), timeout=10, interval=0.25)
    shot(page, "panel-shrunk.png")

    step("drops seen with 1 page")
    # grow it again: another reload, and the drops stop
    choose(page, "ks-pages-ring", next(label for label, n in page_choices(1, "ringbuf") if n == 64))
    s = until(page, lambda s: s["ring"]["pages"] == 64 and s["ring"]["reloads"] == 2,
              "the ring buffer reloaded with 64 pages")
    assert s["ring"]["capacity"] == "256 KiB"
    first = until(page, lambda t: t["ring"]["received"] > s["ring"]["received"] + 10_000,
                  "events after the reload")
    later = until(page, lambda t: t["ring"]["received"] > first["ring"]["received"] + 40_000,
                  "more events with the big ring")
    drops = later["ring"]["dropped"] - first["ring"]["dropped"]
    received = later["ring"]["received"] - first["ring"]["received"]
    assert drops < 0.01 * received, (drops, received)

    step("no drops with 64 pages")
    # the reorder window: both maps come out in timestamp order
    choose(page, "ks-reorder", "10 ms")
    until(page, lambda t: t["ring"]["reloads"] == 3, "the reload for the reorder window")
    wait_for(lambda: out_of_order(page) == {"ring": 0, "perf": 0}, timeout=30, interval=0.25,
             what="no events out of order with the reorder window on")
    step("sorted with the reorder window")
    shot(page, "panel-reordered.png")
    page.screenshot(path=str(ARTIFACTS / "notebook.png"), full_page=True)
    live = stats(page)

    _events_and_capture(page, step)
    _saved_and_reopened(page, lab, live, step)
    _example_inserted_and_run(page, step)


def _message(page: Any) -> str:
    return page.inner_text(".kernelscope-panel .ks-message")


def _events_and_capture(page: Any, step: Any) -> None:
    """The events area follows the stream; paused, the save-capture button writes a capture
    beside the notebook that replays with the rows the probe had."""
    def latest_seq() -> int:
        cells = page.evaluate(EVENTS_JS)
        return _int(cells["latest"][-1][cells["head"].index("ks_seq")]) if cells["latest"] else -1

    cells = wait_for(lambda: (c := page.evaluate(EVENTS_JS))["latest"] and c, timeout=10, interval=0.25,
                     what="the latest rows in the events area")
    assert len(cells["latest"]) == 10, cells
    seq = latest_seq()
    wait_for(lambda: latest_seq() > seq, timeout=10, interval=0.25,
             what="the latest rows to follow the stream")
    assert "pid" in cells["head"], cells["head"]
    top = cells["top"]  # the ring's top pids: the two load generators
    assert len(top) == 2, top
    assert all(_int(r[1]) for r in top), top
    page.locator(".kernelscope-panel .ks-events").screenshot(path=str(ARTIFACTS / "panel-events.png"))
    page.click(".kernelscope-panel button.ks-pause")
    page.wait_for_function("() => document.querySelector('.kernelscope-panel .ks-state')?.innerText"
                           " === 'paused'", timeout=10_000)
    paused_stats = stats(page)
    page.click(".kernelscope-panel button.ks-export-capture")

    def said() -> str | None:
        text = _message(page)
        return text if text.startswith(("saved capture", "save capture:")) else None  # done, or its error

    text = wait_for(said, timeout=60, interval=0.25, what="the save-capture message")
    m = re.search(r"saved capture (\S+\.capture\.parquet) \(ring: ([\d,]+) rows, perf: ([\d,]+) rows\)",
                  text)
    assert m, text
    path, rows = Path(m.group(1)), {"ring": _int(m.group(2)), "perf": _int(m.group(3))}
    assert path.parent.name == "root", path  # beside the notebook
    assert path.is_file(), path
    assert re.fullmatch(r"demo-\d{8}-\d{6}\.capture\.parquet", path.name), path.name
    shot(page, "panel-export.png")
    step(f"capture saved: {path.name}")
    from kernelscope.captures.replay import replay

    again = replay(path, speed=None).start()
    again.wait()
    for name in ("ring", "perf"):
        got = len(again.frame(name))
        assert got == rows[name], (name, got, rows)  # every row the probe had
        assert again.stats[name]["received"] == paused_stats[name]["received"], (again.stats, paused_stats)
        if paused_stats[name]["received"] <= 1_000_000:  # the notebook's max_rows: nothing evicted
            assert got == paused_stats[name]["received"], (name, got, paused_stats)
    step("the capture replays with every row")


# a new code cell at the end of the notebook, with `source`, run
RUN_NEW_CELL_JS = """async (source) => {
  const app = window.jupyterapp;
  const nb = app.shell.currentWidget.content;
  nb.activeCellIndex = nb.widgets.length - 1;
  await app.commands.execute('notebook:insert-cell-below');
  nb.activeCell.model.sharedModel.setSource(source);
  await app.commands.execute('notebook:run-cell');
}"""
KERNEL_IDLE_JS = """() => {
  const k = window.jupyterapp?.shell?.currentWidget?.context?.sessionContext?.session?.kernel;
  return k && k.connectionStatus === 'connected' && k.status === 'idle';
}"""
ACTIVE = ".jp-Notebook .jp-Cell.jp-mod-active"


def _open(page: Any, lab: Lab) -> None:
    """The notebook in a fresh page, once its kernel (running on, or new) is idle."""
    page.goto(f"{lab.url}/lab/tree/{NOTEBOOK.name}?token={lab.token}")
    page.wait_for_selector(FINAL, timeout=60_000)
    page.wait_for_function(KERNEL_IDLE_JS, timeout=60_000)


def _reattached(page: Any, lab: Lab, final: dict[str, dict[str, Any]], step: Any) -> None:
    """Reopened while the kernel still holds the probe: the saved final rendering names the call
    that shows the panel again, and that call, run in a new cell, does (the same final counts:
    the stop button closed the probe)."""
    _open(page, lab)
    hint = page.inner_text(f"{FINAL} .ks-reattach")
    call = "from kernelscope.jupyter.widgets import panel; panel(probe)"
    assert call in hint, hint
    page.evaluate(RUN_NEW_CELL_JS, call)
    page.wait_for_selector(f"{ACTIVE} {FINAL_STATS}", timeout=30_000)
    assert stats(page, f"{ACTIVE} {FINAL_STATS}") == final
    shot(page, "panel-reattached.png", f"{ACTIVE} {FINAL}")
    # leave the file as saved: the cell goes again
    page.evaluate("""async () => {
      await window.jupyterapp.commands.execute('notebook:delete-cell');
      await window.jupyterapp.shell.currentWidget.context.save();
    }""")
    step("reopened with the kernel up: panel(probe) shows the panel again")


def _example_inserted_and_run(page: Any, step: Any) -> None:
    """`%bpf_examples opens` puts the example's cell below; run, it traces opens on this kernel."""
    page.evaluate(RUN_NEW_CELL_JS, "%load_ext kernelscope\n%bpf_examples opens")
    find = """() => {
      const nb = window.jupyterapp.shell.currentWidget.content;
      const i = nb.widgets.findIndex(c => c.model.sharedModel.getSource().startsWith('%%bpf opens'));
      if (i >= 0) nb.activeCellIndex = i;
      return i;
    }"""
    wait_for(lambda: page.evaluate(find) >= 0, timeout=30, interval=0.25, what="the example's cell inserted")
    assert "example opens is in the next cell" in page.inner_text(".jp-Notebook")
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-cell')")

    def events() -> int | None:
        el = page.query_selector(f"{ACTIVE} .jp-OutputArea-output")
        m = re.search(r"opens: running \d+ s \| ([\d,]+) events", el.inner_text()) if el else None
        return _int(m.group(1)) if m and _int(m.group(1)) else None

    n = wait_for(events, timeout=60, interval=0.25, what="the example's status line to count opens")
    step(f"example cell inserted and run: {n} opens")
    page.eval_on_selector(ACTIVE, "e => e.scrollIntoView({block: 'end'})")
    page.screenshot(path=str(ARTIFACTS / "examples-inserted.png"))


def _saved_and_reopened(page: Any, lab: Lab, live: dict[str, dict[str, Any]], step: Any) -> None:
    """Stop from the panel, save, shut the kernel down, open again: the final panel stays."""
    page.click(".kernelscope-panel button.ks-stop")
    # the PNG comes from kaleido's own Chromium: seconds on a busy machine
    page.wait_for_selector(f"{FINAL} img", timeout=90_000)
    final = stats(page, FINAL_STATS)
    assert set(final) == {"ring", "perf"}, final
    for name, row in final.items():
        assert row["received"] >= live[name]["received"], (final, live)  # the end, not display time
        assert row["attempted"] == row["received"] + row["dropped"], row  # stopped: exact counts
    header = page.inner_text(f"{FINAL} .ks-header")
    assert "closed" in header, header
    assert page.query_selector(PLOTS) is None  # the widget is gone from the output
    shot(page, "panel-final.png", FINAL)
    tops = page.query_selector_all(f"{FINAL} .ks-events-topn tbody tr")
    assert len(tops) == 2, [t.inner_text() for t in tops]  # the events area, kept in the final state
    step("final panel after the stop button")

    page.evaluate("() => window.jupyterapp.shell.currentWidget.context.save()")
    saved = lab.api(f"/api/contents/{NOTEBOOK.name}?content=1")["content"]
    outputs = [o for c in saved["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    (panel_out,) = [o for o in outputs if "kernelscope-final" in o.get("data", {}).get("text/html", "")]
    assert set(panel_out["data"]) == {"text/html", "text/plain"}, list(panel_out["data"])
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    assert f"<td>{final['ring']['received']:,}</td>" in panel_out["data"]["text/html"]
    assert "data:image/png;base64," in panel_out["data"]["text/html"]
    step("saved: the final panel is in the file, no widget")
    _reattached(page, lab, final, step)
    page.evaluate("() => window.jupyterapp.shell.currentWidget.context.sessionContext.shutdown()")

    # opened again in a new page: a new kernel has run nothing, the output is the file's
    _open(page, lab)
    assert stats(page, FINAL_STATS) == final
    text = page.inner_text(".jp-Notebook")
    assert "Error displaying widget" not in text
    assert "model not found" not in text
    img = page.query_selector(f"{FINAL} img")
    assert img is not None
    assert img.evaluate("e => e.complete && e.naturalWidth") > 0  # the PNG decodes in the page
    shot(page, "panel-saved-reopened.png", FINAL)
    step("reopened: the saved final panel shows, plots and all")
