"""The maps layer without a kernel: decoding the bytes a map read gives, encoding what a user
writes, BCC's ctypes types as numpy dtypes, snapshots in captures, watch history."""

from __future__ import annotations

import ctypes
import hashlib
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from kernelscope.backends.maptypes import ctypes_dtype
from kernelscope.captures import capture
from kernelscope.captures.replay import Replay
from kernelscope.captures.tables import TableCapture
from kernelscope.errors import CaptureDamagedError, CaptureError, KernelscopeError
from kernelscope.maps import types
from kernelscope.maps.watch import Watch, WatchError


class Inner(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint8), ("b", ctypes.c_uint64)]


class Key(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint32), ("comm", ctypes.c_char * 16), ("arr", ctypes.c_uint32 * 3),
                ("inner", Inner)]


def test_bcc_ctypes_become_dtypes_with_the_same_layout_and_char_arrays_as_strings() -> None:
    dt = ctypes_dtype(Key)
    assert dt is not None
    assert dt.itemsize == ctypes.sizeof(Key)
    assert dt.fields["comm"][0] == np.dtype("S16")
    assert dt.fields["arr"][0] == np.dtype(("<u4", (3,)))
    assert dt.fields["inner"][1] == Key.inner.offset
    assert dt.fields["inner"][0].fields["b"][1] == Inner.b.offset
    k = Key(7, b"bash", (1, 2, 3), Inner(9, 1 << 40))
    rec = np.frombuffer(bytes(k), dt)[0]
    got = types.python(rec)
    assert got["pid"] == 7
    assert got["comm"] == "bash"
    assert got["arr"].tolist() == [1, 2, 3]
    assert got["inner"] == {"a": 9, "b": 1 << 40}
    assert ctypes_dtype(ctypes.c_ulonglong) == np.dtype("<u8")


def _per_cpu_bytes(values: list[list[int]], size: int) -> np.ndarray:
    """Rows of per-CPU values the way the kernel gives them: each CPU's value padded to 8 bytes."""
    rows = []
    for per in values:
        row = b"".join(int(v).to_bytes(size, "little") + bytes(-size % 8) for v in per)
        rows.append(np.frombuffer(row, np.uint8))
    return np.stack(rows)


def test_per_cpu_values_are_summed_and_the_per_cpu_rows_sum_to_them() -> None:
    keys = np.array([[2, 0, 0, 0], [1, 0, 0, 0]], np.uint8)
    values = _per_cpu_bytes([[5, 6, 7], [1, 0, 1]], 4)  # u32 values: 4 bytes padded to 8
    summed = types.decode(keys, values, np.dtype("<u4"), np.dtype("<u4"), per_cpu=True, ncpus=3)
    assert summed["key"].tolist() == [1, 2]  # integer keys in order
    assert summed["value"].tolist() == [2, 18]
    rows = types.decode(keys, values, np.dtype("<u4"), np.dtype("<u4"), per_cpu=True, ncpus=3, by_cpu=True)
    assert list(rows.columns) == ["key", "cpu", "value"]
    assert rows.groupby("key")["value"].sum().tolist() == [2, 18]


def test_struct_values_sum_numbers_and_keep_text_and_arrays_go_in_one_column() -> None:
    val = np.dtype({"names": ["count", "name", "slots"], "formats": ["<u8", "S8", ("<u4", (2,))],
                    "offsets": [0, 8, 16], "itemsize": 24})
    one = np.zeros(2, val)
    one["count"] = [3, 4]
    one["name"] = [b"first", b"second"]
    one["slots"] = [[1, 2], [10, 20]]
    raw = one.view(np.uint8).reshape(1, 48)
    df = types.decode(np.zeros((1, 4), np.uint8), raw, np.dtype("<u4"), val, per_cpu=True, ncpus=2)
    assert list(df.columns) == ["key", "count", "name", "slots"]
    assert df["count"].tolist() == [7]
    assert df["name"].tolist() == ["first"]  # text is the first CPU's
    assert df["slots"][0].tolist() == [11, 22]


def test_a_value_field_named_like_a_key_field_is_prefixed() -> None:
    k = np.dtype([("pid", "<u4")])
    v = np.dtype([("pid", "<u4"), ("n", "<u4")])
    df = types.frame(np.zeros(1, k), np.zeros(1, v))
    assert list(df.columns) == ["pid", "value.pid", "n"]


def test_encode_takes_ints_dicts_dotted_names_and_records_and_names_what_is_wrong() -> None:
    dt = np.dtype([("pid", "<u4"), ("comm", "S8"), ("inner", [("a", "u1"), ("b", "<u8")])])
    data = types.encode({"pid": 5, "comm": "sh", "inner.b": 9}, dt, "k")
    rec = np.frombuffer(data, dt)[0]
    assert (rec["pid"], rec["comm"], rec["inner"]["b"]) == (5, b"sh", 9)
    assert types.encode({"pid": 5, "comm": "sh", "inner": {"b": 9}}, dt, "k") == data
    assert types.encode(rec, dt, "k") == data
    assert types.encode(7, np.dtype("<u8"), "v") == (7).to_bytes(8, "little")
    with pytest.raises(KernelscopeError, match=r"no field 'pdi' \(fields: pid, comm, inner\)"):
        types.encode({"pdi": 1}, dt, "k")
    with pytest.raises(KernelscopeError, match="does not fit in 4 bytes"):
        types.encode(1 << 33, np.dtype("<u4"), "k")
    with pytest.raises(KernelscopeError, match="3 bytes given, the map's are 4"):
        types.encode(b"abc", np.dtype("<u4"), "k")


def _snapshot() -> TableCapture:
    key = np.dtype([("pid", "<u4"), ("comm", "S8")])
    value = np.dtype("<u8")
    keys = np.zeros(3, key)
    keys["pid"] = [30, 10, 20]
    keys["comm"] = [b"c", b"a", b"b"]
    values = _per_cpu_bytes([[1, 2], [3, 4], [5, 6]], 8)
    return TableCapture("counts", "percpu_hash", key, value, 128, 2, True,
                        keys.view(np.uint8).reshape(3, 12), values, 123)


def _saved(tmp_path) -> str:
    cap = capture.Capture({}, "source", {"name": "t"}, started_ns=0, tables={"counts": _snapshot()})
    return str(capture.save(cap, tmp_path / "t.parquet"))


def test_snapshots_round_trip_through_a_capture_and_replay_the_same_frame(tmp_path) -> None:
    path = _saved(tmp_path)
    loaded = capture.load(path)
    tc = loaded.tables["counts"]
    want = _snapshot()
    assert (tc.key_dtype, tc.value_dtype, tc.per_cpu, tc.ncpus) == (want.key_dtype, want.value_dtype, True, 2)
    np.testing.assert_array_equal(tc.keys, want.keys)
    np.testing.assert_array_equal(tc.values, want.values)
    r = Replay(loaded, speed=None)
    df = r.maps["counts"].frame()
    assert df.to_dict("list") == {"pid": [30, 10, 20], "comm": ["c", "a", "b"], "value": [3, 7, 11]}
    assert r.maps["counts"].frame(per_cpu=True)["value"].tolist() == [1, 2, 3, 4, 5, 6]
    assert r.maps["counts"].lookup({"pid": 10, "comm": "a"}) == 7
    with pytest.raises(KernelscopeError, match="this is a replay"):
        r.maps["counts"].drain()
    with pytest.raises(KernelscopeError, match="BPF_ARRAY"):
        dict(r.globals)  # a bcc capture (no backend setting): no globals


def _edit(path: str, edit) -> None:
    table = pq.read_table(path)
    kv = dict(table.schema.metadata)
    meta = json.loads(kv[capture.META_KEY])
    edit(meta)
    kv[capture.META_KEY] = json.dumps(meta).encode()
    kv[capture.SUM_KEY] = hashlib.sha256(kv[capture.META_KEY]).hexdigest().encode()
    pq.write_table(table.replace_schema_metadata(kv), path)


def test_a_damaged_or_inconsistent_snapshot_is_refused_by_name(tmp_path) -> None:
    path = _saved(tmp_path)
    _edit(path, lambda m: m["tables"]["counts"].update(value_bytes=8))
    with pytest.raises(CaptureError, match=r"tables.counts.value_bytes' is 8, its value dtype needs 16"):
        capture.load(path)
    path = _saved(tmp_path)
    _edit(path, lambda m: m["tables"]["counts"]["sha256"].update(record="0" * 64))
    with pytest.raises(CaptureDamagedError, match="'counts': column 'record' fails its checksum"):
        capture.load(path)
    path = _saved(tmp_path)
    _edit(path, lambda m: m.update(version=2))
    with pytest.raises(CaptureError, match="map snapshots came with format 3"):
        capture.load(path)


def test_a_format_2_capture_without_snapshots_replays_with_no_maps(tmp_path) -> None:
    path = _saved(tmp_path)

    def older(m: dict) -> None:
        m["version"] = 2
        del m["tables"]
    table = pq.read_table(path)
    empty = table.filter(np.zeros(table.num_rows, bool))  # format 2 had no snapshot rows
    pq.write_table(empty.replace_schema_metadata(table.schema.metadata), path)
    _edit(path, older)
    r = Replay(capture.load(path), speed=None)
    assert list(r.maps) == []


def test_watch_history_is_tidy_with_a_snapshot_time_column() -> None:
    n = iter(range(1, 10))

    def read() -> pd.DataFrame:
        k = next(n)
        return pd.DataFrame({"key": [1, 2], "value": [k, 2 * k]})

    w = Watch(read, 1.0, "counts")
    w.sample()
    w.sample()
    h = w.history()
    assert list(h.columns) == ["snapshot_time", "key", "value"]
    assert h.groupby("key")["value"].diff().dropna().tolist() == [1, 2]
    with pytest.raises(KernelscopeError, match="positive interval"):
        Watch(read, 0)


def test_watch_keeps_a_value_field_named_time_and_only_the_last_max_samples() -> None:
    """A value struct with a `time` field (struct { u64 time; u64 n; }) keeps it; snapshots
    beyond max_samples drop the oldest (was: `assign(time=)` overwrote it, samples grew forever)."""
    n = iter(range(1, 100))

    def read() -> pd.DataFrame:
        k = next(n)
        return pd.DataFrame({"key": [1], "time": [1000 + k], "n": [k]})

    w = Watch(read, 1.0, "last", max_samples=3)
    for _ in range(5):
        w.sample()
    h = w.history()
    assert list(h.columns) == ["snapshot_time", "key", "time", "n"]
    assert h["time"].tolist() == [1003, 1004, 1005]
    assert h["n"].tolist() == [3, 4, 5]
    with pytest.raises(KernelscopeError, match="max_samples"):
        Watch(read, 1.0, max_samples=0)


def test_a_failed_read_ends_the_watch_and_history_says_why() -> None:
    calls = iter(range(3))

    def read() -> pd.DataFrame:
        if next(calls) == 1:
            raise OSError(9, "Bad file descriptor")
        return pd.DataFrame({"key": [1], "value": [1]})

    w = Watch(read, 0.01, "counts")
    w.start()
    w._thread.join(timeout=10)  # type: ignore[union-attr]  # ends by itself on the error
    assert not w.running
    with pytest.warns(WatchError, match="Bad file descriptor"):
        h = w.history()
    assert len(h) == 1  # what was seen before the error is kept


def test_a_declared_type_of_the_wrong_size_is_dropped_with_a_warning() -> None:
    """Reads hand the kernel buffers of the dtype's size: a type smaller than the kernel's
    key/value would be written past, so it is replaced by raw bytes and a warning says so."""
    from kernelscope.maps.table import MapTypeWarning, _checked

    assert _checked("m", "value", np.dtype("<u8"), 8) == np.dtype("<u8")
    assert _checked("m", "value", None, 12) is None
    with pytest.warns(MapTypeWarning, match="value type u32 has 4 bytes, the kernel's value 12"):
        assert _checked("m", "value", np.dtype("<u4"), 12) is None
