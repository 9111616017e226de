"""Damaged, foreign and hand-edited captures: each replays exactly what was saved or fails
with a CaptureError saying what is wrong; never different data, never a raw exception.

The captures here are written by the documented writer (`capture.save`) from synthetic
records: this is a test of the file format, not of the kernel.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from test_capture import NESTED
from traitlets.config import Config
from util import wait_for

from kernelscope.captures import capture
from kernelscope.captures.capture import Capture, MapCapture, load, save, upgrade
from kernelscope.captures.replay import replay
from kernelscope.errors import CaptureDamagedError, CaptureError, CaptureMissingError

KERNELSCOPE = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "kernelscope"
PERF_EVENT = np.dtype([("pid", "<u4"), ("cpu", "<u4"), ("ts", "<u8"), ("comm", "S16")])


def two_maps(n_ring: int = 600, n_perf: int = 400) -> Capture:
    """A ring buffer map of nested structs and a perf map with a CPU per record, arrivals
    interleaved, values varied enough that no column compresses to nothing."""
    rng = np.random.default_rng(7)
    ring = np.zeros(n_ring, NESTED)
    ring["pid"] = rng.integers(1, 2**22, n_ring)
    ring["in"]["a"] = rng.integers(0, 2**16, n_ring)
    ring["arr"] = rng.integers(0, 2**40, (n_ring, 3))
    ring["comm"] = [f"worker-{i % 37}".encode() for i in range(n_ring)]
    ring["ts"] = 10**12 + np.cumsum(rng.integers(1, 5000, n_ring))
    perf = np.zeros(n_perf, PERF_EVENT)
    perf["pid"] = rng.integers(1, 2**22, n_perf)
    perf["cpu"] = rng.integers(0, 2, n_perf)
    perf["ts"] = 10**12 + np.cumsum(rng.integers(1, 9000, n_perf))
    perf["comm"] = b"perf-side"
    started = 5_000_000_000
    history = [{"t": 0.1 * i, "attempted": 100 * i, "received": 90 * i, "dropped": 10 * i,
                "fill_bytes": 64 * i, "lost_records": 0} for i in range(8)]
    maps = {
        "events": MapCapture(
            "events", "ringbuf", NESTED, ring, np.arange(n_ring),
            started + np.sort(rng.integers(0, 10**9, n_ring)), None,
            stats={"kind": "ringbuf", "attempted": n_ring + 7, "received": n_ring, "dropped": 7,
                   "in_flight": 0},
            history=history, pages=16, marks=[{"t": 0.25, "what": "pages 8 -> 16"}]),
        "perf_events": MapCapture(
            "perf_events", "perf", PERF_EVENT, perf, np.arange(n_perf),
            started + np.sort(rng.integers(0, 10**9, n_perf)), perf["cpu"].astype(np.int16),
            stats={"kind": "perf", "attempted": n_perf, "received": n_perf, "dropped": 0,
                   "lost_records": 0, "in_flight": 0},
            history=history[:3], pages=8, epoch_offset_ns=123_456),
    }
    return Capture(maps, source="// two maps\n", settings={"name": "two", "backend": "bcc"},
                   started_ns=started)


def seen(path: Path) -> dict[str, Any]:
    """Everything a replay shows: frames, stats and history of each map, marks, settings."""
    r = replay(path, speed=None).start()
    return {
        "frames": {n: r.frame(n) for n in r.outputs},
        "history": {n: r.history(n) for n in r.outputs},
        "stats": r.stats,
        "marks": {n: list(ms.marks) for n, ms in r.outputs.items()},
        "source": r.source,
        "settings": r.capture.settings,
        "started_ns": r.capture.started_ns,
        "warnings": r.warnings,
    }


def same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["frames"].keys() == b["frames"].keys()
    for n in a["frames"]:
        pd.testing.assert_frame_equal(a["frames"][n], b["frames"][n])
        pd.testing.assert_frame_equal(a["history"][n], b["history"][n])
    for key in ("stats", "marks", "source", "settings", "started_ns", "warnings"):
        assert a[key] == b[key], key


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, Any]]:
    path = save(two_maps(), tmp_path_factory.mktemp("orig") / "orig.parquet")
    return path.read_bytes(), seen(path)


def outcome(path: Path, expected: dict[str, Any]) -> str:
    """'same' if the file replays exactly as the original, else the CaptureError's text;
    anything else (different data, another exception) fails the test."""
    try:
        got = seen(path)
    except CaptureError as e:
        text = str(e)
    else:
        same(got, expected)
        return "same"
    assert text.startswith(f"{path}: "), text
    return text[len(str(path)) + 2:]


KINDS_OF_DAMAGE = ("same", "fails its checksum", "cannot be read", "damaged or truncated Parquet file",
                   "not valid JSON", "metadata key", "rows belong to map", "do not match")


def test_corruption_sweep_replays_the_original_or_raises(tmp_path, original) -> None:
    """16 random bytes over each of ~500 offsets across the whole file (data pages, page
    headers, footer, the metadata JSON and its checksum), bounded to a few seconds."""
    data, expected = original
    rng = np.random.default_rng(13)
    size = len(data)
    offsets = sorted({*np.linspace(0, size - 1, 350).astype(int), *rng.integers(0, size, 150)})
    path = tmp_path / "damaged.parquet"
    found: dict[str, int] = {}  # outcome -> count
    t0 = time.monotonic()
    for off in offsets:
        damaged = bytearray(data)
        patch = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        damaged[off : off + 16] = patch[: size - off]
        if damaged == data:
            continue
        path.write_bytes(damaged)
        what = outcome(path, expected)
        key = next((k for k in KINDS_OF_DAMAGE if k in what), what)
        found[key] = found.get(key, 0) + 1
    took = time.monotonic() - t0
    caught = sum(v for k, v in found.items() if k != "same")
    assert caught > 0.8 * len(offsets), found  # most bytes of a capture matter
    # pyarrow notices some damage itself; the rest only the checksums can catch
    assert found.get("fails its checksum", 0) > 0.1 * len(offsets), found
    assert took < 30, f"sweep took {took:.1f} s"


@pytest.mark.parametrize("keep", [0, 3, 4, 100, 0.5, -1000, -9, -8, -4, -1])
def test_truncated_capture_is_a_capture_error(tmp_path, original, keep: float) -> None:
    data, _ = original
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data) if keep < 0 else keep
    path = tmp_path / "cut.parquet"
    path.write_bytes(data[:n])
    with pytest.raises(CaptureError) as info:
        load(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ")
    if n == 0:
        assert "empty (0 bytes)" in text
    elif n >= 4:
        assert isinstance(info.value, CaptureDamagedError)
        assert "damaged or truncated Parquet file" in text


def test_pinned_regression_16_bytes_in_the_data_are_caught(tmp_path, original) -> None:
    """The issue's case: 16 bytes overwritten in the middle of the event data changed 8 `ts`
    values and replayed silently. Find offsets in the data pages where pyarrow decodes the
    damaged file without complaint into different values (so only a checksum can notice)
    and check each one is refused."""
    data, _ = original
    path = tmp_path / "mid.parquet"
    path.write_bytes(data)
    clean = pq.read_table(path)
    footer = len(data) - int.from_bytes(data[-8:-4], "little") - 8
    silent = 0
    for off in range(64, footer - 16, max(1, (footer - 80) // 150)):
        damaged = bytearray(data)
        damaged[off : off + 16] = bytes(range(0xF0, 0x100))
        path.write_bytes(damaged)
        try:
            if pq.read_table(path).equals(clean):
                continue
        except (pa.ArrowException, OSError, ValueError):
            continue
        silent += 1
        with pytest.raises(CaptureDamagedError, match=r"map '\w+': column '\w+' fails its checksum"):
            load(path)
    assert silent >= 5  # damage pyarrow itself does not notice exists in this file


# --- metadata: hand-edited or damaged ---------------------------------------------------


def edit_meta(path: Path, edit: Callable[[dict[str, Any]], Any] | str, checksum: bool = True) -> Path:
    """Rewrite the kernelscope metadata of `path` (a dict edit, or raw text in its place);
    with `checksum`, the metadata's checksum is recomputed, as a tool editing it would."""
    table = pq.read_table(path)
    kv = dict(table.schema.metadata)
    if isinstance(edit, str):
        text = edit.encode()
    else:
        meta = json.loads(kv[capture.META_KEY])
        edit(meta)
        text = json.dumps(meta).encode()
    kv[capture.META_KEY] = text
    if checksum:
        kv[capture.SUM_KEY] = hashlib.sha256(text).hexdigest().encode()
    pq.write_table(table.replace_schema_metadata(kv), path)
    return path


def _rename(meta: dict[str, Any]) -> None:
    meta["maps"]["evts"] = meta["maps"].pop("events")


def _set(*keys: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        obj = meta
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value
    return edit


def _drop(*keys: str) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        obj = meta
        for k in keys[:-1]:
            obj = obj[k]
        del obj[keys[-1]]
    return edit


METADATA_CASES = {
    "renamed map": (_rename, "600 rows belong to map 'events', which the metadata does not describe "
                    "(it describes 'perf_events', 'evts')"),
    "nonsense JSON": ("{'maps': nonsense", "the kernelscope metadata is not valid JSON"),
    "JSON list": ("[1, 2, 3]", "the kernelscope metadata should be a JSON object, got list"),
    "no maps": (_drop("maps"), "metadata key 'maps' is missing"),
    "no dtype": (_drop("maps", "events", "dtype"), "metadata key 'maps.events.dtype' is missing"),
    "no kind": (_drop("maps", "perf_events", "kind"), "metadata key 'maps.perf_events.kind' is missing"),
    "no version": (_drop("version"), "metadata key 'version' is missing"),
    "no checksums": (_drop("maps", "events", "sha256"), "metadata key 'maps.events.sha256' is missing"),
    "no row count": (_drop("maps", "events", "rows"), "metadata key 'maps.events.rows' is missing"),
    "version a string": (_set("version", value="2"),
                         "metadata key 'version' should be a 64-bit integer, got str"),
    "start out of range": (_set("started_ns", value=10**30),
                           "metadata key 'started_ns' should be a 64-bit integer, got int 1000000000"),
    "stats a list": (_set("maps", "events", "stats", value=[]),
                     "metadata key 'maps.events.stats' should be an object, got list"),
    "negative count": (_set("maps", "events", "stats", "attempted", value=-1),
                       "metadata key 'maps.events.stats.attempted' should be a non-negative integer"),
    "history time text": (_set("maps", "events", "history", value=[{"t": "soon"}]),
                          "metadata key 'maps.events.history[0].t' should be a finite number, got str"),
    "history not a list": (_set("maps", "events", "history", value={"t": 1}),
                           "metadata key 'maps.events.history' should be a list, got dict"),
    "mark without what": (_set("maps", "events", "marks", value=[{"t": 0.5}]),
                          "metadata key 'maps.events.marks[0].what' is missing"),
    "pages text": (_set("maps", "events", "pages", value="16"),
                   "metadata key 'maps.events.pages' should be a non-negative integer, got str"),
    "unknown kind": (_set("maps", "events", "kind", value="ring"),
                     "metadata key 'maps.events.kind' is 'ring': a map is one of ringbuf, perf"),
    "dtype nonsense": (_set("maps", "events", "dtype", value={"names": 3}),
                       "metadata key 'maps.events.dtype' is not a numpy dtype description"),
    "dtype of objects": (_set("maps", "events", "dtype", value="|O"),
                         "metadata key 'maps.events.dtype' describes object, which no event record can have"),
    "dtype of an array": (_set("maps", "events", "dtype", value={"base": "<f8", "shape": [7]}),
                          "metadata key 'maps.events.dtype' describes ('<f8', (7,)), which no event"),
    "dtype of another size": (_set("maps", "events", "dtype", value="<u8"),
                              "map 'events': records of 56 bytes do not match its 8-byte dtype"),
    "map not an object": (_set("maps", "events", value=7),
                          "metadata key 'maps.events' should be an object, got int"),
    "send stats": (_set("settings", "send_stats", value={"echo": 3}),
                   "metadata key 'settings.send_stats.echo' should be an object, got int"),
    "user ring dtype": (_set("settings", "user_ring_dtypes", value={"echo": {"base": 1}}),
                        "metadata key 'settings.user_ring_dtypes.echo' is not a numpy dtype description"),
    "row count": (_set("maps", "events", "rows", value=599),
                  "map 'events' has 600 rows, its metadata says 599"),
    "checksum of other data": (_set("maps", "events", "sha256", "ks_seq", value="0" * 64),
                               "map 'events': column 'ks_seq' fails its checksum: the file is damaged"),
    "foreign format": (_set("format", value="other-tool"),
                       "not a kernelscope capture (its metadata says format 'other-tool', "
                       "not 'kernelscope-capture')"),
    "newer version": (_set("version", value=99),
                      f"a capture of newer format 99 than this kernelscope reads ({capture.VERSION})"),
    "version zero": (_set("version", value=0), "metadata key 'version' is 0"),
}


@pytest.mark.parametrize("case", METADATA_CASES)
def test_bad_metadata_is_a_capture_error_naming_the_key(tmp_path, case: str) -> None:
    edit, message = METADATA_CASES[case]
    path = edit_meta(save(two_maps(), tmp_path / "c.parquet"), edit)
    with pytest.raises(CaptureError) as info:
        replay(path, speed=None)
    assert str(info.value).startswith(f"{path}: {message}"), str(info.value)


def _paths(obj: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key of a JSON tree (the first two items of each list), checksums and dtypes aside."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj[:2]) if isinstance(obj, list) else ()
    for k, v in items:
        if k not in ("sha256", "dtype"):
            yield (*at, k)
            yield from _paths(v, (*at, k))


def test_any_value_of_the_wrong_type_is_a_capture_error_or_harmless(tmp_path) -> None:
    """Each metadata value in turn replaced by one of another type (checksum recomputed):
    the replay fails with a CaptureError or shows frames, stats, history and HTML; no other
    exception from anywhere inside."""
    path = save(two_maps(60, 40), tmp_path / "c.parquet")
    clean = path.read_bytes()
    meta = json.loads(pq.ParquetFile(path).metadata.metadata[capture.META_KEY])
    refused = 0
    for at in _paths(meta):
        for value in (None, "x", [], 10**30):
            path.write_bytes(clean)
            edit_meta(path, _set(*at, value=value))
            try:
                r = replay(path, speed=None).start()
            except CaptureError:
                refused += 1
                continue
            for name in r.outputs:
                r.frame(name), r.history(name)
            r._repr_html_()
    assert refused > 100


def test_metadata_edited_without_its_checksum_is_damage(tmp_path) -> None:
    path = edit_meta(save(two_maps(), tmp_path / "c.parquet"), _rename, checksum=False)
    with pytest.raises(CaptureDamagedError, match="the kernelscope metadata fails its checksum"):
        load(path)
    path = edit_meta(save(two_maps(), tmp_path / "d.parquet"), _set("version", value=capture.VERSION),
                     checksum=False)
    load(path)  # the same JSON, re-serialized identically: nothing changed, nothing to refuse


def as_format_1(path: Path) -> Path:
    """`path` as kernelscope wrote captures before checksums: version 1, no sums, no counts."""
    table = pq.read_table(path)
    kv = dict(table.schema.metadata)
    meta = json.loads(kv.pop(capture.SUM_KEY) and kv[capture.META_KEY])
    meta["version"] = 1
    for m in meta["maps"].values():
        del m["rows"], m["sha256"]
    kv[capture.META_KEY] = json.dumps(meta).encode()
    pq.write_table(table.replace_schema_metadata(kv), path)
    return path


def test_format_1_replays_with_a_warning_and_upgrades(tmp_path, original) -> None:
    _, expected = original
    path = as_format_1(save(two_maps(), tmp_path / "old.parquet"))
    got = seen(path)
    assert len(got["warnings"]) == 1
    assert "has no checksums" in got["warnings"][0]
    same({**got, "warnings": []}, expected)
    r = replay(path, speed=None)
    assert "has no checksums" in r._repr_html_()
    upgrade(path)
    same(seen(path), expected)  # checksummed now, and no warning
    assert json.loads(pq.ParquetFile(path).metadata.metadata[capture.META_KEY])["version"] == capture.VERSION


def test_format_1_with_a_renamed_map_is_still_refused(tmp_path) -> None:
    path = edit_meta(as_format_1(save(two_maps(), tmp_path / "old.parquet")), _rename)
    with pytest.raises(CaptureError, match="600 rows belong to map 'events', which the metadata does not"):
        load(path)


def test_committed_captures_are_current_and_verified() -> None:
    root = Path(__file__).resolve().parent.parent
    paths = sorted(root.glob("notebooks/captures/*/*.parquet")) + sorted(root.glob("captures/*.parquet"))
    assert paths
    for path in paths:
        cap = load(path)
        assert cap.warnings == [], path


# --- not captures at all ----------------------------------------------------------------


def test_foreign_files_say_what_they_are(tmp_path) -> None:
    foreign = tmp_path / "pandas.parquet"
    pd.DataFrame({"ts": [1, 2], "comm": ["a", "b"]}).to_parquet(foreign)
    with pytest.raises(CaptureError) as info:
        load(foreign)
    text = str(info.value)
    assert text.startswith(f"{foreign}: not a kernelscope capture (no kernelscope metadata)")
    assert "columns ts, comm" in text
    assert "newer" not in text
    notes = tmp_path / "notes.parquet"
    notes.write_text("these are my notes, not a capture\n")
    with pytest.raises(CaptureError, match=r"notes.parquet: not a Parquet file"):
        load(notes)
    empty = tmp_path / "empty.parquet"
    empty.touch()
    with pytest.raises(CaptureError, match=r"empty.parquet: the file is empty \(0 bytes\)"):
        load(empty)
    with pytest.raises(CaptureError, match="is a folder, not a capture file"):
        load(tmp_path)


def test_missing_capture_names_the_path(tmp_path) -> None:
    missing = tmp_path / "never" / "recorded.parquet"
    with pytest.raises(CaptureMissingError) as info:
        replay(missing)
    assert isinstance(info.value, FileNotFoundError)  # what callers caught before
    assert str(info.value).startswith(f"no capture file at {missing}: check the path")


@pytest.fixture(scope="module")
def ip() -> Iterator[InteractiveShell]:
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "kernelscope")
    yield shell
    shell.run_line_magic("unload_ext", "kernelscope")


def run_cell(ip: InteractiveShell, source: str) -> Any:
    result = ip.run_cell(source)
    for error in (result.error_before_exec, result.error_in_exec):
        if error is not None:
            raise error
    return result.result


def test_magic_replay_of_a_missing_or_damaged_file_is_a_usage_error(ip, tmp_path, original) -> None:
    missing = tmp_path / "nope.parquet"
    with pytest.raises(UsageError) as info:
        run_cell(ip, f"%%bpf gone --replay {missing}\n// replayed, not compiled\n")
    assert str(info.value) == (
        f"%%bpf gone: no capture file at {missing}: check the path (a capture is written by "
        "Probe.save, `kernelscope record` or KERNELSCOPE_MODE=record)"
    )
    damaged = tmp_path / "damaged.parquet"
    data = bytearray(original[0])
    data[-200:-184] = bytes(16)  # in the footer's metadata
    damaged.write_bytes(data)
    with pytest.raises(UsageError, match=rf"%%bpf hurt: {damaged}: .*damaged"):
        run_cell(ip, f"%%bpf hurt --replay {damaged}\n// replayed, not compiled\n")
    good = save(two_maps(), tmp_path / "good.parquet")
    run_cell(ip, f"%%bpf fine --replay {good} --quiet\n// replayed, not compiled\n")
    assert len(ip.user_ns["fine"].frame("events")) == 600


# --- writing atomically -------------------------------------------------------------------


def test_a_failed_or_interrupted_save_leaves_the_old_file_and_no_part(tmp_path, monkeypatch) -> None:
    path = save(two_maps(), tmp_path / "c.parquet")
    before = path.read_bytes()
    real = pq.write_table

    def half_then(exc: BaseException) -> Callable[..., None]:
        def write(table: pa.Table, where: Any, **kw: Any) -> None:
            real(table.slice(0, 10), where, **kw)  # part of a file is on disk
            raise exc
        return write

    for exc in (KeyboardInterrupt(), OSError(28, "No space left on device")):
        monkeypatch.setattr(pq, "write_table", half_then(exc))
        with pytest.raises(type(exc)):
            save(two_maps(), path)
        with pytest.raises(type(exc)):
            save(two_maps(), tmp_path / "new.parquet")
        assert path.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.parquet"]
    monkeypatch.setattr(pq, "write_table", real)
    save(two_maps(50, 50), path)
    assert len(load(path).maps["events"].records) == 50
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.parquet"]


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# --- kernelscope record: checked before it attaches -----------------------------------------


def record(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    res = subprocess.run([str(KERNELSCOPE), "record", *args], capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    return res, time.monotonic() - t0


PROGRAM = Path(__file__).resolve().parent.parent / "bpf" / "exec_exit_openat.c"


@pytest.mark.parametrize(("args", "message"), [
    (["-o", "/nonexistent/dir/x.parquet"],
     "-o /nonexistent/dir/x.parquet: the folder /nonexistent/dir does not exist (create it first: "
     "mkdir -p /nonexistent/dir)"),
    (["--pages", "3", "-o", "OUT/x.parquet"], "--pages must be a power of two (1, 2, 4, ...), got 3"),
    (["--pages", "0", "-o", "OUT/x.parquet"], "--pages must be a power of two (1, 2, 4, ...), got 0"),
    (["-o", "OUT"], "-o OUT is a folder: give a file name inside it, e.g. OUT/capture.parquet"),
    (["-o", "OUT/x.csv"], "-o OUT/x.csv: a capture file's name ends in .parquet (e.g. OUT/x.parquet)"),
    (["-o", "OUT/x.parquet", "--limit", "0"], "--limit must be a positive number of events, got 0"),
    (["-o", "OUT/x.parquet", "-D", "1X=2"],
     "-D expects NAME or NAME=VALUE with NAME a C identifier, got '1X=2'"),
])
def test_record_refuses_bad_output_and_options_before_attaching(tmp_path, args, message) -> None:
    duration = 10
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    res, took = record(str(PROGRAM), "--duration", str(duration), *args)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last == "kernelscope record: error: " + message.replace("OUT", str(tmp_path))
    assert "Traceback" not in res.stderr
    assert res.stdout == ""
    assert took < duration / 2  # refused up front, not after recording
    assert list(tmp_path.iterdir()) == []


@pytest.mark.kernel
def test_record_writes_a_verified_capture_and_keeps_it_when_the_folder_goes(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    res, _ = record(str(PROGRAM), "--duration", "1", "-o", str(out / "exec.parquet"))
    assert res.returncode == 0, res.stderr
    assert [p.name for p in out.iterdir()] == ["exec.parquet"]
    assert load(out / "exec.parquet").warnings == []
    # the folder is removed while recording: the capture is saved elsewhere, not lost
    proc = subprocess.Popen([str(KERNELSCOPE), "record", str(PROGRAM), "--duration", "3", "-o",
                             str(out / "gone.parquet")], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def attached() -> bool:
        fds = Path(f"/proc/{proc.pid}/fd")
        for fd in fds.iterdir():
            try:
                if "bpf" in os.readlink(fd):
                    return True
            except FileNotFoundError:  # closed between the listing and the readlink
                continue
        return False

    wait_for(attached, timeout=30, what="the recording to attach")
    shutil.rmtree(out)
    _, stderr = proc.communicate(timeout=60)
    spare = Path(tempfile.gettempdir()) / f"kernelscope-record-gone-{proc.pid}.parquet"
    try:
        assert proc.returncode == 1, stderr
        assert f"could not write {out / 'gone.parquet'}" in stderr
        assert f"the capture was saved to {spare} instead" in stderr
        assert "Traceback" not in stderr
        assert load(spare).warnings == []
    finally:
        spare.unlink(missing_ok=True)
