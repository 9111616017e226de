"""biolatency-style programs (libbpf-tools biolatency.bpf.c, BCC biolatency.py -D), written here.

Both time a block request from block_rq_issue to its first block_rq_complete and add the
latency to a per-disk log2 histogram of microseconds. Only reads and writes are counted, as
/sys/block/<disk>/stat counts them (op_stat_group: flushes and discards have fields of their
own); every other completion is counted in `other`. Disks are kernel dev_t values,
MKDEV(major, minor) = major << 20 | minor, as the tracepoints' `dev` field.
"""

from __future__ import annotations

from . import LOG2L

# CO-RE: keyed by the request pointer; the op from rq->cmd_flags mirrors op_stat_group:
# READ (0) is a read; an odd op (op_is_write) other than DISCARD (3) is a write (WRITE 1,
# SECURE_ERASE 5, WRITE_ZEROES 9); passthrough ops (34, 35) are not accounted at all.
CORE = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#define MAX_SLOTS 27
#define OP_MASK 0xff

struct hist { __u32 slots[MAX_SLOTS]; };

u64 other = 0;

struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 10240); __type(key, u64); __type(value, u64); }
    start SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 64); __type(key, u32);
         __type(value, struct hist); } disk_usecs SEC(".maps");

static struct hist zero;

LOG2L

SEC("tp_btf/block_rq_issue")
int BPF_PROG(ks_issue, struct request *rq)
{
    u64 key = (u64)rq, ts = bpf_ktime_get_ns();
    bpf_map_update_elem(&start, &key, &ts, BPF_ANY);
    return 0;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(ks_complete, struct request *rq, int error, unsigned int nr_bytes)
{
    u64 key = (u64)rq;
    u64 *tsp = bpf_map_lookup_elem(&start, &key);
    if (!tsp)
        return 0;
    s64 delta = bpf_ktime_get_ns() - *tsp;
    bpf_map_delete_elem(&start, &key);
    u32 op = BPF_CORE_READ(rq, cmd_flags) & OP_MASK;
    if (delta < 0 || !(op == 0 || ((op & 1) && op != 3 && op < 34))) {
        __sync_fetch_and_add(&other, 1);
        return 0;
    }
    struct gendisk *disk = BPF_CORE_READ(rq, q, disk);
    u32 dev = (BPF_CORE_READ(disk, major) << 20) | BPF_CORE_READ(disk, first_minor);
    struct hist *h = bpf_map_lookup_elem(&disk_usecs, &dev);
    if (!h) {
        bpf_map_update_elem(&disk_usecs, &dev, &zero, BPF_NOEXIST);
        h = bpf_map_lookup_elem(&disk_usecs, &dev);
        if (!h)
            return 0;
    }
    u64 slot = log2l(delta / 1000U);
    if (slot >= MAX_SLOTS)
        slot = MAX_SLOTS - 1;
    __sync_fetch_and_add(&h->slots[slot], 1);
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
""".replace("LOG2L", LOG2L)

# BCC: tracepoint args only, so a request is known by (dev, sector) at issue and at its first
# completion (blk_update_request traces before it advances the sector); the op is rwbs[0]
# ('R' read, 'W' write), after the 'F' a preflush puts first. A flush is "FF", a discard 'D'.
BCC = r"""
typedef struct disk_key { u32 dev; u32 pad; u64 slot; } disk_key_t;
struct start_key { u32 dev; u32 pad; u64 sector; };

BPF_HASH(start, struct start_key, u64, 10240);
BPF_HISTOGRAM(disk_usecs, disk_key_t, 1024);
BPF_ARRAY(other, u64, 1);

TRACEPOINT_PROBE(block, block_rq_issue)
{
    struct start_key key = {.dev = args->dev, .sector = args->sector};
    u64 ts = bpf_ktime_get_ns();
    start.update(&key, &ts);
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete)
{
    struct start_key key = {.dev = args->dev, .sector = args->sector};
    u64 *tsp = start.lookup(&key);
    if (!tsp)
        return 0;
    s64 delta = bpf_ktime_get_ns() - *tsp;
    start.delete(&key);
    char op = args->rwbs[0];
    if (op == 'F')
        op = args->rwbs[1];
    if (delta < 0 || (op != 'R' && op != 'W')) {
        u32 zero = 0;
        other.atomic_increment(zero);
        return 0;
    }
    disk_key_t dk = {.dev = args->dev, .slot = bpf_log2l(delta / 1000)};
    disk_usecs.atomic_increment(dk);
    return 0;
}
"""
