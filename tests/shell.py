"""An IPython shell for tests, whose `run_cell` raises the cell's error instead of printing it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

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


def ipython_shell(*setup: str) -> Iterator[Shell]:
    """A module fixture's body: kernelscope's extension loaded into a history-less shell,
    `setup` cells run; afterwards every probe stopped and the extension unloaded."""
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    ip = InteractiveShell.instance(config=config)
    ip.run_line_magic("load_ext", "kernelscope")
    for cell in setup:
        ip.run_cell(cell)
    yield Shell(ip)
    with capture_output():
        ip.run_cell("%bpf_stop --all")
    ip.run_line_magic("unload_ext", "kernelscope")
