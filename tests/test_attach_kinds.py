"""Attach kinds beyond tracepoints, on the running kernel and on both backends: perf_event
sampling, CO-RE USDT, uretprobes by name, XDP and tc on a veth pair in a network namespace,
iterators, tail-call arrays, and what an unattached program is told."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from producers import paused
from util import bpf_object_counts, usdt_gc_program

from kernelscope import AttachError, Probe
from kernelscope.backends import attach
from kernelscope.errors import SettingError, UnknownNameError

pytestmark = pytest.mark.kernel

# --- perf_event ----------------------------------------------------------------------------

PERF_CORE = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct tick { u32 pid; u32 cpu; };
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096 * 64); } samples SEC(".maps");
SEC("perf_event")
int on_sample(struct bpf_perf_event_data *ctx) {
    struct tick *s = bpf_ringbuf_reserve(&samples, sizeof(*s), 0);
    if (!s) return 0;
    s->pid = bpf_get_current_pid_tgid() >> 32;
    s->cpu = bpf_get_smp_processor_id();
    bpf_ringbuf_submit(s, 0);
    return 0;
}
"""

PERF_BCC = r"""
#include <uapi/linux/bpf_perf_event.h>
struct tick { u32 pid; u32 cpu; };
BPF_RINGBUF_OUTPUT(samples, 64);
int on_sample(struct bpf_perf_event_data *ctx) {
    struct tick s = {};
    s.pid = bpf_get_current_pid_tgid() >> 32;
    s.cpu = bpf_get_smp_processor_id();
    samples.ringbuf_output(&s, sizeof(s), 0);
    return 0;
}
"""

SPIN = """import sys, time
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
"""


def steal_seconds() -> float:
    """CPU time the hypervisor ran others on this VM's vCPUs, all CPUs (/proc/stat `steal`)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def spin(seconds: float) -> tuple[int, float]:
    """Run a child that spins on a CPU for `seconds` of wall time; (its pid, its CPU seconds)."""
    child = subprocess.Popen([sys.executable, "-c", SPIN, str(seconds)])
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    assert child.returncode == 0
    return child.pid, usage.ru_utime + usage.ru_stime


@pytest.mark.parametrize(("source", "rate"), [(PERF_CORE, {"freq": 200}), (PERF_BCC, {"freq": 200}),
                                              (PERF_CORE, {"period": 5_000_000})],
                         ids=["core-freq", "bcc-freq", "core-period"])
def test_perf_event_program_samples_at_the_asked_rate(source: str, rate: dict[str, int]) -> None:
    hz = rate.get("freq") or 1e9 / rate["period"]  # cpu-clock counts nanoseconds
    p = Probe(source)
    p.load()
    note = [w for w in p.warnings if w.startswith("on_sample (")]
    assert note
    assert "probe.attach_perf_event('on_sample', event='cpu-clock', freq=99)" in note[0]
    p.attach_perf_event("on_sample", event="cpu-clock", **rate)
    assert not [w for w in p.warnings if w.startswith("on_sample (")]  # attached now: no advice
    ncpus = len(os.sched_getaffinity(0))
    assert len([a for a in p.attach_points() if a.startswith("perf_event:cpu-clock")]) == ncpus
    p.start()
    t0, stolen0 = time.monotonic(), steal_seconds()
    pid, cpu_seconds = spin(1.5)
    p.stop()
    wall, stolen = time.monotonic() - t0, steal_seconds() - stolen0
    df = p.df
    mine = int((df["pid"] == pid).sum())
    # cpu-clock ticks on every CPU whoever runs there: at most hz x seconds x CPUs samples (a
    # timer delayed on a busy host folds its missed periods into one sample: fewer, never
    # more). At least the busy CPU's share: an idle CPU may stay silent (seen here: every
    # sample on the spinner's CPU), and no timer fires while the hypervisor runs others (steal)
    busy = max(0.0, cpu_seconds - stolen)
    assert 0.5 * hz * busy <= len(df) <= 1.1 * hz * wall * ncpus + 2 * ncpus, (len(df), hz, wall, stolen)
    # the spinning child is sampled, at most at the rate of the CPU time it got (on this shared
    # VM the CPU time the kernel accounts to it includes time its vCPU was not running, when no
    # timer fires: only the upper bound holds everywhere)
    assert 0 < mine <= 1.3 * hz * cpu_seconds + 5, (mine, hz, cpu_seconds)
    assert set(df["cpu"]) <= set(range(os.cpu_count() or 1))
    st = p.stats["samples"]
    assert st["attempted"] == st["received"] + st["dropped"]
    p.close()


def test_perf_event_settings_are_checked_and_hardware_events_need_a_pmu() -> None:
    p = Probe(PERF_CORE)
    p.load()
    with pytest.raises(SettingError, match=r"freq= .* or period= .*not both"):
        p.attach_perf_event("on_sample", freq=99, period=1000)
    with pytest.raises(UnknownNameError, match="unknown perf event 'cpu-cycles'; known: cpu-clock"):
        p.attach_perf_event("on_sample", event="cpu-cycles")
    with pytest.raises(AttachError, match="on CPU 4095"):
        p.attach_perf_event("on_sample", cpus=[0, 4095])  # all or none: CPU 0 is not left attached
    assert not [a for a in p.attach_points() if a.startswith("perf_event:")]
    if Path("/sys/bus/event_source/devices/cpu").exists():
        p.attach_perf_event("on_sample", event="cycles", freq=99)
        assert any(a.startswith("perf_event:cycles") for a in p.attach_points())
    else:
        with pytest.raises(AttachError, match=r"no hardware PMU .* event='cpu-clock'"):
            p.attach_perf_event("on_sample", event="cycles", freq=99)
        assert not any(a.startswith("perf_event:cycles") for a in p.attach_points())
    p.close()


# --- USDT (CO-RE) ---------------------------------------------------------------------------

USDT_CORE = usdt_gc_program()

GC_CHILD = "import sys, gc; print('ready', flush=True); sys.stdin.readline(); gc.collect(0); gc.collect(2)"


def usdt_python() -> Path:
    from kernelscope.doctor.checks import _find_usdt_binary

    binary = _find_usdt_binary()
    assert binary is not None, "no Python with the python:gc__start USDT probe (Debian's python3 has it)"
    return binary


def test_core_usdt_section_without_target_attaches_from_usdt_triples_by_path() -> None:
    binary = usdt_python()
    p = Probe(USDT_CORE, usdt=[(str(binary), "python:gc__start", "on_gc")]).start()
    assert p.attach_points() == [f"usdt:{binary}:python:gc__start"]
    assert not [w for w in p.warnings if w.startswith("on_gc (")]
    child = subprocess.Popen([str(binary), "-c", "import gc; gc.collect(0); gc.collect(1); gc.collect(2)"])
    assert child.wait(30) == 0
    p.stop()
    assert {0, 1, 2} <= set(p.df.loc[p.df["pid"] == child.pid, "gen"])
    p.close()


def test_core_usdt_attaches_to_a_pid_by_call_and_says_how_when_left_unattached() -> None:
    binary = usdt_python()
    child = subprocess.Popen([str(binary), "-c", GC_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        assert child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        p = Probe(USDT_CORE)
        p.load()
        note = next(w for w in p.warnings if w.startswith("on_gc ("))
        assert "usdt=[(BINARY or PID, 'provider:name', 'on_gc')]" in note
        assert "attach_usdt" in note
        with pytest.raises(SettingError, match="needs 'provider:name'"):
            p.attach_usdt(child.pid, "gc__start", "on_gc")
        p.attach_usdt(child.pid, "python:gc__start", "on_gc").start()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(30) == 0
        p.stop()
        assert list(p.df["gen"])[:2] == [0, 2]
        assert set(p.df["pid"]) == {child.pid}
        p.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()


# --- uprobes and uretprobes by name --------------------------------------------------------

URET_CORE = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
struct ret { u32 pid; s32 rc; };
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096 * 16); } rets SEC(".maps");
SEC("uretprobe/getppid")
int BPF_KRETPROBE(on_ret, int rc) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != TARGET) return 0;
    struct ret *r = bpf_ringbuf_reserve(&rets, sizeof(*r), 0);
    if (!r) return 0;
    r->pid = pid;
    r->rc = rc;
    bpf_ringbuf_submit(r, 0);
    return 0;
}
"""

URET_BCC = r"""
#include <uapi/linux/ptrace.h>
struct ret { u32 pid; s32 rc; };
BPF_RINGBUF_OUTPUT(rets, 16);
int on_ret(struct pt_regs *ctx) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != TARGET) return 0;
    struct ret r = {.pid = pid, .rc = PT_REGS_RC(ctx)};
    rets.ringbuf_output(&r, sizeof(r), 0);
    return 0;
}
"""

CALLS = 300


def libc_of(pid: int) -> str:
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return next(line.split()[-1] for line in maps if "libc.so" in line)


@pytest.mark.parametrize("source", [URET_CORE, URET_BCC], ids=["core", "bcc"])
def test_uretprobe_by_name_with_the_same_call_on_both_backends(source: str) -> None:
    prod = paused(CALLS)
    p = Probe(source, cflags=prod.cflags)
    p.attach_uprobe(libc_of(prod.pid), "getppid", "on_ret", retprobe=True)
    assert any(a.startswith(("uretprobe:", "uprobe:")) for a in p.attach_points())
    p.start()
    prod.go()
    prod.proc.stdin.close()  # type: ignore[union-attr]  # no pipe left for the GC of a later test
    p.stop()
    df = p.df
    assert len(df) == CALLS  # one return per call the child made
    assert (df["rc"] == os.getpid()).all()  # getppid()'s return value: this process
    p.close()


def test_core_uretprobe_section_without_binary_says_so_and_attaches_by_binary_alone() -> None:
    prod = paused(CALLS)
    p = Probe(URET_CORE, cflags=prod.cflags)
    p.load()  # libbpf 1.1 refuses SEC("uretprobe/getppid") (no binary): a note, not a failure
    note = next(w for w in p.warnings if w.startswith("on_ret ("))
    assert "BINARY:FUNCTION" in note
    assert "probe.attach_uprobe('/path/to/binary', 'getppid', 'on_ret', retprobe=True)" in note
    p.attach_uprobe(libc_of(prod.pid), fn_name="on_ret")  # the function and the kind from SEC()
    assert not [w for w in p.warnings if w.startswith("on_ret (")]
    p.start()
    prod.go()
    prod.proc.stdin.close()  # type: ignore[union-attr]  # no pipe left for the GC of a later test
    p.stop()
    assert len(p.df) == CALLS
    assert (p.df["rc"] == os.getpid()).all()
    p.close()


# --- XDP and tc on a veth pair in a network namespace ---------------------------------------


@dataclass
class Veth:
    ns: str
    host: str  # the end in this (the test's) namespace
    peer: str  # the end inside `ns`
    host_ip: str
    peer_ip: str

    def send_from_peer(self, count: int, port: int) -> None:
        code = (f"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"for i in range({count}): s.sendto(b'kernelscope', ({self.host_ip!r}, {port}))")
        subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", code], check=True)

    def send_from_host(self, count: int, port: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(count):
                s.sendto(b"kernelscope", (self.peer_ip, port))


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def veth() -> Iterator[Veth]:
    """veth pair ks<pid>a (here) / ks<pid>b (in netns ks<pid>), 10.123.N.1 and .2, with static
    neighbour entries so no ARP exchange precedes the test's packets."""
    tag = f"ks{os.getpid() % 100000}"
    net = f"10.123.{os.getpid() % 250}"
    v = Veth(tag, f"{tag}a", f"{tag}b", f"{net}.1", f"{net}.2")
    _ip("netns", "add", v.ns)
    try:
        _ip("link", "add", v.host, "type", "veth", "peer", "name", v.peer, "netns", v.ns)
        _ip("addr", "add", f"{v.host_ip}/24", "dev", v.host)
        _ip("link", "set", v.host, "up")
        _ip("addr", "add", f"{v.peer_ip}/24", "dev", v.peer, ns=v.ns)
        _ip("link", "set", v.peer, "up", ns=v.ns)
        host_mac = Path(f"/sys/class/net/{v.host}/address").read_text().strip()
        peer_mac = subprocess.run(["ip", "netns", "exec", v.ns, "cat", f"/sys/class/net/{v.peer}/address"],
                                  check=True, capture_output=True, text=True).stdout.strip()
        _ip("neigh", "replace", v.peer_ip, "lladdr", peer_mac, "dev", v.host)
        _ip("neigh", "replace", v.host_ip, "lladdr", host_mac, "dev", v.peer, ns=v.ns)
        yield v
    finally:
        subprocess.run(["ip", "link", "del", v.host], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", v.ns], capture_output=True, check=False)


PORT = 9127
PACKETS = 40

# The same packet walk for XDP and tc: Ethernet, IPv4 without options, UDP to PORT.
PARSE = r"""
    void *data = (void *)(long)CTX->data, *end = (void *)(long)CTX->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != __builtin_bswap16(0x0800)) return PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->protocol != 17) return PASS;
    struct udphdr *udp = (void *)(ip + 1);
    if ((void *)(udp + 1) > end || udp->dest != __builtin_bswap16(PORT)) return PASS;
"""

NET_CORE = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct pkt { u32 len; u32 dport; };
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096 * 16); } pkts SEC(".maps");
static __always_inline void emit(u32 len) {
    struct pkt *p = bpf_ringbuf_reserve(&pkts, sizeof(*p), 0);
    if (!p) return;
    p->len = len; p->dport = PORT;
    bpf_ringbuf_submit(p, 0);
}
SEC("xdp")
int count_xdp(struct xdp_md *ctx) {
#define CTX ctx
#define PASS XDP_PASS
PARSE
    emit((u32)(end - data));
    return XDP_PASS;
}
#undef CTX
#undef PASS
SEC("tc")
int count_tc(struct __sk_buff *skb) {
#define CTX skb
#define PASS 0
PARSE
    emit(skb->len);
    return 0;  /* TC_ACT_OK */
}
""".replace("PARSE", PARSE).replace("PORT", str(PORT))

NET_BCC = r"""
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
struct pkt { u32 len; u32 dport; };
BPF_RINGBUF_OUTPUT(pkts, 16);
int count_xdp(struct xdp_md *ctx) {
#define CTX ctx
#define PASS XDP_PASS
PARSE
    struct pkt p = {.len = (u32)(end - data), .dport = PORT};
    pkts.ringbuf_output(&p, sizeof(p), 0);
    return XDP_PASS;
}
#undef CTX
#undef PASS
int count_tc(struct __sk_buff *skb) {
#define CTX skb
#define PASS 0
PARSE
    struct pkt p = {.len = skb->len, .dport = PORT};
    pkts.ringbuf_output(&p, sizeof(p), 0);
    return 0;
}
""".replace("PARSE", PARSE).replace("PORT", str(PORT))

FRAME = 14 + 20 + 8 + len(b"kernelscope")  # Ethernet + IPv4 + UDP headers + payload


@pytest.mark.parametrize("source", [NET_CORE, NET_BCC], ids=["core", "bcc"])
@pytest.mark.parametrize("mode", ["skb", "native"])
def test_xdp_counts_the_packets_sent_to_the_interface(veth: Veth, source: str, mode: str) -> None:
    before = bpf_object_counts()
    p = Probe(source)
    p.load()
    note = next(w for w in p.warnings if w.startswith("count_xdp ("))
    assert "probe.attach_xdp('count_xdp', 'IFNAME', mode='skb')" in note
    assert "attach_uprobe" not in note
    with pytest.raises(UnknownNameError, match=f"no network interface 'nope0' .*{veth.host}"):
        p.attach_xdp("count_xdp", "nope0")
    p.attach_xdp("count_xdp", veth.host, mode=mode).start()
    assert f"xdp:{veth.host}:{mode}" in p.attach_points()
    veth.send_from_peer(PACKETS, PORT)
    veth.send_from_peer(7, PORT + 1)  # another port: not counted
    p.wait(10, limit=PACKETS)
    p.stop()
    assert len(p.df) == PACKETS
    assert (p.df["len"] == FRAME).all()
    p.close()
    assert (bpf_object_counts() - before).links <= 0  # the XDP link went with the probe


@pytest.mark.parametrize("source", [NET_CORE, NET_BCC], ids=["core", "bcc"])
@pytest.mark.parametrize("direction", ["ingress", "egress"])
@pytest.mark.parametrize("api", ["tcx", "netlink"])
def test_tc_counts_packets_in_the_asked_direction(veth: Veth, source: str, direction: str, api: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attach, "TCX", api == "tcx")  # netlink: the way of kernels before 6.6
    before = bpf_object_counts()
    p = Probe(source)
    p.load()
    note = next(w for w in p.warnings if w.startswith("count_tc ("))
    assert "probe.attach_tc('count_tc', 'IFNAME', direction='ingress')" in note
    p.attach_tc("count_tc", veth.host, direction=direction).start()
    assert f"tc:{veth.host}:{direction}" in p.attach_points()
    shown = subprocess.run(["tc", "filter", "show", "dev", veth.host, direction], capture_output=True,
                           text=True, check=True).stdout
    assert ("count_tc" in shown) == (api == "netlink")  # a tcx link is no tc filter
    inbound, outbound = (PACKETS, 5) if direction == "ingress" else (5, PACKETS)
    veth.send_from_peer(inbound, PORT)  # arrives on veth.host: ingress
    veth.send_from_host(outbound, PORT)  # leaves through veth.host: egress
    p.wait(10, limit=PACKETS)
    time.sleep(0.2)  # packets of the other direction, if wrongly counted, would arrive by now
    p.stop()
    assert len(p.df) == PACKETS
    assert (p.df["len"] == FRAME).all()  # skb->len at tc: the whole frame with its Ethernet header
    p.close()
    assert (bpf_object_counts() - before).links <= 0  # the tcx link went with the probe
    filters = subprocess.run(["tc", "filter", "show", "dev", veth.host, direction], capture_output=True,
                             text=True, check=True).stdout
    assert "count_tc" not in filters  # and the netlink filter


# --- iterators and tail calls ---------------------------------------------------------------

ITER_CORE = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
struct row { u32 tgid; u32 pid; char comm[16]; };
struct row *row_type __attribute__((used));  /* keeps struct row in the object's BTF */
SEC("iter/task")
int task_lines(struct bpf_iter__task *ctx) {
    struct task_struct *t = ctx->task;
    if (!t) return 0;
    BPF_SEQ_PRINTF(ctx->meta->seq, "%d %d %s\n", t->tgid, t->pid, t->comm);
    return 0;
}
SEC("iter/task")
int task_rows(struct bpf_iter__task *ctx) {
    struct task_struct *t = ctx->task;
    if (!t) return 0;
    struct row r = {.tgid = t->tgid, .pid = t->pid};
    bpf_probe_read_kernel_str(r.comm, sizeof(r.comm), t->comm);
    bpf_seq_write(ctx->meta->seq, &r, sizeof(r));
    return 0;
}
"""


def test_task_iterator_finds_this_process_as_text_and_as_rows() -> None:
    p = Probe(ITER_CORE)
    text = p.iter_read("task_lines")
    me = os.getpid()
    mine = [line.split() for line in text.splitlines() if line.split()[0] == str(me)]
    assert [me, me] in [[int(a), int(b)] for a, b, *_ in mine]  # the main thread: tgid == pid
    assert len(mine) == len(os.listdir(f"/proc/{me}/task"))  # every thread of this process
    rows = p.iter_read("task_rows", dtype="struct row")
    assert list(rows.columns) == ["tgid", "pid", "comm"]
    main = rows[(rows["tgid"] == me) & (rows["pid"] == me)]
    assert len(main) == 1
    assert main["comm"].iloc[0] == Path("/proc/self/comm").read_text().strip()
    assert len(rows) == len(text.splitlines())  # the same tasks, one pass each
    p.close()


TAIL_CORE = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct hit { u32 pid; u32 stage; };
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096 * 16); } hits SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_PROG_ARRAY); __uint(max_entries, 2); __type(key, u32);
         __type(value, u32); } stages SEC(".maps");
SEC("tp/syscalls/sys_enter_getppid")
int entry(void *ctx) {
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET) return 0;
    bpf_tail_call(ctx, &stages, 1);
    return 0;
}
SEC("tp")
int second(void *ctx) {
    struct hit *h = bpf_ringbuf_reserve(&hits, sizeof(*h), 0);
    if (!h) return 0;
    h->pid = bpf_get_current_pid_tgid() >> 32;
    h->stage = 2;
    bpf_ringbuf_submit(h, 0);
    return 0;
}
"""


def test_tail_call_array_filled_by_program_name() -> None:
    prod = paused(CALLS)
    p = Probe(TAIL_CORE, cflags=prod.cflags)
    p.load()
    note = next(w for w in p.warnings if w.startswith("second ("))
    assert "probe.attach_prog_array('MAP', {0: 'second'})" in note
    assert p.program_fd("second") >= 0
    p.attach_prog_array("stages", {1: "second"})
    assert not [w for w in p.warnings if w.startswith("second (")]
    p.start()
    prod.go()
    prod.proc.stdin.close()  # type: ignore[union-attr]  # no pipe left for the GC of a later test
    p.stop()
    assert len(p.df) == CALLS
    assert (p.df["pid"] == prod.pid).all()
    assert (p.df["stage"] == 2).all()
    with pytest.raises(AttachError, match="no program 'third'"):
        p.attach_prog_array("stages", ["third"])
    p.close()


def test_reconfigure_attaches_the_new_program_the_same_way(veth: Veth) -> None:
    p = Probe(NET_CORE)
    p.attach_xdp("count_xdp", veth.host).attach_tc("count_tc", veth.host, direction="egress").start()
    veth.send_from_peer(10, PORT)  # XDP
    veth.send_from_host(10, PORT)  # tc egress
    p.wait(10, limit=20)
    p.reconfigure(pages=32)  # a new program, attached where the old one was
    assert sorted(p.attach_points()) == [f"tc:{veth.host}:egress", f"xdp:{veth.host}:skb"]
    assert not [w for w in p.warnings if " is not attached:" in w]
    veth.send_from_peer(5, PORT)
    veth.send_from_host(5, PORT)
    p.wait(10, limit=30)
    p.stop()
    assert len(p.df) == 30
    p.close()
