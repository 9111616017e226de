"""`kernelscope bench` / `python -m kernelscope.bench`: the command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import SetupError
from . import dfbench
from .config import BUSY, CONSUMERS, KINDS, Config, parse_size, quick_config
from .consumers import Env
from .producer import build_helpers, cache_dir
from .report import report, write_json
from .run import OtherWork, _progress, machine_info, plan, run_all


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None



def _sizes_arg(text: str) -> tuple[int, ...]:
    return tuple(_size_arg(x) for x in text.split(",") if x.strip())



def _ints_arg(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text}: positive integers, comma-separated (e.g. 1,16)")
    return values



def _csv(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return items

    return parse



def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kernelscope bench",
        description="Measure kernelscope's ring and perf readers against BCC's Python "
        "callbacks and libbpf's C consumers, in one run on this machine.",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run, well under 30 s")
    ap.add_argument("--json", type=Path, default=None,
                    help=f"where to write the figures (default {cache_dir() / 'bench.json'})")
    ap.add_argument("--events", type=int, help="events per live ring run (3,000,000)")
    ap.add_argument("--perf-events", type=int, help="events per live perf run (1,000,000)")
    ap.add_argument("--sizes", type=_sizes_arg,
                    help="live ring sizes, ring total / perf per CPU (default 64K,1M,4M)")
    ap.add_argument("--drain-ring", type=_size_arg, help="ring size for the drain (64M)")
    ap.add_argument("--drain-perf", type=_size_arg, help="perf size per CPU for the drain (16M)")
    ap.add_argument("--per-call", type=_ints_arg,
                    help="events per getppid() in live runs: every live run at the first, the 4 MiB "
                    "ring and the undisturbed producer at each (default 1,16)")
    ap.add_argument("--buffers", type=_csv(KINDS), help="ring,perf")
    ap.add_argument("--consumers", type=_csv(CONSUMERS), help="bcc,libbpf,kernelscope")
    ap.add_argument("--send", type=int, metavar="N",
                    help="samples for the user ring buffer SEND comparison (1,000,000; 0 skips it)")
    ap.add_argument("--send-only", action="store_true",
                    help="run only the user ring buffer SEND comparison")
    ap.add_argument("--repeat", type=int, default=None,
                    help="run each drain (libbpf's and kernelscope's) N times and keep the fastest "
                         "(default 3, --quick 1; BCC's once: it takes seconds)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds of the runs the live targets compare (default 5, --quick 1):"
                         " more decide a ratio near 0.9x beyond a noisy host's swings (~25 s a round)")
    ap.add_argument("--no-pin", action="store_true",
                    help="do not pin the producer and the consumers to separate CPUs")
    ap.add_argument("--no-mpsc", action="store_true",
                    help="skip the MPSC runs (one producer on each CPU)")
    ap.add_argument("--df", action="store_true",
                    help="the DF section (the store alone) also at 100 M rows (~30 s, several GB; "
                    "scaled down to what MemAvailable holds); the default run does 1 M and 10 M")
    ap.add_argument("--df-rows", type=_ints_arg, metavar="N,N",
                    help="stored rows the DF section measures (default 1000000,10000000; "
                    "--quick 1000000)")
    ap.add_argument("--compare", type=Path, nargs="+", metavar="JSON",
                    help="OLD.json: after the run, each figure's ratio new/old, flagging those worse "
                    "beyond the noise; OLD.json NEW.json: compare two earlier runs only (no kernel)")
    return ap



def config_from_args(args: argparse.Namespace) -> Config:
    kw: dict[str, Any] = {}
    for name, attr in (("live_events", "events"), ("live_perf_events", "perf_events"),
                       ("live_sizes", "sizes"),
                       ("drain_ring_size", "drain_ring"), ("drain_perf_size", "drain_perf"),
                       ("live_per_calls", "per_call"), ("kinds", "buffers"), ("send_samples", "send"),
                       ("consumers", "consumers")):
        if getattr(args, attr) is not None:
            kw[name] = getattr(args, attr)
    ncpu = os.cpu_count() or 1
    if not args.no_pin and ncpu > 1:
        kw["producer_cpu"] = ncpu - 1
        kw["consumer_cpu"] = 0
    if not args.no_mpsc and ncpu > 1:
        kw["mpsc_cpus"] = (None,) * ncpu if args.no_pin else tuple(range(ncpu))
    if args.df_rows:
        kw["df_rows"] = args.df_rows
    if args.rounds is not None:
        kw["target_rounds"] = args.rounds
    cfg = quick_config(**kw) if args.quick else Config(**kw)
    if args.df:
        cfg = replace(cfg, df_rows=(*cfg.df_rows, DF_FULL))
    return cfg



@contextlib.contextmanager
def _pinned(cpu: int | None) -> Iterator[None]:
    """Pin this process (and the threads it starts) to `cpu` for the measurements."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)



DF_FULL = 100_000_000  # `--df`: the largest store


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"kernelscope bench --compare: cannot read {path}: {e}") from None
    return doc


def _compare(old: Path, new: dict[str, Any], new_label: str) -> None:
    from . import compare

    before = _read_json(old)
    changes = compare.compare(before, new)
    print("\n".join(compare.report(changes, str(old), new_label, compare.busy_note(before, new))))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.compare and len(args.compare) > 2:
        parser.error("--compare takes OLD.json, or OLD.json NEW.json")
    if args.compare and len(args.compare) == 2:  # offline: two earlier runs, no kernel
        _compare(args.compare[0], _read_json(args.compare[1]), str(args.compare[1]))
        return 0
    cfg = config_from_args(args)
    from ..host import import_bcc, prepare

    try:
        for note in prepare():
            _progress(note)
        bcc = import_bcc()
        helpers = build_helpers()
    except SetupError as e:
        print(f"kernelscope bench: {e}", file=sys.stderr)
        return 2
    env = Env(cfg, helpers, bcc)
    runs = [] if args.send_only else plan(cfg)
    machine = machine_info(bcc)
    _progress(f"{len(runs)} runs; C helpers in {cache_dir()}")
    if machine["busy_before"] > BUSY:
        _progress(f"the CPUs are {machine['busy_before']:.0%} busy with other work: "
                  "the figures will be noisy")
    started = time.perf_counter()
    meter = OtherWork()
    with _pinned(cfg.consumer_cpu):
        runs = run_all(env, runs, args.repeat)
        sends = []
        if cfg.send_samples:
            from . import send as bench_send

            _progress(f"send: {cfg.send_samples:,} samples into a user ring, libbpf C then kernelscope")
            sends = bench_send.run(helpers["userring_producer"], cfg.send_samples,
                                   rounds=1 if args.quick else bench_send.ROUNDS)
        dfs = (dfbench.run(cfg.df_rows, cfg.df_new_rows, _progress)
               if cfg.df_rows and not args.send_only else [])
    machine["seconds"] = round(time.perf_counter() - started, 1)
    machine["busy_during"] = round(meter.share(), 2)
    machine["repeat"] = args.repeat
    extra = dfbench.report(dfs) + (bench_send.report(sends) if sends else [])
    print(report(runs, cfg, machine, sends, extra))
    path = args.json or cache_dir() / "bench.json"
    doc = write_json(path, runs, cfg, machine, sends, dfs=dfs)
    print(f"\nfigures written to {path} ({machine['seconds']} s)")
    if args.compare:
        _compare(args.compare[0], doc, str(path))
    failed = any(not r.ok for r in runs) or any(d.error for d in dfs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
