"""What runs inside each Dask worker: the host's one Probe, kept in this process between calls.

Every function here is sent with `Client.run` (kernelscope.fleet.fleet), so it runs in the
worker process, not as a task. Coroutines, so the worker's event loop (heartbeats, comms)
keeps running while a program compiles or a final drain waits: the work goes to a thread.
Failures come back as an `{"error": ...}` answer rather than a raised exception, because a
kernelscope error carries notes and causes that need not unpickle on the client; a worker
that is gone is the only failure the client sees as an exception.
"""

from __future__ import annotations

import asyncio
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ..readers.batch import concat_records, packed

HOST_ENV = "KERNELSCOPE_FLEET_HOST"
"""A worker's host name for the fleet, where the machine's own name is not the one wanted (several
"hosts" on one machine in tests, or containers that all call themselves localhost)."""

_probes: dict[str, Any] = {}  # fleet probe key -> Probe, in this worker process


def host_name() -> str:
    """The host this worker stands for: $KERNELSCOPE_FLEET_HOST, else the machine's name."""
    return os.environ.get(HOST_ENV, "").strip() or socket.gethostname()


def _error(e: BaseException) -> dict[str, Any]:
    notes = "".join(f"\n{n}" for n in getattr(e, "__notes__", ()))
    return {"error": f"{type(e).__name__}: {e}{notes}", "kind": type(e).__name__,
            "trace": "".join(traceback.format_exception(e))[-4000:]}


async def _in_thread(fn: Callable[[], Any]) -> Any:
    try:
        return await asyncio.get_running_loop().run_in_executor(None, fn)
    except Exception as e:  # the host's failure is an answer: the other hosts go on
        return _error(e)


def _probe(key: str) -> Any:
    try:
        return _probes[key]
    except KeyError:
        raise LookupError(f"no fleet probe {key!r} in worker process {os.getpid()} on {host_name()} "
                          "(the worker restarted, or the probe was closed)") from None


def _stats(p: Any) -> dict[str, Any]:
    return {"stats": p.stats, "state": p.state(), "warnings": list(p.warnings),
            "drain_error": None if p.error is None else f"{type(p.error).__name__}: {p.error}"}


async def start(key: str, source: str, probe_args: dict[str, Any],
                per_host: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Build and start the probe `key` on this host (`per_host[host]` overrides `probe_args`)."""
    from ..probe import Probe

    def go() -> dict[str, Any]:
        old = _probes.pop(key, None)
        if old is not None:
            old.close()
        p = Probe(source, **{**probe_args, **per_host.get(host_name(), {})})
        try:
            p.start()
        except BaseException:
            p.close()
            raise
        _probes[key] = p
        return {"host": host_name(), "pid": os.getpid(), "maps": list(p.outputs), **_stats(p)}

    return await _in_thread(go)


async def stats(key: str) -> dict[str, Any]:
    return await _in_thread(lambda: _stats(_probe(key)))


async def stop(key: str) -> dict[str, Any]:
    """Stop (final drain, exact counts) and answer the final stats."""
    return await _in_thread(lambda: _stats(_probe(key).stop()))


async def close(key: str) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        p = _probes.pop(key, None)
        if p is not None:
            p.close()
        return {"closed": p is not None}

    return await _in_thread(go)


def to_ipc(table: pa.Table) -> bytes:
    """A table as one Arrow IPC stream: what crosses Dask's comms (bytes, nothing pickled)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _new_rows(store: Any, start: int, limit: int | None) -> tuple[int, np.ndarray, np.ndarray, Any]:
    """Rows seq >= start of a FrameStore (at most `limit`): (first seq, records, arrival_ns, cpu).
    Only the newest chunks are read, unless some of the rows were spilled to disk; rows the store
    evicted before they were pulled are skipped (the store counts them in `evicted`)."""
    new = store.received - start
    chunks = store.tail_chunks(new) if new > 0 else []
    if chunks and chunks[0].seq0 > start and store.spilled_rows:
        chunks = [store.chunk()]
    parts = []
    for c in chunks:
        lo = max(start - c.seq0, 0)
        if lo < len(c.records):
            cpus_of = None if c.cpu is None else c.cpu[lo:]
            parts.append((c.seq0 + lo, c.records[lo:], c.arrival_ns[lo:], cpus_of))
    if not parts:
        return start, np.empty(0, store.schema.dtype), np.empty(0, np.int64), None
    first = parts[0][0]
    records = concat_records([packed(r) for _, r, _, _ in parts], store.schema.dtype)
    arrival = np.concatenate([a for _, _, a, _ in parts])
    cpus = [c for _, _, _, c in parts]
    cpu: np.ndarray | None = np.concatenate(cpus) if all(c is not None for c in cpus) else None  # type: ignore[arg-type]
    if limit is not None:
        records, arrival, cpu = records[:limit], arrival[:limit], None if cpu is None else cpu[:limit]
    return first, records, arrival, cpu


def rows_table(records: np.ndarray, arrival: np.ndarray, cpu: np.ndarray | None) -> pa.Table:
    """Records as the host's raw C structs (fixed-size binary), their arrival times and CPUs:
    decoding (char[] to str, ks_time) is left to the notebook, off the host's drain."""
    size = records.dtype.itemsize
    raw = packed(records)
    data = pa.py_buffer(raw.view(np.uint8).tobytes() if len(raw) else b"")
    cols = {"record": pa.FixedSizeBinaryArray.from_buffers(pa.binary(size), len(raw), [None, data]),
            "ks_arrival_ns": pa.array(arrival, pa.int64())}
    if cpu is not None:
        cols["ks_cpu"] = pa.array(cpu, pa.int16())
    return pa.table(cols)


def decode(part: dict[str, Any]) -> pd.DataFrame:
    """The frame of one pulled piece, as the host's own probe would show it (same Schema)."""
    from ..captures.meta import dtype_from_json
    from ..schema import Schema

    table = pa.ipc.open_stream(part["ipc"]).read_all()
    dtype = dtype_from_json(part["dtype"])
    rec = table.column("record").combine_chunks()
    n = len(rec)
    buf = rec.buffers()[1]
    raw = np.frombuffer(buf, np.uint8)[rec.offset * dtype.itemsize:(rec.offset + n) * dtype.itemsize] \
        if buf is not None else np.empty(0, np.uint8)
    records = raw.copy().view(dtype)
    schema = Schema(dtype, per_cpu=part["per_cpu"], epoch_offset_ns=part["epoch_offset_ns"])
    cpu = table.column("ks_cpu").to_numpy() if "ks_cpu" in table.column_names else None
    seq = np.arange(part["first"], part["first"] + n, dtype=np.int64)
    return schema.frame(records, seq, table.column("ks_arrival_ns").to_numpy(), cpu)


async def rows(key: str, cursors: dict[str, dict[str, int]], limit: int | None) -> dict[str, Any]:
    """Per output map, the raw records whose ks_seq >= cursors[host][map], at most `limit` of
    them (oldest first), as Arrow IPC with what decoding them needs; the cursor to ask from next
    time; and the stats."""
    from ..captures.meta import dtype_to_json

    def go() -> dict[str, Any]:
        p = _probe(key)
        since = cursors.get(host_name(), {})
        out: dict[str, Any] = {}
        for name, ms in p.outputs.items():
            first, records, arrival, cpu = _new_rows(ms.store, int(since.get(name, 0)), limit)
            out[name] = {"ipc": to_ipc(rows_table(records, arrival, cpu)), "first": first,
                         "next": first + len(records), "rows": len(records),
                         "dtype": dtype_to_json(ms.schema.dtype), "per_cpu": ms.schema.per_cpu,
                         "epoch_offset_ns": ms.schema.epoch_offset_ns}
        return {"maps": out, **_stats(p)}

    return await _in_thread(go)


async def save(key: str, root: str) -> dict[str, Any]:
    """Write this host's capture as `root/host=NAME/capture.parquet` on this host's disk."""

    def go() -> dict[str, Any]:
        folder = Path(root) / f"host={host_name()}"
        folder.mkdir(parents=True, exist_ok=True)
        return {"path": str(_probe(key).save(folder / "capture.parquet"))}

    return await _in_thread(go)


async def doctor() -> dict[str, Any]:
    """`kernelscope doctor` on this host: its checks as rows, and the text table."""

    def go() -> dict[str, Any]:
        from ..doctor import checks

        found = checks.report()
        return {"host": host_name(), "ok": found.ok, "seconds": found.seconds, "text": str(found),
                "checks": [{"check": c.name, "status": c.status, "required": c.required,
                            "detail": c.detail, "fix": c.fix if c.ok is not True else ""}
                           for c in found.checks]}

    return await _in_thread(go)
