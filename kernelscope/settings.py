"""What a Probe is configured with: the checks its settings pass before anything is loaded
(SettingError naming the first bad one), include folders, and program files."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import SettingError
from .readers.base import check_pages
from .readers.ring import WAKEUPS

__all__ = ["check_settings", "include_flags", "program_name", "read_program", "shown_setting"]


def check_settings(
    *,
    pages: object = None,
    wakeup: object = None,
    wakeup_events: object = None,
    watermark_bytes: object = None,
    reorder_ns: object = None,
    poll_interval: object = None,
) -> None:
    """A SettingError naming the first bad setting (None: not given); nothing is changed."""
    if isinstance(pages, Mapping):
        for name, n in pages.items():
            check_pages(n, f"pages[{name!r}]")
    elif pages is not None:
        check_pages(pages)
    if wakeup is not None and wakeup not in WAKEUPS:
        raise SettingError(f"wakeup must be one of {', '.join(map(repr, WAKEUPS))}, not {wakeup!r}")
    for name, value, least in (("wakeup_events", wakeup_events, 1), ("watermark_bytes", watermark_bytes, 0),
                               ("reorder_ns", reorder_ns, 0)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise SettingError(f"{name} must be a whole number >= {least}, not {value!r}")
    if poll_interval is not None and (isinstance(poll_interval, bool)
                                      or not isinstance(poll_interval, (int, float))
                                      or not 0 < poll_interval < 3600):
        raise SettingError(f"poll_interval must be seconds between 0 and 3600, not {poll_interval!r}")


def include_flags(include: Sequence[str | os.PathLike[str]]) -> list[str]:
    """`-I/abs/dir` per folder of `include=`; a SettingError for one that is not a folder."""
    if isinstance(include, (str, os.PathLike)):
        include = [include]
    flags = []
    for d in include:
        folder = Path(d).expanduser().resolve()
        if not folder.is_dir():
            raise SettingError(f"include: {d} is not a folder (give the folders that hold the program's "
                               "headers)")
        flags.append(f"-I{folder}")
    return flags


def read_program(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """The text of a program file and its folder; a SettingError saying why it cannot be read."""
    p = Path(path).expanduser()
    try:
        return p.read_text(), p.resolve().parent
    except FileNotFoundError:
        raise SettingError(f"no program file {p} (from {Path.cwd()})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SettingError(f"cannot read the program file {p}: {getattr(e, 'strerror', None) or e}") from None


def program_name(path: str | os.PathLike[str]) -> str:
    """`opensnoop` for opensnoop.bpf.c: the file name up to its first dot."""
    return Path(path).name.split(".", 1)[0] or Path(path).name


def shown_setting(setting: str, value: object) -> object:
    """A setting's value as a reload mark says it ("pages default -> 8")."""
    return value if value is not None else "default" if setting == "pages" else "off"
