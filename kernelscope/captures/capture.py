"""Captures: one Parquet file that holds a probe's events and everything needed to replay them.

Rows are events of every output map, in arrival order: `map`, `ks_seq`, `ks_arrival_ns`,
`ks_cpu` and `record`, the raw C struct bytes. Raw bytes keep the dtypes exact (nested
structs, padding, char arrays) and cost no more than the ring did. The file's key-value
metadata (`kernelscope` key, JSON) describes the rest: each map's numpy dtype, final stats,
the counters sampled over time, the program text, buffer settings, kernel and host facts.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CaptureError

FORMAT = "kernelscope-capture"
VERSION = 1
META_KEY = b"kernelscope"


def dtype_to_json(dt: np.dtype) -> Any:
    """A JSON form of a numpy dtype that keeps offsets, padding and nesting exactly."""
    if dt.names is not None:
        return {
            "names": list(dt.names),
            "formats": [dtype_to_json(dt.fields[n][0]) for n in dt.names],  # type: ignore[index]
            "offsets": [int(dt.fields[n][1]) for n in dt.names],  # type: ignore[index]
            "itemsize": dt.itemsize,
        }
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        return {"base": dtype_to_json(base), "shape": list(shape)}
    return dt.str


def dtype_from_json(obj: Any) -> np.dtype:
    if isinstance(obj, str):
        return np.dtype(obj)
    if "base" in obj:
        return np.dtype((dtype_from_json(obj["base"]), tuple(obj["shape"])))
    return np.dtype(
        {
            "names": obj["names"],
            "formats": [dtype_from_json(f) for f in obj["formats"]],
            "offsets": obj["offsets"],
            "itemsize": obj["itemsize"],
        }
    )


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
    arrival_ns: np.ndarray
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


def save(capture: Capture, path: str | os.PathLike[str]) -> Path:
    """Write `capture` as one Parquet file (atomically: a partial file never has the name)."""
    path = Path(path)
    names, seqs, arrivals, cpus, blobs = [], [], [], [], []
    for name, mc in capture.maps.items():
        n = len(mc.records)
        names.append(np.full(n, name, dtype=object))
        seqs.append(mc.seq.astype(np.int64))
        arrivals.append(mc.arrival_ns.astype(np.int64) - capture.started_ns)
        cpus.append(mc.cpu.astype(np.int16) if mc.cpu is not None else np.full(n, -1, np.int16))
        raw = np.ascontiguousarray(mc.records).view(np.uint8).reshape(n, mc.dtype.itemsize)
        blobs.append(
            pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(mc.dtype.itemsize), n, [None, pa.py_buffer(raw.tobytes())]
            ).cast(pa.binary())
        )
    order = np.argsort(np.concatenate(arrivals), kind="stable") if arrivals else np.empty(0, int)
    table = pa.table(
        {
            "map": pa.array(np.concatenate(names) if names else [], type=pa.string()).take(order),
            "ks_seq": pa.array(np.concatenate(seqs) if seqs else [], type=pa.int64()).take(order),
            "ks_arrival_ns": pa.array(np.concatenate(arrivals) if arrivals else [], type=pa.int64()).take(
                order
            ),
            "ks_cpu": pa.array(np.concatenate(cpus) if cpus else [], type=pa.int16()).take(order),
            "record": (pa.concat_arrays(blobs) if blobs else pa.array([], type=pa.binary())).take(order),
        }
    )
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
    }
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, default=_jsonable).encode()})
    tmp = path.with_name(path.name + ".part")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def _records(col: pa.ChunkedArray, dtype: np.dtype) -> np.ndarray:
    """The binary column's bytes as records, without a Python object per row."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if not len(arr):
        return np.empty(0, dtype)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    lengths = np.diff(offsets)
    if (lengths != dtype.itemsize).any():
        raise CaptureError(
            f"records of {set(lengths.tolist())} bytes do not match the {dtype.itemsize}-byte dtype"
        )
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.view(dtype).copy()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a capture's metadata")


def load(path: str | os.PathLike[str]) -> Capture:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no capture at {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise CaptureError(f"{path} is not a Parquet file: {e}") from e
    raw_meta = (table.schema.metadata or {}).get(META_KEY)
    if raw_meta is None:
        raise CaptureError(
            f"{path} is Parquet but not a kernelscope capture (no '{META_KEY.decode()}' metadata)"
        )
    meta = json.loads(raw_meta)
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise CaptureError(
            f"{path}: capture version {meta.get('version')} is newer than this kernelscope reads"
        )
    map_col = table.column("map").to_numpy(zero_copy_only=False)
    maps = {}
    for name, m in meta["maps"].items():
        dtype = dtype_from_json(m["dtype"])
        rows = np.flatnonzero(map_col == name)
        sub = table.take(pa.array(rows))
        records = _records(sub.column("record"), dtype)
        cpu = sub.column("ks_cpu").to_numpy().astype(np.int16)
        maps[name] = MapCapture(
            name=name,
            kind=m["kind"],
            dtype=dtype,
            records=records,
            seq=sub.column("ks_seq").to_numpy().astype(np.int64),
            arrival_ns=sub.column("ks_arrival_ns").to_numpy().astype(np.int64),
            cpu=cpu if m["kind"] == "perf" else None,
            stats=m["stats"],
            history=m["history"],
            pages=m.get("pages", 0),
            epoch_offset_ns=m.get("epoch_offset_ns", 0),
            marks=m.get("marks", []),
        )
    return Capture(
        maps,
        meta.get("source", ""),
        meta.get("settings", {}),
        meta.get("host", {}),
        int(meta.get("started_ns", 0)),
    )
