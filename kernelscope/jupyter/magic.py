"""IPython magics: `%%bpf` turns a cell of BCC C into a running `Probe` bound to a name.

    %load_ext kernelscope
    %%bpf counts --duration 5
    ...BCC C...

Line magics: `%bpf_stop`, `%bpf_list`, `%bpf_doctor`, `%bpf_tracepoints`, `%bpf_format`,
`%bpf_run`, `%bpf_examples`. `%%bpftrace` runs a bpftrace script (kernelscope.bpftrace) under the
same name-binding, status line, %bpf_list and %bpf_stop.
The magics only parse arguments, build a Probe and hand it over; errors a user can fix are
`UsageError`s (no traceback) with the compiler's or verifier's words and the cell's line.
An internal fault (InternalError, or anything unexpected) keeps its traceback and says to report it.
Line numbers count the `%%bpf` line as line 1, as the notebook shows the cell.
"""

from __future__ import annotations

import contextlib
import keyword
import os
import re
import shlex
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import HTML, display

from .. import bpftrace as bt_
from .. import examples, host, mode, tracepoints
from ..backends import bcc
from ..captures.replay import replay
from ..errors import CompileError, InternalError, KernelscopeError, VerifierError
from ..probe import Probe, close_all, live_probes
from ..results import Results
from ..settings import read_program
from .display import Progress, StatusLine, live_output, show_warning

DEFAULT_NAME = "probe"
HEAD_ROWS = 10  # rows shown after a --duration/--limit cell
MAX_MESSAGE_LINES = 30
VERBOSE_HINT = "(the verifier's whole log: %%bpf --verbose, or the error's .log)"
SAFE_ALTERNATIVES = (
    "tracepoint args (args->field; %bpf_format CATEGORY:EVENT lists them), BPF helpers "
    "(bpf_get_current_pid_tgid(), bpf_get_current_comm(), bpf_get_current_uid_gid()), or the "
    "CO-RE backend (clang + vmlinux.h + libbpf, which relocates struct offsets using the kernel's BTF)"
)

_LINE_PREFIX = re.compile(r"^line (\d+):")
_UNEXPANDED = re.compile(r"\{[^{}]*\}|\$\w+")
BPFTRACE_NAME = "bt"  # the variable a %%bpftrace cell binds by default
BPFTRACE_MAP_ROWS = 20  # rows of each map shown after a blocking %%bpftrace cell
_LINE_MAGICS = ("bpf_stop", "bpf_list", "bpf_doctor", "bpf_tracepoints", "bpf_format", "bpf_run",
                "bpf_examples")


@dataclass
class Options:
    """The `%%bpf` line, checked."""

    name: str
    pages: int | None
    duration: float | None
    limit: int | None
    max_rows: int | None
    cflags: list[str]
    no_start: bool
    quiet: bool
    perf_wakeup: int | None
    reorder_ns: int | None
    replay: str | None = None
    backend: str | None = None  # None: CO-RE (libbpf) when the cell uses SEC(...), else BCC
    globals: dict[str, int | str] | None = None  # --set: `const volatile` values (CO-RE)
    only: list[str] | None = None  # --only: load and attach only these programs
    skip: list[str] | None = None  # --skip: do not load these programs
    map_sizes: dict[str, int] | None = None  # --map-size NAME=N (CO-RE)
    file: str | None = None  # --file: the program is this file, its folder on the include path
    include: list[str] | None = None  # --include/-I folders
    perf_event: str | None = None  # --perf-event: attach this program to a sampling timer
    freq: int | None = None  # --freq: its samples a second on each CPU
    verbose: bool = False  # --verbose: a verifier rejection shows the whole log

    @property
    def blocking(self) -> bool:
        return self.duration is not None or self.limit is not None


@dataclass
class LayoutVerdict:
    """Whether the headers BCC compiles with describe the running kernel's structs."""

    mismatch: bool | None  # None: could not be decided
    detail: str
    differ: dict[str, tuple[int, int]] | None = None  # "task_struct.tgid" -> (headers, kernel)

    def describe(self, code: str = "") -> str:
        """The detail, naming first the differing members this code uses (`->tgid`)."""
        if not self.differ:
            return self.detail

        def rank(key: str) -> tuple[bool, bool]:
            member = key.rpartition(".")[2]
            used = re.search(rf"(->|\.)\s*{re.escape(member)}\b", code) is not None
            return (not used, not key.startswith(("task_struct", "sizeof(task_struct")))

        keys = sorted(self.differ, key=rank)
        shown = "; ".join(f"{k} at {self.differ[k][0]} in the headers vs {self.differ[k][1]} in the kernel"
                          for k in keys[:2])
        more = f"; {len(keys) - 2} more differ (%bpf_doctor)" if len(keys) > 2 else ""
        return shown + more


@magics_class
class BPFMagics(Magics):
    """`%%bpf` and its line magics. Keeps the probes it made by name, to replace and stop them."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        # weak: a probe the user deleted (`del probe`, %reset) is collected and closes itself
        self.probes: weakref.WeakValueDictionary[str, Results] = weakref.WeakValueDictionary()
        self.status: dict[str, StatusLine] = {}
        self.layout: LayoutVerdict | None = None  # the doctor's header check, once per session

    @magic_arguments()
    @argument("name", nargs="?", help=f"variable the Probe is bound to (default: {DEFAULT_NAME})")
    @argument("--pages", type=int, metavar="N",
              help="ring buffer size in pages (a power of two), or perf buffer pages per CPU")
    @argument("--duration", type=float, metavar="SECONDS",
              help="block this long with a progress bar, then stop and show the first rows")
    @argument("--limit", type=int, metavar="EVENTS",
              help="block until this many events arrived, then stop and show the first rows")
    @argument("--max-rows", type=int, metavar="N", help="keep only the newest N rows per output map")
    @argument("-D", dest="defines", action="append", default=[], metavar="NAME=VALUE",
              help="a C macro for the program (-DNAME=VALUE); repeatable; {expr} and $var expand")
    @argument("--no-start", action="store_true",
              help="compile, load and attach, but do not drain yet: call NAME.start()")
    @argument("--quiet", action="store_true", help="show no status line, progress bar or rows")
    @argument("--perf-wakeup", type=int, metavar="N",
              help="perf buffers: wake the reader after every N events (default: a watermark "
                   "at a quarter of the buffer, read every poll interval)")
    @argument("--replay", metavar="PATH",
              help="replay this capture instead of loading the program (no BPF needed)")
    @argument("--reorder", type=int, metavar="NS",
              help="hold events NS nanoseconds to emit them in timestamp order (needs a u64 ts field)")
    @argument("--libbpf", action="store_true",
              help="CO-RE backend: clang + vmlinux.h + libbpf (automatic when the cell uses SEC(...))")
    @argument("--bcc", action="store_true", help="BCC backend even if the cell uses SEC(...)")
    @argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
              help="CO-RE: set the program's `const volatile` variable NAME before load; repeatable")
    @argument("--only", metavar="NAME,...", action="append", default=[],
              help="load and attach only these programs (C function names); SEC(\"?...\") ones too")
    @argument("--skip", metavar="NAME,...", action="append", default=[],
              help="do not load these programs (libbpf's set_autoload(false))")
    @argument("--map-size", dest="map_sizes", action="append", default=[], metavar="NAME=N",
              help="CO-RE: max_entries of map NAME, set before load; repeatable")
    @argument("--file", metavar="PATH",
              help="run the program in this file (the cell stays empty); its folder is on the include path")
    @argument("--include", "-I", dest="include", action="append", default=[], metavar="DIR",
              help="a folder searched for the program's #include files; repeatable")
    @argument("--verbose", action="store_true",
              help="when the verifier rejects the program, show its whole log, not the excerpt")
    @argument("--perf-event", metavar="PROG",
              help="attach program PROG (a function of struct bpf_perf_event_data *, or "
                   "SEC(\"perf_event\")) to a cpu-clock sampling timer on every CPU")
    @argument("--freq", type=int, metavar="HZ",
              help="with --perf-event: samples a second on each CPU (default 99)")
    @argument("--fleet", metavar="CLIENT",
              help="run on every host of the Dask cluster of variable CLIENT (a distributed.Client)")
    @cell_magic
    def bpf(self, line: str, cell: str) -> None:
        """Compile a cell of BCC C (or libbpf-style CO-RE C), attach it, drain its output maps.

        Binds the Probe to NAME and returns at once while `NAME.df` keeps growing in the
        background, under a status line (events, rate, drops). With --duration or --limit
        the cell blocks instead, then stops the probe (its data stays) and shows the first
        rows; Ctrl-C stops early and keeps what arrived. Re-running the cell closes the
        probe NAME held before. Errors name the line of the cell, counting this line as 1.
        """
        args = parse_argstring(self.bpf, line)
        opts = options(args)
        source = program_source(opts, cell)
        self.close_probe(opts.name)  # a local probe or a fleet one: the cell replaces either
        if args.fleet:  # one probe per host of a Dask cluster: kernelscope.fleet
            from ..fleet.cell import run_cell

            run_cell(self.shell, source, opts, args.fleet)
            return
        probe = build_probe(source, opts)
        self.probes[opts.name] = self.user_ns[opts.name] = probe
        self._warn(probe, source)
        if opts.blocking:
            run_blocking(probe, opts, live_output(self.shell))
            return
        if not opts.no_start:
            probe.start()
        if not opts.quiet:
            self._show_status(probe, opts.name)

    @line_magic
    def bpf_run(self, line: str) -> None:
        """`%bpf_run PATH [NAME] [options]`: run the program in file PATH, as `%%bpf --file PATH`
        with the same options (see `%%bpf?`); the file's folder is on the include path."""
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise UsageError(f"%bpf_run: {e}") from None
        if not words or words[0].startswith("-"):
            raise UsageError("usage: %bpf_run PATH [NAME] [%%bpf options], "
                             "e.g. %bpf_run opensnoop.bpf.c --limit 5")
        path, *rest = words
        self.bpf(shlex.join([*rest, "--file", path]), "")

    @magic_arguments()
    @argument("name", nargs="?", help=f"variable the run is bound to (default: {BPFTRACE_NAME})")
    @argument("--duration", type=float, metavar="SECONDS",
              help="block this long with a progress bar, then stop bpftrace and show what it printed")
    @argument("--limit", type=int, metavar="ROWS",
              help="block until this many printf lines arrived, then stop and show them")
    @argument("-p", "--pid", type=int, metavar="PID",
              help="bpftrace -p PID: that process's uprobes/USDT; the run ends when it exits")
    @argument("--max-rows", type=int, metavar="N", help="keep only the newest N rows per printf format")
    @argument("--replay", metavar="PATH", help="replay this saved run instead (no bpftrace, no BPF)")
    @argument("--quiet", action="store_true", help="show no status line, progress bar or rows")
    @cell_magic
    def bpftrace(self, line: str, cell: str) -> None:
        """Run the cell as a bpftrace script (the system's bpftrace, `-f json`), bound to NAME.

        Returns once bpftrace attached, while `NAME.df` (printf rows, typed columns) grows and
        `NAME.map("@m")` / `NAME.hist("@h")` show its maps as last printed; %bpf_stop NAME ends
        it (bpftrace prints every map on the way out). --duration/--limit block instead. Options
        after ` -- ` go to bpftrace itself; the script's positional parameters ($1, $2...) are
        the bare words there, or everything after a second ` -- `:
        `%%bpftrace bt -- -B full -- 1234 eth0`. Errors name the cell's line, this line being 1.
        """
        words, extra, positional = split_bpftrace_line(line)
        args = parse_argstring(self.bpftrace, words)
        name = bpftrace_name(args)
        self.close_probe(name)
        run = build_bpftrace(cell, name, args, extra, positional)
        self.probes[name] = self.user_ns[name] = run
        for w in run.warnings:
            show_warning(w)
        if args.duration is not None or args.limit is not None:
            run_bpftrace_blocking(run, name, args, live_output(self.shell))
        elif not args.quiet:
            self._show_status(run, name)

    def _show_status(self, probe: Results, name: str) -> None:
        """A status line under the cell, refreshed in place while the probe runs (Jupyter only)."""
        status = StatusLine(probe, name).show()
        self.status[name] = status
        if probe.running and live_output(self.shell):
            status.start()

    # --- probes by name ------------------------------------------------------------------

    @property
    def user_ns(self) -> dict[str, Any]:
        assert self.shell is not None
        return self.shell.user_ns

    def close_probe(self, name: str) -> Results | None:
        """Close the probe bound to `name` (by us or in the user namespace); its data stays."""
        status = self.status.pop(name, None)
        found = [self.probes.pop(name, None), self.user_ns.get(name)]
        closed = None
        for p in {id(p): p for p in found if isinstance(p, Results)}.values():
            p.close()
            closed = p
        fleet = sys.modules.get("kernelscope.fleet.fleet")  # none made without it imported
        held = self.user_ns.get(name)
        if fleet is not None and isinstance(held, fleet.FleetProbe):  # a `%%bpf --fleet` cell's
            try:
                held.close()
            except fleet.FleetError as e:  # its client is gone: say so, and go on
                show_warning(f"{name}: {e}")
        if status is not None:
            status.stop()
        return closed

    def end_status(self, name: str) -> None:
        """End the status line of probe `name`, refreshing it a last time."""
        status = self.status.pop(name, None)
        if status is not None:
            status.stop()

    def close_all(self) -> None:
        for name in list(self.probes):
            self.close_probe(name)
        for status in self.status.values():
            status.stop()
        self.status.clear()
        close_all()
        bt_.close_all()

    def _lookup(self, name: str) -> Results:
        probe = self.user_ns.get(name)
        if not isinstance(probe, Results):
            probe = self.probes.get(name)
        if probe is None:
            live = ", ".join(_names(live_all())) or "none"
            raise UsageError(f"no probe named {name!r} (live probes: {live})")
        return probe

    # --- warnings ------------------------------------------------------------------------

    def _warn(self, probe: Probe, source: str) -> None:
        for w in probe.warnings:
            show_warning(w)
        if probe.backend != "bcc":
            return  # CO-RE relocates struct reads against the kernel's BTF
        code = _compile_blank(source)
        m = bcc.STRUCT_DEREF.search(code)
        if m is None:
            return
        verdict = self.header_layout()
        if verdict.mismatch is False:
            return
        n = source.count("\n", 0, m.start()) + 1
        what = "do not match" if verdict.mismatch else "may not match"
        release = host.kernel_release()
        text = (
            f"line {n}: this cell reads kernel structs ({m.group(0).strip()}), but the kernel headers "
            f"BCC compiles with {what} the running kernel {release} ({verdict.describe(code)}). "
            f"Values read through kernel struct pointers may be garbage. Safe alternatives: "
            f"{SAFE_ALTERNATIVES}."
        )
        probe.warnings.append(text)
        show_warning(text)

    def header_layout(self) -> LayoutVerdict:
        """The doctor's header check, run once per session and only when a cell needs it."""
        if self.layout is None:
            found = host.find_headers()
            if found is not None and not found.matches_kernel:
                print(f"kernelscope: this cell reads kernel structs and the headers ({found.version}) are "
                      f"not for this kernel; checking their layout once per session (a few seconds)...")
            self.layout = header_layout_verdict()
        return self.layout

    # --- line magics ---------------------------------------------------------------------

    @magic_arguments()
    @argument("name", nargs="?", help="the probe to stop (default: the only live one)")
    @argument("--all", action="store_true", help="stop every live probe")
    @line_magic
    def bpf_stop(self, line: str) -> None:
        """Stop probes and detach them from the kernel; their DataFrames stay readable."""
        args = parse_argstring(self.bpf_stop, line)
        if args.all:
            live = live_all()
            for p in live:
                p.close()
                self.end_status(p.name or "")
            print(f"stopped {len(live)} probe(s)")
            return
        if args.name is None:
            live = live_all()
            if len(live) != 1:
                raise UsageError(
                    "no live probes" if not live else
                    f"several probes are live ({', '.join(_names(live))}): name one, or use --all"
                )
            probe: Results = live[0]
            name = live[0].name or DEFAULT_NAME
        else:
            name = args.name
            probe = self._lookup(name)
        was_closed = probe.closed
        probe.close()  # detached; still listed by %bpf_list while its name holds it
        self.end_status(name)  # after close: its last refresh shows the probe closed
        kept = (f"{stored_rows(probe):,} rows kept in {name}.df" if probe.outputs else
                f"its maps are kept as they were in {name}.maps")  # a counting program
        if isinstance(probe, bt_.BpftraceView):  # its maps are what bpftrace printed
            failed = getattr(probe, "save_error", None)  # record mode: the capture was not saved
            if failed is not None:
                show_warning(f"{name}: the capture was not saved ({type(failed).__name__}: {failed})")
            parts = [f"{stored_rows(probe):,} rows kept in {name}.df"] if probe.outputs else []
            if probe.map_names:
                parts.append(f"maps {', '.join(probe.map_names)} kept in {name}.map(NAME)")
            kept = "; ".join(parts) or "bpftrace printed nothing"
        print(f"{name}: {'was already stopped' if was_closed else 'stopped'}; {kept}")

    @line_magic
    def bpf_list(self, line: str) -> pd.DataFrame | None:
        """Every probe running or loaded, and every stopped one still holding rows under its
        name, with its counters, one row each; "no probes" when there is none."""
        listed = self.listed()
        if not listed:
            print("no probes")
            return None
        return probes_frame(listed)

    def listed(self) -> list[Results]:
        """What %bpf_list shows: live probes (not closed), then the probes our cells bound to a
        name that stopped and still hold data: rows, or (a counting program) its maps as stop()
        found them. A probe leaves once closed (a Probe made in Python) or, for a cell's probe,
        once its name lets go of it (`del`, a re-run)."""
        found: dict[int, Results] = {id(p): p for p in live_all()}
        for p in list(self.probes.values()):
            holds = stored_rows(p) > 0 or (not p.outputs and p.started_at is not None)
            if id(p) not in found and holds:
                found[id(p)] = p
        return list(found.values())

    @line_magic
    def bpf_examples(self, line: str) -> None:
        """`%bpf_examples` lists the shipped example probes, one line each; `%bpf_examples NAME`
        puts example NAME's `%%bpf` cell into the next input, ready to run."""
        words = line.split()
        if not words:
            print(examples.listing())
            print("%bpf_examples NAME puts one into the next cell")
            return
        if len(words) > 1:
            raise UsageError(f"usage: %bpf_examples [NAME], one name; got {line.strip()!r}")
        with usage_errors(line, "", "%bpf_examples", ARGUMENT_ERRORS):
            ex = examples.example(words[0])
        assert self.shell is not None
        self.shell.set_next_input(ex.cell)
        print(f"example {ex.name} is in the next cell: run it, then read {ex.read}")

    @line_magic
    def bpf_doctor(self, line: str) -> Any:
        """Check what this host can do with eBPF (loads small test programs; a few seconds)."""
        from ..doctor import checks as doctor

        report = doctor.report()
        with contextlib.suppress(KeyError):
            self.layout = verdict_from_check(report["header layout"])
        return report

    @line_magic
    @no_var_expand
    def bpf_tracepoints(self, line: str) -> pd.DataFrame:
        """Tracepoints matching PATTERN: a glob (sched:*exit*), a regex (/^sched:/) or a substring."""
        pattern = line.strip() or None
        with usage_errors(line, "", "%bpf_tracepoints", ARGUMENT_ERRORS):
            df = tracepoints.tracepoints(pattern)
        if df.empty:
            print(f"no tracepoint matches {pattern!r}")
        return df

    @line_magic
    @no_var_expand
    def bpf_format(self, line: str) -> tracepoints.TracepointFormat:
        """The fields of a tracepoint's args (CATEGORY:EVENT), with type, offset and size."""
        if not line.strip():
            raise UsageError("usage: %bpf_format CATEGORY:EVENT, e.g. %bpf_format sched:sched_switch")
        with usage_errors(line, "", "%bpf_format", ARGUMENT_ERRORS):
            return tracepoints.tracepoint_format(line.strip())


# --- the %%bpf line ---------------------------------------------------------------------


def options(args: Any) -> Options:
    """Check the parsed `%%bpf` line; every mistake is a UsageError naming the flag."""
    name = args.name or DEFAULT_NAME
    if not name.isidentifier() or keyword.iskeyword(name):
        raise UsageError(f"%%bpf: NAME must be a Python identifier, got {name!r}")
    for flag, value in (("--pages", args.pages), ("--duration", args.duration), ("--limit", args.limit),
                        ("--max-rows", args.max_rows), ("--perf-wakeup", args.perf_wakeup),
                        ("--freq", args.freq)):
        if value is not None and value <= 0:
            raise UsageError(f"%%bpf: {flag} must be positive, got {value}")
    if args.pages is not None and args.pages & (args.pages - 1):
        raise UsageError(f"%%bpf: --pages must be a power of two (1, 2, 4, ...), got {args.pages}")
    if args.reorder is not None and args.reorder < 0:
        raise UsageError(f"%%bpf: --reorder must be >= 0 ns, got {args.reorder}")
    if args.no_start and (args.duration is not None or args.limit is not None):
        raise UsageError("%%bpf: --no-start cannot be combined with --duration or --limit")
    if args.libbpf and args.bcc:
        raise UsageError("%%bpf: choose one of --libbpf and --bcc")
    if args.freq is not None and args.perf_event is None:
        raise UsageError("%%bpf: --freq is the sampling rate of --perf-event PROG: name the program too")
    if args.perf_event is not None and not args.perf_event.isidentifier():
        raise UsageError(f"%%bpf: --perf-event takes a program's C function name, got {args.perf_event!r}")
    if args.sets and args.bcc:
        raise UsageError("%%bpf: --set is for CO-RE programs' globals; BCC programs take -D NAME=VALUE")
    return Options(
        name=name, pages=args.pages, duration=args.duration, limit=args.limit,
        max_rows=args.max_rows, cflags=[define_flag(d) for d in args.defines],
        no_start=args.no_start, quiet=args.quiet, perf_wakeup=args.perf_wakeup,
        reorder_ns=args.reorder, replay=args.replay,
        backend="libbpf" if args.libbpf or args.sets else "bcc" if args.bcc else None,
        globals=dict(global_value(s) for s in args.sets),
        only=program_names(args.only, "--only") or None, skip=program_names(args.skip, "--skip"),
        map_sizes=dict(map_size(s) for s in args.map_sizes),
        file=args.file, include=list(args.include), perf_event=args.perf_event, freq=args.freq,
        verbose=args.verbose,
    )


def program_names(values: list[str], flag: str) -> list[str]:
    """Program names from repeated, comma-separated --only/--skip values."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise UsageError(f"%%bpf: {flag} takes C function names separated by commas, got {bad[0]!r}")
    return names


def map_size(setting: str) -> tuple[str, int]:
    """`NAME=N` from --map-size."""
    name, eq, value = setting.partition("=")
    try:
        n = int(value, 0) if eq and name.isidentifier() else 0
    except ValueError:
        n = 0
    if n <= 0:
        raise UsageError(f"%%bpf: --map-size expects NAME=N with N a positive number of entries, "
                         f"got {setting!r}")
    return name, n


def program_source(opts: Options, cell: str) -> str:
    """The program: the cell (line numbers as the notebook shows them, %%bpf being line 1), or
    the text of --file, whose lines are the file's (the cell then holds at most comments)."""
    if opts.file is None:
        return "\n" + cell
    if _compile_blank(cell).strip():  # IPython wants a cell body: comments are fine
        raise UsageError(f"%%bpf: the program is either the cell or --file {opts.file}, not both: "
                         "leave only comments in the cell, or drop --file")
    try:
        source, _ = read_program(opts.file)
    except KernelscopeError as e:
        raise UsageError(f"%%bpf: --file: {e}") from None
    return source


def global_value(setting: str) -> tuple[str, int | str]:
    """`NAME=VALUE` from --set: an integer (any base Python reads) or a string."""
    name, eq, value = setting.partition("=")
    if not name.isidentifier() or not eq:
        raise UsageError(f"%%bpf: --set expects NAME=VALUE with NAME a C identifier, got {setting!r}")
    if _UNEXPANDED.search(value):
        raise UsageError(f"%%bpf: --set {setting} did not expand: IPython could not evaluate it")
    try:
        return name, int(value, 0)
    except ValueError:
        return name, value.strip("\"'")


def define_flag(define: str) -> str:
    """`NAME=VALUE` (or `NAME`) from -D, as the clang flag `-DNAME=VALUE`."""
    macro, eq, value = define.partition("=")
    if not macro.isidentifier():
        raise UsageError(f"%%bpf: -D expects NAME=VALUE with NAME a C identifier, got {define!r}")
    if _UNEXPANDED.search(value):
        raise UsageError(
            f"%%bpf: -D {define} did not expand: IPython could not evaluate it in the notebook's "
            "namespace (is the module imported, the variable defined?)"
        )
    return f"-D{macro}{eq}{value}"


_shown_banners: set[str] = set()


def build_probe(source: str, opts: Options) -> Probe:
    """A loaded (compiled, attached) Probe, or a UsageError with nothing left attached.

    With --replay, or under KERNELSCOPE_MODE=replay, a Replay of the capture instead: it
    reads like a Probe, so the rest of the notebook runs unchanged.
    """
    with usage_errors(source, opts.name, verbose=opts.verbose):
        note = mode.banner()
        if note and note not in _shown_banners:
            _shown_banners.add(note)
            show_warning(note)
        if opts.replay:
            return replay(opts.replay, speed=mode.replay_speed(), name=opts.name)  # type: ignore[return-value]
        folder = [os.path.dirname(os.path.abspath(opts.file))] if opts.file else []
        probe = Probe(source, pages=opts.pages, max_rows=opts.max_rows, cflags=opts.cflags,
                      wakeup_events=opts.perf_wakeup, reorder_ns=opts.reorder_ns, name=opts.name,
                      backend=opts.backend, globals=opts.globals or None, programs=opts.only,
                      skip=opts.skip or (), map_sizes=opts.map_sizes or None,
                      include=[*folder, *(opts.include or [])])
        try:
            probe.load()
            if opts.perf_event and probe.live:  # a replay (KERNELSCOPE_MODE) attaches nothing
                probe.attach_perf_event(opts.perf_event, freq=opts.freq)
        except BaseException:
            probe.close()
            raise
    return probe


def run_blocking(probe: Probe, opts: Options, live: bool) -> None:
    """Drain for --duration/--limit under a progress bar, close, show the first rows.

    Ctrl-C (KeyboardInterrupt) ends the wait early: the probe is closed the same way and
    keeps every row that arrived.
    """
    progress = Progress(probe, opts.name, opts.duration, opts.limit, live=live, quiet=opts.quiet)
    t0 = time.monotonic()
    failure: BaseException | None = None
    interrupted = False
    try:
        probe.wait(duration=opts.duration, limit=opts.limit, progress=progress)
    except KeyboardInterrupt:
        interrupted = True
    except Exception as e:  # the drain thread failed; what arrived before stays
        failure = e
    finally:
        probe.close()
    rows = stored_rows(probe)
    took = time.monotonic() - t0
    if interrupted:
        end = f"interrupted after {took:.1f} s; {rows:,} rows kept in {opts.name}.df"
    elif failure is not None:
        end = "failed"
    else:
        end = f"done; {rows:,} rows in {opts.name}.df"
    progress.finish(end)
    if failure is not None and not is_user_error(failure):
        failure.add_note(INTERNAL_NOTE + f"; the {rows:,} rows received are kept in {opts.name}")
        raise failure
    if failure is not None:
        raise UsageError(f"%%bpf {opts.name}: draining failed after {took:.1f} s: {failure}; "
                         f"the {rows:,} rows received are kept in {opts.name}") from None
    if not opts.quiet:
        show_rows(probe, opts.name)


def show_rows(probe: Probe, name: str, n: int = HEAD_ROWS) -> None:
    if len(probe.outputs) == 1:
        display(probe.df.head(n))
        return
    for map_name in probe.outputs:
        display(HTML(f"<b>{name}.frame({map_name!r})</b>"))
        display(probe.frame(map_name).head(n))


# --- %%bpftrace -------------------------------------------------------------------------


# bpftrace 0.17's options that take a value (`bpftrace --help`): any other word not starting
# with "-" after ` -- ` is a positional parameter of the script ($1, $2...).
BPFTRACE_VALUE_OPTIONS = frozenset({"-B", "-f", "-o", "-e", "-I", "--include", "-p", "-c", "--emit-elf",
                                    "--emit-llvm"})


def split_bpftrace_line(line: str) -> tuple[str, list[str], list[str]]:
    """The `%%bpftrace` line's own options, what follows ` -- ` (bpftrace's options) and the
    script's positional parameters: the words after a second ` -- `, and bare words (not an
    option's value) after the first."""
    words = line.strip()
    head, sep, tail = (" " + words).partition(" -- ")
    if not sep:
        return words, [], []
    try:
        rest = shlex.split(tail)
    except ValueError as e:
        raise UsageError(f"%%bpftrace: the bpftrace options after --: {e}") from None
    extra: list[str] = []
    positional: list[str] = []
    it = iter(rest)
    for w in it:
        if w == "--":
            positional += list(it)
        elif w in BPFTRACE_VALUE_OPTIONS:
            extra += [w, next(it, "")]
        elif w.startswith("-") and w != "-":
            extra.append(w)
        else:
            positional.append(w)
    return head.strip(), extra, positional


def bpftrace_name(args: Any) -> str:
    name = args.name or BPFTRACE_NAME
    if not name.isidentifier() or keyword.iskeyword(name):
        raise UsageError(f"%%bpftrace: NAME must be a Python identifier, got {name!r}")
    for flag, value in (("--duration", args.duration), ("--limit", args.limit), ("--max-rows", args.max_rows),
                        ("-p", args.pid)):
        if value is not None and value <= 0:
            raise UsageError(f"%%bpftrace: {flag} must be positive, got {value}")
    return name


def build_bpftrace(cell: str, name: str, args: Any, extra: list[str],
                   positional: Sequence[str] = ()) -> Results:
    """A started bpftrace run (attached), or its replay; a UsageError with no process left.

    The script is the cell after one blank line, so bpftrace's line numbers are the cell's
    as the notebook shows it (the %%bpftrace line is line 1).
    """
    script = "\n" + cell
    with bpftrace_errors(script, name):
        note = mode.banner()
        if note and note not in _shown_banners:
            _shown_banners.add(note)
            show_warning(note)
        if args.replay:
            return bt_.replay(args.replay, speed=mode.replay_speed(), name=name).start()
        run = bt_.Bpftrace(script, name=name, pid=args.pid, args=extra, positional=positional,
                           max_rows=args.max_rows)
        return run.start()


@contextlib.contextmanager
def bpftrace_errors(script: str, name: str) -> Iterator[None]:
    """What the user can fix (bpftrace's error, no bpftrace, a bad capture) as a UsageError
    quoting bpftrace at the cell's line; anything else keeps its traceback."""
    try:
        yield
    except Exception as e:
        if not is_user_error(e):
            e.add_note(INTERNAL_NOTE)
            raise
        raise UsageError(f"%%bpftrace {name}: {bpftrace_message(e, script)}") from None


def bpftrace_message(e: BaseException, script: str) -> str:
    """bpftrace's message at its line: `line N: MESSAGE`, then the line and bpftrace's marker."""
    if not isinstance(e, bt_.BpftraceScriptError) or e.line is None:
        return error_text(e)
    lines = script.splitlines()
    n = e.line
    text = f"line {n}{f':{e.col}' if e.col else ''}: {e.message}"
    if 1 <= n <= len(lines):
        marker = e.detail.splitlines()[1:2] if e.detail else []
        pad = " " * len(str(n))
        text += f"\n    {n} | {lines[n - 1].rstrip()}" + "".join(f"\n    {pad} | {m}" for m in marker)
    elif n > len(lines) and lines:  # in the probe kernelscope appends: the cell ended too soon
        last = len(lines)
        text = (f"line {last}: {e.message} at the end of the cell (an unclosed block?)"
                f"\n    {last} | {lines[-1].rstrip()}")
    return text


def run_bpftrace_blocking(run: Results, name: str, args: Any, live: bool) -> None:
    """--duration/--limit: wait under a progress bar (Ctrl-C ends early), stop, show the
    printf rows and each map; what arrived stays in NAME."""
    progress = Progress(run, name, args.duration, args.limit, live=live, quiet=args.quiet)
    t0 = time.monotonic()
    interrupted = False
    try:
        with bpftrace_errors("", name):
            run.wait(duration=args.duration, limit=args.limit, progress=progress)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        run.close()
    rows = stored_rows(run)
    took = time.monotonic() - t0
    progress.finish(f"interrupted after {took:.1f} s; {rows:,} rows kept in {name}" if interrupted
                    else f"done; {rows:,} rows in {name}")
    if args.quiet:
        return
    for out in run.outputs:
        display(HTML(f"<b>{name}.frame({out!r})</b>"))
        display(run.frame(out).head(HEAD_ROWS))
    if isinstance(run, bt_.BpftraceView):
        show_bpftrace_maps(run, name)


def show_bpftrace_maps(run: bt_.BpftraceView, name: str) -> None:
    for m in run.map_names:
        frame = run.map(m)
        is_hist = {"low", "high", "count"} <= set(frame.columns)
        display(HTML(f"<b>{name}.{'hist' if is_hist else 'map'}({m!r})</b>"))
        display(run.hist(m) if is_hist else frame.head(BPFTRACE_MAP_ROWS))


# --- errors -----------------------------------------------------------------------------

# What a user can fix: kernelscope's errors about the program, the host or the arguments, and
# what the host refused (a file or device this user may not open, a limit). An InternalError
# (a corrupt buffer, a broken invariant) or any other exception is kernelscope's fault: it keeps
# its traceback, with a note saying so, and never reads as the user's mistake.
USER_ERRORS = (KernelscopeError, OSError)
# The line magics' only argument is a pattern or a tracepoint name, whose parsers raise ValueError.
ARGUMENT_ERRORS = (*USER_ERRORS, ValueError)
INTERNAL_NOTE = ("kernelscope: internal error, not a mistake in the cell: please report it "
                 "(https://github.com/kernelscope/kernelscope/issues) with this traceback")


def is_user_error(e: BaseException, allowed: tuple[type[BaseException], ...] = USER_ERRORS) -> bool:
    """Whether `e` is something the user can fix (and so a UsageError without traceback)."""
    return isinstance(e, allowed) and not isinstance(e, InternalError)


def error_text(e: BaseException) -> str:
    """The message of a user error; an OS error not wrapped by kernelscope says its kind."""
    if isinstance(e, OSError) and not isinstance(e, KernelscopeError):
        what = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
        return f"{type(e).__name__}: {what} (uid {os.geteuid()})"
    return str(e).strip()


@contextlib.contextmanager
def usage_errors(source: str, name: str, magic: str = "",
                 allowed: tuple[type[BaseException], ...] = USER_ERRORS,
                 verbose: bool = False) -> Iterator[None]:
    """Turn what a user can fix into a UsageError (no traceback, the cell's line quoted);
    anything else propagates with its traceback and INTERNAL_NOTE."""
    try:
        yield
    except Exception as e:
        if not is_user_error(e, allowed):
            e.add_note(INTERNAL_NOTE)
            raise
        text = f"{magic}: {error_text(e)}" if magic else usage_message(e, source, name, verbose)
        raise UsageError(text) from None


def usage_message(e: BaseException, source: str, name: str, verbose: bool = False) -> str:
    lines = source.splitlines()
    text = error_text(e)
    if isinstance(e, VerifierError):
        text = e.format(verbose, hint=None if verbose else VERBOSE_HINT)
        if e.line is not None and not _LINE_PREFIX.match(text):
            text = f"line {e.line}: {text}"
    if not isinstance(e, CompileError):
        m = _LINE_PREFIX.match(text)
        if m and 1 <= int(m.group(1)) <= len(lines):
            n = int(m.group(1))
            first, nl, rest = text.partition("\n")
            text = f"{first}\n    {n} | {lines[n - 1].rstrip()}{nl}{rest}"
    out = text.splitlines()
    if len(out) > MAX_MESSAGE_LINES and not verbose:
        out = [*out[:MAX_MESSAGE_LINES], f"... ({len(out) - MAX_MESSAGE_LINES} more lines)"]
    return f"%%bpf {name}: " + "\n".join(out)


def _compile_blank(source: str) -> str:
    from ..backends.base import blank_comments_and_strings

    return blank_comments_and_strings(source)


# --- header layout ----------------------------------------------------------------------


def header_layout_verdict() -> LayoutVerdict:
    """Cheap when the headers are for the running kernel; otherwise the doctor decides (slow)."""
    found = host.find_headers()
    release = host.kernel_release()
    if found is None:
        return LayoutVerdict(None, "no kernel headers found")
    if found.matches_kernel:
        return LayoutVerdict(False, f"headers {found.version} are for the running kernel")
    from ..doctor import checks as doctor

    check = next((c for c in doctor.run_checks() if c.name == "header layout"), None)
    if check is None:
        return LayoutVerdict(None, f"headers {found.version}, kernel {release}; layout not checked")
    verdict = verdict_from_check(check)
    if verdict.mismatch is None:
        verdict.detail = f"headers {found.version}; {verdict.detail}"
    return verdict


def verdict_from_check(check: Any) -> LayoutVerdict:
    if check.ok is None:
        return LayoutVerdict(None, check.detail)
    if check.ok:
        return LayoutVerdict(False, check.detail)
    data = getattr(check, "data", {}) or {}
    headers, btf = data.get("headers", {}), data.get("btf", {})
    differ = {k: (headers[k], btf[k]) for k in data.get("differ") or [] if k in headers and k in btf}
    return LayoutVerdict(True, check.detail.split(". ")[0], differ or None)


# --- listing ----------------------------------------------------------------------------

_LIST_COLUMNS = ["name", "state", "attached", "maps", "received", "dropped", "lost_records",
                 "rows", "events_per_s", "running_s", "memory_mb"]


def live_all() -> list[Results]:
    """Live probes and live bpftrace runs: what %bpf_stop and %bpf_list know."""
    return [*live_probes(), *bt_.live_runs()]


def _names(probes: list[Results]) -> list[str]:
    return [p.name or f"<unnamed {id(p):x}>" for p in probes]


def stored_rows(probe: Results) -> int:
    """Rows a probe holds, over its output maps."""
    return sum(len(ms.store) for ms in probe.outputs.values())


def probes_frame(probes: list[Results]) -> pd.DataFrame:
    """One row per probe: what it is attached to and its counters summed over output maps."""
    rows = []
    now = time.monotonic()
    for p in probes:
        stats = p.stats
        received = sum(s["received"] for s in stats.values())
        running_s = now - p.started_at if p.started_at and p.running else None
        rows.append({
            "name": p.name or f"<unnamed {id(p):x}>",
            "state": state_word(p),
            "attached": ", ".join(p.attach_points()),
            "maps": ", ".join(f"{n} ({ms.om.kind})" for n, ms in p.outputs.items()),
            "received": received,
            "dropped": sum(s["dropped"] for s in stats.values()),
            "lost_records": sum(s["lost_records"] for s in stats.values()),
            "rows": sum(s["stored"] for s in stats.values()),
            "events_per_s": round(received / running_s, 1) if running_s else None,
            "running_s": round(running_s, 1) if running_s is not None else None,
            "memory_mb": round(sum(s["memory_bytes"] for s in stats.values()) / 2**20, 2),
        })
    return pd.DataFrame(rows, columns=_LIST_COLUMNS)


def state_word(p: Results) -> str:
    """running; stopped (started once, not draining: loaded, or detached with its rows kept);
    loaded (never started); closed (never started); new."""
    if p.running:
        return "running"
    if p.started_at is not None:
        return "stopped"
    return "loaded" if p.loaded else "closed" if p.closed else "new"


# --- extension hooks --------------------------------------------------------------------


def load(ipython: Any) -> None:
    """`%load_ext kernelscope`: register the magics (probes also close at interpreter exit)."""
    ipython.register_magics(BPFMagics)


def unload(ipython: Any) -> None:
    """`%unload_ext kernelscope`: close every probe (data stays readable), drop the magics."""
    manager = ipython.magics_manager
    magics = manager.registry.pop(BPFMagics.__name__, None)
    if isinstance(magics, BPFMagics):
        magics.close_all()
    close_all()
    bt_.close_all()
    manager.magics["cell"].pop("bpf", None)
    manager.magics["cell"].pop("bpftrace", None)
    for name in _LINE_MAGICS:
        manager.magics["line"].pop(name, None)


# magic_arguments names every magic `%name` in its usage line; this one is a cell magic.
BPFMagics.bpf.__doc__ = (BPFMagics.bpf.__doc__ or "").replace("%bpf [", "%%bpf [", 1)
BPFMagics.bpftrace.__doc__ = (BPFMagics.bpftrace.__doc__ or "").replace("%bpftrace [", "%%bpftrace [", 1)
