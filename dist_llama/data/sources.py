"""Sources: the documents of an epoch as text, numbered in its seeded order and read in chunks.

A local source reads files (readers.py); a Hub dataset is either cached once per node (random access, so a
rank reads only its own lanes' rows) or streamed (no random access: every rank reads the whole stream). The
epoch orders (local_epoch_order, row_order) also number the token cache's records (cache.py); which of an
epoch's documents a lane takes is decided in token_sources.py. once_per_node makes a download, or the token
cache's build, happen on one rank per node while the others wait.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from dist_llama.config import DataConfig
from dist_llama.data.readers import Records, as_text, expand_paths, open_file

logger = logging.getLogger(__name__)

READ_BATCH_DOCS = (
    256  # records read per call: one random-access read of a Hub dataset, bounded memory for a file
)
HUB_SHUFFLE_BUFFER = 10_000  # rows in the streaming shuffle buffer of a Hub dataset
HUB_CHUNK_ROWS = 1024
# How long a node's other ranks wait for local rank 0 to download and convert the Hub dataset (~3 GB of
# parquet for the default one) or to build the token cache: longer than a process group's default timeout
# (10 min for NCCL) on a slow link.
HUB_DOWNLOAD_TIMEOUT = timedelta(hours=2)


@dataclass
class _Chunk:
    """Documents base .. base + len(docs) - 1 of an epoch; `order` maps a position to a record of `docs`."""

    base: int
    docs: object
    order: np.ndarray | None = None

    @property
    def size(self) -> int:
        return len(self.docs)

    def text(self, j: int) -> str:
        return self.docs.text(int(self.order[j]) if self.order is not None else j)

    def read(self, positions: list[int]) -> Iterator[tuple[int, str]]:
        """(position, text) for `positions`, READ_BATCH_DOCS records per read."""
        for first in range(0, len(positions), READ_BATCH_DOCS):
            part = positions[first : first + READ_BATCH_DOCS]
            records = part if self.order is None else self.order[part].tolist()
            yield from zip(part, self.docs.texts(records))


def _rng(*key: int) -> np.random.Generator:
    # Keys are tagged (1 for the file order, 2 for a file's documents, 3 for a Hub dataset's rows):
    # SeedSequence gives [s, e] and [s, e, 0] the same stream, so bare variable-length keys could collide.
    return np.random.default_rng(list(key))


# The epoch orders. Both the readers below and the token cache (cache.py) number an epoch's documents with
# these, so that a lane's documents are the same ones whether they are read as text or as cached tokens.


def _file_order(files: int, epoch: int, seed: int | None):
    return range(files) if seed is None else _rng(seed, epoch, 1).permutation(files)


def _record_order(records: int, epoch: int, seed: int | None, file: int) -> np.ndarray | None:
    return None if seed is None else _rng(seed, epoch, 2, file).permutation(records)


def row_order(rows: int, epoch: int, seed: int | None) -> np.ndarray:
    return np.arange(rows) if seed is None else _rng(seed, epoch, 3).permutation(rows)


def local_epoch_order(records_per_file: list[int], epoch: int, seed: int | None) -> np.ndarray:
    """Position in epoch -> record number counted over the files in sorted order, as LocalSource.chunks reads
    them."""
    firsts = np.concatenate([[0], np.cumsum(records_per_file)[:-1]]).astype(np.int64)
    parts = []
    for k in _file_order(len(records_per_file), epoch, seed):
        k = int(k)
        order = _record_order(records_per_file[k], epoch, seed, k)
        parts.append(firsts[k] + (np.arange(records_per_file[k]) if order is None else order))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class LocalSource:
    def __init__(self, files: list[Path], text_field: str):
        self.files = files
        self.text_field = text_field
        self._sizes: dict[int, int] = {}  # documents per file, learnt on first load; lets a resume skip files
        # Names and byte sizes, not full paths: the same files moved to another folder are the same data.
        digest = hashlib.blake2b(digest_size=8)
        for path in files:
            digest.update(f"{path.name}\0{path.stat().st_size}\n".encode())
        names = files[0].name + (f" .. {files[-1].name}" if len(files) > 1 else "")
        self.identity = {
            "kind": "local",
            "files": len(files),
            "names_and_sizes": digest.hexdigest(),
            "text_field": text_field,
            "description": f"local, {len(files)} file(s) {names} (names and sizes {digest.hexdigest()}), "
            f"text field {text_field!r}",
        }

    def describe(self) -> str:
        return f"local, {len(self.files)} file(s): {self.files[0]}" + (" ..." if len(self.files) > 1 else "")

    def chunks(self, epoch: int, start: int = 0, seed: int | None = None) -> Iterator[_Chunk]:
        """Epoch `epoch` from document `start`: files in a seeded order, each file's records in a seeded order
        (seed None: sorted file order, then record order)."""
        base = 0
        for k in _file_order(len(self.files), epoch, seed):
            k = int(k)
            if k in self._sizes and base + self._sizes[k] <= start:
                base += self._sizes[k]
                continue
            docs = open_file(self.files[k], self.text_field)
            self._sizes[k] = len(docs)
            if base + len(docs) > start:
                yield _Chunk(base, docs, _record_order(len(docs), epoch, seed, k))
            base += len(docs)


def _load_hub_dataset(name: str, split: str, revision: str | None, streaming: bool):
    """(dataset, resolved revision): a memory-mapped `datasets.Dataset` in the local cache (downloaded and
    converted to Arrow on first use), or an `IterableDataset` with streaming. The builder, unlike
    load_dataset, tells the commit a branch or tag resolved to."""
    import datasets

    builder = datasets.load_dataset_builder(name, revision=revision)
    if streaming:
        return builder.as_streaming_dataset(split=split), builder.hash
    builder.download_and_prepare()
    return builder.as_dataset(split=split), builder.hash


def once_per_node(load):
    """load() on local rank 0 of each node first, while the node's other ranks wait; then on those ranks,
    which find what rank 0 put in the node's cache. A collective: with a process group of several ranks,
    every rank must call it. A failure on any rank 0 stops every rank, without the others trying again."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return load()
    # A gloo group of its own: NCCL needs tensors, and the default group's timeout is too short for downloads.
    group = dist.new_group(backend="gloo", timeout=HUB_DOWNLOAD_TIMEOUT)
    first = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    result, error, failure = None, None, None
    if first:
        try:
            result = load()
        except Exception as caught:  # noqa: BLE001 - re-raised below, after the other ranks are told
            error, failure = caught, f"rank {dist.get_rank()}: {type(caught).__name__}: {caught}"
    failures: list = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(failures, failure, group=group)  # the barrier, carrying rank 0s' failures
    finally:
        dist.destroy_process_group(group)
    if error is not None:
        raise error
    if first:
        return result
    reported = next((message for message in failures if message), None)
    if reported is not None:
        raise ConnectionError(f"local rank 0 could not load it ({reported})")
    return load()


class DatasetRows(Records):
    """Rows `rows` of a memory-mapped datasets.Dataset, in that order; `texts` is one random-access read."""

    def __init__(self, dataset, rows: np.ndarray, text_field: str, where: str):
        self.dataset, self.rows, self.text_field, self.where = dataset, rows, text_field, where

    def __len__(self) -> int:
        return len(self.rows)

    def text(self, j: int) -> str:
        return self.texts([j])[0]

    def texts(self, records: list[int]) -> list[str]:
        if not records:
            return []
        rows = self.rows[records].tolist()
        values = self.dataset[rows][self.text_field]
        return [as_text(value, f"{self.where}, row {row}") for value, row in zip(values, rows)]


def _hub_identity(name: str, split: str, revision: str, text_field: str, streaming: bool, **extra) -> dict:
    access = (
        "streamed"
        if streaming
        else f"cached, {extra['documents']:,} rows, fingerprint {extra['fingerprint']}"
    )
    return {
        "kind": "hub",
        "dataset": name,
        "split": split,
        "revision": revision,
        "streaming": streaming,
        "text_field": text_field,
        **extra,
        "description": f"hub, {name}@{revision} (split {split}, {access}), text field {text_field!r}",
    }


class _HubSource:
    """A Hub dataset in the local `datasets` cache: every row by its index, so a rank reads only its own
    lanes' rows and a resume starts at its resume point. The epoch order is a seeded permutation of all
    rows."""

    def __init__(self, dataset, name: str, split: str, revision: str, text_field: str):
        if text_field not in dataset.column_names:
            raise ValueError(
                f"the Hub dataset {name} (split {split}) has no column {text_field!r} (data.text_field); "
                f"its columns are {dataset.column_names}"
            )
        self.dataset = dataset.select_columns([text_field])
        self.name, self.split, self.text_field = name, split, text_field
        self.identity = _hub_identity(
            name,
            split,
            revision,
            text_field,
            streaming=False,
            documents=len(dataset),
            fingerprint=dataset._fingerprint,
        )

    def describe(self) -> str:
        return self.identity["description"]

    def chunks(self, epoch: int, start: int = 0, seed: int | None = None) -> Iterator[_Chunk]:
        size = len(self.dataset)
        rows = row_order(size, epoch, seed)
        for base in range(start - start % HUB_CHUNK_ROWS, size, HUB_CHUNK_ROWS):
            where = f"{self.name} (split {self.split})"
            docs = DatasetRows(self.dataset, rows[base : base + HUB_CHUNK_ROWS], self.text_field, where)
            yield _Chunk(base, docs)


class _Rows(Records):
    def __init__(self, rows: list[dict], text_field: str, where: str):
        self.rows, self.text_field, self.where = rows, text_field, where

    def __len__(self) -> int:
        return len(self.rows)

    def text(self, j: int) -> str:
        return as_text(self.rows[j][self.text_field], self.where)


class _HubStreamSource:
    """A streamed Hub dataset (data.hub_streaming): no disk needed, but no random access either."""

    def __init__(self, dataset, name: str, split: str, revision: str, text_field: str):
        self.dataset, self.name, self.split, self.text_field = dataset, name, split, text_field
        self.identity = _hub_identity(name, split, revision, text_field, streaming=True)

    def describe(self) -> str:
        return self.identity["description"]

    def chunks(self, epoch: int, start: int = 0, seed: int | None = None) -> Iterator[_Chunk]:
        # A stream has no random access: a resume reads (but does not tokenize) the epoch up to `start`.
        stream = self.dataset
        if seed is not None:
            stream = stream.shuffle(seed=seed + epoch, buffer_size=HUB_SHUFFLE_BUFFER)
        base, rows_iter = 0, iter(stream)
        while rows := list(itertools.islice(rows_iter, HUB_CHUNK_ROWS)):
            if base + len(rows) > start:
                yield _Chunk(base, _Rows(rows, self.text_field, f"{self.name} row"))
            base += len(rows)


def open_hub_source(config: DataConfig, per_node: bool = True):
    """per_node=False: on this process alone (a caller already inside once_per_node, as the token cache's
    build)."""

    def load():
        return _load_hub_dataset(
            config.hub_dataset, config.hub_split, config.hub_revision, config.hub_streaming
        )

    try:
        # A stream is read by every rank anyway; a download is made once per node.
        dataset, revision = load() if config.hub_streaming or not per_node else once_per_node(load)
    except Exception as error:  # noqa: BLE001 - any failure here means "no data", said plainly below
        local = f"data.paths={config.paths} match no files and " if config.source == "auto" else ""
        pinned = f", revision {config.hub_revision!r}" if config.hub_revision else ""
        raise FileNotFoundError(
            f"{local}the Hub dataset data.hub_dataset={config.hub_dataset!r} (split "
            f"{config.hub_split!r}{pinned}) could not be opened: {error}. Point data.paths at "
            "local .jsonl/.jsonl.zst/.parquet/.txt files, or make the Hub reachable"
        ) from error
    source_class = _HubStreamSource if config.hub_streaming else _HubSource
    return source_class(dataset, config.hub_dataset, config.hub_split, revision, config.text_field)


def local_files(config: DataConfig, purpose: str) -> list[Path] | None:
    """The files of a local source, or None when the config means the Hub dataset."""
    files = expand_paths(config.paths)
    if config.source == "local" or (config.source == "auto" and files):
        if not files:
            raise FileNotFoundError(
                f"data.source=local but data.paths={config.paths} match no files (relative to "
                f"{os.getcwd()}); fix the globs, or use data.source=hub"
            )
        return files
    if config.source not in ("hub", "auto"):
        raise ValueError(f"data.source={config.source!r} is not valid; choose one of local, hub, auto")
    if config.source == "auto" and config.paths:
        # Relative paths in a config resolve against the working directory: run from elsewhere and they match
        # nothing. Training then goes on, on other data, which must not pass unnoticed.
        logger.warning(
            "data.source=auto: data.paths %s match no files relative to the working directory %s, so "
            "the %s data is the Hub dataset %s instead. To train on those files, run from the "
            "directory they are relative to or make them absolute; set data.source=local to stop "
            "with an error instead of switching",
            config.paths,
            os.getcwd(),
            purpose,
            config.hub_dataset,
        )
    return None


def open_source(config: DataConfig, purpose: str, per_node: bool = True):
    files = local_files(config, purpose)
    source = LocalSource(files, config.text_field) if files is not None else open_hub_source(config, per_node)
    logger.info("%s data: %s", purpose, source.describe())
    return source
