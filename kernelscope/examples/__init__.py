"""Example probes shipped with kernelscope, each a `%%bpf` cell to run as it is.

    %bpf_examples                  # one line each: name and what it shows
    %bpf_examples opens            # puts the `opens` cell into the next input

    from kernelscope import examples
    examples.names()               # ['exec_exit', 'opens', ...]
    print(examples.get("opens"))   # the cell: its %%bpf line, then the program

The programs (the .c files beside this module) use only what works whatever kernel headers
are installed: tracepoint `args`, BPF helpers, a perf_event timer, and CO-RE (BPF_CORE_READ)
for kernel structs. Each binds a probe to the example's name; its first comment says what to
read afterwards.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources

from ..errors import UnknownNameError

__all__ = ["Example", "UnknownExampleError", "all_examples", "example", "get", "listing", "names"]


class UnknownExampleError(UnknownNameError):
    """No shipped example has that name; the message lists those there are."""


@dataclass(frozen=True)
class Example:
    """One shipped example: a `%%bpf` cell made of a magic line and a program file."""

    name: str
    summary: str  # what it shows, one line
    read: str  # what to look at once it runs
    file: str  # the program, beside this module
    options: str = ""  # the rest of the %%bpf line

    @property
    def source(self) -> str:
        """The program's text."""
        return resources.files(__name__).joinpath(self.file).read_text()

    @property
    def backend(self) -> str:
        return "CO-RE" if self.file.endswith(".bpf.c") else "BCC"

    @property
    def cell(self) -> str:
        """The whole cell: `%%bpf NAME OPTIONS`, then the program."""
        line = " ".join(["%%bpf", self.name, *([self.options] if self.options else [])])
        return f"{line}\n{self.source}"


_EXAMPLES = (
    Example("exec_exit", "every exec and exit of a process: pid, parent, file run, exit status, lifetime",
            "exec_exit.df", "exec_exit.bpf.c", "--max-rows 100000"),
    Example("opens", "every openat(2): pid, comm, the path, flags and the fd or -errno it returned",
            "opens.df", "opens.c", "--max-rows 100000"),
    Example("tcp_states", "TCP state changes (SYN_SENT, ESTABLISHED, ...) with addresses and ports",
            "tcp_states.df", "tcp_states.bpf.c", "--max-rows 100000"),
    Example("syscall_counts", "system calls counted per process and syscall number in a map",
            'syscall_counts.maps["counts"].frame()', "syscall_counts.c"),
    Example("read_sizes", "a log2 histogram of the bytes read(2) returned, kept in a map",
            'read_sizes.maps["read_bytes"].hist(unit="bytes")', "read_sizes.c"),
    Example("bash_commands", "each command line typed into an interactive bash, by a uretprobe on readline",
            "bash_commands.df", "bash_commands.bpf.c"),
    Example("profile", "a CPU profile: stacks sampled at 99 Hz on every CPU, for a flame graph",
            'profile.stacks(), profile.flamegraph(by="comm")', "profile.c",
            "--perf-event do_sample --freq 99"),
)


def all_examples() -> tuple[Example, ...]:
    return _EXAMPLES


def names() -> list[str]:
    """The examples' names, in the order they are listed."""
    return [e.name for e in _EXAMPLES]


def example(name: str) -> Example:
    """The example called `name`; UnknownExampleError (listing the names) if there is none."""
    for e in _EXAMPLES:
        if e.name == name:
            return e
    close = difflib.get_close_matches(name, names(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UnknownExampleError(f"no example {name!r}; {hint}examples: {', '.join(names())}")


def get(name: str) -> str:
    """The `%%bpf` cell of example `name`, ready to run."""
    return example(name).cell


def listing() -> str:
    """One line per example: its name, what it shows and its backend."""
    width = max(len(n) for n in names())
    return "\n".join(f"{e.name:<{width}}  {e.summary} ({e.backend})" for e in _EXAMPLES)
