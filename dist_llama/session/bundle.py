"""The offline bundle: what a GPU machine without network needs, built here, checked and unpacked there.

The wheels are put in BUNDLE/wheels by launch/prepare_gpu_bundle.sh (installed by wheels.py); this module
writes the data half and manifest.json, which lists every file with its size and checksum.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from dist_llama.session import REPO, BadInput, read_json

DEFAULT_BUNDLE = REPO / "gpu_bundle"
MANIFEST = "manifest.json"
MIB = 2**20
# The bundle travels with the checkout's files in 64 MiB; keep a margin for files added after the build.
BUNDLE_LIMIT_MIB = 60


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def checkout_bytes() -> int:
    """Bytes of the checkout's files that travel with the bundle: tracked, plus untracked and not ignored."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise BadInput(
            f"cannot list the checkout's files with git ({error}); the bundle size limit counts them"
        ) from None
    paths = {REPO / name for name in listed.decode().split("\0") if name}
    return sum(p.stat().st_size for p in paths if p.is_file())


def _gzip_copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb") as src, gzip.open(target, "wb", compresslevel=9) as dst:
        shutil.copyfileobj(src, dst)
    return target


def _write_parquet(texts: list[str], target: Path, compression_level: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Measured on shard-00000 (12,283 documents): zstd 19 in large pages without a dictionary is 8,756,117
    # bytes against 8,748,620 for its .jsonl.zst, and the GPU machine's pyarrow reads it without zstandard.
    pq.write_table(
        pa.table({"text": texts}),
        target,
        compression="zstd",
        compression_level=compression_level,
        use_dictionary=False,
        data_page_size=64 * MIB,
    )


def build_bundle(
    out: Path,
    train_data: list[str],
    held_out: str,
    tinymmlu: str,
    mmlu: str,
    mmlu_items: int,
    limit_mib: float = BUNDLE_LIMIT_MIB,
    compression_level: int = 19,
) -> dict:
    """The data half of the bundle in `out` (wheels are put in out/wheels by launch/prepare_gpu_bundle.sh):
    the tokenizer folder, training shards as parquet, the held-out documents, tinyMMLU and spread MMLU items;
    then manifest.json. Training shards that would take the total over limit_mib are left out, and said so."""
    from dist_llama.data import expand_paths

    out.mkdir(parents=True, exist_ok=True)
    previous = read_json(out / MANIFEST) or {}
    for name, path in (("--held-out", held_out), ("--tinymmlu", tinymmlu), ("--mmlu", mmlu)):
        if not Path(path).is_file():
            raise BadInput(f"{name} {path}: no such file")
    sources = expand_paths(train_data)
    if not sources:
        raise BadInput(f"--train-data {' '.join(train_data)} matches no files")
    spread_rows = _write_fixed_parts(out, held_out, tinymmlu, mmlu, mmlu_items, compression_level)
    repo_bytes = checkout_bytes()
    kept, dropped, shard_sources = _fit_training_shards(
        out, sources, previous, repo_bytes, limit_mib, compression_level
    )
    manifest = _manifest(out, kept, dropped, shard_sources, spread_rows, repo_bytes)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _write_fixed_parts(
    out: Path, held_out: str, tinymmlu: str, mmlu: str, mmlu_items: int, compression_level: int
) -> list[dict]:
    """Everything but the training shards: tokenizer, held-out documents, item files.
    Returns the spread items."""
    from dist_llama.data import read_documents
    from dist_llama.evaluation.tasks import check_mmlu_data, spread_subset
    from dist_llama.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        # tokenizer.json is 3.5 MB of JSON, 1 MB gzipped: the session unpacks it (gzip is in the stdlib).
        load_tokenizer("offline").save_pretrained(scratch)
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
        for path in sorted(Path(scratch).iterdir()):
            _gzip_copy(path, out / "tokenizer" / f"{path.name}.gz")
    _write_parquet(read_documents([held_out]), out / "held_out.parquet", compression_level)
    _gzip_copy(Path(tinymmlu), out / "items" / "tinymmlu.jsonl.gz")
    available = check_mmlu_data(Path(mmlu))
    with tempfile.TemporaryDirectory() as scratch:
        spread = spread_subset(Path(mmlu), min(mmlu_items, available), Path(scratch) / "mmlu_spread.jsonl")
        rows = [json.loads(line) for line in spread.read_text().splitlines()]
        _gzip_copy(spread, out / "items" / "mmlu_spread.jsonl.gz")
    return rows


def _fit_training_shards(
    out: Path, sources: list[Path], previous: dict, repo_bytes: int, limit_mib: float, compression_level: int
) -> tuple[list[str], list[str], dict]:
    """Training shards as parquet, in order, while the total stays under limit_mib; a shard converted by an
    earlier build of the same source is kept. Returns (kept file names, dropped sources, their stamps)."""
    from dist_llama.data import read_documents

    train_dir = out / "train"
    train_dir.mkdir(exist_ok=True)
    kept, dropped, shard_sources = [], [], {}
    fixed = (
        repo_bytes
        + sum(_folder_bytes(out / part) for part in ("wheels", "tokenizer", "items"))
        + (out / "held_out.parquet").stat().st_size
    )
    total = fixed
    for source in sources:
        target = train_dir / (source.name.split(".")[0] + ".parquet")
        stamp = {"source": str(source.resolve()), "bytes": source.stat().st_size}
        if not (target.is_file() and previous.get("shard_sources", {}).get(target.name) == stamp):
            print(f"converting {source} to {target.name}", flush=True)
            _write_parquet(read_documents([source]), target, compression_level)
        size = target.stat().st_size
        if dropped or total + size > limit_mib * MIB:
            target.unlink()
            dropped.append(str(source))
            continue
        kept.append(target.name)
        shard_sources[target.name] = stamp
        total += size
    for stale in set(p.name for p in train_dir.glob("*.parquet")) - set(kept):
        (train_dir / stale).unlink()
    if not kept:
        raise BadInput(
            f"not even one training shard fits: the rest of the bundle and the checkout take "
            f"{fixed / MIB:.1f} MiB of the {limit_mib:g} MiB limit"
        )
    return kept, dropped, shard_sources


def _manifest(
    out: Path,
    kept: list[str],
    dropped: list[str],
    shard_sources: dict,
    spread_rows: list[dict],
    repo_bytes: int,
) -> dict:
    files = {
        str(p.relative_to(out)): p.stat().st_size
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": "tokenizer",
        "train": [f"train/{name}" for name in kept],
        "held_out": "held_out.parquet",
        "items": {"tinymmlu": "items/tinymmlu.jsonl", "mmlu_spread": "items/mmlu_spread.jsonl"},
        "gzipped": sorted(name for name in files if name.endswith(".gz")),
        "mmlu_spread_items": len(spread_rows),
        "mmlu_spread_subjects": len({row.get("subject") for row in spread_rows}),
        "wheels": sorted(name for name in files if name.startswith("wheels/") and name.endswith(".whl")),
        "dropped_training_shards": dropped,
        "shard_sources": shard_sources,
        "files": files,
        "bundle_bytes": sum(files.values()),
        "checkout_bytes": repo_bytes,
        "sha256": {name: _sha256(out / name) for name in files},
    }


def load_manifest(bundle: Path) -> dict:
    """The bundle's manifest, with every listed file present at its recorded size; BadInput otherwise."""
    manifest = read_json(bundle / MANIFEST)
    if manifest is None:
        raise BadInput(
            f"bundle folder {bundle} not found or has no {MANIFEST}: build it with "
            "launch/prepare_gpu_bundle.sh (and name it in the machine's carry)"
        )
    wrong = [
        name
        for name, size in manifest["files"].items()
        if not (bundle / name).is_file() or (bundle / name).stat().st_size != size
    ]
    if wrong:
        raise BadInput(
            f"bundle {bundle} is incomplete: {len(wrong)} file(s) missing or changed, e.g. {wrong[0]}; "
            "rebuild it with launch/prepare_gpu_bundle.sh"
        )
    return manifest


def unpack_bundle(bundle: Path, manifest: dict, inputs: Path) -> None:
    """The bundle's gzipped files (tokenizer, items), unpacked under inputs/ where the commands read them."""
    for name in manifest["gzipped"]:
        target = inputs / name.removesuffix(".gz")
        target.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(bundle / name, "rb") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)


def data_overrides(bundle: Path, manifest: dict, inputs: Path) -> list[str]:
    """The training config's data from the bundle: local shards, held-out file, saved tokenizer."""
    shards = ",".join(str(bundle / name) for name in manifest["train"])
    return [
        "--data.source=local",
        f"--data.paths=[{shards}]",
        f"--data.val_paths=[{bundle / manifest['held_out']}]",
        f"--data.tokenizer={inputs / manifest['tokenizer']}",
    ]
