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
from types import SimpleNamespace
from typing import Any

import dask.dataframe as dd
import distributed
import numpy as np
import pandas as pd
import producers
import pytest
from shell import ipython_shell
from util import wait_for

from kernelscope import spill
from kernelscope.errors import CaptureMissingError, SettingError
from kernelscope.fleet import Fleet, FleetError, FleetProbe, read_dataset, replay, worker
from kernelscope.fleet import fleet as fleet_mod
from kernelscope.fleet.cell import probe_args
from kernelscope.fleet.dataset import parts
from kernelscope.fleet.fleet import _run
from kernelscope.fleet.panel import FleetPanel
from kernelscope.fleet.worker import HOST_ENV, _new_rows
from kernelscope.readers.batch import Batch
from kernelscope.schema import Schema
from kernelscope.store import FrameStore

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


def _loaded() -> list[str]:
    """The fleet probes loaded in this worker process."""
    from kernelscope.fleet import worker

    return sorted(worker._probes)


def _break(name: str, error: str | None) -> bool:
    """Make kernelscope.fleet.worker.NAME raise RuntimeError(error) in this worker (None: undo)."""
    from kernelscope.fleet import worker

    saved = worker.__dict__.setdefault("_saved", {})
    if error is None:
        setattr(worker, name, saved.pop(name))
        return True
    saved[name] = getattr(worker, name)

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError(error)

    setattr(worker, name, broken)
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
    output = Recorder()
    view._handles.append(output)
    view.shown = "live"
    return output


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
    output, again = shown(view), shown(view)  # shown in two outputs
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
        assert fp.pulled_rows == 0  # limit=0 refreshed the stats and pulled nothing of the 1200
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
        assert again.bundles[-1] == output.bundles[-1]  # every output gets the final state
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
        assert fp.closed  # the cell ran again: its fleet probe went first, on every host
        assert not [a for a, keys in client.run(_loaded).items() if fp.key in keys]
        # a local cell becomes a fleet cell and back: each replaces the other
        sh.run_cell("%%bpf sw --quiet -DTARGET=1\n" + producers.ring_program())
        local = sh.user_ns["sw"]
        sh.run_cell("%%bpf sw --fleet client --quiet -DTARGET=1\n" + producers.ring_program())
        remote = sh.user_ns["sw"]
        assert isinstance(remote, FleetProbe)
        assert local.closed
        assert "sw" not in sh.magics.probes
        sh.run_cell("%%bpf sw --quiet -DTARGET=1\n" + producers.ring_program())
        assert remote.closed
        assert not [a for a, keys in client.run(_loaded).items() if remote.key in keys]
        sh.run_cell("%bpf_stop sw")


def test_hosts_and_host_args_must_name_hosts_of_the_cluster(fleet: Fleet) -> None:
    with pytest.raises(KeyError, match="no worker on host 'nope'; the cluster's hosts are host0, host1"):
        fleet.probe(producers.ring_program(), hosts=["host0", "nope"])
    with pytest.raises(KeyError, match="host_args names 'host1', which run no probe here"):
        fleet.probe(producers.ring_program(), hosts=["host0"], host_args={"host1": {}})


# --- wt-fleetfix: spilled and evicted rows, failed hosts, leases, misuse ---------------------

def _store_rows(store: FrameStore, n: int, per: int = 1000) -> None:
    dt = store.schema.dtype
    for i in range(0, n, per):
        recs = np.zeros(per, dt)
        recs["x"] = np.arange(i, i + per)
        store.append(Batch(recs, None), 1000 + i)


def test_store_reads_from_a_seq_through_spilled_segments_opening_only_those_needed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = FrameStore(Schema(np.dtype([("x", "u8")])), max_bytes=1 << 16)
    _store_rows(store, 20_000)
    store.spill_some()
    assert store.spilled_rows == len(store) == 20_000  # every row on disk: none in memory
    first, skipped, records, _, _ = _new_rows(store, 0, None)
    assert (first, skipped, records["x"].tolist()) == (0, 0, list(range(20_000)))  # not 0 rows
    opened: list[int] = []
    read = spill.SpillDir.read
    monkeypatch.setattr(spill.SpillDir, "read",
                        staticmethod(lambda seg, dt: opened.append(seg.seq0) or read(seg, dt)))
    first, chunks = store.since(19_990, limit=5)
    assert [c.records["x"].tolist() for c in chunks] == [[19_990, 19_991, 19_992, 19_993, 19_994]]
    assert len(opened) == 1  # only the last segment is read back, not the store
    evicting = FrameStore(Schema(np.dtype([("x", "u8")])), max_rows=500)
    _store_rows(evicting, 1200, per=100)
    first, skipped, records, _, _ = _new_rows(evicting, 0, 300)
    assert (first, skipped, records["x"].tolist()) == (700, 700, list(range(700, 1000)))


def test_hosts_are_found_from_here_without_kernelscope_on_the_scheduler(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_kernelscope(*_a: Any, **_k: Any) -> Any:
        raise ModuleNotFoundError("No module named 'kernelscope'")

    monkeypatch.setattr(fleet.client, "run_on_scheduler", no_kernelscope)
    assert _run(fleet.client, worker.heartbeat, fleet._pick(None), "no-such-key") == {
        "host0": {"alive": False}, "host1": {"alive": False}}


def test_a_worker_that_names_no_host_is_reported_by_address(fleet: Fleet) -> None:
    addr = fleet.workers()["host1"][0]
    fleet.client.run(_break, "host_name", "kernelscope is not importable here", workers=[addr])
    try:
        assert list(fleet.workers()) == ["host0"]
        assert "kernelscope is not importable here" in fleet.broken[addr]
        fp = fleet.probe(producers.ring_program(), start=False)
        assert "kernelscope is not importable here" in fp.errors[addr]
        assert addr in fp.table().host.tolist()
    finally:
        fleet.client.run(_break, "host_name", None, workers=[addr])
    assert sorted(fleet.workers()) == ["host0", "host1"]


def test_fleet_file_puts_its_folder_on_the_include_path(tmp_path: Path) -> None:
    opts = SimpleNamespace(pages=8, max_rows=None, cflags=[], perf_wakeup=1, reorder_ns=None, name="fp",
                           backend=None, globals=None, only=None, skip=(), map_sizes=None,
                           include=["/opt/inc"], file=str(tmp_path / "prog.bpf.c"))
    assert probe_args(opts)["include"] == [str(tmp_path), "/opt/inc"]


@pytest.mark.kernel
def test_evicted_rows_are_counted_pulls_are_bounded_and_misuse_is_refused(
        fleet: Fleet, tmp_path: Path) -> None:
    pids = spawn(fleet, {"host0": 1200, "host1": 300})
    fp = fleet.probe(producers.ring_program(), host_args=targets(pids), max_rows=500, max_rows_per_pull=200)
    try:
        go(fleet, pids)
        wait_for(lambda: fp.poll_once(limit=0) == 0 and fp.total["events"]["received"] == 1500)
        pieces: list[int] = []
        pull = fp.poll_once
        fp.poll_once = lambda limit=-1: pieces.append(pull(limit)) or pieces[-1]  # type: ignore[method-assign]
        fp.stop()
        assert pieces == [400, 300, 100, 0]  # the backlog in pieces of 200 per host, not one message
        table = fp.table().set_index("host")
        assert table.loc["host0", ["received", "pulled", "skipped"]].tolist() == [1200, 500, 700]
        assert table.loc["host1", ["received", "pulled", "skipped"]].tolist() == [300, 300, 0]
        assert table.loc["all (2)", ["pulled", "skipped"]].tolist() == [800, 700]
        assert fp.df[fp.df.host == "host0"].ks_seq.tolist() == list(range(700, 1200))
        with pytest.raises(KeyError, match="no output map 'evnts'; the probe's output maps are events"):
            fp.frame("evnts")
        with pytest.raises(FleetError, match="was stopped"):
            fp.start()
        with pytest.raises(SettingError, match="absolute root"):
            fp.save("relative/run")
        (tmp_path / "old" / "host=db9").mkdir(parents=True)
        with pytest.raises(FleetError, match=r"(?s)host0: .*already holds host=db9 of another run"):
            fp.save(tmp_path / "old")
        (tmp_path / "new" / "host=host0" / "capture.parquet").mkdir(parents=True)  # host0 cannot write
        (tmp_path / "new" / "host=host0" / worker.RUN_FILE).write_text(fp.key)
        assert list(fp.save(tmp_path / "new")) == ["host1"]
        assert list(fp.save_errors) == ["host0"]
        assert fp.hosts == ["host0", "host1"]  # a failed save loses no host, rows or counts
        assert fp.total["events"]["received"] == 1500
    finally:
        fp.close()
    assert not [a for a, keys in fleet.client.run(_loaded).items() if fp.key in keys]


@pytest.mark.kernel
def test_the_notebook_keeps_max_rows_per_host_and_counts_the_rest(fleet: Fleet) -> None:
    """A live run pulls rows before its host evicts them, so the notebook too keeps only the
    newest max_rows of each host and map. Which rows a pull brings depends on timing, so the
    pulled pieces are given here, as a pull decodes them."""
    fp = fleet.probe(producers.ring_program(), cflags=["-DTARGET=1"], max_rows=300,
                     host_args={"host1": {"max_rows": 1000}})
    try:
        for lo in range(0, 1000, 250):  # four pulls of 250 rows each, from each host
            for host in ("host0", "host1"):
                with fp._lock:
                    fp._chunks[host]["events"].append(pd.DataFrame({"ks_seq": np.arange(lo, lo + 250)}))
                    fp._pulled[host]["events"] += 250
                    fp._trim(host, "events")
        df = fp.df
        assert df[df.host == "host0"].ks_seq.tolist() == list(range(700, 1000))  # the newest 300
        assert df[df.host == "host1"].ks_seq.tolist() == list(range(1000))  # its own max_rows
        table = fp.table().set_index("host")
        assert table.loc["host0", ["pulled", "trimmed"]].tolist() == [1000, 700]
        assert table.loc["host1", ["pulled", "trimmed"]].tolist() == [1000, 0]
        assert table.loc["all (2)", "trimmed"] == 700
    finally:
        fp.close()


@pytest.mark.kernel
def test_a_host_whose_calls_failed_is_tried_again_and_freed_on_close(fleet: Fleet) -> None:
    fp = fleet.probe(producers.ring_program(), cflags=["-DTARGET=1"])
    addr = fp.workers["host1"]
    try:
        fleet.client.run(_break, "to_ipc", "one pull failed", workers=[addr])
        try:
            fp.poll_once()
            assert "one pull failed" in fp.errors["host1"]
            assert fp.hosts == ["host0"]
        finally:
            fleet.client.run(_break, "to_ipc", None, workers=[addr])
        fp.stop()  # tried again: it answers, so it is back
        assert fp.errors == {}
        assert fp.final == {"host0", "host1"}
        assert any("one pull failed" in w for w in fp.warnings["host1"])
    finally:
        fp.close()
    assert not [a for a, keys in fleet.client.run(_loaded).items() if fp.key in keys]


@pytest.mark.kernel
def test_probes_of_a_client_that_closed_without_close_end_with_their_lease(fleet: Fleet) -> None:
    other = distributed.Client(fleet.client.scheduler.address)
    fp = Fleet(other).probe(producers.ring_program(), cflags=["-DTARGET=1"], lease=0.5)
    assert all(fp.key in keys for keys in fleet.client.run(_loaded).values())
    other.close()
    with pytest.raises(FleetError, match=r"client .* is closed.*may still be loaded"):
        fp.poll_once()
    wait_for(lambda: not [a for a, ks in fleet.client.run(_loaded).items() if fp.key in ks], what="leases")
    with pytest.raises(FleetError, match="is closed"):
        fp.close()
    assert fp.closed
    assert fp.df.empty  # still readable: what was pulled (nothing here), no call to the hosts


@pytest.mark.kernel
def test_fleet_cell_with_limit_raises_when_live_pulls_give_up(
        client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(self: FleetProbe, limit: int | None = -1) -> int:
        raise OSError("the network is down")

    monkeypatch.setattr(FleetProbe, "poll_once", failing)
    monkeypatch.setattr(fleet_mod, "POLL_RETRIES", 1)
    monkeypatch.setattr(fleet_mod, "POLL_BACKOFF_MAX", 0.0)
    for sh in ipython_shell():
        sh.user_ns["client"] = client
        with pytest.raises(FleetError, match=r"(?s)live pulls .*stopped.*retrying in.*network is down"):
            sh.run_cell("%%bpf fp --fleet client --quiet --limit 10 -DTARGET=1\n" + producers.ring_program())
        assert sh.user_ns["fp"].closed
    assert not [a for a, keys in client.run(_loaded).items() if sh.user_ns["fp"].key in keys]


@pytest.mark.kernel
def test_a_killed_worker_is_reported_and_the_other_hosts_data_kept(fleet: Fleet) -> None:
    """Last in the module: the nanny restarts the killed worker without its host name."""
    pids = spawn(fleet, {"host0": 2000, "host1": 2000})
    fp = fleet.probe(producers.ring_program(), host_args=targets(pids), live=True, interval=0.05,
                     max_rows_per_pull=100)
    try:
        victim = fp.workers["host1"]
        go(fleet, pids)
        wait_for(lambda: fp.table().set_index("host").loc["host1", "pulled"] > 0)  # mid-run: some pulled
        os.kill(fleet.client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
        fp.stop()
        assert list(fp.errors) == ["host1"]
        assert victim in fp.errors["host1"]
        kept = fp.df[fp.df.host == "host1"]
        row = fp.table().set_index("host").loc["host1"]
        assert row.state == "error"
        assert 0 < row.pulled == len(kept)  # what came from the dead host before it died is kept, and shown
        assert kept.ks_seq.tolist() == list(range(len(kept)))
        assert fp.df[fp.df.host == "host0"].ks_seq.tolist() == list(range(2000))
        st = fp.stats["host0"]["events"]
        assert st["attempted"] == st["received"] + st["dropped"]
        assert st["received"] == 2000
        assert fp.total["events"]["received"] == 2000  # the dead host's counts are not summed
    finally:
        fp.close()
    assert fp.key not in fleet.client.run(_loaded, workers=[fp.workers["host0"]])[fp.workers["host0"]]


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
