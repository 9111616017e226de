"""Captures: one Parquet file that holds a probe's events and everything needed to replay them.

Rows are events of every output map, in arrival order: `map`, `ks_seq`, `ks_arrival_ns`,
`ks_cpu` and `record`, the raw C struct bytes. Raw bytes keep the dtypes exact (nested
structs, padding, char arrays) and cost no more than the ring did. The file's key-value
metadata (`kernelscope` key, JSON) describes the rest: each map's numpy dtype, final stats,
the counters sampled over time, the program text, buffer settings, kernel and host facts.

Integrity (format 2): the metadata holds each map's row count and a SHA-256 of each of its
columns as decoded, and `kernelscope.sha256` holds the SHA-256 of the metadata itself, so a
file damaged anywhere either replays exactly what was saved or fails to load with a
CaptureError naming what is wrong. Format 1 files (no checksums) still load, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import CaptureDamagedError, CaptureError, CaptureMissingError
from ..readers.batch import packed
from . import frames as _frames
from . import meta as _meta
from .atomic import atomic_path
from .meta import FORMAT, VERSION, dtype_from_json, dtype_to_json
from .tables import TableCapture, from_rows, to_meta
from .tables import check as check_table

__all__ = ["FORMAT", "VERSION", "Capture", "MapCapture", "TableCapture",
           "dtype_from_json", "dtype_to_json", "load",
           "save", "upgrade"]

META_KEY = b"kernelscope"
SUM_KEY = b"kernelscope.sha256"  # SHA-256 (hex) of the META_KEY value
SCHEMA = pa.schema([("map", pa.string()), ("ks_seq", pa.int64()), ("ks_arrival_ns", pa.int64()),
                    ("ks_cpu", pa.int16()), ("record", pa.binary())])
# What pyarrow raises on a file it cannot parse: its own errors, and OSError/ValueError kinds
# from the thrift and decompression layers.
READ_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)


def host_facts() -> dict[str, Any]:
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "hostname": platform.node(),
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@dataclass
class MapCapture:
    """One output map as captured."""

    name: str
    kind: str
    dtype: np.dtype
    records: np.ndarray
    seq: np.ndarray
    arrival_ns: np.ndarray  # monotonic ns of the read that brought each event, as recorded
    cpu: np.ndarray | None
    stats: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    pages: int = 0
    epoch_offset_ns: int = 0
    marks: list[dict[str, Any]] = field(default_factory=list)  # reloads: {"t": s from start, "what"}


@dataclass
class Capture:
    maps: dict[str, MapCapture]
    source: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=host_facts)
    started_ns: int = 0  # monotonic ns when draining began; the file stores arrival times relative to it
    warnings: list[str] = field(default_factory=list)  # what loading found (e.g. no checksums to verify)
    tables: dict[str, TableCapture] = field(default_factory=dict)  # map snapshots at stop() (format 3)
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)  # derived frames (captures/frames.py)


def _table(capture: Capture) -> pa.Table:
    """Every map's events as rows, in arrival order (stable: a map's own order is kept)."""
    names, seqs, arrivals, cpus, blobs = [], [], [], [], []
    for name, mc in capture.maps.items():
        n = len(mc.records)
        names.append(np.full(n, name, dtype=object))
        seqs.append(mc.seq.astype(np.int64))
        arrivals.append(mc.arrival_ns.astype(np.int64) - capture.started_ns)
        cpus.append(mc.cpu.astype(np.int16) if mc.cpu is not None else np.full(n, -1, np.int16))
        raw = packed(mc.records).view(np.uint8).reshape(n, mc.dtype.itemsize)
        blobs.append(_binary(raw, mc.dtype.itemsize))
    for name, tc in capture.tables.items():
        raw = np.ascontiguousarray(tc.records)
        n = len(raw)
        names.append(np.full(n, name, dtype=object))
        seqs.append(np.arange(n, dtype=np.int64))
        arrivals.append(np.zeros(n, np.int64))
        cpus.append(np.full(n, -1, np.int16))
        blobs.append(_binary(raw, raw.shape[1]))
    for name, df in capture.frames.items():
        data = _frames.encode(df)
        names.append(np.full(1, _frames.PREFIX + name, dtype=object))
        seqs.append(np.zeros(1, np.int64))
        arrivals.append(np.zeros(1, np.int64))
        cpus.append(np.full(1, -1, np.int16))
        blobs.append(pa.array([data], type=pa.binary()))
    order = np.argsort(np.concatenate(arrivals), kind="stable") if arrivals else np.empty(0, int)
    return pa.table(
        {
            "map": pa.array(np.concatenate(names) if names else [], type=pa.string()).take(order),
            "ks_seq": pa.array(np.concatenate(seqs) if seqs else [], type=pa.int64()).take(order),
            "ks_arrival_ns": pa.array(np.concatenate(arrivals) if arrivals else [], type=pa.int64()).take(
                order
            ),
            "ks_cpu": pa.array(np.concatenate(cpus) if cpus else [], type=pa.int16()).take(order),
            "record": (pa.concat_arrays(blobs) if blobs else pa.array([], type=pa.binary())).take(order),
        },
        schema=SCHEMA,
    )


def _binary(raw: np.ndarray, size: int) -> pa.Array:
    """(n, size) uint8 rows as a binary column."""
    n = len(raw)
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(size), n, [None, pa.py_buffer(np.ascontiguousarray(raw).tobytes())]).cast(pa.binary())


def _binary_parts(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A binary column as (length of each value, all value bytes), without a Python object per row."""
    arr = col.combine_chunks()
    if not len(arr):
        return np.empty(0, np.int32), np.empty(0, np.uint8)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    values = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)
    return np.diff(offsets), values[offsets[0] : offsets[-1]]


def _digests(rows: pa.Table) -> dict[str, str]:
    """SHA-256 of each of one map's columns, over the values as decoded (so it checks what a
    replay will see, whatever Parquet's encoding and compression did on the way)."""
    lengths, data = _binary_parts(rows.column("record"))
    record = hashlib.sha256(lengths.astype("<i4").tobytes())
    record.update(data.tobytes())
    out = {"record": record.hexdigest()}
    for col, dt in (("ks_seq", "<i8"), ("ks_arrival_ns", "<i8"), ("ks_cpu", "<i2")):
        values = np.ascontiguousarray(rows.column(col).to_numpy(), dt)
        out[col] = hashlib.sha256(values.tobytes()).hexdigest()
    return out


def _rows_of(table: pa.Table, name: str) -> pa.Table:
    return table.filter(pc.equal(table.column("map"), pa.scalar(name, pa.string())))


def _write(table: pa.Table, meta: dict[str, Any], path: Path) -> Path:
    """`table` with `meta` (given each map's row count and checksums here) as one file,
    atomically: the name holds the old file or the whole new one, never a part."""
    for name, m in [*meta["maps"].items(), *meta.get("tables", {}).items(),
                    *((_frames.PREFIX + n, f) for n, f in meta.get("frames", {}).items())]:
        rows = _rows_of(table, name)
        m["rows"] = rows.num_rows
        m["sha256"] = _digests(rows)
    meta["version"] = VERSION
    text = json.dumps(meta, default=_jsonable).encode()
    digest = hashlib.sha256(text).hexdigest().encode()
    table = table.replace_schema_metadata({META_KEY: text, SUM_KEY: digest})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def save(capture: Capture, path: str | os.PathLike[str]) -> Path:
    """Write `capture` as one Parquet file (atomically: a partial file never has the name)."""
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "source": capture.source,
        "settings": capture.settings,
        "host": capture.host,
        "started_ns": capture.started_ns,
        "maps": {
            name: {
                "kind": mc.kind,
                "dtype": dtype_to_json(mc.dtype),
                "stats": mc.stats,
                "history": [{**h, "t": h["t"]} for h in mc.history],
                "pages": mc.pages,
                "epoch_offset_ns": mc.epoch_offset_ns,
                "marks": mc.marks,
            }
            for name, mc in capture.maps.items()
        },
        "tables": {name: to_meta(tc) for name, tc in capture.tables.items()},
        "frames": {name: _frames.meta_of(df) for name, df in capture.frames.items()},
    }
    clash = set(capture.maps) & set(capture.tables)
    if clash:
        raise CaptureError(f"map {sorted(clash)[0]!r} is both an output map and a snapshot")
    return _write(_table(capture), meta, Path(path))


def _records(col: pa.ChunkedArray, dtype: np.dtype, name: str) -> np.ndarray:
    """The binary column's bytes as records of `dtype`."""
    lengths, data = _binary_parts(col)
    if (lengths != dtype.itemsize).any():
        sizes = ", ".join(str(n) for n in sorted(set(lengths.tolist()))[:5])
        raise CaptureError(
            f"map {name!r}: records of {sizes} bytes do not match its {dtype.itemsize}-byte dtype"
        )
    return data.view(dtype).copy() if len(data) else np.empty(0, dtype)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a capture's metadata")


def load(path: str | os.PathLike[str]) -> Capture:
    """Read and verify a capture. CaptureMissingError when there is no file; CaptureError
    (CaptureDamagedError for damage) saying what is wrong with one that is not a whole
    kernelscope capture this version reads."""
    path = Path(path)
    if not path.exists():
        raise CaptureMissingError(
            f"no capture file at {path}: check the path (a capture is written by Probe.save, "
            "`kernelscope record` or KERNELSCOPE_MODE=record)"
        )
    if path.is_dir():
        raise CaptureError(f"{path} is a folder, not a capture file")
    try:
        return _load(path)
    except CaptureError as e:
        raise type(e)(f"{path}: {e}") from None


def _open(path: Path) -> pq.ParquetFile:
    size = path.stat().st_size
    if size == 0:
        raise CaptureError("the file is empty (0 bytes): not a capture")
    with path.open("rb") as f:
        head = f.read(4)
    try:
        return pq.ParquetFile(path)
    except READ_ERRORS as e:
        if head == b"PAR1":  # Parquet's leading magic: a Parquet file whose footer is gone or damaged
            raise CaptureDamagedError(f"damaged or truncated Parquet file ({size:,} bytes): {e}") from None
        raise CaptureError(f"not a Parquet file (a capture is one): {e}") from None


def _metadata(pf: pq.ParquetFile) -> tuple[dict[str, Any], dict[str, np.dtype], list[str]]:
    """The checked metadata, each map's dtype, and warnings (map snapshots: `meta["tables"]`,
    checked, their dtypes in `meta["_table_dtypes"]`)."""
    kv = pf.metadata.metadata or {}
    raw = kv.get(META_KEY)
    if raw is None:
        raise CaptureError(
            f"not a kernelscope capture (no kernelscope metadata): a Parquet file with columns "
            f"{', '.join(pf.schema_arrow.names) or 'none'}, "
            f"written by {pf.metadata.created_by or 'an unknown tool'}"
        )
    digest = kv.get(SUM_KEY)
    if digest is not None and hashlib.sha256(raw).hexdigest().encode() != digest:
        raise CaptureDamagedError("the kernelscope metadata fails its checksum: the file is damaged")
    try:
        meta = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
        raise CaptureError(f"the kernelscope metadata is not valid JSON ({e})") from None
    dtypes = _meta.check(meta)
    tables = _meta.need(meta, "tables", "", "object", required=False) or {}
    if tables and meta["version"] < 3:
        raise CaptureError(f"metadata key 'tables' is in a format {meta['version']} capture (map snapshots "
                           "came with format 3)")
    meta["_table_dtypes"] = {name: check_table(m, f"tables.{name}") for name, m in tables.items()}
    for name, m in (_meta.need(meta, "frames", "", "object", required=False) or {}).items():
        _frames.check(m, f"frames.{name}")
    if set(tables) & set(dtypes):
        both = sorted(set(tables) & set(dtypes))[0]
        raise CaptureError(f"map {both!r} is both an output map and a snapshot")
    warnings = []
    if meta["version"] >= 2 and digest is None:
        raise CaptureDamagedError(f"metadata key '{SUM_KEY.decode()}' (the metadata's checksum) is missing")
    if meta["version"] < 2:
        warnings.append(
            f"capture format {meta['version']} has no checksums, so damage to its contents cannot be "
            "detected; kernelscope.captures.capture.upgrade(path) adds them"
        )
    return meta, dtypes, warnings


def _check_columns(table: pa.Table) -> None:
    for f in SCHEMA:
        if f.name not in table.column_names:
            raise CaptureError(f"column {f.name!r} is missing (the file has {', '.join(table.column_names)})")
        col = table.column(f.name)
        if col.type != f.type:
            raise CaptureError(f"column {f.name!r} holds {col.type}, a capture stores {f.type}")
        if col.null_count:
            raise CaptureDamagedError(f"column {f.name!r} has {col.null_count:,} missing values")


def _check_maps(table: pa.Table, dtypes: dict[str, Any]) -> None:
    """Every row belongs to a map the metadata describes (a renamed map would replay nothing)."""
    known = pc.is_in(table.column("map"), value_set=pa.array(list(dtypes), pa.string()))
    unknown = table.num_rows - pc.sum(known.cast(pa.int64())).as_py() if table.num_rows else 0
    if not unknown:
        return
    others = pc.unique(table.column("map").filter(pc.invert(known))).cast(pa.binary()).to_pylist()
    held = ", ".join(repr(b.decode(errors="replace")) for b in others[:5])
    described = ", ".join(repr(n) for n in dtypes) or "none"
    raise CaptureError(
        f"{unknown:,} rows belong to map {held}, which the metadata does not describe "
        f"(it describes {described})"
    )


def _verify(name: str, rows: pa.Table, m: dict[str, Any]) -> None:
    """One map's rows against the count and checksums saved with them (format 2)."""
    if rows.num_rows != m["rows"]:
        raise CaptureDamagedError(f"map {name!r} has {rows.num_rows:,} rows, its metadata says {m['rows']:,}")
    for col, digest in _digests(rows).items():
        if digest != m["sha256"][col]:
            raise CaptureDamagedError(f"map {name!r}: column {col!r} fails its checksum: the file is damaged")


def _load(path: Path) -> Capture:
    pf = _open(path)
    meta, dtypes, warnings = _metadata(pf)
    try:
        table = pf.read()
    except READ_ERRORS as e:
        raise CaptureDamagedError(f"the events cannot be read, the file is damaged: {e}") from None
    _check_columns(table)
    _check_maps(table, {**dtypes, **meta["_table_dtypes"],
                        **{_frames.PREFIX + n: None for n in meta.get("frames", {})}})
    started_ns = int(meta.get("started_ns", 0))
    maps = {}
    for name, m in meta["maps"].items():
        sub = _rows_of(table, name)
        if meta["version"] >= 2:
            _verify(name, sub, m)
        cpu = sub.column("ks_cpu").to_numpy().astype(np.int16)
        maps[name] = MapCapture(
            name=name,
            kind=m["kind"],
            dtype=dtypes[name],
            records=_records(sub.column("record"), dtypes[name], name),
            seq=sub.column("ks_seq").to_numpy().astype(np.int64),
            # the file keeps them relative to started_ns; in memory they are as recorded, so a
            # loaded capture saved again writes the same times
            arrival_ns=sub.column("ks_arrival_ns").to_numpy().astype(np.int64) + started_ns,
            cpu=cpu if m["kind"] == "perf" else None,
            stats=m["stats"],
            history=m["history"],
            pages=m.get("pages", 0),
            epoch_offset_ns=m.get("epoch_offset_ns", 0),
            marks=m.get("marks", []),
        )
    tables = {}
    for name, m in meta.get("tables", {}).items():
        sub = _rows_of(table, name)
        _verify(name, sub, m)
        lengths, data = _binary_parts(sub.column("record"))
        key, value = meta["_table_dtypes"][name]
        tables[name] = from_rows(name, m, key, value, lengths=lengths, data=data)
    frames = {}
    for name, m in meta.get("frames", {}).items():
        sub = _rows_of(table, _frames.PREFIX + name)
        _verify(name, sub, m)
        frames[name] = _frames.decode(name, sub.column("record")[0].as_py(), m.get("attrs", {}))
    return Capture(maps, meta.get("source", ""), meta.get("settings", {}), meta.get("host", {}),
                   started_ns, warnings, tables, frames)


def upgrade(path: str | os.PathLike[str]) -> Path:
    """Rewrite a format-1 capture as the current format (checksums added), in place and
    atomically; the events and metadata stay as they were. A no-op for a current one."""
    path = Path(path)
    load(path)  # what cannot be read is not rewritten
    pf = pq.ParquetFile(path)
    meta = json.loads(pf.metadata.metadata[META_KEY])
    if meta["version"] >= VERSION:
        return path
    table = pf.read().select(SCHEMA.names).cast(SCHEMA).replace_schema_metadata(None)
    return _write(table, meta, path)
