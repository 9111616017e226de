"""The DF section: FrameStore alone (no kernel), fed synthetic batches of the bench's event.

What `df` costs as a store grows: `frame()` after N new rows with M rows stored (O(N) if the
converted columns are cached and extended, O(M) if rebuilt), and memory per stored event
(`memory_bytes / len`). Only the store's public API is used: FrameStore(schema),
append(Batch(records), arrival_ns), frame(), len(), memory_bytes.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

GROWTH_STEPS = 8  # frame() after each of this many batches of new rows: median and max
BATCH_ROWS = 1 << 16  # rows per appended batch: what one drain read brings at a high rate
MEM_SHARE = 0.5  # of MemAvailable the section may fill; beyond it the sizes are scaled down
EVENT_DTYPE = np.dtype([("ts", "<u8"), ("pid", "<u4"), ("cpu", "<u4"), ("seq", "<u8"),
                        ("pad", "<u8")])  # the bench program's struct event, 32 bytes


@dataclass
class DfResult:
    rows: int  # stored before the new rows
    new_rows: int
    first_frame_s: float = 0.0  # frame() of all `rows`, nothing cached yet
    frame_s: float = 0.0  # frame() after `new_rows` more (the cached part reused): median of the steps
    frame_max_s: float = 0.0  # the slowest step (the first growth copies view columns once)
    bytes_per_event: float = 0.0  # memory_bytes / len after the frames
    append_s: float = 0.0  # appending the `rows`
    note: str = ""
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, bytes (0 if unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _batch(seq0: int, n: int, ts0: int) -> Any:
    from ..readers.batch import Batch

    rec = np.zeros(n, EVENT_DTYPE)
    seq = np.arange(seq0, seq0 + n, dtype=np.uint64)
    rec["seq"] = seq
    rec["ts"] = ts0 + seq * 100  # an event every 100 ns
    rec["pid"] = 4242
    rec["cpu"] = seq & 1
    return Batch(rec)


def _fill(store: Any, rows: int, seq0: int, ts0: int) -> int:
    done = 0
    while done < rows:
        n = min(BATCH_ROWS, rows - done)
        store.append(_batch(seq0 + done, n, ts0), time.monotonic_ns())
        done += n
    return seq0 + done


def measure(rows: int, new_rows: int) -> DfResult:
    """One store of `rows` synthetic events: cold frame(), then GROWTH_STEPS times `new_rows`
    more and frame(). The first frame of a drained store views the stored records; the first
    growth copies those columns into buffers that then grow by doubling (each row copied O(1)
    times overall), so one step may cost O(stored) and the median is O(new rows)."""
    from ..schema import Schema
    from ..store import FrameStore

    res = DfResult(rows, new_rows)
    store = FrameStore(Schema(EVENT_DTYPE))
    ts0 = time.monotonic_ns()
    t = time.perf_counter()
    seq = _fill(store, rows, 0, ts0)
    res.append_s = time.perf_counter() - t
    t = time.perf_counter()
    df = store.frame()
    res.first_frame_s = time.perf_counter() - t
    del df
    steps = []
    for _ in range(GROWTH_STEPS):
        seq = _fill(store, new_rows, seq, ts0)
        t = time.perf_counter()
        df = store.frame()
        steps.append(time.perf_counter() - t)
        del df
    df = store.frame()
    res.frame_s = float(np.median(steps))
    res.frame_max_s = max(steps)
    res.extra["frame_steps_ms"] = [round(x * 1e3, 2) for x in steps]
    total = rows + GROWTH_STEPS * new_rows
    if len(df) != total or len(store) != total:
        res.error = f"frame has {len(df):,} rows, store {len(store):,}, expected {total:,}"
    res.bytes_per_event = store.memory_bytes / len(store) if len(store) else 0.0
    del df, store
    gc.collect()
    return res


def run(sizes: Sequence[int], new_rows: int, progress: Callable[[str], None]) -> list[DfResult]:
    """`measure` at each size, smallest first; a size whose estimated memory (from the
    smaller stores' bytes per event, times 2 for the frame's transient copies) exceeds
    MEM_SHARE of MemAvailable is scaled down, and says so."""
    from .. import spill

    out: list[DfResult] = []
    per_event = 200.0  # a guess until the first store says
    budget = spill.memory_budget()
    avail = mem_available()
    for asked in sorted(sizes):
        rows, note = asked, ""
        fits = int(avail * MEM_SHARE / (2 * per_event)) if avail else rows
        if asked > fits:
            note = (f"{asked:,} rows would need ~{asked * 2 * per_event / 1e9:.1f} GB, more than "
                    f"{MEM_SHARE:.0%} of MemAvailable ({avail / 1e9:.1f} GB): measured at {fits:,}")
            rows = fits
        # beyond the process-wide memory budget the store spills to disk: measure memory
        spill.set_memory_budget(max(budget, int(rows * per_event * 1.5)))
        progress(f"df: {rows:,} rows stored, then {new_rows:,} new, frame() each time")
        try:
            res = measure(rows, new_rows)
        except MemoryError as e:
            res = DfResult(rows, new_rows, error=f"MemoryError: {e}")
        finally:
            spill.set_memory_budget(None)
        res.note = note
        if not res.error and res.bytes_per_event:
            per_event = max(per_event / 4, res.bytes_per_event)
        out.append(res)
    return out


def report(results: Sequence[DfResult]) -> list[str]:
    if not results:
        return []
    lines = ["", "DF: the store alone (FrameStore, no kernel, no reader), fed synthetic batches of "
             f"{BATCH_ROWS:,} events of the bench's {EVENT_DTYPE.itemsize}-byte struct: frame() of "
             f"every stored row (cold), then frame() after each of {GROWTH_STEPS} batches of N new rows "
             "(median and slowest); bytes/event = memory_bytes / len at the end",
             f"  {'stored rows':>12} {'append s':>9} {'cold frame s':>13} {'new rows':>9} "
             f"{'frame() ms':>11} {'slowest ms':>11} {'bytes/event':>12}"]
    for r in results:
        if r.error:
            lines.append(f"  {r.rows:>12,} error: {r.error}")
            continue
        lines.append(f"  {r.rows:>12,} {r.append_s:>9.2f} {r.first_frame_s:>13.3f} {r.new_rows:>9,} "
                     f"{r.frame_s * 1e3:>11.1f} {r.frame_max_s * 1e3:>11.1f} {r.bytes_per_event:>12.1f}")
    lines += [f"  note: {r.note}" for r in results if r.note]
    return lines
