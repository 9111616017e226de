"""The bench's C helpers: the getppid() producer and libbpf's reference consumers.

Built at bench time with gcc from the sources in `c/`, cached per source version.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from .. import host
from ..errors import SetupError

SRC_DIR = Path(__file__).parent / "c"
CFLAGS = ("-O2", "-Wall")
HELPERS = {  # name: (source, link flags, compile flags after CFLAGS)
    "producer": ("producer.c", (), ()),
    "ringbuf_consumer": ("ringbuf_consumer.c", ("-lbpf",), ()),
    "perfbuf_consumer": ("perfbuf_consumer.c", ("-lbpf",), ()),
    "userring_producer": ("userring_producer.c", ("-lbpf",), ()),
    # frame pointers and DWARF, no optimisation: its stacks are walked and named
    "stacks_target": ("stacks_target.c", ("-pthread",), ("-O0", "-fno-omit-frame-pointer", "-g")),
}
LIBBPF_HEADER = Path("/usr/include/bpf/libbpf.h")



class BenchSetupError(SetupError):
    """The bench cannot build or run its C helpers (gcc or libbpf-dev missing, build failed)."""



def cache_dir() -> Path:
    return host.cache_dir("bench")



def build_helpers(cache: Path | None = None) -> dict[str, Path]:
    """Compile the producer and the libbpf consumers once per source version.

    Binaries are cached as `<name>-<hash of source, shared header and flags>`, so editing a
    .c file rebuilds it and nothing else; editing bench_common.h rebuilds them all.
    """
    gcc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        raise BenchSetupError(
            "gcc is not installed: `kernelscope bench` builds its C producer and libbpf "
            "consumers at run time. Install them with `apt-get install gcc libbpf-dev`."
        )
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}
    common = (SRC_DIR / "bench_common.h").read_bytes()
    for name, (src_name, libs, flags) in HELPERS.items():
        src = SRC_DIR / src_name
        text = src.read_bytes() + common
        key = hashlib.sha256(text + " ".join((*CFLAGS, *flags, *libs)).encode()).hexdigest()[:16]
        exe = cache / f"{name}-{key}"
        if not exe.exists():
            if "-lbpf" in libs and not LIBBPF_HEADER.exists():
                raise BenchSetupError(
                    f"libbpf's headers are missing ({LIBBPF_HEADER}): the bench's reference "
                    "consumers link against libbpf. Install them with `apt-get install libbpf-dev`."
                )
            tmp = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")
            cmd = [gcc, *CFLAGS, *flags, "-o", str(tmp), str(src), *libs]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                hint = (
                    " (is libbpf-dev installed? `apt-get install libbpf-dev`)"
                    if "bpf" in r.stderr
                    else ""
                )
                raise BenchSetupError(f"building {src_name} failed{hint}:\n{r.stderr.strip()}")
            os.replace(tmp, exe)
        built[name] = exe
    return built



def _send_go(proc: subprocess.Popen[bytes]) -> None:
    """Release a helper waiting on its stdin (one byte, then EOF)."""
    assert proc.stdin is not None
    proc.stdin.write(b"g")
    proc.stdin.close()
    proc.stdin = None  # so communicate() does not flush the closed pipe



class Producer:
    """The C producer, started paused so a program can be loaded with its pid first.

    `rate` > 0 paces it: `calls` calls evenly spaced at that many per second (spinning on
    CLOCK_MONOTONIC between calls), for latency at a known event rate.
    """

    def __init__(self, exe: Path, calls: int, cpu: int | None, rate: float = 0.0) -> None:
        self.calls = calls
        self.cpu = cpu  # pinned to it, or None
        self.proc = subprocess.Popen(
            [str(exe), str(calls), "0", str(-1 if cpu is None else cpu), repr(float(rate))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self) -> None:
        _send_go(self.proc)

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def finish(self, timeout: float = 300.0) -> tuple[int, int, int]:
        """Wait for the producer; returns (calls, t_start_ns, t_end_ns) on CLOCK_MONOTONIC."""
        out, _ = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"producer exited with status {self.proc.returncode}")
        calls, t0, t1 = (int(x) for x in out.split())
        return calls, t0, t1

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()



class Producers:
    """Several paused producers, one per CPU in `cpus` (MPSC runs), each making `calls` calls.

    The program filters on every pid (config.program's `targets`); `finish` adds their calls
    and spans from the first start to the last end, the group's own rate.
    """

    def __init__(self, exe: Path, calls: int, cpus: list[int | None], rate: float = 0.0) -> None:
        self.members: list[Producer] = []
        try:
            for cpu in cpus:
                self.members.append(Producer(exe, calls, cpu, rate))
        except BaseException:
            self.kill()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.members]

    def go(self) -> None:
        for p in self.members:
            p.go()

    def exited(self) -> bool:
        return all(p.exited() for p in self.members)

    def finish(self, timeout: float = 300.0) -> tuple[int, int, int]:
        """(calls of all, first t_start_ns, last t_end_ns) on CLOCK_MONOTONIC."""
        done = [p.finish(timeout) for p in self.members]
        return (sum(c for c, _, _ in done), min(t0 for _, t0, _ in done),
                max(t1 for _, _, t1 in done))

    def kill(self) -> None:
        for p in self.members:
            p.kill()

    def __enter__(self) -> Producers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
