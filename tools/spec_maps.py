"""Specs of the map tools (histograms, counts, stacks) and memleak: the maps are read with
`bpftool map dump` and compared with /proc, /sys and the trigger's own counts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import ground
from spec_base import LIBC, STACK_DEPTH_BYTES, Attach, Opts, Run, near

# --- scheduler histograms ----------------------------------------------------------------

# A sleeper that prints how often it left the CPU meanwhile (voluntary + nonvoluntary
# switches of its one thread, /proc/self/status): the scheduler's own count of its switch-ins
# to come, one run-queue wait each.
SLEEPER = """
import time
def switches():
    return sum(int(line.split()[1]) for line in open('/proc/self/status') if 'ctxt_switches' in line)
n0 = switches()
for _ in range({n}):
    time.sleep(0.002)
print(switches() - n0)
"""


def tp_btf_or_raw(names: list[str], btf_names: list[str], event: str) -> list[str]:
    """The loaders' `probe_tp_btf(event)` choice: skip the raw_tp programs when tp_btf works."""
    return names if ground.btf_has(event) else btf_names


def runqlat_opts(run: Run) -> Opts:
    # libbpf-tools/runqlat.c, as `runqlat -p PID`: targ_tgid = env.pid; targ_per_process/
    # per_thread/per_pidns/ms = false, filter_cg = false; with tp_btf the handle_sched_*
    # (raw_tp) programs are disabled.
    skip = tp_btf_or_raw(["handle_sched_wakeup", "handle_sched_wakeup_new", "handle_sched_switch"],
                         ["sched_wakeup", "sched_wakeup_new", "sched_switch"], "sched_wakeup")
    child = run.spawn(SLEEPER.format(n=200), "ks-sleep")
    return Opts(skip=skip, globals={"targ_per_process": False, "targ_per_thread": False,
                                    "targ_per_pidns": False, "targ_ms": False, "targ_tgid": child.pid,
                                    "filter_cg": False}, note="-p <sleeper pid>")


def runqlat_run(run: Run) -> tuple[bool, str]:
    switched = int(ground.go(run.children[0]))
    time.sleep(0.2)
    got = ground.total(ground.dump("hists"), "slots")
    # one sample per switch-in after a wakeup or a preemption (plus the exit's few)
    return near(got, switched, "run-queue samples of the sleeper (200 sleeps) vs its context switches",
                0.9, 1.15)


def runqslower_opts(run: Run) -> Opts:
    # libbpf-tools/runqslower.c, as `runqslower -p PID 0`: targ_tgid = env.pid, targ_pid = 0,
    # filter_comm = false; min_us is the positional argument (default 10000; 0 = every wakeup);
    # with tp_btf the handle_sched_* (raw_tp) programs are disabled.
    skip = tp_btf_or_raw(["handle_sched_wakeup", "handle_sched_wakeup_new", "handle_sched_switch"],
                         ["sched_wakeup", "sched_wakeup_new", "sched_switch"], "sched_wakeup")
    child = run.spawn(SLEEPER.format(n=100), "ks-sleep")
    return Opts(skip=skip, globals={"targ_tgid": child.pid, "targ_pid": 0, "min_us": 0},
                note="as `runqslower -p <sleeper pid> 0`")


def runqslower_run(run: Run) -> tuple[bool, str]:
    pid = run.children[0].pid
    switched = int(ground.go(run.children[0]))
    rows = run.rows(lambda d: d["pid"] == pid, switched)
    # one row per switch-in after a wakeup or a preemption
    return near(len(rows), switched, f"rows with pid {pid} (100 sleeps) vs its context switches", 0.9, 1.15)


PREEMPTED = """
import os, time
os.sched_setaffinity(0, {0})
def nvcsw():
    for line in open('/proc/self/status'):
        if line.startswith('nonvoluntary_ctxt_switches'):
            return int(line.split()[1])
n0 = nvcsw()
t = time.monotonic()
while time.monotonic() - t < 1.0:
    pass
print(nvcsw() - n0)
"""
HOG = ("import os, time\nos.sched_setaffinity(0, {0})\n"
       "t = time.monotonic()\nwhile time.monotonic() - t < 1.5: pass")


def cpudist_opts(run: Run) -> Opts:
    # libbpf-tools/cpudist.c, as `cpudist -p PID` (env.pid defaults to -1, all tasks):
    # targ_tgid = env.pid; sched_switch_tp disabled when tp_btf works (else sched_switch_btf);
    # filter_cg/per_process/per_thread/ms/offcpu = false;
    # set_max_entries(start, pid_max), set_max_entries(hists, 1) (not per process/thread).
    skip = ["sched_switch_tp"] if ground.btf_has("sched_switch") else ["sched_switch_btf"]
    child = run.spawn(PREEMPTED, "ks-cpu")
    return Opts(skip=skip, globals={"filter_cg": False, "targ_per_process": False, "targ_per_thread": False,
                                    "targ_ms": False, "targ_offcpu": False, "targ_tgid": child.pid},
                map_sizes={"start": ground.pid_max(), "hists": 1}, note="-p <busy pid>")


def cpudist_run(run: Run) -> tuple[bool, str]:
    run.spawn(HOG, "ks-hog", wait=False)
    preempted = int(ground.go(run.children[0]))
    time.sleep(0.2)
    got = ground.total(ground.dump("hists"), "slots")
    # cpudist counts an on-CPU period when its task is switched out still runnable: a preemption
    return near(got, preempted, "on-CPU periods vs the child's nonvoluntary_ctxt_switches (CPU 0 shared "
                "with a hog)", 0.8, 1.25)


def softirqs_opts(run: Run) -> Opts:
    # libbpf-tools/softirqs.c: with tp_btf softirq_entry/softirq_exit (raw_tp) are disabled;
    # targ_dist = false, targ_ns = false, targ_cpu = -1.
    skip = tp_btf_or_raw(["softirq_entry", "softirq_exit"], ["softirq_entry_btf", "softirq_exit_btf"],
                         "softirq_entry")
    return Opts(skip=skip, globals={"targ_dist": False, "targ_ns": False, "targ_cpu": -1})


def softirqs_run(run: Run) -> tuple[bool, str]:
    before = ground.softirqs()
    m0 = ground.total(ground.dump(".bss"), "counts")
    ground.tcp_exchange(100000)
    time.sleep(1.0)
    m1 = ground.total(ground.dump(".bss"), "counts")
    want = sum(ground.delta(before, ground.softirqs()).values())
    return near(m1 - m0, want, "softirqs counted vs /proc/softirqs")


def hardirqs_opts(run: Run) -> Opts:
    # libbpf-tools/hardirqs.c: with tp_btf irq_handler_entry/exit (raw_tp) are disabled;
    # filter_cg = false, cpu = false, targ_cpu = -1, targ_dist = false, targ_ns = false.
    skip = tp_btf_or_raw(["irq_handler_entry", "irq_handler_exit"],
                         ["irq_handler_entry_btf", "irq_handler_exit_btf"], "irq_handler_entry")
    return Opts(skip=skip, globals={"filter_cg": False, "cpu": False, "targ_cpu": -1,
                                    "targ_dist": False, "targ_ns": False})


def hardirqs_run(run: Run) -> tuple[bool, str]:
    before = ground.hardirqs()
    m0 = ground.total(ground.dump("infos"), "count")
    with open("/var/tmp/kscheck-irq", "wb") as f:  # disk and timer interrupts
        for _ in range(20):
            f.write(os.urandom(65536))
            f.flush()
            os.fsync(f.fileno())
    os.unlink("/var/tmp/kscheck-irq")
    time.sleep(1.0)
    m1 = ground.total(ground.dump("infos"), "count")
    want = sum(ground.delta(before, ground.hardirqs()).values())
    return near(m1 - m0, want, "hard irqs counted vs numbered lines of /proc/interrupts", 0.7, 1.3)


def syscount_opts(run: Run) -> Opts:
    # libbpf-tools/syscount.c: no globals by default (filter_pid etc. only with flags); it
    # attaches sys_exit always and sys_enter only with -L (latency): attach sys_exit alone.
    return Opts(programs=["sys_exit"])


def syscount_run(run: Run) -> tuple[bool, str]:
    n = 1000
    ground.run(f"import os\nfor _ in range({n}): os.getpriority(os.PRIO_PROCESS, 0)", "ks-sysc")
    nr = 140  # x86_64 getpriority
    got = sum(int(e["value"]["count"]) for e in ground.dump("data") if int(e["key"]) == nr)
    return n <= got < 2 * n, f"getpriority (nr {nr}) counted {got}, trigger made {n} (want [{n}, {2 * n}))"


def biolatency_opts(run: Run) -> Opts:
    # libbpf-tools/biolatency.c: targ_per_disk/per_flag/ms/queued = false, filter_cg = false,
    # targ_single = has_block_rq_issue_single_arg() (one argument since 5.11); with tp_btf the
    # raw_tp programs are disabled, and without -Q block_rq_insert_btf too.
    if ground.btf_has("block_rq_insert"):
        skip = ["block_rq_insert", "block_rq_issue", "block_rq_complete", "block_rq_insert_btf"]
    else:
        skip = ["block_rq_insert_btf", "block_rq_issue_btf", "block_rq_complete_btf", "block_rq_insert"]
    return Opts(skip=skip, globals={"targ_per_disk": False, "targ_per_flag": False, "targ_ms": False,
                                    "targ_queued": False, "filter_cg": False, "targ_single": True})


def disk_writes(comm: str) -> None:
    ground.run("import os\nf = open('/var/tmp/kscheck-bio', 'wb')\nfor _ in range(50):\n"
               "    f.write(os.urandom(16384)); f.flush(); os.fsync(f.fileno())\n"
               "f.close(); os.unlink('/var/tmp/kscheck-bio')", comm)


def biolatency_run(run: Run) -> tuple[bool, str]:
    devs = [d.name for d in Path("/sys/block").iterdir()]
    before = {d: ground.block_ios(d) for d in devs}
    disk_writes("ks-bio")
    time.sleep(0.5)
    got = ground.total(ground.dump("hists"), "slots")
    want = sum(ground.block_ios(d) - before[d] for d in devs)
    return near(got, want, "I/Os in the histogram vs /sys/block/*/stat completions", 0.7, 1.3)


def bitesize_opts(run: Run) -> Opts:
    # libbpf-tools/bitesize.c: targ_comm and targ_dev only with -c / -d; one tp_btf program.
    return Opts()


def bitesize_run(run: Run) -> tuple[bool, str]:
    devs = [d.name for d in Path("/sys/block").iterdir()]
    before = {d: ground.block_ios(d) for d in devs}
    disk_writes("ks-bite")
    time.sleep(0.5)
    hists = ground.dump("hists")
    want = sum(ground.block_ios(d) - before[d] for d in devs)
    mine = ground.total([e for e in hists if ground.cstr(e["key"]["comm"]) == "ks-bite"], "slots")
    ok, text = near(ground.total(hists, "slots"), want, "I/Os issued (all comms) vs /sys/block/*/stat",
                    0.7, 1.3)
    return ok and mine >= 50, f"{text}; {mine} by comm ks-bite (50 fsync'd writes: want >= 50)"


# --- stacks, off-CPU ---------------------------------------------------------------------

def stack_note() -> str:
    return f"stackmap value size {STACK_DEPTH_BYTES} B set by the loader: kernelscope's default"


def offcputime_opts(run: Run) -> Opts:
    # libbpf-tools/offcputime.c: user/kernel_threads_only = false, state = -1, min_block_us = 1,
    # max_block_us = -1 (u64 max); set_value_size(stackmap, 127 * 8), set_max_entries(stackmap,
    # 1024); sched_switch (tp_btf) disabled without tp_btf, else sched_switch_raw.
    skip = ["sched_switch_raw"] if ground.btf_has("sched_switch") else ["sched_switch"]
    return Opts(skip=skip, globals={"user_threads_only": False, "kernel_threads_only": False, "state": -1,
                                    "min_block_us": 1, "max_block_us": 2**64 - 1},
                map_sizes={"stackmap": 1024}, note=stack_note())


def offcputime_run(run: Run) -> tuple[bool, str]:
    pid, _ = ground.run("import time\nfor _ in range(10): time.sleep(0.05)", "ks-offcpu")
    time.sleep(0.2)
    mine = [e for e in ground.dump("info") if int(e["key"]["tgid"]) == pid]
    us = ground.total(mine, "delta")
    return 500_000 <= us < 1_000_000, f"{us} us off CPU for tgid {pid}, which slept 10 x 50 ms (want 0.5-1 s)"


def wakeuptime_opts(run: Run) -> Opts:
    # libbpf-tools/wakeuptime.c: targ_pid = 0, min_block_ns = 1000, max_block_ns = -1 * 1000
    # (as u64), user_threads_only = false; set_value_size/set_max_entries(stackmap, 1024).
    return Opts(globals={"targ_pid": 0, "min_block_ns": 1000, "max_block_ns": (2**64 - 1) * 1000 % 2**64,
                         "user_threads_only": False},
                map_sizes={"stackmap": 1024}, note=stack_note())


def wakeuptime_run(run: Run) -> tuple[bool, str]:
    ground.run("import time\nfor _ in range(10): time.sleep(0.05)", "ks-wake")
    time.sleep(0.2)
    mine = [e for e in ground.dump("counts") if ground.cstr(e["key"]["target"]) == "ks-wake"]
    ns = sum(int(e["value"]) for e in mine)
    return 5e8 <= ns < 1e9, f"{ns / 1e6:.0f} ms blocked, target ks-wake (slept 10 x 50 ms; want 500-999)"


def futexctn_opts(run: Run) -> Opts:
    # libbpf-tools/futexctn.c: targ_pid/tid/lock = 0, targ_ms = false, targ_summary = false;
    # set_value_size/set_max_entries(stackmap, 1024).
    return Opts(globals={"targ_pid": 0, "targ_tid": 0, "targ_lock": 0, "targ_ms": False,
                         "targ_summary": False},
                map_sizes={"stackmap": 1024}, note=stack_note())


# futexctn counts FUTEX_WAIT only (futexctn.bpf.c masks the op with FUTEX_CMD_MASK); Python's
# own locks wait with FUTEX_WAIT_BITSET, so the trigger makes its waits with the syscall itself:
# the main thread waits on a word that a second thread sets and wakes 5 ms later, 20 times.
FUTEX = """
import ctypes, threading, time
libc = ctypes.CDLL(None, use_errno=True)
SYS_futex, WAIT, WAKE = 202, 0 | 128, 1 | 128  # x86_64; FUTEX_PRIVATE_FLAG
word = ctypes.c_int(0)
def wake():
    time.sleep(0.005)
    word.value = 1
    libc.syscall(SYS_futex, ctypes.byref(word), WAKE, 1, None)
print(ctypes.addressof(word), flush=True)
for _ in range(20):
    word.value = 0
    t = threading.Thread(target=wake); t.start()
    while word.value == 0:
        libc.syscall(SYS_futex, ctypes.byref(word), WAIT, 0, None)
    t.join()
"""


def futexctn_run(run: Run) -> tuple[bool, str]:
    pid, out = ground.run(FUTEX, "ks-futex")
    word = int(out.split()[0])  # the futex word's address: the interpreter's own waits use others
    time.sleep(0.2)
    mine = [e for e in ground.dump("hists")
            if int(e["key"]["pid_tgid"]) >> 32 == pid and int(e["key"]["uaddr"]) == word]
    n = ground.total(mine, "contended")
    return 1 <= n <= 20, (f"{n} contended waits on the word for tgid {pid} (20 FUTEX_WAITs, each "
                          f"woken by a thread unless the wake came first; want 1-20)")


def profile_opts(run: Run) -> Opts:
    # libbpf-tools/profile.c: user/kernel_stacks_only = false, include_idle = false,
    # set_max_entries(stackmap, 1024), value size 127 * 8; perf_event_open(PERF_TYPE_SOFTWARE,
    # PERF_COUNT_SW_CPU_CLOCK, freq = 1, sample_freq = 49) on every CPU, then
    # bpf_program__attach_perf_event(do_perf_event). (use_pidns is set only in a container.)
    return Opts(globals={"user_stacks_only": False, "kernel_stacks_only": False, "include_idle": False},
                map_sizes={"stackmap": 1024},
                attach=[Attach("attach_perf_event", ("do_perf_event",), {"event": "cpu-clock", "freq": 49})],
                note=stack_note())


BUSY = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < {s}: pass"


def profile_run(run: Run) -> tuple[bool, str]:
    pid, _ = ground.run(BUSY.format(s=2.0), "ks-busy")
    time.sleep(0.2)
    mine = [e for e in ground.dump("counts") if int(e["key"]["pid"]) == pid]
    n = sum(int(e["value"]) for e in mine)
    return near(n, 49 * 2.0, f"samples of busy pid {pid} over 2 s at 49 Hz", 0.7, 1.2)


def runqlen_opts(run: Run) -> Opts:
    # libbpf-tools/runqlen.c: targ_per_cpu = false, targ_host = false; perf_event_open(
    # PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK, freq = 1, sample_period = env.freq = 99)
    # on every CPU, then bpf_program__attach_perf_event(do_sample).
    return Opts(globals={"targ_per_cpu": False, "targ_host": False},
                attach=[Attach("attach_perf_event", ("do_sample",), {"event": "cpu-clock", "freq": 99})])


def runqlen_run(run: Run) -> tuple[bool, str]:
    # a spinner on each CPU: on this VM an idle vCPU's cpu-clock timer does not fire (every
    # sample of an idle run lands on the one busy CPU), so a CPU counts only while it runs
    spinners = [subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", BUSY.format(s=3.0)])
                for cpu in range(os.cpu_count() or 1)]
    time.sleep(0.3)
    a = time.monotonic()
    m0 = ground.total(ground.dump(".bss"), "slots")
    t0 = (a + time.monotonic()) / 2  # a dump (bpftool) takes a while: time its middle
    time.sleep(2.0)
    b = time.monotonic()
    m1 = ground.total(ground.dump(".bss"), "slots")
    t1 = (b + time.monotonic()) / 2
    for sp in spinners:
        sp.wait()
    want = 99 * (t1 - t0) * os.cpu_count()  # type: ignore[operator]
    return near(m1 - m0, want, "run-queue samples vs 99 Hz x seconds x CPUs", 0.7, 1.2)


# --- user space --------------------------------------------------------------------------

MEMLEAK_PROGS = ["malloc_enter", "malloc_exit", "calloc_enter", "calloc_exit", "realloc_enter",
                 "realloc_exit",
                 "mmap_enter", "mmap_exit", "mremap_enter", "mremap_exit", "posix_memalign_enter",
                 "posix_memalign_exit", "memalign_enter", "memalign_exit", "free_enter", "munmap_enter"]
MEMLEAK_KERNEL = ["memleak__kmalloc", "memleak__kmalloc_node", "memleak__kfree", "memleak__kmem_cache_alloc",
                  "memleak__kmem_cache_alloc_node", "memleak__kmem_cache_free", "memleak__mm_page_alloc",
                  "memleak__mm_page_free", "memleak__percpu_alloc_percpu", "memleak__percpu_free_percpu"]
LEAKER = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
kept = [libc.malloc(4321) for _ in range(10)]
for _ in range(10): libc.free(ctypes.c_void_p(libc.malloc(4321)))
print("done", flush=True)
import sys; sys.stdin.readline()
"""


def memleak_opts(run: Run) -> Opts:
    # libbpf-tools/memleak.c, as `memleak -p PID` (user mode): min_size = 0, max_size = -1,
    # page_size = sysconf(_SC_PAGE_SIZE), sample_rate = 1, trace_all = false, stack_flags =
    # BPF_F_USER_STACK (256), wa_missing_free = false; set_value_size(stack_traces, 127 * 8),
    # set_max_entries(stack_traces, 10240); disable_kernel_tracepoints() (all kmem/percpu
    # programs); attach_uprobes(): bpf_program__attach_uprobe_opts(prog, pid, libc, 0,
    # func_name=sym, retprobe) for malloc..munmap (valloc, pvalloc, aligned_alloc may fail).
    child = run.spawn(LEAKER, "ks-leak")
    run.info["pid"] = child.pid
    attach = []
    for prog in MEMLEAK_PROGS:
        sym, _, kind = prog.rpartition("_")
        attach.append(Attach("attach_uprobe", (LIBC, sym, prog),
                             {"retprobe": kind == "exit", "pid": child.pid}))
    return Opts(skip=MEMLEAK_KERNEL,
                globals={"min_size": 0, "max_size": 2**64 - 1, "page_size": os.sysconf("SC_PAGE_SIZE"),
                         "sample_rate": 1, "trace_all": False, "stack_flags": 256, "wa_missing_free": False},
                map_sizes={"stack_traces": 10240}, attach=attach, note=f"-p <child pid>; {stack_note()}")


def memleak_run(run: Run) -> tuple[bool, str]:
    child = run.children[0]
    assert child.stdin is not None
    assert child.stdout is not None
    child.stdin.write("go\n")
    child.stdin.flush()
    child.stdout.readline()
    time.sleep(0.3)
    out = [e for e in ground.dump("allocs") if int(e["value"]["size"]) == 4321]
    return len(out) == 10, f"{len(out)} live 4321-byte allocs; the child kept 10, freed 10"


