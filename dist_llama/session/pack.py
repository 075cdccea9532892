"""session.tar.gz: every small file of the session, within what may come back from the GPU machine."""

from __future__ import annotations

import tarfile
from pathlib import Path

from dist_llama.session.bundle import MIB

# What comes back from the GPU machine: at most 8 files of at most 16 MiB (64 MiB together).
PACK_NAME, PACK_LIMIT_BYTES = "session.tar.gz", 16 * MIB
PACKED_FILE_LIMIT_BYTES = 4 * MIB  # a single file larger than this is a weight or a cache, not a result


def pack(out: Path, work: Path, runs: list[Path], logs: Path) -> list[str]:
    """Every small file of the session into OUT/session.tar.gz (<= 16 MiB; logs go first if it is over)."""
    chosen: list[tuple[Path, str]] = [
        (out / "summary.md", "summary.md"),
        (out / "summary.json", "summary.json"),
    ]
    for name in ("preflight.json", "bench.json", "release_check.json"):
        chosen.append((work / name, name))
    for run_dir in dict.fromkeys(runs):  # an eager rerun may have resumed the same folder
        for path in sorted(run_dir.rglob("*")):
            relative = path.relative_to(run_dir)
            if relative.parts[0] in ("checkpoints",) or path.name.endswith(
                (".safetensors", "tokenizer.json")
            ):
                continue
            if relative.parts[0] == "release" and path.suffix == ".py":
                continue  # the model code is the checkout's, which the summary names by commit
            chosen.append((path, f"runs/{run_dir.name}/{relative}"))
    packed_logs = [(path, f"logs/{path.name}") for path in sorted(logs.glob("*.log"))]
    for candidate in (chosen + packed_logs, chosen):
        files = [
            (path, name)
            for path, name in candidate
            if path.is_file() and path.stat().st_size <= PACKED_FILE_LIMIT_BYTES
        ]
        with tarfile.open(out / PACK_NAME, "w:gz") as tar:
            for path, name in files:
                tar.add(path, arcname=f"session/{name}")
        if (out / PACK_NAME).stat().st_size <= PACK_LIMIT_BYTES:
            return [name for _, name in files]
    raise OSError(f"{PACK_NAME} is over {PACK_LIMIT_BYTES / MIB:.0f} MiB even without the logs")
