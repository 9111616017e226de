"""`%%bpf NAME --fleet CLIENT`: the cell's program on every host of a Dask cluster.

The magic parses its line as for one host and hands over here; NAME is bound to a FleetProbe.
With --duration or --limit the cell blocks, stops every host and shows the per-host table;
otherwise the probe streams rows in while the notebook goes on (`NAME.df`, `NAME.table()`) and the
cell shows its live panel (kernelscope.fleet.panel: per-host lines and table), which becomes the
final state in the same output on `NAME.stop()`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .fleet import Fleet, FleetError, FleetProbe


def probe_args(opts: Any) -> dict[str, Any]:
    """The Probe settings the `%%bpf` line gave (the magic's Options). With --file, the file's
    folder goes on the include path first, as for a local cell. Include paths are this
    machine's paths: each host compiles with them, so they must exist there too (a shared or
    copied folder); the cell's own source is sent."""
    folder = [os.path.dirname(os.path.abspath(opts.file))] if getattr(opts, "file", None) else []
    return {"pages": opts.pages, "max_rows": opts.max_rows, "cflags": list(opts.cflags),
            "wakeup_events": opts.perf_wakeup, "reorder_ns": opts.reorder_ns, "name": opts.name,
            "backend": opts.backend, "globals": opts.globals or None, "programs": opts.only,
            "skip": opts.skip or (), "map_sizes": opts.map_sizes or None,
            "include": [*folder, *(opts.include or [])]}


def run_cell(shell: Any, source: str, opts: Any, target: str) -> FleetProbe:
    """Start the fleet probe for a `%%bpf --fleet TARGET` cell (TARGET: the variable holding a
    distributed.Client or a Fleet) and bind it to the cell's NAME."""
    from IPython.core.error import UsageError
    from IPython.display import display

    ns = shell.user_ns
    if target not in ns:
        raise UsageError(f"--fleet {target}: no variable {target!r}; make one first, e.g. "
                         f"{target} = distributed.Client('tls://scheduler:8786')")
    held = ns[target]
    if opts.replay or opts.perf_event or opts.no_start:
        flag = "--replay" if opts.replay else "--perf-event" if opts.perf_event else "--no-start"
        raise UsageError(f"--fleet does not take {flag}: kernelscope.fleet.replay(ROOT) replays a fleet "
                         "capture; the Python API (Fleet.probe) has the rest")
    old = ns.get(opts.name)
    if isinstance(old, FleetProbe):  # re-running the cell replaces its probe on every host
        old.close()
    try:
        fleet = held if isinstance(held, Fleet) else Fleet(held)
        fp = fleet.probe(source, live=True, **probe_args(opts))
    except (TypeError, FleetError) as e:
        raise UsageError(f"--fleet {target}: {e}") from None
    ns[opts.name] = fp
    include = fp.probe_args.get("include") or []
    for host, error in sorted(fp.errors.items()):
        hint = (f"\n  (the include path {', '.join(include)} is this notebook machine's: each host "
                "needs those folders at the same paths)") if include and "file not found" in error else ""
        print(f"{host}: {error}{hint}")
    if opts.blocking:
        t0 = time.monotonic()
        try:
            while fp.running and (opts.duration is None or time.monotonic() - t0 < opts.duration):
                if opts.limit is not None and sum(a["received"] for a in fp.total.values()) >= opts.limit:
                    break
                if not fp.polling:  # the live pulls gave up: the counts would never move again
                    why = "; ".join(fp.notes[-2:] or ["the poll thread ended"])
                    try:
                        fp.close()
                    except Exception as e:  # the hosts' probes close with their lease
                        why += f"; closing failed too: {type(e).__name__}: {e}"
                    raise FleetError(f"--fleet: live pulls from the hosts stopped, so the cell stopped "
                                     f"waiting: {why}")
                time.sleep(fp.interval)
        except KeyboardInterrupt:
            pass
        fp.stop()
    if not opts.quiet:
        display(fp if not fp.running else fp.panel())
    return fp
