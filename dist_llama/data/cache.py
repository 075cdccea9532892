"""The token cache: the configured training documents tokenized once, by every core, and read back by index.

A cache folder (data.token_cache) holds

    manifest.json       what the tokens were made from (below) and the shards
    tokens-NNNNN.bin    each document as the lanes take it, [bos] ids [eos], back to back (uint16 when the
                        vocabulary fits, else uint32); read with numpy.memmap
    offsets-NNNNN.npy   int64, one more than the shard's documents: document i is
                        tokens[offsets[i]:offsets[i + 1]], empty for a document the hash rule holds out
                        (held-out text is never tokenized into it)

Documents are numbered in the source's own order: the sorted files and each file's records in order (one
shard per file), or a Hub dataset's rows (CACHE_SHARD_ROWS rows a shard). TokenCache reads a record's tokens,
and orders an epoch by the same functions that order the text (sources.local_epoch_order / row_order);
token_sources.CachedTokenSource hands the tokens to the lanes of the same packer that tokenizing on the fly
feeds, and the data state records the same source identity. So a run from the cache and a run that tokenizes
on the fly give the same batches, bit for bit, and either resumes the other's checkpoints.

The manifest records the format version, the source (its identity as the data state records it; for local
files also each file's name, bytes, blake2b and documents; for a Hub dataset the requested revision besides
the resolved one and the fingerprint), the text field, the tokenizer's identity (a hash of what decides the
ids, with bos and eos), and the held-out rule. A cache that disagrees with the config on any of them is
refused in one line naming each difference. A build writes into a temporary folder beside the cache and
renames it into place when complete, so a partly written cache is never read, and a build that died is simply
run again.
"""

from __future__ import annotations

import hashlib
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
from dist_llama.data.encoding import DocumentEncoder, limit_tokenizer_threads, rank_cores
from dist_llama.data.heldout import held_out_files, is_held_out
from dist_llama.data.readers import open_file
from dist_llama.data.sources import (
    DatasetRows,
    LocalSource,
    local_epoch_order,
    local_files,
    once_per_node,
    open_hub_source,
    row_order,
)

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
CACHE_SHARD_ROWS = 1 << 17  # Hub rows per shard (local files are a shard each)
# Documents handed to a build process at a time: large enough that sending them costs little beside
# tokenizing, small enough that every process stays busy to the end of a shard and memory stays bounded.
BUILD_PIECE_DOCS = 256
BUILD_PIECE_BYTES = 4 << 20


def _file_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _held_out_rule(config: DataConfig) -> int:
    """The per-mille the training stream holds out by hash, as PackedBatches applies it (0 with
    data.val_paths)."""
    return 0 if held_out_files(config) else config.val_per_mille


class _Expected:
    """What a cache for this config must record; for local files, reading no more than their sizes."""

    def __init__(self, config: DataConfig, encoder: DocumentEncoder):
        self.config = config
        self.files = local_files(config, "token cache")
        self.tokenizer = encoder.identity()
        self.held_out_per_mille = _held_out_rule(config)
        self.identity = None if self.files is None else LocalSource(self.files, config.text_field).identity

    def differences(self, manifest: dict) -> list[str]:
        """Each way in which `manifest` does not describe this config's tokens (empty: it does)."""
        if manifest.get("format") != CACHE_FORMAT:
            return [f"format version {manifest.get('format')} (this code reads {CACHE_FORMAT})"]
        found = []
        found += [
            f"tokenizer {key} {manifest['tokenizer'].get(key)!r} -> {value!r} (data.tokenizer)"
            for key, value in self.tokenizer.items()
            if manifest["tokenizer"].get(key) != value
        ]
        if manifest["held_out_per_mille"] != self.held_out_per_mille:
            found.append(
                f"held-out rule {manifest['held_out_per_mille']} -> {self.held_out_per_mille} per mille "
                "(data.val_per_mille, 0 with data.val_paths)"
            )
        source, config = manifest["source"], self.config
        if source["text_field"] != config.text_field:
            found.append(f"text field {source['text_field']!r} -> {config.text_field!r} (data.text_field)")
        if self.files is None:
            wanted = {"kind": "hub", "dataset": config.hub_dataset, "split": config.hub_split}
            found += [
                f"{key} {source.get(key)!r} -> {value!r}"
                for key, value in wanted.items()
                if source.get(key) != value
            ]
            if config.hub_revision is not None and manifest.get("hub_revision") != config.hub_revision:
                found.append(
                    f"hub revision {manifest.get('hub_revision')!r} -> {config.hub_revision!r} "
                    "(data.hub_revision)"
                )
        elif source.get("kind") != "local":
            found.append(f"kind {source.get('kind')!r} -> 'local' (data.source / data.paths)")
        else:
            cached = [(f["name"], f["bytes"]) for f in manifest["files"]]
            live = [(path.name, path.stat().st_size) for path in self.files]
            if cached != live:
                gone, new = sorted(set(cached) - set(live)), sorted(set(live) - set(cached))
                found.append(
                    f"files (name, bytes): {len(cached)} -> {len(live)}, only in the cache {gone[:3]}, "
                    f"only in data.paths {new[:3]}"
                )
            else:
                for entry, path in zip(manifest["files"], self.files):
                    # The same name, size and modification time are taken as the same file; else
                    # its bytes decide.
                    if path.stat().st_mtime_ns != entry["mtime_ns"] and _file_hash(path) != entry["blake2b"]:
                        found.append(
                            f"the content of {path.name} (blake2b {entry['blake2b']} -> {_file_hash(path)})"
                        )
        return found


class TokenCache:
    """A built cache (load_token_cache): the documents' tokens by record number, and each epoch's order of
    records."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = folder, manifest
        self.identity = manifest["source"]  # the very dict the text source records, so data states are equal
        self.documents = manifest["documents"]
        dtype = np.dtype(manifest["dtype"])
        self._tokens, self._offsets = [], []
        for shard in manifest["shards"]:
            tokens = folder / shard["tokens"]
            self._tokens.append(
                np.memmap(tokens, dtype=dtype, mode="r")
                if shard["tokens_count"]
                else np.zeros(0, dtype=dtype)
            )  # numpy cannot map an empty file
            self._offsets.append(np.load(folder / shard["offsets"], mmap_mode="r"))
        self._firsts = np.cumsum([0] + [shard["documents"] for shard in manifest["shards"]])[:-1]
        self._records_per_file = [entry["documents"] for entry in manifest.get("files", [])]

    def describe(self) -> str:
        return (
            f"token cache {self.folder} ({self.manifest['tokens']:,} tokens) "
            f"of [{self.identity['description']}]"
        )

    def epoch_order(self, epoch: int, seed: int | None) -> np.ndarray:
        """Position in epoch `epoch` -> record number, as the text source orders that epoch."""
        if self.identity["kind"] == "local":
            return local_epoch_order(self._records_per_file, epoch, seed)
        return row_order(self.documents, epoch, seed)

    def tokens(self, record: int) -> np.ndarray:
        """[bos] ids [eos] of a record (a view of the mapped file); empty when the record is held out."""
        shard = int(np.searchsorted(self._firsts, record, side="right")) - 1
        offsets, i = self._offsets[shard], record - self._firsts[shard]
        return self._tokens[shard][offsets[i] : offsets[i + 1]]


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _refuse(folder: Path, differences: list[str]) -> ConfigError:
    return ConfigError(
        f"the token cache {folder} does not match this config ({'; '.join(differences)}): point "
        "data.token_cache at another folder, or rebuild it with python -m dist_llama.data.prepare "
        "--force"
    )


# --- Building -----------------------------------------------------------------------------------------------

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


def _shards(config: DataConfig, expected: _Expected):
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


def _encoded(shards, encoder: DocumentEncoder, per_mille: int, dtype: str, workers: int):
    """(tag, (tokens, lengths)) for each piece of _texts_of, in order, from `workers` processes (1: this
    one)."""
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
                        "blake2b": _file_hash(path),
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


def _remove_stale_partials(folder: Path) -> None:
    """Folders left by builds on this host that died (a build on another host of a shared disk is left
    alone)."""
    prefix = f".{folder.name}.partial-{socket.gethostname()}-"
    for partial in folder.parent.glob(f"{prefix}*"):
        try:
            os.kill(int(partial.name[len(prefix) :]), 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def build_token_cache(config, tokenizer, *, workers: int | None = None, force: bool = False) -> Path:
    """Tokenize the training documents of `config` (a Config or its DataConfig) into data.token_cache; returns
    the folder.

    `workers` processes tokenize (default: every core this process may use). A cache already there that
    matches the config is kept as it is; one that does not is refused (ConfigError) unless `force`, which
    replaces it. Not a collective: in a process group, open_token_cache is the call that builds once per node.
    """
    config: DataConfig = getattr(config, "data", config)
    folder = _cache_folder(config)
    encoder = DocumentEncoder(tokenizer)
    expected = _Expected(config, encoder)
    manifest = _read_manifest(folder)
    if manifest is not None and not force:
        differences = expected.differences(manifest)
        if differences:
            raise _refuse(folder, differences)
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


def _tokenize_into(
    tmp: Path, folder: Path, expected: _Expected, encoder: DocumentEncoder, workers: int
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


def _manifest(
    expected: _Expected,
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
        if _read_manifest(folder) is None:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_token_cache(config: DataConfig, tokenizer) -> TokenCache:
    """The cache of config.token_cache, checked against the config (ConfigError naming what differs)."""
    folder = Path(config.token_cache)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(
            f"no token cache in {folder}: build it with python -m dist_llama.data.prepare"
        )
    differences = _Expected(config, DocumentEncoder(tokenizer)).differences(manifest)
    if differences:
        raise _refuse(folder, differences)
    source = TokenCache(folder, manifest)
    logger.info("training data: %s", source.describe())
    return source


def open_token_cache(config: DataConfig, tokenizer) -> TokenCache:
    """load_token_cache, building the cache first where it is missing: once per node (local rank 0 builds
    while the node's other ranks wait, as for a Hub download). A collective in a process group of several
    ranks."""

    def load():
        if _read_manifest(Path(config.token_cache)) is None:
            build_token_cache(config, tokenizer)
        return load_token_cache(config, tokenizer)

    return once_per_node(load)
