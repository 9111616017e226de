"""`kernelscope record PROGRAM.c --duration 10 -o capture.parquet`: headless capture.

Shows a one-line progress bar on stderr (when it is a terminal, or every few seconds
otherwise) and ends with received / dropped per output map. Ctrl-C stops early and still
saves what arrived.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import KernelscopeError
from ..probe import Probe


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="kernelscope record", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("program", type=Path, help="BCC C source with BPF_RINGBUF_OUTPUT/BPF_PERF_OUTPUT maps")
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
    args = ap.parse_args(argv)
    if args.duration is None and args.limit is None and not sys.stdin.isatty():
        ap.error("give --duration or --limit when not at a terminal (nothing could stop the capture)")
    try:
        source = args.program.read_text()
    except OSError as e:
        print(f"kernelscope record: cannot read {args.program}: {e.strerror}", file=sys.stderr)
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
        probe = Probe(
            source, pages=args.pages, cflags=[f"-D{d}" for d in args.defines], name=args.program.stem
        )
        try:
            probe.wait(duration=args.duration, limit=args.limit, progress=show)
        except KeyboardInterrupt:
            probe.stop()
            print("\ninterrupted: saving what arrived", file=sys.stderr)
        if tty:
            print(file=sys.stderr)
        path = probe.save(args.output)
        for name, st in probe.stats.items():
            print(
                f"{name}: attempted {st['attempted']:,} = received {st['received']:,} "
                f"+ dropped {st['dropped']:,}"
                + (f"; lost records reported {st['lost_records']:,}" if st["kind"] == "perf" else "")
            )
        print(f"saved {path} ({path.stat().st_size:,} bytes)")
        probe.close()
    except KernelscopeError as e:
        print(f"kernelscope record: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
