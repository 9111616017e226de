"""The stack tests' target program (kernelscope/bench/c/stacks_target.c, kernelscope.lab.Workload),
built here PIE or not: it prints its own functions' addresses, then on "go" burns and naps."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kernelscope.lab import WORKLOAD_SOURCE
from kernelscope.lab import Workload as Target

__all__ = ["Target", "build"]


def build(out: Path, pie: bool = True) -> Path:
    flags = ["-fPIE", "-pie"] if pie else ["-fno-pie", "-no-pie"]
    subprocess.run(["cc", "-O0", "-fno-omit-frame-pointer", "-g", "-pthread", *flags, "-o", str(out),
                    str(WORKLOAD_SOURCE)], check=True)
    return out
