"""`%%bpf` cells highlighted as C in JupyterLab, by the prebuilt extension pip installs.

JupyterLab runs from this environment (where `pip install` put kernelscope's labextension in
share/jupyter/labextensions/kernelscope-highlight), Debian's Chromium opens a notebook with a
`%%bpf` cell of C and a Python cell using the same words, and the test reads CodeMirror's token
spans from the page: `struct` in the C cell carries the class CodeMirror gives keywords (the
class `return` gets in both cells), while in the Python cell, a plain name, it does not; `int`
is Python's builtin in the Python cell and not in the C cell. Editing a cell's first line
switches its language both ways. The screenshot goes to test-artifacts/highlight.png.

Needs: Debian's `chromium` and PyPI's `playwright`, as tests/test_browser.py does; no BPF.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import test_browser
from test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS, Lab, _missing
from util import wait_for

# test_browser's fixture: JupyterLab on a free port, serving tmp_path/root, its kernels shut down after
lab = test_browser.lab

EXTENSION = "kernelscope-highlight"
C_MIME = "text/x-csrc"
BPF_CELL = """%%bpf --name opens
struct event {
    u32 pid;
    int flags;
};
BPF_RINGBUF_OUTPUT(events, 16);

TRACEPOINT_PROBE(syscalls, sys_enter_openat) {
    struct event *e = events.ringbuf_reserve(sizeof(*e));
    if (!e)
        return 0;
    e->pid = bpf_get_current_pid_tgid() >> 32;
    e->flags = args->flags;
    events.ringbuf_submit(e, 0);
    return 0;
}"""
PY_CELL = """struct = int("3")
def f(x):
    return struct + x"""
NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": cid, "metadata": {}, "outputs": [],
               "source": src} for cid, src in (("bpf", BPF_CELL), ("py", PY_CELL))],
    "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                 "language_info": {"name": "python", "mimetype": "text/x-python",
                                   "codemirror_mode": {"name": "ipython", "version": 3}}},
    "nbformat": 4, "nbformat_minor": 5,
}

# per cell: its model's MIME type and, per word, the class of the innermost span holding exactly it
TOKENS_JS = """(words) => {
  const nb = window.jupyterapp.shell.currentWidget.content;
  return nb.widgets.map(cell => {
    const classes = {};
    for (const w of words) {
      const span = [...cell.node.querySelectorAll('.cm-content .cm-line span')]
        .find(s => s.textContent === w && s.children.length === 0);
      classes[w] = span ? span.className : null;
    }
    return {mime: cell.model.mimeType, classes};
  });
}"""
SET_SOURCE_JS = """([i, src]) => {
  window.jupyterapp.shell.currentWidget.content.widgets[i].model.sharedModel.setSource(src);
}"""
WORDS = ["struct", "return", "int"]


def test_labextension_installed_and_enabled() -> None:
    """`jupyter labextension list` shows the prebuilt extension, from this environment, enabled and OK."""
    out = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"], capture_output=True,
                         text=True, check=True, env={**os.environ, "NO_COLOR": "1"})
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    line = next((ln for ln in text.splitlines() if EXTENSION in ln), None)
    assert line is not None, f"{EXTENSION} is not installed:\n{text}"
    assert re.search(r"\benabled\b.*\bOK\b", line), line
    target = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / EXTENSION
    built = json.loads((target / "package.json").read_text())
    assert (target / built["jupyterlab"]["_build"]["load"]).is_file()


def _tokens(page: Any) -> list[dict[str, Any]]:
    return list(page.evaluate(TOKENS_JS, WORDS))


def test_bpf_cell_highlighted_as_c(lab: Lab, tmp_path: Path) -> None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the Python package `playwright` is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    (tmp_path / "root" / "highlight.ipynb").write_text(json.dumps(NOTEBOOK))

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        # the extension's own failures, and a shared module it was refused (a version mismatch)
        ours: list[str] = []
        page.on("console", lambda m: ours.append(m.text) if EXTENSION in m.text else None)
        page.on("pageerror", lambda e: ours.append(str(e)) if EXTENSION in str(e) else None)
        try:
            _drive(page, lab)
            assert not ours, ours
        except BaseException:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "highlight-failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def _drive(page: Any, server: Lab) -> None:
    page.goto(f"{server.url}/lab/tree/highlight.ipynb?token={server.token}")
    # once the kernel is up the notebook has set every cell's MIME type from its language again
    page.wait_for_function(
        "() => window.jupyterapp?.shell?.currentWidget?.context?.sessionContext?.session?.kernel"
        "?.info", timeout=60_000)

    def highlighted() -> list[dict[str, Any]] | None:
        cells = _tokens(page)
        done = len(cells) == 2 and all(c["classes"]["struct"] for c in cells[:1])
        return cells if done and all(c["classes"]["return"] for c in cells) else None

    bpf, py = wait_for(highlighted, timeout=30, interval=0.25, what="both cells' tokens highlighted")
    assert bpf["mime"] == C_MIME, bpf
    assert py["mime"] != C_MIME, py
    # the same keyword style in both cells: `return` is a keyword in C and in Python ...
    keyword = bpf["classes"]["return"]
    assert py["classes"]["return"] == keyword, (bpf, py)
    # ... `struct` is one in C only; `int` is Python's builtin, a C type (JupyterLab's theme
    # gives C type names no colour of their own, so the C cell's `int` is just not a builtin)
    assert bpf["classes"]["struct"] == keyword, bpf
    assert py["classes"]["struct"] != keyword, py
    assert py["classes"]["int"] == "cm-builtin", py
    assert bpf["classes"]["int"] != py["classes"]["int"], (bpf, py)
    ARTIFACTS.mkdir(exist_ok=True)
    top, bottom = (page.locator(".jp-Notebook .jp-Cell").nth(i).bounding_box() for i in (0, 1))
    page.screenshot(path=str(ARTIFACTS / "highlight.png"), clip={
        "x": top["x"], "y": top["y"], "width": top["width"],
        "height": bottom["y"] + bottom["height"] - top["y"]})

    # the first line decides, as it is edited: the Python cell becomes C, the C cell Python
    page.evaluate(SET_SOURCE_JS, [1, "%%bpftrace\n" + PY_CELL])
    page.evaluate(SET_SOURCE_JS, [0, BPF_CELL.replace("%%bpf", "%%bpf_not", 1)])
    wait_for(lambda: [c["mime"] for c in _tokens(page)] == [py["mime"], C_MIME], timeout=10, interval=0.25,
             what="the cells' languages to follow their first lines")
    wait_for(lambda: _tokens(page)[1]["classes"]["struct"] == keyword, timeout=10, interval=0.25,
             what="`struct` highlighted as a C keyword in the edited cell")
