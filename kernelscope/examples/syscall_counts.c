// System calls counted per process and syscall number in a hash map: nothing is streamed,
// the kernel adds one to a counter at every syscall (raw_syscalls:sys_enter), and user
// space reads the counters whenever it likes.
// Read: syscall_counts.maps["counts"].frame() (pid, comm, nr, value), e.g. the busiest:
//   syscall_counts.maps["counts"].frame().groupby(["pid", "comm"])["value"].sum().nlargest(10)
// Numbers are the machine's (x86_64: 0 read, 1 write, 257 openat; `ausyscall --dump` names them).
struct key_t {
    u32 pid;
    u32 nr;          // the syscall number
    char comm[16];
};

BPF_HASH(counts, struct key_t, u64, 16384);

TRACEPOINT_PROBE(raw_syscalls, sys_enter) {
    struct key_t key = {};
    key.pid = bpf_get_current_pid_tgid() >> 32;
    key.nr = args->id;
    bpf_get_current_comm(&key.comm, sizeof(key.comm));
    counts.increment(key);
    return 0;
}
