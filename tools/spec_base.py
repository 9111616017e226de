"""Shared parts of the libbpf-tools specs: options as a loader sets them, one run, checks."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ground

INVALID_UID = 0xFFFFFFFF  # execsnoop.h / opensnoop.c: ((uid_t)-1), "no uid filter"
STACK_DEPTH_BYTES = 127 * 8
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


@dataclass
class Attach:
    """A by-hand attach call, as the loader makes it: `probe.<method>(*args, **kwargs)`."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.method}({', '.join(parts)})"


@dataclass
class Opts:
    programs: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    globals: dict[str, Any] = field(default_factory=dict)
    map_sizes: dict[str, int] = field(default_factory=dict)
    include: list[str] = field(default_factory=list)
    usdt: list[tuple[Any, str, str]] = field(default_factory=list)
    attach: list[Attach] = field(default_factory=list)
    note: str = ""

    def probe_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"programs": self.programs, "skip": self.skip, "globals": self.globals,
                              "map_sizes": self.map_sizes, "usdt": self.usdt}
        return {k: v for k, v in kw.items() if v}

    def describe(self) -> str:
        parts = []
        if self.programs:
            parts.append(f"programs={self.programs}")
        if self.skip:
            parts.append(f"skip={self.skip}")
        if self.globals:
            parts.append("globals={" + ", ".join(f"{k}={v}" for k, v in self.globals.items()) + "}")
        if self.map_sizes:
            parts.append(f"map_sizes={self.map_sizes}")
        if len(self.attach) > 2:  # memleak, gethostlatency: one call shown, the rest by program
            rest = ", ".join(f"{a.args[1]}->{a.args[2]}" for a in self.attach[1:])
            parts.append(f"{self.attach[0].describe()} and {len(self.attach) - 1} more: {rest}")
        else:
            parts += [a.describe() for a in self.attach]
        if self.note:
            parts.append(self.note)
        return "; ".join(parts) or "defaults"


class Run:
    """One tool's run: the probe, the trigger children, what the trigger recorded."""

    def __init__(self, tools: Path) -> None:
        self.tools = tools
        self.probe: Any = None
        self.children: list[subprocess.Popen[str]] = []
        self.info: dict[str, Any] = {}

    def spawn(self, code: str, comm: str, wait: bool = True) -> subprocess.Popen[str]:
        p = ground.child(code, comm, wait=wait)
        self.children.append(p)
        return p

    def df(self) -> Any:
        return self.probe.df

    def rows(self, pred: Callable[[Any], Any], n: int, timeout: float = 5.0) -> Any:
        """The event rows `pred(df)` selects, once there are `n` of them (or at the timeout),
        and then a short settle so that rows beyond `n` show too."""
        ground.wait_for(lambda: len(self.df()[pred(self.df())]) >= n, timeout)
        time.sleep(0.3)
        df = self.df()
        return df[pred(df)]

    def close(self) -> None:
        for p in self.children:
            if p.poll() is None:
                p.kill()
                p.wait()
        if self.probe is not None:
            self.probe.close()


def col(df: Any, name: str) -> str:
    """The column `name`, or the first one nested under it (`fname.pathes` for `fname`)."""
    if name in df.columns:
        return name
    for c in df.columns:
        if c.startswith(name + ".") or c.endswith("." + name):
            return str(c)
    raise KeyError(f"no column {name!r} in {list(df.columns)}")


def exact(got: int, want: int, what: str) -> tuple[bool, str]:
    return got == want, f"{got} {what}, trigger made {want}"


def near(got: float, want: float, what: str, lo: float = 0.8, hi: float = 1.25) -> tuple[bool, str]:
    r = ground.ratio(got, want)
    return lo <= r <= hi, f"{what}: {got:g} vs {want:g} (ratio {r:.2f}, wanted {lo}-{hi})"


N = 5  # events per trigger where the check counts them exactly


