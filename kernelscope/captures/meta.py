"""A capture's metadata (the `kernelscope` JSON in the Parquet footer): the dtype's JSON form,
and the check that what a file says is what a replay can use.

Every key a replay reads is checked for presence and type before it is used, so a damaged
or hand-edited file fails here with the key's name, not later with a KeyError or TypeError
from deep inside a replay.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import CaptureError

FORMAT = "kernelscope-capture"
# 1: no checksums (captures up to 2026-12); 2: a SHA-256 of the metadata and of each map's columns;
# 3: map snapshots (`tables`: aggregation maps at stop(), captures/tables.py)
VERSION = 3
KINDS = ("ringbuf", "perf")
COLUMNS = ("record", "ks_seq", "ks_arrival_ns", "ks_cpu")  # checksummed per map
COUNTS = ("attempted", "received", "dropped", "lost_records")  # in_flight, read live, may be < 0
SAMPLED = (*COUNTS, "fill_bytes")  # what a replay reads from each history sample


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


def record_dtype(obj: Any, key: str) -> np.dtype:
    """The dtype a metadata entry describes; CaptureError naming `key` if it describes none
    a record can have (objects hold pointers, not bytes from a ring)."""
    try:
        dt = dtype_from_json(obj)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as e:
        raise CaptureError(f"metadata key '{key}' is not a numpy dtype description ({e})") from None
    if dt.hasobject or dt.itemsize <= 0 or dt.subdtype is not None:  # an event is a struct or a scalar
        raise CaptureError(f"metadata key '{key}' describes {dt}, which no event record can have")
    return dt


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _is_int(v: Any) -> bool:
    """An integer a numpy int64 holds (times in ns and counters become int64 columns)."""
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


_KINDS: dict[str, tuple[Any, str]] = {
    "object": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (_is_int, "a 64-bit integer"),
    "count": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "number": (_is_number, "a finite number"),
    "str?": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "scalar": (lambda v: v is None or isinstance(v, (str, bool)) or _is_number(v),
               "a number, string or null"),
    "sha256": (lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
               "a SHA-256 in hex"),
}


def need(obj: dict[str, Any], key: str, where: str, kind: str, required: bool = True) -> Any:
    """obj[key] checked to be of `kind` (a _KINDS name); None when absent and not required."""
    name = f"{where}.{key}" if where else key
    if key not in obj:
        if required:
            raise CaptureError(f"metadata key '{name}' is missing")
        return None
    ok, what = _KINDS[kind]
    if not ok(obj[key]):
        raise CaptureError(f"metadata key '{name}' should be {what}, got {_show(obj[key])}")
    return obj[key]


def _each(items: list[Any], where: str, kind: str) -> None:
    ok, what = _KINDS[kind]
    for i, item in enumerate(items):
        if not ok(item):
            raise CaptureError(f"metadata key '{where}[{i}]' should be {what}, got {_show(item)}")


def _samples(items: list[Any], where: str, kinds: dict[str, str]) -> None:
    """A list of {"t": seconds, ...} (history samples, reload marks), `kinds` the keys a
    replay reads; other keys hold numbers, strings or nulls."""
    _each(items, where, "object")
    for i, item in enumerate(items):
        need(item, "t", f"{where}[{i}]", "number")
        for k in item:
            need(item, k, f"{where}[{i}]", kinds.get(k, "scalar"))


def check_map(m: Any, where: str, version: int) -> np.dtype:
    """One `maps.NAME` entry; returns its dtype."""
    if not isinstance(m, dict):
        raise CaptureError(f"metadata key '{where}' should be an object, got {_show(m)}")
    kind = need(m, "kind", where, "str")
    if kind not in KINDS:
        raise CaptureError(f"metadata key '{where}.kind' is {kind!r}: a map is one of {', '.join(KINDS)}")
    if "dtype" not in m:
        raise CaptureError(f"metadata key '{where}.dtype' is missing")
    dt = record_dtype(m["dtype"], f"{where}.dtype")
    stats = need(m, "stats", where, "object")
    for k in stats:
        need(stats, k, f"{where}.stats", "count" if k in COUNTS else "scalar")
    _samples(need(m, "history", where, "list"), f"{where}.history", dict.fromkeys(SAMPLED, "number"))
    full = version >= 2  # version 1 files written before these keys existed lack them
    need(m, "pages", where, "count", required=full)
    need(m, "epoch_offset_ns", where, "int", required=full)
    marks = need(m, "marks", where, "list", required=full) or []
    _samples(marks, f"{where}.marks", {"what": "str"})
    for i, mark in enumerate(marks):
        need(mark, "what", f"{where}.marks[{i}]", "str")
    if full:
        need(m, "rows", where, "count")
        sums = need(m, "sha256", where, "object")
        for col in COLUMNS:
            need(sums, col, f"{where}.sha256", "sha256")
    return dt


def check(meta: Any) -> dict[str, np.dtype]:
    """Check a capture's metadata (parsed JSON) before anything reads it; returns each map's
    dtype. Raises CaptureError naming the key that is missing or malformed."""
    if not isinstance(meta, dict):
        raise CaptureError(f"the kernelscope metadata should be a JSON object, got {_show(meta)}")
    fmt = meta.get("format")
    if fmt != FORMAT:
        raise CaptureError(f"not a kernelscope capture (its metadata says format {fmt!r}, not {FORMAT!r})")
    version = need(meta, "version", "", "int")
    if version < 1:
        raise CaptureError(f"metadata key 'version' is {version}: capture versions start at 1")
    if version > VERSION:
        raise CaptureError(
            f"a capture of newer format {version} than this kernelscope reads ({VERSION}): "
            "upgrade kernelscope to replay it"
        )
    full = version >= 2
    need(meta, "source", "", "str", required=full)
    need(meta, "host", "", "object", required=full)
    need(meta, "started_ns", "", "int", required=full)
    settings = need(meta, "settings", "", "object", required=full) or {}
    need(settings, "name", "settings", "str?", required=False)
    need(settings, "backend", "settings", "str", required=False)
    for name in need(settings, "send_stats", "settings", "object", required=False) or {}:
        need(settings["send_stats"], name, "settings.send_stats", "object")
    for name, obj in (need(settings, "user_ring_dtypes", "settings", "object", required=False) or {}).items():
        record_dtype(obj, f"settings.user_ring_dtypes.{name}")
    maps = need(meta, "maps", "", "object")
    return {name: check_map(m, f"maps.{name}", version) for name, m in maps.items()}
