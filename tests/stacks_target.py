"""The stack tests' target program (stacks_target.c): built with frame pointers, PIE or not,
started paused; it prints its own functions' addresses, then on "go" burns and naps."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SOURCE = Path(__file__).with_name("stacks_target.c")


def build(out: Path, pie: bool = True) -> Path:
    flags = ["-fPIE", "-pie"] if pie else ["-fno-pie", "-no-pie"]
    subprocess.run(["cc", "-O0", "-fno-omit-frame-pointer", "-g", "-pthread", *flags, "-o", str(out),
                    str(SOURCE)], check=True)
    return out


@dataclass
class Target:
    """A running target: its pid and the addresses it printed of burn, nap and main."""

    proc: subprocess.Popen[str]
    pid: int
    addresses: dict[str, int]
    result: dict[str, int] = field(default_factory=dict)

    @classmethod
    def start(cls, binary: Path, naps: int = 10, nap_ms: int = 100) -> Target:
        proc = subprocess.Popen([str(binary), str(naps), str(nap_ms)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        fields = dict(re.findall(r"(\w+)=(\S+)", proc.stdout.readline()))
        addrs = {k: int(v, 16) for k, v in fields.items() if k != "pid"}
        return cls(proc, int(fields["pid"]), addrs)

    def go(self) -> dict[str, int]:
        """Burn and nap; returns {"burner": tid, "slept_ns": ns} once the naps are over."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.result = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", self.proc.stdout.readline())}
        return self.result

    def exit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0
        assert self.proc.stdout is not None
        self.proc.stdout.close()
