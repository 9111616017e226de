"""Specs of the event tools (rows in a ring or perf buffer): process, file, TCP, user space.

Each `<tool>_opts` says what the tool's own loader sets (the file is cited), each `<tool>_run`
makes known events and compares the rows with them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import ground
from spec_base import INVALID_UID, LIBC, Attach, N, Opts, Run, col, exact

# --- process events ---------------------------------------------------------------------

def execsnoop_opts(run: Run) -> Opts:
    # libbpf-tools/execsnoop.c: ignore_failed = !env.fails, targ_uid = env.uid (INVALID_UID),
    # max_args = DEFAULT_MAXARGS (20), filter_cg = false; attaches with the skeleton.
    return Opts(globals={"ignore_failed": True, "targ_uid": INVALID_UID, "max_args": 20, "filter_cg": False})


def execsnoop_run(run: Run) -> tuple[bool, str]:
    pid, _ = ground.run(f"import subprocess\nfor _ in range({N}): subprocess.run(['/bin/true', 'kscheck'])",
                        "ks-exec")
    rows = run.rows(lambda d: (d["ppid"] == pid) & (d["comm"] == "true"), N)
    return exact(len(rows), N, f"rows with ppid {pid} and comm 'true'")


def exitsnoop_opts(run: Run) -> Opts:
    # libbpf-tools/exitsnoop.c: target_pid = 0, trace_failed_only = false,
    # trace_by_process = true, filter_cg = false.
    return Opts(globals={"target_pid": 0, "trace_failed_only": False, "trace_by_process": True,
                         "filter_cg": False})


def exitsnoop_run(run: Run) -> tuple[bool, str]:
    pid, _ = ground.run(f"import subprocess\nfor _ in range({N}): subprocess.run(['sh', '-c', 'exit 3'])",
                        "ks-exit")
    rows = run.rows(lambda d: (d["ppid"] == pid), N)
    codes = sorted({int(c) for c in rows["exit_code"]}) if len(rows) else []
    ok, text = exact(len(rows), N, f"exits with ppid {pid}")
    # exitsnoop.bpf.c: exit_code = task->exit_code >> 8 (the exit status), sig = the low byte
    return ok and codes == [3], f"{text}; exit_code values {codes} (want [3])"


def opensnoop_opts(run: Run) -> Opts:
    # libbpf-tools/opensnoop.c: targ_tgid = env.pid (0), targ_pid = env.tid (0), targ_uid =
    # INVALID_UID, targ_failed = false, full_path = false; open/openat2 programs disabled when
    # their tracepoints are missing.
    skip = []
    for tp in ("open", "openat2"):
        if not ground.tracepoint_exists("syscalls", f"sys_enter_{tp}"):
            skip += [f"tracepoint__syscalls__sys_enter_{tp}", f"tracepoint__syscalls__sys_exit_{tp}"]
    return Opts(skip=skip, globals={"targ_tgid": 0, "targ_pid": 0, "targ_uid": INVALID_UID,
                                    "targ_failed": False, "full_path": False})


def opensnoop_run(run: Run) -> tuple[bool, str]:
    path = f"/tmp/kscheck-open-{os.getpid()}"
    Path(path).write_text("x")
    try:
        pid, _ = ground.run(f"for _ in range({N}): open({path!r}).close()", "ks-open")
    finally:
        os.unlink(path)
    df = run.df()
    fname = col(df, "fname") if len(df) else "fname"
    rows = run.rows(lambda d: (d["pid"] == pid) & (d[col(d, "fname")] == path), N)
    lens = sorted(set(df[df["pid"] == pid][fname].str.len())) if len(df) else []
    ok, text = exact(len(rows), N, f"rows with pid {pid} and fname {path!r}")
    return ok, f"{text}; fname lengths of that pid {lens[:5]}"


def statsnoop_opts(run: Run) -> Opts:
    # libbpf-tools/statsnoop.c: target_pid = 0, trace_failed_only = false; each stat family's
    # entry/return pair disabled when its tracepoint is missing.
    skip = []
    for sc in ("statfs", "statx", "newstat", "newfstatat", "newfstat", "newlstat"):
        if not ground.tracepoint_exists("syscalls", f"sys_enter_{sc}"):
            skip += [f"handle_{sc}_entry", f"handle_{sc}_return"]
    return Opts(skip=skip, globals={"target_pid": 0, "trace_failed_only": False})


def statsnoop_run(run: Run) -> tuple[bool, str]:
    path = f"/tmp/kscheck-stat-{os.getpid()}"
    code = f"import os\nfor _ in range({N}):\n    try: os.stat({path!r})\n    except OSError: pass"
    pid, _ = ground.run(code,
                        "ks-stat")
    rows = run.rows(lambda d: (d["pid"] == pid) & (d["pathname"] == path), N)
    rets = sorted({int(r) for r in rows["ret"]}) if len(rows) else []
    ok, text = exact(len(rows), N, f"rows with pid {pid} and pathname {path!r}")
    return ok and rets == [-2], f"{text}; ret {rets} (want [-2]: ENOENT)"


def sigsnoop_opts(run: Run) -> Opts:
    # libbpf-tools/sigsnoop.c: filtered_pid = 0, target_signals = 0, failed_only = false;
    # without -k (kill_only) the kill/tkill/tgkill programs are disabled, sig_trace stays.
    return Opts(skip=["kill_entry", "kill_exit", "tkill_entry", "tkill_exit", "tgkill_entry", "tgkill_exit"],
                globals={"filtered_pid": 0, "target_signals": 0, "failed_only": False})


def sigsnoop_run(run: Run) -> tuple[bool, str]:
    target = subprocess.Popen(["sleep", "30"])
    run.children.append(target)  # type: ignore[arg-type]
    code = f"import os, signal\nfor _ in range({N}): os.kill({target.pid}, signal.SIGCONT)"
    _, _ = ground.run(code, "ks-sig")
    rows = run.rows(lambda d: (d["tpid"] == target.pid) & (d["sig"] == 18), N)
    return exact(len(rows), N, f"rows with tpid {target.pid} and sig 18 (SIGCONT)")


def syncsnoop_opts(run: Run) -> Opts:
    # libbpf-tools/syncsnoop.c: the sync_file_range, sync_file_range2 and arm_sync_file_range
    # programs are disabled when their tracepoints are missing; no globals.
    skip = [f"tracepoint__syscalls__sys_enter_{s}" for s in
            ("sync_file_range", "sync_file_range2", "arm_sync_file_range")
            if not ground.tracepoint_exists("syscalls", f"sys_enter_{s}")]
    return Opts(skip=skip)


def syncsnoop_run(run: Run) -> tuple[bool, str]:
    ground.run(f"import os\nfor _ in range({N}): os.sync()", "ks-sync")
    rows = run.rows(lambda d: (d["comm"] == "ks-sync") & (d["sys"] == 1), N)  # SYS_SYNC = 1
    return exact(len(rows), N, "rows with comm ks-sync and sys SYS_SYNC")


def mountsnoop_opts(run: Run) -> Opts:
    # libbpf-tools/mountsnoop.c: target_pid = 0; fsopen/fsconfig/fsmount/move_mount pairs
    # disabled when their tracepoints are missing.
    skip = []
    for sc in ("fsopen", "fsconfig", "fsmount", "move_mount"):
        if not ground.tracepoint_exists("syscalls", f"sys_enter_{sc}"):
            skip += [f"{sc}_entry", f"{sc}_exit"]
    return Opts(skip=skip, globals={"target_pid": 0})


def mountsnoop_run(run: Run) -> tuple[bool, str]:
    d = Path(f"/tmp/kscheck-mnt-{os.getpid()}")
    d.mkdir(exist_ok=True)
    try:
        subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        f"mount -t tmpfs kscheck-src {d} && umount {d}"], check=True, timeout=10)
    finally:
        d.rmdir()
    rows = run.rows(lambda x: x["comm"].isin(["mount", "umount"]), 2)
    df = run.df()
    srcs = [c for c in df.columns if c.endswith("src")]
    found = bool(srcs) and bool((rows[srcs[0]] == "kscheck-src").any())
    return found and len(rows) >= 2, (f"{len(rows)} mount/umount rows; src column {srcs[:1]} "
                                      f"has 'kscheck-src': {found}")


# --- TCP ---------------------------------------------------------------------------------

def tcpstates_opts(run: Run) -> Opts:
    # libbpf-tools/tcpstates.c: filter_by_sport = filter_by_dport = false, target_family = 0.
    return Opts(globals={"filter_by_sport": False, "filter_by_dport": False, "target_family": 0})


def tcpstates_run(run: Run) -> tuple[bool, str]:
    port = ground.tcp_exchange()
    rows = run.rows(lambda d: (d["sport"] == port) | (d["dport"] == port), 6)
    est = rows[rows["newstate"] == 1]  # TCP_ESTABLISHED
    addr = [c for c in rows.columns if c.startswith("daddr")]
    return len(est) >= 2, (f"{len(rows)} transitions on port {port}, {len(est)} to ESTABLISHED "
                           f"(client and server); daddr columns {addr}")


def tcplife_opts(run: Run) -> Opts:
    # libbpf-tools/tcplife.c: target_pid = 0, target_family = 0, no port filters.
    return Opts(globals={"target_pid": 0, "target_family": 0})


def tcplife_run(run: Run) -> tuple[bool, str]:
    n = 1000
    port = ground.tcp_exchange(n)
    rows = run.rows(lambda d: (d["sport"] == port) | (d["dport"] == port), 2)
    got = sorted((int(r.rx_b), int(r.tx_b)) for r in rows.itertuples())
    # tcplife.bpf.c reads tcp_sock bytes_received / bytes_acked, which advance with rcv_nxt /
    # snd_una over sequence space: the data, the peer's FIN (+1 received); the data and our
    # FIN (+1 sent), and on the connecting side its SYN too (+1: its snd_una starts at the ISS,
    # the accepted socket's after the SYN-ACK).
    want = [(n + 1, n + 1), (n + 1, n + 2)]
    return got == want, f"{len(rows)} sessions on port {port}; (rx_b, tx_b) {got}, want {want} ({n} B each)"


def tcppktlat_opts(run: Run) -> Opts:
    # libbpf-tools/tcppktlat.c: targ_pid/tid/sport/dport/min_us = 0; with BTF for tcp_probe
    # the raw_tp programs (tcp_probe, tcp_rcv_space_adjust, tcp_destroy_sock) are disabled,
    # otherwise the *_btf ones.
    raw = ["tcp_probe", "tcp_rcv_space_adjust", "tcp_destroy_sock"]
    skip = raw if ground.btf_has("tcp_probe") else [f"{p}_btf" for p in raw]
    return Opts(skip=skip, globals={"targ_pid": 0, "targ_tid": 0, "targ_sport": 0, "targ_dport": 0,
                                    "targ_min_us": 0})


def tcppktlat_run(run: Run) -> tuple[bool, str]:
    port = ground.tcp_exchange(1000)
    be = socket.htons(port)  # sport/dport are the socket's __be16 fields; tcppktlat.c prints ntohs()
    rows = run.rows(lambda d: (d["sport"] == be) | (d["dport"] == be), 1)
    return len(rows) >= 1, f"{len(rows)} packet-latency rows on port {port} (network order {be})"


def bashreadline_opts(run: Run) -> Opts:
    # libbpf-tools/bashreadline.c: find_readline_function_name() on /bin/bash ("readline"),
    # then bpf_program__attach_uprobe(printret, true, -1, bash path, offset of readline).
    bash = shutil.which("bash") or "/bin/bash"
    return Opts(attach=[Attach("attach_uprobe", (bash, "readline", "printret"), {"retprobe": True})])


def bashreadline_run(run: Run) -> tuple[bool, str]:
    import pty

    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe("bash", ["bash", "--norc", "--noprofile", "-i"], {"PS1": "$ ", "TERM": "dumb"})
    for line in ("echo kscheck-readline", "exit"):
        time.sleep(0.5)
        os.write(fd, (line + "\n").encode())
    ground.wait_for(lambda: os.waitpid(pid, os.WNOHANG)[0] != 0, 5)
    os.close(fd)
    rows = run.rows(lambda d: d["str"] == "echo kscheck-readline", 1)
    return len(rows) == 1, f"{len(rows)} rows with str 'echo kscheck-readline' (typed once into bash -i)"


def gethostlatency_opts(run: Run) -> Opts:
    # libbpf-tools/gethostlatency.c: target_pid = 0; attach_uprobes(): handle_entry and
    # handle_return (retprobe) on getaddrinfo, gethostbyname, gethostbyname2 of libc, pid -1.
    attach = []
    for sym in ("getaddrinfo", "gethostbyname", "gethostbyname2"):
        attach.append(Attach("attach_uprobe", (LIBC, sym, "handle_entry"), {"retprobe": False}))
        attach.append(Attach("attach_uprobe", (LIBC, sym, "handle_return"), {"retprobe": True}))
    return Opts(globals={"target_pid": 0}, attach=attach)


def gethostlatency_run(run: Run) -> tuple[bool, str]:
    pid, _ = ground.run(f"import socket\nfor _ in range({N}): socket.getaddrinfo('localhost', 80)", "ks-host")
    rows = run.rows(lambda d: (d["pid"] == pid) & (d["host"] == "localhost"), N)
    return exact(len(rows), N, f"rows with pid {pid} and host 'localhost'")


def javagc_opts(run: Run) -> Opts:
    # libbpf-tools/javagc.c: bpf_program__attach_usdt(handle_gc_start/end, pid, libjvm.so,
    # "hotspot", "gc__begin"/"gc__end" and "mem__pool__gc__begin"/"mem__pool__gc__end").
    # No JVM here: load only, nothing to attach to.
    return Opts(note="no JVM on this host: load only")


def javagc_run(run: Run) -> tuple[bool, str]:
    loaded = run.probe.loaded
    return bool(loaded), f"loaded: {loaded}; notes: {'; '.join(run.probe.warnings)[:200]}"


