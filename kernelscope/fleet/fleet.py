"""`Fleet` and `FleetProbe`: the same probe on every host of a Dask cluster, one frame back.

    fleet = Fleet(client)                  # a distributed.Client
    fp = fleet.probe(source, live=True)    # one Probe per host (not per worker)
    fp.df                                  # every host's rows, a `host` column first
    fp.stats, fp.total                     # per host, and summed
    fp.stop(); fp.save("/var/tmp/run1"); fp.close()

Dask does the agent's work: `Client.run(fn, workers=[...])` runs a function in chosen worker
processes and answers per worker, over Dask's comms (TLS where the cluster uses it). Each host's
probe lives in one of its worker processes (kernelscope.fleet.worker) between calls. A host that
fails to load or whose worker dies is named in `errors`, with its error; the others go on.
"""

from __future__ import annotations

import contextlib
import html
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..errors import ClosedError, KernelscopeError, SettingError
from . import plots, worker

if TYPE_CHECKING:
    from .panel import FleetPanel

EXTRA = "pip install 'kernelscope[fleet]'"
COUNTS = ("attempted", "received", "dropped", "in_flight", "lost_records")
GONE = ("WorkerGone", "LookupError")  # answers that retire a host: its worker, or its probe there, is gone
POLL_RETRIES = 5  # consecutive failed live pulls before the poll thread gives up
POLL_BACKOFF_MAX = 10.0  # seconds: the longest wait between retries


class FleetError(KernelscopeError):
    """No host could run the fleet probe (each host's error is in the message)."""


def require(module: str = "distributed") -> Any:
    """`distributed` (or `dask.dataframe`), or an ImportError that names the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"kernelscope.fleet needs {module} (Dask), which is not installed: {EXTRA}") from e


class Fleet:
    """The hosts of a Dask cluster, for probes: one worker chosen per host."""

    def __init__(self, client: Any) -> None:
        distributed = require()
        if not isinstance(client, distributed.Client):
            raise TypeError(f"Fleet needs a distributed.Client, not {type(client).__name__}: "
                            "Fleet(distributed.Client('tls://scheduler:8786'))")
        self.client = client
        self.broken: dict[str, str] = {}  # worker address -> why it named no host (last workers())

    def workers(self) -> dict[str, list[str]]:
        """Host name -> its worker addresses (sorted), as the workers name their host
        (kernelscope.fleet.worker.host_name: $KERNELSCOPE_FLEET_HOST or the machine's name).
        Workers that answer with an error (kernelscope not importable there, say) are in
        `broken` (address -> error); doctor() and probe().errors report them."""
        _check_client(self.client)
        names = self.client.run(worker.host_name, on_error="return")
        hosts: dict[str, list[str]] = {}
        self.broken = {}
        for addr, name in sorted(names.items()):
            if isinstance(name, str):
                hosts.setdefault(name, []).append(addr)
            else:
                self.broken[addr] = (f"worker {addr} names no host: {type(name).__name__}: {name} "
                                     f"(is kernelscope installed there? {EXTRA})")
        return hosts

    @property
    def hosts(self) -> list[str]:
        return sorted(self.workers())

    def _pick(self, hosts: Iterable[str] | None) -> dict[str, str]:
        """Host -> the one worker that runs its probe (the first address: stable across calls)."""
        found = self.workers()
        if not found:
            raise FleetError("the Dask cluster has no workers: start `dask worker SCHEDULER` on each host")
        if hosts is None:
            return {h: found[h][0] for h in sorted(found)}
        wanted = [hosts] if isinstance(hosts, str) else list(hosts)
        unknown = [h for h in wanted if h not in found]
        if unknown:
            raise KeyError(f"no worker on host {', '.join(map(repr, unknown))}; the cluster's hosts are "
                           f"{', '.join(sorted(found))}")
        return {h: found[h][0] for h in wanted}

    def probe(self, source: str, *, hosts: Iterable[str] | None = None,
              host_args: Mapping[str, Mapping[str, Any]] | None = None, live: bool = False,
              interval: float = 0.5, max_rows_per_pull: int = 100_000, start: bool = True,
              lease: float = worker.LEASE, **probe_args: Any) -> FleetProbe:
        """Start `Probe(source, **probe_args)` on each host (`hosts`: these only), one per host.

        `host_args`: per-host overrides ({"db1": {"cflags": ["-DTARGET=4242"]}}). `live=True`
        pulls finished rows from every host every `interval` s, at most `max_rows_per_pull` per
        map and host each time (so at most max_rows_per_pull / interval rows/s per host and map
        cross the network); otherwise `.df` asks the hosts when read, and stop() gathers all,
        both in pieces of max_rows_per_pull. `lease`: seconds a host keeps the probe without
        hearing from this client (every pull, or a heartbeat every lease/3 s, renews it), so a
        notebook that dies or closes its client without close() leaves no programs loaded.
        """
        picked = self._pick(hosts)
        fp = FleetProbe(self, source, picked, dict(probe_args), dict(host_args or {}),
                        live=live, interval=interval, max_rows_per_pull=max_rows_per_pull, lease=lease)
        fp.errors.update(self.broken)
        return fp.start() if start else fp

    def doctor(self, hosts: Iterable[str] | None = None) -> FleetDoctor:
        """`kernelscope doctor` on each host (one worker per host), one table per host."""
        picked = self._pick(hosts)
        answers = _run(self.client, worker.doctor, picked)
        return FleetDoctor({h: a for h, a in answers.items() if "error" not in a},
                           {**{h: a["error"] for h, a in answers.items() if "error" in a}, **self.broken})


def _run(client: Any, fn: Any, picked: Mapping[str, str], *args: Any) -> dict[str, dict[str, Any]]:
    """`fn(*args)` on each picked host's worker at once; host -> answer, where a worker that
    could not be reached answers {"error": ...} naming what happened."""
    _check_client(client)
    if not picked:
        return {}
    # a worker the scheduler has dropped is not called: connecting to it would wait out Dask's
    # connect timeout (30 s by default) before failing. Asked from here: the scheduler needs
    # no kernelscope.
    known = set(client.scheduler_info(n_workers=-1)["workers"])
    reach = [a for a in picked.values() if a in known]
    by_addr = client.run(fn, *args, workers=reach, on_error="return") if reach else {}
    out: dict[str, dict[str, Any]] = {}
    for host, addr in picked.items():
        got: Any = by_addr.get(addr)
        if addr not in known:
            got = {"error": f"worker {addr} of host {host} is gone: the scheduler no longer lists it "
                            "(the worker died, was killed or left)", "kind": "WorkerGone"}
        elif addr not in by_addr:
            got = {"error": f"worker {addr} of host {host} did not answer", "kind": "NoAnswer"}
        elif isinstance(got, BaseException):
            got = {"error": f"worker {addr} of host {host} failed: {type(got).__name__}: {got}",
                   "kind": type(got).__name__}
        out[host] = got
    return out


def _closed(client: Any) -> bool:
    return getattr(client, "status", "running") in ("closing", "closed")


def _check_client(client: Any) -> None:
    if _closed(client):
        raise FleetError(f"the Dask client ({getattr(client, 'id', '?')}) is closed: nothing can reach the "
                         "hosts. Their fleet probes may still be loaded: each host closes them once no "
                         "client has been heard from for the probe's lease (Fleet.probe(lease=...), "
                         f"{worker.LEASE:.0f} s by default)")


def _close_remote(client: Any, workers: dict[str, str], key: str, *events: threading.Event) -> None:
    """Close probe `key` on every one of its hosts, as best as can be done (a garbage-collected
    FleetProbe, or interpreter exit while the client may already be gone)."""
    for e in events:
        e.set()
    with contextlib.suppress(Exception):
        _run(client, worker.close, workers, key)


def _poll_thread(ref: weakref.ReferenceType[FleetProbe], stop: threading.Event, interval: float) -> None:
    """Pull every `interval` s; a failed pull is retried after interval * 2**failures s (at most
    POLL_BACKOFF_MAX), up to POLL_RETRIES times in a row, each failure said in the probe's
    `notes`. A closed client ends it at once."""
    failures = 0
    while not stop.wait(min(interval * 2 ** failures, max(interval, POLL_BACKOFF_MAX))):
        fp = ref()
        if fp is None:
            return
        try:
            fp.poll_once()
            failures = 0
        except Exception as e:  # the poller's failure is shown on the probe, never lost
            fp.poll_error = e
            failures += 1
            given_up = failures > POLL_RETRIES or _closed(fp.client)
            fp.notes.append(f"live pull failed ({failures} in a row): {type(e).__name__}: {e}; "
                            + ("live pulls stopped" if given_up else
                               f"retrying in {min(interval * 2 ** failures, POLL_BACKOFF_MAX):.1f} s"))
            del fp.notes[:-50]  # a flaky network over days: the recent ones
            if given_up:
                return
        finally:
            del fp


def _keep_alive(ref: weakref.ReferenceType[FleetProbe], closing: threading.Event, period: float) -> None:
    """Renew the probe's lease on its hosts every `period` s until it is closed (or the client is)."""
    while not closing.wait(period):
        fp = ref()
        if fp is None or _closed(fp.client):
            return
        with contextlib.suppress(Exception):  # a failed heartbeat: the next one (or a pull) renews
            _run(fp.client, worker.heartbeat, fp._alive(), fp.key)
        del fp


class FleetProbe:
    """One Probe per host, driven from here; rows gathered with a `host` column."""

    def __init__(self, fleet: Fleet, source: str, picked: dict[str, str], probe_args: dict[str, Any],
                 host_args: dict[str, Any], *, live: bool, interval: float, max_rows_per_pull: int,
                 lease: float = worker.LEASE) -> None:
        if lease <= 0:
            raise ValueError("lease must be positive (seconds a host keeps a probe it does not hear about)")
        if interval <= 0:
            raise ValueError("interval must be positive (seconds between pulls)")
        if max_rows_per_pull <= 0:
            raise ValueError("max_rows_per_pull must be positive")
        unknown = sorted(set(host_args) - set(picked))
        if unknown:
            raise KeyError(f"host_args names {', '.join(map(repr, unknown))}, which run no probe here "
                           f"(hosts: {', '.join(sorted(picked))})")
        self.fleet = fleet
        self.client = fleet.client
        self.source = source
        self.probe_args = probe_args
        self.host_args = host_args
        self.workers = dict(picked)  # host -> the worker address its probe lives in
        self.live = live
        self.interval = interval
        self.max_rows_per_pull = max_rows_per_pull
        self.key = f"fleet-{uuid.uuid4().hex[:12]}"
        self.lease = float(lease)
        self.errors: dict[str, str] = {}  # host -> what failed there (load, worker gone, last call)
        self.gone: dict[str, str] = {}  # host -> why it is retired (its worker, or its probe there, is gone)
        self.save_errors: dict[str, str] = {}  # host -> why its save() failed (its rows and counts stay)
        self.notes: list[str] = []  # what happened to the fleet probe itself (live pull retries)
        self._host_notes: dict[str, list[str]] = {}  # host -> calls that failed there, then recovered
        self.host_stats: dict[str, dict[str, Any]] = {}  # host -> its probe's last stats answer
        self.warnings: dict[str, list[str]] = {}
        self.final: set[str] = set()  # hosts whose probe stopped: their counts are exact
        self.poll_error: BaseException | None = None
        self.pulled_rows = 0  # rows that came over the network so far
        self.pulled_bytes = 0
        self.closed = False
        # views told when the probe stops or closes (the live panel): weak, a view may go first
        self.views: list[weakref.WeakMethod[Callable[[], None]]] = []
        self._chunks: dict[str, dict[str, list[pd.DataFrame]]] = {}  # host -> map -> frames pulled
        self._cursor: dict[str, dict[str, int]] = {}  # host -> map -> next ks_seq to ask for
        self._pulled: dict[str, dict[str, int]] = {}  # host -> map -> rows pulled from it
        self._skipped: dict[str, dict[str, int]] = {}  # host -> map -> rows evicted before pulled
        self._trimmed: dict[str, dict[str, int]] = {}  # host -> map -> rows let go here (max_rows)
        self._samples: list[dict[str, Any]] = []  # per pull and host: the counts, for history()
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._keeper: threading.Thread | None = None
        # a forgotten fleet probe frees its hosts' probes too (holds no self)
        self._finalizer = weakref.finalize(self, _close_remote, self.client, self.workers, self.key,
                                           self._stop, self._closing)

    # --- lifecycle -------------------------------------------------------------------

    @property
    def hosts(self) -> list[str]:
        """The hosts whose probe runs or ran to the end (not those in `errors`)."""
        return [h for h in self.workers if h not in self.errors]

    def _alive(self) -> dict[str, str]:
        """The hosts whose probe started and is not known to be gone (a failed call does not
        retire a host: the next call tries it again)."""
        return {h: a for h, a in self.workers.items() if h in self._chunks and h not in self.gone}

    def _note(self, answers: Mapping[str, dict[str, Any]]) -> None:
        for host, a in answers.items():
            if "error" in a:
                if host in self.gone:
                    continue
                self.errors[host] = a["error"]
                if a.get("kind") in GONE and host in self._chunks:
                    self.gone[host] = a["error"]
                continue
            if host in self.errors:  # it answers again: the failure becomes a warning
                self._host_notes.setdefault(host, []).append(f"a call failed, then it recovered: "
                                                             f"{self.errors.pop(host)}")
            self.host_stats[host] = a["stats"]
            self.warnings[host] = list(a.get("warnings", [])) + self._host_notes.get(host, [])
            if a.get("drain_error"):  # the host's drain thread stopped: its rows end there
                self.warnings[host].append(f"the drain stopped: {a['drain_error']}")

    def start(self) -> FleetProbe:
        """Compile, load and start the probe on every host at once. Hosts that fail are in
        `errors`; FleetError if none could start."""
        if self.closed:
            raise ClosedError("this fleet probe is closed; fleet.probe(...) starts a new one")
        if self.final:
            raise FleetError("this fleet probe was stopped: a fleet probe runs once (its rows and counts "
                             "stay readable); fleet.probe(...) starts a new one")
        if self._chunks:  # started already: one run per fleet probe
            return self
        todo = {h: a for h, a in self.workers.items() if h not in self.errors}
        answers = _run(self.client, worker.start, todo, self.key, self.source, self.probe_args,
                       self.host_args, {"owner": getattr(self.client, "id", None), "lease": self.lease})
        for host, a in answers.items():
            if "error" not in a:
                self._chunks[host] = {m: [] for m in a["maps"]}
                self._cursor[host] = dict.fromkeys(a["maps"], 0)
                self._pulled[host] = dict.fromkeys(a["maps"], 0)
                self._skipped[host] = dict.fromkeys(a["maps"], 0)
                self._trimmed[host] = dict.fromkeys(a["maps"], 0)
        self._note(answers)
        if self._keeper is None and self._chunks:
            self._keeper = threading.Thread(target=_keep_alive, args=(weakref.ref(self), self._closing,
                                                                      self.lease / 3),
                                            name=f"kernelscope-fleet-lease-{self.key}", daemon=True)
            self._keeper.start()
        if not self.hosts:
            raise FleetError("the probe started on no host:\n" + self._errors_text())
        if self.live and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=_poll_thread, args=(weakref.ref(self), self._stop,
                                                                       self.interval),
                                            name=f"kernelscope-fleet-{self.key}", daemon=True)
            self._thread.start()
        return self

    def _errors_text(self) -> str:
        return "\n".join(f"  {h}: {e}" for h, e in sorted(self.errors.items()))

    @property
    def polling(self) -> bool:
        """The live poll thread runs (False: not live, stopped, or it gave up: see `notes`)."""
        return self._thread is not None and self._thread.is_alive()

    def poll_once(self, limit: int | None = -1) -> int:
        """Pull each host's new rows (at most `limit` per map; -1: max_rows_per_pull; None: all)
        and its stats. Returns rows pulled. A host that does not answer is in `errors` until it
        answers again; rows a host evicted before they were pulled are counted in `skipped`."""
        limit = self.max_rows_per_pull if limit == -1 else limit
        with self._lock:
            alive = self._alive()
            answers = _run(self.client, worker.rows, alive, self.key, self._cursor, limit)
            self._note(answers)
            total = 0
            for host, a in answers.items():
                if "error" in a:
                    continue
                for name, part in a["maps"].items():
                    self._cursor[host][name] = part["next"]
                    self._pulled[host][name] += part["rows"]
                    self._skipped[host][name] += part.get("skipped", 0)
                    self.pulled_bytes += len(part["ipc"])
                    if part["rows"]:
                        self._chunks[host][name].append(worker.decode(part))
                        self._trim(host, name)
                        total += part["rows"]
            self.pulled_rows += total
            now = time.monotonic() - self._t0
            for host, a in answers.items():
                for name, st in (a.get("stats") or {}).items():
                    self._samples.append({"t": now, "host": host, "map": name,
                                          **{k: int(st.get(k, 0) or 0) for k in COUNTS}})
            return total

    def keep_rows(self, host: str) -> int | None:
        """Rows of each map this notebook keeps from `host`: its probe's max_rows (host_args,
        else the probe's), the newest ones; None: every row pulled."""
        keep = self.host_args.get(host, {}).get("max_rows", self.probe_args.get("max_rows"))
        return None if keep is None else int(keep)

    def _trim(self, host: str, name: str) -> None:
        """Beyond keep_rows(host), the oldest pulled rows of map `name` go (counted in `trimmed`),
        so a long live run holds the notebook's memory at max_rows per host and map."""
        keep = self.keep_rows(host)
        frames = self._chunks[host][name]
        if keep is None:
            return
        excess = sum(len(f) for f in frames) - keep
        while excess > 0 and frames:
            if len(frames[0]) <= excess:
                gone = len(frames.pop(0))
            else:
                frames[0] = frames[0].iloc[excess:]
                gone = excess
            excess -= gone
            self._trimmed[host][name] += gone

    def stop(self) -> FleetProbe:
        """Stop every host's probe (final drain: attempted = received + dropped on each), then
        gather the rows not pulled yet, in pieces of max_rows_per_pull. Every host not known to be
        gone is asked, those that failed before included; hosts that do not answer are in
        `errors`, the rest are kept."""
        self._stop_poller()
        if self.closed:
            return self
        todo = {h: a for h, a in self._alive().items() if h not in self.final}
        answers = _run(self.client, worker.stop, todo, self.key)
        self._note(answers)
        self.final.update(h for h, a in answers.items() if "error" not in a)
        self._pull_all()
        self._tell_views()
        return self

    def _tell_views(self) -> None:
        for ref in list(self.views):
            view = ref()
            if view is None:
                self.views.remove(ref)
            else:
                view()

    def _pull_all(self) -> None:
        """Pull in pieces of max_rows_per_pull until the backlog the hosts had at the first piece
        is in (bounded: a host producing faster than it is pulled does not keep this going)."""
        if not self.poll_once():
            return
        backlog = max((int(st.get("received", 0) or 0) - self._cursor[h].get(m, 0)
                       for h in self._alive() for m, st in self.host_stats.get(h, {}).items()), default=0)
        for _ in range(-(-backlog // self.max_rows_per_pull) + 1):
            if not self.poll_once():
                return

    def _stop_poller(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()
        self._thread = None

    def close(self) -> None:
        """Stop, then free each host's probe (its programs detach). Idempotent; rows stay readable."""
        if self.closed:
            return
        try:
            self.stop()
        finally:  # every host, failed ones included: no probe stays loaded
            self.closed = True
            self._closing.set()
            self._finalizer.detach()
            _run(self.client, worker.close, self.workers, self.key)
            self._tell_views()

    def __enter__(self) -> FleetProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save(self, root: str) -> dict[str, str]:
        """Each host writes its capture where its worker runs: `root/host=NAME/capture.parquet`,
        together one Parquet dataset partitioned by host (kernelscope.fleet.dataset reads it).
        `root` must be absolute (each worker would resolve a relative one against its own
        working directory) and hold no other run's host=*/ folders. A host whose save fails is
        in `save_errors` (its rows and counts stay); FleetError if none saved."""
        if not os.path.isabs(os.fspath(root)):
            raise SettingError(f"save() needs an absolute root, not {os.fspath(root)!r}: each host's worker "
                               "would resolve a relative one against its own working directory")
        self.stop()
        if self.closed:
            raise ClosedError("this fleet probe is closed: save() before close()")
        answers = _run(self.client, worker.save, self._alive(), self.key, os.fspath(root))
        self.save_errors = {h: a["error"] for h, a in answers.items() if "error" in a}
        saved = {h: a["path"] for h, a in answers.items() if "error" not in a}
        if answers and not saved:
            raise FleetError("no host saved its capture:\n" + "\n".join(
                f"  {h}: {e}" for h, e in sorted(self.save_errors.items())))
        return saved

    # --- results ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self.hosts) and not self.final.issuperset(self.hosts) and not self.closed

    def frame(self, name: str | None = None) -> pd.DataFrame:
        """The rows of output map `name` from every host, `host` first (the only map if None).
        Not live and not stopped: pulls what the hosts hold now. A host in `errors` keeps the
        rows pulled from it before it failed."""
        if not self.live and not self.closed and not self.final.issuperset(self.hosts):
            self._pull_all()
        maps = sorted({m for per in self._chunks.values() for m in per})
        if name is None:
            if len(maps) > 1:
                raise KeyError(f"the probe has {len(maps)} output maps ({', '.join(maps)}): name one")
            if not maps:
                return pd.DataFrame({"host": pd.Series([], dtype=object)})
            name = maps[0]
        if maps and name not in maps:
            raise KeyError(f"no output map {name!r}; the probe's output maps are {', '.join(maps)}")
        with self._lock:
            return merged([(host, df) for host, per in self._chunks.items() for df in per.get(name, [])])

    @property
    def df(self) -> pd.DataFrame:
        return self.frame()

    @property
    def stats(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Host -> output map -> that host's probe stats (the last answer; exact once stopped)."""
        return {h: self.host_stats[h] for h in self.workers if h in self.host_stats}

    @property
    def total(self) -> dict[str, dict[str, int]]:
        """Output map -> attempted, received, dropped, in_flight, lost_records summed over `hosts`
        (those not in `errors`; each one's counts are exact once `final`, running totals before).
        A host in `errors` is left out: its last counts and rows pulled are in its table() row."""
        out: dict[str, dict[str, int]] = {}
        for host in self.hosts:
            for name, st in self.host_stats.get(host, {}).items():
                acc = out.setdefault(name, dict.fromkeys(COUNTS, 0))
                for k in COUNTS:
                    acc[k] += int(st.get(k, 0) or 0)
        return out

    def history(self, name: str | None = None) -> pd.DataFrame:
        """Each host's counts at each pull (t: seconds since the probe was made; `rate`:
        received per second since the host's previous sample): what per-host lines plot."""
        df = pd.DataFrame(list(self._samples), columns=["t", "host", "map", *COUNTS])
        if name is not None:
            df = df[df["map"] == name]
        df = df.sort_values(["host", "map", "t"], kind="stable").reset_index(drop=True)
        by = df.groupby(["host", "map"], sort=False)
        df["rate"] = (by["received"].diff() / by["t"].diff()).fillna(0.0)
        return df

    def figure(self, max_points: int = plots.MAX_POINTS) -> Any:
        """A plotly figure of the per-host lines (kernelscope.fleet.plots): each host's received
        rate, and its received and dropped counts so far; one colour per host."""
        import plotly.graph_objects as go

        return go.Figure(*plots.spec(self, max_points=max_points))

    def panel(self, *, interval: float | None = None, static: str = "auto") -> FleetPanel:
        """The live panel (kernelscope.fleet.panel): per-host lines and table while the probe
        runs, replaced in the same output by the final state on stop() or close()."""
        # imported here: the panel needs ipywidgets and plotly's FigureWidget (seconds to import),
        # which the worker side of this module (and a script using no panel) does without
        from .panel import panel

        return panel(self, interval=interval, static=static)

    def table(self) -> pd.DataFrame:
        """One row per host and map, then one per map for all hosts: the accounting at a glance.
        `pulled`: rows that came here; `skipped`: rows the host evicted before they were pulled;
        `trimmed`: pulled rows let go here beyond the probe's max_rows (the newest are kept).
        A host in `errors` shows its last counts and the rows pulled from it before it failed."""
        rows: list[dict[str, Any]] = []
        for host in [*self.workers, *sorted(set(self.errors) - set(self.workers))]:
            failed = self.errors.get(host)
            state = "error" if failed else "stopped" if host in self.final else "running"
            per = self.host_stats.get(host) or {m: {} for m in self._pulled.get(host, {})}
            if not per:
                rows.append({"host": host, "map": "", "state": state, "error": failed or ""})
            for name, st in per.items():
                rows.append({"host": host, "map": name, "state": state,
                             **{k: int(st.get(k, 0) or 0) for k in COUNTS},
                             "pulled": self._pulled.get(host, {}).get(name, 0),
                             "skipped": self._skipped.get(host, {}).get(name, 0),
                             "trimmed": self._trimmed.get(host, {}).get(name, 0), "error": failed or ""})
        for name, acc in self.total.items():
            rows.append({"host": f"all ({len(self.hosts)})", "map": name,
                         "state": "stopped" if self.final.issuperset(self.hosts) else "running", **acc,
                         "pulled": sum(self._pulled.get(h, {}).get(name, 0) for h in self.hosts),
                         "skipped": sum(self._skipped.get(h, {}).get(name, 0) for h in self.hosts),
                         "trimmed": sum(self._trimmed.get(h, {}).get(name, 0) for h in self.hosts),
                         "error": ""})
        # counts stay integers beside a host in error that has none: nullable Int64
        df = pd.DataFrame(rows, columns=["host", "map", "state", *COUNTS, "pulled", "skipped", "trimmed",
                                         "error"])
        return df.astype(dict.fromkeys([*COUNTS, "pulled", "skipped", "trimmed"], "Int64"))

    def __repr__(self) -> str:
        return (f"<FleetProbe {self.key}: {len(self.hosts)} hosts, {len(self.errors)} failed; "
                f"{sum(a['received'] for a in self.total.values())} received>")

    def table_html(self) -> str:
        """The per-host table as HTML, after a line per host in error (its error) and per warning."""
        t = self.table().astype(object)
        t = t.where(t.notna(), "")
        errors = "".join(f"<p class='ks-host-error' style='color:#b91c1c'>&#10007; {html.escape(h)}: "
                         f"{html.escape(e)}</p>" for h, e in sorted(self.errors.items()))
        notes = [f"{h}: {w}" for h, ws in sorted(self.warnings.items()) for w in ws]
        notes += [f"{h}: save failed: {e}" for h, e in sorted(self.save_errors.items())]
        notes += self.notes[-3:]
        warn = "".join(f"<p style='color:#b45309'>&#9888; {html.escape(n)}</p>" for n in notes)
        return f"{errors}{warn}{t.to_html(index=False, escape=True, classes='ks-stats-table')}"

    def _repr_html_(self) -> str:
        return (f"<div><b>FleetProbe</b> on {len(self.workers)} hosts"
                f"{' (live)' if self.live else ''}{self.table_html()}</div>")


class FleetDoctor:
    """`kernelscope doctor` on each host: `tables[host]` (one row per check), `errors[host]`."""

    def __init__(self, answers: dict[str, dict[str, Any]], errors: dict[str, str]) -> None:
        self.answers = answers
        self.errors = errors
        self.tables = {h: pd.DataFrame(a["checks"]) for h, a in sorted(answers.items())}

    @property
    def ok(self) -> dict[str, bool]:
        """Host -> every basic check passed there (False for hosts that did not answer)."""
        return {**{h: bool(a["ok"]) for h, a in self.answers.items()}, **dict.fromkeys(self.errors, False)}

    def __str__(self) -> str:
        parts = [f"== {h}\n{a['text']}" for h, a in sorted(self.answers.items())]
        parts += [f"== {h}\nno answer: {e}" for h, e in sorted(self.errors.items())]
        return "\n\n".join(parts)

    def _repr_html_(self) -> str:
        out = []
        for h, t in self.tables.items():
            verdict = "basics work" if self.answers[h]["ok"] else "basics missing"
            out.append(f"<h4>{html.escape(h)}: {verdict}</h4>{t.to_html(index=False, escape=True)}")
        out += [f"<h4>{html.escape(h)}: no answer</h4><pre>{html.escape(e)}</pre>"
                for h, e in sorted(self.errors.items())]
        return "<div>" + "".join(out) + "</div>"


def merged(frames: Sequence[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """(host, frame) pairs as one frame with `host` first."""
    parts = [df.assign(host=h) for h, df in frames]
    if not parts:
        return pd.DataFrame({"host": pd.Series([], dtype=object)})
    df = pd.concat(parts, ignore_index=True)
    return df[["host", *[c for c in df.columns if c != "host"]]]

