"""Private folders for CO-RE object files, named for the process that owns them, so that the
folders of processes killed before they could clean up (kill -9, SIGTERM) are found and
removed by the next process that loads a CO-RE program.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

WORK_PREFIX = "kernelscope-core-"
_WORK_NAME = re.compile(re.escape(WORK_PREFIX) + r"(\d+)-(\d+)-(\d+)-\w+")


def _pid_namespace() -> str:
    try:
        return re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        return "0"


def _start_time(pid: int | str) -> str | None:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat field 22); None if gone.
    With the pid it names one process: a pid reused later has another start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def remove_orphans(folder: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove the object folders of CO-RE probes whose process is gone (killed with -9 or by
    SIGTERM, which skip every cleanup); returns those removed.

    Each folder's name records its owner: pid namespace, pid and start time. A folder is
    kept while that process runs (another test's, another user's, a notebook's), and when it
    belongs to another pid namespace (a container sharing /tmp), where this one cannot look.
    """
    removed = []
    ns = _pid_namespace()
    for d in Path(folder or tempfile.gettempdir()).glob(WORK_PREFIX + "*"):
        m = _WORK_NAME.fullmatch(d.name)
        if not m or m.group(1) != ns or _start_time(m.group(2)) == m.group(3):
            continue
        with contextlib.suppress(OSError):
            if d.is_dir() and d.stat().st_uid == os.geteuid():
                shutil.rmtree(d)
                removed.append(d)
    return removed


_swept: list[bool] = []


def new_workdir() -> Path:
    """A private folder for one program's object file, named for this process; the first one
    also sweeps away folders their owners left behind."""
    if not _swept:
        _swept.append(True)
        remove_orphans()
    pid = os.getpid()
    return Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{_pid_namespace()}-{pid}-{_start_time(pid) or 0}-"))
