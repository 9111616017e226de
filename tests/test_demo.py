"""`kernelscope demo`: the real demo's report (program, host, accounting, plots, names) and its capture.

The kernel tests run the demo once, for about 1.5 s into a temporary folder, and read what it
wrote; the others check its pieces and its refusals without BPF.
"""

from __future__ import annotations

import contextlib
import html
import io
import os
import platform
import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from kernelscope import demo, sources
from kernelscope.errors import SettingError

ROW = re.compile(r"<tr data-map='([^']+)' data-attempted='(\d+)' data-received='(\d+)' "
                 r"data-dropped='(\d+)' data-holds='([01])'>")


def _text(fragment: str) -> str:
    """What a browser shows of an HTML fragment: tags removed, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def _section(page: str, tag: str, ident: str) -> str:
    m = re.search(rf"<{tag} id='{ident}'>(.*?)</{tag}>", page, re.S)
    assert m, f"no <{tag} id='{ident}'> in the report"
    return m.group(1)


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("demo")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        df, stats = demo.run(1.5, folder / "report.html")
    return {"folder": folder, "df": df, "stats": stats, "printed": out.getvalue(),
            "page": (folder / "report.html").read_text()}


@pytest.mark.kernel
def test_report_shows_program_host_and_kernel(ran: dict[str, Any]) -> None:
    page = ran["page"]
    shown = _text(_section(page, "div", "ks-source"))
    for line in sources.read("exec_exit_openat.c").splitlines():
        assert line.strip() in shown, f"program line missing from the report: {line!r}"
    assert "<span style=" in _section(page, "div", "ks-source")  # highlighted, not only a <pre>
    facts = _text(_section(page, "table", "ks-host"))
    assert platform.release() == os.uname().release
    assert f"kernel release{os.uname().release}" in facts
    assert f"hostname{os.uname().nodename}" in facts
    assert f"CPUs{os.cpu_count()}" in facts
    assert platform.python_version() in facts
    assert "kernel headers" in facts
    assert "BCC0." in facts  # Debian's python3-bpfcc: 0.26


@pytest.mark.kernel
def test_report_states_and_checks_each_maps_accounting(ran: dict[str, Any]) -> None:
    rows = {m: tuple(map(int, rest)) for m, *rest in ROW.findall(ran["page"])}
    assert set(rows) == set(ran["stats"]) == {"events"}
    for name, (attempted, received, dropped, holds) in rows.items():
        st = ran["stats"][name]
        assert (attempted, received, dropped) == (st["attempted"], st["received"], st["dropped"])
        assert attempted == received + dropped
        assert holds == 1
        assert received == len(ran["df"]) > 0
        assert f"holds: {attempted:,} = {received:,} + {dropped:,}" in ran["page"]
        assert f"{name}: attempted {attempted:,} = received {received:,} + dropped {dropped:,}: holds" \
            in ran["printed"]


@pytest.mark.kernel
def test_report_has_rate_and_latency_plots_offline(ran: dict[str, Any]) -> None:
    page = ran["page"]
    for div in ("ks-rate-plot", "ks-latency-plot"):
        assert re.search(rf'Plotly\.newPlot\(\s*"{div}"', page), f"plot {div} is not drawn"
    assert '"name":"exec received"' in page
    assert '"name":"dropped"' in page
    assert "ks_arrival_ns - ts" in page
    assert "<script src=" not in page  # nothing to fetch: opens offline
    assert "<link" not in page
    assert page.count("plotly.js v") >= 1  # the library itself is inlined
    lat = demo.latencies_us(ran["df"])
    assert (lat["latency_us"] > 0).all()  # read after it happened, on the one clock
    assert f"<td class='l'>all</td><td>{len(ran['df']):,}</td>" in page  # the latency table's total row


@pytest.mark.kernel
def test_report_and_printed_table_name_the_kinds(ran: dict[str, Any]) -> None:
    page, df = ran["page"], ran["df"]
    assert set(df["kind"]) == {0, 1, 2}  # the demo's own processes exec, open files and exit
    assert "<th>exec</th><th>exit</th><th>openat</th>" in page
    latest = page.split("<h2>The latest events</h2>")[1]
    kinds = re.findall(r"<td>(exec|exit|openat|\d+)</td></tr>", latest.split("</table>")[0])
    assert kinds, "the latest-events table has no kind column"
    assert set(kinds) <= {"exec", "exit", "openat"}
    header = next(line for line in ran["printed"].splitlines() if "openat" in line and "total" in line)
    assert header.split() == ["exec", "exit", "openat", "total"]
    by_kind = next(line for line in ran["printed"].splitlines() if line.startswith("events by kind:"))
    for name, code in (("exec", 0), ("exit", 1), ("openat", 2)):
        assert f"{name} {int((df['kind'] == code).sum()):,}" in by_kind


@pytest.mark.kernel
def test_capture_beside_the_report_replays_with_the_lines_it_names(
        ran: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    folder: Path = ran["folder"]
    assert (folder / "capture.parquet").is_file()
    code = html.unescape(_section(ran["page"], "pre", "ks-replay"))
    assert "'capture.parquet'" in code  # named as it sits beside the report
    assert textwrap.indent(code, "    ").rstrip("\n") in ran["printed"]  # the same lines on the terminal
    monkeypatch.chdir(folder)
    ns: dict[str, Any] = {}
    exec(compile(code, "report-replay", "exec"), ns)
    st = ran["stats"]["events"]
    assert len(ns["df"]) == st["received"]
    assert (ns["stats"]["attempted"], ns["stats"]["dropped"]) == (st["attempted"], st["dropped"])
    assert list(ns["df"]["pid"]) == list(ran["df"]["pid"])
    counts = ns["df"]["kind"].map(demo.KINDS).value_counts()
    assert set(counts.index) == {"exec", "exit", "openat"}
    ns["r"].close()


# --- without BPF ------------------------------------------------------------------------------

def test_unknown_kind_codes_are_named_not_dropped() -> None:
    df = pd.DataFrame({"comm": ["a", "a", "b"], "kind": [0, 7, 2]})
    table = demo.summarize(df)
    assert list(table.columns) == ["exec", "exit", "openat", "kind 7", "total"]
    assert table.loc["a", "kind 7"] == 1
    assert table["total"].sum() == 3


def test_latency_is_arrival_minus_timestamp_on_one_clock() -> None:
    df = pd.DataFrame({"kind": [0, 2, 1], "ts": np.array([1_000, 1_000, 10**12], np.uint64),
                       "ks_arrival_ns": np.array([2_000, 5_500, 10**12 + 250_000], np.int64)})
    lat = demo.latencies_us(df)
    assert list(lat["kind"]) == ["exec", "openat", "exit"]
    assert list(lat["latency_us"]) == [1.0, 4.5, 250.0]
    table = demo.latency_table(lat)
    assert list(table.index) == ["exec", "exit", "openat", "all"]
    assert table.loc["all", "max_us"] == 250.0


def test_run_refuses_a_duration_that_is_not_positive() -> None:
    with pytest.raises(SettingError, match="seconds must be a positive number"):
        demo.run(-1, None)


def test_a_failing_invariant_is_reported_not_hidden() -> None:
    rows = demo.accounting({"events": {"kind": "ring", "attempted": 10, "received": 7, "dropped": 2}})
    assert rows[0]["holds"] is False
    shown = demo.accounting_html(rows)
    assert "does not hold" in shown
    assert "off by 1" in shown
    assert "data-holds='0'" in shown


@pytest.mark.parametrize(("argv", "says"), [
    (["--seconds", "0"], "--seconds must be a positive number"),
    (["--seconds", "nan"], "--seconds must be a positive number"),
    (["-o", "/nonexistent-folder/report.html"], "the folder /nonexistent-folder does not exist"),
    (["--capture", "out.csv"], "ends in .parquet"),
])
def test_bad_options_are_refused_before_loading(
        argv: list[str], says: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written
