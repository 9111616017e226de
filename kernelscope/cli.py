"""The `kernelscope` command: setup, doctor, and entry points to the demo, bench and record jobs.

Anything a user can fix (no root, no BCC, no headers, tracefs not mountable or not
readable, a file the host refuses) ends as one message on stderr and a nonzero exit code,
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import host
from .errors import KernelscopeError, SetupError

EXIT_ERROR = 1
EXIT_USAGE = 2


def cmd_setup(args: argparse.Namespace) -> int:
    """One-time host preparation (the only command that changes the host): mount tracefs,
    link kernel headers for BCC, check BCC; prints what it changed and what it left alone."""
    for note in host.prepare():
        print(f"kernelscope setup: {note}")
    bcc = host.import_bcc()
    print(f"kernelscope setup: BCC {getattr(bcc, '__version__', '?')} imports from "
          f"{Path(str(bcc.__file__)).parent.resolve()}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import checks as doctor  # imports BCC lazily; keep `kernelscope --help` instant

    if args.fix:
        try:
            cmd_setup(args)
        except KernelscopeError as e:
            print(f"kernelscope setup: {e}", file=sys.stderr)
    found = doctor.report()
    print(found)
    if args.html:
        Path(args.html).write_text(found._repr_html_())
        print(f"\nwrote {args.html}")
    return 0 if found.ok else EXIT_ERROR


def _delegate(command: str, module: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports kernelscope.<module> only when run and calls its main(argv)."""

    def run(args: argparse.Namespace) -> int:
        name = f"kernelscope.{module}"
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            raise SetupError(f"`kernelscope {command}` is not available in this "
                                   f"version ({name} is missing)") from None
        code = mod.main(list(args.rest))
        return int(code) if isinstance(code, int) else 0

    run.__doc__ = f"Run kernelscope.{module}.main with the remaining arguments."
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kernelscope",
        description="Explore how kernel events reach user space with eBPF.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("setup", help="mount tracefs and link kernel headers where BCC looks, "
                                     "replacing nothing (needs root; safe to re-run)")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("doctor", help="probe what this host can do with eBPF, and how to fix "
                                      "what it cannot")
    p.add_argument("--fix", action="store_true", help="run `kernelscope setup` first")
    p.add_argument("--html", metavar="FILE", help="also write the table as HTML to FILE")
    p.set_defaults(func=cmd_doctor)

    for name, module, text in (
        ("demo", "demo", "attach a real probe for a few seconds and summarize its events"),
        ("bench", "bench.__main__", "measure event throughput and drops of the buffer readers"),
        ("record", "captures.record", "record probe events to a file for later replay"),
    ):
        # add_help=False: `kernelscope demo --help` reaches the module's own parser
        p = sub.add_parser(name, help=text, add_help=False)
        p.set_defaults(func=_delegate(name, module), delegate=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # demo/bench/record own their flags: everything after the sub-command goes to them
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "delegate", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return int(args.func(args))
    except KernelscopeError as e:
        print(f"kernelscope {args.command}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # refused by the host where kernelscope did not name the cause itself
        print(f"kernelscope {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
