// Every command line typed into an interactive bash: a uretprobe on /bin/bash's readline()
// reads the line it returns from the shell's memory (CO-RE: libbpf attaches the SEC() name,
// binary and function). Other shells, and bash reading a script, do not call readline().
// Read: bash_commands.df; %bpf_stop bash_commands when done.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

struct event {
    u64 ts;
    u32 pid;
    u32 uid;           // who typed it
    char line[120];
};

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 1 << 18);
} events SEC(".maps");

SEC("uretprobe//bin/bash:readline")
int BPF_KRETPROBE(on_readline, const char *line) {
    if (!line)
        return 0; // end of input (Ctrl-D)
    struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (!e)
        return 0;
    e->ts = bpf_ktime_get_ns();
    e->pid = bpf_get_current_pid_tgid() >> 32;
    e->uid = bpf_get_current_uid_gid();
    bpf_probe_read_user_str(e->line, sizeof(e->line), line);
    bpf_ringbuf_submit(e, 0);
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
