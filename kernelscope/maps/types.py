"""Map keys and values between the kernel's bytes and DataFrame columns / Python values.

A map frame is one row per key: key columns first, then value columns, named as event
frames are (kernelscope.schema): struct fields by name, nested `a.b`, char[N] -> str,
arrays as one column of 1-D arrays; a scalar key is `key`, a scalar value `value`.
Per-CPU values: the kernel gives every possible CPU's value, each padded to 8 bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..errors import KernelscopeError
from ..schema import _columns, _decode
from .syscall import percpu_stride

UINTS = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}


def untyped(size: int) -> np.dtype:
    """A key or value the program gives no type for: an unsigned int of its size, or bytes."""
    return np.dtype(UINTS.get(size, f"V{size}"))


def show(dt: np.dtype) -> str:
    """A short text for a dtype, for repr and HTML: `u32`, `struct{pid: u32, comm: char[16]}`."""
    if dt.names:
        return "{" + ", ".join(f"{n}: {show(dt.fields[n][0])}" for n in dt.names) + "}"  # type: ignore[index]
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        return f"{show(base)}[{']['.join(map(str, shape))}]"
    if dt.kind == "S":
        return f"char[{dt.itemsize}]"
    if dt.kind == "V":
        return f"bytes[{dt.itemsize}]"
    return f"{'s' if dt.kind == 'i' else 'u'}{dt.itemsize * 8}" if dt.kind in "ui" else dt.name


def records(raw: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """(n, >= itemsize) bytes -> n items of `dtype` (an array dtype gives shape (n, *shape))."""
    n = len(raw)
    cells = np.ascontiguousarray(raw[:, : dtype.itemsize])
    if dtype.subdtype is not None:  # numpy views bytes as a struct, not as a sub-array type
        return cells.view(np.dtype([("v", dtype)])).reshape(n)["v"]
    return cells.view(dtype).reshape(n)


def per_cpu_values(raw: np.ndarray, dtype: np.dtype, ncpus: int) -> np.ndarray:
    """(n, ncpus * stride) bytes -> (n, ncpus) records of `dtype`."""
    n = len(raw)
    flat = records(raw.reshape(n * ncpus, percpu_stride(dtype.itemsize)), dtype)
    return flat.reshape(n, ncpus, *flat.shape[1:])


WIDE = {"u": np.dtype("<u8"), "i": np.dtype("<i8"), "f": np.dtype("<f8")}


def summed_dtype(dt: np.dtype) -> np.dtype:
    """The dtype of a per-CPU value summed over CPUs: numbers widened to 64 bits (two CPUs at
    3e9 do not fit a u32), char arrays and bytes as they are."""
    if dt.names is None:
        base, shape = dt.subdtype if dt.subdtype is not None else (dt, ())
        wide = WIDE.get(base.kind, base) if base.kind in "uif" else base
        return np.dtype((wide, shape)) if shape else wide
    return np.dtype([(n, summed_dtype(dt.fields[n][0])) for n in dt.names])  # type: ignore[index]


def summed(values: np.ndarray) -> np.ndarray:
    """(n, ncpus) records summed over CPUs into 64-bit numbers; char arrays and bytes are the
    first CPU's copy that is not all zero (a CPU that never ran the program leaves zeros)."""
    dt = values.dtype
    if dt.names is None:
        base = dt.subdtype[0] if dt.subdtype is not None else dt
        if base.kind in "uif":
            return values.sum(axis=1, dtype=WIDE[base.kind])
        if not len(values):
            return values[:, 0]
        n, ncpus = values.shape[:2]
        raw = np.ascontiguousarray(values).view(np.uint8).reshape(n, ncpus, -1)
        filled: np.ndarray = np.asarray(raw.any(axis=2))  # which CPUs' copies hold any byte
        first = np.where(filled.any(axis=1), filled.argmax(axis=1), 0)
        return values[np.arange(len(values)), first]
    out = np.zeros(len(values), summed_dtype(dt))
    for name in dt.names:
        out[name] = summed(values[name])
    return out


PAD = "__pad"  # BCC's names for the padding it makes explicit in a Key/Leaf struct


def _frame_of(records: np.ndarray, scalar_name: str) -> dict[str, Any]:
    """The columns of decoded records (a struct's fields, BCC's `__pad_N` left out; a scalar
    as one column `scalar_name`)."""
    out: dict[str, Any] = {}
    if records.dtype.names:
        _columns(records, "", out)
        out = {k: v for k, v in out.items() if not k.startswith(PAD)}
    elif records.dtype.kind == "S":
        out[scalar_name] = _decode(records)
    elif records.dtype.kind == "V":
        out[scalar_name] = [bytes(r) for r in records]
    elif records.ndim > 1:
        out[scalar_name] = list(records)
    else:
        out[scalar_name] = records
    return out


def columns(records: np.ndarray, scalar_name: str = "value") -> dict[str, Any]:
    """A struct's columns as map frames give them (stacks frames use it too)."""
    return _frame_of(records, scalar_name)


def key_columns(key: np.dtype) -> list[str]:
    """The columns a map frame gives its keys (the value columns follow them)."""
    return list(_frame_of(np.zeros(0, key), "key"))


def frame(keys: np.ndarray, values: np.ndarray, cpu: np.ndarray | None = None) -> pd.DataFrame:
    """Decoded keys and values (records) as a map frame; `cpu`: a column after the keys."""
    cols = _frame_of(keys, "key")
    if cpu is not None:
        cols["cpu"] = cpu
    for name, col in _frame_of(values, "value").items():
        cols[f"value.{name}" if name in cols else name] = col
    return pd.DataFrame(cols)


def decode(raw_keys: np.ndarray, raw_values: np.ndarray, key: np.dtype, value: np.dtype, *,
           per_cpu: bool, ncpus: int, by_cpu: bool = False) -> pd.DataFrame:
    """A map frame from the bytes syscall.read_all gives; rows in key order for integer keys."""
    keys = records(raw_keys, key)
    if per_cpu:
        vals = per_cpu_values(raw_values, value, ncpus)
        if by_cpu:
            n = len(keys)
            return frame(np.repeat(keys, ncpus, axis=0), vals.reshape(n * ncpus, *vals.shape[2:]),
                         np.tile(np.arange(ncpus, dtype=np.int32), n))
        values = summed(vals)
    else:
        values = records(raw_values, value)
    if key.names is None and key.kind in "ui" and len(keys) > 1:
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], values[order]
    return frame(keys, values)


def python(record: Any) -> Any:
    """A decoded key or value as Python: ints, str for char[], dicts for structs, numpy arrays."""
    arr = np.asarray(record)
    dt = arr.dtype
    if dt.names:
        return {n: python(arr[n]) for n in dt.names if not n.startswith(PAD)}
    if dt.kind == "S":
        return bytes(arr.item()).split(b"\0", 1)[0].decode("utf-8", "replace")
    if dt.kind == "V":
        return bytes(arr.tobytes())
    if arr.ndim:
        return arr.copy()
    return arr.item()


def encode(value: Any, dtype: np.dtype, what: str) -> bytes:
    """`value` as the bytes of `dtype`: an int, str (char[]), a dict of fields (nested dicts or
    "a.b" names), a numpy record or array, or bytes of the right size."""
    if isinstance(value, (bytes, bytearray)) and not (dtype.kind == "S" and len(value) < dtype.itemsize):
        if len(value) != dtype.itemsize:
            raise KernelscopeError(f"{what}: {len(value)} bytes given, the map's are {dtype.itemsize}")
        return bytes(value)
    if isinstance(value, np.ndarray | np.void) and value.dtype.itemsize == dtype.itemsize and (
            value.dtype.names or value.dtype == dtype):
        return np.ascontiguousarray(value).tobytes()
    out = np.zeros((), dtype)
    try:
        _fill(out, value, what)
    except (TypeError, ValueError, OverflowError) as e:
        raise KernelscopeError(f"{what}: cannot store {value!r} as {show(dtype)} ({e})") from None
    return out.tobytes()


def _fill(out: np.ndarray, value: Any, what: str) -> None:
    dt = out.dtype
    if dt.names is None:
        if isinstance(value, str):
            value = value.encode()
        if dt.kind in "ui" and isinstance(value, int | np.integer):
            info = np.iinfo(dt)
            if not info.min <= int(value) <= info.max:
                raise OverflowError(f"{value} does not fit in {dt.itemsize} bytes")
        out[...] = value
        return
    if not isinstance(value, Mapping):
        if len(dt.names) == 1:  # a one-field struct given its field's value
            _fill(out[dt.names[0]], value, what)
            return
        raise TypeError(f"give a dict of its fields ({', '.join(dt.names)})")
    nested: dict[str, dict[str, Any]] = {}
    for name, v in value.items():
        head, dot, rest = str(name).partition(".")
        if dot:
            nested.setdefault(head, {})[rest] = v
            continue
        if name not in dt.names:
            raise TypeError(f"no field {name!r} (fields: {', '.join(dt.names)})")
        _fill(out[name], v, f"{what}.{name}")
    for head, sub in nested.items():
        if head not in dt.names:
            raise TypeError(f"no field {head!r} (fields: {', '.join(dt.names)})")
        _fill(out[head], sub, f"{what}.{head}")
