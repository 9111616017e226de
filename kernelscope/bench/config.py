"""The bench's shared vocabulary: sizes, consumers, scenarios, the BPF program, a run's Config and Result."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

KIB = 1024
MIB = 1024 * KIB
PAGE = os.sysconf("SC_PAGE_SIZE")
EVENT_SIZE = 32
EVENT_FIELDS = ("ts", "pid", "cpu", "seq", "pad")
RING_RECORD = 40  # 8-byte ring header + 32-byte event (already 8-byte aligned)
PERF_RECORD = 48  # perf_event_header (8) + u32 raw size + 32 bytes, padded to 8

KINDS = ("ring", "perf")
CONSUMERS = ("bcc", "libbpf", "kernelscope")
NOBODY = "nobody"  # the undisturbed scenario's consumer: none
SCENARIOS = ("undisturbed", "live", "drain", "overflow", "latency")
# "kernelscope-wm": the Probe with a perf wakeup watermark of perf_watermark; "kernelscope-reader":
# the probe's reader alone in a drain (read() into arrays, as the C consumers copy into one)
KS_VARIANTS = ("kernelscope", "kernelscope-wm", "kernelscope-reader")
LABELS = {"bcc": "BCC Python", "libbpf": "libbpf C", "kernelscope": "kernelscope",
          "kernelscope-wm": "kernelscope wm", "kernelscope-reader": "kernelscope reader",
          NOBODY: "nobody reads"}

BUSY = 0.15  # share of the CPUs used by other work that makes a figure worth a warning


def program(kind: str, target: int | Sequence[int], pages: int, per_call: int = 1) -> str:
    """The bench's BPF C source for a ring (`pages` for the whole ring) or perf buffer: the
    notebooks' getppid program with the producers' pids as literals, so every consumer
    (BCC, libbpf, kernelscope) compiles the same text with no extra flags. One or two pids
    fill lab's TARGET/TARGET2; more replace its filter with one test per pid."""
    from ..lab import getppid_program

    targets = [target] if isinstance(target, int) else list(target)
    source = getppid_program("ring" if kind == "ring" else "perf", pages, per_call)
    if len(targets) > 2:
        needle = "(id >> 32) != TARGET && (id >> 32) != TARGET2"
        if needle not in source:
            raise RuntimeError("lab.getppid_program's pid filter changed: update bench.config.program")
        source = source.replace(needle, " && ".join(f"(id >> 32) != {t}" for t in targets))
    defines = [f"#define TARGET {targets[0]}"]
    defines += [f"#define TARGET2 {targets[1]}"] if len(targets) == 2 else []
    return "\n".join(defines) + "\n" + source


# --- configuration and results ------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    live_events: int = 3_000_000  # ring buffers
    # Perf buffers wake the consumer on every event (BCC's, libbpf's and the Probe's
    # default), which slows the producer itself 3-10x: fewer events keep the run short.
    live_perf_events: int = 1_000_000
    # Perf runs in the target rounds, undisturbed and kernelscope's: the host's speed here
    # swings by up to 2x over ~100 ms (a C spin loop's time, measured back to back: 35-79 ms),
    # and 1 M events at 16 per call took ~90 ms, so a run was one sample of that swing.
    target_perf_events: int = 3_000_000
    live_sizes: tuple[int, ...] = (64 * KIB, 1 * MIB, 4 * MIB)
    # Events per getppid() call in live runs: every live run at the first value; the live
    # ring of `target_size` (every consumer) and the undisturbed producer at each value.
    live_per_calls: tuple[int, ...] = (1, 16)
    target_size: int = 4 * MIB  # the live ring size the targets judge
    # The producer's speed on this project's VMs drifts by up to a third between runs of the
    # same work (another guest's load on the host), for seconds at a time, idle guest or not.
    # So the runs the live target compares (the undisturbed producer, the target-size live
    # ring, every consumer) are made in this many interleaved rounds; the fastest is kept.
    target_rounds: int = 5
    drain_ring_size: int = 64 * MIB
    drain_perf_size: int = 16 * MIB  # per CPU
    drain_per_call: int = 16  # filling speed does not matter for a drain
    drain_fill: float = 1.05  # make this many times what the buffer holds: it ends full
    # Perf buffers report losses (PERF_RECORD_LOST) only with the next sample that fits,
    # so a drain after the producer stopped shows none: a tiny buffer overrun live does.
    overflow_size: int = 8 * KIB  # per CPU
    overflow_events: int = 320_000
    overflow_per_call: int = 16
    overflow_consumers: tuple[str, ...] = CONSUMERS
    # Also run kernelscope's perf reader with watermark_bytes = this share of the per-CPU
    # buffer (None: skip); BCC and libbpf use their defaults, a wakeup per event. Skipped by
    # default: the Probe's own default is a watermark at a quarter of the buffer.
    perf_watermark: float | None = None
    kinds: tuple[str, ...] = KINDS
    consumers: tuple[str, ...] = CONSUMERS
    producer_cpu: int | None = None
    consumer_cpu: int | None = None
    poll_interval: float = 0.01
    send_samples: int = 1_000_000  # user ring buffer writes (SEND section); 0 skips it
    # MPSC: one producer on each of these CPUs (None: unpinned), live and undisturbed, ring and
    # perf, at each live_per_calls value, in the target rounds; () skips MPSC
    mpsc_cpus: tuple[int | None, ...] = ()
    mpsc_per_calls: tuple[int, ...] | None = None  # None: live_per_calls
    # LATENCY: a producer paced at each rate (events/s, one per call) for latency_seconds,
    # kernelscope with Probe defaults; arrival - event ts per event
    latency_rates: tuple[int, ...] = (1_000, 100_000, 1_000_000)
    latency_seconds: float = 1.0
    # DF: FrameStore alone, fed synthetic batches: frame() after df_new_rows new rows with
    # each of df_rows stored (`--df` adds 100 M); () skips it
    df_rows: tuple[int, ...] = (1_000_000, 10_000_000)
    df_new_rows: int = 100_000
    quick: bool = False


def quick_config(**kw: Any) -> Config:
    """About 20 s on an idle machine: 4 MiB live runs, small drains, kernelscope's overflow,
    short latency runs, the store at 1 M rows."""
    base: dict[str, Any] = {
        "live_events": 400_000,
        "live_perf_events": 100_000,
        "target_perf_events": 100_000,
        "live_sizes": (4 * MIB,),
        "drain_ring_size": 4 * MIB,
        "drain_perf_size": 2 * MIB,
        "overflow_events": 100_000,
        "overflow_consumers": ("kernelscope",),
        "perf_watermark": None,
        "target_rounds": 1,
        "send_samples": 100_000,
        "latency_seconds": 0.25,
        "latency_rates": (1_000, 1_000_000),
        "mpsc_per_calls": (1,),
        "df_rows": (1_000_000,),
        "quick": True,
    }
    base.update(kw)
    return Config(**base)


@dataclass
class Result:
    scenario: str  # one of SCENARIOS
    kind: str  # "ring" or "perf"
    consumer: str  # one of CONSUMERS, a KS_VARIANT, or NOBODY (undisturbed)
    size: int  # ring: bytes of the whole ring; perf: bytes per CPU
    events: int  # planned: the producer makes events // per_call calls
    per_call: int  # events the program emits per getppid() call
    made: int = 0  # events the program tried to emit (exact: calls * per call)
    received: int = 0  # undisturbed: records in the ring (outputs that succeeded)
    # live: producer start to last event received; drain: the drain; undisturbed: the producer's
    seconds: float = 0.0
    producer_seconds: float = 0.0
    lost_reported: int | None = None  # what the consumer itself says it lost, if it can
    producers: int = 1  # > 1: MPSC, one producer per CPU, `events` split between them
    pace: float = 0.0  # > 0: the producer is paced at this many calls per second (latency)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return self.made - self.received

    @property
    def dropped_pct(self) -> float:
        return 100.0 * self.dropped / self.made if self.made else 0.0

    @property
    def rate(self) -> float:
        """Events received per second."""
        return self.received / self.seconds if self.seconds > 0 else 0.0

    @property
    def producer_rate(self) -> float:
        return self.made / self.producer_seconds if self.producer_seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            dropped=self.dropped,
            dropped_pct=round(self.dropped_pct, 3),
            events_per_s=round(self.rate, 1),
            producer_events_per_s=round(self.producer_rate, 1),
        )
        return d


def live_size(target_size: int, kind: str, producers: int) -> int:
    """The buffer a live target run uses: `target_size` per CPU for perf, and for the one
    shared ring `target_size` per producer, so each producer has the room it has alone
    (rounded up to a power of two, as a ring's size must be)."""
    if kind != "ring" or producers <= 1:
        return target_size
    return 1 << (target_size * producers - 1).bit_length()


def fmt_size(n: int) -> str:
    if n >= MIB and n % MIB == 0:
        return f"{n // MIB} MiB"
    return f"{n // KIB} KiB"


def _describe(res: Result) -> str:
    per_cpu = "/CPU" if res.kind == "perf" else ""
    per_call = f", {res.per_call} per call" if res.scenario in ("undisturbed", "live") else ""
    mpsc = f" MPSC x{res.producers}" if res.producers > 1 else ""
    pace = f" paced at {res.pace:,.0f}/s" if res.pace else ""
    return (f"{res.scenario}{mpsc} {res.kind} {fmt_size(res.size)}{per_cpu} {LABELS[res.consumer]}"
            f"{per_call}{pace}")


def parse_size(text: str) -> int:
    """'64K', '4M', '4MiB', '65536' -> bytes; must be a power-of-two number of pages."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 64K, 4M)")
    n = int(m.group(1)) * {"": 1, "k": KIB, "m": MIB, "g": 1024 * MIB}[m.group(2).lower()]
    pages = n // PAGE
    if n % PAGE or pages <= 0 or pages & (pages - 1):
        raise ValueError(f"{text}: must be a power-of-two number of {PAGE}-byte pages")
    return n

