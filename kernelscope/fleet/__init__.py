"""kernelscope.fleet: the same probe on every host of a Dask cluster, one DataFrame back.

    from distributed import Client
    from kernelscope.fleet import Fleet
    fleet = Fleet(Client("tls://scheduler:8786"))
    fp = fleet.probe(source)       # one Probe per host, however many workers it has
    fp.stop(); fp.df; fp.table()   # rows with a `host` column; accounting per host and in total
    fp.panel()                     # live per-host lines and table; the final state on fp.stop()

Needs the `fleet` extra (`pip install 'kernelscope[fleet]'`: dask distributed) on the notebook
side and on every worker; `distributed` is imported only when a Fleet is made.
"""

from __future__ import annotations

from .dataset import read_dataset, replay
from .fleet import Fleet, FleetDoctor, FleetError, FleetProbe

__all__ = ["Fleet", "FleetDoctor", "FleetError", "FleetProbe", "read_dataset", "replay"]
