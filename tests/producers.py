"""Processes that make a known number of events, started paused so a probe can filter on their pid."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import Any

# one getppid() per event; the probe filters on TARGET (the child's tgid)
_CHILD = """
import os, sys
n = int(sys.argv[1])
sys.stdin.readline()
for _ in range(n):
    os.getppid()
"""


@dataclass
class Producer:
    proc: subprocess.Popen[str]
    count: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def cflags(self) -> list[str]:
        return [f"-DTARGET={self.pid}"]

    def go(self, timeout: float = 60) -> None:
        """Release the child and wait until it made all its events."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        assert self.proc.wait(timeout) == 0


def paused(count: int, cpu: int | None = None) -> Producer:
    cmd = [sys.executable, "-c", _CHILD, str(count)]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, text=True)
    return Producer(proc, count)


GETPPID_EVENT = r"""
struct event { u32 pid; u32 cpu; u64 ts; char comm[16]; };
DECLARE;
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
  u64 id = bpf_get_current_pid_tgid();
  if ((id >> 32) != TARGET) return 0;
  struct event e = {};
  e.pid = id >> 32;
  e.cpu = bpf_get_smp_processor_id();
  e.ts = bpf_ktime_get_ns();
  bpf_get_current_comm(&e.comm, sizeof(e.comm));
  SUBMIT;
  return 0;
}
"""


def ring_program(pages: int = 64) -> str:
    return GETPPID_EVENT.replace("DECLARE", f"BPF_RINGBUF_OUTPUT(events, {pages})").replace(
        "SUBMIT", "events.ringbuf_output(&e, sizeof(e), 0)"
    )


def perf_program() -> str:
    return GETPPID_EVENT.replace("DECLARE", "BPF_PERF_OUTPUT(events)").replace(
        "SUBMIT", "events.perf_submit(args, &e, sizeof(e))"
    )


def run_to_completion(source: str, count: int, **probe_kwargs: Any) -> tuple[Any, Producer]:
    """Start a probe on `source` filtered to a fresh producer, make `count` events, stop and
    close it (its frames and stats stay readable). Returns (probe, producer)."""
    from kernelscope import Probe

    prod = paused(count)
    probe = Probe(source, cflags=prod.cflags, **probe_kwargs)
    try:
        probe.start()
        prod.go()
        probe.stop()
    finally:
        probe.close()
    return probe, prod
