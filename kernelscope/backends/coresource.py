"""Reading a CO-RE program before clang compiles it: output maps, call sites, event types, the prelude.

Every `bpf_ringbuf_reserve`, `bpf_ringbuf_output` and `bpf_perf_event_output` on a declared
map is wrapped, on its own line, in a statement expression that checks the gate and bumps
per-CPU counters; `bpf_user_ringbuf_drain` adds the number of samples it drained. The text
only says which struct goes to which map (the variable a reservation is assigned to, or the
data a `*_output` call passes); a global pointer of that type anchors it in the object's BTF.

What is compiled is decided on the preprocessed program (backends.preprocess): the SEC()
names outside `#if 0`, the base headers (vmlinux.h when the program's headers bring it,
whichever header includes it), and, when the program's own headers declare output maps or
make output calls, the whole program is rewritten and compiled as clang -E output, its line
markers keeping every error at the user's file and line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .base import CELL_FILE, blank_comments_and_strings, int_or_none
from .guard import PAGE, check_ring_bytes, check_ring_pages
from .preprocess import Preprocessed, user_file
from .rewrite import ACCT_MAP, GATE_MAP, SLOTS, OutputMap, apply_edits, matching_close, wrap_output_call

ANCHOR = "__ks_type_"  # global `T *__ks_type_<map>` keeps the event struct in the object's BTF

_SEC = re.compile(r"\bSEC\s*\(")
# SEC("x") as written, or as bpf_helpers.h expands it in clang -E output
_SEC_OR_ATTR = r'(?:\bSEC\s*\(|__attribute__\s*\(\s*\(\s*section\s*\()'
_MAP_DECL = re.compile(r"\bstruct\s*\{(?P<body>[^{}]*)\}\s*(?P<name>\w+)\s+" + _SEC_OR_ATTR, re.S)
# __uint(type, X) as written, or expanded: `int (*type)[X]`
_MAP_TYPE = re.compile(r"(?:__uint\s*\(\s*type\s*,\s*|\bint\s*\(\s*\*\s*type\s*\)\s*\[\s*)BPF_MAP_TYPE_(\w+)")
_MAX_ENTRIES = re.compile(r"__uint\s*\(\s*max_entries\s*,\s*([^)]*?)\s*\)"
                          r"|\bint\s*\(\s*\*\s*max_entries\s*\)\s*\[\s*([^\]]*?)\s*\]")
_KINDS = {"RINGBUF": "ringbuf", "PERF_EVENT_ARRAY": "perf", "USER_RINGBUF": "user_ringbuf"}
_OUTPUT_MAP = re.compile(r"\bBPF_MAP_TYPE_(?:RINGBUF|PERF_EVENT_ARRAY|USER_RINGBUF)\b")
# helper -> index of the map argument
_CALLS = {"bpf_ringbuf_reserve": 0, "bpf_ringbuf_output": 0, "bpf_perf_event_output": 1,
          "bpf_user_ringbuf_drain": 0}
_CALL = re.compile(r"\b(" + "|".join(_CALLS) + r")\s*\(")
_INCLUDE = re.compile(r"^\s*#\s*include\s*[<\"]([^>\"]+)[>\"]", re.M)
_SECTION = re.compile(_SEC_OR_ATTR + r'\s*"([^"]+)"\s*\)')
_LICENSE = re.compile(_SEC_OR_ATTR + r'\s*"license"')
_FN_HEAD = re.compile(r"(\w+)\s*\([^()]*\)\s*\{")
_KEYWORDS = {"return", "sizeof", "if", "while", "else", "case", "goto", "typeof", "const", "volatile"}

Cpp = Callable[[str, str], "Preprocessed | None"]  # (program, text before it) -> clang -E output


def is_core(source: str) -> bool:
    """True for libbpf-style programs: they put programs and maps in SEC("...") sections."""
    return bool(_SEC.search(blank_comments_and_strings(source)))


@dataclass
class CoreSource:
    """A CO-RE program prepared for clang: the rewritten text, its maps and event types."""

    source: str
    maps: dict[str, OutputMap]  # output maps (ringbuf, perf), as for BCC programs
    user_rings: dict[str, OutputMap]  # BPF_MAP_TYPE_USER_RINGBUF maps, slot group: drained, errors
    event_types: dict[str, str]  # map -> C type of its records ("struct event"), when found
    sections: list[tuple[str, int | None]] = field(default_factory=list)  # (SEC name, line; None: a header)
    preprocessed: bool = False  # `source` is clang -E output (compiled as such, `.i`)


def _split_args(text: str) -> list[str]:
    args: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            args.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    args.append("".join(cur))
    return [a.strip() for a in args]


def _var_type(code: str, var: str, before: int) -> tuple[str, bool] | None:
    """(C type, is pointer) of the last declaration of `var` before position `before`."""
    decl = re.compile(
        r"((?:struct|union)\s+\w+|\w+)\s*(\*?)\s*\b" + re.escape(var) + r"\b\s*(?=[=;,)\[])")
    found = None
    for m in decl.finditer(code, 0, before):
        if m.group(1) not in _KEYWORDS:
            found = (" ".join(m.group(1).split()), bool(m.group(2)))
    return found


def _event_type(code: str, helper: str, args: list[str], start: int) -> str | None:
    """The C type a call site sends (never `void`: a helper's `void *buf` says nothing)."""
    found = _sent_type(code, helper, args, start)
    return None if found in (None, "void") else found


def _returned_type(code: str, start: int) -> str | None:
    """For `return bpf_ringbuf_reserve(...)` in a function F (compat.bpf.h's reserve_buf): the
    pointer type of a variable assigned from F (`struct event *e = F(...)`)."""
    fns = [m.group(1) for m in _FN_HEAD.finditer(code, max(0, start - 20000), start)
           if m.group(1) not in ("if", "while", "for", "switch")]
    if not fns:
        return None
    for call in re.finditer(r"(\w+)\s*=\s*(?:\([^()]*\)\s*)?" + re.escape(fns[-1]) + r"\s*\(", code):
        t = _var_type(code, call.group(1), call.end())
        if t and t[1] and t[0] != "void":
            return t[0]
    return None


def _sent_type(code: str, helper: str, args: list[str], start: int) -> str | None:
    """The C type a call site sends: from a reservation's target or an output call's data."""
    if helper == "bpf_ringbuf_reserve":
        size_arg = args[1] if len(args) > 1 else ""
        size = re.fullmatch(r"sizeof\s*\(\s*((?:struct|union)\s+\w+|\w+)\s*\)", size_arg)
        if size and not _var_type(code, size.group(1), start):
            return " ".join(size.group(1).split())
        before = code[max(0, start - 400):start]  # the statement the call is in
        lhs = re.search(r"(\w+)\s*=\s*(?:\(\s*((?:struct|union)\s+\w+|\w+)\s*\*\s*\)\s*)?$", before)
        if lhs:
            if lhs.group(2):
                return " ".join(lhs.group(2).split())
            t = _var_type(code, lhs.group(1), start)
            if t and t[1]:
                return t[0]
        if re.search(r"\breturn\s*$", before):
            return _returned_type(code, start)
        return None
    data = args[3] if helper == "bpf_perf_event_output" and len(args) > 3 else (
        args[1] if len(args) > 1 else "")
    m = re.fullmatch(r"(&?)\s*(\w+)", data)
    if not m:
        return None
    t = _var_type(code, m.group(2), start)
    if t is None or (bool(m.group(1)) == t[1]):
        return None  # `&ptr` or a plain struct by value: not a struct pointer we understand
    return t[0]


def _sample_type(code: str, callback: str) -> str | None:
    """The struct a user ring buffer callback reads from its dynptr (bpf_dynptr_read/data)."""
    fn = re.search(r"\b" + re.escape(callback) + r"\s*\([^)]*\)\s*\{", code)
    if not fn:
        return None
    end = matching_close(code, fn.end() - 1)
    end = len(code) if end < 0 else end
    body_start = fn.end()
    m = re.search(r"bpf_dynptr_read\s*\(\s*&?\s*(\w+)", code[body_start:end]) or re.search(
        r"(\w+)\s*=\s*(?:\([^()]*\)\s*)?bpf_dynptr_data\s*\(", code[body_start:end])
    if not m:
        return None
    t = _var_type(code, m.group(1), body_start + m.start())
    return t[0] if t else None



def prepare(source: str, pages: int | dict[str, int] | None = None, cpp: Cpp | None = None,
            user_dirs: Sequence[Path] = ()) -> CoreSource:
    """Find maps, wrap output call sites, add the accounting prelude and type anchors.

    `cpp` preprocesses with the compile's own flags (None: read the raw text only);
    `user_dirs`: the user's include folders, whose headers are read as part of the program.
    """
    first = cpp(source, "") if cpp else None  # the program alone: what it includes, what is active
    keep = user_file(user_dirs)
    head = _head(source, first)
    sections: list[tuple[str, int | None]]
    if first is not None:
        sections = [(m.group(1), first.cell_line(at + m.start()))
                    for at, chunk in first.chunks(keep) for m in _SECTION.finditer(chunk)]
    else:
        sections = [(m.group(1), source.count("\n", 0, m.start()) + 1) for m in _SECTION.finditer(source)]
    full = cpp(source, head) if first is not None and cpp and _headers_output(first, keep) else None
    if full is None:
        text, code = source, blank_comments_and_strings(source)
        maps, rings, types, edits = _analyse(text, code, pages, lambda pos: text.count("\n", 0, pos) + 1)
        prelude = head + _accounting(len(maps) + len(rings)) + f'#line 1 "{CELL_FILE}"\n'
        out = prelude + apply_edits(source, edits)
        license_sec = 'SEC("license")'
    else:  # the program's headers declare output maps or make output calls: rewrite clang -E output
        text = full.text
        code = blank_comments_and_strings(full.only(keep))
        maps, rings, types, edits = _analyse(text, code, pages, full.cell_line)
        out = apply_edits(text, edits)
        at = out.find(f'\n# 1 "{CELL_FILE}"') + 1  # the accounting prelude goes where the program starts
        out = out[:at] + _accounting(len(maps) + len(rings)) + out[at:]
        license_sec = '__attribute__((section("license"), used))'
    epilogue = "\n#line 1 \"<kernelscope>\"\n"
    epilogue += "".join(f"{t} *{ANCHOR}{name} __attribute__((used));\n" for name, t in types.items())
    if not _LICENSE.search(text):
        epilogue += f'char __ks_license[] {license_sec} = "Dual BSD/GPL";\n'
    return CoreSource(out + epilogue, maps, rings, types, sections, preprocessed=full is not None)


def _headers_output(pre: Preprocessed, keep: Callable[[str], bool]) -> bool:
    """Whether the program's own headers declare an output map or call an output helper."""
    return any(_OUTPUT_MAP.search(chunk) or _CALL.search(chunk)
               for _, chunk in pre.chunks(lambda f: f != CELL_FILE and keep(f)))


Found = tuple[dict[str, OutputMap], dict[str, OutputMap], dict[str, str], list[tuple[int, int, str]]]


def _analyse(text: str, code: str, pages: int | dict[str, int] | None,
             line_of: Callable[[int], int | None]) -> Found:
    """Output maps, user rings, event types and call-site edits of `text`, read from `code`
    (`text` with comments, strings and what is not the program's blanked; same offsets)."""
    maps: dict[str, OutputMap] = {}
    user_rings: dict[str, OutputMap] = {}
    for m in _MAP_DECL.finditer(code):
        if not text[m.end():].lstrip().startswith('".maps"'):
            continue
        t = _MAP_TYPE.search(m.group("body"))
        kind = _KINDS.get(t.group(1)) if t else None
        if kind is None:
            continue
        index = len(maps) + len(user_rings)
        size = _MAX_ENTRIES.search(m.group("body"))
        nbytes = int_or_none(size.group(1) or size.group(2)) if size else None
        line = line_of(m.start())
        om = OutputMap(m.group("name"), kind, index, nbytes // PAGE if nbytes else None, line=line)
        want = pages.get(om.name) if isinstance(pages, dict) else (pages if kind == "ringbuf" else None)
        if want is not None and kind != "perf":
            check_ring_pages(om.name, want, None, f"pages={want}")
            om.pages = want
        elif nbytes is not None and kind != "perf" and size is not None:
            at = line_of(m.start("body") + size.start())
            check_ring_bytes(om.name, nbytes, at, " ".join(size.group(0).split()))
        (user_rings if kind == "user_ringbuf" else maps)[om.name] = om

    edits: list[tuple[int, int, str]] = []
    types: dict[str, str] = {}
    for m in _CALL.finditer(code):
        helper = m.group(1)
        close = matching_close(code, m.end() - 1)
        if close < 0:
            continue
        args = _split_args(code[m.end():close])
        target = args[_CALLS[helper]].lstrip("&").strip() if len(args) > _CALLS[helper] else ""
        called = maps.get(target) or user_rings.get(target) or _only_map(helper, maps, user_rings)
        if called is None:
            continue
        call = text[m.start(): close + 1]
        base = called.index * SLOTS
        drain = helper == "bpf_user_ringbuf_drain"
        if drain:
            wrapped = (f"({{ long __ks_r = 0; if (__ks_open()) {{ __ks_r = {call}; "
                       f"__ks_drained({base}, __ks_r); }} __ks_r; }})")
        else:
            wrapped = wrap_output_call(call, base, reserve=helper == "bpf_ringbuf_reserve")
        if called.name not in types:
            found = ((_sample_type(code, args[1]) if len(args) > 1 else None) if drain
                     else _event_type(code, helper, args, m.start()))
            if found:
                types[called.name] = found
        line = line_of(m.start())
        if line is not None:
            called.call_sites.append(line)
        edits.append((m.start(), close + 1, wrapped))
    return maps, user_rings, types, edits


_HELPER_KIND = {"bpf_ringbuf_reserve": "ringbuf", "bpf_ringbuf_output": "ringbuf",
                "bpf_perf_event_output": "perf", "bpf_user_ringbuf_drain": "user_ringbuf"}


def _only_map(helper: str, maps: dict[str, OutputMap], user_rings: dict[str, OutputMap]) -> OutputMap | None:
    """For a call on a map passed in as a parameter (`emit(void *rb, ...)` in a header): the
    program's only map of the helper's kind, which the call can only be on; else None."""
    kind = _HELPER_KIND[helper]
    found = [om for om in (*maps.values(), *user_rings.values()) if om.kind == kind]
    return found[0] if len(found) == 1 else None


def _head(source: str, pre: Preprocessed | None) -> str:
    """The base headers: vmlinux.h when the program brings it through any header (or includes
    nothing), else the uapi ones, so that the prelude never redefines what the program's
    headers define; and bpf_helpers.h (guarded: a second include is empty)."""
    if pre is not None:
        included = pre.included()
        vmlinux = any(Path(f).name == "vmlinux.h" for f in included)
    else:  # the preprocessor failed: the compile will say why; guess from the text
        included = set(_INCLUDE.findall(source))
        vmlinux = "vmlinux.h" in included
    if vmlinux or not included:
        head = '#include "vmlinux.h"\n'
    else:
        head = "#include <linux/bpf.h>\n#include <linux/types.h>\n"
    head += "#include <bpf/bpf_helpers.h>\n"
    if not included:  # a bare cell: what libbpf-tools programs include
        head += "#include <bpf/bpf_tracing.h>\n#include <bpf/bpf_core_read.h>\n"
    return head


def _accounting(nmaps: int) -> str:
    """The accounting maps and helpers, spelled without macros (`__uint`, `SEC`) so that the
    same text serves a program compiled from source and one compiled from clang -E output."""
    n = max(1, nmaps) * SLOTS
    inline = "static inline __attribute__((always_inline))"
    return (
        "struct { int (*type)[BPF_MAP_TYPE_PERCPU_ARRAY]; int (*max_entries)["
        f"{n}]; __u32 *key; __u64 *value; }} {ACCT_MAP} __attribute__((section(\".maps\"), used));\n"
        "struct { int (*type)[BPF_MAP_TYPE_ARRAY]; int (*max_entries)[1]; "
        f"__u32 *key; __u32 *value; }} {GATE_MAP} __attribute__((section(\".maps\"), used));\n"
        f"{inline} int __ks_open(void) {{\n"
        f"  __u32 k = 0; __u32 *g = bpf_map_lookup_elem(&{GATE_MAP}, &k); return g && *g;\n"
        "}\n"
        f"{inline} void __ks_add(__u32 k, __u64 n) {{\n"
        f"  __u64 *v = bpf_map_lookup_elem(&{ACCT_MAP}, &k); if (v) *v += n;\n"
        "}\n"
        f"{inline} void __ks_count(__u32 base, int failed) {{\n"
        "  __ks_add(base, 1); if (failed) __ks_add(base + 1, 1);\n"
        "}\n"
        f"{inline} void __ks_drained(__u32 base, long r) {{\n"
        "  if (r > 0) __ks_add(base, r); else if (r < 0) __ks_add(base + 1, 1);\n"
        "}\n"
    )
