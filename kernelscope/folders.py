"""Private folders named for the process that owns them (CO-RE object files, spilled rows), so
that the folders of processes killed before they could clean up (kill -9, SIGTERM) are found
and removed by the next process that makes one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

WORK_PREFIX = "kernelscope-core-"  # CO-RE object folders, in $TMPDIR
_OWNER = r"(\d+)-(\d+)-(\d+)-\w+"  # pid namespace, pid, start time, mkdtemp's suffix


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


def remove_orphans(folder: str | os.PathLike[str] | None = None, prefix: str = WORK_PREFIX) -> list[Path]:
    """Remove the `prefix` folders in `folder` ($TMPDIR) whose process is gone (killed with -9
    or by SIGTERM, which skip every cleanup); returns those removed.

    Each folder's name records its owner: pid namespace, pid and start time. A folder is
    kept while that process runs (another test's, another user's, a notebook's), and when it
    belongs to another pid namespace (a container sharing /tmp), where this one cannot look.
    """
    removed = []
    ns = _pid_namespace()
    name = re.compile(re.escape(prefix) + _OWNER)
    for d in Path(folder or tempfile.gettempdir()).glob(prefix + "*"):
        m = name.fullmatch(d.name)
        if not m or m.group(1) != ns or _start_time(m.group(2)) == m.group(3):
            continue
        with contextlib.suppress(OSError):
            if d.is_dir() and d.stat().st_uid == os.geteuid():
                shutil.rmtree(d)
                removed.append(d)
    return removed


_swept: set[tuple[str, str]] = set()


def owned_dir(folder: str | os.PathLike[str] | None = None, prefix: str = WORK_PREFIX) -> Path:
    """A new private folder in `folder` ($TMPDIR) named for this process; the first one of a
    prefix and folder also sweeps away the folders their owners left behind."""
    key = (str(folder), prefix)
    if key not in _swept:
        _swept.add(key)
        remove_orphans(folder, prefix)
    return Path(tempfile.mkdtemp(prefix=my_prefix(prefix), dir=folder))


def my_prefix(prefix: str = WORK_PREFIX) -> str:
    """The start of the names of this process's `prefix` folders (pid namespace, pid, start)."""
    pid = os.getpid()
    return f"{prefix}{_pid_namespace()}-{pid}-{_start_time(pid) or 0}-"


def new_workdir() -> Path:
    """A private folder for one CO-RE program's object file."""
    return owned_dir()
