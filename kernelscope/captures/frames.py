"""Derived frames in a capture: tables kernelscope made from the kernel's data at stop(), kept
so a replay shows them without the kernel (and without the processes they name).

Two kinds today: `printk` (what the programs printed, kernelscope.printk) and the stacks of each
(counting map, stack-trace map) pair with their symbols (`stacks:COUNTS:STACKS` and the long
form `stack_frames:COUNTS:STACKS`, kernelscope.stacks): symbols are read from the processes'
ELF files while they live, so a replay elsewhere cannot name the addresses again.

Each frame is one row of the capture's table: `map` is `frame:NAME`, `record` the frame as a
Parquet file of its own (types kept: strings, lists, datetimes). The metadata's `frames.NAME`
holds its row count, its `attrs` (JSON) and, like every map, the rows' checksums (format 3).
Columns Arrow stores as lists (root-first stacks) come back as tuples, as they were made.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CaptureDamagedError, CaptureError
from .meta import need

PREFIX = "frame:"  # the `map` column's value for a frame's row: no map name has a colon


def encode(df: pd.DataFrame) -> bytes:
    """`df` (index dropped) as the bytes of a Parquet file."""
    try:
        table = pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise CaptureError(f"a frame with columns {list(df.columns)} cannot be stored: {e}") from None
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(None), sink, compression="zstd")
    return bytes(sink.getvalue().to_pybytes())


def decode(name: str, data: bytes, attrs: dict[str, Any]) -> pd.DataFrame:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise CaptureDamagedError(f"frame {name!r} cannot be read, the file is damaged: {e}") from None
    df = table.to_pandas()
    for f in table.schema:
        if pa.types.is_list(f.type) or pa.types.is_large_list(f.type):
            df[f.name] = [tuple(v) if v is not None else () for v in df[f.name]]
    df.attrs.update(attrs)
    return df


def meta_of(df: pd.DataFrame) -> dict[str, Any]:
    try:
        attrs = json.loads(json.dumps(df.attrs, default=str))
    except (TypeError, ValueError):
        attrs = {}
    return {"frame_rows": len(df), "attrs": attrs}


def check(m: Any, where: str) -> None:
    if not isinstance(m, dict):
        raise CaptureError(f"metadata key '{where}' should be an object")
    need(m, "frame_rows", where, "count")
    need(m, "rows", where, "count")
    need(m, "sha256", where, "object")
    if not isinstance(m.get("attrs", {}), dict):
        raise CaptureError(f"metadata key '{where}.attrs' should be an object")
    if m["rows"] != 1:
        raise CaptureError(f"metadata key '{where}.rows' is {m['rows']}: a frame is stored as one row")
