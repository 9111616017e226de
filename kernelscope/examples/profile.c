// Where the CPUs spend their time: 99 times a second on every CPU a perf_event timer (the
// --perf-event flag attaches do_sample to it) runs do_sample, which counts the running
// task's user and kernel stacks in a map.
// Read: profile.stacks(), one row per distinct stack with its samples, and
// profile.flamegraph(by="comm"); %bpf_stop profile when done. User stacks are walked by
// frame pointer: code built without them shows only its innermost frames.
#include <uapi/linux/bpf_perf_event.h>

struct key_t {
    u32 pid;             // the process: user addresses are its
    u32 tid;
    int user_stack_id;   // < 0: no user stack (a kernel thread)
    int kern_stack_id;   // < 0: no kernel stack (the tick came in user mode)
    char comm[16];
};

BPF_STACK_TRACE(stacks, 16384);
BPF_HASH(counts, struct key_t, u64, 16384);

int do_sample(struct bpf_perf_event_data *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    struct key_t key = {};
    key.pid = id >> 32;
    key.tid = id;
    if (key.tid == 0)
        return 0; // the idle task
    bpf_get_current_comm(&key.comm, sizeof(key.comm));
    key.user_stack_id = stacks.get_stackid(ctx, BPF_F_USER_STACK);
    key.kern_stack_id = stacks.get_stackid(ctx, 0);
    counts.increment(key);
    return 0;
}
