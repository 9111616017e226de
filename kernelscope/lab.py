"""Experiment helpers for the teaching notebooks: a C producer and the program it feeds.

    burst = lab.Burst("ring_burst", calls=200_000, cpu=0)    # paused C producer
    p = Probe(lab.getppid_program("ring", pages=16), cflags=burst.cflags, name="ring_burst").load()
    made = burst.go()          # {"calls", "seconds", "rate"}: the producer's own figures
    p.stop(); p.stats["events"]

    work = lab.Workload("flame", naps=10, nap_ms=100)         # paused: burn() and nap()
    made = work.go()           # {"burner": tid, "slept_ns", "burner_cpu_ns"}: its own figures

Under KERNELSCOPE_MODE=replay nothing is spawned: `go()` returns the figures recorded
with the probe's capture (kernelscope.mode.remember), so notebooks run unchanged.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path
from typing import Any

from . import mode
from .bench.producer import SRC_DIR, Producer, build_helpers

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


WORKLOAD_SOURCE = SRC_DIR / "stacks_target.c"


class Workload:
    """A C program with a known hot function and a known sleep (bench/c/stacks_target.c,
    frame pointers and DWARF), started paused. It prints the addresses of its own `burn`,
    `nap` and `main`; `go()` starts a thread named "burner" spinning in burn() (which inlines
    mix()) while the main thread calls nap() `naps` times, each a nanosleep of `nap_ms`, and
    returns what the program measured: the burner's tid, the sleep (`slept_ns`) and the
    burner's CPU time (`burner_cpu_ns`). `exit()` ends it.

    With a `name`, replay mode spawns nothing and `go()` returns the recorded figures.
    """

    def __init__(self, name: str | None = None, naps: int = 10, nap_ms: int = 100,
                 binary: str | Path | None = None) -> None:
        self.name = name
        self.proc: subprocess.Popen[str] | None = None
        self.addresses: dict[str, int] = {}
        self.result: dict[str, int] = {}
        self.pid = 0
        if name is not None and mode.mode() == "replay":
            return
        exe = str(binary or build_helpers()["stacks_target"])
        self.proc = subprocess.Popen([exe, str(naps), str(nap_ms)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        fields = dict(re.findall(r"(\w+)=(\S+)", self.proc.stdout.readline()))
        self.pid = int(fields.pop("pid"))
        self.addresses = {k: int(v, 16) for k, v in fields.items()}

    @classmethod
    def start(cls, binary: str | Path, naps: int = 10, nap_ms: int = 100) -> Workload:
        """A workload from a binary built elsewhere (tests build PIE and fixed-address ones)."""
        return cls(None, naps, nap_ms, binary)

    def go(self) -> dict[str, int]:
        """Burn and nap; returns {"burner": tid, "slept_ns": ns, "burner_cpu_ns": ns} once done."""

        def run() -> dict[str, int]:
            proc = self.proc
            if proc is None or proc.stdin is None or proc.stdout is None:
                raise RuntimeError("the workload has exited")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", proc.stdout.readline())}

        self.result = mode.remember(f"{self.name}.workload", run) if self.name else run()
        return self.result

    def exit(self) -> None:
        """End the program (it waits on stdin) and reap it."""
        if self.proc is None:
            return
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        code = self.proc.wait(timeout=10)
        self.proc = None
        if code != 0:
            raise RuntimeError(f"the workload exited with status {code}")

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.exit()
