"""kernelscope: explore how kernel events reach user space, from Jupyter.

`%load_ext kernelscope` for the `%%bpf` magics; `Probe` for the Python API; `examples` for the
shipped example probes (`kernelscope.examples.get("opens")`).
"""

from __future__ import annotations

from typing import Any

from . import examples
from .addresses import ip_address
from .errors import (
    AttachError,
    BPFPermissionError,
    CaptureError,
    ClosedError,
    CompileError,
    InternalError,
    KernelscopeError,
    SchemaError,
    SettingError,
    SetupError,
    UnknownNameError,
    UnknownTracepointError,
    UnsupportedError,
    UserRingFullError,
    VerifierError,
)
from .flame import flamegraph
from .probe import Probe, close_all, live_probes
from .spill import set_memory_budget

__version__ = "0.1.0"

__all__ = [
    "AttachError",
    "BPFPermissionError",
    "CaptureError",
    "ClosedError",
    "CompileError",
    "InternalError",
    "KernelscopeError",
    "Probe",
    "SchemaError",
    "SettingError",
    "SetupError",
    "UnknownNameError",
    "UnknownTracepointError",
    "UnsupportedError",
    "UserRingFullError",
    "VerifierError",
    "close_all",
    "examples",
    "flamegraph",
    "ip_address",
    "live_probes",
    "load_ipython_extension",
    "set_memory_budget",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython: Any) -> None:
    from .jupyter.magic import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .jupyter.magic import unload

    unload(ipython)
