// Who runs what: one event per exec, exit and openat(2), from stable tracepoints.
// Only tracepoint args and helpers are used, so values are right even when the kernel
// headers do not match the running kernel (see `kernelscope doctor`).
struct event {
    u64 ts;        // bpf_ktime_get_ns(): CLOCK_MONOTONIC
    u32 pid;       // thread group id (the process)
    u32 kind;      // 0 exec, 1 exit, 2 openat
    char comm[16];
};

BPF_RINGBUF_OUTPUT(events, 256);

static __always_inline int emit(u32 kind) {
    struct event e = {};
    e.ts = bpf_ktime_get_ns();
    e.pid = bpf_get_current_pid_tgid() >> 32;
    e.kind = kind;
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    events.ringbuf_output(&e, sizeof(e), 0);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec) { return emit(0); }
TRACEPOINT_PROBE(sched, sched_process_exit) { return emit(1); }
TRACEPOINT_PROBE(syscalls, sys_enter_openat) { return emit(2); }
