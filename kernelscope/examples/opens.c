// Every openat(2) with its path and its result: the path is read from the caller's memory
// when the call starts, the fd (or -errno) when it returns, matched by thread id.
// Read: opens.df; opens.df[opens.df.ret < 0] lists the failed opens (-2 ENOENT, -13 EACCES);
// %bpf_stop opens when done.
struct event {
    u64 ts;          // bpf_ktime_get_ns() at return
    u32 pid;
    s32 ret;         // the new fd, or -errno
    s32 flags;       // O_WRONLY 1, O_RDWR 2, O_CREAT 0100, O_TRUNC 01000, ... (octal)
    char comm[16];
    char path[256];
};

BPF_HASH(pending, u32, struct event, 10240); // thread id -> its open in progress
BPF_RINGBUF_OUTPUT(events, 1024);

TRACEPOINT_PROBE(syscalls, sys_enter_openat) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = id;
    struct event e = {};
    e.pid = id >> 32;
    e.flags = args->flags;
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    bpf_probe_read_user_str(&e.path, sizeof(e.path), args->filename);
    pending.update(&tid, &e);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat) {
    u32 tid = bpf_get_current_pid_tgid();
    struct event *e = pending.lookup(&tid);
    if (!e)
        return 0; // it started before the probe was attached
    e->ts = bpf_ktime_get_ns();
    e->ret = args->ret;
    events.ringbuf_output(e, sizeof(*e), 0);
    pending.delete(&tid);
    return 0;
}
