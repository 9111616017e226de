"""Captures: save/replay round trips keep rows, dtypes, order, stats and the invariant."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from producers import paused, perf_program, ring_program

from kernelscope import Probe
from kernelscope.captures import capture
from kernelscope.captures.capture import (
    Capture,
    CaptureError,
    MapCapture,
    dtype_from_json,
    dtype_to_json,
    load,
    save,
)
from kernelscope.captures.replay import replay

NESTED = np.dtype(
    {
        "names": ["pid", "in", "arr", "comm", "ts"],
        "formats": [
            "<u4",
            np.dtype({"names": ["a", "b"], "formats": ["<u2", "u1"], "offsets": [0, 2], "itemsize": 4}),
            ("<u8", (3,)),
            "S16",
            "<u8",
        ],
        "offsets": [0, 4, 8, 32, 48],
        "itemsize": 56,
    }
)


@pytest.mark.parametrize("dt", [NESTED, np.dtype([("x", "<i2"), ("y", "<f8")], align=True), np.dtype("<u8")])
def test_dtype_json_round_trip_is_exact(dt: np.dtype) -> None:
    back = dtype_from_json(json.loads(json.dumps(dtype_to_json(dt))))
    assert back == dt
    assert back.itemsize == dt.itemsize


def synthetic(n: int = 1000) -> Capture:
    rec = np.zeros(n, NESTED)
    rec["pid"] = np.arange(n)
    rec["in"]["a"] = 7
    rec["comm"] = b"worker"
    rec["ts"] = 10**9 + np.arange(n) * 1000
    arrival = (np.arange(n) // 100) * 50_000_000  # a batch of 100 every 50 ms
    history = [
        {
            "t": i * 0.1,
            "attempted": min(n, 200 * (i + 1)),
            "received": min(n, 200 * i),
            "dropped": 0,
            "fill_bytes": 0,
            "lost_records": 0,
        }
        for i in range(6)
    ]
    mc = MapCapture(
        "events",
        "ringbuf",
        NESTED,
        rec,
        np.arange(n),
        arrival,
        None,
        stats={"kind": "ringbuf", "attempted": n + 5, "received": n, "dropped": 5, "in_flight": 0},
        history=history,
        pages=16,
    )
    return Capture({"events": mc}, source="// program", settings={"pages": 16}, started_ns=123)


def test_synthetic_capture_round_trip(tmp_path) -> None:
    path = save(synthetic(), tmp_path / "c.parquet")
    cap = load(path)
    mc = cap.maps["events"]
    assert mc.dtype == NESTED
    assert (mc.records == synthetic().maps["events"].records).all()
    assert cap.source == "// program"
    assert cap.started_ns == 123
    r = replay(path, speed=None).start()
    df = r.df
    assert list(df["pid"]) == list(range(1000))
    assert set(df["comm"]) == {"worker"}
    assert r.stats["events"]["attempted"] == r.stats["events"]["received"] + r.stats["events"]["dropped"]


def test_a_loaded_capture_saved_again_keeps_its_arrival_times(tmp_path) -> None:
    """The file keeps arrivals relative to started_ns; loading adds it back, so saving a loaded
    capture (the panel's "save capture" of a replay, a trimmed copy) writes the same times."""
    orig = synthetic()
    orig.started_ns = 5 * 10**9
    orig.maps["events"].arrival_ns = orig.maps["events"].arrival_ns + orig.started_ns
    first = load(save(orig, tmp_path / "a.parquet"))
    again = load(save(first, tmp_path / "b.parquet"))
    for cap in (first, again):
        assert cap.started_ns == orig.started_ns
        assert (cap.maps["events"].arrival_ns == orig.maps["events"].arrival_ns).all()
    df = replay(tmp_path / "b.parquet", speed=None).start().df
    assert (df["ks_arrival_ns"].to_numpy() == orig.maps["events"].arrival_ns).all()


def test_replay_at_recorded_pace_grows_over_time(tmp_path) -> None:
    path = save(synthetic(), tmp_path / "c.parquet")
    r = replay(path, speed=1.0).start()
    deadline = time.monotonic() + 5
    seen = set()
    while not r.done and time.monotonic() < deadline:
        seen.add(len(r.df))
        time.sleep(0.01)
    assert r.done
    assert len(r.df) == 1000
    assert len(seen) >= 4  # rows arrived in steps, not at once
    assert 0 < min(seen - {0}) < 1000


def test_not_a_capture_is_a_clear_error(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), plain)
    with pytest.raises(CaptureError, match="not a kernelscope capture"):
        load(plain)
    junk = tmp_path / "junk.parquet"
    junk.write_text("hello")
    with pytest.raises(CaptureError, match="not a Parquet file"):
        load(junk)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.parquet")


@pytest.mark.kernel
@pytest.mark.parametrize("program", [ring_program, perf_program])
def test_live_capture_replays_to_the_same_frame(tmp_path, program) -> None:
    prod = paused(5000)
    with Probe(program(), cflags=prod.cflags) as p:
        prod.go()
        p.stop()
        path = p.save(tmp_path / "cap.parquet")
        live_df, live_stats = p.df, p.stats["events"]
    r = replay(path, speed=None).start()
    pd.testing.assert_frame_equal(r.df, live_df)
    st = r.stats["events"]
    for key in ("attempted", "received", "dropped", "lost_records", "inversions"):
        assert st[key] == live_stats[key]
    assert st["attempted"] == st["received"] + st["dropped"] == 5000
    assert len(r.history()) >= 1


@pytest.mark.kernel
def test_capture_replays_without_privileges(tmp_path) -> None:
    """A process with no capabilities at all (as on Binder) replays the same frame."""
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to drop privileges for this test")
    prod = paused(2000)
    with Probe(ring_program(), cflags=prod.cflags) as p:
        prod.go()
        p.stop()
        path = p.save(tmp_path / "cap.parquet")
        expected = p.df.drop(columns=["ks_time"]).to_json()
    shared = Path(tempfile.mkdtemp(prefix="ks-replay-"))  # pytest's tmp dirs are root-only
    shared.chmod(0o755)
    path = Path(shutil.copy(path, shared / "cap.parquet"))
    path.chmod(0o644)
    code = (
        "import sys, kernelscope.host as h, kernelscope.captures.replay as r\n"
        "assert not h.has_bpf_privileges()\n"
        f"df = r.replay({str(path)!r}, speed=None).start().df\n"
        "sys.stdout.write(df.drop(columns=['ks_time']).to_json())\n"
    )
    res = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            sys.executable,
            "-c",
            code,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env={"PYTHONPATH": ":".join(sys.path), "HOME": "/tmp"},
    )
    shutil.rmtree(shared)
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected


@pytest.mark.kernel
def test_record_then_replay_mode_runs_the_same_code(tmp_path, monkeypatch) -> None:
    """The same notebook code: recorded live once, then replayed with no BPF involved."""
    monkeypatch.setenv("KERNELSCOPE_CAPTURES", str(tmp_path))
    monkeypatch.setenv("KERNELSCOPE_MODE", "record")
    prod = paused(1000)
    src = ring_program()
    with Probe(src, cflags=prod.cflags, name="getppid") as p:
        prod.go()
        p.stop()
        live = p.df
    assert (tmp_path / "getppid.parquet").exists()
    monkeypatch.setenv("KERNELSCOPE_MODE", "replay")
    r = Probe(src, cflags=prod.cflags, name="getppid")
    assert type(r).__name__ == "Replay"
    with r:
        r.stop()
        pd.testing.assert_frame_equal(r.df, live)
        assert r.stats["events"]["attempted"] == 1000
    with pytest.raises(Exception, match="no capture"):
        Probe(src, name="never-recorded")
    with pytest.raises(Exception, match="has no name"):
        Probe(src)


@pytest.mark.kernel
def test_reload_marks_survive_the_capture_and_show_in_the_replays_plots(tmp_path) -> None:
    from kernelscope.jupyter import plots

    first, second = paused(2000), paused(2000)
    src = ring_program().replace("!= TARGET", "!= TARGET && (id >> 32) != SECOND")
    with Probe(src, cflags=[*first.cflags, f"-DSECOND={second.pid}"]) as p:
        first.go()
        p.reconfigure(pages=8)
        second.go()
        p.stop()
        path = p.save(tmp_path / "reloaded.parquet")
        live_marks = plots.marks(p)
    assert [what for _, what in live_marks] == ["pages default -> 8"]
    r = replay(path, speed=None).start()
    replayed = plots.marks(r)
    assert [what for _, what in replayed] == ["pages default -> 8"]
    assert replayed[0][0] == pytest.approx(live_marks[0][0], abs=1e-6)  # seconds from the start
    assert r.stats["events"]["reloads"] == 1
    st = r.stats["events"]
    assert st["attempted"] == st["received"] + st["dropped"] == 4000  # a 32 KiB ring may drop some


@pytest.mark.kernel
def test_probe_save_is_atomic_when_interrupted(tmp_path, monkeypatch) -> None:
    """Ctrl-C while Probe.save writes leaves the previous capture whole and no temporary file."""
    import pyarrow.parquet as pq

    prod = paused(1000)
    with Probe(ring_program(), cflags=prod.cflags) as p:
        prod.go()
        p.stop()
        path = p.save(tmp_path / "cap.parquet")
        before = path.read_bytes()
        real = pq.write_table

        def interrupted(table, where, **kw) -> None:
            real(table.slice(0, 10), where, **kw)
            raise KeyboardInterrupt

        monkeypatch.setattr(pq, "write_table", interrupted)
        with pytest.raises(KeyboardInterrupt):
            p.save(path)
        assert path.read_bytes() == before
        assert [f.name for f in tmp_path.iterdir()] == ["cap.parquet"]
        monkeypatch.setattr(pq, "write_table", real)
        live = p.df
    pd.testing.assert_frame_equal(replay(path, speed=None).start().df, live)


def test_derived_frames_round_trip_with_their_types_and_attrs(tmp_path: Path) -> None:
    """Frames kernelscope derives at stop() (printk lines, named stacks) are kept whole: tuples of
    names stay tuples, times stay times, attrs come back; a bad `frames` entry is named."""
    df = pd.DataFrame({"stack": [("main", "burn"), ("main",)], "count": np.array([7, 1], np.uint64),
                       "time": pd.to_datetime([1, 2], unit="s"), "comm": ["a", "b"]})
    df.attrs["stack_errors"] = {"user EEXIST": 1}
    path = capture.save(capture.Capture({}, frames={"stacks:counts:stacks": df}), tmp_path / "f.parquet")
    got = capture.load(path).frames["stacks:counts:stacks"]
    assert got["stack"].tolist() == [("main", "burn"), ("main",)]
    assert got["count"].dtype == np.uint64
    assert got["count"].tolist() == [7, 1]
    assert got["time"].tolist() == df["time"].tolist()
    assert got.attrs["stack_errors"] == {"user EEXIST": 1}
    assert capture.load(path).maps == {}
