// SPDX-License-Identifier: Apache-2.0
// Off-CPU time: for each thread of process targ_tgid, the time from being switched out
// (sched_switch, prev) to being switched back in (next), summed per (pid, tid, comm,
// user stack, kernel stack) of the moment it left the CPU. Read it with
// probe.stacks("counts", "stacks") (value columns ns and switches).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#define TASK_COMM_LEN 16
#define MAX_STACKS 16384
#define MAX_THREADS 16384
#define MAX_DEPTH 127 /* PERF_MAX_STACK_DEPTH */

const volatile __u32 targ_tgid = 0; /* the process to watch; 0: every user thread */

struct stack_key {
	__u32 pid; /* the process (tgid) */
	__u32 tid;
	int user_stack_id;
	int kern_stack_id;
	char comm[TASK_COMM_LEN];
};

struct offcpu {
	__u64 ns;       /* total time off CPU */
	__u64 switches; /* times switched out with this stack */
};

struct start {
	__u64 ts;
	struct stack_key key;
};

struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, MAX_DEPTH * sizeof(__u64));
	__uint(max_entries, MAX_STACKS);
} stacks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct stack_key);
	__type(value, struct offcpu);
	__uint(max_entries, MAX_STACKS);
} counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32); /* tid */
	__type(value, struct start);
	__uint(max_entries, MAX_THREADS);
} starts SEC(".maps");

SEC("tp_btf/sched_switch")
int BPF_PROG(on_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	__u32 tgid = BPF_CORE_READ(prev, tgid);
	__u32 tid = BPF_CORE_READ(prev, pid);
	struct start *s, st = {};
	struct offcpu *v, zero = {};
	__u64 now = bpf_ktime_get_ns();

	/* prev is still `current` here: its stacks are the ones it leaves the CPU with */
	if (tid && (!targ_tgid || tgid == targ_tgid) && !(BPF_CORE_READ(prev, flags) & 0x00200000 /* PF_KTHREAD */)) {
		st.ts = now;
		st.key.pid = tgid;
		st.key.tid = tid;
		bpf_probe_read_kernel_str(&st.key.comm, sizeof(st.key.comm), prev->comm);
		st.key.user_stack_id = bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK);
		st.key.kern_stack_id = bpf_get_stackid(ctx, &stacks, 0);
		bpf_map_update_elem(&starts, &tid, &st, BPF_ANY);
	}

	tid = BPF_CORE_READ(next, pid);
	s = bpf_map_lookup_elem(&starts, &tid);
	if (!s)
		return 0;
	v = bpf_map_lookup_elem(&counts, &s->key);
	if (!v) {
		bpf_map_update_elem(&counts, &s->key, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&counts, &s->key);
	}
	if (v) {
		__sync_fetch_and_add(&v->ns, now - s->ts);
		__sync_fetch_and_add(&v->switches, 1);
	}
	bpf_map_delete_elem(&starts, &tid);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
