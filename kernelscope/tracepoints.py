"""Find tracepoints and read their argument layout, for `%bpf_tracepoints` and `%bpf_format`.

Both read tracefs (/sys/kernel/tracing/events/CATEGORY/EVENT/format), the kernel's own
description of each tracepoint's record. That layout is what BCC's TRACEPOINT_PROBE `args`
struct is built from, so it is right for the running kernel even when the kernel headers
are not (see PLATFORM.md, header/kernel mismatch).

In record mode (KERNELSCOPE_MODE) what they found is also saved beside the notebook's
captures, and in replay mode it is read back from there: replay needs no tracefs.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import hashlib
import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import host, mode
from .errors import TracefsAccessError, UnknownTracepointError, UnsupportedError

# The fields every tracepoint record starts with (struct trace_entry). BCC hides them
# behind one `u64 __do_not_use__` member: read them with helpers instead.
COMMON_FIELDS = ("common_type", "common_flags", "common_preempt_count", "common_pid")
_COMMON_HELPER = {
    "common_pid": "bpf_get_current_pid_tgid() (the thread id is the low 32 bits)",
    "common_type": "(constant per tracepoint; not readable in BCC)",
    "common_flags": "(not readable in BCC)",
    "common_preempt_count": "(not readable in BCC)",
}

_FIELD = re.compile(
    r"^\s*field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);\s*(?:signed:(?P<signed>-?\d+);)?"
)
_REGEX_CHARS = set("^$+|(){}\\.")
_GLOB_CHARS = set("*?[")
_TP = re.compile(r"\bTRACEPOINT_PROBE\s*\(\s*(\w+)\s*,\s*(\w+)\s*\)")
_RAW_TP = re.compile(r"\bRAW_TRACEPOINT_PROBE\s*\(\s*(\w+)\s*\)")
_KPROBE = re.compile(r"\bint\s+(kprobe__|kretprobe__)(\w+)\s*\(")


def tracefs_events() -> Path:
    return host.TRACEFS / "events"


@contextlib.contextmanager
def reading_tracefs(events: Path) -> Iterator[None]:
    """Turn a refused read under tracefs (`events` is its events/ folder) into TracefsAccessError.

    Path.exists() and is_dir() raise PermissionError rather than answer False when a parent
    folder is not searchable, as tracefs's 0700 top folder is for anyone but root.
    """
    try:
        yield
    except PermissionError as e:
        raise TracefsAccessError(events.parent, e) from None


def list_tracepoints(events: Path | None = None) -> list[str]:
    """Every `category:event` the running kernel offers (none when tracefs is not mounted)."""
    events = events or tracefs_events()
    out = []
    with reading_tracefs(events):
        try:
            cats = sorted(events.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        for cat in cats:
            if cat.is_dir():
                out += [f"{cat.name}:{ev.name}" for ev in sorted(cat.iterdir()) if (ev / "format").exists()]
    return out


def config_option(option: str) -> str | None:
    """`y`, `m`, `n` (off) or None (absent) for a CONFIG_ option; "unknown" if the config is hidden."""
    found = host.kernel_config()
    if found is None:
        return "unknown"
    return found[0].get(option)


def _line_of(source: str, pos: int) -> int:
    return source.count("\n", 0, pos) + 1


def check_tracepoint(cat: str, ev: str, line: int | None = None, events: Path | None = None,
                     known: list[str] | None = None) -> list[str] | None:
    """UnknownTracepointError naming close matches when `cat:ev` is not a tracepoint of this kernel.

    Returns the list of known tracepoints when it had to read it, for the next call.
    """
    events = events or tracefs_events()
    fmt = events / cat / ev / "format"
    with reading_tracefs(events):
        if fmt.exists():
            # found is not enough: the loader reads this file and `id`, both 0440, and a
            # tracefs remounted mode=755 lets anyone see them but only root and its group read
            fmt.open("rb").close()
            return known
    known = known if known is not None else list_tracepoints(events)
    close = difflib.get_close_matches(f"{cat}:{ev}", known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; %bpf_tracepoints PATTERN lists them"
    where = f"line {line}: " if line else ""
    raise UnknownTracepointError(f"{where}no tracepoint {cat}:{ev} on this kernel{hint}")


def check_attach_points(source: str, events: Path | None = None) -> None:
    """Name an unknown tracepoint (with close matches) or a missing kernel feature up front."""
    events = events or tracefs_events()
    known: list[str] | None = None
    for m in _TP.finditer(source):
        cat, ev = m.groups()
        known = check_tracepoint(cat, ev, _line_of(source, m.start()), events, known)
    for m in _RAW_TP.finditer(source):
        known = check_raw_tracepoint(m.group(1), _line_of(source, m.start()), events, known)
    kp = _KPROBE.search(source)
    if kp:
        check_kprobes(_line_of(source, kp.start()))


def check_raw_tracepoint(name: str, line: int | None = None, events: Path | None = None,
                         known: list[str] | None = None) -> list[str]:
    known = known if known is not None else list_tracepoints(events or tracefs_events())
    if any(k.split(":", 1)[1] == name for k in known):
        return known
    close = difflib.get_close_matches(name, [k.split(":", 1)[1] for k in known], n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    where = f"line {line}: " if line else ""
    raise UnknownTracepointError(f"{where}no raw tracepoint {name} on this kernel{hint}")


def check_kprobes(line: int | None = None,
                  instead: str = "a tracepoint (TRACEPOINT_PROBE) or raw tracepoint") -> None:
    if config_option("CONFIG_KPROBES") in (None, "n"):
        where = f"line {line}: " if line else ""
        raise UnsupportedError(
            f"{where}kprobes are not available: this kernel was built "
            f"without CONFIG_KPROBES. Use {instead} instead.",
            feature="CONFIG_KPROBES",
        )


def events_dir() -> Path:
    return tracefs_events()


def _ensure_tracefs() -> Path:
    """The events folder of tracefs, or the SetupError saying how to mount it (this mounts nothing:
    only `kernelscope setup` changes the host)."""
    events = events_dir()
    with reading_tracefs(events):
        if not events.is_dir():
            raise host.not_mounted_error(events.parent)
    return events


def capture_name(kind: str, text: str | None) -> str:
    """The file name (without .json) a recorded lookup of `text` is kept under.

    Only letters, digits, `_` and `-` of `text` are kept, so no pattern can name a path
    outside the captures folder; a hash of the whole text keeps different patterns apart.
    """
    if text is None:
        return f"{kind}.all"
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:60]
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{kind}.{safe}.{digest}" if safe else f"{kind}.{digest}"


def match(pattern: str | None, names: list[str]) -> list[str]:
    """The `category:event` names that `pattern` selects.

    `pattern` is a glob (`sched:*exit*`), a regex written `/.../` or containing regex
    syntax (`^syscalls:sys_enter_(open|close)`), or else a case-insensitive substring
    (`openat`). A glob without a colon also matches against the event name alone.
    """
    if not pattern:
        return list(names)
    if len(pattern) > 2 and pattern.startswith("/") and pattern.endswith("/"):
        return _regex(pattern[1:-1], names)
    if _GLOB_CHARS & set(pattern):
        if ":" in pattern:
            return [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        return [n for n in names if fnmatch.fnmatchcase(n.split(":", 1)[1], pattern)
                or fnmatch.fnmatchcase(n, pattern)]
    if _REGEX_CHARS & set(pattern):
        return _regex(pattern, names)
    low = pattern.lower()
    return [n for n in names if low in n.lower()]


def _regex(pattern: str, names: list[str]) -> list[str]:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"bad regular expression {pattern!r}: {e}") from None
    return [n for n in names if rx.search(n)]


def tracepoints(pattern: str | None = None, events: Path | None = None) -> pd.DataFrame:
    """Tracepoints of the running kernel matching `pattern` (see `match`), one row each.

    Without `events` (a tracefs events/ folder), the kernel's own, through the mode: saved in
    record mode, read back from the captures in replay mode.
    """
    pattern = pattern or None
    if events is not None:
        names = match(pattern, list_tracepoints(events))
    else:
        what = f"list of tracepoints matching {pattern!r}" if pattern else "list of tracepoints"
        saved = mode.remember(capture_name("tracepoints", pattern), lambda: {
            "pattern": pattern,
            "tracepoints": match(pattern, list_tracepoints(_ensure_tracefs())),
        }, what=what)
        names = list(saved["tracepoints"])
    rows = [(n, *n.split(":", 1)) for n in names]
    return pd.DataFrame(rows, columns=["tracepoint", "category", "event"])


def split_name(name: str) -> tuple[str, str]:
    """`sched:sched_switch`, `sched/sched_switch` or `sched sched_switch` -> (category, event)."""
    parts = re.split(r"[:/\s]+", name.strip())
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"expected CATEGORY:EVENT (e.g. sched:sched_switch), got {name!r}")
    return parts[0], parts[1]


@dataclass
class TracepointFormat:
    """The record layout of one tracepoint: `fields` is a DataFrame, one row per field."""

    category: str
    event: str
    id: int | None
    fields: pd.DataFrame
    print_fmt: str

    @property
    def name(self) -> str:
        return f"{self.category}:{self.event}"

    def args_fields(self) -> pd.DataFrame:
        """The fields a TRACEPOINT_PROBE can read as `args->NAME` (all but common_*)."""
        return self.fields[~self.fields["common"]].reset_index(drop=True)

    def __repr__(self) -> str:
        head = f"tracepoint {self.name} (id {self.id}); common_* fields are marked *"
        shown = self.fields.assign(field=[f"*{f}" if c else f for f, c in
                                          zip(self.fields["field"], self.fields["common"], strict=True)])
        return head + "\n" + shown.drop(columns=["common"]).to_string(index=False)

    def _repr_html_(self) -> str:
        e = html.escape
        cols = ["field", "type", "offset", "size", "signed", "read in BCC"]
        head = "".join(f"<th style='text-align:left'>{c}</th>" for c in cols)
        rows = []
        for r in self.fields.to_dict("records"):
            style = " style='color:#6e7781'" if r["common"] else ""
            field = e(str(r["field"]))
            name = f"{field} <small>(common)</small>" if r["common"] else f"<b>{field}</b>"
            cells = [name, f"<code>{e(str(r['type']))}</code>", str(r["offset"]), str(r["size"]),
                     str(r["signed"]), f"<code>{e(str(r['bcc']))}</code>"]
            rows.append(f"<tr{style}>" + "".join(f"<td style='text-align:left'>{c}</td>" for c in cells)
                        + "</tr>")
        return (
            f"<div><b>{e(self.name)}</b> (id {self.id}): "
            f"<code>TRACEPOINT_PROBE({e(self.category)}, {e(self.event)})</code> reads the fields "
            "below as <code>args-&gt;field</code>; the grey common_* fields are hidden by BCC."
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f"<small>print fmt: <code>{e(self.print_fmt)}</code></small></div>"
        )


def parse_format(text: str, category: str = "", event: str = "") -> TracepointFormat:
    """Parse the text of a tracefs `format` file."""
    ev_id = None
    print_fmt = ""
    rows = []
    for line in text.splitlines():
        if line.startswith("ID:"):
            ev_id = int(line.split(":", 1)[1])
        elif line.startswith("print fmt:"):
            print_fmt = line.split(":", 1)[1].strip()
        elif line.startswith("name:") and not event:
            event = line.split(":", 1)[1].strip()
        else:
            m = _FIELD.match(line)
            if m:
                name, ctype = _split_decl(m["decl"])
                signed = m["signed"]
                rows.append({
                    "field": name,
                    "type": ctype,
                    "offset": int(m["offset"]),
                    "size": int(m["size"]),
                    "signed": bool(int(signed)) if signed is not None else None,
                    "common": name in COMMON_FIELDS,
                    "bcc": _bcc_access(name, ctype),
                })
    fields = pd.DataFrame(rows, columns=["field", "type", "offset", "size", "signed", "common", "bcc"])
    return TracepointFormat(category, event, ev_id, fields, print_fmt)


def _split_decl(decl: str) -> tuple[str, str]:
    """`const char * filename` -> (filename, const char *); `char comm[16]` -> (comm, char[16])."""
    decl = decl.strip()
    m = re.match(r"^(?P<type>.*?)(?P<name>\w+)\s*(?P<dims>(\[[^\]]*\])*)$", decl)
    if not m:
        return decl, ""
    ctype = m["type"].strip()
    if m["dims"]:
        ctype = f"{ctype}{m['dims']}"
    return m["name"], ctype


def _bcc_access(name: str, ctype: str) -> str:
    if name in COMMON_FIELDS:
        return _COMMON_HELPER[name]
    if ctype.startswith("__data_loc"):
        return f"TP_DATA_LOC_READ_STR(buf, {name}, sizeof(buf))"
    if "[" in ctype:
        return f"bpf_probe_read_kernel(&dst, sizeof(dst), args->{name})"
    if "*" in ctype and "char" in ctype:
        return f"bpf_probe_read_user_str(buf, sizeof(buf), args->{name})"
    return f"args->{name}"


def tracepoint_format(name: str, events: Path | None = None) -> TracepointFormat:
    """The fields of `category:event` from tracefs, or UnknownTracepointError with close matches.

    Without `events`, the running kernel's, through the mode as `tracepoints` does: the
    format file's text is what is saved and read back, parsed the same way.
    """
    category, event = split_name(name)
    if events is not None:
        text = _read_format(events, category, event)
    else:
        full = f"{category}:{event}"
        saved = mode.remember(capture_name("format", full), lambda: {
            "tracepoint": full,
            "format": _read_format(_ensure_tracefs(), category, event),
        }, what=f"format of {full}")
        text = saved["format"]
    return parse_format(text, category, event)


def _read_format(events: Path, category: str, event: str) -> str:
    path = events / category / event / "format"
    with reading_tracefs(events):
        try:
            return path.read_text()
        except FileNotFoundError:
            pass
    known = list_tracepoints(events)
    close = difflib.get_close_matches(f"{category}:{event}", known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; %bpf_tracepoints PATTERN lists them"
    raise UnknownTracepointError(f"no tracepoint {category}:{event} on this kernel{hint}")
