// SPDX-License-Identifier: Apache-2.0
// CPU sampling: on every tick of a perf event (attach it with
// probe.attach_perf_event("do_sample", freq=99)), count the running task's
// (pid, tid, comm, user stack, kernel stack). Read it with probe.stacks("counts", "stacks").
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#define TASK_COMM_LEN 16
#define MAX_STACKS 16384
#define MAX_DEPTH 127 /* PERF_MAX_STACK_DEPTH */

const volatile __u32 targ_tgid = 0; /* 0: every process */

struct stack_key {
	__u32 pid; /* the process (tgid): user addresses are its */
	__u32 tid;
	int user_stack_id;
	int kern_stack_id;
	char comm[TASK_COMM_LEN];
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
	__type(value, __u64);
	__uint(max_entries, MAX_STACKS);
} counts SEC(".maps");

SEC("perf_event")
int do_sample(struct bpf_perf_event_data *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct stack_key key = {};
	__u64 one = 1, *n;

	key.pid = id >> 32;
	key.tid = (__u32)id;
	if (key.tid == 0) /* the idle task */
		return 0;
	if (targ_tgid && key.pid != targ_tgid)
		return 0;
	bpf_get_current_comm(&key.comm, sizeof(key.comm));
	/* -EFAULT: no stack of that kind (a tick in user mode has no kernel stack) */
	key.user_stack_id = bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK);
	key.kern_stack_id = bpf_get_stackid(ctx, &stacks, 0);
	n = bpf_map_lookup_elem(&counts, &key);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(&counts, &key, &one, BPF_NOEXIST);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
