"""Building the token cache: the configured training documents tokenized once, by every core.

The documents go out to spawned processes BUILD_PIECE_DOCS (or about BUILD_PIECE_BYTES of text) at a time and
come back in order, a shard's tokens and offsets written as its last piece arrives: one shard per local file,
CACHE_SHARD_ROWS rows a shard of a Hub dataset. A build writes into a temporary folder beside the cache, named
for its host and process, and renames it into place when complete with its manifest (cache_manifest.py), so a
partly written cache is never read, and a build that died is simply run again (the next build on the host
removes what it left).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from dist_llama.config import ConfigError, DataConfig
from dist_llama.data.cache_manifest import (
    CACHE_FORMAT,
    MANIFEST,
    ExpectedCache,
    file_hash,
    read_manifest,
    refusal,
)
from dist_llama.data.encoding import DocumentEncoder, limit_tokenizer_threads, rank_cores
from dist_llama.data.heldout import is_held_out
from dist_llama.data.readers import open_file
from dist_llama.data.sources import DatasetRows, open_hub_source

logger = logging.getLogger(__name__)

CACHE_SHARD_ROWS = 1 << 17  # Hub rows per shard (local files are a shard each)
# Documents handed to a build process at a time: large enough that sending them costs little beside
# tokenizing, small enough that every process stays busy to the end of a shard and memory stays bounded.
BUILD_PIECE_DOCS = 256
BUILD_PIECE_BYTES = 4 << 20


def build_token_cache(config, tokenizer, *, workers: int | None = None, force: bool = False) -> Path:
    """Tokenize the training documents of `config` (a Config or its DataConfig) into data.token_cache, and
    return the folder.

    `workers` processes tokenize (default: every core this process may use). A cache already there that
    matches the config is kept as it is; one that does not is refused (ConfigError) unless `force`, which
    replaces it. Not a collective: in a process group, open_token_cache is the call that builds once per node.
    """
    config: DataConfig = getattr(config, "data", config)
    folder = _cache_folder(config)
    encoder = DocumentEncoder(tokenizer)
    expected = ExpectedCache(config, encoder)
    manifest = read_manifest(folder)
    if manifest is not None and not force:
        differences = expected.differences(manifest)
        if differences:
            raise refusal(folder, differences)
        logger.info("token cache %s is up to date", folder)
        return folder
    if folder.exists() and manifest is None and any(folder.iterdir()):
        raise ConfigError(
            f"data.token_cache={folder} is a folder that holds no token cache ({MANIFEST} is missing): "
            "point it at an empty or new folder"
        )
    tmp = _new_build_folder(folder)
    # The node's builder: all cores.
    workers = workers or rank_cores() * int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    try:
        manifest, seconds = _tokenize_into(tmp, folder, expected, encoder, workers)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _move_into_place(tmp, folder, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "token cache %s: %s documents, %s tokens in %.1f s",
        folder,
        f"{manifest['documents']:,}",
        f"{manifest['tokens']:,}",
        seconds,
    )
    return folder


def _cache_folder(config: DataConfig) -> Path:
    if not config.token_cache:
        raise ConfigError(
            "data.token_cache is not set: name the cache folder, e.g. --data.token_cache=cache/owt"
        )
    return Path(config.token_cache)


def _new_build_folder(folder: Path) -> Path:
    """An empty folder beside `folder`, named for this host and process, for a build to write into."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(folder)
    tmp = folder.parent / f".{folder.name}.partial-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _remove_stale_partials(folder: Path) -> None:
    """Remove the folders of builds on this host that died; those of a build on another host of a shared
    disk are left alone."""
    prefix = f".{folder.name}.partial-{socket.gethostname()}-"
    for partial in folder.parent.glob(f"{prefix}*"):
        try:
            os.kill(int(partial.name[len(prefix) :]), 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _tokenize_into(
    tmp: Path, folder: Path, expected: ExpectedCache, encoder: DocumentEncoder, workers: int
) -> tuple[dict, float]:
    """Write every shard's tokens into tmp; returns the manifest that describes them and the seconds taken."""
    dtype = "uint16" if encoder.vocab_size <= 1 << 16 else "uint32"
    start = time.perf_counter()
    shards, identity = _shards(expected.config, expected)
    logger.info(
        "token cache: tokenizing [%s] into %s with %d process(es)", identity["description"], folder, workers
    )
    shard_entries, file_entries = _write(tmp, shards, encoder, expected.held_out_per_mille, dtype, workers)
    seconds = time.perf_counter() - start
    return _manifest(expected, identity, dtype, shard_entries, file_entries, seconds, workers), seconds


def _shards(config: DataConfig, expected: ExpectedCache):
    """(records, manifest entry of the source file or None) per shard, and the source identity."""
    if expected.files is not None:
        shards = ((open_file(path, config.text_field), path) for path in expected.files)
        return shards, expected.identity
    source = open_hub_source(config, per_node=False)  # the caller is the node's builder already
    where = f"{config.hub_dataset} (split {config.hub_split})"
    rows = len(source.dataset)
    shards = (
        (
            DatasetRows(
                source.dataset,
                np.arange(first, min(first + CACHE_SHARD_ROWS, rows)),
                config.text_field,
                where,
            ),
            None,
        )
        for first in range(0, rows, CACHE_SHARD_ROWS)
    )
    return shards, source.identity


def _write(
    tmp: Path, shards, encoder: DocumentEncoder, per_mille: int, dtype: str, workers: int
) -> tuple[list, list]:
    """Tokenize every shard into tmp; returns the manifest's shard and file entries."""
    shard_entries, file_entries = [], []
    out, lengths = None, []
    try:
        for (index, records, path, last), (tokens, piece_lengths) in _encoded(
            shards, encoder, per_mille, dtype, workers
        ):
            if out is None:
                out, lengths = open(tmp / f"tokens-{index:05d}.bin", "wb"), []
            out.write(tokens.tobytes())
            lengths.append(piece_lengths)
            if not last:
                continue
            out.close()
            out = None
            offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
            np.save(tmp / f"offsets-{index:05d}.npy", offsets)
            shard_entries.append(
                {
                    "tokens": f"tokens-{index:05d}.bin",
                    "offsets": f"offsets-{index:05d}.npy",
                    "documents": len(records),
                    "tokens_count": int(offsets[-1]),
                }
            )
            if path is not None:
                stat = path.stat()
                file_entries.append(
                    {
                        "name": path.name,
                        "bytes": stat.st_size,
                        "mtime_ns": stat.st_mtime_ns,
                        "blake2b": file_hash(path),
                        "documents": len(records),
                    }
                )
            logger.info(
                "token cache: shard %d done (%s documents, %s tokens)",
                index,
                f"{len(records):,}",
                f"{int(offsets[-1]):,}",
            )
    finally:
        if out is not None:
            out.close()
    return shard_entries, file_entries


def _encoded(shards, encoder: DocumentEncoder, per_mille: int, dtype: str, workers: int):
    """(tag, (tokens, lengths)) for each piece of _texts_of, in order, from `workers` processes
    (1: this one)."""
    initargs = (encoder, per_mille, dtype)
    if workers <= 1:
        _start_worker(*initargs)
        for tag, texts in _texts_of(shards):
            yield tag, _encode_piece(texts)
        return
    tags = []  # filled by the pool's feeding thread, always ahead of the results it is matched with

    def texts_only():
        for tag, texts in _texts_of(shards):
            tags.append(tag)
            yield texts

    # spawn: fresh processes, whatever threads (torch's, the tokenizer's) this one already runs.
    with multiprocessing.get_context("spawn").Pool(workers, _start_worker, initargs) as pool:
        for k, result in enumerate(pool.imap(_encode_piece, texts_only())):
            yield tags[k], result


def _texts_of(shards):
    """((shard, records, file, last piece of the shard?), texts) for every shard, BUILD_PIECE_DOCS documents
    and about BUILD_PIECE_BYTES of text at a time; an empty shard gives one empty piece."""
    for index, (records, path) in enumerate(shards):
        count = len(records)
        if not count:
            yield (index, records, path, True), []
        for first in range(0, count, BUILD_PIECE_DOCS):
            texts = records.texts(list(range(first, min(first + BUILD_PIECE_DOCS, count))))
            last = first + len(texts) == count
            piece, size = [], 0
            for k, text in enumerate(texts):
                piece.append(text)
                size += len(text)
                if size >= BUILD_PIECE_BYTES or k == len(texts) - 1:
                    yield (index, records, path, last and k == len(texts) - 1), piece
                    piece, size = [], 0


# The state of the process that tokenizes: set once by _start_worker, in each spawned process (or this one).
_worker: dict = {}


def _start_worker(encoder: DocumentEncoder, per_mille: int, dtype: str) -> None:
    limit_tokenizer_threads(1)  # the build's parallelism is its processes
    _worker.update(encoder=encoder, per_mille=per_mille, dtype=np.dtype(dtype))


def _encode_piece(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of the kept documents back to back, each document's length: 0 for a held-out one)."""
    encoder, per_mille = _worker["encoder"], _worker["per_mille"]
    kept = [i for i, text in enumerate(texts) if not (per_mille and is_held_out(text, per_mille))]
    lengths = np.zeros(len(texts), dtype=np.int64)
    arrays = encoder.encode([texts[i] for i in kept])
    lengths[kept] = [len(tokens) for tokens in arrays]
    tokens = (
        np.concatenate(arrays).astype(_worker["dtype"]) if arrays else np.zeros(0, dtype=_worker["dtype"])
    )
    return tokens, lengths


def _manifest(
    expected: ExpectedCache,
    identity: dict,
    dtype: str,
    shard_entries: list,
    file_entries: list,
    seconds: float,
    workers: int,
) -> dict:
    """What a finished build records in manifest.json."""
    return {
        "format": CACHE_FORMAT,
        "source": identity,
        "files": file_entries,
        "hub_revision": expected.config.hub_revision if expected.files is None else None,
        "tokenizer": expected.tokenizer,
        "held_out_per_mille": expected.held_out_per_mille,
        "dtype": dtype,
        "documents": sum(entry["documents"] for entry in shard_entries),
        "tokens": sum(entry["tokens_count"] for entry in shard_entries),
        "shards": shard_entries,
        "built": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_s": round(seconds, 3),
        "workers": workers,
    }


def _move_into_place(tmp: Path, folder: Path, force: bool) -> None:
    """Rename the finished build to `folder`: the cache appears whole or not at all."""
    old = None
    if force and folder.exists():
        old = folder.parent / f".{folder.name}.old-{os.getpid()}"
        os.rename(folder, old)
    elif folder.exists() and not any(folder.iterdir()):
        folder.rmdir()
    try:
        os.rename(tmp, folder)
    except OSError:
        # Another node's builder on a shared disk got there first: its cache is checked like any other.
        if read_manifest(folder) is None:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
