"""probe.printk on real programs, both backends: each bpf_printk line one row, other programs'
lines kept out where their formats differ, overwrite loss counted exactly, the private tracefs
instance removed on stop/close and when its process died, and what an unprivileged user sees."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
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


@contextlib.contextmanager
def busy_child() -> Iterator[subprocess.Popen[bytes]]:
    """A child calling getppid() in a tight loop until the test ends: a program printing on each
    call makes lines faster than they are read (0.4-0.8 M/s against ~0.1 M/s)."""
    child = subprocess.Popen([sys.executable, "-c", "import os\nwhile True: os.getppid()"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def timed(fn: Callable[[], object], timeout: float) -> float:
    """Seconds `fn` took in a thread; fails (instead of hanging the run) past `timeout`."""
    done: list[float] = []
    t0 = time.monotonic()
    t = threading.Thread(target=lambda: (fn(), done.append(time.monotonic() - t0)), daemon=True)
    t.start()
    t.join(timeout)
    assert done, f"still running after {timeout} s"
    return done[0]


def ticks(p: Probe) -> int:
    return int(p.maps["ticks"].lookup(0, live=True))




@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_and_printk_return_while_the_program_prints_faster_than_it_is_read(backend: str) -> None:
    """The reader used to read until trace_pipe was empty while holding its lock: under this
    flood it seldom was, so p.printk waited seconds (measured 4.7-11.6 s), stop() 1.7 s, and
    nothing was parsed meanwhile; a faster printer would make both wait for ever.

    Bounds, from quantities of the same run (tracefs's default buffer, as a user gets):
    stop() of the flooded probe takes at most stop() of the same probe with an idle target
    (its instance removal and the probe's own work included) + one poll interval + the
    longest poll times (1 in flight when the event goes off + the polls that drain the
    buffer: its bytes on every CPU x 4, the text being at most 4x the binary entry (~110
    against ~44 bytes here), over the 1 MiB one poll reads), doubled: during the flooded stop
    both cores are busy with the child and the reader, not during the idle one. p.printk
    while flooded: at most 4x (the longest poll, as long as it may wait for the lock, + the
    time p.printk takes at rest on as many rows): it shares the GIL with the reader parsing."""
    idle = producers.paused(1)
    base = Probe(program(backend, "ks-idle"), cflags=idle.cflags, backend=backend, printk_kb=None).start()
    base_stop = timed(base.stop, 60)
    base.close()
    idle.go()
    with busy_child() as child:
        p = Probe(program(backend, "ks-busy"), cflags=[f"-DTARGET={child.pid}"], backend=backend,
                  printk_kb=None).start()
        opened = ticks(p)  # start() returned: the instance is enabled (the program ran since load)
        time.sleep(1.0)
        frames: list[object] = []
        busy_read = timed(lambda: frames.append(p.printk), 30)
        assert len(frames[0]) > 0  # lines are parsed while the flood goes on  # type: ignore[arg-type]
        before = ticks(p)
        stop = timed(p.stop, 60)
        after = ticks(p)
    st = p.stats["printk"]
    rest_read = timed(lambda: p.printk, 30)
    interval = printk.channel(p).interval  # type: ignore[union-attr]
    poll = st.get("poll_max_s", 0.0)  # (.get: the old reader, which has no such figure, fails on the times)
    drain_polls = -(-st["buffer_kb"] * 1024 * (os.cpu_count() or 1) * 4 // (1 << 20))
    assert stop <= 2 * (base_stop + interval + (1 + drain_polls) * poll), (stop, base_stop, poll, drain_polls)
    assert busy_read <= 4 * (poll + rest_read), (busy_read, rest_read, poll)
    # every line the instance took until the event went off is read or counted lost; it took
    # at least what was printed from start() returning to stop() called, at most all printed
    assert st["received"] + st["other"] + st["lost"] == st["taken"]
    assert st["other"] == 0
    assert st["lost"] > 0
    assert before - opened <= st["taken"] <= after, (opened, before, after)
    got = counters(p.printk, "ks-busy")
    assert got == sorted(set(got))  # in order, none twice
    p.close()
    assert my_instances() == []


TORN = 64


def test_stats_while_the_probe_starts_and_stops_50_times() -> None:
    """pause() used to add the instance's counts to the totals and only later (after removing
    it, 35-125 ms) forget the instance: a stats() meanwhile counted its lines twice, and one
    between the check and the use of `instance` raised AttributeError. A thread reads stats
    as the panel does, without pause; every sample must be whole: the kernel's counts never
    go down, and what was read or lost never exceeds what the buffers took.

    Tolerance: TORN = 64 lines. The kernel writes a CPU's stats file from separate counters
    (entries is computed apart from overrun and read), microseconds apart while the program
    prints ~0.5 lines/us, so a live sample is off by a few lines (seen: 1). A double count is
    a whole instance's lines, thousands here: the test checks the average per start is
    above 10 x TORN, so such a jump could not hide in the tolerance."""
    samples: list[dict[str, int]] = []
    errors: list[BaseException] = []
    done = threading.Event()
    with busy_child() as child:
        p = Probe(program("bcc", "ks-race"), cflags=[f"-DTARGET={child.pid}"], printk_kb=4)

        def hammer() -> None:
            while not done.is_set():
                try:
                    if "printk" in p.stats:
                        st = p.stats["printk"]
                        samples.append({k: st[k] for k in ("received", "other", "lost", "taken")})
                    display.counts(p)
                except BaseException as e:
                    errors.append(e)

        t = threading.Thread(target=hammer, daemon=True)
        t.start()
        try:
            for _ in range(50):
                p.start()
                time.sleep(0.02)
                p.stop()
        finally:
            done.set()
            t.join(10)
    assert errors == []
    assert len(samples) > 100
    final = p.stats["printk"]
    assert final["lost"] > 50 * 10 * TORN  # the flood overran the 4 KiB buffers
    for a, b in itertools.pairwise(samples):
        assert b["taken"] >= a["taken"] - TORN, (a, b)
        assert b["lost"] >= a["lost"] - TORN, (a, b)
    for s in samples:
        assert s["received"] + s["other"] + s["lost"] <= s["taken"] + TORN, s
    assert final["received"] + final["other"] + final["lost"] == final["taken"]
    p.close()


def test_max_rows_keeps_the_newest_printk_lines() -> None:
    n, keep = 500, 120
    prod = producers.paused(n)
    p = Probe(program("libbpf", "ks-cap"), cflags=prod.cflags, backend="libbpf", max_rows=keep).start()
    prod.go()
    p.stop()
    df = p.printk
    assert counters(df, "ks-cap") == list(range(n - keep, n))
    assert df.attrs["evicted"] == n - keep
    assert df.attrs["received"] == n
    assert df.attrs["stored"] == keep
    assert df.attrs["received"] + df.attrs["lost"] == df.attrs["taken"] == n
    p.close()
    assert Probe(program("bcc"), cflags=["-DTARGET=1"]).max_rows is None
    assert printk.Printk([]).max_lines == printk.DEFAULT_MAX_LINES  # without max_rows: 1,000,000


def saved_as_nobody(folder: str) -> dict[str, object]:
    """Run in a fresh process as uid 65534 with CAP_BPF + CAP_PERFMON and tracefs's group: the
    program loads and attaches, its printk instance cannot be made, save() still writes."""
    from kernelscope.errors import SetupError

    p = Probe(program("bcc", "ks-unpriv"), cflags=[f"-DTARGET={os.getpid()}"]).start()
    try:
        for _ in range(50):
            os.getppid()
        time.sleep(0.3)
        p.stop()
        raised = []
        for _ in range(3):
            try:
                p.printk  # noqa: B018 - raising is what is tested
            except SetupError as e:
                raised.append(e)
        again = replay(p.save(Path(folder) / "unpriv.parquet"), speed=None)
        return {"raised": [type(e).__name__ for e in raised], "messages": [str(e) for e in raised],
                "distinct": len({id(e) for e in raised}),
                "frames": [len(traceback.extract_tb(e.__traceback__)) for e in raised],
                "saved": len(again.printk), "error": again.printk.attrs.get("error"),
                "columns": list(again.printk.columns), "warnings": p.warnings}
    finally:
        p.close()


_AS_NOBODY = """
import dataclasses, json, sys
sys.path.insert(0, {tests!r})
import test_printk_kernel as t
from nobody import run_as_nobody
from kernelscope import host
out = run_as_nobody(lambda: t.saved_as_nobody({folder!r}), caps=(host.CAP_BPF, host.CAP_PERFMON),
                    timeout=120, groups=({group},))
print(json.dumps(dataclasses.asdict(out), default=str))
"""


@pytest.mark.skipif(not can_drop_privileges(), reason="becoming uid 65534 needs root")
def test_save_writes_the_capture_when_printk_could_not_be_read() -> None:
    """save() used to re-raise the setup error; now the printk frame is empty with attrs
    ["error"]. probe.printk raises a new copy each time: re-raising one object grew its
    traceback by a call's frames every time. In a new process, as test_unprivileged does."""
    import json

    from test_unprivileged import tracefs_readable_by_group

    group = 64_998  # a group id nothing on these machines uses (test_unprivileged has 64_999)
    with tempfile.TemporaryDirectory(prefix="ks-printk-") as folder:
        os.chmod(folder, 0o777)
        code = _AS_NOBODY.format(tests=str(Path(__file__).parent), folder=folder, group=group)
        with tracefs_readable_by_group(group):
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 timeout=180, check=False)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["error"] is None, out["traceback"]
    got = out["value"]
    assert len(got["raised"]) == 3
    assert got["raised"][0] in ("PrintkAccessError", "TracefsAccessError")
    assert len(set(got["raised"])) == len(set(got["messages"])) == 1  # same type, same message
    assert got["distinct"] == 3  # a new object each time
    assert len(set(got["frames"])) == 1  # whose traceback does not grow
    assert got["saved"] == 0
    assert got["columns"] == printk.COLUMNS
    assert got["error"].startswith(got["raised"][0]), got["error"]
    assert any("bpf_printk output is not read" in w for w in got["warnings"])
