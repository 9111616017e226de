"""A fleet capture: one Parquet dataset partitioned by host, `ROOT/host=NAME/capture.parquet`.

Each part is an ordinary kernelscope capture (kernelscope.captures.capture), written by the
host's own probe where its worker runs, so one host replays with
`kernelscope.captures.replay.replay(part)` and all of them with `replay(ROOT)` here.
`dask.dataframe.read_parquet(ROOT)` reads the raw capture rows (map, ks_seq, ks_arrival_ns,
ks_cpu, record bytes) with `host` from the folder names; `read_dataset(ROOT)` gives the decoded
event columns instead, one Dask partition per host.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ..captures.replay import Replay
from ..captures.replay import replay as replay_one
from ..errors import CaptureMissingError
from .fleet import COUNTS, merged, require

PART = "capture.parquet"


def parts(root: str | os.PathLike[str], hosts: str | Iterable[str] | None = None) -> dict[str, Path]:
    """Host -> its capture file under `root` (`hosts`: only these), in host order."""
    root = Path(root)
    found = {d.name.split("=", 1)[1]: d / PART for d in sorted(root.glob("host=*")) if (d / PART).is_file()}
    if not found:
        raise CaptureMissingError(f"no fleet capture under {root}: expected {root}/host=NAME/{PART} "
                                  "(FleetProbe.save writes them)")
    if hosts is None:
        return found
    wanted = [hosts] if isinstance(hosts, str) else list(hosts)
    missing = [h for h in wanted if h not in found]
    if missing:
        raise CaptureMissingError(f"{root} holds no capture of host {', '.join(map(repr, missing))}; it has "
                                  f"{', '.join(found)}")
    return {h: found[h] for h in wanted}


class FleetReplay:
    """Every host's capture replayed: `.df` with a `host` column, `.stats` per host, `.total`."""

    def __init__(self, replays: dict[str, Replay]) -> None:
        self.replays = replays

    @property
    def hosts(self) -> list[str]:
        return list(self.replays)

    def start(self) -> FleetReplay:
        for r in self.replays.values():
            r.start()
        return self

    def stop(self) -> FleetReplay:
        for r in self.replays.values():
            r.stop()
        return self

    def close(self) -> None:
        for r in self.replays.values():
            r.close()

    def frame(self, name: str | None = None) -> pd.DataFrame:
        return merged([(h, r.frame(name)) for h, r in self.replays.items()])

    @property
    def df(self) -> pd.DataFrame:
        return self.frame()

    @property
    def stats(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {h: r.stats for h, r in self.replays.items()}

    @property
    def total(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for st in self.stats.values():
            for name, s in st.items():
                acc = out.setdefault(name, dict.fromkeys(COUNTS, 0))
                for k in COUNTS:
                    acc[k] += int(s.get(k, 0) or 0)
        return out


def replay(root: str | os.PathLike[str], hosts: str | Iterable[str] | None = None,
           speed: float | None = None) -> Replay | FleetReplay:
    """Replay a fleet capture: one host (`hosts="db1"`) as a plain Replay, else a FleetReplay
    of all (or the named) hosts. `speed=None` releases everything at once (already started)."""
    found = parts(root, hosts)
    if isinstance(hosts, str):
        r = replay_one(found[hosts], speed=speed)
        return r.start() if speed is None else r
    fr = FleetReplay({h: replay_one(p, speed=speed) for h, p in found.items()})
    return fr.start() if speed is None else fr


def _decoded(path: Path, host: str, name: str | None) -> pd.DataFrame:
    return merged([(host, replay_one(path, speed=None).start().frame(name))])


def read_dataset(root: str | os.PathLike[str], hosts: str | Iterable[str] | None = None,
                 name: str | None = None) -> Any:
    """The decoded events of output map `name` as a dask DataFrame, one partition per host."""
    dd = require("dask.dataframe")
    found = parts(root, hosts)
    first_host, first = next(iter(found.items()))
    meta = _decoded(first, first_host, name).iloc[:0]
    return dd.from_map(_decoded, list(found.values()), list(found), [name] * len(found), meta=meta,
                       enforce_metadata=False)
