"""kernelscope.stacks without the kernel: how stack ids that name no stack are shown (key
decoding and per-CPU sums are kernelscope.maps', tested in test_maps_types.py)."""

from __future__ import annotations

import errno

import numpy as np

from kernelscope import stacks


def test_stack_ids_that_name_no_stack() -> None:
    table = {3: np.array([0x1000], np.uint64)}
    assert stacks._missing("user", 3, table) is None
    assert stacks._missing("kernel", -errno.EFAULT, table) == ()  # no stack of that kind
    assert stacks._missing("user", -errno.EEXIST, table) == ("[missing user stack]",)
    assert stacks._missing("user", 5, table) == ("[missing user stack]",)  # since overwritten
    assert stacks._error_name(-errno.EEXIST, table) == "EEXIST"
    assert stacks._error_name(-errno.ENOMEM, table) == "ENOMEM"
    assert stacks._error_name(5, table) == "not in the stack map"
    assert stacks._error_name(3, table) is None
