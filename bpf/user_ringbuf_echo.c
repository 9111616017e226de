// The user ring buffer round trip (Linux 6.1+, CO-RE backend): user space writes samples
// into `user_ringbuf` (probe.send); each kill(2) syscall runs this program, which drains
// them and echoes each one back, with the pid and comm of the process that made the
// syscall, through the kernel-to-user ring buffer `kernel_ringbuf`.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct user_sample {
    u32 seq;        // numbered by the sender: order and completeness are checkable
    s32 value;
    char text[16];
};

struct echo {
    u32 seq;
    s32 value;
    u32 pid;        // the process whose kill() drained this sample
    u32 batch;      // which drain call echoed it
    u64 ts;         // bpf_ktime_get_ns() at the echo
    char comm[16];
    char text[16];
};

struct {
    __uint(type, BPF_MAP_TYPE_USER_RINGBUF);
    __uint(max_entries, 256 * 1024);
} user_ringbuf SEC(".maps");

// 4x the user ring: one drain takes at most 8192 samples (256 KiB / 32 bytes), whose
// 8192 echoes (64 bytes each with the header) fill half of it.
struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 1024 * 1024);
} kernel_ringbuf SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, u32);
} drains SEC(".maps");

static long echo_sample(struct bpf_dynptr *dynptr, void *ctx) {
    struct user_sample s;
    if (bpf_dynptr_read(&s, sizeof(s), dynptr, 0, 0))
        return 1;   // a sample of the wrong size: stop draining
    struct echo *e = bpf_ringbuf_reserve(&kernel_ringbuf, sizeof(*e), 0);
    if (!e)
        return 1;   // kernel_ringbuf full: stop draining. This sample is consumed all the
                    // same (returning 1 does not put it back): its echo counts as dropped.
    e->seq = s.seq;
    e->value = s.value;
    e->pid = bpf_get_current_pid_tgid() >> 32;
    e->batch = *(u32 *)ctx;
    e->ts = bpf_ktime_get_ns();
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    __builtin_memcpy(e->text, s.text, sizeof(e->text));
    bpf_ringbuf_submit(e, 0);
    return 0;
}

SEC("tracepoint/syscalls/sys_exit_kill")
int drain_on_kill(void *ctx) {
    u32 zero = 0, *n = bpf_map_lookup_elem(&drains, &zero);
    if (!n)
        return 0;
    u32 batch = __sync_fetch_and_add(n, 1) + 1;   // numbers the drain calls
    bpf_user_ringbuf_drain(&user_ringbuf, echo_sample, &batch, 0);
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
