"""An IPython shell for tests, whose `run_cell` raises the cell's error instead of printing it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
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


def shell_fixtures(*setup: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """A test module's `shell` (one per module, `setup` cells run) and an autouse fixture
    stopping every probe after each test: `shell, no_probes_left = shell_fixtures(...)`."""

    @pytest.fixture(scope="module")
    def shell() -> Iterator[Shell]:
        yield from ipython_shell(*setup)

    @pytest.fixture(autouse=True)
    def no_probes_left(shell: Shell) -> Iterator[None]:
        yield
        with capture_output():
            shell.run_cell("%bpf_stop --all")

    return shell, no_probes_left
