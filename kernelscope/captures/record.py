"""`kernelscope record PROGRAM.c --duration 10 -o capture.parquet`: headless capture.

PROGRAM is a file (BCC C, or a libbpf-style FILE.bpf.c), compiled with its folder on the
include path (and any `-I DIR`), so its own headers are found as its Makefile would find them.

Shows a one-line progress bar on stderr (when it is a terminal, or every few seconds
otherwise) and ends with received / dropped per output map. Ctrl-C stops early and still
saves what arrived. The output path and the options are checked before the program is
loaded (exit code 2), and the capture is written atomically.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from ..errors import CaptureError, KernelscopeError
from ..probe import Probe, program_name, read_program
from .atomic import check_destination

DEFINE = re.compile(r"[A-Za-z_]\w*(=.*)?", re.S)


def progress_line(
    received: int, dropped: int, elapsed: float, duration: float | None, width: int = 30
) -> str:
    if duration:
        frac = min(1.0, elapsed / duration)
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        head = f"[{bar}] {elapsed:5.1f}/{duration:g} s"
    else:
        head = f"{elapsed:5.1f} s"
    rate = received / elapsed if elapsed > 0 else 0.0
    return f"{head}  {received:,} received  {dropped:,} dropped  {rate:,.0f}/s"


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what would fail only after the recording (exit 2, a usage message): a bad
    output path, sizes the kernel refuses, nothing to stop at."""
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        ap.error(f"--duration must be a positive number of seconds, got {args.duration:g}")
    if args.limit is not None and args.limit <= 0:
        ap.error(f"--limit must be a positive number of events, got {args.limit}")
    if args.pages is not None and (args.pages <= 0 or args.pages & (args.pages - 1)):
        ap.error(f"--pages must be a power of two (1, 2, 4, ...), got {args.pages}")
    if args.duration is None and args.limit is None and not sys.stdin.isatty():
        ap.error("give --duration or --limit when not at a terminal (nothing could stop the capture)")
    for d in args.defines:
        if not DEFINE.fullmatch(d):
            ap.error(f"-D expects NAME or NAME=VALUE with NAME a C identifier, got {d!r}")
    for folder in args.include:
        if not Path(folder).is_dir():
            ap.error(f"-I {folder}: not a folder (give the folders that hold the program's headers)")
    if not args.program.is_file():
        ap.error(f"{args.program}: no such program file")
    try:
        check_destination(args.output)
    except CaptureError as e:
        ap.error(f"-o {e}")


def save_or_keep(probe: Probe, output: Path) -> tuple[Path, str | None]:
    """Save to `output`; if the host refuses now (the folder went away, the disk filled up),
    save to the temporary folder instead so the recording is not lost. Returns where it went
    and, in the fallback case, why `output` failed."""
    try:
        return probe.save(output), None
    except OSError as e:
        spare = Path(tempfile.gettempdir()) / f"kernelscope-record-{output.stem}-{os.getpid()}.parquet"
        return probe.save(spare), f"{type(e).__name__}: {e.strerror or e}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="kernelscope record", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("program", type=Path,
                    help="program file: BCC C or a libbpf-style FILE.bpf.c with ring or perf buffer maps")
    ap.add_argument("-o", "--output", type=Path, required=True, help="capture file (.parquet)")
    ap.add_argument("--duration", type=float, default=None, help="seconds to record (default: until Ctrl-C)")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many events")
    ap.add_argument("--pages", type=int, default=None, help="buffer pages (ring: whole ring; perf: per CPU)")
    ap.add_argument(
        "-D",
        dest="defines",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="preprocessor define passed to the compiler",
    )
    ap.add_argument("-I", "--include", dest="include", action="append", default=[], metavar="DIR",
                    help="a folder searched for the program's #include files (its own folder always is)")
    args = ap.parse_args(argv)
    check_args(ap, args)
    try:
        source, folder = read_program(args.program)
    except KernelscopeError as e:
        print(f"kernelscope record: {e}", file=sys.stderr)
        return 2
    tty = sys.stderr.isatty()
    last = [0.0]

    def show(received: int, elapsed: float) -> None:
        if not tty and elapsed - last[0] < 2.0:
            return
        last[0] = elapsed
        dropped = sum(s.get("dropped", 0) for s in probe.stats.values())
        line = progress_line(received, dropped, elapsed, args.duration)
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    try:
        probe = Probe(source, pages=args.pages, cflags=[f"-D{d}" for d in args.defines],
                      name=program_name(args.program), include=[folder, *args.include])
        try:
            probe.wait(duration=args.duration, limit=args.limit, progress=show)
        except KeyboardInterrupt:
            probe.stop()
            print("\ninterrupted: saving what arrived", file=sys.stderr)
        if tty:
            print(file=sys.stderr)
        path, refused = save_or_keep(probe, args.output)
        for name, st in probe.stats.items():
            print(
                f"{name}: attempted {st['attempted']:,} = received {st['received']:,} "
                f"+ dropped {st['dropped']:,}"
                + (f"; lost records reported {st['lost_records']:,}" if st["kind"] == "perf" else "")
            )
        print(f"saved {path} ({path.stat().st_size:,} bytes)")
        probe.close()
        if refused:
            print(f"kernelscope record: could not write {args.output} ({refused}); the capture "
                  f"was saved to {path} instead", file=sys.stderr)
            return 1
    except KernelscopeError as e:
        print(f"kernelscope record: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
