// Every exec and exit of a process, from the sched tracepoints. The cell uses SEC(...), so it
// runs on the CO-RE backend: the parent, the exit status and the start time come from
// task_struct, whose offsets libbpf relocates against this kernel's BTF at load, so they are
// right whatever kernel headers are installed.
// Read: exec_exit.df, one row per event ("exec" or "exit"); %bpf_stop exec_exit when done.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

struct event {
    u64 ts;             // bpf_ktime_get_ns(): CLOCK_MONOTONIC
    u64 lifetime_ns;    // exit: how long the process ran; exec: 0
    u32 pid;            // the process (thread group id)
    u32 ppid;           // its parent process
    s32 exit_code;      // exit: the status it passed to exit(); exec: 0
    s32 signal;         // exit: the signal that killed it, or 0
    char event[8];      // "exec" or "exit"
    char comm[16];      // exec: the new program's name
    char filename[128]; // exec: the file it runs
};

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 1 << 20);
} events SEC(".maps");

static __always_inline struct event *new_event(struct task_struct *task) {
    struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (!e)
        return 0;
    __builtin_memset(e, 0, sizeof(*e));
    e->ts = bpf_ktime_get_ns();
    e->pid = bpf_get_current_pid_tgid() >> 32;
    e->ppid = BPF_CORE_READ(task, real_parent, tgid);
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    return e;
}

SEC("tp/sched/sched_process_exec")
int on_exec(struct trace_event_raw_sched_process_exec *ctx) {
    struct event *e = new_event((struct task_struct *)bpf_get_current_task());
    if (!e)
        return 0;
    __builtin_memcpy(e->event, "exec", 5);
    // a __data_loc field: its low 16 bits are the string's offset in the tracepoint's record
    unsigned int offset = ctx->__data_loc_filename & 0xFFFF;
    bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), (void *)ctx + offset);
    bpf_ringbuf_submit(e, 0);
    return 0;
}

SEC("tp/sched/sched_process_exit")
int on_exit(void *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    if ((u32)id != id >> 32)
        return 0; // a thread other than the main one: the process goes on
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    struct event *e = new_event(task);
    if (!e)
        return 0;
    __builtin_memcpy(e->event, "exit", 5);
    int code = BPF_CORE_READ(task, exit_code); // wait(2)'s status word
    e->exit_code = (code >> 8) & 0xff;
    e->signal = code & 0x7f;
    e->lifetime_ns = e->ts - BPF_CORE_READ(task, start_time);
    bpf_ringbuf_submit(e, 0);
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
