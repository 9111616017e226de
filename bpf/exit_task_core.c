// Who exited, with what code, and who was the parent: read from task_struct with CO-RE.
// BPF_CORE_READ records each field access; libbpf relocates it against the running
// kernel's BTF at load time, so the offsets are right whatever headers are installed.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

struct exit_event {
    u32 pid;        // bpf_get_current_pid_tgid(): a helper, right with any backend
    u32 tgid;       // task->tgid
    u32 ppid;       // task->real_parent->tgid
    s32 exit_code;  // task->exit_code >> 8: the process's exit status
    char comm[16];
};

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 256 * 1024);
} exits SEC(".maps");

SEC("tp/sched/sched_process_exit")
int on_exit(void *ctx) {
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    struct exit_event *e = bpf_ringbuf_reserve(&exits, sizeof(*e), 0);
    if (!e)
        return 0;
    e->pid = bpf_get_current_pid_tgid() >> 32;
    e->tgid = BPF_CORE_READ(task, tgid);
    e->ppid = BPF_CORE_READ(task, real_parent, tgid);
    e->exit_code = BPF_CORE_READ(task, exit_code) >> 8;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    bpf_ringbuf_submit(e, 0);
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
