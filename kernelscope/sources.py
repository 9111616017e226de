"""The probe C sources shipped with kernelscope (the repo's bpf/ folder)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def bpf_dir() -> Path:
    """kernelscope/bpf in an installed wheel, the repo's bpf/ in a checkout."""
    for candidate in (_HERE / "bpf", _HERE.parent / "bpf"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("kernelscope's bpf/ sources are missing from this installation")


def read(name: str) -> str:
    """The text of a shipped probe, e.g. read('exec_exit_openat.c')."""
    path = bpf_dir() / name
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in bpf_dir().glob("*.c")))
        raise FileNotFoundError(f"no probe source {name!r}; shipped: {known}")
    return path.read_text()
