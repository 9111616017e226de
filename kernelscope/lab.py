"""Experiment helpers for the teaching notebooks: a C producer and the program it feeds.

    burst = lab.Burst("ring_burst", calls=200_000, cpu=0)    # paused C producer
    p = Probe(lab.getppid_program("ring", pages=16), cflags=burst.cflags, name="ring_burst").load()
    made = burst.go()          # {"calls", "seconds", "rate"}: the producer's own figures
    p.stop(); p.stats["events"]

Under KERNELSCOPE_MODE=replay nothing is spawned: `go()` returns the figures recorded
with the probe's capture (kernelscope.mode.remember), so notebooks run unchanged.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from . import mode
from .bench.producer import Producer, build_helpers

EVENT_SIZE = 32  # bytes: u64 ts, u32 pid, u32 cpu, u64 seq, u64 pad

_PROGRAM = """\
struct event {{
    u64 ts;    // bpf_ktime_get_ns() at the tracepoint
    u32 pid;
    u32 cpu;   // CPU the program ran on
    u64 seq;   // per-CPU sequence number: gaps are lost events
    u64 pad;
}};

{decl}
BPF_PERCPU_ARRAY(lab_seq, u64, 1);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {{
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != TARGET && (id >> 32) != TARGET2)
        return 0;
    int zero = 0;
    u64 *seq = lab_seq.lookup(&zero);
    if (!seq)
        return 0;
    struct event e = {{}};
    e.ts = bpf_ktime_get_ns();
    e.pid = id >> 32;
    e.cpu = bpf_get_smp_processor_id();
    #pragma unroll
    for (int i = 0; i < {per_call}; i++) {{
        e.seq = (*seq)++;
        {emit}
    }}
    return 0;
}}
"""


def getppid_program(kind: str = "ring", pages: int = 64, per_call: int = 1, flags: str = "0") -> str:
    """One 32-byte event per getppid() of the processes TARGET (and TARGET2, default 0).

    kind "ring" uses BPF_RINGBUF_OUTPUT(events, pages) with `flags` (e.g. BPF_RB_NO_WAKEUP);
    kind "perf" uses BPF_PERF_OUTPUT(events) (its size is the reader's, pages per CPU).
    """
    if kind == "ring":
        decl = f"BPF_RINGBUF_OUTPUT(events, {pages});"
        emit = f"events.ringbuf_output(&e, sizeof(e), {flags});"
    elif kind == "perf":
        decl = "BPF_PERF_OUTPUT(events);"
        emit = "events.perf_submit(args, &e, sizeof(e));"
    else:
        raise ValueError("kind must be 'ring' or 'perf'")
    src = _PROGRAM.format(decl=decl, emit=emit, per_call=per_call)
    return "#ifndef TARGET2\n#define TARGET2 0\n#endif\n" + src


@functools.cache
def _producer_exe() -> Path:
    return build_helpers()["producer"]


class Burst:
    """A paused C producer of `calls` getppid() calls, optionally pinned to one CPU."""

    def __init__(self, name: str, calls: int, cpu: int | None = None) -> None:
        self.name = name
        self.calls = calls
        self.cpu = cpu
        self._proc: Any = None
        if mode.mode() != "replay":
            self._proc = Producer(_producer_exe(), calls, cpu)

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else 0

    @property
    def cflags(self) -> list[str]:
        return [f"-DTARGET={self.pid}"]

    def go(self) -> dict[str, float]:
        """Release the producer and wait for it: its calls, seconds and calls/s."""

        def run() -> dict[str, float]:
            self._proc.go()
            calls, t0, t1 = self._proc.finish()
            seconds = (t1 - t0) / 1e9
            return {"calls": calls, "seconds": seconds, "rate": calls / seconds if seconds else 0.0}

        return mode.remember(f"{self.name}.producer", run)

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()

    def __enter__(self) -> Burst:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
