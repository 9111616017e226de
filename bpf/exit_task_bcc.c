// The same fields as exit_task_core.c, read the BCC way: `task->tgid` compiles against the
// installed kernel headers. Where they belong to another kernel (see `kernelscope doctor`,
// "header layout") the offsets are wrong and the values garbage, silently.
#include <linux/sched.h>

struct exit_event {
    u32 pid;
    u32 tgid;
    u32 ppid;
    s32 exit_code;
    char comm[16];
};

BPF_RINGBUF_OUTPUT(exits, 64);

TRACEPOINT_PROBE(sched, sched_process_exit) {
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    struct exit_event e = {};
    e.pid = bpf_get_current_pid_tgid() >> 32;
    e.tgid = task->tgid;
    e.ppid = task->real_parent->tgid;
    e.exit_code = task->exit_code >> 8;
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    exits.ringbuf_output(&e, sizeof(e), 0);
    return 0;
}
