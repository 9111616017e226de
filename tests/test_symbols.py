"""kernelscope.symbols on the running system: kernel symbols from /proc/kallsyms (and what an
unprivileged reader is told), user symbols of a program built here, PIE and not, named by the
addresses it prints of its own functions, also after it exited or its binary was deleted."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest
from nobody import can_drop_privileges, run_as_nobody
from stacks_target import Target, build

from kernelscope import symbols
from kernelscope.symbols import KallsymsError, KernelSymbols


def kallsyms_lines(names: set[str]) -> dict[str, int]:
    """Addresses of text symbols `names` as /proc/kallsyms lists them (first occurrence)."""
    out: dict[str, int] = {}
    with open("/proc/kallsyms") as f:
        for line in f:
            addr, kind, name, *_ = line.split()
            if name in names and kind in "tT" and name not in out:
                out[name] = int(addr, 16)
    return out


def test_kernel_addresses_from_kallsyms_resolve_to_their_names() -> None:
    known = kallsyms_lines({"schedule", "do_sys_openat2", "vfs_read", "__x64_sys_getpid"})
    assert len(known) >= 3, known
    ks = symbols.kernel()
    for name, addr in known.items():
        hit = ks.resolve(addr)
        assert (hit.symbol, hit.offset, hit.module) == (name, 0, "kernel")
        inside = ks.resolve(addr + 3)
        assert (inside.symbol, inside.offset, inside.name) == (name, 3, name)
        assert ks.address_of(name) == addr
    many = ks.resolve_many(np.array(list(known.values()), dtype=np.uint64))
    assert [r.symbol for r in many] == list(known)
    assert ks.resolve(1).symbol is None  # below every symbol: a raw address
    assert ks.resolve(1).name == "0x1"


def test_module_names_come_from_brackets(tmp_path: Path) -> None:
    fake = tmp_path / "kallsyms"  # a kernel with modules (this one has none loaded but [bpf])
    fake.write_text("ffffffff81000000 T _stext\nffffffff81000100 t helper\n"
                    "ffffffffc0000000 t ext4_read [ext4]\nffffffffc0000100 d data_sym [ext4]\n")
    ks = KernelSymbols.load(fake)
    assert len(ks) == 3  # data symbols are not kept
    hit = ks.resolve(0xFFFFFFFFC0000010)
    assert (hit.symbol, hit.module, hit.offset) == ("ext4_read", "ext4", 0x10)


@pytest.mark.skipif(not can_drop_privileges(), reason="needs root to run a child as uid 65534")
def test_an_unprivileged_reader_is_told_why_kernel_addresses_are_zero() -> None:
    out = run_as_nobody(lambda: KernelSymbols.load() and None)
    assert out.error == "KallsymsError", out
    assert "kptr_restrict" in out.message
    assert "CAP_SYSLOG" in out.message


@pytest.fixture(scope="module", params=[True, False], ids=["pie", "no-pie"])
def binary(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("pie" if request.param else "fixed") / "stacks_target",
                 pie=request.param)


def test_user_addresses_resolve_to_the_functions_the_program_printed(binary: Path) -> None:
    t = Target.start(binary)
    try:
        snap = symbols.snapshot([t.pid])
        proc = snap.processes[t.pid]
        syms = proc.objects[str(binary)]
        assert syms is not None
        pie = binary.parent.name.startswith("pie")
        assert syms.pie == pie
        # a fixed-address executable runs where its ELF addresses say; a PIE anywhere
        assert (t.addresses["burn"] == syms.address_of("burn")) == (not pie)
        for name in ("burn", "nap", "main"):
            addr = t.addresses[name]
            assert snap.resolve(t.pid, addr).symbol == name
            hit = snap.resolve(t.pid, addr + 5)
            assert (hit.symbol, hit.offset, hit.module) == (name, 5, binary.name)
        libc = [p for p in proc.objects if "libc.so" in p]
        assert libc
        assert proc.objects[libc[0]] is not None  # a shared library's .dynsym too
    finally:
        t.exit()
    # the process is gone: the snapshot still names its addresses; a new one cannot read it
    assert not Path(f"/proc/{t.pid}").exists()
    assert snap.resolve(t.pid, t.addresses["burn"]).symbol == "burn"
    again = symbols.snapshot([t.pid])
    assert t.pid not in again
    assert "exited" in again.missed[t.pid]
    assert again.resolve(t.pid, t.addresses["burn"]).name == hex(t.addresses["burn"])


def test_a_deleted_binary_still_resolves_through_map_files(tmp_path: Path) -> None:
    binary = build(tmp_path / "doomed", pie=True)
    t = Target.start(binary)
    try:
        binary.unlink()  # the mapping now reads "/.../doomed (deleted)"
        snap = symbols.snapshot([t.pid])
        assert snap.resolve(t.pid, t.addresses["nap"]).symbol == "nap"
        assert snap.resolve(t.pid, t.addresses["nap"]).module == "doomed"
    finally:
        t.exit()


def test_objects_are_parsed_once_per_build_id(binary: Path) -> None:
    a, b = Target.start(binary), Target.start(binary)
    try:
        snap = symbols.snapshot([a.pid, b.pid])
        sa, sb = (snap.processes[p].objects[str(binary)] for p in (a.pid, b.pid))
        assert sa is sb
        assert sa is not None
        assert len(sa.build_id) == 40  # cc gives a sha1 build-id
    finally:
        a.exit()
        b.exit()


def test_maps_lines_are_parsed_and_non_executable_ones_dropped(tmp_path: Path) -> None:
    text = ("55d0-55e0 r--p 00000000 fe:00 1 /usr/bin/x\n"
            "55e0-55f0 r-xp 00001000 fe:00 1 /usr/bin/x\n"
            "7ff0-7ff2 r-xp 00000000 00:00 0 [vdso]\n"
            "7ff3-7ff4 rw-p 00000000 00:00 0\n")
    maps = symbols.parse_maps(text)
    assert [(m.start, m.offset, m.path) for m in maps] == [(0x55E0, 0x1000, "/usr/bin/x"),
                                                            (0x7FF0, 0, "[vdso]")]
    fake = tmp_path / "kallsyms"
    fake.write_text("0000000000000000 T _stext\n0000000000000000 t x\n")
    with pytest.raises(KallsymsError, match="every address as 0"):
        KernelSymbols.load(fake)


def test_the_vdso_is_read_from_the_process_memory() -> None:
    """The vDSO has no file: its ELF image is read from /proc/PID/mem; an address in its
    clock_gettime (at AT_SYSINFO_EHDR + the symbol's address) resolves to it."""
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype = ctypes.c_ulong
    base = getauxval(33)  # AT_SYSINFO_EHDR: where the kernel mapped the vDSO's ELF header
    snap = symbols.snapshot([os.getpid()])
    vdso = snap.processes[os.getpid()].objects["[vdso]"]
    assert vdso is not None
    at = vdso.address_of("clock_gettime")
    assert at is not None
    hit = snap.resolve(os.getpid(), base + at + 2)  # the vDSO is linked at 0, mapped at base
    assert (hit.symbol, hit.offset, hit.module) == ("clock_gettime", 2, "vdso")


def test_functions_inlined_into_burn_come_from_dwarf(binary: Path) -> None:
    """mix() is always_inline in burn(): its DW_TAG_inlined_subroutine range lies inside burn's
    .symtab extent, and an address there names burn with mix inlined (libc, without DWARF: none)."""
    t = Target.start(binary)
    try:
        snap = symbols.snapshot([t.pid])
        syms = snap.processes[t.pid].objects[str(binary)]
        assert syms is not None
        assert syms.inline is not None
        assert set(syms.inline.names) == {"mix"}
        start = syms.address_of("burn")
        assert start is not None
        size = int(syms.sizes[syms.names.index("burn")])
        lo, hi = int(syms.inline.lo[0]), int(syms.inline.hi[0])
        assert start <= lo < hi <= start + size
        hit = snap.resolve(t.pid, t.addresses["burn"] + (lo - start))
        assert (hit.symbol, hit.inlined, hit.names) == ("burn", ("mix",), ("burn", "mix"))
        assert snap.resolve(t.pid, t.addresses["burn"]).inlined == ()  # burn's own first bytes
        libc = next(o for p, o in snap.processes[t.pid].objects.items() if "libc.so" in p)
        assert libc is not None
        assert libc.inline is None
    finally:
        t.exit()


def test_the_object_caches_keep_the_most_recently_used_within_their_bound(monkeypatch) -> None:
    from kernelscope.symbols import elf

    monkeypatch.setattr(elf, "CACHE_OBJECTS", 2)
    monkeypatch.setattr(elf, "_cache", type(elf._cache)())
    monkeypatch.setattr(elf, "_by_file", type(elf._by_file)())
    paths = [p for p in ("/usr/bin/true", "/usr/bin/cat", "/usr/bin/ls", "/usr/bin/env") if Path(p).exists()]
    loaded = [elf.load(p) for p in paths]
    assert len(paths) >= 3
    assert len(elf._cache) <= 2
    assert len(elf._by_file) <= 2
    assert elf.cached(loaded[-1].build_id) is loaded[-1]  # the newest is kept ...
    assert elf.cached(loaded[0].build_id) is None  # ... the oldest was dropped
    assert elf.load(paths[-1]) is loaded[-1]  # a hit: not parsed again
