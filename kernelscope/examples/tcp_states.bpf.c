// TCP state changes of every socket (tracepoint sock:inet_sock_set_state), with the states
// by name and the addresses as text. Many changes happen in softirq context, on behalf of no
// process in particular, so rows carry the socket's address (skaddr) rather than a pid: it
// ties one connection's rows together. CO-RE (SEC(...)): bpf_snprintf needs its format in
// read-only data, which libbpf loads and BCC does not.
// Read: tcp_states.df; tcp_states.df.groupby("skaddr")["newstate"].agg(list) shows each
// socket's path (SYN_SENT, ESTABLISHED, FIN_WAIT1, ...); %bpf_stop tcp_states when done.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#define AF_INET 2

struct event {
    u64 ts;
    u64 skaddr;        // the struct sock's address: one connection
    u16 sport;         // host byte order; 0 before the socket has a port
    u16 dport;
    u32 family;        // 2 AF_INET, 10 AF_INET6
    char saddr[40];
    char daddr[40];
    char oldstate[16];
    char newstate[16];
};

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 1 << 20);
} events SEC(".maps");

static __always_inline void state_name(char *out, int state) {
    switch (state) { // the kernel's TCP states: TCP_ESTABLISHED = 1, ..., TCP_NEW_SYN_RECV = 12
    case 1: __builtin_memcpy(out, "ESTABLISHED", 12); break;
    case 2: __builtin_memcpy(out, "SYN_SENT", 9); break;
    case 3: __builtin_memcpy(out, "SYN_RECV", 9); break;
    case 4: __builtin_memcpy(out, "FIN_WAIT1", 10); break;
    case 5: __builtin_memcpy(out, "FIN_WAIT2", 10); break;
    case 6: __builtin_memcpy(out, "TIME_WAIT", 10); break;
    case 7: __builtin_memcpy(out, "CLOSE", 6); break;
    case 8: __builtin_memcpy(out, "CLOSE_WAIT", 11); break;
    case 9: __builtin_memcpy(out, "LAST_ACK", 9); break;
    case 10: __builtin_memcpy(out, "LISTEN", 7); break;
    case 11: __builtin_memcpy(out, "CLOSING", 8); break;
    case 12: __builtin_memcpy(out, "NEW_SYN_RECV", 13); break;
    default: __builtin_memcpy(out, "?", 2); break;
    }
}

SEC("tp/sock/inet_sock_set_state")
int on_state(struct trace_event_raw_inet_sock_set_state *ctx) {
    if (ctx->protocol != IPPROTO_TCP)
        return 0;
    struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (!e)
        return 0;
    __builtin_memset(e, 0, sizeof(*e));
    e->ts = bpf_ktime_get_ns();
    e->skaddr = (u64)ctx->skaddr;
    e->sport = ctx->sport;
    e->dport = ctx->dport;
    e->family = ctx->family;
    // %pI4 and %pI6 print the address their argument points at: here, in the tracepoint's record
    u64 src[1], dst[1];
    if (ctx->family == AF_INET) {
        src[0] = (u64)ctx->saddr;
        dst[0] = (u64)ctx->daddr;
        bpf_snprintf(e->saddr, sizeof(e->saddr), "%pI4", src, sizeof(src));
        bpf_snprintf(e->daddr, sizeof(e->daddr), "%pI4", dst, sizeof(dst));
    } else {
        src[0] = (u64)ctx->saddr_v6;
        dst[0] = (u64)ctx->daddr_v6;
        bpf_snprintf(e->saddr, sizeof(e->saddr), "%pI6", src, sizeof(src));
        bpf_snprintf(e->daddr, sizeof(e->daddr), "%pI6", dst, sizeof(dst));
    }
    state_name(e->oldstate, ctx->oldstate);
    state_name(e->newstate, ctx->newstate);
    bpf_ringbuf_submit(e, 0);
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
