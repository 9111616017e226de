"""FrameStore without a kernel: spilling beyond the budget, incremental frames, a drain that
never waits for a frame build, and stats read in an order that keeps in_flight >= 0."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kernelscope import folders, spill
from kernelscope.errors import SettingError
from kernelscope.readers.batch import Batch
from kernelscope.schema import Schema
from kernelscope.store import FrameStore

DT = np.dtype([("pid", "u4"), ("cpu", "u4"), ("ts", "u8"), ("comm", "S16")])


def batch(i: int, n: int = 1000) -> Batch:
    r = np.zeros(n, DT)
    r["pid"] = i
    r["ts"] = np.arange(i * n, (i + 1) * n)
    r["comm"] = b"proc%d" % (i % 7)
    return Batch(r)


def fill(store: FrameStore, batches: int, n: int = 1000) -> None:
    for i in range(batches):
        store.append(batch(i, n), 1_000 + i)


@pytest.fixture
def spill_root(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "kernelscope" / "spill"


def test_spilled_rows_read_back_as_one_frame(spill_root, wait_for) -> None:
    schema = Schema(DT)
    plain, small = FrameStore(schema), FrameStore(schema, max_bytes=1 << 20)
    warned: list[str] = []
    small.warn = warned.append
    fill(plain, 200)
    fill(small, 200)
    small.spill_some()  # what the spill thread runs (it may have done it already)
    wait_for(lambda: small.spilled_rows > 0 and small.memory_bytes <= 1 << 20)
    assert len(small) == small.received == 200_000
    assert small.evicted == 0
    assert list(spill_root.glob("*/*.parquet"))
    pd.testing.assert_frame_equal(small.frame(), plain.frame())
    assert np.array_equal(small.records(), plain.records())
    assert any("spilled to Parquet" in w for w in warned)
    small.clear()
    assert not list(spill_root.glob("*/*.parquet"))
    assert small.evicted == 200_000


def test_max_rows_evicts_spilled_rows_first(spill_root) -> None:
    s = FrameStore(Schema(DT), max_rows=150_000, max_bytes=1 << 20)
    fill(s, 100)
    s.spill_some()
    assert s.spilled_rows
    fill(s, 100)  # pushes the oldest (spilled) rows out
    f = s.frame()
    assert len(f) == len(s) == 150_000
    assert s.evicted == 50_000
    assert f["ks_seq"].iloc[0] == 50_000
    assert f["ks_seq"].is_monotonic_increasing


def test_repeated_df_converts_only_new_rows(conversions) -> None:
    s = FrameStore(Schema(DT))
    fill(s, 100)
    converted = conversions
    first = s.frame()
    assert sum(converted) == 100_000
    same = s.frame()  # nothing new: nothing converted, the same memory
    assert sum(converted) == 100_000
    assert np.shares_memory(same["ts"].to_numpy(), first["ts"].to_numpy())
    converted.clear()
    s.append(batch(100, 500), 0)
    again = s.frame()
    assert sum(converted) == 500
    assert len(again) == 100_500
    assert len(first) == 100_000  # earlier frames are not changed by later rows
    pd.testing.assert_frame_equal(again.iloc[:100_000], first)


def test_append_never_waits_for_a_frame_build() -> None:
    """A first df over a million rows takes a while; appends meanwhile stay short (on main
    they waited for the whole build under the store's one lock)."""
    s = FrameStore(Schema(DT))
    fill(s, 100, 10_000)
    t = threading.Thread(target=s.frame)
    t.start()
    waits = []
    while t.is_alive():
        t0 = time.perf_counter()
        s.append(batch(1, 100), 0)
        waits.append(time.perf_counter() - t0)
        time.sleep(0.001)
    t.join()
    assert len(waits) > 20  # the build really ran alongside
    assert max(waits) < 0.1, f"an append waited {max(waits):.3f} s"


def test_budget_settings_are_checked() -> None:
    with pytest.raises(SettingError, match="positive number of bytes"):
        FrameStore(Schema(DT), max_bytes=-1)
    with pytest.raises(SettingError, match="max_bytes"):
        spill.set_memory_budget("2GB")  # type: ignore[arg-type]
    assert spill.memory_budget() == int(spill.mem_total() * spill.SHARE_OF_RAM)
    spill.set_memory_budget(123 << 20)
    try:
        assert spill.memory_budget() == 123 << 20
    finally:
        spill.set_memory_budget(None)


def test_a_spill_folder_left_by_a_killed_process_goes_with_the_next_spill(spill_root) -> None:
    """Spill folders are named for their process (folders.owned_dir): one whose owner was
    killed before it could clean up is removed when a store next spills; a live one stays."""
    spill_root.mkdir(parents=True)
    made = subprocess.run(
        [sys.executable, "-c", f"from kernelscope import folders; from pathlib import Path; "
         f"print(folders.owned_dir(Path({str(spill_root)!r}), 'spill-'))"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    dead = Path(made.stdout.strip())  # its process has exited without removing it
    assert dead.is_dir()
    mine = folders.owned_dir(spill_root, spill.SPILL_PREFIX)
    folders._swept.clear()  # as in a new process, whose first spill sweeps
    live = spill.SpillDir(spill_root)
    try:
        assert not dead.exists()
        assert mine.is_dir()
    finally:
        live.close()
        mine.rmdir()


@pytest.mark.parametrize("batches", [1, 100])
def test_writing_into_a_frame_leaves_the_store_alone(batches: int) -> None:
    """A frame's columns share memory with the store (its buffers, or views of the stored
    records after one whole-drain conversion); a write into the caller's frame must not reach
    the rows later frames, records() and captures read."""
    s = FrameStore(Schema(DT))
    fill(s, batches)
    df = s.frame()
    before = s.records()["pid"].copy()
    df.loc[0, "pid"] = 4_000_000_000
    df["ts"] += 1
    assert s.records()["pid"].tolist() == before.tolist()
    fresh = s.frame()
    assert fresh.loc[0, "pid"] == before[0]
    assert df.loc[0, "pid"] == 4_000_000_000


def test_two_spills_at_once_share_one_folder_and_keep_every_segment(monkeypatch) -> None:
    """The spill thread and a caller may run spill_some() together; each made its own folder,
    and the one dropped removed the other's segments with it (its finalizer's rmtree)."""
    made: list[spill.SpillDir] = []
    init = spill.SpillDir.__init__

    def slow_init(self: spill.SpillDir, *a: object, **k: object) -> None:
        time.sleep(0.05)  # both threads reach the folder before either has made it
        init(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(spill.SpillDir, "__init__", slow_init)
    store = FrameStore(Schema(np.dtype([("x", "u8")])), max_bytes=1 << 16)
    for i in range(0, 20_000, 1000):
        recs = np.zeros(1000, store.schema.dtype)
        recs["x"] = np.arange(i, i + 1000)
        store.append(Batch(recs, None), 1000 + i)
    threads = [threading.Thread(target=store.spill_some) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    made.clear()
    segs, _, _, _ = store._snapshot()
    assert segs
    assert all(s.path.exists() for s in segs)
    assert store.frame()["x"].tolist() == list(range(20_000))
