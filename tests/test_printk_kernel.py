"""probe.printk on real programs, both backends: each bpf_printk line one row, other programs'
lines kept out where their formats differ, overwrite loss counted exactly, the private tracefs
instance removed on stop/close and when its process died, and what an unprivileged user sees."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import producers
import pytest
from nobody import NOBODY, can_drop_privileges, run_as_nobody

from kernelscope import Probe, host, printk
from kernelscope.captures.replay import replay
from kernelscope.errors import SettingError
from kernelscope.jupyter import display
from kernelscope.jupyter.display import StatusLine
from kernelscope.probe import close_all

pytestmark = pytest.mark.kernel
BACKENDS = ["bcc", "libbpf"]


@pytest.fixture(autouse=True)
def _close_probes() -> Iterator[None]:
    """A failed test's probes would keep their instances until exit: close them."""
    yield
    close_all()

# one line per getppid() of the producer, numbered by a map counter
BCC = r"""
BPF_ARRAY(ticks, u64, 1);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
  u64 id = bpf_get_current_pid_tgid();
  if ((id >> 32) != TARGET) return 0;
  int zero = 0;
  u64 *n = ticks.lookup(&zero);
  if (!n) return 0;
  bpf_trace_printk("WORD %llu of %d\n", *n, (int)(id >> 32));
  (*n)++;
  return 0;
}
"""
CORE = r"""
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1);
         __type(key, __u32); __type(value, __u64); } ticks SEC(".maps");
SEC("tp/syscalls/sys_enter_getppid")
int tick(void *ctx) {
  __u64 id = bpf_get_current_pid_tgid();
  if ((id >> 32) != TARGET) return 0;
  __u32 zero = 0;
  __u64 *n = bpf_map_lookup_elem(&ticks, &zero);
  if (!n) return 0;
  bpf_printk("WORD %llu of %d", *n, (int)(id >> 32));
  (*n)++;
  return 0;
}
"""


def program(backend: str, word: str = "ks-tick") -> str:
    return (BCC if backend == "bcc" else CORE).replace("WORD", word)


def counters(df: object, word: str) -> list[int]:
    return [int(m.split()[1]) for m in df.message if m.startswith(word + " ")]  # type: ignore[attr-defined]


def my_instances() -> list[str]:
    mine = printk.folders.my_prefix(printk.PREFIX)
    return [d for d in os.listdir(host.TRACEFS / "instances") if d.startswith(mine)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_printk_is_one_row_with_the_printing_process(backend: str) -> None:
    n = 500
    prod = producers.paused(n)
    comm = Path(sys.executable).name[:15]  # the name the child was exec'd by, as the kernel keeps it
    p = Probe(program(backend), cflags=prod.cflags, backend=backend).start()
    before = time.time_ns()
    prod.go()
    after = time.time_ns()
    p.stop()
    df = p.printk
    assert len(df) == n
    assert list(df.message) == [f"ks-tick {i} of {prod.pid}" for i in range(n)]  # in the order printed
    assert (df.pid == prod.pid).all()
    assert (df.tid == prod.pid).all()
    assert (df.comm == comm).all()
    assert df.ts_ns.is_monotonic_increasing
    assert df.time.is_monotonic_increasing
    stamps = df.time.astype("int64")
    assert stamps.min() >= before - 1000
    assert stamps.max() <= after
    assert df.attrs["lost"] == 0
    assert df.attrs["other"] == 0
    assert p.stats["printk"]["received"] == n
    assert p.stats["printk"]["dropped"] == 0
    assert not any("nothing to drain" in w for w in p.warnings)  # printk alone is output enough
    with tempfile.TemporaryDirectory() as d:  # a capture keeps the lines: a replay shows them
        again = replay(p.save(Path(d) / "printk.parquet"), speed=None)
        assert again.printk["message"].tolist() == df["message"].tolist()
        assert again.printk["time"].tolist() == df["time"].tolist()
        assert again.printk.attrs["lost"] == 0
    p.close()


def test_another_programs_printk_stays_out_when_its_format_differs() -> None:
    n = 300
    prod = producers.paused(n)
    mine = Probe(program("bcc", "ks-mine"), cflags=prod.cflags).start()
    theirs = Probe(program("libbpf", "ks-theirs"), cflags=prod.cflags).start()
    prod.go()
    mine.stop()
    theirs.stop()
    assert counters(mine.printk, "ks-mine") == list(range(n))
    assert len(mine.printk) == n  # the kernel glob kept "ks-theirs ..." out of mine's buffer
    assert counters(theirs.printk, "ks-theirs") == list(range(n))
    assert len(theirs.printk) == n
    mine.close()
    theirs.close()


def test_a_tool_draining_the_shared_trace_pipe_takes_nothing_from_the_probe(
        wait_for: Callable[..., object]) -> None:
    """The kernel also writes the lines to the top-level buffer (it enables the event there when
    a printing program loads); `cat trace_pipe` consumes those, not the probe's instance."""
    n = 300
    prod = producers.paused(n)
    p = Probe(program("bcc", "ks-shared"), cflags=prod.cflags).start()
    shared = os.open(host.TRACEFS / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
    seen = []
    try:
        prod.go()
        wait_for(lambda: len(p.printk) == n)
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(shared, 1 << 16):
                seen.append(chunk.decode("utf-8", "replace"))
    finally:
        os.close(shared)
    p.stop()
    assert sum(c.count("ks-shared ") for c in seen) > 0  # the tool read (some of) the shared copies
    assert counters(p.printk, "ks-shared") == list(range(n))
    p.close()


def test_the_same_format_from_another_program_cannot_be_told_apart() -> None:
    """The line has no program id (documented): equal formats, or a format passed by name,
    bring other programs' lines in; `pid` tells the processes apart."""
    n = 200
    prod, other = producers.paused(n), producers.paused(n)
    mine = Probe(program("bcc", "ks-same"), cflags=prod.cflags).start()
    twin = Probe(program("libbpf", "ks-same"), cflags=other.cflags).start()
    by_name = Probe(program("libbpf", "ks-byname").replace(
        'bpf_printk("ks-byname %llu of %d", *n, (int)(id >> 32));',
        'static const char fmt[] = "ks-byname %llu of %d";'
        ' bpf_trace_printk(fmt, sizeof(fmt), *n, (int)(id >> 32));'),
        cflags=prod.cflags).start()
    prod.go()
    other.go()
    for p in (mine, twin, by_name):
        p.stop()
    df = mine.printk
    assert len(df) == 2 * n
    assert counters(df[df.pid == prod.pid], "ks-same") == list(range(n))
    assert counters(df[df.pid == other.pid], "ks-same") == list(range(n))
    everything = by_name.printk
    assert everything.attrs["filter"].startswith("none")
    assert counters(everything, "ks-byname") == list(range(n))
    assert (everything.message.str.startswith("ks-same ")).sum() == 2 * n  # all lines, any program's
    for p in (mine, twin, by_name):
        p.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flood_into_a_tiny_buffer_counts_every_line_lost(backend: str) -> None:
    """Every line the instance's buffer takes is read, or counted in per_cpu stats as overrun
    (overwritten unread): received + lost is exactly what the program printed."""
    n = 200_000
    prod = producers.paused(n)
    p = Probe(program(backend, "ks-flood"), cflags=prod.cflags, backend=backend, printk_kb=4).start()
    assert p.stats["printk"]["buffer_kb"] < 64  # the kernel rounds 4 up to whole pages
    prod.go()
    p.stop()
    df = p.printk
    lost = df.attrs["lost"]
    assert lost > 0
    assert len(df) + lost == n
    assert df.attrs["taken"] == n
    assert p.stats["printk"]["dropped"] == lost
    got = counters(df, "ks-flood")
    assert len(got) == len(df)
    assert len(set(got)) == len(got)
    assert got == sorted(got)
    assert max(got) < n
    p.close()


def test_the_instance_lives_from_start_to_stop_and_close_removes_it(wait_for: Callable[..., object]) -> None:
    prod = producers.paused(10)
    p = Probe(program("bcc"), cflags=prod.cflags)
    assert "printk" not in p.stats
    assert my_instances() == []
    p.start()
    first = Path(p.stats["printk"]["instance"])
    assert first.is_dir()
    assert (first / printk.EVENT / "enable").read_text().strip() == "1"
    p.stop()
    assert not first.exists()
    p.start()
    second = Path(p.stats["printk"]["instance"])
    assert second.is_dir()
    assert second != first
    prod.go()
    wait_for(lambda: len(p.printk) == 10)
    status = StatusLine(p, "p")
    assert "| 10 printk lines" in status.text(display.counts(p))  # the %%bpf status line says so
    p.close()
    assert my_instances() == []
    assert len(p.printk) == 10  # frames stay readable after close


def test_a_program_that_prints_nothing_makes_no_instance() -> None:
    p = Probe(producers.ring_program(), cflags=["-DTARGET=1"]).start()
    assert my_instances() == []
    assert "printk" not in p.stats
    assert len(p.printk) == 0
    assert list(p.printk.columns) == printk.COLUMNS
    p.close()


def test_an_instance_left_by_a_killed_process_is_removed_by_the_next_one() -> None:
    code = "from kernelscope import printk; i = printk.Instance(); print(i.path, flush=True); input()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    orphan = Path(child.stdout.readline().strip())
    assert orphan.is_dir()
    assert orphan not in printk.remove_orphans()  # its process still runs: kept
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert orphan.is_dir()
    mine = printk.Instance()  # the next one made sweeps
    try:
        assert not orphan.exists()
    finally:
        mine.remove()
    assert not mine.path.exists()


def test_a_bad_buffer_size_is_refused_when_the_probe_is_made() -> None:
    with pytest.raises(SettingError, match="printk_kb"):
        Probe(program("bcc"), cflags=["-DTARGET=1"], printk_kb=0)


@pytest.mark.skipif(not can_drop_privileges(), reason="becoming uid 65534 needs root")
def test_unprivileged_users_get_a_clear_error() -> None:
    """tracefs is mounted root-only: a user with CAP_BPF and CAP_PERFMON is told so; where
    tracefs is readable, making an instance still needs root (a folder like instances/)."""
    out = run_as_nobody(printk.Instance, caps=(host.CAP_BPF, host.CAP_PERFMON))
    assert out.error == "TracefsAccessError", out.traceback
    assert "PermissionError" in out.classes
    assert f"not readable by uid {NOBODY}" in out.message
    fake = Path(tempfile.mkdtemp())
    try:
        fake.chmod(0o755)
        (fake / "instances").mkdir(mode=0o755)
        out = run_as_nobody(lambda: printk.Instance(fake))
        assert out.error == "PrintkAccessError", out.traceback
        assert {"SetupError", "PermissionError"} <= set(out.classes)
        assert "making instances needs root" in out.message
        assert f"uid {NOBODY}" in out.message
    finally:
        (fake / "instances").rmdir()
        fake.rmdir()


def test_lines_carry_over_a_reload(wait_for: Callable[..., object]) -> None:
    """reconfigure() stops the old program (its instance removed) and starts the new one with a
    new instance; the frame keeps growing, beside the events of the same program."""
    first, second = producers.paused(100), producers.paused(50)
    src = producers.ring_program().replace(
        "events.ringbuf_output(&e, sizeof(e), 0);",
        'events.ringbuf_output(&e, sizeof(e), 0); bpf_trace_printk("ks-reload %d\\n", e.pid);').replace(
        "if ((id >> 32) != TARGET)", f"if ((id >> 32) != TARGET && (id >> 32) != {second.pid})")
    p = Probe(src, cflags=first.cflags).start()
    before = p.stats["printk"]["instance"]
    first.go()
    wait_for(lambda: len(p.printk) == 100)
    p.reconfigure(pages=128)
    assert p.stats["printk"]["instance"] != before
    assert not Path(before).exists()
    second.go()
    p.stop()
    assert p.printk.pid.value_counts().to_dict() == {first.pid: 100, second.pid: 50}
    assert p.df.pid.value_counts().to_dict() == {first.pid: 100, second.pid: 50}
    p.close()
