"""Program selection, map sizing before load, and errors that name the layer that failed, on
the running kernel, with CO-RE programs in the style of libbpf-tools (alternatives for one
event, `SEC("?...")`, stack maps left to the loader)."""

from __future__ import annotations

import pytest
from IPython.core.magic_arguments import parse_argstring
from producers import paused
from util import wait_for

from kernelscope import AttachError, Probe, UnsupportedError, VerifierError
from kernelscope.errors import (
    MapCreateError,
    RelocationError,
    SectionError,
    SettingError,
    UnknownNameError,
)
from kernelscope.jupyter.magic import BPFMagics, options, usage_message

pytestmark = pytest.mark.kernel

HEAD = """#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
"""
NR_GETPPID = 110  # x86_64

# two programs for one event, as softirqs/hardirqs/cpudist ship them (tp and raw_tp here)
ALTERNATIVES = HEAD + """
const volatile int targ_tgid = 0;
struct event { u32 pid; u32 which; };
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 1 << 16); } events SEC(".maps");

static int emit(u32 which)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (tgid != targ_tgid)
		return 0;
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e)
		return 0;
	e->pid = tgid;
	e->which = which;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp/syscalls/sys_enter_getppid")
int handle_tp(void *ctx)
{
	return emit(1);
}

SEC("raw_tp/sys_enter")
int BPF_PROG(handle_raw, struct pt_regs *regs, long id)
{
	if (id != NR_GETPPID)
		return 0;
	return emit(2);
}
""".replace("NR_GETPPID", str(NR_GETPPID))


def rows_for(n: int, **kw: object) -> tuple[list[str], list[int]]:
    """Run ALTERNATIVES with `kw` while a child makes `n` getppid() calls: its attach points
    and the sorted `which` column."""
    child = paused(n)
    p = Probe(ALTERNATIVES, globals={"targ_tgid": child.pid}, **kw).start()  # type: ignore[arg-type]
    try:
        child.go()
        expected = n * (2 if not kw else 1)
        wait_for(lambda: sum(ms.store.received for ms in p.outputs.values()) >= expected, timeout=10)
        p.stop()
        assert all(not w.startswith(("handle", "line")) for w in p.warnings)
        return p.attach_points(), sorted(p.df["which"].tolist())
    finally:
        p.close()


def test_one_of_two_alternative_programs_deselected_counts_each_event_once() -> None:
    n = 300
    _, both = rows_for(n)
    points, tp_only = rows_for(n, skip=["handle_raw"])
    raw_points, raw_only = rows_for(n, programs=["handle_raw"])
    assert len(both) == 2 * n  # what loading every program does: each event counted twice
    assert tp_only == [1] * n
    assert raw_only == [2] * n
    assert points == ["tracepoint:syscalls:sys_enter_getppid"]
    assert raw_points == ["raw_tracepoint:sys_enter"]


def test_unknown_program_names_are_named_with_the_programs_the_object_has() -> None:
    with pytest.raises(UnknownNameError, match=r"no program 'handle_btf'.*handle_tp, handle_raw"):
        Probe(ALTERNATIVES, skip=["handle_btf"]).load()
    with pytest.raises(SettingError, match="both programs= and skip="):
        Probe(ALTERNATIVES, programs=["handle_tp"], skip=["handle_tp"])
    with pytest.raises(SettingError, match="on_attach_error"):
        Probe(ALTERNATIVES, on_attach_error="ignore")


OPTIONAL = HEAD + """
SEC("?tp/syscalls/sys_enter_getppid")
int maybe(void *ctx)
{
	return 0;
}

SEC("tp/syscalls/sys_enter_getpid")
int always(void *ctx)
{
	return 0;
}
"""


def test_question_mark_section_is_not_loaded_unless_named() -> None:
    with Probe(OPTIONAL) as p:
        assert p.attach_points() == ["tracepoint:syscalls:sys_enter_getpid"]
    with Probe(OPTIONAL, programs=["maybe", "always"]) as p:
        assert sorted(p.attach_points()) == ["tracepoint:syscalls:sys_enter_getpid",
                                             "tracepoint:syscalls:sys_enter_getppid"]


# the same uprobe section twice: the first program's attach fails and must be reported at ITS line
BAD_ATTACH = HEAD + """
SEC("uprobe//nonexistent/kernelscope-no-such-binary:main")
int first_bad(void *ctx)
{
	return 0;
}

SEC("uprobe//nonexistent/kernelscope-no-such-binary:main")
int second_bad(void *ctx)
{
	return 0;
}

SEC("tp/syscalls/sys_enter_getpid")
int good(void *ctx)
{
	return 0;
}
"""


def test_attach_failure_raises_at_the_programs_own_line_or_is_a_warning_by_name() -> None:
    with pytest.raises(AttachError) as info:
        Probe(BAD_ATTACH).load()
    assert str(info.value).startswith('line 6: could not attach first_bad (SEC("uprobe//nonexistent/')
    with Probe(BAD_ATTACH, on_attach_error="warn") as p:
        assert p.attach_points() == ["tracepoint:syscalls:sys_enter_getpid"]
        failed = [w for w in p.warnings if "was not attached (on_attach_error='warn')" in w]
        assert [w.split()[0] for w in failed] == ["first_bad", "second_bad"]
        assert "line 12: could not attach second_bad" in failed[1]


STACKS = HEAD + """
struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(key_size, sizeof(u32));
} stackmap SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, u32);
	__type(value, s32);
} start SEC(".maps");

const volatile int targ_tgid = 0;

SEC("tp/syscalls/sys_enter_getppid")
int on_getppid(void *ctx)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (tgid != targ_tgid)
		return 0;
	s32 id = bpf_get_stackid(ctx, &stackmap, BPF_F_USER_STACK);
	bpf_map_update_elem(&start, &tgid, &id, 0);
	return 0;
}
"""


def test_maps_left_to_the_loader_are_sized_at_load_or_given_a_noted_default() -> None:
    child = paused(5)
    with Probe(STACKS, map_sizes={"stackmap": 16384}, globals={"targ_tgid": child.pid}) as p:
        prog = p.program
        assert prog is not None
        maps = prog.maps  # type: ignore[attr-defined]
        assert maps["stackmap"].max_entries == 16384
        assert maps["start"].max_entries == 10240
        assert maps["stackmap"].value_size == 127 * 8
        notes = [w for w in p.warnings if "max_entries 0" in w]
        assert len(notes) == 1
        assert notes[0].startswith("line 15: map start (HASH) has max_entries 0")
        assert "map_sizes={'start': N}" in notes[0]
        child.go()
        stack_id = int.from_bytes(prog.map_lookup("start", child.pid), "little", signed=True)
        assert stack_id >= 0  # the stack map took the child's user stack
    with Probe(STACKS) as p:
        assert any(w.startswith("line 9: map stackmap (STACK_TRACE) has max_entries 0") and "1,024" in w
                   for w in p.warnings)
    with pytest.raises(UnknownNameError, match=r"no map 'stacks'.*stackmap, start"):
        Probe(STACKS, map_sizes={"stacks": 10}).load()


def test_a_map_the_kernel_refuses_is_a_map_error_naming_its_type_and_size() -> None:
    src = HEAD + """
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, u64);
	__type(value, u64);
} counts SEC(".maps");

SEC("tp/syscalls/sys_enter_getppid")
int h(void *ctx)
{
	u64 k = 0;
	bpf_map_lookup_elem(&counts, &k);
	return 0;
}
"""
    with pytest.raises(MapCreateError) as info:
        Probe(src).load()
    first = str(info.value).splitlines()[0]
    assert first == ("line 11: the kernel refused to create map counts, a BPF_MAP_TYPE_ARRAY of "
                     "max_entries 4, 8-byte keys, 8-byte values: Invalid argument")
    assert "verifier" not in str(info.value)


def test_a_section_libbpf_cannot_type_is_named_at_its_line() -> None:
    src = HEAD + '\nSEC("tpx/syscalls/sys_enter_getppid")\nint h(void *ctx)\n{\n\treturn 0;\n}\n'
    with pytest.raises(SectionError) as info:
        Probe(src).load()
    text = str(info.value)
    assert text.startswith('line 6: libbpf cannot tell the program type from '
                           'SEC("tpx/syscalls/sys_enter_getppid") of program h')
    assert "did you mean 'tp/'" in text
    assert "verifier" not in text


def test_a_core_relocation_of_a_missing_field_names_struct_and_field_and_line() -> None:
    src = HEAD + """
struct task_struct___old { int no_such_field; } __attribute__((preserve_access_index));

SEC("tp/syscalls/sys_enter_getppid")
int h(void *ctx)
{
	struct task_struct___old *t = (void *)bpf_get_current_task();
	return BPF_CORE_READ(t, no_such_field);
}
"""
    with pytest.raises(RelocationError) as info:
        Probe(src).load()
    first = str(info.value).splitlines()[0]
    assert first.startswith("line 12: CO-RE relocation failed for h "
                            "(struct task_struct___old has no no_such_field)")
    assert usage_message(info.value, src, "p").startswith("%%bpf p: line 12: CO-RE relocation failed for h")


TWO_ON_ONE_SECTION = HEAD + """
SEC("tp/syscalls/sys_enter_getppid")
int fine(void *ctx)
{
	return 0;
}

SEC("tp/syscalls/sys_enter_getppid")
int broken(void *ctx)
{
	int *p = (int *)(long)bpf_get_current_pid_tgid();
	return *p;
}
"""


def test_a_verifier_rejection_names_its_program_and_line_and_can_be_skipped() -> None:
    with pytest.raises(VerifierError) as info:
        Probe(TWO_ON_ONE_SECTION).load()
    assert not isinstance(info.value, RelocationError)
    text = str(info.value)
    assert text.startswith("the verifier rejected broken: R0 invalid mem access 'scalar'")
    assert "skip=['broken'], %%bpf --skip broken" in text
    shown = usage_message(info.value, TWO_ON_ONE_SECTION, "p")
    assert shown.startswith("%%bpf p: line 16: the verifier rejected")
    with Probe(TWO_ON_ONE_SECTION, skip=["broken"]) as p:
        assert p.attach_points() == ["tracepoint:syscalls:sys_enter_getppid"]


def test_a_kprobe_refusal_in_a_core_cell_advises_core_sections() -> None:
    from kernelscope import tracepoints

    if tracepoints.config_option("CONFIG_KPROBES") not in (None, "n"):
        pytest.skip("this kernel has kprobes (CONFIG_KPROBES=y): nothing is refused")
    src = HEAD + '\nSEC("kprobe/do_nanosleep")\nint h(void *ctx)\n{\n\treturn 0;\n}\n'
    with pytest.raises(UnsupportedError) as info:
        Probe(src).load()
    text = str(info.value)
    assert text.startswith("line 6: kprobes are not available")
    assert 'SEC("tp/CATEGORY/EVENT")' in text
    assert "TRACEPOINT_PROBE" not in text


def test_a_string_for_an_integer_global_is_a_setting_error() -> None:
    with pytest.raises(SettingError, match=r"global targ_tgid is a 4-byte int \(int\): give it a number"):
        Probe(ALTERNATIVES, globals={"targ_tgid": "1234"}).load()
    with pytest.raises(SettingError, match="targ_tgid has 4 bytes: 4294967296 does not fit"):
        Probe(ALTERNATIVES, globals={"targ_tgid": 1 << 32}).load()


def test_magic_only_skip_and_map_size_reach_the_probe() -> None:
    line = "p --only handle_tp,handle_raw --skip other --skip more --map-size stackmap=16384"
    opts = options(parse_argstring(BPFMagics.bpf, line))
    assert opts.only == ["handle_tp", "handle_raw"]
    assert opts.skip == ["other", "more"]
    assert opts.map_sizes == {"stackmap": 16384}
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="--map-size expects NAME=N"):
        options(parse_argstring(BPFMagics.bpf, "p --map-size stackmap"))


BCC_ALTERNATIVES = """
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) { return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_getpid) { return 0; }
"""


def test_bcc_selection_skips_auto_attached_functions_and_refuses_map_sizes() -> None:
    with Probe(BCC_ALTERNATIVES, backend="bcc", skip=["tracepoint__syscalls__sys_enter_getpid"]) as p:
        assert p.attach_points() == ["tracepoint:syscalls:sys_enter_getppid"]
    with pytest.raises(SettingError, match="a BCC map is sized in its macro"):
        Probe(BCC_ALTERNATIVES, backend="bcc", map_sizes={"x": 1})
