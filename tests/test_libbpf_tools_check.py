"""The libbpf-tools check harness (tools/): its ground-truth readers, one spec run end to end on
a tool written here in libbpf-tools style, and the spec table's facts against the real sources
when a mirror of iovisor/bcc is present (`make check-libbpf-tools` runs the tools themselves)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import ground  # noqa: E402
import libbpf_tools_check as check  # noqa: E402
from libbpf_tools_specs import SPECS, Spec  # noqa: E402
from spec_base import Opts, Run, exact  # noqa: E402

from kernelscope import Probe  # noqa: E402


def test_ground_sums_nested_fields_and_cuts_strings() -> None:
    dumped = [{"key": 1, "value": {"slots": [1, 2], "comm": "a"}}, {"value": {"h": [{"slots": [3, 4]}]}}]
    assert ground.total(dumped, "slots") == 10
    assert ground.cstr([0x61, 0x62, 0, 0x63]) == "ab"
    assert ground.cstr(["0x61", "0x00", "0x7a"]) == "a"
    assert ground.cstr("ab\0stale") == "ab"


def test_ground_counters_read_proc() -> None:
    a, b = ground.softirqs(), ground.softirqs()
    assert "TIMER" in a
    assert all(b[k] >= a[k] for k in a)
    irqs = ground.hardirqs()
    assert irqs
    assert all(v >= 0 for v in irqs.values())
    assert ground.ctxt() > 0


# A tool in libbpf-tools style: an event header next to the .bpf.c, a `const volatile`
# filter its "loader" (the spec) sets, a hash map the check reads with bpftool.
HEADER = """\
#ifndef __KSCOUNT_H
#define __KSCOUNT_H
#define MAX_PIDS 64
struct count_val { __u64 calls; };
#endif
"""
SOURCE = """\
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "kscount.h"

const volatile pid_t targ_tgid = 0;

struct {
\t__uint(type, BPF_MAP_TYPE_HASH);
\t__uint(max_entries, MAX_PIDS);
\t__type(key, u32);
\t__type(value, struct count_val);
} counts SEC(".maps");

SEC("tracepoint/syscalls/sys_enter_getpriority")
int count_getpriority(void *ctx)
{
\tu32 tgid = bpf_get_current_pid_tgid() >> 32;
\tstruct count_val zero = {}, *v;

\tif (targ_tgid && tgid != targ_tgid)
\t\treturn 0;
\tv = bpf_map_lookup_elem(&counts, &tgid);
\tif (!v) {
\t\tbpf_map_update_elem(&counts, &tgid, &zero, BPF_NOEXIST);
\t\tv = bpf_map_lookup_elem(&counts, &tgid);
\t\tif (!v)
\t\t\treturn 0;
\t}
\t__sync_fetch_and_add(&v->calls, 1);
\treturn 0;
}

char LICENSE[] SEC("license") = "GPL";
"""
CALLS = 7


def _opts(run: Run) -> Opts:
    child = run.spawn(f"import os\nfor _ in range({CALLS}): os.getpriority(os.PRIO_PROCESS, 0)", "ks-count")
    run.info["pid"] = child.pid
    return Opts(globals={"targ_tgid": child.pid})


def _exercise(run: Run) -> tuple[bool, str]:
    ground.go(run.children[0])
    mine = [e for e in ground.dump("counts") if int(e["key"]) == run.info["pid"]]
    return exact(ground.total(mine, "calls"), CALLS, "getpriority calls")


@pytest.fixture
def kscount(tmp_path: Path) -> Spec:
    (tmp_path / "kscount.h").write_text(HEADER)
    (tmp_path / "kscount.bpf.c").write_text(SOURCE)
    return Spec("kscount", f"getpriority() x{CALLS}", "calls of the child's tgid", _opts, _exercise)


@pytest.mark.kernel
def test_a_spec_runs_end_to_end_against_ground_truth(kscount: Spec, tmp_path: Path) -> None:
    """--degrade runs with what this kernelscope has: the file read by hand, its folder on -I."""
    row = check.run_one(kscount, tmp_path, degrade=True)
    assert row["result"] == "pass", row
    assert f"{CALLS} getpriority calls, trigger made {CALLS}" in row["detail"]
    assert "targ_tgid=" in row["how"]


@pytest.mark.kernel
def test_a_missing_feature_is_a_needs_row_not_a_crash(kscount: Spec, tmp_path: Path) -> None:
    """Without --degrade the row runs through Probe.from_file, or says it needs it."""
    row = check.run_one(kscount, tmp_path, degrade=False)
    if hasattr(Probe, "from_file"):
        assert row["result"] == "pass", row
    else:
        assert row["result"] == "needs", row
        assert "Probe.from_file" in row["detail"]
    skipping = Spec("kscount", "", "", lambda run: Opts(skip=["other"]), _exercise)
    row = check.run_one(skipping, tmp_path, degrade=False)
    params = check.inspect.signature(Probe.__init__).parameters
    if "skip" not in params:
        assert row["result"] == "needs", row
        assert "skip=" in row["detail"]


def test_markdown_table_has_a_row_per_tool_and_a_tally() -> None:
    rows = [{"program": "a", "how": "x|y", "check": "c", "result": "pass", "detail": "3 rows"},
            {"program": "b", "how": "", "check": "c", "result": "needs", "detail": "skip="}]
    text = check.markdown(rows)
    assert "| a | x\\|y | c | pass: 3 rows |" in text
    assert "| b |  | c | needs: skip= |" in text
    assert text.endswith("1 needs, 1 pass of 2")


@pytest.fixture(scope="module")
def libbpf_tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not check.MIRROR.exists():
        pytest.skip(f"no iovisor/bcc mirror at {check.MIRROR}: spec facts are checked where one is fetched")
    return check.working_copy(None, tmp_path_factory.mktemp("bcc"))


def test_working_copy_has_the_tools_and_not_the_arch_headers(libbpf_tools: Path) -> None:
    assert (libbpf_tools / "opensnoop.bpf.c").is_file()
    assert (libbpf_tools / "compat.bpf.h").is_file()
    assert not (libbpf_tools / "vmlinux.h").exists()


def test_spec_facts_match_the_tools_sources(libbpf_tools: Path) -> None:
    """Every program, global and map a spec names is in the tool's .bpf.c; each loader exists."""
    for spec in SPECS:
        bpf = (libbpf_tools / spec.bpf).read_text()
        assert (libbpf_tools / f"{spec.name}.c").is_file(), spec.loader
        run = Run(libbpf_tools)
        try:
            opts = spec.options(run)
        finally:
            run.close()
        progs = set(re.findall(r"SEC\(\"[^.\"][^\"]*\"\)\s*(?:int|void)\s+(?:BPF_\w+\()?(\w+)", bpf))
        named = [*opts.programs, *opts.skip]
        named += [a.args[0] for a in opts.attach if a.method == "attach_perf_event"]
        named += [a.args[2] for a in opts.attach if a.method == "attach_uprobe"]
        for p in named:
            assert p in progs, f"{spec.name}: no program {p} in {sorted(progs)}"
        for g in opts.globals:
            assert re.search(rf"const volatile [^;=]*\b{g}\b", bpf), f"{spec.name}: no const volatile {g}"
        for m in opts.map_sizes:
            assert re.search(rf"\}}\s*{m}\s+SEC\(\"\.maps\"\)", bpf), f"{spec.name}: no map {m}"
