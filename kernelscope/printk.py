"""`bpf_printk` / `bpf_trace_printk` output as a DataFrame (`probe.printk`).

What the kernel gives (checked on Linux 6.18): since 5.10 both helpers (and `bpf_trace_vprintk`,
which libbpf's `bpf_printk` uses past 3 arguments) emit the trace event
`bpf_trace:bpf_trace_printk`, one field `bpf_string`, the formatted text. Loading a program that
calls one enables that event in the top-level trace buffer (the shared `trace_pipe` every tool
reads), and the event is written to every tracefs instance where it is enabled. So kernelscope
makes a private instance, `instances/kernelscope-<pidns>-<pid>-<start>-<n>`, enables the event
there and reads its own `trace_pipe`: its own buffer, which no other reader consumes and whose
size (`buffer_size_kb`, per CPU) and overwrite count are its own. The instance lives while the
probe's gate is open (start to stop), is removed on stop/close, and instances left by killed
processes are removed by the next one that makes one (as kernelscope.folders does for folders).

The line carries no program id: the kernel cannot tell which program printed. Two things narrow
it to the probe's own lines: the instance's event filter keeps only strings matching a glob made
from the program's format strings (`"n=%d\\n"` -> `n=*`), so other programs' other messages
never enter the buffer (nor its loss count), and each line read must match one of those formats
exactly (`frame.attrs["other"]` counts those that did not). A program printing the same format,
or any format when the source's formats are not string literals (`attrs["filter"]` says so),
does show up: filter such a frame by `pid`.

Reading: the consuming `trace_pipe`, opened non-blocking and read by a daemon thread (the kernel
returns whole lines per read, up to a page) at most READ_LIMIT bytes per poll, parsed outside
the lock that `frame()`/`stats()` take, then appended; the thread waits `interval` s once it
finds the pipe empty. It loses nothing while it keeps up, and a program printing faster than
it reads only makes polls follow each other: stop turns the event off before joining the
thread, so its last poll ends and the drain after it is at most a buffer's worth. Lines are
kept as one DataFrame per poll (merged past MERGE_AT, and when a frame is made), the newest
`max_rows` of the probe or DEFAULT_MAX_LINES, the older counted in `evicted`. The
non-consuming `trace` file would be formatted whole on every read and still be overwritten.
Measured 2026-12-02 on the 2-core VM: the thread takes about 0.1 M lines/s (the
kernel formats trace_pipe text at about 0.2 M/s; per-CPU trace_pipes read 2x faster but lose
the kernel's merge of CPUs by exact timestamp, which the microsecond text cannot redo;
parsing takes 0.15-0.35 M/s), a program printing on every getppid() makes 0.4-0.8 M/s. An
instance gets tracefs's default size (1410 KiB per CPU here) while the top-level buffer
stays at 7 KiB until something expands it, and costs 35-125 ms to make or remove. What it
does lose is visible: `per_cpu/cpuN/stats` "overrun" (lines overwritten
unread) plus "dropped events", summed, is `attrs["lost"]` and `probe.stats["printk"]["dropped"]`;
the kernel counts every line its buffer took, so lines taken = received + other + lost exactly.
A line the helper itself could not write (-EBUSY when nested past 3 per CPU) is counted nowhere.

Columns: `time` (datetime), `ts_ns` (CLOCK_MONOTONIC, the instance uses trace_clock "mono", the
clock of bpf_ktime_get_ns, but the text has microseconds only), `cpu`, `pid` (the process,
tgid, from tracefs's record-tgid), `tid`, `comm` (tracefs's comm cache: `<...>` when evicted),
`flags` (irqs-off, need-resched, hardirq/softirq, preempt depth), `message` (one trailing newline
stripped, as bpf_printk formats usually end in one).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import folders
from .errors import PrintkAccessError, SettingError, TracefsAccessError
from .host import TRACEFS
from .schema import monotonic_to_epoch_ns

PREFIX = "kernelscope-"
EVENT = "events/bpf_trace/bpf_trace_printk"
COLUMNS = ["time", "ts_ns", "cpu", "pid", "tid", "comm", "flags", "message"]
_CALL = re.compile(r"\b(?:bpf_printk|bpf_trace_printk|bpf_trace_vprintk|__bpf_printk|__bpf_vprintk)\s*\(")
_LITERALS = re.compile(r'\s*((?:"(?:[^"\\\n]|\\.)*"\s*)+)[,)]')
_STRING = re.compile(r'"((?:[^"\\\n]|\\.)*)"')
_COMMENTS = re.compile(r'//[^\n]*|/\*.*?\*/|("(?:[^"\\\n]|\\.)*")', re.S)
# printf conversions bpf_bprintf_prepare accepts, with the kernel's %p extensions (%pI4, %pks...)
_CONVERSION = re.compile(r"%(?:(?P<pct>%)|[-+ #0]*(?:\d+|\*)?(?:\.\d+)?(?:hh|h|ll|l|z|j|t)?"
                         r"(?:(?P<p>p(?:[iI][46]|ks|us|[KxsSB])?)|(?P<c>[diouxXcs])))")
# one trace line, record-tgid on: "  comm-tid  (  tgid) [cpu] flags  sec.usec: bpf_trace_printk: msg"
_LINE = re.compile(r" *(?P<comm>.*?)-(?P<tid>\d+) +\( *(?P<tgid>\d+|-+)\) +\[(?P<cpu>\d+)\] +"
                   r"(?P<flags>\S+) +(?P<sec>\d+)\.(?P<usec>\d{6}): bpf_trace_printk: (?P<msg>.*)")
_LOST = re.compile(r"CPU:(\d+) \[LOST (\d+) EVENTS\]")
READ_LIMIT = 1 << 20  # bytes of trace_pipe text one poll reads at most, then parses (~10,000 lines)
DEFAULT_MAX_LINES = 1_000_000  # lines kept when the probe sets no max_rows: the oldest go first
MERGE_AT = 64  # stored chunks (one per poll) merged into one past this many
_DTYPES = {"ts_ns": "int64", "cpu": "int32", "pid": "int64", "tid": "int64"}
_counter = itertools.count()


def check_kb(buffer_kb: int | None) -> int | None:
    """`Probe(printk_kb=)`: None (tracefs's default size) or KiB per CPU >= 1."""
    whole = isinstance(buffer_kb, int) and not isinstance(buffer_kb, bool)
    if buffer_kb is not None and (not whole or buffer_kb < 1):
        raise SettingError(f"printk_kb is the per-CPU buffer for bpf_printk lines in KiB, a number >= 1 "
                           f"(or None for tracefs's default), not {buffer_kb!r}")
    return buffer_kb


def uses_printk(source: str) -> bool:
    """Whether the program source calls bpf_printk / bpf_trace_printk / bpf_trace_vprintk."""
    return _CALL.search(_strip_comments(source)) is not None


def _strip_comments(source: str) -> str:
    return _COMMENTS.sub(lambda m: m.group(1) or " ", source)


def formats(source: str) -> list[str] | None:
    """The format strings of every printk call in `source` (C escapes decoded), or None when one
    of them is not a string literal (a `char fmt[]` passed by name, a macro)."""
    code = _strip_comments(source)
    out = []
    for m in _CALL.finditer(code):
        lit = _LITERALS.match(code, m.end())
        if lit is None:
            return None
        out.append("".join(_unescape(s) for s in _STRING.findall(lit.group(1))))
    return out


def _unescape(s: str) -> str:
    simple = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0", "a": "\a",
              "b": "\b", "f": "\f", "v": "\v", "?": "?"}

    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        if e[0] == "x":
            return chr(int(e[1:], 16))
        if e[0] in "01234567" and len(e) > 1:
            return chr(int(e, 8))
        return simple.get(e, e)

    return re.sub(r"\\(x[0-9a-fA-F]+|[0-7]{1,3}|.)", one, s)


def _body(fmt: str) -> str:
    return fmt[:-1] if fmt.endswith("\n") else fmt


def matcher(fmts: list[str]) -> re.Pattern[str]:
    """A regex a message (trailing newline stripped) matches in full when one of `fmts` made it."""
    alts = []
    for fmt in fmts:
        parts, pos = [], 0
        for m in _CONVERSION.finditer(_body(fmt)):
            parts.append(re.escape(fmt[pos:m.start()]))
            parts.append(_value(m))
            pos = m.end()
        parts.append(re.escape(_body(fmt)[pos:]))
        alts.append("".join(parts))
    return re.compile("|".join(f"(?:{a})" for a in alts) or "(?!)", re.S)


_VALUES = {"d": r" *[-+ ]?\d+ *", "i": r" *[-+ ]?\d+ *", "u": r" *\+?\d+ *", "o": r" *0?[0-7]+ *",
           "x": r" *(?:0[xX])?[0-9a-fA-F]+ *", "X": r" *(?:0[xX])?[0-9a-fA-F]+ *", "c": r" *.", "%": "%"}


def _value(m: re.Match[str]) -> str:
    """What conversion `m` prints, as a regex: digits for integers (padded to a width with spaces
    or zeros), anything for strings and the %p family."""
    return "%" if m["pct"] else _VALUES.get(m["c"] or "", ".*?")


def kernel_filter(fmts: list[str]) -> str:
    """The instance's event filter: `bpf_string ~ "GLOB" || ...`, one glob per format, each
    conversion a `*` and each character the filter cannot quote a `?`; always ends in `*` (the
    string keeps the format's newline)."""
    globs = []
    for fmt in fmts:
        parts, pos = [], 0
        body = _body(fmt)
        for m in _CONVERSION.finditer(body):
            parts += [_glob_text(body[pos:m.start()]), "%" if m["pct"] else "*"]
            pos = m.end()
        parts.append(_glob_text(body[pos:]) + "*")
        globs.append(re.sub(r"\*+", "*", "".join(parts)))
    return " || ".join(f'bpf_string ~ "{g}"' for g in dict.fromkeys(globs))


def _glob_text(text: str) -> str:
    return "".join(c if c.isprintable() and c not in '*?[]\\"' else "?" for c in text)


# --- parsing: trace_pipe text -> rows -----------------------------------------------------


@dataclass
class Parsed:
    """What one piece of trace_pipe text held: rows (lists per column) and LOST notices."""

    rows: dict[str, list[Any]] = field(default_factory=lambda: {c: [] for c in COLUMNS[1:]})
    lost_reported: int = 0
    rest: str = ""  # an unfinished last line, kept for the next read


def parse(text: str, rest: str = "") -> Parsed:
    """Parse trace_pipe text (record-tgid on) into rows. A message with newlines in it spans
    lines: those without a header continue the previous message. The output adds one newline
    after each message; the message's own trailing newline is then stripped too."""
    out = Parsed()
    text = rest + text
    end = text.rfind("\n")
    out.rest, text = text[end + 1:], text[:max(end, 0)]
    rows = out.rows
    messages: list[str] = rows["message"]
    for line in text.split("\n") if text else ():
        m = _LINE.fullmatch(line)
        if m is None:
            lost = _LOST.fullmatch(line)
            if lost is not None:
                out.lost_reported += int(lost.group(2))
            elif messages:
                messages[-1] += "\n" + line
            continue
        tid = int(m["tid"])
        rows["ts_ns"].append(int(m["sec"]) * 1_000_000_000 + int(m["usec"]) * 1000)
        rows["cpu"].append(int(m["cpu"]))
        rows["pid"].append(int(m["tgid"]) if m["tgid"][0] != "-" else tid)
        rows["tid"].append(tid)
        rows["comm"].append(m["comm"])
        rows["flags"].append(m["flags"])
        messages.append(m["msg"])
    rows["message"] = [_body(s) for s in messages]
    return out


# --- the instance: tracefs files only -------------------------------------------------------


class Instance:
    """A private tracefs instance with only bpf_trace_printk enabled, read through its
    non-blocking trace_pipe. Knows the files, not threads."""

    def __init__(self, tracefs: Path = TRACEFS, buffer_kb: int | None = None, filter: str = "") -> None:
        self.tracefs = Path(tracefs)
        remove_orphans(self.tracefs)
        self.path = self.tracefs / "instances" / f"{folders.my_prefix(PREFIX)}{next(_counter)}"
        try:
            self.path.mkdir()
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM):
                raise
            try:  # tracefs unreadable (root-only, as mounted by default) says more than instances/
                os.scandir(self.path.parent).close()
            except PermissionError as denied:
                raise TracefsAccessError(self.tracefs, denied) from None
            raise PrintkAccessError(self.path, e) from None
        self.fd = -1
        try:
            if buffer_kb is not None:
                self._write("buffer_size_kb", str(buffer_kb))
            self._write("trace_clock", "mono")
            self._write("options/record-tgid", "1")
            self.filtered = False
            if filter:
                with contextlib.suppress(OSError):  # EINVAL: an older kernel's filter syntax
                    self._write(f"{EVENT}/filter", filter)
                    self.filtered = True
            self.fd = os.open(self.path / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
            self._write(f"{EVENT}/enable", "1")
        except BaseException:
            self.remove()
            raise

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    @property
    def buffer_kb(self) -> int:
        return int((self.path / "buffer_size_kb").read_text().split()[0])

    def read(self, limit: int = READ_LIMIT, size: int = 1 << 16) -> str:
        """What trace_pipe has now, up to about `limit` bytes ("" when empty). Each read returns
        whole lines (at most a page of them: the kernel stops before a line that would not
        fit). The limit bounds one poll: a program printing faster than this is read would
        otherwise keep the loop going for ever."""
        chunks, total = [], 0
        while total < limit:
            try:
                data = os.read(self.fd, size)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
            total += len(data)
        return b"".join(chunks).decode("utf-8", "replace")

    def counts(self) -> dict[str, int]:
        """Summed over CPUs from per_cpu/cpuN/stats: lines lost (overrun + commit overrun +
        dropped events) and taken (entries + overrun + read events + dropped)."""
        lost = taken = 0
        for stats in sorted((self.path / "per_cpu").glob("cpu*/stats")):
            st: dict[str, int] = {}
            for line in stats.read_text().splitlines():
                k, _, v = line.partition(":")
                with contextlib.suppress(ValueError):
                    st[k.strip()] = int(v)
            cpu_lost = st.get("overrun", 0) + st.get("commit overrun", 0) + st.get("dropped events", 0)
            lost += cpu_lost
            taken += cpu_lost + st.get("entries", 0) + st.get("read events", 0)
        return {"lost": lost, "taken": taken}

    def remove(self) -> None:
        """Disable the event, close trace_pipe, remove the instance. Idempotent."""
        with contextlib.suppress(OSError):
            self._write(f"{EVENT}/enable", "0")
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.path.rmdir()


def remove_orphans(tracefs: Path = TRACEFS) -> list[Path]:
    """Remove kernelscope instances whose process is gone (same rule as folders.remove_orphans:
    pid namespace, pid and start time in the name). Returns those removed."""
    removed = []
    ns = folders._pid_namespace()
    name = re.compile(re.escape(PREFIX) + r"(\d+)-(\d+)-(\d+)-\d+")
    with contextlib.suppress(OSError):
        for d in (Path(tracefs) / "instances").iterdir():
            m = name.fullmatch(d.name)
            if not m or m.group(1) != ns or folders._start_time(m.group(2)) == m.group(3):
                continue
            with contextlib.suppress(OSError):
                (d / EVENT / "enable").write_text("0")
                d.rmdir()
                removed.append(d)
    return removed


# --- the channel: rows, counts, the reader thread, a probe's lifecycle ------------------------


class Printk:
    """A probe's printk lines: what was read so far (kept over stop/start and reloads, the newest
    `max_lines`), and while open an `Instance` read by a daemon thread every `interval` s.

    Two locks: `_read_lock` lets one reader at a time take text from trace_pipe and parse it
    (the thread, or pause()'s last reads); `_lock` guards what others read (the rows, the
    counts, `instance`) and is held only to append a parsed chunk or to take a snapshot, so
    `frame()` and `stats()` never wait for a read."""

    def __init__(self, fmts: list[str] | None, buffer_kb: int | None = None, tracefs: Path = TRACEFS,
                 interval: float = 0.05, max_lines: int | None = None) -> None:
        self.formats = fmts
        self.match = matcher(fmts) if fmts is not None else None
        self.filter = kernel_filter(fmts) if fmts else ""
        self.buffer_kb, self.tracefs, self.interval = buffer_kb, Path(tracefs), interval
        self.max_lines = DEFAULT_MAX_LINES if max_lines is None else max_lines
        self._chunks: list[pd.DataFrame] = []  # one per poll that kept lines, merged past MERGE_AT
        self.stored = 0  # rows in _chunks
        self.received = 0  # every line of the probe's read, evicted ones included
        self.evicted = 0
        self.message_bytes = 0  # of the lines received
        self.other = self.lost = self.taken = self.lost_reported = 0
        self.epoch_offset_ns = monotonic_to_epoch_ns()
        self.instance: Instance | None = None
        self.opened_kb: int | None = None  # the instance's buffer size, as tracefs reports it
        self.error: BaseException | None = None  # the instance could not be made: probe.printk raises it
        self.read_error = ""  # reading stopped on this (the instance removed by hand...): in stats
        self.poll_max_s = 0.0  # the longest one poll took (read, parse, append)
        self.last_pause: dict[str, float] = {}  # seconds pause() spent: join, drain, remove
        self._rest = ""
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._merge_lock = threading.Lock()
        self._appended = 0  # chunks ever appended
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        """Make the instance and start reading. Idempotent."""
        if self.instance is None:
            inst = Instance(self.tracefs, self.buffer_kb, self.filter)
            with self._lock:
                self.instance, self.opened_kb = inst, inst.buffer_kb
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="kernelscope-printk", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._poll()[1]:
                    self._stop.wait(self.interval)
        except OSError as e:
            self.read_error = f"{type(e).__name__}: {e}"

    def poll_once(self) -> int:
        """Read what the instance holds now, up to READ_LIMIT bytes; returns the lines read (the
        probe's and others')."""
        return self._poll()[0]

    def _poll(self) -> tuple[int, int]:
        """(lines, bytes) read: the text is read and parsed outside `_lock`, taken only to append."""
        with self._read_lock:
            inst = self.instance
            if inst is None or inst.fd < 0:
                return 0, 0
            t0 = time.monotonic()
            text = inst.read()
            got = parse(text, self._rest)
            self._rest = got.rest
            messages = got.rows["message"]
            keep = [True] * len(messages) if self.match is None else \
                [self.match.fullmatch(m) is not None for m in messages]
            kept = keep.count(True)
            chunk = None
            if kept:
                chunk = pd.DataFrame({c: list(itertools.compress(v, keep)) if kept < len(keep) else v
                                      for c, v in got.rows.items()}, columns=COLUMNS[1:]).astype(_DTYPES)
            size = sum(len(m) for m in itertools.compress(messages, keep))
            with self._lock:
                self.lost_reported += got.lost_reported
                self.other += len(keep) - kept
                if chunk is not None:
                    self._append(chunk, size)
                many = len(self._chunks) > MERGE_AT
            if many:
                self._merge()
            self.poll_max_s = max(self.poll_max_s, time.monotonic() - t0)
            return len(keep), len(text)

    def _append(self, chunk: pd.DataFrame, message_bytes: int) -> None:
        """Under `_lock`: store a chunk, evicting the oldest rows past max_lines."""
        self._chunks.append(chunk)
        self._appended += 1
        self.stored += len(chunk)
        self.received += len(chunk)
        self.message_bytes += message_bytes
        over = self.stored - self.max_lines
        while over > 0:
            first = self._chunks[0]
            gone = min(over, len(first))
            if gone == len(first):
                self._chunks.pop(0)
            else:
                self._chunks[0] = first.iloc[gone:]
            self.stored -= gone
            self.evicted += gone
            over -= gone

    def _merge(self) -> pd.DataFrame:
        """The stored rows as one frame, which then replaces the chunks it was made from. The
        concatenation runs outside `_lock`: meanwhile rows are only appended (new chunks at the
        end) or evicted (from the front), so the merged frame less the rows evicted since stands
        for the chunks before the new ones."""
        with self._merge_lock:
            with self._lock:
                snap, evicted, appended = list(self._chunks), self.evicted, self._appended
            if not snap:
                return pd.DataFrame({c: [] for c in COLUMNS[1:]}, columns=COLUMNS[1:]).astype(_DTYPES)
            if len(snap) == 1:
                return snap[0]
            merged = pd.concat(snap, ignore_index=True)
            with self._lock:
                gone = self.evicted - evicted
                k = len(self._chunks) - (self._appended - appended)  # chunks left of the snapshot
                if k >= 0 and sum(len(c) for c in self._chunks[:k]) == len(merged) - gone:
                    self._chunks[:k] = [merged.iloc[gone:]] if gone < len(merged) else []
            return merged

    def pause(self) -> None:
        """Stop reading: the event off (first, so the reader's last poll ends however fast the
        program prints), the reader joined, the buffer drained, the counts kept, the instance
        removed. Idempotent; open() starts again with a new instance."""
        inst = self.instance
        t0 = time.monotonic()
        if inst is not None:
            with contextlib.suppress(OSError):
                inst._write(f"{EVENT}/enable", "0")
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()
        self._thread = None
        t1 = time.monotonic()
        if inst is None:
            return
        time.sleep(0.02)  # a program already past the enabled check still commits its line
        with contextlib.suppress(OSError):
            while self._poll()[1]:  # the event is off: at most a buffer's worth is left
                pass
        t2 = time.monotonic()
        with self._lock:
            with contextlib.suppress(OSError):
                counts = inst.counts()
                self.lost += counts["lost"]
                self.taken += counts["taken"]
            self.instance = None
        inst.remove()
        self.last_pause = {"join_s": t1 - t0, "drain_s": t2 - t1, "remove_s": time.monotonic() - t2}

    close = pause

    def counts(self) -> dict[str, int]:
        """Lost and taken so far, the open instance's included."""
        with self._lock:
            return self._counts()

    def _counts(self) -> dict[str, int]:
        lost, taken = self.lost, self.taken
        if self.instance is not None:
            with contextlib.suppress(OSError):
                now = self.instance.counts()
                lost, taken = lost + now["lost"], taken + now["taken"]
        return {"lost": lost, "taken": taken}

    def describe_filter(self, inst: Instance | None = None) -> str:
        if self.formats is None:
            return "none: a printk format is not a string literal, so every program's lines are kept"
        where = "kernel glob + exact format match" if inst is None or inst.filtered \
            else "exact format match (the kernel refused the glob filter)"
        return f"{where}: {', '.join(repr(f) for f in self.formats)}"

    def frame(self) -> pd.DataFrame:
        df = self._merge().reset_index(drop=True)  # a new frame: the stored one is not changed
        df.insert(0, "time", pd.to_datetime(df["ts_ns"] + self.epoch_offset_ns, unit="ns"))
        df.attrs.update(self.stats())
        return df

    def stats(self) -> dict[str, Any]:
        """As a `probe.stats` entry: received (the probe's lines, evicted ones included), stored
        (kept: the newest max_lines), evicted, dropped = lost_records = lines overwritten unread
        (every program's: the buffer cannot tell), other (lines read that no format of the
        program made), taken (every line the buffer took). One snapshot under the lock."""
        with self._lock:
            c = self._counts()
            inst, received, stored, evicted = self.instance, self.received, self.stored, self.evicted
            other, reported, message_bytes = self.other, self.lost_reported, self.message_bytes
        per_line = message_bytes / received if received else 0
        return {"kind": "printk", "attempted": received + c["lost"], "received": received,
                "dropped": c["lost"], "lost": c["lost"], "lost_records": c["lost"], "other": other,
                "taken": c["taken"], "lost_reported": reported, "stored": stored, "evicted": evicted,
                "max_rows": self.max_lines, "memory_bytes": int(stored * (96 + per_line)),
                "error": self.read_error, "buffer_kb": self.opened_kb, "poll_max_s": self.poll_max_s,
                "instance": str(inst.path) if inst is not None else None,
                "filter": self.describe_filter(inst)}


# --- Probe's hooks (probe.py keeps only these calls) -------------------------------------------

_channels: weakref.WeakKeyDictionary[Any, Printk] = weakref.WeakKeyDictionary()


def gate(probe: Any, value: int) -> None:
    """`Probe._set_gate`'s hook: when the gate opens on a program that prints, read its lines
    (a channel made the first time, closed with the probe); when it closes, stop reading."""
    ch = _channels.get(probe)
    if ch is None:
        if not value or not uses_printk(probe.source):
            return
        ch = _channels[probe] = Printk(formats(probe.source), probe.printk_kb)
        weakref.finalize(probe, ch.close)
    ch.max_lines = probe.max_rows or DEFAULT_MAX_LINES  # applies from the next line stored
    if not value:
        ch.pause()
        return
    try:
        ch.open()
    except OSError as e:  # PrintkAccessError, TracefsAccessError: events still drain, probe.printk raises
        ch.error = e
        note = f"bpf_printk output is not read: {e}"
        if note not in probe.warnings:
            probe.warnings.append(note)


def channel(probe: Any) -> Printk | None:
    return _channels.get(probe)


def frame_of(probe: Any) -> pd.DataFrame:
    """`probe.printk`: the probe's printk lines so far (an empty frame when it prints none); a
    replay's: the lines its capture kept."""
    cap = getattr(probe, "capture", None)
    if cap is not None:
        return cap.frames["printk"].copy() if "printk" in cap.frames else Printk([]).frame()
    ch = _channels.get(probe)
    if ch is None:
        ch = Printk(formats(probe.source) if uses_printk(probe.source) else [])
    if ch.error is not None:
        raise _fresh(ch.error)
    return ch.frame()


def _fresh(e: BaseException) -> BaseException:
    """A new exception of `e`'s type, message and attributes, with no traceback yet: raising the
    stored one on every `probe.printk` would chain each raise's frames onto its traceback."""
    new = type(e).__new__(type(e), *e.args)
    new.args = e.args
    new.__dict__.update(e.__dict__)
    return new


def saved_frame(probe: Any) -> pd.DataFrame:
    """What `probe.save()` keeps: `probe.printk`, or when the lines could not be read (no
    instance: not root) an empty frame whose attrs["error"] says why, so the capture is
    still written."""
    try:
        return frame_of(probe)
    except OSError as e:
        df = Printk([]).frame()
        df.attrs["error"] = f"{type(e).__name__}: {e}"
        return df


def with_stats(probe: Any, stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`probe.stats` plus a "printk" entry when the probe reads printk lines."""
    ch = _channels.get(probe)
    return stats if ch is None else {**stats, "printk": ch.stats()}

