"""Source rewriting: find output maps, count every output call in the kernel.

Every call site of an output map (`X.ringbuf_output`, `X.ringbuf_reserve`,
`X.ringbuf_discard`, `X.perf_submit`, `X.perf_submit_skb`) is wrapped, on the same line,
in a statement expression that first checks a gate (open from load() until stop()) and
then bumps per-CPU counters: attempts, failures (full buffer: reserve returned NULL,
output/submit returned < 0) and discards. With those, after a final
drain `attempted == received + dropped` is exact, under overload too.

BCC refuses map calls inside macro arguments ("cannot use map function inside a macro"),
so the wrapper is spelled out at each site rather than hidden behind a macro.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .base import CELL_FILE, COMMENT_OR_STRING, blank_comments_and_strings, int_or_none
from .guard import check_ring_pages

ACCT_MAP = "__ks_acct"
GATE_MAP = "__ks_gate"  # one u32: 1 while the probe is started
SLOTS = 3  # per output map: attempted, failed, discarded

_RING_DECL = re.compile(r"\bBPF_RINGBUF_OUTPUT\s*\(\s*(\w+)\s*,\s*([^)]*?)\s*\)")
_PERF_DECL = re.compile(r"\bBPF_PERF_OUTPUT\s*\(\s*(\w+)\s*\)")
_TP_USE = re.compile(r"\bTRACEPOINT_PROBE\s*\(\s*\w+\s*,\s*\w+\s*\)")
_CALL = re.compile(
    r"\b(\w+)\s*\.\s*(ringbuf_output|ringbuf_reserve|ringbuf_discard|perf_submit_skb|perf_submit)\s*\("
)


@dataclass
class OutputMap:
    name: str
    kind: str  # "ringbuf" or "perf"
    index: int  # its slot group in the accounting map
    pages: int | None = None  # ring buffer pages as declared (after any override)
    call_sites: list[int] = field(default_factory=list)  # 1-based lines in the user's source
    line: int | None = None  # the line of its declaration in the user's source


@dataclass
class Instrumented:
    source: str  # what BCC compiles: prelude + `#line 1` + rewritten user text
    maps: dict[str, OutputMap]
    prelude_lines: int
    user_rings: dict[str, OutputMap] = field(default_factory=dict)  # BCC has none
    event_types: dict[str, str] = field(default_factory=dict)  # BCC finds them itself


_PAIRS = {"(": ")", "{": "}", "[": "]"}


def matching_close(code: str, open_idx: int) -> int:
    """Index of the bracket closing the one at `open_idx` (`(`, `{` or `[`); -1 if none."""
    opening = code[open_idx]
    closing = _PAIRS[opening]
    depth = 0
    for i in range(open_idx, len(code)):
        c = code[i]
        if c == opening:
            depth += 1
        elif c == closing:
            depth -= 1
            if depth == 0:
                return i
    return -1


def wrap_output_call(call: str, base: int, reserve: bool) -> str:
    """`call` behind the gate, counting an attempt and, when it failed, a failure.

    While the gate is closed (before load, after stop) nothing is attempted or counted: a
    reservation yields NULL and an output call -1, which programs already handle.

    The attempt is counted before the call and a failure after it: a record is visible to
    the reader from inside the call (its commit), so an attempt counted only after it would
    let a live reader receive a record the counters do not show yet (in_flight -1, seen under
    load). `__ks_count(slot, 0)` bumps that one slot.
    """
    if reserve:
        return (f"({{ void *__ks_p = 0; if (__ks_open()) {{ __ks_count({base}, 0); __ks_p = {call}; "
                f"if (!__ks_p) __ks_count({base + 1}, 0); }} __ks_p; }})")
    return (f"({{ long __ks_r = -1; if (__ks_open()) {{ __ks_count({base}, 0); __ks_r = {call}; "
            f"if (__ks_r < 0) __ks_count({base + 1}, 0); }} __ks_r; }})")


def apply_edits(source: str, edits: list[tuple[int, int, str]]) -> str:
    """Replace each (start, end) span of `source` with its text; spans do not overlap."""
    out = source
    for start, end, text in sorted(edits, reverse=True):
        out = out[:start] + text + out[end:]
    return out


def find_output_maps(source: str) -> dict[str, OutputMap]:
    code = blank_comments_and_strings(source)
    maps: dict[str, OutputMap] = {}
    for m in _RING_DECL.finditer(code):
        pages = int_or_none(m.group(2))
        maps[m.group(1)] = OutputMap(m.group(1), "ringbuf", len(maps), pages,
                                     line=code.count("\n", 0, m.start()) + 1)
    for m in _PERF_DECL.finditer(code):
        maps[m.group(1)] = OutputMap(m.group(1), "perf", len(maps), line=code.count("\n", 0, m.start()) + 1)
    return maps


def instrument(source: str, pages: int | dict[str, int] | None = None) -> Instrumented:
    """Rewrite `source` for accounting; `pages` overrides ring buffer sizes (power of two)."""
    maps = find_output_maps(source)
    code = blank_comments_and_strings(source)
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) on the original text

    for m in _RING_DECL.finditer(code):
        om = maps[m.group(1)]
        want = pages.get(om.name) if isinstance(pages, dict) else pages
        if want is not None:
            check_ring_pages(om.name, want, None, f"pages={want}")
            om.pages = want
            edits.append((m.start(2), m.end(2), str(want)))
        elif om.pages is not None:  # as declared; a macro's value is the compiler's to check
            check_ring_pages(om.name, om.pages, om.line, " ".join(source[m.start():m.end()].split()))

    for m in _CALL.finditer(code):
        target = maps.get(m.group(1))
        if target is None:
            continue
        om = target
        close = matching_close(code, m.end() - 1)
        if close < 0:
            continue  # unbalanced: leave it to the compiler to report
        call = source[m.start() : close + 1]
        base = om.index * SLOTS
        method = m.group(2)
        if method == "ringbuf_discard":
            wrapped = f"({{ {call}; __ks_discard({base}); }})"
        else:
            wrapped = wrap_output_call(call, base, reserve=method == "ringbuf_reserve")
        om.call_sites.append(source.count("\n", 0, m.start()) + 1)
        edits.append((m.start(), close + 1, wrapped))

    edits += _line_resets(source, code, edits)
    out = apply_edits(source, edits)
    prelude = _prelude(len(maps))
    return Instrumented(prelude + f'#line 1 "{CELL_FILE}"\n' + out, maps, prelude.count("\n") + 1)


def _line_resets(source: str, code: str, edits: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """A `#line` directive after each TRACEPOINT_PROBE line, as insertions.

    BCC inserts the tracepoint's args struct (one line per field) in front of each
    TRACEPOINT_PROBE, shifting every later line of the cell in clang's diagnostics and in
    the `; @ cell:N` line info of verifier logs; the directive puts the count back.
    """
    comments = [m.span() for m in COMMENT_OR_STRING.finditer(source)]
    out = []
    for m in _TP_USE.finditer(code):
        nl = code.find("\n", m.end())
        line_start = code.rfind("\n", 0, m.start()) + 1
        if nl < 0 or source[line_start:nl].lstrip().startswith("#") or source[:nl].endswith("\\"):
            continue  # inside a macro definition: a directive would break it
        if any(a <= nl < b for a, b in comments) or any(a <= nl < b for a, b, _ in edits):
            continue
        out.append((nl, nl, f'\n#line {source.count(chr(10), 0, nl) + 2} "{CELL_FILE}"'))
    return out


def _prelude(nmaps: int) -> str:
    n = max(1, nmaps) * SLOTS
    return (
        f"BPF_PERCPU_ARRAY({ACCT_MAP}, u64, {n});\n"
        f"BPF_ARRAY({GATE_MAP}, u32, 1);\n"
        "static __always_inline int __ks_open(void) {\n"
        "  u32 k = 0;\n"
        f"  u32 *g = {GATE_MAP}.lookup(&k);\n"
        "  return g && *g;\n"
        "}\n"
        "static __always_inline void __ks_bump(u32 k) {\n"
        f"  u64 *v = {ACCT_MAP}.lookup(&k);\n"
        "  if (v) (*v)++;\n"
        "}\n"
        "static __always_inline void __ks_count(u32 base, int failed) {\n"
        "  __ks_bump(base);\n"
        "  if (failed) __ks_bump(base + 1);\n"
        "}\n"
        "static __always_inline void __ks_discard(u32 base) { __ks_bump(base + 2); }\n"
    )


def read_counters(table: object, maps: dict[str, OutputMap]) -> dict[str, dict[str, int]]:
    """Sum the per-CPU accounting slots of each output map (BCC PerCpuArray table)."""
    totals: dict[int, int] = {}
    for key, values in table.items():  # type: ignore[attr-defined]
        totals[key.value] = int(sum(values))
    out = {}
    for om in maps.values():
        b = om.index * SLOTS
        out[om.name] = {
            "attempted": totals.get(b, 0),
            "failed": totals.get(b + 1, 0),
            "discarded": totals.get(b + 2, 0),
        }
    return out
