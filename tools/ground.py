"""Ground truth for the libbpf-tools check: children that make known events, and readings
taken without kernelscope (bpftool map dumps, /proc counters, tracefs).

Nothing here imports kernelscope: what it reads is what the check compares kernelscope against.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TRACEFS = Path("/sys/kernel/tracing")
BTF = Path("/sys/kernel/btf/vmlinux")

# A child python that names itself (prctl PR_SET_NAME = 15), so rows can be found by comm,
# then waits for a line on stdin before doing its work when asked to.
_PRELUDE = """
import ctypes, os, sys
ctypes.CDLL(None).prctl(15, {comm!r}.encode(), 0, 0, 0)
if {wait!r}:
    sys.stdin.readline()
"""


def child(code: str, comm: str, wait: bool = False) -> subprocess.Popen[str]:
    """Start `code` in a python child whose comm is `comm` (at most 15 characters)."""
    text = _PRELUDE.format(comm=comm[:15], wait=wait) + code
    return subprocess.Popen([sys.executable, "-c", text], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def go(proc: subprocess.Popen[str], timeout: float = 20.0) -> str:
    """Let a waiting child run; its stdout once it exits (a failing child is an error)."""
    out, err = proc.communicate("go\n", timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"trigger child failed ({proc.returncode}): {err.strip()[-300:]}")
    return out


def run(code: str, comm: str, timeout: float = 20.0) -> tuple[int, str]:
    """Run `code` in a named child to the end; (its pid, its stdout)."""
    proc = child(code, comm)
    return proc.pid, go(proc, timeout)


def tcp_exchange(nbytes: int = 1000) -> int:
    """A TCP connection on 127.0.0.1: connect, send `nbytes`, echo them, close; the port."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = int(srv.getsockname()[1])
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    cli.sendall(b"k" * nbytes)
    got = b""
    while len(got) < nbytes:
        got += conn.recv(65536)
    conn.sendall(got)
    back = b""
    while len(back) < nbytes:
        back += cli.recv(65536)
    cli.close()
    conn.close()
    srv.close()
    time.sleep(0.2)
    return port


def tracepoint_exists(category: str, event: str) -> bool:
    """libbpf-tools' trace_helpers.c tracepoint_exists(): the tracefs event folder is there."""
    return (TRACEFS / "events" / category / event / "format").exists()


def btf_has(name: str) -> bool:
    """probe_tp_btf(name) in trace_helpers.c asks whether the kernel's BTF has `btf_trace_<name>`
    (a tp_btf program loads); the BTF dump answers the same question without loading anything."""
    return f"'btf_trace_{name}'" in _btf_dump()


@functools.cache
def _btf_dump() -> str:
    return subprocess.run(["bpftool", "btf", "dump", "file", str(BTF)], capture_output=True,
                          text=True, check=True).stdout


def pid_max() -> int:
    return int(Path("/proc/sys/kernel/pid_max").read_text())


# --- maps, read by bpftool -------------------------------------------------------------

def own_maps() -> dict[str, int]:
    """{map name: id} for every BPF map this process holds an fd of (names as the kernel keeps
    them: 15 characters at most)."""
    ids = []
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            text = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue
        m = re.search(r"^map_id:\s*(\d+)", text, re.M)
        if m:
            ids.append(int(m.group(1)))
    names = {}
    for i in sorted(set(ids)):
        info = json.loads(_bpftool("map", "show", "id", str(i)))
        names[info.get("name", "")] = i
    return names


def dump(name: str) -> list[dict[str, Any]]:
    """`bpftool map dump id N -j` of this process's map `name` (or the one ending in `name`,
    for `.bss`): entries with bpftool's BTF-formatted key and value."""
    maps = own_maps()
    mid = maps.get(name)
    if mid is None:
        mid = next((i for n, i in maps.items() if n.endswith(name)), None)
    if mid is None:
        raise LookupError(f"no map {name!r} among this process's maps {sorted(maps)}")
    rows = json.loads(_bpftool("map", "dump", "id", str(mid)))
    return [r.get("formatted", r) for r in rows]


def _bpftool(*args: str) -> str:
    return subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True,
                          check=True).stdout


def total(obj: Any, field: str) -> int:
    """Sum of every number under keys named `field`, at any depth (lists are summed)."""
    if isinstance(obj, dict):
        return sum((_numbers(v) if k == field else total(v, field)) for k, v in obj.items())
    if isinstance(obj, list):
        return sum(total(v, field) for v in obj)
    return 0


def _numbers(v: Any) -> int:
    if isinstance(v, list):
        return sum(_numbers(x) for x in v)
    if isinstance(v, dict):
        return sum(_numbers(x) for x in v.values())
    return int(v) if isinstance(v, int | float) else 0


def cstr(v: Any) -> str:
    """A char[] as bpftool formats it (a string, or a list of byte values), cut at the NUL."""
    if isinstance(v, list):
        v = bytes(int(x, 0) if isinstance(x, str) else int(x) for x in v).decode("latin-1")
    return str(v).split("\0", 1)[0]


# --- /proc and /sys counters -------------------------------------------------------------

def softirqs() -> dict[str, int]:
    """/proc/softirqs: vector name -> count over all CPUs."""
    out = {}
    for line in Path("/proc/softirqs").read_text().splitlines()[1:]:
        name, *counts = line.split()
        out[name.rstrip(":")] = sum(int(c) for c in counts)
    return out


def hardirqs() -> dict[str, int]:
    """/proc/interrupts: numbered IRQ lines only (the ones irq_handler_entry fires for),
    keyed by the handler name (the last column) -> count over all CPUs."""
    lines = Path("/proc/interrupts").read_text().splitlines()
    ncpu = len(lines[0].split())
    out: dict[str, int] = {}
    for line in lines[1:]:
        parts = line.split()
        if not parts or not parts[0].rstrip(":").isdigit():
            continue
        counts = [int(c) for c in parts[1:1 + ncpu] if c.isdigit()]
        name = parts[-1]
        out[name] = out.get(name, 0) + sum(counts)
    return out


def ctxt() -> int:
    """Context switches since boot, all CPUs (/proc/stat)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("ctxt "):
            return int(line.split()[1])
    raise LookupError("no ctxt line in /proc/stat")


def block_ios(dev: str = "vda") -> int:
    """Requests a block device completed that went through block_rq_issue: reads, writes and
    discards (/sys/block/DEV/stat fields 1, 5 and 12). Flushes (field 16) are left out: the
    flush machinery completes them (block_rq_complete, rwbs "FF") without an issue event, so
    a tool timing issue -> complete never sees them (checked with a tracefs instance)."""
    f = [int(x) for x in Path(f"/sys/block/{dev}/stat").read_text().split()]
    return sum(f[i] for i in (0, 4, 11) if i < len(f))


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def ratio(got: float, want: float) -> float:
    return got / want if want else float("inf") if got else 1.0


def wait_for(pred: Any, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def str_columns(df: Any) -> Iterable[str]:
    return [c for c in df.columns if df[c].dtype == object]
