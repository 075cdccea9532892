"""What a release folder must hold, and how a new one replaces the old whole.

consolidate writes a release into a hidden staging folder beside its place (prepare_output), checks it
(check_release_folder) and renames it into place (move_into_place); push and generate check a folder with
check_release_folder before they use it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

WEIGHTS_NAME, WEIGHTS_INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# The SentencePiece model beside tokenizer.json, from which llama.cpp's converter builds the GGUF vocabulary.
SENTENCEPIECE_FILE = "tokenizer.model"


class ReleaseError(RuntimeError):
    """A release that cannot be built or loaded: missing files, mismatched vocab or dtype, bad checkpoint."""


def prepare_output(out: Path) -> Path:
    """A fresh staging folder beside out, hidden so that a listing of releases passes over it; out itself
    is replaced only when the release is complete (move_into_place)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise ReleaseError(f"{out} exists and is not a release folder; refusing to overwrite it")
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted release
    staging.mkdir(parents=True)
    return staging


def move_into_place(staging: Path, out: Path) -> None:
    """Rename the complete staging folder to out. An earlier release there is renamed aside first and
    deleted after, so an interruption leaves out as the old release or the new one, never half of either
    (between the two renames there is briefly no folder at out)."""
    previous = out.with_name(f".{out.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)
    try:
        staging.rename(out)
    except OSError:
        if previous.exists():
            previous.rename(out)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def check_release_folder(folder: str | Path) -> list[Path]:
    """Check that a release folder is complete and pickle-free; returns its files. Raises ReleaseError.

    tokenizer.model is not required: a release of a tokenizer with no SentencePiece model has none, and
    releases written before it was added lack it (llama.cpp's converter then reads tokenizer.json).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ReleaseError(f"release folder {folder} not found")
    if not (folder / "config.json").is_file():
        raise ReleaseError(
            f"{folder} has no config.json; it is not a release folder (make one with "
            "python -m dist_llama.consolidate)"
        )
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise ReleaseError(
                f"{folder} is missing weight shards listed in {WEIGHTS_INDEX_NAME}: {', '.join(missing)}"
            )
    elif not (folder / WEIGHTS_NAME).is_file():
        raise ReleaseError(f"{folder} has no weights ({WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME})")
    if not (folder / "tokenizer.json").is_file():
        raise ReleaseError(f"{folder} has no tokenizer.json")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    unsafe = [p.name for p in files if p.suffix in UNSAFE_SUFFIXES]
    if unsafe:
        raise ReleaseError(
            f"{folder} holds pickle-based files ({', '.join(unsafe)}); releases hold safetensors only"
        )
    config = json.loads((folder / "config.json").read_text())
    for name in set((config.get("auto_map") or {}).values()):
        module = name.split("--")[-1].split(".")[0] + ".py"
        if not (folder / module).is_file():
            raise ReleaseError(f"{folder} has no {module}, which config.json's auto_map names")
    return files
