"""CO-RE cells before the kernel sees them: map and type discovery, rewriting, BTF dtypes.

These compile with clang (no privileges needed) and read the object's BTF with bpftool;
nothing is loaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelscope.backends import btf, core
from kernelscope.errors import CompileError, SchemaError
from kernelscope.readers.user_ring import to_records

RING = 'struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 1 << 16); } rb SEC(".maps");\n'
PERF = ('struct { __uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY); __uint(key_size, 4); __uint(value_size, 4); }'
        ' pb SEC(".maps");\n')

SHAPES = {
    "reserve into a declared pointer": (RING, "struct event *e = bpf_ringbuf_reserve(&rb, sizeof(*e), 0);\n"
                                              "if (!e) return 0; e->a = 1; bpf_ringbuf_submit(e, 0);"),
    "reserve with sizeof(struct)": (RING, "struct event *e;\n"
                                          "e = bpf_ringbuf_reserve(&rb, sizeof(struct event), 0);\n"
                                          "if (!e) return 0; bpf_ringbuf_submit(e, 0);"),
    "reserve with a cast": (RING, "void *p = (struct event *)bpf_ringbuf_reserve(&rb, 24, 0);\n"
                                  "if (!p) return 0; bpf_ringbuf_discard(p, 0);"),
    "ringbuf_output of a local": (RING, "struct event e = {};\nbpf_ringbuf_output(&rb, &e, sizeof(e), 0);"),
    "perf_event_output of a local": (
        PERF, "struct event e = {};\nbpf_perf_event_output(ctx, &pb, BPF_F_CURRENT_CPU, &e, sizeof(e));"),
}
EVENT = "struct event { u8 a; u64 b; char name[5]; u16 c[3]; };\n"


def cell(maps: str, body: str) -> str:
    return ('#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n' + EVENT + maps
            + 'SEC("tp/sched/sched_process_exit")\nint f(void *ctx) {\n' + body + "\nreturn 0;\n}\n")


@pytest.mark.parametrize("shape", list(SHAPES))
def test_event_type_is_found_and_its_btf_layout_becomes_the_dtype(shape: str, tmp_path: Path) -> None:
    maps, body = SHAPES[shape]
    src = cell(maps, body)
    prep = core.prepare(src)
    name = "rb" if "rb SEC" in maps else "pb"
    assert prep.event_types == {name: "struct event"}
    assert prep.maps[name].kind == ("ringbuf" if name == "rb" else "perf")
    obj = tmp_path / "cell.o"
    core.compile_object(prep, src, (), obj)
    types = btf.Types.load(obj)
    var = types.var(core.ANCHOR + name)
    assert var is not None
    dt = types.dtype(types.resolve(types.resolve(var["type_id"])["type_id"]))
    # C layout: u8 at 0, u64 at 8, char[5] at 16, u16[3] at 22, size 32 (aligned to 8)
    assert dt.names == ("a", "b", "name", "c")
    assert [dt.fields[n][1] for n in dt.names] == [0, 8, 16, 22]
    assert dt.itemsize == 32
    assert dt["name"] == np.dtype("S5")
    assert dt["c"].shape == (3,)


def test_call_sites_are_wrapped_on_their_own_line_and_counted() -> None:
    src = cell(RING, "struct event *e = bpf_ringbuf_reserve(&rb, sizeof(*e), 0);\nif (!e) return 0;\n"
                     "bpf_ringbuf_submit(e, 0);\n// bpf_ringbuf_output(&rb, 0, 0, 0) in a comment\n"
                     "bpf_ringbuf_output(&rb, e, sizeof(*e), 0);")
    prep = core.prepare(src)
    assert prep.maps["rb"].call_sites == [7, 11]  # lines of the cell, comment skipped
    user = prep.source.split('#line 1 "cell"\n', 1)[1]
    assert user.count("__ks_open()") == 2
    assert len(user.splitlines()) >= len(src.splitlines())  # no line added inside the cell
    for i, line in enumerate(src.splitlines()):
        if "bpf_ringbuf" not in line:
            assert user.splitlines()[i] == line  # untouched lines stay where they were


def test_pages_override_ring_sizes_and_must_be_powers_of_two() -> None:
    src = cell(RING, "")
    assert core.prepare(src).maps["rb"].pages == (1 << 16) // core.PAGE
    assert core.prepare(src, pages=4).maps["rb"].pages == 4
    assert core.prepare(src, pages={"rb": 8}).maps["rb"].pages == 8
    with pytest.raises(ValueError, match="rb: ring buffer pages must be a power of two, got 3"):
        core.prepare(src, pages=3)


def test_prelude_follows_the_cells_own_includes_and_adds_a_license_only_when_missing() -> None:
    bare = 'SEC("tp/sched/sched_process_exit") int f(void *ctx) { return 0; }'
    prep = core.prepare(bare)
    assert '#include "vmlinux.h"' in prep.source
    assert "bpf_core_read.h" in prep.source
    assert 'SEC("license")' in prep.source
    plain = "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n" + bare
    prep = core.prepare(plain)
    assert '#include "vmlinux.h"' not in prep.source
    assert "<linux/bpf.h>" in prep.source
    licensed = bare + '\nchar LICENSE[] SEC("license") = "GPL";\n'
    assert core.prepare(licensed).source.count('SEC("license")') == 1


def test_is_core_looks_at_code_not_comments_or_strings() -> None:
    assert core.is_core('SEC("tp/x/y") int f(void *c) { return 0; }')
    assert not core.is_core('// SEC("tp/x/y")\nTRACEPOINT_PROBE(sched, sched_process_exit) { return 0; }')
    assert not core.is_core('char s[] = "SEC(";\nTRACEPOINT_PROBE(sched, sched_process_exit) { return 0; }')


def test_user_ring_sample_type_comes_from_the_drain_callback() -> None:
    src = ('struct sample_in { u32 seq; u64 v; };\n'
           'struct { __uint(type, BPF_MAP_TYPE_USER_RINGBUF); __uint(max_entries, 4096); } ur SEC(".maps");\n'
           "static long cb(struct bpf_dynptr *d, void *c) {\n  struct sample_in s;\n"
           "  bpf_dynptr_read(&s, sizeof(s), d, 0, 0);\n  return 0;\n}\n"
           'SEC("tp/syscalls/sys_exit_kill") int f(void *ctx) {\n'
           "  bpf_user_ringbuf_drain(&ur, cb, 0, 0);\n  return 0;\n}\n")
    prep = core.prepare(src)
    assert list(prep.user_rings) == ["ur"]
    assert not prep.maps
    assert prep.event_types == {"ur": "struct sample_in"}
    assert "__ks_drained(0, __ks_r)" in prep.source


def test_compile_errors_point_at_the_cells_lines(tmp_path: Path) -> None:
    src = cell(RING, "int x = ;")
    with pytest.raises(CompileError) as info:
        core.compile_object(core.prepare(src), src, (), tmp_path / "c.o")
    assert info.value.line == src.splitlines().index("int x = ;") + 1
    assert re.search(r"line \d+: error: expected expression", str(info.value))


# --- records for probe.send -----------------------------------------------------------------

SAMPLE = np.dtype({"names": ["seq", "value", "text"], "formats": ["<u4", "<i8", "S8"],
                   "offsets": [0, 8, 16], "itemsize": 24})


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(-2**63, 2**63 - 1),
                          st.text(alphabet="abcxyz", max_size=8)), max_size=20))
def test_dicts_dataframes_and_arrays_give_the_same_bytes(rows: list[tuple[int, int, str]]) -> None:
    dicts = [{"seq": s, "value": v, "text": t} for s, v, t in rows]
    a = to_records(dicts, SAMPLE) if rows else np.zeros(0, SAMPLE)
    b = to_records(pd.DataFrame(dicts, columns=["seq", "value", "text"]), SAMPLE)
    c = to_records(a, SAMPLE)
    assert a.tobytes() == b.tobytes() == c.tobytes()
    assert [r["text"].decode() for r in a] == [t for _, _, t in rows]


def test_bad_records_are_refused_with_the_reason() -> None:
    with pytest.raises(SchemaError, match="colour not in the sample struct"):
        to_records([{"seq": 1, "colour": 2}], SAMPLE)
    with pytest.raises(SchemaError, match="column 'seq' does not fit"):
        to_records([{"seq": "one"}], SAMPLE)
    with pytest.raises(SchemaError, match="sample struct of this map is unknown"):
        to_records([{"seq": 1}], None)
    assert to_records({"seq": 7}, SAMPLE)["seq"].tolist() == [7]  # one dict is one record


def test_a_struct_with_a_bitfield_is_refused_by_name(tmp_path: Path) -> None:
    src = cell(RING.replace("rb SEC", "rb SEC"), "struct bits *e = bpf_ringbuf_reserve(&rb, sizeof(*e), 0);"
                                                  "if (e) bpf_ringbuf_submit(e, 0);")
    src = src.replace(EVENT, "struct bits { u32 a : 3; u32 b : 29; };\n")
    prep = core.prepare(src)
    obj = tmp_path / "c.o"
    core.compile_object(prep, src, (), obj)
    types = btf.Types.load(obj)
    var = types.var(core.ANCHOR + "rb")
    assert var is not None
    with pytest.raises(SchemaError, match="bitfields are not supported"):
        types.dtype(types.resolve(types.resolve(var["type_id"])["type_id"]), "struct bits")


def test_elf_symbols_give_each_global_its_section_offset_and_size(tmp_path: Path) -> None:
    from kernelscope.backends import elf

    src = ('#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n'
           "const volatile u32 a = 1;\nconst volatile u64 b = 2;\nconst volatile char name[5] = {};\n"
           "u64 counter;\n"
           'SEC("tp/sched/sched_process_exit") int f(void *ctx) { counter += a + b + name[0]; return 0; }\n')
    obj = tmp_path / "g.o"
    core.compile_object(core.prepare(src), src, (), obj)
    syms = elf.symbols(obj)
    assert (syms["a"].section, syms["a"].size) == (".rodata", 4)
    assert (syms["b"].section, syms["b"].size) == (".rodata", 8)
    assert syms["b"].offset % 8 == 0
    assert syms["b"].offset != syms["a"].offset
    assert (syms["name"].section, syms["name"].size) == (".rodata", 5)
    assert (syms["counter"].section, syms["counter"].size) == (".bss", 8)
    assert syms["f"].section == "tp/sched/sched_process_exit"


def test_a_struct_named_like_a_kernel_type_gets_told_why(tmp_path: Path) -> None:
    src = ('#include "vmlinux.h"\nstruct sample { int x; };\n'
           'SEC("tp/sched/sched_process_exit") int f(void *c) { return 0; }\n')
    with pytest.raises(CompileError) as info:
        core.compile_object(core.prepare(src), src, (), tmp_path / "c.o")
    assert info.value.line == 2
    assert "vmlinux.h already defines sample" in str(info.value)
