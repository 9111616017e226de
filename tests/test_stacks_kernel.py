"""Stacks with symbols on the running kernel, both backends: the sampling program (bpf/profile.bpf.c
and a BCC twin) and the off-CPU one (bpf/offcpu.bpf.c, a BCC twin on the sched_switch
tracepoint), run against stacks_target.c, a program built here with a known hot function
(burn, on a thread named "burner") and a known sleeping one (nap: 10 x 100 ms nanosleep,
timed by the program itself). The issue's acceptance: burn is in > 80 % of the burner's
samples; the off-CPU time of stacks through nap is the sleep the program measured, within 5 %.
Every probe is stopped while the target runs and read after it exited: the symbols come from
what stop() captured."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from stacks_target import Target, build

from kernelscope import Probe, sources, stacks
from kernelscope.captures.replay import replay
from kernelscope.errors import KernelscopeError

pytestmark = pytest.mark.kernel

BPF = sources.bpf_dir()
HZ = 199
NAPS, NAP_MS = 10, 100

PROFILE_BCC = r"""
#include <uapi/linux/bpf_perf_event.h>
struct key_t { u32 pid; u32 tid; int user_stack_id; int kern_stack_id; char comm[16]; };
BPF_STACK_TRACE(stacks, STACKS);
COUNTS(counts, struct key_t, u64, 16384);
int do_sample(struct bpf_perf_event_data *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    struct key_t key = {};
    key.pid = id >> 32;
    key.tid = (u32)id;
    if (key.tid == 0 || key.pid != TARG_TGID)
        return 0;
    bpf_get_current_comm(&key.comm, sizeof(key.comm));
    key.user_stack_id = stacks.get_stackid(ctx, BPF_F_USER_STACK);
    key.kern_stack_id = stacks.get_stackid(ctx, 0);
    /* BCC's increment() inserts a missing key only into a BPF_MAP_TYPE_HASH, not a per-CPU one */
    u64 one = 1, *n = counts.lookup(&key);
    if (n)
        __sync_fetch_and_add(n, 1);
    else
        counts.update(&key, &one);
    return 0;
}
"""

# BCC's struct offsets are those of the installed (older) headers: tracepoint args and helpers
# only (PLATFORM.md). At sched_switch `current` is still the task leaving the CPU.
OFFCPU_BCC = r"""
struct key_t { u32 pid; u32 tid; int user_stack_id; int kern_stack_id; char comm[16]; };
struct start_t { u64 ts; struct key_t key; };
struct offcpu_t { u64 ns; u64 switches; };
BPF_STACK_TRACE(stacks, 16384);
BPF_HASH(counts, struct key_t, struct offcpu_t, 16384);
BPF_HASH(starts, u32, struct start_t, 16384);
TRACEPOINT_PROBE(sched, sched_switch) {
    u64 id = bpf_get_current_pid_tgid(), now = bpf_ktime_get_ns();
    u32 tid = id;
    if (tid && (id >> 32) == TARG_TGID) {
        struct start_t st = {};
        st.ts = now;
        st.key.pid = id >> 32;
        st.key.tid = tid;
        bpf_get_current_comm(&st.key.comm, sizeof(st.key.comm));
        st.key.user_stack_id = stacks.get_stackid(args, BPF_F_USER_STACK);
        st.key.kern_stack_id = stacks.get_stackid(args, 0);
        starts.update(&tid, &st);
    }
    u32 next = args->next_pid;
    struct start_t *s = starts.lookup(&next);
    if (!s)
        return 0;
    struct offcpu_t zero = {}, *v = counts.lookup_or_try_init(&s->key, &zero);
    if (v) {
        __sync_fetch_and_add(&v->ns, now - s->ts);
        __sync_fetch_and_add(&v->switches, 1);
    }
    starts.delete(&next);
    return 0;
}
"""


def profile_probe(backend: str, pid: int, stack_slots: int = 16384, counts: str = "BPF_HASH") -> Probe:
    if backend == "bcc":
        src = (PROFILE_BCC.replace("TARG_TGID", str(pid)).replace("STACKS", str(stack_slots))
               .replace("COUNTS", counts))
        p = Probe(src)
    else:
        p = Probe.from_file(BPF / "profile.bpf.c", globals={"targ_tgid": pid},
                            map_sizes={"stacks": stack_slots})
    p.load()
    p.attach_perf_event("do_sample", event="cpu-clock", freq=HZ)
    return p


def offcpu_probe(backend: str, pid: int) -> Probe:
    if backend == "bcc":
        return Probe(OFFCPU_BCC.replace("TARG_TGID", str(pid)))
    return Probe.from_file(BPF / "offcpu.bpf.c", globals={"targ_tgid": pid})


@dataclass
class Run:
    target: Target
    profile: Probe
    offcpu: Probe


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("stacks") / "stacks_target", pie=True)


@pytest.fixture(scope="module", params=["libbpf", "bcc"])
def run(request: pytest.FixtureRequest, binary: Path) -> Iterator[Run]:
    """Both probes on one run of the target; stopped while it lives, then it exits."""
    t = Target.start(binary, NAPS, NAP_MS)
    prof = profile_probe(request.param, t.pid).start()
    off = offcpu_probe(request.param, t.pid).start()
    try:
        t.go()
        prof.stop()
        off.stop()
    finally:
        t.exit()
    assert not Path(f"/proc/{t.pid}").exists()
    yield Run(t, prof, off)
    prof.close()
    off.close()


def contains(name: str) -> Any:
    return lambda stack: name in stack


def test_sampling_puts_burn_in_most_of_the_burner_threads_samples(run: Run) -> None:
    df = run.profile.stacks("counts", "stacks")
    assert {"pid", "tid", "comm", "stack", "user_stack", "kernel_stack", "count"} <= set(df.columns)
    burner = df[df["tid"] == run.target.result["burner"]]
    samples = int(burner["count"].sum())
    with_burn = int(burner.loc[burner["stack"].map(contains("burn")), "count"].sum())
    # the sampler sees the burner at most at the rate of the CPU time it got, and some of it
    cpu_s = run.target.result["burner_cpu_ns"] / 1e9  # CLOCK_THREAD_CPUTIME_ID, the program's own
    assert 10 <= samples <= 1.3 * HZ * cpu_s + 5, (samples, cpu_s)
    assert with_burn > 0.8 * samples, burner[["stack", "count"]]
    # the thread is named "burner" by its first call; a sample in the microseconds before
    # that carries the process's name (seen once under load): samples in burn() carry its own
    in_burn = burner["user_stack"].map(lambda s: "burn" in s)  # the frame, not "burner"
    assert set(burner.loc[in_burn, "comm"]) == {"burner"}
    # root first: burn is the innermost function, its caller (the thread function) before it,
    # and mix, which the compiler inlined into burn (DWARF), after it where the tick hit mix's code
    inner = burner["user_stack"].map(lambda s: ("burner", "burn") in (s[-2:], s[-3:-1]))
    assert int(burner.loc[inner, "count"].sum()) > 0.8 * samples
    in_mix = burner["user_stack"].map(lambda s: s[-2:] == ("burn", "mix"))
    assert int(burner.loc[in_mix, "count"].sum()) > 0.5 * samples  # its loop is most of burn's time
    # a sample that interrupted user code has no kernel stack (-EFAULT): left out, counted
    user_mode = burner[burner["kern_stack_id"] == -errno.EFAULT]
    assert (user_mode["kernel_stack"] == ()).all()
    assert df.attrs["stack_errors"].get("kernel EFAULT", 0) >= len(user_mode)


def test_off_cpu_time_through_nap_is_the_sleep_the_program_measured(run: Run) -> None:
    df = run.offcpu.stacks("counts", "stacks")
    assert {"ns", "switches"} <= set(df.columns)
    napping = df[df["stack"].map(contains("nap"))]
    slept = run.target.result["slept_ns"]
    off = int(napping["ns"].sum())
    shown = df[["stack", "ns", "switches"]].to_string()
    assert abs(off - slept) <= 0.05 * slept, (off, slept, df.attrs, shown)
    # each nanosleep left the CPU once, in the kernel's nanosleep path, from nap
    asleep = napping[napping["kernel_stack"].map(contains("do_nanosleep"))]
    assert int(asleep["switches"].sum()) >= NAPS  # more when preempted on the way in (a busy host)
    assert all(s[-2:] == ("main", "nap") for s in asleep["user_stack"])
    # the stack is the user frames, then the kernel's
    row = asleep.iloc[0]
    assert row["stack"] == row["user_stack"] + row["kernel_stack"]
    # the program kept counting after stop() (the main thread's wait for stdin ended when the
    # target exited): the frame shows the maps as stop() found them
    live = stacks.read_raw(run.offcpu, "counts", "stacks", live=True)
    assert int(live.values["ns"].sum()) > int(df["ns"].sum())


def test_frames_long_form_puts_the_printed_address_of_burn_at_the_innermost_user_frame(run: Run) -> None:
    fr = stacks.frames(run.profile, "counts", "stacks")
    assert list(fr.columns) == ["stack_id", "pid", "depth", "address", "symbol", "module", "offset",
                                "kind", "inline"]
    burn = fr[(fr["symbol"] == "burn") & (fr["kind"] == "user")]
    assert len(burn) > 0
    assert set(burn["module"]) == {"stacks_target"}
    assert set((burn["address"] - burn["offset"].astype("uint64")).tolist()) == {run.target.addresses["burn"]}
    functions = fr[(fr["kind"] == "user") & ~fr["inline"]]
    innermost = functions.groupby(["stack_id", "pid"])["depth"].max()
    at_burn = burn.set_index(["stack_id", "pid"])["depth"]
    assert (at_burn == innermost.loc[at_burn.index]).all()
    # mix, inlined into burn: a frame of its own, one deeper, at the same address
    mix = fr[fr["inline"]]
    assert set(mix["symbol"]) == {"mix"}
    joined = mix.merge(burn, on=["stack_id", "pid", "address"], suffixes=("", "_burn"))
    assert len(joined) == len(mix) > 0
    assert (joined["depth"] == joined["depth_burn"] + 1).all()
    assert set(fr.loc[fr["kind"] == "kernel", "pid"]) <= {-1}


def test_a_closed_probe_still_shows_the_stacks_stop_kept(binary: Path) -> None:
    t = Target.start(binary, 3, 50)
    p = profile_probe("libbpf", t.pid).start()
    try:
        t.go()
        p.stop()
    finally:
        t.exit()
    before = p.stacks()
    p.close()
    after = p.stacks()
    pd.testing.assert_frame_equal(before, after)
    assert after["stack"].map(contains("burn")).any()


def test_per_cpu_counts_are_summed_over_cpus(binary: Path) -> None:
    """A BCC BPF_PERCPU_HASH counting map: one value per CPU, summed, the same samples."""
    t = Target.start(binary, 3, 100)
    p = profile_probe("bcc", t.pid, counts="BPF_PERCPU_HASH").start()
    try:
        result = t.go()
        p.stop()
    finally:
        t.exit()
    df = p.stacks()
    p.close()
    burner = df[df["tid"] == result["burner"]]
    samples = int(burner["count"].sum())
    cpu_s = result["burner_cpu_ns"] / 1e9
    assert 10 <= samples <= 1.3 * HZ * cpu_s + 5, (samples, cpu_s)
    assert int(burner.loc[burner["stack"].map(contains("burn")), "count"].sum()) > 0.8 * samples


def test_stack_ids_the_map_could_not_store_are_named_and_counted(binary: Path) -> None:
    """A stack-trace map of one slot: a second distinct stack collides, bpf_get_stackid says
    -EEXIST, and the frame shows [missing user stack] for it."""
    t = Target.start(binary, 3, 50)
    p = profile_probe("libbpf", t.pid, stack_slots=1).start()
    try:
        t.go()
        p.stop()
    finally:
        t.exit()
    df = p.stacks()
    p.close()
    lost = df[df["user_stack_id"] == -errno.EEXIST]
    assert len(lost) > 0, df[["user_stack_id", "count"]]
    assert (lost["user_stack"] == ("[missing user stack]",)).all()
    assert df.attrs["stack_errors"]["user EEXIST"] == len(lost)
    assert lost["stack"].map(contains("[missing user stack]")).all()


def test_bad_map_names_say_what_to_pass(binary: Path) -> None:
    t = Target.start(binary)
    p = offcpu_probe("libbpf", t.pid).start()
    try:
        with pytest.raises(KernelscopeError, match=r"no map 'nope'.*counts= and stacks="):
            p.stacks("nope", "stacks")
        with pytest.raises(KernelscopeError, match=r"'starts' is a hash map, not BPF_MAP_TYPE_STACK_TRACE"):
            p.stacks("counts", "starts")
        with pytest.raises(KernelscopeError, match=r"'stacks' is a stack_trace map"):
            p.stacks("stacks", "stacks")
        with pytest.raises(KernelscopeError, match=r"has no stack id field"):
            p.stacks("starts", "stacks")
    finally:
        p.close()
        t.exit()
    never = Probe.from_file(BPF / "offcpu.bpf.c")
    with pytest.raises(KernelscopeError, match="probe is not loaded"):
        stacks.stack_frame(never)


def test_the_flame_graph_carries_the_sleep_and_a_capture_replays_the_named_stacks(run: Run,
                                                                                   tmp_path: Path) -> None:
    """Probe.flamegraph draws the stacks frame (kernelscope.flame): the folded nap stacks carry
    the program's sleep. A capture keeps the stacks with their names, so a replay (no kernel, no
    target process, no ELF files) gives the same frame and the same flame graph."""
    fg = run.offcpu.flamegraph("counts", "stacks", value="ns")
    lines = [line.rsplit(" ", 1) for line in fg.folded().splitlines()]
    nap = sum(int(v) for stack, v in lines if ";nap;" in f";{stack};")
    slept = run.target.result["slept_ns"]
    assert abs(nap - slept) <= 0.05 * slept
    burn = run.profile.flamegraph().folded()
    assert ";burn" in burn
    path = run.offcpu.save(tmp_path / "offcpu.parquet")
    again = replay(path, speed=None)
    live, saved = run.offcpu.stacks("counts", "stacks"), again.stacks("counts", "stacks")
    assert saved["stack"].tolist() == live["stack"].tolist()
    assert saved["ns"].tolist() == live["ns"].tolist()
    assert saved.attrs["stack_errors"] == live.attrs["stack_errors"]
    assert again.flamegraph("counts", "stacks", value="ns").folded() == fg.folded()
    assert again.stacks("counts", "stacks", value="switches").columns[-1] == "switches"
    long = again.stacks("counts", "stacks")  # the long form too
    assert len(stacks.frames(again, "counts", "stacks")) == len(stacks.frames(run.offcpu, "counts", "stacks"))
    assert len(long) == len(live)
