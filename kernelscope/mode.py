"""Live, record or replay: how probes behave in this process, set by KERNELSCOPE_MODE.

- live (default): probes load into the kernel;
- record: as live, and each named probe saves `<captures>/<name>.parquet` when it stops;
- replay: no BPF at all; each named probe replays `<captures>/<name>.parquet` instead
  (what Binder, laptops and CI's replay run use);
- auto: replay when this process may not load BPF programs, else live.

`<captures>` is KERNELSCOPE_CAPTURES, or `captures/` in the working directory (Jupyter
starts kernels in the notebook's folder, so captures sit beside the notebook).
Notebook code that measures something outside a probe keeps its figures the same way
with `remember(name, compute)`, and so do `%bpf_tracepoints` and `%bpf_format`.

Recording is a maintainer's step whose outputs are committed as if from a live run, so
record mode shows no banner; replay mode says so above every notebook.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .captures.atomic import write_text
from .errors import CaptureError, CaptureMissingError, SettingError

if TYPE_CHECKING:
    from .results import Results

MODES = ("live", "record", "replay", "auto")


def mode() -> str:
    value = os.environ.get("KERNELSCOPE_MODE", "live").strip().lower() or "live"
    if value not in MODES:
        raise SettingError(f"KERNELSCOPE_MODE={value!r}: use one of {', '.join(MODES)}")
    if value == "auto":
        from .host import has_bpf_privileges

        return "live" if has_bpf_privileges() else "replay"
    return value


def captures_dir() -> Path:
    return Path(os.environ.get("KERNELSCOPE_CAPTURES") or "captures")


def capture_path(name: str) -> Path:
    return captures_dir() / f"{name}.parquet"


def replay_speed() -> float | None:
    """KERNELSCOPE_REPLAY_SPEED: a factor, or unset/'all' for everything at once."""
    raw = os.environ.get("KERNELSCOPE_REPLAY_SPEED", "all").strip().lower()
    return None if raw in ("", "all", "none", "inf") else float(raw)


def require_capture(name: str | None) -> Path:
    if not name:
        raise CaptureError(
            "replay mode: this probe has no name, so its capture cannot be found; give it one "
            "(Probe(..., name='x') or %%bpf x) and record it once with KERNELSCOPE_MODE=record"
        )
    path = capture_path(name)
    if not path.exists():
        raise CaptureMissingError(
            f"replay mode: no capture {path} for probe {name!r}; record it on a machine with BPF "
            "with KERNELSCOPE_MODE=record"
        )
    return path


def replay_instead(name: str | None) -> Results | None:
    """What `Probe(..., name=name)` gives in this mode instead of a live probe: in replay mode
    the replay of the capture recorded for `name` (an error if there is none); else None.

    This is the one place live and replay meet: probe.py asks here, and knows no Replay.
    """
    if mode() != "replay":
        return None
    from .captures.replay import replay

    return replay(require_capture(name), speed=replay_speed(), name=name)


def banner() -> str | None:
    """A sentence to show when notebooks replay captures; None live and in record mode.

    Record mode says nothing: its outputs are committed, and should read as a live run's.
    """
    if mode() == "replay":
        return f"kernelscope is replaying recorded captures from {captures_dir()}/ (no BPF here)."
    return None


def remember(name: str, compute: Callable[[], Any], what: str = "figure") -> Any:
    """A JSON-able value measured live (and saved in record mode), or the saved one in replay.

    For what a notebook measures outside a probe, e.g. a producer's own event rate, or what
    it looked up in the kernel (`what` names it in the error when the saved copy is missing).
    """
    path = captures_dir() / f"{name}.json"
    m = mode()
    if m == "replay":
        if not path.exists():
            raise CaptureMissingError(
                f"replay mode: no recorded {what}: {path} is missing; record it by running this "
                "notebook with KERNELSCOPE_MODE=record on a machine with BPF (`make record-notebooks`)"
            )
        return json.loads(path.read_text())
    value = compute()
    if m == "record":
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(value, indent=1, default=float))
    return value


def setup_notebook(name: str) -> str:
    """First cell of a teaching notebook: captures live in captures/<name>/, say the mode.

    Returns the mode in force ("live", "record" or "replay").
    """
    if not os.environ.get("KERNELSCOPE_CAPTURES"):
        os.environ["KERNELSCOPE_CAPTURES"] = str(Path("captures") / name)
    note = banner()
    if note:
        from IPython.display import HTML, display

        display(
            HTML(
                f"<div style='border-left:4px solid #2563eb;background:#eff6ff;padding:6px 10px'>"
                f"&#9432; {note}</div>"
            )
        )
    return mode()
