"""Run the real libbpf-tools through kernelscope, as a user would, and check them against ground truth.

    .venv/bin/python tools/libbpf_tools_check.py [--bcc PATH] [--only a,b] [--json] [--degrade]

Each tool of `libbpf_tools_specs.SPECS` is compiled from its unchanged `.bpf.c` by
`Probe.from_file(...)` with the options its own user-space loader sets (programs selected or
skipped, `const volatile` globals, map sizes), attached by hand where that loader attaches by
hand, made to see known events, and checked against a reading that does not go through
kernelscope (`bpftool map dump`, /proc counters, the trigger's own counts). Each tool runs in
its own child process with a timeout, so a crash or a hang costs one row.

Where kernelscope lacks a parameter or an attach call the spec uses, the row says
`needs: <feature>`; `--degrade` runs such a tool anyway with what exists (the file read by
hand, the missing options dropped) to show what happens without them.

The libbpf-tools sources come from `--bcc PATH` (a bcc checkout) or are extracted from the
fetched mirror (/work/.mirror/iovisor+bcc/repo) into a temporary folder; nothing of them is
kept in this repository.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ground
from libbpf_tools_specs import SPECS, Opts, Run, Spec

MIRROR = Path("/work/.mirror/iovisor+bcc/repo")

# Which engineer's part of issue 14 brings each feature (for "needs:" rows).
FEATURES = {
    "from_file": "Probe.from_file",
    "include": "include=",
    "programs": "programs=",
    "skip": "skip=",
    "map_sizes": "map_sizes=",
    "attach_perf_event": "attach_perf_event()",
}


# --- the working copy ---------------------------------------------------------------------

def working_copy(bcc: str | None, tmp: Path) -> Path:
    """libbpf-tools of a bcc checkout, or of the mirror's HEAD extracted into `tmp`.

    Only the folder's own files are extracted (not the per-architecture vmlinux.h folders,
    some of whose blobs the mirror lacks): `#include <vmlinux.h>` is then kernelscope's, made
    from this kernel's BTF, which is what a tool should be built against anyway.
    """
    if bcc:
        d = Path(bcc) / "libbpf-tools"
        if not d.is_dir():
            raise SystemExit(f"--bcc {bcc}: no libbpf-tools folder there")
        return d
    if not MIRROR.exists():
        raise SystemExit(f"no --bcc given and no mirror at {MIRROR}: fetch iovisor/bcc or pass --bcc")
    git = ["git", "--git-dir", str(MIRROR)]
    listing = subprocess.run([*git, "ls-tree", "HEAD", "libbpf-tools/"], capture_output=True,
                             text=True, check=True).stdout
    files = [ln.split("\t", 1)[1] for ln in listing.splitlines() if ln.split()[1] == "blob"]
    archive = subprocess.run([*git, "archive", "HEAD", *files], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    return tmp / "libbpf-tools"


def mirror_commit(bcc: str | None) -> str:
    git = ["git", "-C", bcc] if bcc else ["git", "--git-dir", str(MIRROR)]
    out = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


# --- one tool, in this process ---------------------------------------------------------

def missing(opts: Opts) -> list[str]:
    """The features `opts` uses that this kernelscope lacks (by signature, before running)."""
    from kernelscope import Probe

    params = dict(inspect.signature(Probe.__init__).parameters)
    need = [] if hasattr(Probe, "from_file") else ["from_file"]
    if hasattr(Probe, "from_file"):
        params.update(inspect.signature(Probe.from_file).parameters)
    need += [k for k, v in opts.probe_kwargs().items() if v and k not in params and k != "include"]
    if opts.include and "include" not in params:
        need.append("include")
    need += sorted({a.method for a in opts.attach if not hasattr(Probe, a.method)})
    return need


def make_probe(path: Path, opts: Opts, degrade: bool) -> tuple[Any, list[str]]:
    """Probe.from_file as the user writes it; with `degrade`, without the options this
    kernelscope lacks (and, lacking from_file too, the file read by hand, its folder on -I)."""
    from kernelscope import Probe

    kw = opts.probe_kwargs()
    params = dict(inspect.signature(Probe.__init__).parameters)
    dropped = [k for k in kw if k not in params] if degrade else []
    kw = {k: v for k, v in kw.items() if k not in dropped}
    if hasattr(Probe, "from_file"):
        # getattr: the harness runs against kernelscope versions without it (a "needs:" row)
        from_file = getattr(Probe, "from_file")  # noqa: B009
        return from_file(str(path), include=list(opts.include), **kw), dropped
    cflags = [f"-I{d}" for d in (path.parent, *opts.include)]
    return Probe(path.read_text(), cflags=cflags, **kw), dropped


def run_one(spec: Spec, tools: Path, degrade: bool) -> dict[str, Any]:
    run = Run(tools)
    row: dict[str, Any] = {"program": spec.name, "loader": spec.loader, "check": spec.check}
    try:
        opts = spec.options(run)
        row["how"] = opts.describe()
        need = missing(opts)
        if need and not degrade:
            row.update(result="needs", detail=", ".join(FEATURES.get(n, n) for n in need))
            return row
        run.probe, dropped = make_probe(tools / spec.bpf, opts, degrade)
        run.probe.load()
        skipped = [a.method for a in opts.attach if not hasattr(run.probe, a.method)]
        for a in opts.attach:
            if a.method not in skipped:
                getattr(run.probe, a.method)(*a.args, **a.kwargs)
        run.probe.start()
        ok, detail = spec.exercise(run)
        without = dropped + sorted(set(skipped))
        if without:
            detail = f"[run without {', '.join(without)}] {detail}"
        row.update(result="pass" if ok else "fail", detail=detail)
    except TypeError as e:
        kind = "needs" if "unexpected keyword" in str(e) else "error"
        row.update(result=kind, detail=f"TypeError: {e}", trace=traceback.format_exc()[-2000:])
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:2]
        row.update(result="error", detail=f"{type(e).__name__}: {' / '.join(lines)}"[:300],
                   trace=traceback.format_exc()[-2000:])
    finally:
        run.close()
    return row


# --- the whole run ----------------------------------------------------------------------

def run_all(names: list[str], tools: Path, timeout: float, budget: float,
            degrade: bool) -> list[dict[str, Any]]:
    rows = []
    end = time.monotonic() + budget
    for spec in SPECS:
        if names and spec.name not in names:
            continue
        left = end - time.monotonic()
        if left <= 1:
            rows.append({"program": spec.name, "loader": spec.loader, "check": spec.check, "how": "",
                         "result": "timeout",
                         "detail": f"not run: the whole run's {budget:.0f} s were spent"})
            continue
        cmd = [sys.executable, __file__, "--one", spec.name, "--tools", str(tools)]
        if degrade:
            cmd.append("--degrade")
        t0 = time.monotonic()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=min(timeout, left), check=False)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if lines else {
                "program": spec.name, "loader": spec.loader, "check": spec.check, "how": "",
                "result": "error", "detail": f"child exited {out.returncode}: {out.stderr.strip()[-300:]}"}
        except subprocess.TimeoutExpired:
            row = {"program": spec.name, "loader": spec.loader, "check": spec.check, "how": "",
                   "result": "timeout", "detail": f"timeout after {min(timeout, left):.0f} s"}
        row["seconds"] = round(time.monotonic() - t0, 1)
        rows.append(row)
        print(f"{spec.name}: {row['result']} ({row['seconds']} s)", file=sys.stderr)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    def cell(s: Any) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    out = ["| program | how it was run | check | result |", "| --- | --- | --- | --- |"]
    for r in rows:
        res = r["result"] if r["result"] == "pass" else f"{r['result']}: {r.get('detail', '')}"
        if r["result"] == "pass":
            res = f"pass: {r.get('detail', '')}"
        out.append(f"| {cell(r['program'])} | {cell(r.get('how', ''))} | {cell(r['check'])} | {cell(res)} |")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["result"]] = counts.get(r["result"], 0) + 1
    out.append("")
    out.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f" of {len(rows)}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bcc", help="a bcc checkout (its libbpf-tools folder is used)")
    ap.add_argument("--only", default="", help="comma-separated tool names")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of Markdown")
    ap.add_argument("--timeout", type=float, default=40.0, help="seconds per tool")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the whole run")
    ap.add_argument("--degrade", action="store_true",
                    help="run tools whose features are missing anyway, without those features")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--tools", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        spec = next(s for s in SPECS if s.name == args.one)
        print(json.dumps(run_one(spec, Path(args.tools), args.degrade)))
        return 0
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - {s.name for s in SPECS})
    if unknown:
        ap.error(f"unknown tool(s) {unknown}; known: {', '.join(s.name for s in SPECS)}")
    if os.geteuid() != 0:
        ap.error("loading BPF programs needs root")
    with tempfile.TemporaryDirectory(prefix="ks-libbpf-tools-") as tmp:
        tools = working_copy(args.bcc, Path(tmp))
        rows = run_all(names, tools, args.timeout, args.budget, args.degrade)
    if args.json:
        print(json.dumps({"bcc_commit": mirror_commit(args.bcc), "rows": rows}, indent=1))
    else:
        print(f"libbpf-tools of iovisor/bcc {mirror_commit(args.bcc)[:12]}\n")
        print(markdown(rows))
    return 0 if all(r["result"] == "pass" for r in rows) else 1


if __name__ == "__main__":
    _ = ground  # imported for the specs' side; keeps the module list explicit
    sys.exit(main())
