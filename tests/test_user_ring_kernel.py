"""User ring buffer SEND on the running kernel: batches that wrap and batches bigger than the room.

The program drains on kill(2) from this process only (other processes on the machine call
kill too, and a drain they caused would empty the ring behind a test's back) and echoes every
sample, all of its bytes, through a kernel ring buffer: what the DataFrame holds is what the
kernel read from the user ring.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from kernelscope import Probe, UserRingFullError

pytestmark = pytest.mark.kernel

PROGRAM = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct ks_sample { u64 seq; u64 a; u64 b; u64 c; };
struct { __uint(type, BPF_MAP_TYPE_USER_RINGBUF); __uint(max_entries, USER_BYTES); } samples SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4 * 1024 * 1024); } echoes SEC(".maps");

static long echo(struct bpf_dynptr *d, void *ctx) {
    struct ks_sample *e = bpf_ringbuf_reserve(&echoes, sizeof(*e), 0);
    if (!e)
        return 1;
    if (bpf_dynptr_read(e, sizeof(*e), d, 0, 0)) {
        bpf_ringbuf_discard(e, 0);
        return 1;
    }
    bpf_ringbuf_submit(e, 0);
    return 0;
}

SEC("tp/syscalls/sys_exit_kill")
int drain(void *ctx) {
    if ((bpf_get_current_pid_tgid() >> 32) == OWNER)
        bpf_user_ringbuf_drain(&samples, echo, 0, 0);
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""
SAMPLE = np.dtype([("seq", "<u8"), ("a", "<u8"), ("b", "<u8"), ("c", "<u8")])
SPAN = 40  # 8-byte header + 32 bytes


def probe(user_bytes: int) -> Probe:
    return Probe(PROGRAM, backend="libbpf", dtypes={"samples": SAMPLE, "echoes": SAMPLE},
                 cflags=[f"-DUSER_BYTES={user_bytes}", f"-DOWNER={os.getpid()}"]).start()


def samples(lo: int, n: int) -> np.ndarray:
    """Every byte of a sample differs from its neighbours': a misplaced or torn copy shows."""
    a = np.zeros(n, SAMPLE)
    seq = np.arange(lo, lo + n, dtype=np.uint64)
    a["seq"] = seq
    a["a"] = seq * np.uint64(0x9E3779B97F4A7C15)
    a["b"] = ~seq
    a["c"] = (seq << np.uint64(32)) | np.uint64(0xA5A5A5A5)
    return a


def echoed(p: Probe) -> np.ndarray:
    p.stop()
    df = p.df
    return np.array(list(zip(df["seq"], df["a"], df["b"], df["c"], strict=True)), dtype=SAMPLE)


def producer_offset(p: Probe) -> int:
    ring = p.user_rings["samples"]
    return int(ring._writer._prod[0]) & (ring.size - 1)  # type: ignore[union-attr]


def test_batches_that_run_past_the_end_of_the_data_area_arrive_whole() -> None:
    p = probe(4096)  # one page: 102 samples of 40 bytes
    sent = [samples(0, 100), samples(100, 100), samples(200, 102)]
    assert p.send(sent[0]) == 100
    os.kill(os.getpid(), 0)  # drained: the next batch starts at byte 4000 of 4096
    assert producer_offset(p) == 4000
    assert p.send(sent[1]) == 100  # sample 102's payload straddles the end; the rest wrap
    assert producer_offset(p) == (4000 + 100 * SPAN) % 4096
    os.kill(os.getpid(), 0)
    assert p.send(sent[2]) == 102  # the whole ring less 16 bytes, from mid-area
    os.kill(os.getpid(), 0)
    got = echoed(p)
    assert np.array_equal(got, np.concatenate(sent))
    ss = p.send_stats["samples"]
    assert (ss["sent"], ss["drained"], ss["pending"], ss["full"]) == (302, 302, 0, 0)
    p.close()


def test_a_batch_bigger_than_the_free_space_sends_what_fits_then_the_rest_after_a_drain() -> None:
    p = probe(4096)
    assert p.send(samples(0, 30)) == 30
    os.kill(os.getpid(), 0)
    assert p.send(samples(30, 40)) == 40  # 40 pending: room for 62 more
    with pytest.raises(UserRingFullError) as info:
        p.send(samples(70, 100))
    assert (info.value.sent, info.value.remaining) == (62, 38)
    assert p.user_rings["samples"].fill_bytes() == 102 * SPAN
    os.kill(os.getpid(), 0)
    assert p.send(samples(132, 38)) == 38  # the rest, across the end of the area
    os.kill(os.getpid(), 0)
    got = echoed(p)
    assert np.array_equal(got, samples(0, 170))  # nothing lost, repeated or reordered
    assert p.send_stats["samples"]["full"] == 1
    p.close()


def test_a_multi_step_batch_that_wraps_mid_step_arrives_whole() -> None:
    size = 1 << 20  # 26,214 samples; a write step is 6,553 of them
    p = probe(size)
    assert p.send(samples(0, 20_000)) == 20_000
    os.kill(os.getpid(), 0)
    assert p.send(samples(20_000, 26_000)) == 26_000  # from byte 800,000: wraps 248,576 bytes in
    os.kill(os.getpid(), 0)
    got = echoed(p)
    assert len(got) == 46_000
    assert np.array_equal(got, samples(0, 46_000))
    p.close()
