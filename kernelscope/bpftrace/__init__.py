"""bpftrace scripts from Python and `%%bpftrace` cells: the system's bpftrace, its output as frames.

    from kernelscope.bpftrace import Bpftrace
    bt = Bpftrace('tracepoint:syscalls:sys_enter_read { @bytes = hist(args->count); }').start()
    ...
    bt.stop().hist("@bytes").plot()

parse.py reads bpftrace's `-f json` lines and the script's printf formats and map keys;
run.py runs the child process and keeps what it printed (live), or a saved run (replay).
"""

from __future__ import annotations

from .parse import BpftraceError, BpftraceMissingError, BpftraceScriptError
from .run import Bpftrace, BpftraceReplay, BpftraceView, close_all, live_runs, replay

__all__ = ["Bpftrace", "BpftraceError", "BpftraceMissingError", "BpftraceReplay", "BpftraceScriptError",
           "BpftraceView", "close_all", "live_runs", "replay"]
