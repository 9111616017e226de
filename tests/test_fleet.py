"""kernelscope.fleet on a LocalCluster: two worker processes stand for two hosts.

Each worker names its host (KERNELSCOPE_FLEET_HOST, set in the worker by `_name_host`) and
runs its own producer with a known count; each host's probe filters on its producer's pid,
so the two probes (on one real kernel) do not see each other's events. The cluster starts
once for the module; the test that kills a worker runs last.
"""

from __future__ import annotations

import ast
import html
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.dataframe as dd
import distributed
import pandas as pd
import producers
import pytest
from shell import ipython_shell
from util import wait_for

from kernelscope.errors import CaptureMissingError
from kernelscope.fleet import Fleet, FleetError, FleetProbe, read_dataset, replay
from kernelscope.fleet.dataset import parts
from kernelscope.fleet.panel import FleetPanel
from kernelscope.fleet.worker import HOST_ENV

COUNTS = {"host0": 3000, "host1": 5000}
_producers: dict[int, producers.Producer] = {}  # in each worker process: its paused producers


# --- run in the worker processes (by reference: this module is importable there) -------------

def _name_host(dask_worker: Any) -> str:
    os.environ[HOST_ENV] = f"host{dask_worker.name}"
    return os.environ[HOST_ENV]


def _spawn(count: int) -> int:
    p = producers.paused(count)
    _producers[p.pid] = p
    return p.pid


def _go(pid: int) -> bool:
    _producers.pop(pid).go()
    return True


# --- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                       dashboard_address=None, worker_dashboard_address=None)
    c = distributed.Client(cluster)
    try:
        assert sorted(c.run(_name_host).values()) == ["host0", "host1"]
        yield c
    finally:
        c.close()
        cluster.close()


@pytest.fixture(scope="module")
def fleet(client: Any) -> Fleet:
    return Fleet(client)


def spawn(fleet: Fleet, counts: dict[str, int]) -> dict[str, int]:
    """A paused producer on each named host: host -> its pid."""
    workers = fleet.workers()
    return {h: fleet.client.run(_spawn, n, workers=workers[h][:1])[workers[h][0]] for h, n in counts.items()}


def go(fleet: Fleet, pids: dict[str, int]) -> None:
    workers = fleet.workers()
    for h, pid in pids.items():
        fleet.client.run(_go, pid, workers=workers[h][:1])


def targets(pids: dict[str, int]) -> dict[str, dict[str, Any]]:
    return {h: {"cflags": [f"-DTARGET={pid}"]} for h, pid in pids.items()}


class Recorder:
    """Stands in for IPython's DisplayHandle: keeps what the panel puts in its output."""

    def __init__(self) -> None:
        self.bundles: list[dict[str, Any]] = []

    def update(self, obj: Any, **kwargs: Any) -> None:
        self.bundles.append(obj)


def shown(view: FleetPanel) -> Recorder:
    """As if `view` were displayed live (the output: a Recorder)."""
    view._handle, view.shown = Recorder(), "live"
    return view._handle


Run = tuple[FleetProbe, dict[str, int], Path, FleetPanel, Recorder]


@pytest.fixture(scope="module")
def run(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Both hosts' producers run to the end under one live fleet probe (its live panel shown
    and redrawing), stopped and saved."""
    pids = spawn(fleet, COUNTS)
    fp = fleet.probe(producers.ring_program(), host_args=targets(pids), live=True, interval=0.05,
                     max_rows_per_pull=1000)
    view = fp.panel(static="html")  # redrawn every REFRESH_INTERVAL while the producers run
    output = shown(view)
    view.start()
    go(fleet, pids)
    fp.stop()
    root = tmp_path_factory.mktemp("fleet") / "run"
    fp.save(str(root))
    yield fp, pids, root, view, output
    fp.close()


# --- one run on two hosts ------------------------------------------------------------------

@pytest.mark.kernel
def test_gathered_frame_has_each_hosts_rows_exactly(run: Run) -> None:
    fp, pids, *_ = run
    assert fp.errors == {}
    df = fp.df
    assert df.columns[0] == "host"
    assert df.groupby("host").size().to_dict() == COUNTS
    for host, pid in pids.items():
        mine = df[df.host == host]
        assert set(mine.pid) == {pid}  # each probe saw only its own host's producer
        assert mine.ks_seq.tolist() == list(range(COUNTS[host]))  # pulled in pieces: none twice, none lost
    assert fp.pulled_rows == sum(COUNTS.values())


@pytest.mark.kernel
def test_accounting_per_host_and_in_total(run: Run) -> None:
    fp, *_ = run
    for host, n in COUNTS.items():
        st = fp.stats[host]["events"]
        assert st["attempted"] == st["received"] + st["dropped"]
        assert st["received"] == n
    total = fp.total["events"]
    assert total["attempted"] == total["received"] + total["dropped"]
    assert total["received"] == sum(COUNTS.values())
    table = fp.table()
    assert table.host.tolist() == ["host0", "host1", "all (2)"]
    assert table.received.tolist() == [*COUNTS.values(), sum(COUNTS.values())]
    assert set(table.state) == {"stopped"}
    hist = fp.history()  # per-host lines: each host's counts at each pull
    assert hist.groupby("host").received.last().to_dict() == COUNTS
    assert (hist.groupby("host").received.diff().dropna() >= 0).all()
    legend = [t.name for t in fp.figure().data if t.showlegend is not False]
    assert legend == ["host0", "host1"]


@pytest.mark.kernel
def test_live_panel_draws_a_line_per_host_then_the_final_state_in_its_output(run: Run) -> None:
    fp, _, _, view, output = run
    wait_for(lambda: not view.updating)  # the probe stopped: the panel's redraws ended
    lines = {t.meta: t for t in view.figure.data}
    for kind in ("rate", "received", "dropped"):  # one trace per host and line
        assert sorted(m for m in lines if m.startswith(f"{kind}:")) == [f"{kind}:{h}:events" for h in COUNTS]
    for host, n in COUNTS.items():
        assert lines[f"received:{host}:events"].y[-1] == n  # the final counts, drawn
        assert lines[f"dropped:{host}:events"].y[-1] == fp.stats[host]["events"]["dropped"]
        assert lines[f"rate:{host}:events"].name == host  # the legend names the host
    assert len({lines[f"rate:{h}:events"].line.color for h in COUNTS}) == 2  # a colour per host
    final = output.bundles[-1]  # the live view replaced, in the same output, by the final state
    assert view.shown == "final"
    assert set(final) == {"text/html", "text/plain"}  # no widget in the bundle
    page = final["text/html"]
    for host, n in [*COUNTS.items(), ("all (2)", sum(COUNTS.values()))]:
        assert f"<td>{host}</td>" in page
        assert f"<td>{n}</td>" in page
    assert "stopped</span> on 2 hosts" in page
    assert "Plotly.newPlot" in page  # static="html": the lines drawn without a widget
    assert len(output.bundles) == 1  # save()'s stop again: nothing new to show


@pytest.mark.kernel
def test_partitioned_capture_reads_back(run: Run) -> None:
    fp, pids, root, *_ = run
    assert sorted(p.parent.name for p in parts(root).values()) == ["host=host0", "host=host1"]
    raw = dd.read_parquet(str(root)).compute()  # the capture rows, `host` from the folder names
    events = raw[raw["map"] == "events"]
    assert events.groupby("host", observed=True).size().to_dict() == COUNTS
    one = replay(root, "host1")
    pulled = fp.df[fp.df.host == "host1"].drop(columns="host").reset_index(drop=True)
    pd.testing.assert_frame_equal(pulled, one.df)  # decoded here as the host's own probe frames it
    assert one.stats["events"]["received"] == COUNTS["host1"]
    everything = replay(root)
    assert everything.df.groupby("host").size().to_dict() == COUNTS
    assert everything.total["events"]["received"] == sum(COUNTS.values())
    decoded = read_dataset(root).compute()
    assert {h: set(decoded[decoded.host == h].pid) for h in COUNTS} == {h: {pid} for h, pid in pids.items()}


# --- more runs -----------------------------------------------------------------------------

@pytest.mark.kernel
def test_a_host_that_fails_to_load_is_named_and_the_other_pulls_in_bounded_pieces(fleet: Fleet) -> None:
    pids = spawn(fleet, {"host0": 1200})
    args = {**targets(pids), "host1": {"cflags": ["-DTARGET=no_such_name"]}}
    fp = fleet.probe(producers.ring_program(), host_args=args)  # not live: pulled when asked
    view = fp.panel(static="none")
    output = shown(view)
    try:
        assert list(fp.errors) == ["host1"]
        assert view.tick()  # running: a redraw, the counts pulled (not live)
        assert "<td>host1</td>" in view.table.value
        assert f"&#10007; host1: {html.escape(fp.errors['host1'])}</p>" in view.table.value
        assert [t.meta for t in view.figure.data if t.meta.startswith("rate:")] == ["rate:host0:events"]
        view._on_exit({"new": True})  # kernel shutdown: the table as it stands, no plots
        assert "kernel shut down" in output.bundles[-1]["text/html"]
        assert "<td>running</td>" in output.bundles[-1]["text/html"]
        assert "CompileError" in fp.errors["host1"]
        assert "no_such_name" in fp.errors["host1"]
        assert fp.hosts == ["host0"]
        go(fleet, pids)
        wait_for(lambda: fp.poll_once(limit=0) == 0 and fp.stats["host0"]["events"]["received"] == 1200)
        assert [fp.poll_once(limit=500) for _ in range(4)] == [500, 500, 200, 0]
        assert fp.df.ks_seq.tolist() == list(range(1200))
        fp.stop()
        assert len(fp.df) == 1200
        assert fp.table().host.tolist() == ["host0", "host1", "all (1)"]
        page = output.bundles[-1]["text/html"]
        assert "<td>error</td>" in page
        assert "no_such_name" in page
        assert "<td>all (1)</td>" in page
        assert "1 in error" in page
        assert not view.tick()  # stopped: nothing left to follow
    finally:
        fp.close()


@pytest.mark.kernel
def test_no_host_loading_is_an_error_naming_each(fleet: Fleet) -> None:
    with pytest.raises(FleetError, match=r"(?s)host0: CompileError.*host1: CompileError"):
        fleet.probe("this is not C;")


@pytest.mark.kernel
def test_doctor_runs_on_each_host(fleet: Fleet) -> None:
    report = fleet.doctor()
    assert report.errors == {}
    assert sorted(report.tables) == ["host0", "host1"]
    for table in report.tables.values():
        assert table.set_index("check").loc["privileges", "status"] == "ok"
    assert report.ok == {"host0": True, "host1": True}
    assert "== host1" in str(report)
    assert "<h4>host0: basics work</h4>" in report._repr_html_()


@pytest.mark.kernel
def test_magic_fleet_flag_starts_the_cell_on_every_host(client: Any) -> None:
    prod = producers.paused(700)  # on the one real host: both "hosts" see it
    for sh in ipython_shell():
        sh.user_ns.update(client=client, pid=prod.pid)
        sh.run_cell("%%bpf fp --fleet client -DTARGET={pid}\n" + producers.ring_program())
        fp = sh.user_ns["fp"]
        assert isinstance(fp, FleetProbe)
        view = fp.panel()
        assert view.shown == "live"  # the cell did not block: it showed the live panel
        view.static = "none"  # no PNG drawn for this test
        prod.go()
        fp.stop()
        assert view.shown == "final"
        assert fp.df.groupby("host").size().to_dict() == {"host0": 700, "host1": 700}
        with pytest.raises(Exception, match="no variable 'nobody'"):
            sh.run_cell("%%bpf fp --fleet nobody\n" + producers.ring_program())
        fp.close()


def test_hosts_and_host_args_must_name_hosts_of_the_cluster(fleet: Fleet) -> None:
    with pytest.raises(KeyError, match="no worker on host 'nope'; the cluster's hosts are host0, host1"):
        fleet.probe(producers.ring_program(), hosts=["host0", "nope"])
    with pytest.raises(KeyError, match="host_args names 'host1', which run no probe here"):
        fleet.probe(producers.ring_program(), hosts=["host0"], host_args={"host1": {}})


@pytest.mark.kernel
def test_a_killed_worker_is_reported_and_the_other_hosts_data_kept(fleet: Fleet) -> None:
    """Last in the module: the nanny restarts the killed worker without its host name."""
    pids = spawn(fleet, {"host0": 2000, "host1": 2000})
    fp = fleet.probe(producers.ring_program(), host_args=targets(pids), live=True, interval=0.05)
    try:
        victim = fp.workers["host1"]
        go(fleet, {"host0": pids["host0"]})
        os.kill(fleet.client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
        fp.stop()
        assert list(fp.errors) == ["host1"]
        assert victim in fp.errors["host1"]
        assert fp.df[fp.df.host == "host0"].ks_seq.tolist() == list(range(2000))
        st = fp.stats["host0"]["events"]
        assert st["attempted"] == st["received"] + st["dropped"]
        assert st["received"] == 2000
        assert fp.total["events"]["received"] == 2000  # the dead host's counts are not summed
        table = fp.table()
        assert table.set_index("host").loc["host1", "state"] == "error"
    finally:
        fp.close()


# --- no kernel -----------------------------------------------------------------------------

def test_fleet_needs_a_dask_client() -> None:
    with pytest.raises(TypeError, match=r"needs a distributed\.Client, not str"):
        Fleet("tcp://127.0.0.1:8786")


def test_core_imports_without_dask_and_fleet_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import kernelscope.fleet as package

    for path in Path(package.__file__).parent.glob("*.py"):  # dask only inside functions
        tree = ast.parse(path.read_text())
        top = [n.names[0].name if isinstance(n, ast.Import) else n.module or "" for n in tree.body
               if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not [m for m in top if m.split(".")[0] in ("dask", "distributed")], path.name
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r"pip install 'kernelscope\[fleet\]'"):
        Fleet(None)


def test_a_missing_fleet_capture_says_what_it_expected(tmp_path: Path) -> None:
    with pytest.raises(CaptureMissingError, match=r"host=NAME/capture\.parquet"):
        replay(tmp_path)
    (tmp_path / "host=a").mkdir()
    (tmp_path / "host=a" / "capture.parquet").write_bytes(b"")
    with pytest.raises(CaptureMissingError, match="no capture of host 'b'; it has a"):
        replay(tmp_path, "b")
