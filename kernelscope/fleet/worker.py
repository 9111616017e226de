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

import pandas as pd
import pyarrow as pa

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


def to_ipc(df: pd.DataFrame) -> bytes:
    """A frame as one Arrow IPC stream: what crosses Dask's comms (bytes, no pickled pandas)."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def from_ipc(data: bytes) -> pd.DataFrame:
    return pa.ipc.open_stream(data).read_all().to_pandas()


async def rows(key: str, cursors: dict[str, dict[str, int]], limit: int | None) -> dict[str, Any]:
    """Per output map, the rows whose ks_seq >= cursors[host][map], at most `limit` of them
    (oldest first), as Arrow IPC; and the cursor to ask from next time, and the stats."""

    def go() -> dict[str, Any]:
        p = _probe(key)
        since = cursors.get(host_name(), {})
        out: dict[str, Any] = {}
        for name in p.outputs:
            df = p.frame(name)
            start = int(since.get(name, 0))
            # ks_seq counts stored rows from 0 and evicted rows leave from the front, so the
            # cursor's row is at start - (first row's ks_seq)
            pos = max(0, start - int(df["ks_seq"].iloc[0])) if len(df) else 0
            part = df.iloc[pos:] if limit is None else df.iloc[pos:pos + limit]
            nxt = int(part["ks_seq"].iloc[-1]) + 1 if len(part) else start
            out[name] = {"ipc": to_ipc(part.reset_index(drop=True)), "next": nxt, "rows": len(part)}
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
