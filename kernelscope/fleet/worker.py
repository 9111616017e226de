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
import tempfile
import time
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

LEASE = 300.0
"""Seconds a host keeps a fleet probe its client has not contacted (pull, stats, heartbeat):
a probe whose notebook or client is gone (closed without close(), kernel killed) is closed
then, so its programs do not stay loaded on the host."""

_probes: dict[str, Any] = {}  # fleet probe key -> Probe, in this worker process
_leases: dict[str, dict[str, Any]] = {}  # key -> {"owner": client id, "seen": monotonic s, "lease": s}
_expired: dict[str, str] = {}  # key -> why this worker closed it (lease ran out)
_reaper: asyncio.Task[None] | None = None


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
        p = _probes[key]
    except KeyError:
        why = _expired.get(key, "the worker restarted, or the probe was closed")
        raise LookupError(f"no fleet probe {key!r} in worker process {os.getpid()} on {host_name()} "
                          f"({why})") from None
    renew(key)
    return p


def renew(key: str) -> bool:
    """The probe's client was heard from: its lease starts again. False: no such probe here."""
    lease = _leases.get(key)
    if lease is not None:
        lease["seen"] = time.monotonic()
    return lease is not None


async def heartbeat(key: str) -> dict[str, Any]:
    """Renew the lease of probe `key` (what an idle notebook's fleet probe sends)."""
    return {"alive": renew(key)}


def expired(now: float | None = None) -> list[str]:
    """Keys of the probes whose client has not been heard from within their lease."""
    now = time.monotonic() if now is None else now
    return [k for k, lease in list(_leases.items()) if now - lease["seen"] > lease["lease"]]


async def _reap() -> None:
    """Close the probes whose lease ran out; runs on the worker's event loop while any exist."""
    global _reaper
    try:
        while _leases:
            tick = min(1.0, min(lease["lease"] for lease in list(_leases.values())) / 4)
            await asyncio.sleep(max(tick, 0.05))
            for key in expired():
                lease = _leases.pop(key, {})
                _expired[key] = (f"closed by the worker: its client {lease.get('owner')} was not heard "
                                 f"from for {lease.get('lease')} s (the lease)")
                p = _probes.pop(key, None)
                if p is not None:
                    await _in_thread(p.close)
    finally:
        _reaper = None


def _lease(key: str, owner: str | None, lease: float) -> None:
    global _reaper
    _leases[key] = {"owner": owner, "seen": time.monotonic(), "lease": float(lease)}
    if _reaper is None or _reaper.done():
        _reaper = asyncio.get_running_loop().create_task(_reap())


def _stats(p: Any) -> dict[str, Any]:
    return {"stats": p.stats, "state": p.state(), "warnings": list(p.warnings),
            "drain_error": None if p.error is None else f"{type(p.error).__name__}: {p.error}"}


async def start(key: str, source: str, probe_args: dict[str, Any],
                per_host: dict[str, dict[str, Any]], owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build and start the probe `key` on this host (`per_host[host]` overrides `probe_args`),
    owned by client `owner["owner"]` and closed here if that client is not heard from for
    `owner["lease"]` s (LEASE by default)."""
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

    answer = await _in_thread(go)
    if "error" not in answer:
        _lease(key, (owner or {}).get("owner"), float((owner or {}).get("lease", LEASE)))
    return answer


async def stats(key: str) -> dict[str, Any]:
    return await _in_thread(lambda: _stats(_probe(key)))


async def stop(key: str) -> dict[str, Any]:
    """Stop (final drain, exact counts) and answer the final stats."""
    return await _in_thread(lambda: _stats(_probe(key).stop()))


async def close(key: str) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        _leases.pop(key, None)
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


def _new_rows(store: Any, start: int, limit: int | None
              ) -> tuple[int, int, np.ndarray, np.ndarray, Any]:
    """Rows seq >= start of a FrameStore (at most `limit`, spilled ones read back from their
    segments): (first seq, skipped, records, arrival_ns, cpu). `skipped`: rows from `start` up
    to `first` that the store evicted before they were pulled (counted, never silently lost)."""
    first, chunks = store.since(start, limit)
    run: list[Any] = []
    for c in chunks:  # one contiguous run: a gap (a segment evicted meanwhile) waits for the next pull
        if run and c.seq0 != run[-1].seq0 + len(run[-1].records):
            break
        run.append(c)
    if not run:
        return first, first - start, np.empty(0, store.schema.dtype), np.empty(0, np.int64), None
    records = concat_records([packed(c.records) for c in run], store.schema.dtype)
    arrival = np.concatenate([c.arrival_ns for c in run])
    cpus = [c.cpu for c in run]
    cpu: np.ndarray | None = np.concatenate(cpus) if all(c is not None for c in cpus) else None
    return run[0].seq0, run[0].seq0 - start, records, arrival, cpu


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
            first, skipped, records, arrival, cpu = _new_rows(ms.store, int(since.get(name, 0)), limit)
            out[name] = {"ipc": to_ipc(rows_table(records, arrival, cpu)), "first": first,
                         "next": first + len(records), "rows": len(records), "skipped": skipped,
                         "dtype": dtype_to_json(ms.schema.dtype), "per_cpu": ms.schema.per_cpu,
                         "epoch_offset_ns": ms.schema.epoch_offset_ns}
        return {"maps": out, **_stats(p)}

    return await _in_thread(go)


RUN_FILE = "_kernelscope_run"
"""In each host=NAME/ folder: the fleet probe key that wrote it (a leading _: Parquet readers skip it)."""


def other_runs(root: Path, key: str) -> list[str]:
    """The host=*/ folders under `root` written by another run than `key` (or by none known)."""
    out = []
    for d in sorted(root.glob("host=*")):
        try:
            mine = (d / RUN_FILE).read_text().strip() == key
        except OSError:
            mine = False
        if not mine:
            out.append(d.name)
    return out


async def save(key: str, root: str) -> dict[str, Any]:
    """Write this host's capture as `root/host=NAME/capture.parquet` on this host's disk, unless
    `root` holds another run's host=*/ folders (one dataset would mix two runs)."""

    def go() -> dict[str, Any]:
        p = _probe(key)
        base = Path(root)
        if not base.is_absolute():
            raise ValueError(f"a fleet capture needs an absolute root, not {root!r}")
        others = other_runs(base, key)
        if others:
            raise FileExistsError(f"{root} already holds {', '.join(others[:4])}"
                                  f"{' ...' if len(others) > 4 else ''} of another run: save each run "
                                  "in a folder of its own (one dataset would mix two runs)")
        folder = base / f"host={host_name()}"
        if not folder.is_dir():  # made whole, run file in, under a name the other hosts' checks skip
            base.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=f".{folder.name}-", dir=base) as tmp:
                (Path(tmp) / RUN_FILE).write_text(key + "\n")
                os.rename(tmp, folder)
                os.mkdir(tmp)  # for TemporaryDirectory to remove
        return {"path": str(p.save(folder / "capture.parquet"))}

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
