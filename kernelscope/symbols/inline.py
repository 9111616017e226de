"""Inlined functions from DWARF: for an address, the chain of functions the compiler inlined
there (DW_TAG_inlined_subroutine), outermost first, so a stack shows `burn;mix` when `mix` was
inlined into `burn`. Read only from objects that carry .debug_info (code built with -g; distro
libraries keep theirs in separate debug packages, not read) and not larger than MAX_DEBUG_INFO:
pyelftools parses every DIE in Python, which is cheap for a program of a few files and slow for
a large one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from elftools.common.exceptions import DWARFError, ELFError
from elftools.dwarf.ranges import BaseAddressEntry, RangeEntry
from elftools.elf.elffile import ELFFile

MAX_DEBUG_INFO = 4 << 20  # bytes of .debug_info read at most (about 0.5 s of parsing)


class InlineRanges:
    """Address ranges [lo, hi) of inlined calls, with their nesting depth and function name."""

    def __init__(self, lo: list[int], hi: list[int], depth: list[int], names: list[str]) -> None:
        self.lo = np.array(lo, dtype=np.uint64)
        self.hi = np.array(hi, dtype=np.uint64)
        self.depth = np.array(depth, dtype=np.int64)
        self.names = names

    def __len__(self) -> int:
        return len(self.names)

    def at(self, vaddr: int) -> tuple[str, ...]:
        """The functions inlined at ELF address `vaddr`, outermost first."""
        v = np.uint64(vaddr)
        hit = np.flatnonzero((self.lo <= v) & (v < self.hi))
        if len(hit) == 0:
            return ()
        hit = hit[np.argsort(self.depth[hit], kind="stable")]
        return tuple(self.names[i] for i in hit.tolist())


def read(elf: ELFFile) -> InlineRanges | None:
    """The inlined calls of an object with DWARF, or None (no .debug_info, too large, unreadable)."""
    sec = elf.get_section_by_name(".debug_info")
    if sec is None or sec["sh_size"] > MAX_DEBUG_INFO or not elf.has_dwarf_info():
        return None
    lo: list[int] = []
    hi: list[int] = []
    depth: list[int] = []
    names: list[str] = []
    try:
        dwarf = elf.get_dwarf_info(relocate_dwarf_sections=False)
        ranges = dwarf.range_lists()
        for cu in dwarf.iter_CUs():
            stack: list[tuple[Any, int]] = [(cu.get_top_DIE(), 0)]
            while stack:
                die, d = stack.pop()
                inner = d
                if die.tag == "DW_TAG_inlined_subroutine":
                    inner = d + 1
                    name = _name(die)
                    for a, b in _ranges(die, cu, ranges):
                        lo.append(a)
                        hi.append(b)
                        depth.append(d)
                        names.append(name)
                stack.extend((child, inner) for child in die.iter_children())
    except (DWARFError, ELFError, KeyError, ValueError, AttributeError):
        return None
    return InlineRanges(lo, hi, depth, names) if names else None


def _name(die: Any) -> str:
    """DW_AT_name, through DW_AT_abstract_origin / DW_AT_specification as inlined DIEs refer."""
    for _ in range(4):
        if "DW_AT_name" in die.attributes:
            return str(die.attributes["DW_AT_name"].value.decode("utf-8", "replace"))
        for ref in ("DW_AT_abstract_origin", "DW_AT_specification"):
            if ref in die.attributes:
                die = die.get_DIE_from_attribute(ref)
                break
        else:
            break
    return "[inlined]"


def _ranges(die: Any, cu: Any, ranges: Any) -> list[tuple[int, int]]:
    attrs = die.attributes
    if "DW_AT_low_pc" in attrs and "DW_AT_high_pc" in attrs:
        low = int(attrs["DW_AT_low_pc"].value)
        high = attrs["DW_AT_high_pc"]
        # DWARF 4+: high_pc is an offset from low_pc unless its form is an address
        end = int(high.value) if high.form == "DW_FORM_addr" else low + int(high.value)
        return [(low, end)]
    if "DW_AT_ranges" in attrs and ranges is not None and attrs["DW_AT_ranges"].form == "DW_FORM_sec_offset":
        top = cu.get_top_DIE().attributes
        base = int(top["DW_AT_low_pc"].value) if "DW_AT_low_pc" in top else 0
        out = []
        for entry in ranges.get_range_list_at_offset(attrs["DW_AT_ranges"].value, cu=cu):
            if isinstance(entry, BaseAddressEntry):
                base = int(entry.base_address)
            elif isinstance(entry, RangeEntry):
                a, b = int(entry.begin_offset), int(entry.end_offset)
                out.append((a, b) if getattr(entry, "is_absolute", False) else (base + a, base + b))
        return out
    return []  # DW_FORM_rnglistx (an index into .debug_rnglists): not read
