"""`Bpftrace`: the system's bpftrace as a child process, its `-f json` stream read into frames.

    bt = Bpftrace('tracepoint:raw_syscalls:sys_enter { @[comm] = count(); }').start()
    bt.map("@")        # comm, value: the map as bpftrace last printed it
    bt.stop()          # SIGINT: bpftrace prints every map and exits; the child is reaped

printf lines become rows of one output per format (`bt.frame("printf")`, typed columns), maps
become frames (`bt.map`), hist()/lhist() kernelscope Histograms (`bt.hist`), each printing of
a map a snapshot (`bt.snapshots`, for interval prints), lost_events the `dropped` of `stats`.
A reader thread parses the stream as it comes; it holds the child, never the Bpftrace, so a
forgotten run is collected and its child killed (`weakref.finalize`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import html
import os
import random
import selectors
import shutil
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import mode
from ..backends.rewrite import OutputMap
from ..captures.capture import Capture, load
from ..captures.replay import Replay
from ..drain import MapState
from ..errors import ClosedError
from ..hist import Histogram, guess_unit
from ..maps.table import Maps
from ..readers.batch import Batch
from ..results import Results
from ..schema import Schema
from ..store import FrameStore
from . import parse
from .parse import BpftraceError, BpftraceMissingError, Format, Snapshot

KIND = "bpftrace"  # the `kind` of its outputs and the `backend` it shows
OTHER = "printf_other"  # printf lines that match none of the script's formats
FRAME_PREFIX = "bpftrace/"  # its maps and messages in a capture's frames
ATTACH_TIMEOUT = 60.0  # seconds bpftrace may take to compile and attach (seconds here, more when busy)
STOP_TIMEOUT = 10.0  # seconds bpftrace may take to print its maps and exit after SIGINT
HISTORY_INTERVAL = 0.1
MAX_SNAPSHOTS = 10_000  # printings kept per map
MAX_MESSAGES = 100_000  # other messages kept (print() of values, time(), cat()...): the newest
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# With this variable set, bpftrace writes it on stderr once every probe is attached (the hook of
# its runtime tests, src/bpftrace.cpp); the attached_probes message comes before attaching.
ATTACHED_MARK = "__BPFTRACE_NOTIFY_PROBES_ATTACHED"
PACKAGE = "bpftrace"  # the Debian package
# Stopping without losing or miscounting what was already made. On SIGINT bpftrace drops the
# events it is reading at that moment, uncounted (perf_event_printer returns once exitsig_recv is
# set, src/bpftrace.cpp); and the kernel reports a perf buffer's lost events only with the next
# record written to that CPU's buffer (a PERF_RECORD_LOST before it), so losses at the end of a
# burst stay unreported. So stop() first has a probe appended to the script printf SYNC_TEXT on
# every CPU (a close() of a bad fd from a thread pinned to each CPU in turn), and waits for the
# line of each CPU: each CPU's buffer is read in order, so by then everything made before, and
# every loss, has been read. Only then SIGINT.
# The probe matches no pid (in a PID namespace bpftrace sees root-namespace pids, not ours): a
# run's token is the fd it closes, one per run and round (sync_fd), so another run's hand-shake
# and a late line of an earlier round are told apart. Its line says CPU and round.
SYNC_TEXT = "__kernelscope_sync__ "
SYNC_FD = -(1 << 30)  # close() of a negative fd fails with EBADF; the tracepoint sees an unsigned int
SYNC_ROUNDS = 256  # rounds of one run's hand-shake (each run has its own range of fds)
SYNC_RUNS = 1 << 20  # run tokens: SYNC_FD - token * SYNC_ROUNDS - round stays above INT_MIN
SYNC_TIMEOUT = 5.0
SYNC_FIRST_TIMEOUT = 2.0  # no answer to the first round by then: the hand-shake does not work here
SYNC_WARNING = ("kernelscope's stop hand-shake (a sync line per CPU, see kernelscope.bpftrace.run) got "
                "no answer from bpftrace: what was in flight at stop, and losses not yet reported, "
                "may be missing from the counts (stats may not be exact)")
CLOSE_TRACEPOINT = "syscalls/sys_enter_close"

__all__ = ["Bpftrace", "BpftraceReplay", "BpftraceView", "close_all", "live_runs", "replay"]
_live: weakref.WeakSet[Bpftrace] = weakref.WeakSet()
# Children are started from one spawner thread: PR_SET_PDEATHSIG fires when the thread that
# forked exits, so a child forked by a short-lived thread would die with it. The spawner lives
# while any run does (its end would kill their children) and ends with the last one.
_spawner: ThreadPoolExecutor | None = None
SPAWNER_THREAD = "kernelscope-bpftrace-spawn"
_spawner_lock = threading.RLock()  # RLock: a finalizer may release it while this thread spawns


def _spawn(argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """subprocess.Popen(argv, **popen), forked by the spawner thread."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(1, thread_name_prefix=SPAWNER_THREAD)
        return _spawner.submit(_popen, argv, popen).result()


def _popen(argv: list[str], popen: dict[str, Any]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, **popen)


_libc = ctypes.CDLL(None, use_errno=True)


def _pdeathsig() -> None:
    """In the child before exec: SIGKILL when the thread that forked it ends."""
    if _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _release_spawner() -> None:
    """End the spawner thread once no run has a child left (stopped, closed or collected)."""
    global _spawner
    with _spawner_lock:
        if _spawner is not None and not any(b._child.has_child for b in list(_live)):
            _spawner.shutdown(wait=True)
            _spawner = None


def live_runs() -> list[Bpftrace]:
    """Every bpftrace run not closed yet."""
    return [b for b in list(_live) if not b.closed]


@atexit.register
def close_all() -> None:
    """Stop every live bpftrace run (interpreter exit, %bpf_stop --all, unloading the extension)."""
    for b in live_runs():
        b.close()
    _release_spawner()


def find_bpftrace(path: str | None = None) -> str:
    """The bpftrace binary to run, or BpftraceMissingError naming the package."""
    found = shutil.which(path or os.environ.get("KERNELSCOPE_BPFTRACE") or "bpftrace")
    if found is None:
        raise BpftraceMissingError(
            f"bpftrace is not installed ({path or 'bpftrace'} is not on PATH): on Debian/Ubuntu "
            f"`apt-get install {PACKAGE}` (Debian 12 has 0.17); without it, notebooks can replay "
            "recorded runs (KERNELSCOPE_MODE=replay)")
    return found


def output_names(formats: list[Format]) -> list[str]:
    """One output per printf format: "printf" for a lone format, else printf1, printf2..."""
    return ["printf"] if len(formats) == 1 else [f"printf{i + 1}" for i in range(len(formats))]


def probe_specs(script: str) -> list[str]:
    """The probes a script names (`tracepoint:syscalls:sys_enter_read`, `interval:s:1`, ...)."""
    text = parse._skip_comments(script)
    specs: list[str] = []
    cur: list[str] = []
    depth = 0
    for c in text:
        if c == "{":
            if depth == 0:
                head = "".join(cur)
                head = head.split("/")[0] if "/" in head and not head.strip().startswith("/") else head
                specs += [s.strip() for s in head.replace("\n", ",").split(",") if s.strip()]
                cur = []
            depth += 1
        elif c == "}":
            depth -= 1
        elif depth == 0:
            cur.append(c)
    return specs


def sync_fd(token: int, round_: int) -> int:
    """The fd a run with `token` closes in hand-shake round `round_`."""
    return SYNC_FD - token * SYNC_ROUNDS - round_


def sync_probe(token: int) -> str:
    """The probe appended to a script for stop()'s hand-shake (SYNC_TEXT, then CPU and round)."""
    top = sync_fd(token, 0) & 0xFFFFFFFF  # round r closes the fd top - r, as the tracepoint sees it
    return (f"\ntracepoint:syscalls:sys_enter_close /args->fd <= {top} && args->fd > {top - SYNC_ROUNDS}/ "
            f'{{ printf("{SYNC_TEXT}%d %d\\n", cpu, {top} - args->fd); }}\n')


def _close_on_each(cpus: list[int], fd: int) -> None:
    """close(fd) from this thread on each CPU of `cpus` (the thread's affinity changes)."""
    for cpu in cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})
            os.close(fd)


def can_sync() -> bool:
    """Whether the kernel has the close() tracepoint the hand-shake uses (tracefs mounted)."""
    return any(Path(root, "events", CLOSE_TRACEPOINT).is_dir()
               for root in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"))


def _new_output(name: str, index: int, dtype: np.dtype, max_rows: int | None) -> MapState:
    schema = Schema(dtype)
    return MapState(OutputMap(name, KIND, index), schema, FrameStore(schema, max_rows))


def run_stats(outputs: dict[str, MapState], lost: int) -> dict[str, dict[str, Any]]:
    """Per printf output: attempted = received + dropped. bpftrace reports lost events for its
    one perf buffer, not per format: they are the `dropped` of the output when there is one,
    else of an "unattributed" entry, so the sums over entries are exact either way."""
    out: dict[str, dict[str, Any]] = {}
    for name, ms in outputs.items():  # the reader thread adds printf_other in a new dict
        out[name] = _entry(ms.om.kind, ms.store.received, len(ms.store), ms.store.evicted,
                           ms.store.memory_bytes)
    if lost:
        target = next(iter(out.values())) if len(out) == 1 else None
        if target is None:
            target = out["unattributed"] = _entry(KIND, 0)
        target["dropped"] += lost
        target["attempted"] += lost
    return out


def _entry(kind: str, received: int, stored: int = 0, evicted: int = 0, memory: int = 0) -> dict[str, Any]:
    return {"kind": kind, "attempted": received, "received": received, "dropped": 0,
            "in_flight": 0, "lost_records": 0, "stored": stored, "evicted": evicted, "fill_bytes": 0,
            "capacity_bytes": 0, "pages": 0, "inversions": None, "memory_bytes": memory, "reloads": 0}


class _Child:
    """The bpftrace process and what its stream became. Holds no reference to its Bpftrace."""

    def __init__(self, formats: list[Format], outputs: dict[str, MapState], max_rows: int | None) -> None:
        self.formats = formats
        self.names = output_names(formats)
        self.outputs = outputs
        self.max_rows = max_rows
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()
        self.snapshots: dict[str, list[Snapshot]] = {}
        self.snapshots_dropped: dict[str, int] = {}  # the oldest printings let go (MAX_SNAPSHOTS)
        self.messages: list[tuple[float, str, str]] = []
        self.messages_dropped = 0  # the oldest let go (MAX_MESSAGES)
        self.lost_reported = 0  # bpftrace's lost_events, our own sync lines included
        self.sync_sent = 0  # sync closes made: once one was answered, each wrote a sync line (or lost it)
        self.sync_received = 0  # sync lines of this run, any round
        self.sync_token = random.randrange(SYNC_RUNS)
        self.sync_round = 0
        self.sync_works: bool | None = None  # None: not tried; False: the first round got no answer
        self.attached: int | None = None
        self.synced = threading.Event()  # a SYNC_TEXT line came
        self.sync_seen: dict[int, int] = {}  # CPU -> the latest round whose line came
        self.sync = False  # the script has the sync probe
        self.attached_event = threading.Event()  # set once attached (ATTACHED_MARK), or at the end
        self.marked = False  # bpftrace said every probe is attached
        self.ended = threading.Event()
        self.stderr: list[str] = []
        self.error: BaseException | None = None
        self.t0 = time.monotonic()
        self.thread: threading.Thread | None = None
        self.returncode: int | None = None
        self._partial = b""
        self._last_sample = 0.0

    # --- the process -----------------------------------------------------------------------

    def spawn(self, argv: list[str], script: str) -> None:
        # bpftrace dies with the thread that forked it (the spawner, which lives as long as this
        # process runs bpftrace): setpriv, else prctl() between fork and exec
        wrap = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        extra: dict[str, Any] = {} if wrap else {"preexec_fn": _pdeathsig}
        self.t0 = time.monotonic()
        self.proc = _spawn([*wrap, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, start_new_session=True,
                           env={**os.environ, "LC_ALL": "C", ATTACHED_MARK: "1"}, **extra)
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(script.encode())
            self.proc.stdin.close()
        except BrokenPipeError:  # it failed before reading the script: stderr says why
            pass
        self.thread = threading.Thread(target=self.read_all, name="kernelscope-bpftrace", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def has_child(self) -> bool:
        """Started and not reaped by end() yet."""
        return self.proc is not None and self.returncode is None

    def signal_group(self, sig: int) -> None:
        """`sig` to bpftrace's process group (its own session), unless it was reaped already."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def _exited(self) -> bool:
        """True once the child exited; it is left a zombie (not reaped), so its pid and process
        group cannot be reused before killpg() has reached what it left behind."""
        assert self.proc is not None
        if self.proc.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def end(self, graceful: bool, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the child: SIGINT first when `graceful` (it prints its maps), SIGKILL to the
        group after `timeout` or at once; then reap it and let the reader finish."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            if graceful and not self._exited():
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
                deadline = time.monotonic() + timeout
                while not self._exited() and time.monotonic() < deadline:
                    self.ended.wait(0.01)
            self.signal_group(signal.SIGKILL)  # what is left of the group, bpftrace included
            proc.wait()
        self.returncode = proc.returncode
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    # --- the stream ------------------------------------------------------------------------

    def read_all(self) -> None:
        """The reader thread: stdout and stderr until both close."""
        proc = self.proc
        assert proc is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        open_ = 2
        err_partial = b""
        try:
            while open_:
                for key, _ in sel.select(HISTORY_INTERVAL):
                    data = os.read(key.fd, 1 << 16)
                    if not data:
                        sel.unregister(key.fileobj)
                        open_ -= 1
                        continue
                    if key.data == "out":
                        self.feed(data)
                    else:
                        err_partial += data
                        *lines, err_partial = err_partial.split(b"\n")
                        self.stderr_lines([ln.decode(errors="replace") for ln in lines])
                self.sample()
            if err_partial:
                self.stderr_lines([err_partial.decode(errors="replace")])
            self.feed(b"\n")  # a last line without its newline
        except BaseException as e:  # kept for the user: the thread has no caller
            self.error = e
        finally:
            sel.close()
            self.sample(force=True)
            self.ended.set()
            self.attached_event.set()

    def stderr_lines(self, lines: list[str]) -> None:
        for ln in lines:
            if ln.strip() == ATTACHED_MARK:
                self.marked = True
                self.attached_event.set()
            else:
                self.stderr.append(ln)

    def feed(self, data: bytes) -> None:
        """Parse what arrived: whole lines now, a partial one when its end comes."""
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        msgs = [m for m in (parse.message(ln.decode(errors="replace")) for ln in lines) if m is not None]
        if not msgs:
            return
        now = time.monotonic()
        got = parse.dispatch(msgs, self.formats, now - self.t0, SYNC_TEXT)
        if got.synced:
            self.sync_received += len(got.synced)
            for cpu, r in got.synced:
                self.sync_seen[cpu] = max(r, self.sync_seen.get(cpu, 0))
            self.synced.set()
        stamp = time.monotonic_ns()
        for i, recs in got.rows.items():
            self.outputs[self.names[i]].store.append(Batch(np.concatenate(recs)), stamp)
        if got.other:
            ms = self.outputs.get(OTHER)
            if ms is None:
                ms = _new_output(OTHER, len(self.outputs), parse.TEXT_DTYPE, self.max_rows)
                # a new dict, not an insert: other threads iterate the one they hold meanwhile
                self.outputs = {**self.outputs, OTHER: ms}
            texts = np.zeros(len(got.other), ms.schema.dtype)
            texts["text"] = [t.rstrip("\n").encode()[:parse.STRING_BYTES] for t in got.other]
            ms.store.append(Batch(texts), stamp)
        with self.lock:
            for name, snap in got.snapshots:
                kept = self.snapshots.setdefault(name, [])
                kept.append(snap)
                if len(kept) > MAX_SNAPSHOTS:  # a long run printing at intervals: the newest stay
                    del kept[0]
                    self.snapshots_dropped[name] = self.snapshots_dropped.get(name, 0) + 1
            self.messages += [(now - self.t0, k, t) for k, t in got.messages]
            if len(self.messages) > MAX_MESSAGES:
                self.messages_dropped += len(self.messages) - MAX_MESSAGES
                del self.messages[:len(self.messages) - MAX_MESSAGES]
            self.lost_reported += got.lost
        if got.attached is not None:
            self.attached = got.attached - self.sync

    @property
    def lost(self) -> int:
        """Events of the script lost: bpftrace's count less the sync lines lost. Once the
        hand-shake was answered, each sync close made a line, so one that did not come was
        lost and is in bpftrace's count (exact once drain() is done); without an answer none
        is known to have been made, and nothing is taken off."""
        if not self.sync_works:
            return self.lost_reported
        return max(0, self.lost_reported - max(0, self.sync_sent - self.sync_received))

    def drain(self, timeout: float | None = None, first_timeout: float | None = None) -> bool:
        """Have bpftrace read everything already made and every loss (the SYNC_TEXT hand-shake
        on each CPU); False if it has no sync probe, or did not answer all CPUs within
        `timeout` s (SYNC_TIMEOUT). No answer at all within `first_timeout` s
        (SYNC_FIRST_TIMEOUT) sets sync_works False (the counts may not be exact)."""
        if not self.sync or not self.alive:
            return False
        timeout = SYNC_TIMEOUT if timeout is None else timeout
        first_timeout = SYNC_FIRST_TIMEOUT if first_timeout is None else first_timeout
        want = set(os.sched_getaffinity(0))
        last_sent: dict[int, int] = {}
        t0 = time.monotonic()
        while True:
            # done once each CPU's line of the last round sent to it came: that CPU's buffer is
            # read in order, so every line of an earlier round came or was lost (and reported)
            missing = sorted(c for c in want if self.sync_seen.get(c, 0) < last_sent.get(c, 1))
            if not missing:
                return True
            limit = timeout if self.sync_works else first_timeout
            if not self.alive or time.monotonic() - t0 > limit or self.sync_round >= SYNC_ROUNDS - 1:
                if not self.sync_works:
                    self.sync_works = False
                return False
            # a CPU whose buffer was full lost its line (a loss it reports with the next): again,
            # in a new round, so a late line of the last one is not taken for this one's
            self.sync_round += 1
            self.synced.clear()
            self.sync_sent += len(missing)
            last_sent.update(dict.fromkeys(missing, self.sync_round))
            fd = sync_fd(self.sync_token, self.sync_round)
            t = threading.Thread(target=_close_on_each, args=(missing, fd),
                                 name="kernelscope-bpftrace-sync", daemon=True)
            t.start()
            t.join()
            self.synced.wait(HISTORY_INTERVAL)
            if self.sync_received:
                self.sync_works = True

    def sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_sample < HISTORY_INTERVAL:
            return
        self._last_sample = now
        for name, st in run_stats(self.outputs, self.lost).items():
            ms = self.outputs.get(name)
            if ms is not None:
                ms.history.append({k: st[k] for k in ("attempted", "received", "dropped", "fill_bytes",
                                                      "capacity_bytes", "lost_records")} | {"t": now})


def _finish(child: _Child) -> None:
    """A collected run's end: its child killed and reaped, the spawner let go if it was the
    last. A collection can run in any thread, the spawner's too (a cyclic GC while Popen
    allocates, with _spawn() holding _spawner_lock and waiting for it): there it only kills
    and reaps; the spawner is let go by the next stop, close or exit."""
    child.end(graceful=False)
    if not threading.current_thread().name.startswith(SPAWNER_THREAD):
        _release_spawner()


class BpftraceView:
    """Reading a bpftrace run's maps, shared by live runs and replays. The subclass provides
    `source` (the script) and `_snapshot_frames`."""

    source: str

    def _snapshot_frames(self, name: str) -> list[tuple[float, str, pd.DataFrame]]:
        raise NotImplementedError

    @property
    def map_names(self) -> list[str]:
        """The maps bpftrace has printed so far (`@name`), in the order they first came."""
        raise NotImplementedError

    def _pick(self, name: str | None) -> str:
        names = self.map_names
        if name is None:
            if len(names) != 1:
                raise KeyError(f"this run has printed {len(names)} maps ({', '.join(names) or 'none yet'}): "
                               "name one, e.g. bt.map('@counts')")
            return names[0]
        if not name.startswith("@"):
            name = "@" + name
        if name not in names:
            more = ("; bpftrace prints its maps when the run stops (or by print(@map), e.g. in an "
                    "interval probe), and never an empty one")
            raise KeyError(f"no map {name!r} printed; this run has {', '.join(names) or 'none'}{more}")
        return name

    def map(self, name: str | None = None) -> pd.DataFrame:
        """Map `name` as bpftrace last printed it: key columns (named after the script's key
        expressions: `@x[pid, comm]` -> pid, comm) then `value` (count/sum/min/max/avg), the
        count/average/total of stats(), or a hist()'s buckets (low, high, count)."""
        name = self._pick(name)
        frame = self._snapshot_frames(name)[-1][2].copy()
        frame.attrs["map"] = name
        return frame

    def snapshots(self, name: str | None = None) -> pd.DataFrame:
        """Every printing of map `name` (by print() in an interval probe, and at exit), one
        after the other: `snapshot` (0, 1, ...) and `t` (seconds since start) before its columns."""
        name = self._pick(name)
        parts = []
        for i, (t, _, frame) in enumerate(self._snapshot_frames(name)):
            part = frame.copy()
            part.insert(0, "t", t)
            part.insert(0, "snapshot", i)
            parts.append(part)
        return pd.concat(parts, ignore_index=True)

    def hist(self, name: str | None = None, snapshot: int = -1) -> Histogram:
        """A hist() or lhist() map as kernelscope's Histogram (one per key), from its last
        printing or printing `snapshot`: the same .plot(), .percentile(), .frame() as a BPF map's."""
        name = self._pick(name)
        _, kind, frame = self._snapshot_frames(name)[snapshot]
        if kind != "hist":
            raise KeyError(f"map {name} is a {kind}, not a hist() or lhist()")
        call = parse.map_functions(self.source).get(name)
        return parse.histogram(frame, call, guess_unit(name.lstrip("@"), *(call[1][:1] if call else [])))


def maps_html(view: BpftraceView, rows: int = 10) -> str:
    """Each map as last printed (its first `rows` rows), for a run's HTML view."""
    parts = []
    for name in view.map_names:
        frame = view.map(name)
        more = f" ({len(frame):,} rows)" if len(frame) > rows else ""
        parts.append(f"<p><b>{html.escape(name)}</b>{more}</p>{frame.head(rows).to_html(index=False)}")
    return f"<div>{''.join(parts)}</div>" if parts else ""


class _LiveOrReplay(type):
    """`Bpftrace(..., name=N)` under KERNELSCOPE_MODE=replay is the replay of N's capture."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if mode.mode() == "replay":
            path = mode.require_capture(kwargs.get("name"))
            return replay(path, speed=mode.replay_speed(), name=kwargs.get("name"))
        return super().__call__(*args, **kwargs)


class Bpftrace(BpftraceView, Results, metaclass=_LiveOrReplay):
    """A bpftrace script run by the system's bpftrace, its output parsed into frames."""

    live = True
    backend = KIND

    def __init__(self, script: str, *, name: str | None = None, pid: int | None = None,
                 args: Sequence[str] = (), positional: Sequence[str | int] = (), max_rows: int | None = None,
                 bpftrace: str | None = None, attach_timeout: float = ATTACH_TIMEOUT) -> None:
        """`pid`: bpftrace -p (uprobes/USDT of that process; the run ends when it exits).
        `args`: more bpftrace options (e.g. ["-B", "full"]). `positional`: the script's $1,
        $2... (after the script on bpftrace's command line). `max_rows`: keep only the newest
        rows per printf output. `bpftrace`: the binary (default: bpftrace on PATH, or
        $KERNELSCOPE_BPFTRACE). Line numbers in errors are the script's."""
        self.source = script
        self.name = name
        self.pid = pid
        self.args = list(args)
        self.positional = [str(p) for p in positional]
        self.max_rows = max_rows
        self.binary = bpftrace
        self.attach_timeout = attach_timeout
        self.formats = parse.printf_formats(script)
        self._tagged = parse.tag_formats(script, self.formats)  # what bpftrace runs (dispatch by tag)
        outputs = {n: _new_output(n, i, f.dtype, max_rows)
                   for i, (n, f) in enumerate(zip(output_names(self.formats), self.formats, strict=True))}
        self._maps = Maps(tables={})
        self.warnings: list[str] = []
        self.error: BaseException | None = None
        self.save_error: Exception | None = None  # what saving the capture (record mode) raised
        self.closed = False
        self.started_at: float | None = None
        self._child = _Child(self.formats, outputs, max_rows)
        self._finalizer = weakref.finalize(self, _finish, self._child)
        self._stopped: dict[str, dict[str, Any]] | None = None
        _live.add(self)

    @property
    def outputs(self) -> dict[str, MapState]:
        """One output per printf format, and printf_other once a line matched none (the
        reader thread then replaces the dict: one held stays whole)."""
        return self._child.outputs

    @outputs.setter
    def outputs(self, value: dict[str, MapState]) -> None:
        self._child.outputs = value

    # --- lifecycle -------------------------------------------------------------------------

    def argv(self) -> list[str]:
        """The command run: bpftrace -f json [-p PID] [args] - [positional] (the script comes
        on stdin, so bpftrace's errors say `stdin:LINE:COL`; $1... are the words after `-`)."""
        pid = ["-p", str(self.pid)] if self.pid is not None else []
        return [find_bpftrace(self.binary), "-f", "json", *pid, *self.args, "-", *self.positional]

    @property
    def loaded(self) -> bool:
        """True once bpftrace attached every probe."""
        return self._child.marked

    @property
    def running(self) -> bool:
        return self.started_at is not None and not self._child.ended.is_set() and not self.closed

    @property
    def attached(self) -> int | None:
        """How many probes bpftrace attached (its attached_probes message), None before."""
        return self._child.attached

    @property
    def stderr(self) -> str:
        """What bpftrace wrote on stderr."""
        return "\n".join(self._child.stderr)

    @property
    def returncode(self) -> int | None:
        return self._child.returncode

    def start(self, wait: bool = True) -> Bpftrace:
        """Run bpftrace and read its output in a background thread. With `wait`, return once it
        attached its probes; a script it rejects raises BpftraceScriptError (at bpftrace's line)
        and leaves no process. Idempotent; a stopped run does not start again."""
        if self.closed:
            raise ClosedError("this bpftrace run is closed; its frames stay readable, run the script again")
        if self.started_at is not None:
            return self
        argv = self.argv()
        self.started_at = time.monotonic()
        self._child.sync = can_sync()
        probe = sync_probe(self._child.sync_token) if self._child.sync else ""
        self._child.spawn(argv, self._tagged.script + probe)
        if wait:
            try:
                self.wait_attached(self.attach_timeout)
            except BaseException:
                self.close()
                raise
        return self

    def wait_attached(self, timeout: float = ATTACH_TIMEOUT) -> Bpftrace:
        """Block until bpftrace attached its probes; its error if it exited first."""
        child = self._child
        if not child.attached_event.wait(timeout):
            raise BpftraceError(f"bpftrace did not attach its probes within {timeout:g} s")
        if not child.marked:
            assert child.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(STOP_TIMEOUT)
            child.end(graceful=False)
        if not child.marked and child.returncode != 0:
            self._note_stderr()
            raise parse.untag_error(parse.script_error("\n".join(child.stderr), child.returncode),
                                    self._tagged.inserts)
        self._note_stderr()
        return self

    def _note_stderr(self) -> None:
        for said in parse.stderr_messages(self._child.stderr):
            if said not in self.warnings:
                self.warnings.append(said)

    def stop(self) -> Bpftrace:
        """End the run: once bpftrace has read what was made before (and reported its losses:
        see SYNC_TEXT), SIGINT, so it prints every map and exits (a run not yet attached is
        killed at once); then the process group is killed and the child reaped. Idempotent."""
        if self.started_at is None or self._stopped is not None:
            return self
        if self.loaded:
            self._child.drain()
            if self._child.sync_works is False and SYNC_WARNING not in self.warnings:
                self.warnings.append(SYNC_WARNING)
        self._child.end(graceful=self.loaded)
        self._note_stderr()
        if self._child.error is not None and self.error is None:
            self.error = self._child.error
        self._stopped = self._compute_stats()
        try:
            self._record()
        except Exception as e:  # kept as a warning too: close() goes on without raising
            self.save_error = e
            self.warnings.append(f"the capture of {self.name} was not saved ({type(e).__name__}: {e}); "
                                 "its frames stay here: save them with .save(path)")
            raise
        finally:
            _release_spawner()
        return self

    def close(self) -> None:
        """Stop (if running) and forget the child; frames, maps and stats stay readable. What
        stop() raised (a capture that could not be saved) is kept in `warnings` (and
        `save_error`), not raised."""
        if self.closed:
            return
        try:
            self.stop()
        except Exception as e:
            said = f"stopping raised {type(e).__name__}: {e}"
            if self.save_error is not e and said not in self.warnings:
                self.warnings.append(said)
        self.closed = True
        self._finalizer()
        _release_spawner()

    def __enter__(self) -> Bpftrace:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record(self) -> None:
        if self.name and mode.mode() == "record":
            path = mode.capture_path(self.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.save(path)

    def wait(self, duration: float | None = None, limit: int | None = None,
             progress: Callable[[int, float], None] | None = None) -> Bpftrace:
        """Block until `duration` s passed, `limit` printf rows arrived, or bpftrace exited
        (exit() in the script, -p's process ended); then stop. Ctrl-C stops early."""
        self.start()
        t0 = time.monotonic()
        try:
            while True:
                received = sum(ms.store.received for ms in self.outputs.values())
                elapsed = time.monotonic() - t0
                if progress:
                    progress(received, elapsed)
                if ((duration is not None and elapsed >= duration)
                        or (limit is not None and received >= limit) or self._child.ended.is_set()):
                    break
                self._child.ended.wait(0.05)
        finally:
            self.stop()
        if self._child.error is not None:
            raise self._child.error
        return self

    def print_maps(self) -> Bpftrace:
        """Ask bpftrace to print every map now (SIGUSR1): each printing is a new snapshot."""
        if self.running and self.loaded:
            self._child.signal_group(signal.SIGUSR1)
        return self

    # --- what it shows ---------------------------------------------------------------------

    def state(self) -> str:
        if self.closed:
            return "closed"
        if self.running:
            return "running" if self.loaded else "starting"
        return "stopped" if self.started_at is not None else "new"

    def attach_points(self) -> list[str]:
        return probe_specs(self.source)

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per printf output: attempted = received + dropped (lost_events; see run_stats)."""
        return self._stopped if self._stopped is not None else self._compute_stats()

    def _compute_stats(self) -> dict[str, dict[str, Any]]:
        return run_stats(self.outputs, self._child.lost)

    @property
    def lost_events(self) -> int:
        return self._child.lost

    @property
    def map_names(self) -> list[str]:
        with self._child.lock:
            return list(self._child.snapshots)

    def _snapshot_frames(self, name: str) -> list[tuple[float, str, pd.DataFrame]]:
        with self._child.lock:
            snaps = list(self._child.snapshots.get(name, []))
        keys = parse.map_keys(self.source).get(name)
        kinds = parse.map_key_kinds(self.source).get(name)
        for snap in snaps:
            if snap.frame is None:
                snap.frame = parse.map_frame(snap, keys, kinds)
        return [(snap.t, snap.kind, snap.frame) for snap in snaps if snap.frame is not None]

    def messages(self) -> pd.DataFrame:
        """What else bpftrace printed: print() of values, time(), cat(), join(), system()...
        (t in seconds since start, type, text)."""
        with self._child.lock:
            rows = list(self._child.messages)
        df = pd.DataFrame(rows, columns=["t", "type", "text"])
        if self._child.messages_dropped:
            df.attrs["dropped"] = self._child.messages_dropped  # the oldest, over MAX_MESSAGES
        return df

    @property
    def df(self) -> pd.DataFrame:
        """The one printf output's rows; for a script that prints no printf lines, its one map."""
        if not self.outputs and self.map_names:
            return self.map()
        return self.frame()

    def _repr_html_(self) -> str:
        return Results._repr_html_(self) + maps_html(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """printf rows (as events), every printing of every map and the other messages, in one
        capture file; kernelscope.bpftrace.replay(path) reads it without bpftrace."""
        return save_run(self, path)


def save_run(run: Bpftrace, path: str | os.PathLike[str]) -> Path:
    from ..captures import capture

    t0 = run.started_at or 0.0
    stats = run.stats
    maps = {n: ms.capture(stats.get(n, {}), t0) for n, ms in run.outputs.items()}
    for mc in maps.values():
        mc.kind = "ringbuf"  # what a capture knows; the replay says bpftrace again (settings.backend)
    frames = {f"{FRAME_PREFIX}{n}": _with_kinds(run, n) for n in run.map_names}
    frames[f"{FRAME_PREFIX}messages"] = run.messages()
    settings = {"name": run.name, "backend": KIND, "bpftrace": {
        "stats": stats, "attached": run.attached, "lost_events": run.lost_events, "pid": run.pid,
        "args": run.args, "positional": run.positional, "maps": run.map_names,
        "attach_points": run.attach_points(),
        "warnings": run.warnings, "version": _version(run.binary)}}
    cap = Capture(maps, run.source, settings, started_ns=int(t0 * 1e9), frames=frames)
    return capture.save(cap, path)


def _with_kinds(run: Bpftrace, name: str) -> pd.DataFrame:
    frames = run._snapshot_frames(name)
    df = run.snapshots(name)
    df.attrs["kinds"] = [k for _, k, _ in frames]
    df.attrs["times"] = [t for t, _, _ in frames]
    return df


def _version(binary: str | None) -> str:
    try:
        out = subprocess.run([find_bpftrace(binary), "--version"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError, BpftraceMissingError):
        return ""
    return out.stdout.strip()


class BpftraceReplay(BpftraceView, Replay):
    """A saved bpftrace run: printf rows replayed as events, maps and snapshots as they were.
    No bpftrace, no BPF, no root."""

    def __init__(self, capture: Capture, speed: float | None = None, name: str | None = None,
                 path: str | None = None) -> None:
        super().__init__(capture, speed=speed, name=name, path=path)
        self.backend = KIND
        for ms in self.outputs.values():
            ms.om.kind = KIND
        info = capture.settings.get("bpftrace", {})
        self._info = info
        self._names: list[str] = list(info.get("maps", []))

    @property
    def map_names(self) -> list[str]:
        return self._names

    def _snapshot_frames(self, name: str) -> list[tuple[float, str, pd.DataFrame]]:
        df = self.capture.frames[f"{FRAME_PREFIX}{name}"]
        kinds, times = df.attrs.get("kinds", []), df.attrs.get("times", [])
        out = []
        for i, (_, part) in enumerate(df.groupby("snapshot", sort=True)):
            frame = part.drop(columns=["snapshot", "t"]).reset_index(drop=True)
            frame = frame.dropna(axis=1, how="all") if kinds[i] != "hist" else frame
            out.append((float(times[i]), str(kinds[i]), frame))
        return out

    def messages(self) -> pd.DataFrame:
        return self.capture.frames[f"{FRAME_PREFIX}messages"].copy()

    @property
    def attached(self) -> int | None:
        return self._info.get("attached")

    @property
    def lost_events(self) -> int:
        return int(self._info.get("lost_events", 0))

    @property
    def df(self) -> pd.DataFrame:
        if not self.outputs and self.map_names:
            return self.map()
        return self.frame()

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        recorded = self._info.get("stats", {})
        return {n: {**st, "replayed": True} for n, st in recorded.items()}

    def attach_points(self) -> list[str]:
        return [*self._info.get("attach_points", []), f"(replay of {self.path or 'a capture'})"]

    def _repr_html_(self) -> str:
        return Replay._repr_html_(self) + maps_html(self)


def replay(path: str | os.PathLike[str], speed: float | None = None,
           name: str | None = None) -> BpftraceReplay:
    """A saved bpftrace run (Bpftrace.save, or KERNELSCOPE_MODE=record), everything released
    at once; with `speed` (a factor of the recorded pace), its printf rows as they came, from start()."""
    cap = load(path)
    if cap.settings.get("backend") != KIND:
        raise BpftraceError(f"{path} is a capture of a {cap.settings.get('backend', 'bcc')} probe, "
                            "not of a bpftrace run: replay it with kernelscope.captures.replay.replay")
    run = BpftraceReplay(cap, speed=speed, name=name, path=str(path))
    if speed is None:
        run.start()
    return run

