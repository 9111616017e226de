"""An IPython shell for tests, whose `run_cell` raises the cell's error instead of printing it."""

from __future__ import annotations

from typing import Any

from IPython.core.interactiveshell import InteractiveShell

from kernelscope.jupyter import magic


class Shell:
    """An IPython shell whose `run_cell` raises the cell's error instead of printing it."""

    def __init__(self, ip: InteractiveShell) -> None:
        self.ip = ip

    @property
    def user_ns(self) -> dict[str, Any]:
        return self.ip.user_ns

    @property
    def magics(self) -> magic.BPFMagics:
        return self.ip.magics_manager.registry["BPFMagics"]

    def run_cell(self, source: str) -> Any:
        result = self.ip.run_cell(source)
        if result.error_before_exec is not None:
            raise result.error_before_exec
        if result.error_in_exec is not None:
            raise result.error_in_exec
        return result.result
