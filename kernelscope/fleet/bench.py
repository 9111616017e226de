"""What gathering through Dask costs: rows/s of a local probe vs the same probe on fleet hosts.

    python -m kernelscope.fleet.bench [--events N] [--scheduler ADDRESS]

One run, same program and producer: first a Probe in this process, then a live FleetProbe
on every host of the cluster (without --scheduler: a LocalCluster of two worker processes
standing for two hosts, as the tests use). Each producer makes N getppid() calls, one event
each; the figure is rows in the notebook's frame per second from the producers' start. Then
the gather alone: every host's rows pulled again over Dask's comms (Arrow IPC of the raw
records), and their decoding into frames here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from ..probe import Probe
from . import worker
from .fleet import Fleet, _run
from .worker import HOST_ENV

_CHILD = "import os, sys\nn = int(sys.argv[1])\nsys.stdin.readline()\nfor _ in range(n):\n    os.getppid()\n"
PROGRAM = r"""
struct event { u32 pid; u32 cpu; u64 ts; char comm[16]; };
BPF_RINGBUF_OUTPUT(events, 1024);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
  u64 id = bpf_get_current_pid_tgid();
  if ((id >> 32) != TARGET) return 0;
  struct event e = {};
  e.pid = id >> 32;
  e.cpu = bpf_get_smp_processor_id();
  e.ts = bpf_ktime_get_ns();
  bpf_get_current_comm(&e.comm, sizeof(e.comm));
  events.ringbuf_output(&e, sizeof(e), 0);
  return 0;
}
"""
_paused: dict[int, subprocess.Popen[str]] = {}  # in each worker: producers waiting for go


def spawn(count: int) -> int:
    """A producer of `count` events, paused until `go(pid)`; its pid."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(count)], stdin=subprocess.PIPE, text=True)
    _paused[proc.pid] = proc
    return proc.pid


def go(pid: int) -> None:
    proc = _paused.pop(pid)
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.close()


def wait(pid: int) -> int:
    return _done.pop(pid).wait()


_done: dict[int, subprocess.Popen[str]] = {}


def go_and_keep(pid: int) -> None:
    _done[pid] = _paused[pid]
    go(pid)


def local(events: int) -> dict[str, float]:
    """A Probe in this process on a producer here: rows/s into its frame."""
    pid = spawn(events)
    p = Probe(PROGRAM, cflags=[f"-DTARGET={pid}"]).start()
    try:
        t0 = time.monotonic()
        go_and_keep(pid)
        while p.stats["events"]["received"] + p.stats["events"]["dropped"] < events:
            time.sleep(0.01)
        p.stop()
        rows = len(p.df)
        took = time.monotonic() - t0
        wait(pid)
        st = p.stats["events"]
        return {"rows": rows, "seconds": took, "rows_per_s": rows / took, "dropped": st["dropped"]}
    finally:
        p.close()


def fleet_run(fleet: Fleet, events: int, interval: float, hosts: list[str] | None = None) -> dict[str, Any]:
    """A live FleetProbe on every host (or `hosts`), a producer of `events` on each: rows/s into
    the notebook's gathered frame, then the whole frames pulled again (the gather alone)."""
    workers = {h: a[0] for h, a in fleet.workers().items() if hosts is None or h in hosts}
    pids = {h: fleet.client.run(spawn, events, workers=[a])[a] for h, a in workers.items()}
    targets = {h: {"cflags": [f"-DTARGET={p}"]} for h, p in pids.items()}
    fp = fleet.probe(PROGRAM, hosts=list(workers), host_args=targets,
                     live=True, interval=interval, max_rows_per_pull=1_000_000)
    try:
        t0 = time.monotonic()
        for h, a in workers.items():
            fleet.client.run(go_and_keep, pids[h], workers=[a])
        want = sum(events - fp.stats.get(h, {}).get("events", {}).get("dropped", 0) for h in workers)
        while fp.pulled_rows < want:
            time.sleep(0.01)
            want = sum(events - fp.stats.get(h, {}).get("events", {}).get("dropped", 0) for h in workers)
        fp.stop()
        took = time.monotonic() - t0
        rows = len(fp.df)
        t1 = time.monotonic()  # the gather alone: every host's rows pulled again over the comms
        again = _run(fleet.client, worker.rows, dict(workers), fp.key, {}, None)
        wire = time.monotonic() - t1
        pieces = [part for a in again.values() for part in a["maps"].values()]
        decoded = sum(len(worker.decode(part)) for part in pieces)
        decode = time.monotonic() - t1 - wire
        nbytes = sum(len(part["ipc"]) for part in pieces)
        return {"hosts": len(workers), "rows": rows, "seconds": took, "rows_per_s": rows / took,
                "rows_per_s_per_host": rows / took / len(workers),
                "dropped": sum(fp.stats[h]["events"]["dropped"] for h in fp.hosts),
                "gather_rows_per_s": rows / wire, "decode_rows_per_s": decoded / decode,
                "wire_bytes_per_row": nbytes / rows,
                "errors": fp.errors}
    finally:
        fp.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernelscope.fleet.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=300_000, help="events per producer (default 300000)")
    ap.add_argument("--interval", type=float, default=0.1, help="fleet pull interval, s (default 0.1)")
    ap.add_argument("--scheduler", help="a running scheduler's address (default: a LocalCluster of 2)")
    args = ap.parse_args(argv)
    from .fleet import require

    distributed = require()
    cluster = None
    if args.scheduler:
        client = distributed.Client(args.scheduler)
    else:
        cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                           dashboard_address=None, worker_dashboard_address=None)
        client = distributed.Client(cluster)
        client.run(_name_host)
    try:
        fleet = Fleet(client)
        out: dict[str, Any] = {"local": local(args.events),
                               "fleet_one_host": fleet_run(fleet, args.events, args.interval,
                                                           fleet.hosts[:1]),
                               "fleet_all_hosts": fleet_run(fleet, args.events, args.interval)}
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    for k in ("fleet_one_host", "fleet_all_hosts"):
        out[f"{k}_vs_local_per_host"] = out[k]["rows_per_s_per_host"] / out["local"]["rows_per_s"]
    print(json.dumps(out, indent=2))
    return 0


def _name_host(dask_worker: Any) -> None:
    os.environ[HOST_ENV] = f"host{dask_worker.name}"


if __name__ == "__main__":  # the workers must find these functions in kernelscope.fleet.bench, not __main__
    import importlib

    raise SystemExit(importlib.import_module("kernelscope.fleet.bench").main())
