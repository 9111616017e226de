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
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..errors import ClosedError, KernelscopeError
from . import plots, worker

if TYPE_CHECKING:
    from .panel import FleetPanel

EXTRA = "pip install 'kernelscope[fleet]'"
COUNTS = ("attempted", "received", "dropped", "in_flight", "lost_records")


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

    def workers(self) -> dict[str, list[str]]:
        """Host name -> its worker addresses (sorted), as the workers name their host
        (kernelscope.fleet.worker.host_name: $KERNELSCOPE_FLEET_HOST or the machine's name)."""
        names = self.client.run(worker.host_name, on_error="return")
        hosts: dict[str, list[str]] = {}
        for addr, name in sorted(names.items()):
            if isinstance(name, str):
                hosts.setdefault(name, []).append(addr)
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
              **probe_args: Any) -> FleetProbe:
        """Start `Probe(source, **probe_args)` on each host (`hosts`: these only), one per host.

        `host_args`: per-host overrides ({"db1": {"cflags": ["-DTARGET=4242"]}}). `live=True`
        pulls finished rows from every host every `interval` s, at most `max_rows_per_pull` per
        map and host each time (so at most max_rows_per_pull / interval rows/s per host and map
        cross the network); otherwise `.df` asks the hosts when read, and stop() gathers all.
        """
        fp = FleetProbe(self, source, self._pick(hosts), dict(probe_args), dict(host_args or {}),
                        live=live, interval=interval, max_rows_per_pull=max_rows_per_pull)
        return fp.start() if start else fp

    def doctor(self, hosts: Iterable[str] | None = None) -> FleetDoctor:
        """`kernelscope doctor` on each host (one worker per host), one table per host."""
        picked = self._pick(hosts)
        answers = _run(self.client, worker.doctor, picked)
        return FleetDoctor({h: a for h, a in answers.items() if "error" not in a},
                           {h: a["error"] for h, a in answers.items() if "error" in a})


def _run(client: Any, fn: Any, picked: Mapping[str, str], *args: Any) -> dict[str, dict[str, Any]]:
    """`fn(*args)` on each picked host's worker at once; host -> answer, where a worker that
    could not be reached answers {"error": ...} naming what happened."""
    if not picked:
        return {}
    # a worker the scheduler has dropped is not called: connecting to it would wait out Dask's
    # connect timeout (30 s by default) before failing
    known = set(client.run_on_scheduler(_worker_addresses))
    reach = [a for a in picked.values() if a in known]
    by_addr = client.run(fn, *args, workers=reach, on_error="return") if reach else {}
    out: dict[str, dict[str, Any]] = {}
    for host, addr in picked.items():
        got: Any = by_addr.get(addr)
        if addr not in known:
            got = {"error": f"worker {addr} of host {host} is gone: the scheduler no longer lists it "
                            "(the worker died, was killed or left)", "kind": "WorkerGone"}
        elif addr not in by_addr:
            got = {"error": f"worker {addr} of host {host} did not answer", "kind": "WorkerGone"}
        elif isinstance(got, BaseException):
            got = {"error": f"worker {addr} of host {host} failed: {type(got).__name__}: {got}",
                   "kind": type(got).__name__}
        out[host] = got
    return out


def _worker_addresses(dask_scheduler: Any) -> list[str]:
    """The workers the scheduler knows now (run on the scheduler)."""
    return list(dask_scheduler.workers)


def _close_remote(client: Any, workers: dict[str, str], key: str, stop: threading.Event) -> None:
    """Close probe `key` on its hosts, as best as can be done (a garbage-collected FleetProbe, or
    interpreter exit while the client may already be gone)."""
    stop.set()
    with contextlib.suppress(Exception):
        if client.status == "running":
            client.run(worker.close, key, workers=list(workers.values()), on_error="ignore")


def _poll_thread(ref: weakref.ReferenceType[FleetProbe], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        fp = ref()
        if fp is None:
            return
        try:
            fp.poll_once()
        except Exception as e:  # the poller's failure is shown on the probe, never lost
            fp.poll_error = e
            return
        finally:
            del fp


class FleetProbe:
    """One Probe per host, driven from here; rows gathered with a `host` column."""

    def __init__(self, fleet: Fleet, source: str, picked: dict[str, str], probe_args: dict[str, Any],
                 host_args: dict[str, Any], *, live: bool, interval: float, max_rows_per_pull: int) -> None:
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
        self.errors: dict[str, str] = {}  # host -> what went wrong there (load failure, worker gone)
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
        self._samples: list[dict[str, Any]] = []  # per pull and host: the counts, for history()
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # a forgotten fleet probe frees its hosts' probes too (holds no self)
        self._finalizer = weakref.finalize(self, _close_remote, self.client, self.workers, self.key,
                                           self._stop)

    # --- lifecycle -------------------------------------------------------------------

    @property
    def hosts(self) -> list[str]:
        """The hosts whose probe runs or ran to the end (not those in `errors`)."""
        return [h for h in self.workers if h not in self.errors]

    def _alive(self) -> dict[str, str]:
        return {h: a for h, a in self.workers.items() if h not in self.errors}

    def _note(self, answers: Mapping[str, dict[str, Any]]) -> None:
        for host, a in answers.items():
            if "error" in a and a.get("stats") is None:
                self.errors.setdefault(host, a["error"])
                continue
            self.host_stats[host] = a["stats"]
            self.warnings[host] = list(a.get("warnings", []))
            if a.get("drain_error"):  # the host's drain thread stopped: its rows end there
                self.warnings[host].append(f"the drain stopped: {a['drain_error']}")

    def start(self) -> FleetProbe:
        """Compile, load and start the probe on every host at once. Hosts that fail are in
        `errors`; FleetError if none could start."""
        if self.closed:
            raise ClosedError("this fleet probe is closed; fleet.probe(...) starts a new one")
        if self._chunks:  # started already: one run per fleet probe
            return self
        answers = _run(self.client, worker.start, self._alive(), self.key, self.source, self.probe_args,
                       self.host_args)
        self._note(answers)
        for host, a in answers.items():
            if "error" not in a:
                self._chunks[host] = {m: [] for m in a["maps"]}
                self._cursor[host] = dict.fromkeys(a["maps"], 0)
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

    def poll_once(self, limit: int | None = -1) -> int:
        """Pull each host's new rows (at most `limit` per map; -1: max_rows_per_pull; None: all)
        and its stats. Returns rows pulled. A host that does not answer joins `errors`."""
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
                    self.pulled_bytes += len(part["ipc"])
                    if part["rows"]:
                        self._chunks[host][name].append(worker.decode(part))
                        total += part["rows"]
            self.pulled_rows += total
            now = time.monotonic() - self._t0
            for host, a in answers.items():
                for name, st in (a.get("stats") or {}).items():
                    self._samples.append({"t": now, "host": host, "map": name,
                                          **{k: int(st.get(k, 0) or 0) for k in COUNTS}})
            return total

    def stop(self) -> FleetProbe:
        """Stop every host's probe (final drain: attempted = received + dropped on each), then
        gather the rows not pulled yet. Hosts that do not answer join `errors`; the rest are kept."""
        self._stop_poller()
        if self.closed:
            return self
        todo = {h: a for h, a in self._alive().items() if h not in self.final}
        answers = _run(self.client, worker.stop, todo, self.key)
        self._note(answers)
        self.final.update(h for h, a in answers.items() if "error" not in a)
        while self.poll_once(limit=None):
            pass
        self._tell_views()
        return self

    def _tell_views(self) -> None:
        for ref in list(self.views):
            view = ref()
            if view is None:
                self.views.remove(ref)
            else:
                view()

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
        self.stop()
        _run(self.client, worker.close, self._alive(), self.key)
        self.closed = True
        self._finalizer.detach()
        self._tell_views()

    def __enter__(self) -> FleetProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save(self, root: str) -> dict[str, str]:
        """Each host writes its capture where its worker runs: `root/host=NAME/capture.parquet`,
        together one Parquet dataset partitioned by host (kernelscope.fleet.dataset reads it)."""
        self.stop()
        if self.closed:
            raise ClosedError("this fleet probe is closed: save() before close()")
        answers = _run(self.client, worker.save, self._alive(), self.key, str(root))
        for host, a in answers.items():
            if "error" in a:
                self.errors.setdefault(host, a["error"])
        return {h: a["path"] for h, a in answers.items() if "error" not in a}

    # --- results ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self.hosts) and not self.final.issuperset(self.hosts) and not self.closed

    def frame(self, name: str | None = None) -> pd.DataFrame:
        """The rows of output map `name` from every host, `host` first (the only map if None).
        Not live and not stopped: pulls what the hosts hold now. A host in `errors` keeps the
        rows pulled from it before it failed."""
        if not self.live and not self.final.issuperset(self.hosts):
            self.poll_once(limit=None)
        maps = sorted({m for per in self._chunks.values() for m in per})
        if name is None:
            if len(maps) > 1:
                raise KeyError(f"the probe has {len(maps)} output maps ({', '.join(maps)}): name one")
            if not maps:
                return pd.DataFrame({"host": pd.Series([], dtype=object)})
            name = maps[0]
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
        """Output map -> attempted, received, dropped, in_flight, lost_records summed over the
        hosts whose probe stopped cleanly (hosts in `errors` are left out: their counts ended
        with their worker)."""
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
        """One row per host and map, then one per map for all hosts: the accounting at a glance."""
        rows: list[dict[str, Any]] = []
        for host in self.workers:
            if host in self.errors:
                rows.append({"host": host, "map": "", "state": "error", "error": self.errors[host]})
                continue
            for name, st in self.host_stats.get(host, {}).items():
                rows.append({"host": host, "map": name,
                             "state": "stopped" if host in self.final else "running",
                             **{k: int(st.get(k, 0) or 0) for k in COUNTS}, "error": ""})
        for name, acc in self.total.items():
            rows.append({"host": f"all ({len(self.hosts)})", "map": name,
                         "state": "stopped" if self.final.issuperset(self.hosts) else "running",
                         **acc, "error": ""})
        # counts stay integers beside a host in error (which has none): nullable Int64
        df = pd.DataFrame(rows, columns=["host", "map", "state", *COUNTS, "error"])
        return df.astype(dict.fromkeys(COUNTS, "Int64"))

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
        if self.poll_error is not None:
            notes.append(f"live pulls stopped: {type(self.poll_error).__name__}: {self.poll_error}")
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

