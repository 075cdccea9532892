"""How a checkpoint's folder is named and when it counts as complete: `step_N` (eight digits), written as
`step_N.tmp` and renamed when its meta.json, written last, is there. Standard library only, so the GPU
session finds a run's checkpoints before torch is imported (checkpoint.py reads and writes them)."""

from __future__ import annotations

from pathlib import Path

META_FILE = "meta.json"
PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete_checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoints under folder, oldest first (temporary `.tmp` folders are never listed)."""
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir()
        and p.name.startswith(PREFIX)
        and not p.name.endswith(".tmp")
        and (p / META_FILE).is_file()
    ]
    return sorted(found, key=lambda p: p.name)
