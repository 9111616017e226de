"""runqlat-style programs (libbpf-tools runqlat.bpf.c, BCC runqlat.py), written here for the maps tests.

Both time a task from the moment it becomes runnable (sched_wakeup, sched_wakeup_new, or a
switch-out while still TASK_RUNNING, i.e. preempted) to the sched_switch that puts it on a
CPU, and add that wait to a per-task log2 histogram of microseconds and to a total in ns.
"""

from __future__ import annotations

from . import LOG2L

MAX_SLOTS = 26

# CO-RE: BTF tracepoints hand over the task_struct pointers, so the filter is the real tgid
# (a global set after load) and the preempted test reads prev->__state as the kernel does
# (sched_info_depart re-queues prev when task_is_running(prev)). `odd` counts preemptions of
# a target task whose state was already not TASK_RUNNING: the kernel keeps such a task on the
# runqueue without marking it queued (no schedstat wait), so these are where the two may differ.
CORE = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#define MAX_SLOTS 26
#define TASK_RUNNING 0

struct hist { __u32 slots[MAX_SLOTS]; };

u32 targ_tgid = 0;
u64 total_ns = 0;
u64 odd = 0;
u64 outs = 0, ins = 0;  /* the target's switch-outs and switch-ins seen */
u64 unmatched = 0;  /* the target's switch-ins that found no start time */

struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 10240); __type(key, u32); __type(value, u64); }
    start SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 1024); __type(key, u32);
         __type(value, struct hist); } runq_usecs SEC(".maps");

static struct hist zero;

LOG2L

static __always_inline int trace_enqueue(u32 tgid, u32 pid)
{
    if (!pid || tgid != targ_tgid)
        return 0;
    u64 ts = bpf_ktime_get_ns();
    bpf_map_update_elem(&start, &pid, &ts, BPF_ANY);
    return 0;
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(ks_wakeup, struct task_struct *p)
{
    return trace_enqueue(p->tgid, p->pid);
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(ks_wakeup_new, struct task_struct *p)
{
    return trace_enqueue(p->tgid, p->pid);
}

SEC("tp_btf/sched_switch")
int BPF_PROG(ks_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
    if (prev->tgid == targ_tgid)
        __sync_fetch_and_add(&outs, 1);
    if (next->tgid == targ_tgid)
        __sync_fetch_and_add(&ins, 1);
    if (prev->__state == TASK_RUNNING)
        trace_enqueue(prev->tgid, prev->pid);
    else if (preempt && prev->tgid == targ_tgid)
        __sync_fetch_and_add(&odd, 1);

    u32 pid = next->pid;
    if (next->tgid != targ_tgid)
        return 0;
    u64 *tsp = bpf_map_lookup_elem(&start, &pid);
    if (!tsp) {
        __sync_fetch_and_add(&unmatched, 1);
        return 0;
    }
    s64 delta = bpf_ktime_get_ns() - *tsp;
    bpf_map_delete_elem(&start, &pid);
    if (delta < 0) {
        __sync_fetch_and_add(&unmatched, 1);
        return 0;
    }

    struct hist *h = bpf_map_lookup_elem(&runq_usecs, &pid);
    if (!h) {
        bpf_map_update_elem(&runq_usecs, &pid, &zero, BPF_NOEXIST);
        h = bpf_map_lookup_elem(&runq_usecs, &pid);
        if (!h)
            return 0;
    }
    u64 slot = log2l(delta / 1000U);
    if (slot >= MAX_SLOTS)
        slot = MAX_SLOTS - 1;
    __sync_fetch_and_add(&h->slots[slot], 1);
    __sync_fetch_and_add(&total_ns, delta);
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
""".replace("LOG2L", LOG2L)

# BCC: tracepoint `args` only (struct reads are wrong here: 6.1 headers on a 6.18 kernel, see
# PLATFORM.md). sched_wakeup's args carry the thread id, not the tgid, so the filter is the
# target's (single) thread, TARGET; sched_switch's prev_state is TASK_REPORT_MAX for every
# preemption (__trace_sched_switch_state) and 0 for a task that switched out runnable.
# `preempted` counts the target's preemptions: the BCC program cannot tell which of them
# found the task already leaving (CO-RE's `odd`), so it is the bound it can give. totals[2]
# and [3] count switch-outs and switch-ins as CO-RE's `outs` and `ins`.
BCC = r"""
#define TASK_REPORT_MAX 0x100

typedef struct pid_key { u32 id; u32 pad; u64 slot; } pid_key_t;

BPF_HASH(start, u32, u64, 10240);
BPF_HISTOGRAM(runq_usecs, pid_key_t, 1024);
BPF_ARRAY(totals, u64, 5);  /* wait ns, target preemptions, its switch-outs, its switch-ins,
                               its switch-ins that found no start time */

static __always_inline int trace_enqueue(u32 pid)
{
    if (pid != TARGET)
        return 0;
    u64 ts = bpf_ktime_get_ns();
    start.update(&pid, &ts);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup) { return trace_enqueue(args->pid); }
TRACEPOINT_PROBE(sched, sched_wakeup_new) { return trace_enqueue(args->pid); }

TRACEPOINT_PROBE(sched, sched_switch)
{
    u32 prev = args->prev_pid, next = args->next_pid, out = 2, in = 3;
    if (prev == TARGET)
        totals.atomic_increment(out);
    if (next == TARGET)
        totals.atomic_increment(in);
    if (args->prev_state == 0 || (args->prev_state & TASK_REPORT_MAX)) {
        trace_enqueue(prev);
        if (prev == TARGET && args->prev_state) {
            u32 k = 1;
            totals.atomic_increment(k);
        }
    }
    if (next != TARGET)
        return 0;
    u32 unmatched = 4;
    u64 *tsp = start.lookup(&next);
    if (!tsp) {
        totals.atomic_increment(unmatched);
        return 0;
    }
    s64 delta = bpf_ktime_get_ns() - *tsp;
    start.delete(&next);
    if (delta < 0) {
        totals.atomic_increment(unmatched);
        return 0;
    }
    pid_key_t key = {.id = next, .slot = bpf_log2l(delta / 1000)};
    runq_usecs.atomic_increment(key);
    u32 k = 0;
    totals.atomic_increment(k, delta);
    return 0;
}
"""
