"""Files that appear whole or not at all: write beside the target, fsync, rename over it.

A rename within one folder is atomic on POSIX file systems, so a reader (a replay, git, a
notebook) sees the old file or the new one, never a half-written one; an error or Ctrl-C
while writing leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import CaptureError


def _umask() -> int:
    """This process's umask, read without changing it (os.umask would, for every thread)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary file in `path`'s folder for the caller to write; renamed to `path` once
    the block ends and its bytes are on disk, removed if the block raises (Ctrl-C too)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; a capture is an ordinary file
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself; some file systems refuse a folder fsync
        _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """`Path.write_text`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def check_destination(path: str | os.PathLike[str], suffix: str = ".parquet") -> Path:
    """Raise CaptureError saying why a capture could not be written at `path`, before any
    work is done that the failure would lose; else return it."""
    path = Path(path)
    if path.is_dir():
        raise CaptureError(f"{path} is a folder: give a file name inside it, "
                           f"e.g. {path / ('capture' + suffix)}")
    if path.suffix != suffix:
        raise CaptureError(f"{path}: a capture file's name ends in {suffix} "
                           f"(e.g. {path.with_suffix(suffix)})")
    if path.exists() and not path.is_file():
        raise CaptureError(f"{path} exists and is not a regular file: choose another name")
    parent = path.parent
    if not parent.exists():
        raise CaptureError(f"{path}: the folder {parent} does not exist (create it first: mkdir -p {parent})")
    if not parent.is_dir():
        raise CaptureError(f"{path}: {parent} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check", dir=parent)
    except OSError as e:
        raise CaptureError(f"{path}: cannot write in {parent}: {e.strerror}") from None
    os.close(fd)
    os.unlink(probe)
    return path
