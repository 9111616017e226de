"""Errors that say what is really wrong, at the cell's line (issue 13, item 9).

Each case is the exact program a user met, compiled by the real compiler and judged by the
real kernel: the error's class, its key words, and the line the magic quotes
(`magic.usage_message`, what `%%bpf` shows as a UsageError).
"""

from __future__ import annotations

import os
import time

import pytest
from util import wait_for

from kernelscope import Probe
from kernelscope.backends import guard
from kernelscope.errors import SettingError, VerifierError
from kernelscope.jupyter.magic import usage_message

pytestmark = pytest.mark.kernel

EVENT = "struct e { u64 ts; };\n"


def shown(e: BaseException, source: str) -> str:
    """What %%bpf shows for `e` (no traceback), with the quoted cell line."""
    return usage_message(e, source, "p")


def bcc_ring(pages: str) -> str:
    return (EVENT + f"BPF_RINGBUF_OUTPUT(events, {pages});\n"
            "TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {\n"
            "  struct e v = {};\n"
            "  events.ringbuf_output(&v, sizeof(v), 0);\n"
            "  return 0;\n"
            "}\n")


def test_bcc_unbounded_loop_says_the_verifier_gave_up_on_the_loop_line() -> None:
    src = (EVENT + "BPF_RINGBUF_OUTPUT(events, 8);\n"
           "TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {\n"
           "  struct e v = {};\n"
           "  while (bpf_get_current_pid_tgid() > 1) { v.ts++; }\n"
           "  events.ringbuf_output(&v, sizeof(v), 0);\n"
           "  return 0;\n"
           "}\n")
    with pytest.raises(VerifierError) as exc:
        Probe(src).load()
    text = str(exc.value)
    assert "Program  too large" not in text.splitlines()[0]  # BCC's words about the code's size
    assert "gave up" in text
    assert "1,000,000" in text
    assert "loop" in text
    assert "BPF program is too large" in text  # the kernel's own verdict
    assert "line 5" in text
    seen = shown(exc.value, src)
    assert "line 5:" in seen
    assert "5 |   while (bpf_get_current_pid_tgid() > 1)" in seen


def test_mistyped_helper_is_the_cause_not_the_verifier_verdict() -> None:
    src = (EVENT + "BPF_RINGBUF_OUTPUT(events, 8);\n"
           "TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {\n"
           "  struct e v = {};\n"
           "  v.ts = bpf_ktime_get_nss();\n"
           "  events.ringbuf_output(&v, sizeof(v), 0);\n"
           "  return 0;\n"
           "}\n")
    with pytest.raises(VerifierError) as exc:
        Probe(src).load()
    first = str(exc.value).splitlines()[0]
    assert first.startswith("line 5: bpf_ktime_get_nss() is neither a BPF helper")
    assert "implicit declaration of function 'bpf_ktime_get_nss'" in first
    assert "did you mean bpf_ktime_get_ns()?" in first
    assert "Argument list too long" not in str(exc.value)
    seen = shown(exc.value, src)
    assert "5 |   v.ts = bpf_ktime_get_nss();" in seen


def test_ring_of_two_to_the_twenty_pages_is_a_size_error_naming_the_limit() -> None:
    src = bcc_ring("1 << 20")
    with pytest.raises(SettingError) as exc:
        Probe(src).load()
    text = str(exc.value)
    assert text.startswith("line 2: events:")
    assert "1,048,576 pages (4 GiB)" in text
    assert "at most 524,288 pages (2 GiB)" in text
    assert "could not open bpf map" not in text
    with pytest.raises(SettingError, match=r"^pages: a buffer of 1,048,576 pages \(4 GiB\)"):
        Probe(bcc_ring("8"), pages=2**20)


def test_ring_pages_not_a_power_of_two_names_map_value_neighbours_and_line() -> None:
    src = bcc_ring("3")
    with pytest.raises(SettingError) as exc:
        Probe(src).load()
    text = str(exc.value)
    assert text.startswith("line 2: events: ring buffer pages must be a power of two")
    assert "got 3 (in BPF_RINGBUF_OUTPUT(events, 3))" in text
    assert "Use 2 or 4" in text
    assert "2 | BPF_RINGBUF_OUTPUT(events, 3);" in shown(exc.value, src)


def test_core_ring_size_not_a_power_of_two_is_refused_at_its_line() -> None:
    src = ('#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n'
           "struct {\n  __uint(type, BPF_MAP_TYPE_RINGBUF);\n  __uint(max_entries, 4096 * 3);\n"
           "} events SEC(\".maps\");\n"
           'SEC("tp/syscalls/sys_enter_getppid")\nint h(void *ctx) { return 0; }\n')
    with pytest.raises(SettingError) as exc:
        Probe(src)
    text = str(exc.value)
    assert text.startswith("line 5: events:")
    assert "12288" in text
    assert "8192 or 16384" in text


CORE_DEREF = ('#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n'
              'SEC("tp/syscalls/sys_enter_getppid")\n'
              "int h(void *ctx) {\n"
              "  int *p = (int *)(long)bpf_get_current_pid_tgid();\n"
              "  return *p;\n"
              "}\n")


def test_core_verifier_headline_is_the_verdict_not_the_errno() -> None:
    with pytest.raises(VerifierError) as exc:
        Probe(CORE_DEREF).load()
    first = str(exc.value).splitlines()[0]
    assert first == "the verifier rejected h: R0 invalid mem access 'scalar'"
    assert "Permission denied" not in first
    seen = shown(exc.value, CORE_DEREF)
    assert "line 6:" in seen
    assert "6 |   return *p;" in seen


def test_event_larger_than_its_ring_is_refused_at_load() -> None:
    src = ("struct e { char buf[8192]; };\n"
           "BPF_RINGBUF_OUTPUT(events, 1);\n"
           "BPF_PERCPU_ARRAY(tmp, struct e, 1);\n"
           "TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {\n"
           "  int k = 0; struct e *v = tmp.lookup(&k);\n"
           "  if (!v || bpf_get_current_pid_tgid() >> 32 != PID) return 0;\n"
           "  events.ringbuf_output(v, sizeof(*v), 0);\n"
           "  return 0;\n"
           "}\n")
    pid = [f"-DPID={os.getpid()}"]
    with pytest.raises(SettingError) as exc:
        Probe(src, cflags=pid).load()
    text = str(exc.value)
    assert text.startswith("line 2: events: one event is 8,192 bytes (8,200 in the ring")
    assert "(4,096 bytes = 1 page)" in text
    assert "at least 4 pages" in text
    p = Probe(src, pages=4, cflags=pid).start()  # the size it asks for holds the event
    os.getppid()
    wait_for(lambda: p.stats["events"]["received"] == 1, what="the 8 KiB event")
    assert p.stats["events"]["dropped"] == 0
    p.close()


def test_event_larger_than_its_core_ring_is_refused_at_load() -> None:
    src = ('#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n'
           "struct big { char buf[6000]; };\n"
           "struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096); }\n"
           "  events SEC(\".maps\");\n"
           'SEC("tp/syscalls/sys_enter_getppid")\n'
           "int h(void *ctx) {\n"
           "  struct big *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);\n"
           "  if (e) bpf_ringbuf_submit(e, 0);\n"
           "  return 0;\n"
           "}\n")
    with pytest.raises(SettingError, match=r"^line 4: events: one event is 6,000 bytes .* at least 2 pages"):
        Probe(src).load()


CORE_LOOP = ('#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n'
             'SEC("tp/syscalls/sys_enter_getppid")\n'
             "int h(void *ctx) {\n"
             "  volatile u64 n = bpf_get_current_pid_tgid();\n"
             "  while (n) { n = n + 1; }\n"
             "  return 0;\n"
             "}\n")


def test_core_infinite_loop_is_rejected_in_one_verifier_pass_with_progress(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(guard, "SLOW_LOAD_NOTICE_S", 0.2)
    t0 = time.monotonic()
    with pytest.raises(VerifierError) as exc:
        Probe(CORE_LOOP).load()
    took = time.monotonic() - t0
    text = str(exc.value)
    first = text.splitlines()[0]
    assert first.startswith("line 6: h: the verifier gave up after following 1,000,001 instructions")
    assert "the load took" in first
    assert "the loop at line 6" in first
    assert "bpf_loop()" in first
    assert "BPF program is too large" in text
    assert "6 |   while (n) { n = n + 1; }" in shown(exc.value, CORE_LOOP)
    notices = capsys.readouterr().err.count("the verifier is still checking h")
    # the kernel's figure, in the verifier's whole log
    verified = int(exc.value.log.split("verification time ")[1].split(maxsplit=1)[0]) / 1e6
    if verified > 2 * guard.SLOW_LOAD_NOTICE_S:
        assert notices >= 1  # shown while the verifier ran, before the error
    # the verifier ran once, not once per growing log buffer (libbpf's default: 27 s here)
    assert took < 3 * verified + 2.0
