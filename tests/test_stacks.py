"""kernelscope.stacks without the kernel: BCC ctypes keys as numpy dtypes, per-CPU values
summed over CPUs, and how stack ids that name no stack are shown."""

from __future__ import annotations

import ctypes
import errno

import numpy as np

from kernelscope import stacks


class Key(ctypes.Structure):  # as BCC builds a table's Key from the program's struct
    _fields_ = [("pid", ctypes.c_uint32), ("user_stack_id", ctypes.c_int),
                ("comm", ctypes.c_char * 16), ("__pad_0", ctypes.c_char * 4), ("ts", ctypes.c_uint64)]


def test_bcc_ctypes_keys_become_numpy_dtypes_with_strings() -> None:
    dt = stacks.ctypes_dtype(Key)
    assert dt.itemsize == ctypes.sizeof(Key)
    assert dt.names == ("pid", "user_stack_id", "comm", "__pad_0", "ts")
    assert dt["comm"] == np.dtype("S16")
    assert dt.fields is not None
    assert dt.fields["ts"][1] == Key.ts.offset
    k = Key(7, -14, b"burner", b"", 99)
    rec = np.frombuffer(bytes(k), dt)[0]
    got = (int(rec["pid"]), int(rec["user_stack_id"]), rec["comm"], int(rec["ts"]))
    assert got == (7, -14, b"burner", 99)
    assert stacks.ctypes_dtype(ctypes.c_uint64 * 4) == np.dtype(("<u8", (4,)))


def test_per_cpu_values_are_summed_over_cpus() -> None:
    vdt = np.dtype([("ns", "<u8"), ("n", "<u4"), ("comm", "S4")])  # 16 bytes, 8-aligned per CPU
    ncpus = 3
    per = np.zeros((2, ncpus), vdt)
    per["ns"] = [[1, 2, 3], [10, 20, 30]]
    per["n"] = [[1, 1, 0], [0, 0, 5]]
    per["comm"] = b"ab"
    raw = per.view(np.uint8).reshape(2, ncpus * vdt.itemsize)
    out = stacks._values(raw, vdt, per_cpu=True, ncpus=ncpus)
    assert out["ns"].tolist() == [6, 60]
    assert out["n"].tolist() == [2, 5]
    assert out["comm"].tolist() == [b"ab", b"ab"]  # not a number: the first CPU's
    scalar = np.array([[4, 5, 6], [0, 0, 1]], "<u8").view(np.uint8).reshape(2, 24)
    assert stacks._values(scalar, np.dtype("<u8"), per_cpu=True, ncpus=3).tolist() == [15, 1]


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
