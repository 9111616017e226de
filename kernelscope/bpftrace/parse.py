"""bpftrace's `-f json` stream and script text -> typed rows, map frames and histograms.

Pure functions, no process: what `Bpftrace` (run.py) feeds each line of the child's stdout
through, and what the tests drive with lines written by hand.

bpftrace 0.17 prints one JSON object a line (src/output.cpp, `JsonOutput`): `{"type": T,
"data": D}` with T one of printf, map, hist, stats, value, time, cat, join, syscall,
attached_probes, lost_events (and helper_error, whose fields sit beside `type`). A map's
keys are one string, the key values joined with "," (`map_key_to_str`; _split_keys); a log2 hist()
bucket is {"max": -1} (negatives), {"min": 0, "max": 0}, {"min": 1, "max": 1}, then powers
of two; an lhist() has {"max": MIN-1} below its range and {"min": MAX} above it.
avg() comes as type "stats" with a number, stats() as {"count", "average", "total"}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..errors import KernelscopeError
from ..hist import Histogram

STRING_BYTES = 256  # a %s field's column width: bpftrace's strings are at most 200 bytes (0.17)
TEXT_DTYPE = np.dtype([("text", f"S{STRING_BYTES}")])  # a format with no conversions, or no format
INT_MIN = int(np.iinfo(np.int64).min)
INT_MAX = int(np.iinfo(np.int64).max)
MESSAGE_TYPES = ("printf", "map", "hist", "stats", "value", "time", "cat", "join", "syscall",
                 "attached_probes", "lost_events", "helper_error")


class BpftraceError(KernelscopeError):
    """bpftrace could not run the script, or its output could not be read; the message says why."""


class BpftraceMissingError(BpftraceError, FileNotFoundError):
    """No bpftrace binary on this host."""


class BpftraceScriptError(BpftraceError):
    """bpftrace rejected the script (syntax, semantics, a probe it cannot attach).

    `line`/`col` are where bpftrace pointed (1-based, in the text it was given), when it did;
    the message is bpftrace's own.
    """

    def __init__(self, message: str, line: int | None = None, col: int | None = None,
                 detail: str = "") -> None:
        self.message = message
        self.line = line
        self.col = col
        self.detail = detail  # the source line and caret bpftrace printed under it
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{where}{message}" + (f"\n{detail}" if detail else ""))


# --- the script -----------------------------------------------------------------------------

_CONVERSION = re.compile(r"%(?P<flags>[-+ #0]*)(?P<width>\d*)(?:\.(?P<prec>\d+))?"
                         r"(?P<len>hh|h|ll|l|z|j|t)?(?P<conv>[diouxXcsp%]|r[xh]?)")
_KEY_BEFORE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*[=:]\s*$")
_IDENT_TAIL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:\)\s*)?$")


def _skip_comments(script: str) -> str:
    """The script with comments blanked (same length, so offsets and lines stay)."""
    out = []
    i, n = 0, len(script)
    while i < n:
        c = script[i]
        if c == '"':
            j = i + 1
            while j < n and script[j] != '"':
                j += 2 if script[j] == "\\" else 1
            out.append(script[i:j + 1])
            i = j + 1
        elif script.startswith("//", i):
            j = script.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif script.startswith("/*", i):
            j = script.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", script[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _string_end(text: str, start: int) -> int:
    """Index just past the string literal opening at `start` (escapes skipped)."""
    j = start + 1
    while j < len(text) and text[j] != '"':
        j += 2 if text[j] == "\\" else 1
    return j + 1


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated pieces of `text` (strings and brackets kept whole)."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(text):
        c = text[i]
        if c == '"':
            j = _string_end(text, i)
            cur.append(text[i:j])
            i = j
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def _closing(text: str, start: int, open_: str, close: str) -> int:
    """Index of the bracket closing the one at `start` (strings skipped), or -1."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == '"':
            i = _string_end(text, i)
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _unescape(literal: str) -> str:
    """A bpftrace string literal's text (the escapes bpftrace's lexer knows)."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}.get(
        m.group(1), "\\" + m.group(1)), literal)


def _name_of(expr: str) -> str | None:
    """A column name for an argument or key expression: `pid`, `args->count` -> count, `$x` -> x."""
    e = expr.strip()
    e = re.sub(r"^\(\s*\w+\s*\)\s*", "", e)  # a cast
    m = _IDENT_TAIL.search(e.replace("->", ".").replace("$", ""))
    if m and re.fullmatch(r"[\w.$>\-\s()]*", e):
        return m.group(1)
    return None


@dataclass
class Field:
    name: str
    conv: str  # the conversion letter: d i u o x X c s p r

    @property
    def dtype(self) -> str:
        if self.conv in "di":
            return "<i8"
        if self.conv in "uoxXp":
            return "<u8"
        return f"S{STRING_BYTES}" if self.conv != "c" else "S4"


@dataclass
class Format:
    """One printf format of the script: the regex its lines match and the columns they give."""

    text: str  # the format as bpftrace prints it (escapes resolved)
    fields: list[Field]
    regex: re.Pattern[str]
    line: int  # the script line of the printf call

    @property
    def dtype(self) -> np.dtype:
        if not self.fields:
            return TEXT_DTYPE
        return np.dtype([(f.name, f.dtype) for f in self.fields])

    @property
    def literal_chars(self) -> int:
        return len(_CONVERSION.sub("", self.text))

    def record(self, text: str) -> np.ndarray | None:
        """`text` (one printf's output) as a 1-row array of this format's dtype, or None if it
        is not this format's."""
        m = self.regex.fullmatch(text)
        if m is None:
            return None
        out = np.zeros(1, self.dtype)
        if not self.fields:
            out["text"] = text.rstrip("\n").encode()[:STRING_BYTES]
            return out
        for i, f in enumerate(self.fields):
            raw = m.group(i + 1).strip()
            if f.conv in "di":
                out[f.name] = int(raw)
            elif f.conv in "xX":
                out[f.name] = int(raw, 16)
            elif f.conv == "o":
                out[f.name] = int(raw, 8)
            elif f.conv == "p":
                out[f.name] = int(raw, 16) if raw.startswith("0x") else 0
            elif f.conv == "u":
                out[f.name] = int(raw) & (2**64 - 1)
            else:
                out[f.name] = raw.encode()[:STRING_BYTES]
        return out


# A number padded either side: %6d right-aligns, %-6d left-aligns (trailing spaces).
_PIECE = {"d": r"(\s*-?\d+\s*)", "i": r"(\s*-?\d+\s*)", "u": r"(\s*\d+\s*)", "o": r"(\s*[0-7]+\s*)",
          "x": r"(\s*[0-9a-fA-F]+\s*)", "X": r"(\s*[0-9a-fA-F]+\s*)",
          "p": r"(\s*0x[0-9a-fA-F]+\s*|\s*\(nil\)\s*)", "c": r"(.)", "s": r"(.*?)"}


def parse_format(fmt: str, args: list[str], line: int = 0) -> Format:
    """A printf format and its argument expressions -> the columns its lines give.

    A conversion is named by the `word=` or `word:` just before it (`pid=%d` -> pid), else by
    its argument (`comm`, `args->count` -> count, `$x` -> x), else f0, f1...; names repeat as
    name_2, name_3. %d/%i are int64, %u/%x/%o/%p uint64, %s/%r strings.
    """
    fields: list[Field] = []
    pattern, pos, argi = [], 0, 0
    seen: dict[str, int] = {}
    for m in _CONVERSION.finditer(fmt):
        literal = fmt[pos:m.start()]
        pattern.append(re.escape(literal))
        pos = m.end()
        conv = m.group("conv")
        if conv == "%":
            pattern.append("%")
            continue
        before = _KEY_BEFORE.search(literal) or (
            _KEY_BEFORE.search(fmt[:m.start()]) if not literal else None)
        arg = args[argi] if argi < len(args) else ""
        argi += 1
        name = (before.group(1) if before else None) or _name_of(arg) or f"f{len(fields)}"
        if name.startswith("ks_"):
            name = "f_" + name
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name]}"
        kind = conv[0] if conv[0] != "r" else "s"
        fields.append(Field(name, kind))
        pattern.append(_PIECE[kind])
    pattern.append(re.escape(fmt[pos:]))
    return Format(fmt, fields, re.compile("".join(pattern), re.S), line)


def _printf_calls(text: str) -> Iterator[tuple[re.Match[str], list[str]]]:
    """Each `printf("literal", args)` call of `text` (comments skipped): its match, and its
    arguments, the format literal first."""
    for m in re.finditer(r"\bprintf\s*\(", text):
        end = _closing(text, m.end() - 1, "(", ")")
        if end < 0:
            continue
        parts = _split_args(text[m.end():end])
        if parts and parts[0].startswith('"') and parts[0].endswith('"'):
            yield m, parts


def printf_formats(script: str) -> list[Format]:
    """Every `printf("...", args)` of the script, in order (a format used twice counts once)."""
    text = _skip_comments(script)
    out: list[Format] = []
    for m, parts in _printf_calls(text):
        fmt = _unescape(parts[0][1:-1])
        if any(f.text == fmt for f in out):
            continue
        out.append(parse_format(fmt, parts[1:], text.count("\n", 0, m.start()) + 1))
    return out


# Each printf format of the script run gets this tag at its start (TAG_OPEN, the format's
# index, TAG_CLOSE: control characters no format of a user's is likely to hold), so every line
# says which format made it; dispatch() strips it. Written as raw bytes, not escapes, so the
# script's lines stay; columns after a tag move by its length, which untag_error() takes back.
TAG_OPEN, TAG_CLOSE = "\x1e", "\x1f"
_TAGGED = re.compile(f"^{TAG_OPEN}(\\d+){TAG_CLOSE}")


@dataclass
class Tagged:
    """A script with its printf formats tagged, and where the tags went (line, col, length:
    1-based, the column the tag starts at in the tagged text)."""

    script: str
    inserts: list[tuple[int, int, int]]


def tag_formats(script: str, formats: list[Format] | None = None) -> Tagged:
    """`script` with each printf format literal starting with its format's tag (the index in
    printf_formats(script))."""
    formats = printf_formats(script) if formats is None else formats
    index = {f.text: i for i, f in enumerate(formats)}
    text = _skip_comments(script)
    at: list[tuple[int, str]] = []
    for m, parts in _printf_calls(text):
        i = index.get(_unescape(parts[0][1:-1]))
        if i is None:
            continue
        quote = text.index('"', m.end())
        at.append((quote + 1, f"{TAG_OPEN}{i}{TAG_CLOSE}"))
    out: list[str] = []
    inserts: list[tuple[int, int, int]] = []
    pos, shift = 0, dict[int, int]()
    for offset, tag in at:
        out.append(script[pos:offset])
        pos = offset
        line = script.count("\n", 0, offset) + 1
        col = offset - (script.rfind("\n", 0, offset) + 1) + 1 + shift.get(line, 0)
        shift[line] = shift.get(line, 0) + len(tag)
        inserts.append((line, col, len(tag)))
        out.append(tag)
    out.append(script[pos:])
    return Tagged("".join(out), inserts)


def untag_error(err: BpftraceError, inserts: list[tuple[int, int, int]]) -> BpftraceError:
    """A BpftraceScriptError about the tagged script at the user's column, its quoted line and
    marker without the tags."""
    if not isinstance(err, BpftraceScriptError) or err.line is None:
        return err
    here = sorted(((c, n) for ln, c, n in inserts if ln == err.line), reverse=True)
    col = err.col
    lines = err.detail.split("\n")
    for c, n in here:  # from the right, so the earlier columns stay
        if col is not None and col > c:
            col -= n
        for k in range(min(2, len(lines))):
            lines[k] = lines[k][:c - 1] + lines[k][c - 1 + n:]
    detail = "\n".join(lines).replace(TAG_CLOSE, "").replace(TAG_OPEN, "") if here else err.detail
    return BpftraceScriptError(err.message, err.line, col, detail)


def map_keys(script: str) -> dict[str, list[str]]:
    """Each map's key column names from the script: `@n[pid, comm]` -> {"@n": ["pid", "comm"]}
    (an expression with no plain name gives key0, key1...)."""
    text = _skip_comments(script)
    out: dict[str, list[str]] = {}
    for m in re.finditer(r"(@[A-Za-z0-9_]*)\s*\[", text):
        name = m.group(1)
        if name in out:
            continue
        end = _closing(text, m.end() - 1, "[", "]")
        if end < 0:
            continue
        parts = _split_args(text[m.end():end])
        names, seen = [], set()
        for i, p in enumerate(parts):
            n = _name_of(p) or f"key{i}"
            if n in seen or n in ("value", "count", "low", "high", "snapshot", "t"):
                n = f"key{i}"
            seen.add(n)
            names.append(n)
        out[name] = names
    return out


# --- errors on stderr -----------------------------------------------------------------------

# bpftrace's locations: "stdin:3:5-8: ERROR: ..." (line:col-col), "stdin:1-2: ERROR: ..." (lines)
# (a probe's location starts where the previous token ended: its own line is the last of the range)
_ERROR_AT = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+)(?::(?P<col>\d+))?(?:-(?P<end>\d+))?:\s*"
                       r"ERROR:\s*(?P<msg>.*)$")
_ERROR = re.compile(r"^ERROR:\s*(?P<msg>.*)$")
# Said on every start where the memlock hard limit is below what bpftrace asks for; harmless on
# kernels >= 5.11, which account BPF memory to cgroups instead of RLIMIT_MEMLOCK.
HARMLESS = (re.compile(r"couldn't set RLIMIT_MEMLOCK"),)


def harmless(line: str) -> bool:
    return any(p.search(line) for p in HARMLESS)


_SAYS = re.compile(r"^(?:[^:\s]+:\d+(?::\d+)?(?:-\d+)?:\s*)?(?:WARNING|ERROR|INFO):")


def stderr_messages(lines: list[str]) -> list[str]:
    """bpftrace's stderr as messages: each WARNING/ERROR line with the source line and
    marker it prints under it; the harmless ones left out."""
    out: list[str] = []
    for ln in lines:
        if not ln.strip() or harmless(ln):
            continue
        if out and not _SAYS.match(ln):
            out[-1] += "\n" + ln
        else:
            out.append(ln)
    return out


def script_error(stderr: str, returncode: int | None) -> BpftraceError:
    """What bpftrace's stderr says went wrong: a BpftraceScriptError at its line when it
    named one, else a BpftraceError with its last words."""
    lines = [ln for ln in stderr.split("\n") if not harmless(ln)]  # not splitlines: tags hold \x1e, \x1f
    for i, ln in enumerate(lines):
        m = _ERROR_AT.match(ln)
        if m:
            detail = "\n".join(lines[i + 1:i + 3])
            col = int(m.group("col")) if m.group("col") else None
            line = int(m.group("end")) if col is None and m.group("end") else int(m.group("line"))
            return BpftraceScriptError(m.group("msg").strip(), line, col, detail)
    for ln in lines:
        m = _ERROR.match(ln)
        if m:
            said = m.group("msg").strip()
            if "root user" in said:  # 0.17: "bpftrace currently only supports running as the root user."
                said += " Without root, notebooks can replay recorded runs (KERNELSCOPE_MODE=replay)."
            return BpftraceScriptError(said)
    said = "\n".join(lines[-10:]).strip() or "nothing on stderr"
    return BpftraceError(f"bpftrace exited with status {returncode} before attaching: {said}")


# --- the JSON stream ------------------------------------------------------------------------


def message(line: str) -> dict[str, Any] | None:
    """One line of `-f json` output as a dict, None for a blank line (bpftrace prints some
    at exit). Anything else that is not one JSON object is a BpftraceError quoting it."""
    s = line.strip()
    if not s:
        return None
    try:
        msg = json.loads(s)
    except ValueError:
        raise BpftraceError(f"bpftrace printed a line that is not JSON: {s[:200]!r}") from None
    if not isinstance(msg, dict) or "type" not in msg:
        raise BpftraceError(f"bpftrace printed JSON without a type: {s[:200]!r}")
    return msg


@dataclass
class Snapshot:
    """One printing of one map (at exit, or by print()/interval): its kind and data as printed."""

    t: float  # seconds since the run started
    kind: str  # "map", "hist", "stats"
    data: Any
    frame: pd.DataFrame | None = None  # map_frame() of it, once asked for


_STRING_KEY = re.compile(r'^\s*(?:comm\b|"|(?:str|ksym|usym|kstack|ustack|username|cgroup_path|strftime|buf|'
                         r'path|inet_ntop|macaddr)\s*\()')
_NUMBER_KEY = re.compile(r"^\s*(?:-?\d+|0x[0-9a-fA-F]+|pid|tid|cpu|uid|gid|cgroup|nsecs|elapsed|retval|"
                         r"(?:count|sum|min|max|avg)\s*\(.*)\s*$")
_INT = re.compile(r"-?\d+")


def map_key_kinds(script: str) -> dict[str, list[str | None]]:
    """Each map's key kinds from the script's key expressions: "s" a string (comm, str(),
    a literal...), "n" a number (pid, cpu, 42...), None not known from the text alone."""
    text = _skip_comments(script)
    out: dict[str, list[str | None]] = {}
    for m in re.finditer(r"(@[A-Za-z0-9_]*)\s*\[", text):
        end = _closing(text, m.end() - 1, "[", "]")
        if m.group(1) in out or end < 0:
            continue
        out[m.group(1)] = ["s" if _STRING_KEY.match(p) else "n" if _NUMBER_KEY.match(p) else None
                           for p in _split_args(text[m.end():end])]
    return out


def _split_keys(keys: list[str], n: int, kinds: list[str | None] | None) -> tuple[list[list[str]], list[str]]:
    """bpftrace joins a map's key values with "," (`map_key_to_str`): a string key holding
    commas makes more pieces than keys. The surplus goes to the one string key: the one the
    script's expression says is a string, or the one position not always a number in the rows
    that split cleanly. Rows where that is not clear keep their surplus in the last key and
    are returned (joined keys) as ambiguous."""
    if n <= 1:
        return [[k] for k in keys], []
    split = [k.split(",") for k in keys]
    clean = [p for p in split if len(p) == n]
    kinds = list(kinds or []) + [None] * n
    numeric = [kinds[i] == "n" or (kinds[i] is None and bool(clean)
                                   and all(_INT.fullmatch(p[i]) for p in clean)) for i in range(n)]
    strings = [i for i in range(n) if not numeric[i]]
    rows: list[list[str]] = []
    ambiguous: list[str] = []
    for key, parts in zip(keys, split, strict=True):
        if len(parts) <= n:
            rows.append(parts + [""] * (n - len(parts)))
            continue
        if len(strings) == 1:
            j = strings[0]
            tail = len(parts) - (n - 1 - j)
            row = [*parts[:j], ",".join(parts[j:tail]), *parts[tail:]]
            if all(_INT.fullmatch(row[i]) for i in range(n) if numeric[i]):
                rows.append(row)
                continue
        rows.append([*parts[:n - 1], ",".join(parts[n - 1:])])
        ambiguous.append(key)
    return rows, ambiguous


def _typed(col: pd.Series) -> pd.Series:
    """A key column of strings as integers when every value is one."""
    try:
        return pd.to_numeric(col, downcast=None) if all(re.fullmatch(r"-?\d+", str(v)) for v in col) else col
    except (ValueError, OverflowError):
        return col


def _key_frame(keys: list[str], names: list[str] | None,
               kinds: list[str | None] | None = None) -> pd.DataFrame:
    n = len(names) if names else (keys[0].count(",") + 1 if keys else 1)
    names = names or (["key"] if n == 1 else [f"key{i}" for i in range(n)])
    rows, ambiguous = _split_keys(keys, len(names), kinds)
    df = pd.DataFrame(rows, columns=names) if rows else pd.DataFrame(columns=names)
    for c in df.columns:
        df[c] = _typed(df[c])
    if ambiguous:
        df.attrs["ambiguous_keys"] = ambiguous
    return df


def _values(values: list[Any]) -> pd.DataFrame:
    """Map values as columns: a number or string -> value; a tuple -> value0..; a record -> its fields."""
    if values and all(isinstance(v, list) for v in values):
        return pd.DataFrame([list(v) for v in values]).add_prefix("value")
    if values and all(isinstance(v, dict) for v in values):
        return pd.DataFrame(values)
    return pd.DataFrame({"value": values})


def has_keys(kind: str, data: Any) -> bool:
    """Whether a map's printed data is keyed ({key: value}) or the map has no key."""
    if kind == "hist":
        return isinstance(data, dict)
    if kind == "stats":  # stats() unkeyed is {count, average, total} of numbers; keyed, of dicts
        return isinstance(data, dict) and not ({"count", "average", "total"} >= set(data)
                                               and not any(isinstance(v, dict) for v in data.values()))
    return isinstance(data, dict)


def map_frame(snap: Snapshot, key_names: list[str] | None = None,
              key_kinds: list[str | None] | None = None) -> pd.DataFrame:
    """A map as printed -> a frame: key columns then `value` (count/sum/min/max/avg), the
    `count`/`average`/`total` of stats(), or a hist's buckets (`low`, `high`, `count`)."""
    if snap.kind == "hist":
        return hist_buckets(snap.data, key_names, key_kinds)
    if has_keys(snap.kind, snap.data):
        keys = _key_frame(list(snap.data), key_names, key_kinds)
        frame = pd.concat([keys, _values(list(snap.data.values()))], axis=1)
        frame.attrs.update(keys.attrs)  # ambiguous_keys: string keys whose commas could go either way
        return frame
    return _values([snap.data])


def _bucket(b: dict[str, Any]) -> tuple[int, int, int]:
    low = int(b["min"]) if "min" in b else INT_MIN
    high = int(b["max"]) if "max" in b else INT_MAX
    return low, high, int(b.get("count", 0))


# bpftrace 0.17's log2 (createLog2Function, src/ast/passes/codegen_llvm.cpp) shifts by at most
# 16+8+4+2+1 bits, so every value >= 2**31 lands in slot 33; its JSON printer computes the
# bounds in a C int (`1 << (i-2)`, src/output.cpp), so that slot comes as {"min": -2**31, "max": 0}.
LOG2_TOP_SLOT = 33
_LOG2_TOP_AS_PRINTED = (-(1 << 31), 0)


def _log2_rows(buckets: list[dict[str, Any]]) -> list[tuple[int, int, int]] | None:
    """A printed hist()'s buckets with bounds from their positions, or None if they are not
    log2 buckets. bpftrace prints every slot from the first non-empty one to the last
    (hist_prepare, src/output.cpp), so the first bucket's slot numbers them all."""
    rows = [_bucket(b) for b in buckets]
    if not rows:
        return None
    lo, hi, _ = rows[0]
    first = LOG2_TOP_SLOT if (lo, hi) == _LOG2_TOP_AS_PRINTED else log2_slot_of(lo, hi)
    out = []
    for i, (lo, hi, n) in enumerate(rows):
        slot = first + i
        if slot == LOG2_TOP_SLOT and (lo, hi) == _LOG2_TOP_AS_PRINTED:
            out.append((1 << 31, INT_MAX, n))
        elif (lo, hi) == log2_bounds(slot):
            out.append((lo, hi, n))
        else:
            return None
    return out


def _rows(buckets: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    return _log2_rows(buckets) or [_bucket(b) for b in buckets]


def hist_buckets(data: Any, key_names: list[str] | None = None,
                 key_kinds: list[str | None] | None = None) -> pd.DataFrame:
    """A printed hist()/lhist() as rows of (key columns,) low, high, count; the open buckets
    below and above an lhist's range (and hist()'s negatives, and bpftrace 0.17's top log2
    slot, every value >= 2**31) have the int64 limit as bound."""
    rows: list[tuple[Any, ...]] = []
    if isinstance(data, dict):
        keys = _key_frame(list(data), key_names, key_kinds)
        for i, buckets in enumerate(data.values()):
            kv = tuple(keys.iloc[i])
            rows += [(*kv, *b) for b in _rows(buckets)]
        frame = pd.DataFrame(rows, columns=[*keys.columns, "low", "high", "count"])
        frame.attrs.update(keys.attrs)
        return frame
    return pd.DataFrame(list(_rows(data)), columns=["low", "high", "count"])


def log2_slot_of(low: int, high: int) -> int:
    """bpftrace's log2 bucket index: 0 negatives, 1 zero, 2 one, then 2**(i-2)..2**(i-1)-1."""
    if low == INT_MIN:
        return 0
    if low <= 0:
        return 1
    return int(low).bit_length() + 1


def log2_bounds(slot: int) -> tuple[int, int]:
    if slot == 0:
        return INT_MIN, -1
    if slot == 1:
        return 0, 0
    return 1 << (slot - 2), (1 << (slot - 1)) - 1


def map_functions(script: str) -> dict[str, tuple[str, list[str]]]:
    """The aggregation each map is assigned: `@h[comm] = lhist(x, 0, 100, 10)` ->
    {"@h": ("lhist", ["x", "0", "100", "10"])} (the first assignment of each map)."""
    text = _skip_comments(script)
    out: dict[str, tuple[str, list[str]]] = {}
    for m in re.finditer(r"(@[A-Za-z0-9_]*)\s*(?:\[[^=]*?\])?\s*=\s*([a-z_]+)\s*\(", text):
        end = _closing(text, m.end() - 1, "(", ")")
        if m.group(1) not in out and end > 0:
            out[m.group(1)] = (m.group(2), _split_args(text[m.end():end]))
    return out


def _linear_step(inner: pd.DataFrame, call: tuple[str, list[str]] | None) -> int | None:
    if call is not None and call[0] == "lhist" and len(call[1]) == 4:
        try:
            return int(call[1][3], 0)
        except ValueError:
            pass
    widths = set((inner.high - inner.low + 1).tolist())
    return int(min(widths)) if widths else None


def histogram(buckets: pd.DataFrame, call: tuple[str, list[str]] | None = None, unit: str = "") -> Histogram:
    """bucket rows (hist_buckets) -> kernelscope's Histogram, one per key on one bucket grid
    (the empty buckets between keys' ranges filled in). `call` is the map's aggregation from
    the script (map_functions): hist() is log2, lhist() linear; without it the buckets decide
    (all one width > 1: linear)."""
    keys = [c for c in buckets.columns if c not in ("low", "high", "count")]
    inner = buckets[(buckets.low != INT_MIN) & (buckets.high != INT_MAX)]
    widths = set((inner.high - inner.low + 1).tolist())
    linear = call[0] == "lhist" if call is not None else (len(widths) == 1 and widths != {1})
    step = _linear_step(inner, call) if linear else None
    if not linear or step is None:
        pairs = list(zip(buckets.low.tolist(), buckets.high.tolist(), strict=True))
        slots = [log2_slot_of(lo, hi) for lo, hi in pairs]
        first, last = (min(slots), max(slots)) if slots else (1, 1)
        bounds = [log2_bounds(s) for s in range(first, last + 1)]
        for s, b in zip(slots, pairs, strict=True):  # bpftrace 0.17's top slot: every value >= 2**31
            bounds[s - first] = (int(b[0]), int(b[1]))
        layout, start = "log2", 0
        index = {b: i for i, b in enumerate(bounds)}
    else:
        lows = sorted(set(inner.low.tolist()))
        below = buckets.high[buckets.low == INT_MIN]
        above = buckets.low[buckets.high == INT_MAX]
        lo0 = lows[0] if lows else int(below.iloc[0]) + 1 if len(below) else int(above.iloc[0])
        lo1 = lows[-1] if lows else lo0 - step
        # lhist()'s top bucket holds every value from the end of its last whole step (0.17's
        # codegen: 1 + (max - min) / step), though printed as {"min": max}: with lhist(x, 0,
        # 95, 10) 92 is counted there, above [80, 89].
        top = lo0 + (int(above.iloc[0]) - lo0) // step * step if len(above) else lo1 + step
        bounds = [(lo, lo + step - 1) for lo in range(lo0, top, step)]
        if len(below):
            bounds.insert(0, (INT_MIN, lo0 - 1))
        if len(above):
            bounds.append((top, INT_MAX))
        layout, start = "linear", lo0
        index = {b: i for i, b in enumerate(bounds)}
        for hi_open in above.tolist():
            index[(int(hi_open), INT_MAX)] = len(bounds) - 1
    key_rows = buckets[keys].drop_duplicates().reset_index(drop=True) if keys else None
    counts = np.zeros((len(key_rows) if key_rows is not None else 1, len(bounds)), np.int64)
    row_of = ({tuple(r): i for i, r in enumerate(key_rows.itertuples(index=False, name=None))}
              if key_rows is not None else {})
    for rec in buckets.itertuples(index=False, name=None):
        *kv, lo, hi, n = rec
        r = row_of[tuple(kv)] if key_rows is not None else 0
        counts[r, index[(int(lo), int(hi))]] += int(n)
    low = np.array([b[0] for b in bounds], np.int64)
    high = np.array([b[1] for b in bounds], np.int64)
    return Histogram(low, high, counts if key_rows is not None else counts[0], unit, keys=key_rows,
                     layout=layout, step=step, start=start)


@dataclass
class Parsed:
    """What one chunk of the stream held, sorted by what it feeds."""

    rows: dict[int, list[np.ndarray]] = field(default_factory=dict)  # format index -> records
    other: list[str] = field(default_factory=list)  # printf texts matching no format
    snapshots: list[tuple[str, Snapshot]] = field(default_factory=list)
    messages: list[tuple[str, str]] = field(default_factory=list)  # (type, text): value, time, cat...
    lost: int = 0
    attached: int | None = None
    synced: list[tuple[int, int]] = field(default_factory=list)  # (CPU, round) of each sync line


def dispatch(msgs: list[dict[str, Any]], formats: list[Format], t: float, sync: str = "") -> Parsed:
    """Sort messages: printf rows to their format (by its tag, see tag_formats; a line without
    one tried against the most literal formats first), map
    printings to snapshots, lost_events counted, the rest kept as (type, text). printf lines
    starting with `sync` are kernelscope's own: the CPU and round after it go to `synced`."""
    out = Parsed()
    # untagged lines: the most literal formats first, then those with fewer strings (which match anything)
    order = sorted(range(len(formats)), key=lambda i: (-formats[i].literal_chars,
                                                       sum(f.conv == "s" for f in formats[i].fields)))
    for msg in msgs:
        kind, data = msg.get("type"), msg.get("data")
        if kind == "printf" and sync and str(data).startswith(sync):
            cpu, _, round_ = str(data)[len(sync):].strip().partition(" ")
            out.synced.append((int(cpu or -1), int(round_ or 0)))
        elif kind == "printf" and (tag := _TAGGED.match(str(data))) and int(tag.group(1)) < len(formats):
            i, text = int(tag.group(1)), str(data)[tag.end():]
            rec = formats[i].record(text)
            if rec is not None:
                out.rows.setdefault(i, []).append(rec)
            else:
                out.other.append(text)
        elif kind == "printf":  # no tag: printf of a script run untagged, or system()'s output...
            text = str(data)
            for i in order:
                rec = formats[i].record(text)
                if rec is not None:
                    out.rows.setdefault(i, []).append(rec)
                    break
            else:
                out.other.append(text)
        elif kind in ("map", "hist", "stats") and isinstance(data, dict):
            for name, value in data.items():
                out.snapshots.append((name, Snapshot(t, str(kind), value)))
        elif kind == "lost_events":
            if isinstance(data, dict):
                out.lost += int(data.get("events", 0))
            else:  # a watchpoint that could not attach says so in a string
                out.messages.append(("lost_events", str(data)))
        elif kind == "attached_probes" and isinstance(data, dict):
            out.attached = int(data.get("probes", 0))
        elif kind == "helper_error":  # a helper failed at run time: its name, return code, line, column
            out.messages.append(("helper_error", json.dumps({k: v for k, v in msg.items() if k != "type"})))
        else:
            out.messages.append((str(kind), data if isinstance(data, str) else json.dumps(data)))
    return out
