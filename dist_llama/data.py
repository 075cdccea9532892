"""The training data stream: documents -> lanes -> packed (inputs, labels) batches, resumable at any world size.

What this file owns: reading documents (local .jsonl, .jsonl.zst, .parquet, .txt files, or a Hub dataset, cached
or streamed), the epoch order, packing tokens into fixed windows with no padding, the held-out split, and the
loader state that checkpoints carry.

Why lanes. A loader that deals documents to ranks (rank r takes every W-th document, or one shard per rank)
encodes the world size W in its state, so a checkpoint cannot resume on a different number of GPUs without
replaying or skipping data; torchtitan's loader has this limitation. Here the unit of ownership is a lane,
not a rank. A global batch has `global_rows` rows, and there are exactly `global_rows` lanes:

    epoch order of documents (seeded)  d = 0, 1, 2, ...
    lane l owns documents d with d % global_rows == l, and packs them alone:
        [bos] doc_l [eos] [bos] doc_{l+N} [eos] ...  cut into windows of seq_len + 1 tokens,
        consecutive windows overlapping by one token, so every token is a target exactly once
    row l of every global batch is lane l's next window
    rank r of W holds the lanes l with l % W == r

A lane's state is three integers (epoch, document index, token offset), independent of W. A checkpoint keeps
every lane's state (the trainer all-gathers the ranks' dicts with `merge_states`), and any world size that
divides `global_rows` can pick its own lanes out of it: the global token stream (row l of step s) is the same
for every W, and a resumed run continues it exactly.

Each rank tokenizes only its own lanes' documents, in batches, on a background thread that runs
`data.prefetch_steps` batches ahead; the Rust tokenizer releases the GIL. The thread's timing never changes the
output: one producer makes the batches in order, and each batch carries the lane states as of that batch.
A rank reads only its own lanes' records, from each lane's resume point on: a local file is loaded whole but
only those records are parsed, and a Hub dataset is, by default, downloaded once per node into `datasets`' cache
(memory-mapped Arrow with random access; local rank 0 downloads while the node's other ranks wait), so a resume
seeks rather than re-reads. Its epoch order is a seeded permutation of every row. With `data.hub_streaming` it
is streamed instead (for datasets too large for the disk): there is no random access, every rank reads the whole
stream, the order comes from a shuffle buffer, and a resume re-reads (without tokenizing) its epoch up to the
slowest lane.

The held-out set is either `data.val_paths` or, without them, the documents whose blake2b text hash falls
below `data.val_per_mille` / 1000; the training stream then skips every such document.

The lane states index documents by their place in an epoch, so they only mean something for the data they were
saved with: the state also records the source (local file names and sizes, or the Hub dataset, split, resolved
revision and fingerprint, and the text field), and loading it into a run that reads another source fails.

Costs of the design. Lanes drift apart: a lane of long documents is at a lower document index than a lane of
short ones, and the spread grows like the square root of the steps taken. The stream is read as far as the
fastest lane needs, and the slower lanes' documents wait in memory as text (they are tokenized only when their
lane is a few windows from running dry). Local files allow a seek by whole files on resume.
"""

from __future__ import annotations

import glob
import hashlib
import heapq
import itertools
import json
import logging
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from dist_llama.config import DataConfig

logger = logging.getLogger(__name__)

FORMATS = (".jsonl.zst", ".jsonl", ".parquet", ".txt")
STATE_VERSION = 1
TOKENIZE_BATCH_DOCS = 128  # documents per encode_batch call: large enough to keep every core busy
MAX_IN_FLIGHT = 2
HORIZON_BATCHES = 2
READ_BATCH_DOCS = 256  # records read per call: one random-access read of a Hub dataset, bounded memory for a file
HUB_SHUFFLE_BUFFER = 10_000  # rows in the streaming shuffle buffer of a Hub dataset
HUB_CHUNK_ROWS = 1024
# How long a node's other ranks wait for local rank 0 to download and convert the Hub dataset: ~3 GB of parquet
# for the default one, longer than a process group's default timeout (10 min for NCCL) on a slow link.
HUB_DOWNLOAD_TIMEOUT = timedelta(hours=2)


# --- Reading documents from files ------------------------------------------------------------------


def expand_paths(patterns: Iterable[str]) -> list[Path]:
    """Expand globs (relative to the working directory, `**` allowed) into a sorted list of unique files."""
    files = set()
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        matches = glob.glob(pattern, recursive=True) or ([pattern] if os.path.isfile(pattern) else [])
        files.update(match for match in matches if os.path.isfile(match))
    paths = [Path(f) for f in sorted(files)]
    for path in paths:
        _format_of(path)
    return paths


def _format_of(path: Path) -> str:
    for suffix in FORMATS:
        if path.name.endswith(suffix):
            return suffix
    raise ValueError(f"{path}: unsupported file type; data files must end in one of {', '.join(FORMATS)}")


def _as_text(value, where: str) -> str:
    if value is None:
        return ""  # a null text is an empty document: it still contributes its bos/eos
    if not isinstance(value, str):
        raise ValueError(f"{where}: the text field holds a {type(value).__name__}, not a string")
    return value


class _Records:
    """Documents by record number: `text(i)` reads one, `texts(records)` several in one call."""

    def texts(self, records: list[int]) -> list[str]:
        return [self.text(i) for i in records]


class _JsonLines(_Records):
    """One .jsonl/.jsonl.zst file held as raw lines; a line is parsed only when its text is asked for."""

    def __init__(self, path: Path, text_field: str):
        if path.name.endswith(".zst"):
            import zstandard

            with open(path, "rb") as fh:
                raw = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True).read()
        else:
            raw = path.read_bytes()
        # Splitting on b"\n" alone is safe for JSON lines: a newline inside a string is always escaped.
        self.lines = [line for line in raw.split(b"\n") if line.strip()]
        self.path = path
        self.text_field = text_field

    def __len__(self) -> int:
        return len(self.lines)

    def text(self, i: int) -> str:
        where = f"{self.path}, record {i}"
        try:
            record = json.loads(self.lines[i])
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not valid JSON: {error}") from None
        if not isinstance(record, dict) or self.text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where} has no field {self.text_field!r} (data.text_field); it has {keys}")
        return _as_text(record[self.text_field], where)


class _Parquet(_Records):
    def __init__(self, path: Path, text_field: str):
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if text_field not in names:
            raise ValueError(f"{path} has no column {text_field!r} (data.text_field); its columns are {names}")
        self.column = pq.read_table(path, columns=[text_field]).column(text_field)
        self.path = path

    def __len__(self) -> int:
        return len(self.column)

    def text(self, i: int) -> str:
        return _as_text(self.column[i].as_py(), f"{self.path}, row {i}")


class _TextFile(_Records):
    def __init__(self, path: Path, text_field: str):
        self.document = path.read_text(encoding="utf-8")

    def __len__(self) -> int:
        return 1

    def text(self, i: int) -> str:
        return self.document


_READERS = {".jsonl.zst": _JsonLines, ".jsonl": _JsonLines, ".parquet": _Parquet, ".txt": _TextFile}


def _open_file(path: Path, text_field: str):
    return _READERS[_format_of(path)](path, text_field)


def iter_documents(paths: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """The documents of files or globs (any supported format), in sorted file order then record order."""
    for path in expand_paths([str(p) for p in paths]):
        docs = _open_file(path, text_field)
        for i in range(len(docs)):
            yield docs.text(i)


def read_documents(paths: Iterable[str | Path], text_field: str = "text", limit: int | None = None) -> list[str]:
    """The first `limit` (default: all) documents of `paths`; raises FileNotFoundError when nothing matches."""
    paths = list(paths)
    if not expand_paths([str(p) for p in paths]):
        raise FileNotFoundError(f"no data files match {paths}")
    return list(itertools.islice(iter_documents(paths, text_field), limit))


def is_held_out(text: str, per_mille: int) -> bool:
    """The hash rule of the held-out split; blake2b, unlike hash(), is the same in every process."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") * 1000 < per_mille * 2**64


# --- Sources: an epoch-ordered, numbered stream of documents ----------------------------------------


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
            part = positions[first:first + READ_BATCH_DOCS]
            records = part if self.order is None else self.order[part].tolist()
            yield from zip(part, self.docs.texts(records))


def _rng(*key: int) -> np.random.Generator:
    # Keys are tagged (1 for the file order, 2 for a file's documents, 3 for a Hub dataset's rows): SeedSequence
    # gives [s, e] and [s, e, 0] the same stream, so bare variable-length keys could collide.
    return np.random.default_rng(list(key))


class _LocalSource:
    def __init__(self, files: list[Path], text_field: str):
        self.files = files
        self.text_field = text_field
        self._sizes: dict[int, int] = {}  # documents per file, learnt on first load; lets a resume skip files
        # Names and byte sizes, not full paths: the same files moved to another folder are the same data.
        digest = hashlib.blake2b(digest_size=8)
        for path in files:
            digest.update(f"{path.name}\0{path.stat().st_size}\n".encode())
        names = files[0].name + (f" .. {files[-1].name}" if len(files) > 1 else "")
        self.identity = {"kind": "local", "files": len(files), "names_and_sizes": digest.hexdigest(),
                         "text_field": text_field,
                         "description": f"local, {len(files)} file(s) {names} (names and sizes {digest.hexdigest()}), "
                                        f"text field {text_field!r}"}

    def describe(self) -> str:
        return f"local, {len(self.files)} file(s): {self.files[0]}" + (" ..." if len(self.files) > 1 else "")

    def chunks(self, epoch: int, start: int = 0, seed: int | None = None) -> Iterator[_Chunk]:
        """Epoch `epoch` from document `start`: files in a seeded order, each file's records in a seeded order
        (seed None: sorted file order, then record order)."""
        file_order = range(len(self.files)) if seed is None else _rng(seed, epoch, 1).permutation(len(self.files))
        base = 0
        for k in file_order:
            k = int(k)
            if k in self._sizes and base + self._sizes[k] <= start:
                base += self._sizes[k]
                continue
            docs = _open_file(self.files[k], self.text_field)
            self._sizes[k] = len(docs)
            if base + len(docs) > start:
                order = None if seed is None else _rng(seed, epoch, 2, k).permutation(len(docs))
                yield _Chunk(base, docs, order)
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


def _once_per_node(load):
    """load() on local rank 0 of each node first, while the node's other ranks wait; then on those ranks,
    which find what rank 0 put in the node's cache. A collective: with a process group of several ranks,
    every rank must call it. A failure on any rank 0 stops every rank, without the others trying again."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return load()
    # A gloo group of its own: the default group's timeout is too short for a download, and NCCL needs tensors.
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


class _DatasetRows(_Records):
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
        return [_as_text(value, f"{self.where}, row {row}") for value, row in zip(values, rows)]


def _hub_identity(name: str, split: str, revision: str, text_field: str, streaming: bool, **extra) -> dict:
    access = "streamed" if streaming else f"cached, {extra['documents']:,} rows, fingerprint {extra['fingerprint']}"
    return {"kind": "hub", "dataset": name, "split": split, "revision": revision, "streaming": streaming,
            "text_field": text_field, **extra,
            "description": f"hub, {name}@{revision} (split {split}, {access}), text field {text_field!r}"}


class _HubSource:
    """A Hub dataset in the local `datasets` cache: every row by its index, so a rank reads only its own lanes'
    rows and a resume starts at its resume point. The epoch order is a seeded permutation of all rows."""

    def __init__(self, dataset, name: str, split: str, revision: str, text_field: str):
        if text_field not in dataset.column_names:
            raise ValueError(f"the Hub dataset {name} (split {split}) has no column {text_field!r} (data.text_field); "
                             f"its columns are {dataset.column_names}")
        self.dataset = dataset.select_columns([text_field])
        self.name, self.split, self.text_field = name, split, text_field
        self.identity = _hub_identity(name, split, revision, text_field, streaming=False, documents=len(dataset),
                                      fingerprint=dataset._fingerprint)

    def describe(self) -> str:
        return self.identity["description"]

    def chunks(self, epoch: int, start: int = 0, seed: int | None = None) -> Iterator[_Chunk]:
        size = len(self.dataset)
        rows = np.arange(size) if seed is None else _rng(seed, epoch, 3).permutation(size)
        for base in range(start - start % HUB_CHUNK_ROWS, size, HUB_CHUNK_ROWS):
            where = f"{self.name} (split {self.split})"
            yield _Chunk(base, _DatasetRows(self.dataset, rows[base:base + HUB_CHUNK_ROWS], self.text_field, where))


class _Rows(_Records):
    def __init__(self, rows: list[dict], text_field: str, where: str):
        self.rows, self.text_field, self.where = rows, text_field, where

    def __len__(self) -> int:
        return len(self.rows)

    def text(self, j: int) -> str:
        return _as_text(self.rows[j][self.text_field], self.where)


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


def _open_hub_source(config: DataConfig):
    def load():
        return _load_hub_dataset(config.hub_dataset, config.hub_split, config.hub_revision, config.hub_streaming)

    try:
        # A stream is read by every rank anyway; a download is made once per node.
        dataset, revision = load() if config.hub_streaming else _once_per_node(load)
    except Exception as error:  # noqa: BLE001 - any failure here means "no data", said plainly below
        local = f"data.paths={config.paths} match no files and " if config.source == "auto" else ""
        pinned = f", revision {config.hub_revision!r}" if config.hub_revision else ""
        raise FileNotFoundError(f"{local}the Hub dataset data.hub_dataset={config.hub_dataset!r} (split "
                                f"{config.hub_split!r}{pinned}) could not be opened: {error}. Point data.paths at "
                                "local .jsonl/.jsonl.zst/.parquet/.txt files, or make the Hub reachable") from error
    source_class = _HubStreamSource if config.hub_streaming else _HubSource
    return source_class(dataset, config.hub_dataset, config.hub_split, revision, config.text_field)


def _open_source(config: DataConfig, purpose: str):
    files = expand_paths(config.paths)
    if config.source == "local" or (config.source == "auto" and files):
        if not files:
            raise FileNotFoundError(f"data.source=local but data.paths={config.paths} match no files (relative to "
                                    f"{os.getcwd()}); fix the globs, or use data.source=hub")
        source = _LocalSource(files, config.text_field)
    elif config.source in ("hub", "auto"):
        if config.source == "auto" and config.paths:
            # Relative paths in a config resolve against the working directory: run from elsewhere and they match
            # nothing. Training then goes on, on other data, which must not pass unnoticed.
            logger.warning("data.source=auto: data.paths %s match no files relative to the working directory %s, so "
                           "the %s data is the Hub dataset %s instead. To train on those files, run from the "
                           "directory they are relative to or make them absolute; set data.source=local to stop "
                           "with an error instead of switching", config.paths, os.getcwd(), purpose,
                           config.hub_dataset)
        source = _open_hub_source(config)
    else:
        raise ValueError(f"data.source={config.source!r} is not valid; choose one of local, hub, auto")
    logger.info("%s data: %s", purpose, source.describe())
    return source


# --- Tokenizing --------------------------------------------------------------------------------------


class DocumentEncoder:
    """Documents -> [bos] + ids + [eos] as int32 arrays, through a private copy of the Rust tokenizer."""

    def __init__(self, tokenizer):
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if self.bos is None or self.eos is None:
            raise ValueError(f"the tokenizer needs bos and eos tokens (bos_token_id={self.bos}, "
                             f"eos_token_id={self.eos})")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(f"{type(tokenizer).__name__} has no backend_tokenizer: pass a fast (Rust) tokenizer")
        # A copy of our own: no truncation or padding left enabled by another caller, and no sharing across threads.
        try:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
        except Exception:  # noqa: BLE001 - a pipeline that cannot be serialised is used as it is
            logger.warning("could not copy the tokenizer; using it directly")
        backend.no_truncation()
        backend.no_padding()
        # A web page that contains the text "</s>" must not end its document early: special-token strings in
        # the text are encoded as plain text, as SentencePiece does.
        backend.encode_special_tokens = True
        self.backend = backend

    def encode_batch(self, texts: list[str]) -> list:
        """Rust encodings; the GIL is released meanwhile, so this runs on a thread of its own."""
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def to_tokens(self, encoding) -> np.ndarray:
        ids = encoding.ids
        tokens = np.empty(len(ids) + 2, dtype=np.int32)
        tokens[0], tokens[1:-1], tokens[-1] = self.bos, ids, self.eos
        return tokens

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [self.to_tokens(encoding) for encoding in self.encode_batch(texts)]


# --- Lanes and the packer ----------------------------------------------------------------------------


class _Lane:
    """One lane's documents: read but not yet tokenized (`texts`), then tokenized (`segments`).

    segments[0] holds the next window's first token at `offset`.
    """

    def __init__(self, index: int, epoch: int, doc: int, offset: int):
        self.index = index
        # Resume point: documents before (epoch, doc) are not this lane's any more; `offset` tokens of
        # document (epoch, doc) itself were already emitted.
        self.resume = (epoch, doc)
        self.resume_offset = offset
        self.texts: deque[tuple[int, int, str]] = deque()  # (epoch, doc, text)
        self.tokenizing = 0  # documents of this lane in a tokenizer batch not yet unpacked
        self.tokenizing_estimate = 0  # and their tokens, estimated as characters / 4
        self.segments: deque[tuple[int, int, np.ndarray]] = deque()  # (epoch, doc, tokens)
        self.offset = 0
        self.available = 0  # tokenized tokens from the current position on
        self.documents_pushed = 0

    def push(self, epoch: int, doc: int, tokens: np.ndarray) -> None:
        if not self.segments and self.resume_offset:
            if (epoch, doc) != self.resume or self.resume_offset >= len(tokens):
                raise ValueError(f"lane {self.index}: the state points at token {self.resume_offset} of document "
                                 f"{self.resume[1]} of epoch {self.resume[0]}, but that document is not there or has "
                                 f"fewer tokens: the data or the tokenizer is not the one the state was saved with")
            self.offset = self.resume_offset
            self.available -= self.resume_offset
        self.segments.append((epoch, doc, tokens))
        self.available += len(tokens)
        self.documents_pushed += 1

    def take_window(self, out: np.ndarray, seq_len: int) -> None:
        """Copy the next seq_len + 1 tokens into `out`, then advance by seq_len (the last token is shared)."""
        filled, offset = 0, self.offset
        for _, _, tokens in self.segments:
            n = min(len(tokens) - offset, len(out) - filled)
            out[filled:filled + n] = tokens[offset:offset + n]
            filled, offset = filled + n, 0
            if filled == len(out):
                break
        step = seq_len
        self.available -= step
        while step:
            left = len(self.segments[0][2]) - self.offset
            if left > step:
                self.offset += step
                break
            step -= left
            self.segments.popleft()
            self.offset = 0

    def state(self) -> dict:
        if not self.segments:  # nothing read yet: the resume point is still the state
            return {"epoch": self.resume[0], "doc": self.resume[1], "offset": self.resume_offset}
        epoch, doc, _ = self.segments[0]
        return {"epoch": epoch, "doc": doc, "offset": self.offset}


class _Packer:
    """Makes this rank's batches in order. Not thread-safe: exactly one thread calls next_batch."""

    def __init__(self, source, encoder: DocumentEncoder, lanes: list[_Lane], *, global_rows: int, seq_len: int,
                 seed: int, shuffle: bool, held_out_per_mille: int):
        self.source, self.encoder, self.lanes = source, encoder, lanes
        self.global_rows, self.seq_len = global_rows, seq_len
        self.seed = seed if shuffle else None
        self.held_out_per_mille = held_out_per_mille
        self.lane_of = {lane.index: lane for lane in lanes}
        self.owned = np.zeros(global_rows, dtype=bool)
        self.owned[[lane.index for lane in lanes]] = True
        # Read a few documents per lane at a time, so that one encode_batch call has work for every core.
        self.read_ahead = -(-TOKENIZE_BATCH_DOCS // len(lanes))
        self.documents_unpacked, self.tokens_unpacked = 1, seq_len  # for the mean document length
        self.reader_epoch = min(lane.resume for lane in lanes)[0]
        self.documents = self._owned_documents()
        # encode_batch runs on this one worker while our thread parses, unpacks ids and packs windows (which hold
        # the GIL); batches are submitted and unpacked in order, one or two in flight.
        self.tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="PackedBatches-tokenizer")
        self.in_flight: deque[tuple[list[tuple[_Lane, int, int, int]], Future]] = deque()

    def _owned_documents(self) -> Iterator[tuple[_Lane, int, int, str]]:
        """This rank's training documents in epoch order, forever; other lanes' records are never parsed."""
        epoch, start = min(lane.resume for lane in self.lanes)
        while True:
            self.reader_epoch = epoch
            size, yielded = 0, 0
            for chunk in self.source.chunks(epoch, start, self.seed):
                docs = chunk.base + np.arange(chunk.size)
                mine = (docs >= start) & self.owned[docs % self.global_rows]
                # Only this rank's lanes' documents from each lane's resume point on are read at all.
                wanted = [j for j in np.flatnonzero(mine).tolist()
                          if (epoch, chunk.base + j) >= self.lane_of[(chunk.base + j) % self.global_rows].resume]
                for j, text in chunk.read(wanted):
                    doc = chunk.base + j
                    lane = self.lane_of[doc % self.global_rows]
                    if self.held_out_per_mille and is_held_out(text, self.held_out_per_mille):
                        continue
                    yielded += 1
                    yield lane, epoch, doc, text
                size = chunk.base + chunk.size
            if size <= start:
                if start == 0:
                    raise ValueError(f"the data source ({self.source.describe()}) holds no documents")
                raise ValueError(f"the data state points at document {start} of epoch {epoch}, past the end of the "
                                 "epoch: the data is not the one the state was saved with")
            if size < self.global_rows:
                raise ValueError(f"the data source has {size} documents, fewer than the {self.global_rows} lanes "
                                 "(global batch rows): add data or lower train.tokens_per_step")
            if start == 0 and yielded == 0:
                raise ValueError(f"a whole epoch of {size} documents gave this rank's lanes no training document; "
                                 "the source is too small for this many lanes")
            epoch, start = epoch + 1, 0

    def _read(self, lane: _Lane) -> None:
        """Route documents from the stream into their lanes until `lane` has `read_ahead` texts waiting."""
        first_epoch, had = self.reader_epoch, len(lane.texts)
        while len(lane.texts) < self.read_ahead:
            owner, epoch, doc, text = next(self.documents)
            owner.texts.append((epoch, doc, text))
            if len(lane.texts) == had and self.reader_epoch - first_epoch >= 2:
                raise ValueError(f"lane {lane.index} got no training document in a whole epoch: the source has "
                                 f"too few documents for {self.global_rows} lanes")

    def _submit(self, needy: _Lane | None = None) -> None:
        """Start tokenizing a batch: `needy`'s next document, then those of the lanes closest to running dry.

        Lanes drift apart (their documents differ in length), so the stream is read far ahead for the fastest
        lane while the slowest still has documents queued. Queued documents stay text until their lane is
        about to need them, so tokenizing runs only a few windows ahead.
        Which documents go into which batch never changes the output: each lane's documents are unpacked in
        its own order.
        """
        # Tokenize for the lanes holding the fewest tokens (counting documents being tokenized), up to a horizon
        # that leaves room for two full tokenizer batches beyond the next window: enough to keep a batch in
        # flight, few enough that little is tokenized ahead.
        mean_document = self.tokens_unpacked / self.documents_unpacked
        horizon = self.seq_len + 1 + HORIZON_BATCHES * TOKENIZE_BATCH_DOCS * mean_document / len(self.lanes)
        for lane in self.lanes:
            if not lane.texts and (lane is needy or lane.available + lane.tokenizing_estimate < horizon):
                self._read(lane)  # reading is cheap; without it the tokenizer would idle until this lane runs dry
        picked = [] if needy is None else [(needy, *needy.texts.popleft())]
        candidates = [(lane.available + lane.tokenizing_estimate + (len(picked[0][3]) // 4 if lane is needy else 0),
                       lane.index) for lane in self.lanes if lane.texts]
        heapq.heapify(candidates)
        while candidates and candidates[0][0] < horizon and len(picked) < TOKENIZE_BATCH_DOCS:
            projected, index = heapq.heappop(candidates)
            lane = self.lane_of[index]
            picked.append((lane, *lane.texts.popleft()))
            if lane.texts:
                heapq.heappush(candidates, (projected + len(picked[-1][3]) // 4, index))
        if not picked:
            return
        batch = []
        for lane, epoch, doc, text in picked:
            lane.tokenizing += 1
            lane.tokenizing_estimate += len(text) // 4
            batch.append((lane, epoch, doc, len(text) // 4))
        future = self.tokenizer_thread.submit(self.encoder.encode_batch, [text for *_, text in picked])
        self.in_flight.append((batch, future))

    def _unpack_oldest(self) -> None:
        batch, future = self.in_flight.popleft()
        encodings = future.result()
        if len(self.in_flight) < MAX_IN_FLIGHT:
            self._submit()  # keep the tokenizer busy while this thread unpacks
        for (lane, epoch, doc, estimate), encoding in zip(batch, encodings):
            lane.tokenizing -= 1
            lane.tokenizing_estimate -= estimate
            tokens = self.encoder.to_tokens(encoding)
            lane.push(epoch, doc, tokens)
            self.documents_unpacked += 1
            self.tokens_unpacked += len(tokens)

    def _fill(self, needy: _Lane) -> None:
        """Give `needy` at least one more tokenized document."""
        if not needy.tokenizing:
            self._submit(needy)
        target = needy.documents_pushed + 1
        while needy.documents_pushed < target:
            self._unpack_oldest()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        windows = np.empty((len(self.lanes), self.seq_len + 1), dtype=np.int64)
        for row, lane in zip(windows, self.lanes):
            while lane.available < self.seq_len + 1:
                self._fill(lane)
            lane.take_window(row, self.seq_len)
        if len(self.in_flight) < MAX_IN_FLIGHT:
            self._submit()  # tokenize ahead while the batch is handed over
        windows = torch.from_numpy(windows)
        states = {str(lane.index): lane.state() for lane in self.lanes}
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), states

    def close(self) -> None:
        self.tokenizer_thread.shutdown(wait=True, cancel_futures=True)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class _Prefetcher:
    """Runs `produce` on a daemon thread, `depth` results ahead; its exceptions surface in get()."""

    def __init__(self, produce, depth: int, name: str):
        self._produce = produce
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._produce()
            except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
                item = _Failure(error)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failure):
                return

    def get(self):
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the data prefetch thread stopped") from None
        if isinstance(item, _Failure):
            self._queue.put(item)  # every later get() fails the same way
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


class _Inline:
    """prefetch_steps <= 0: produce on the caller's thread (for debugging)."""

    def __init__(self, produce):
        self._produce, self._error = produce, None

    def get(self):
        if self._error is not None:
            raise self._error
        try:
            return self._produce()
        except BaseException as error:
            self._error = error
            raise

    def close(self) -> None:
        pass


class PackedBatches:
    """This rank's share of an endless stream of packed global batches; see the module docstring.

    Each `next()` gives (inputs, labels), LongTensors of shape (global_rows // world_size, seq_len): the rows
    of the lanes l with l % world_size == rank, in increasing l. `labels` is `inputs` shifted by one token.
    With a cached Hub dataset and a process group of several ranks, every rank must build it (and likewise call
    validation_batches): local rank 0 downloads while the others wait at a barrier.
    """

    def __init__(self, config: DataConfig, tokenizer, *, global_rows: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0):
        if global_rows <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need global_rows > 0 and 0 <= rank < world_size (got global_rows={global_rows}, "
                             f"rank={rank}, world_size={world_size})")
        if global_rows % world_size:
            raise ValueError(f"global_rows={global_rows} (sequences per optimizer step) must be divisible by "
                             f"world_size={world_size}: every rank holds the same number of lanes")
        if seed < 0:
            raise ValueError(f"seed={seed} must be non-negative")
        self.config = config
        self.global_rows, self.rank, self.world_size, self.seed = global_rows, rank, world_size, seed
        self.seq_len = config.seq_len
        self.lanes = tuple(range(rank, global_rows, world_size))
        self._source = _open_source(config, "training")
        self._encoder = DocumentEncoder(tokenizer)
        self._held_out_per_mille = 0 if held_out_files(config) else config.val_per_mille
        self._lane_states = {str(lane): {"epoch": 0, "doc": lane, "offset": 0} for lane in self.lanes}
        self._producer = self._packer = None
        self.batches_yielded = 0

    # The producer is built lazily, from the lane states, so that load_state_dict can come first.
    def _start(self) -> None:
        lanes = [_Lane(lane, **self._lane_states[str(lane)]) for lane in self.lanes]
        packer = _Packer(self._source, self._encoder, lanes, global_rows=self.global_rows, seq_len=self.seq_len,
                         seed=self.seed, shuffle=self.config.shuffle, held_out_per_mille=self._held_out_per_mille)
        if self.config.prefetch_steps > 0:
            self._producer = _Prefetcher(packer.next_batch, self.config.prefetch_steps,
                                         f"PackedBatches-rank{self.rank}")
        else:
            self._producer = _Inline(packer.next_batch)
        self._packer = packer

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._producer is None:
            self._start()
        inputs, labels, states = self._producer.get()
        self._lane_states = states
        self.batches_yielded += 1
        return inputs, labels

    @property
    def epoch(self) -> float:
        """The lowest epoch among this rank's lanes (lanes drift apart, so they may cross a wrap at different steps)."""
        return float(min(state["epoch"] for state in self._lane_states.values()))

    def state_dict(self) -> dict:
        """This rank's lanes as of the last batch returned (not as far as the prefetch thread has got)."""
        return {"version": STATE_VERSION, "global_rows": self.global_rows, "seq_len": self.seq_len,
                "seed": self.seed, "shuffle": self.config.shuffle, "held_out_per_mille": self._held_out_per_mille,
                "batches": self.batches_yielded, "source": dict(self._source.identity),
                "lanes": {lane: dict(state) for lane, state in self._lane_states.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a merged state saved at any world size (see merge_states)."""
        _check_compatible(state, self.state_dict(), "the saved data state", "this run")
        missing = [lane for lane in self.lanes if str(lane) not in state["lanes"]]
        if missing:
            raise ValueError(f"the saved data state lacks lanes {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                             f"of rank {self.rank}: pass the merged state of all ranks (merge_states)")
        self.close()
        self._lane_states = {str(lane): _lane_state(state["lanes"][str(lane)]) for lane in self.lanes}
        self.batches_yielded = int(state.get("batches", 0))

    def close(self) -> None:
        """Stop the prefetch thread; the next `next()` starts it again from the last state."""
        if self._producer is not None:
            self._producer.close()
            self._packer.close()
            self._producer = self._packer = None

    def __enter__(self) -> PackedBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _lane_state(state: dict) -> dict:
    try:
        values = {key: int(state[key]) for key in ("epoch", "doc", "offset")}
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"bad lane state {state!r}: expected epoch, doc and offset integers") from None
    if min(values.values()) < 0:
        raise ValueError(f"bad lane state {state!r}: negative values")
    return values


# Keys that must agree between a saved state and the run that loads it, or between ranks that merge.
_STATE_KEYS = {"global_rows": "global batch rows (train.tokens_per_step / data.seq_len)", "seq_len": "data.seq_len",
               "seed": "the data seed", "shuffle": "data.shuffle",
               "held_out_per_mille": "the held-out rule (data.val_per_mille, 0 with data.val_paths)"}


def _check_compatible(state: dict, reference: dict, state_name: str, reference_name: str) -> None:
    if not isinstance(state, dict) or not {"lanes", "global_rows", "seq_len"} <= state.keys():
        raise ValueError(f"{state_name} is not a PackedBatches state (it needs lanes, global_rows and seq_len)")
    if state.get("version", STATE_VERSION) != STATE_VERSION:
        raise ValueError(f"{state_name} has version {state.get('version')}; this code reads version {STATE_VERSION}")
    for key, meaning in _STATE_KEYS.items():
        if key in state and state[key] != reference[key]:
            raise ValueError(f"{state_name} has {key}={state[key]} but {reference_name} has {key}={reference[key]} "
                             f"({meaning}): the lanes would not continue the same stream. Use the same setting, or "
                             "restart the data stream instead of loading this state")
    # States saved before sources were recorded carry none: nothing to compare them with.
    saved, current = state.get("source"), reference.get("source")
    if saved is not None and current is not None and _source_mismatch(saved, current):
        changed = ", ".join(f"{key} {saved.get(key)!r} -> {current.get(key)!r}"
                            for key in _source_mismatch(saved, current))
        raise ValueError(f"{state_name} was read from [{saved.get('description')}] but {reference_name} reads "
                         f"[{current.get('description')}] ({changed}): its lane positions would point at other "
                         "documents. Point data.paths / data.hub_dataset / data.hub_split / data.hub_revision / "
                         "data.hub_streaming / data.text_field back at the saved source, or start a new run (another "
                         "train.name; train.init_from keeps the weights and restarts the data stream)")


def _source_mismatch(saved: dict, current: dict) -> list[str]:
    """The identity keys (all but the description) on which two recorded sources differ."""
    keys = (saved.keys() | current.keys()) - {"description"}
    return sorted(key for key in keys if saved.get(key) != current.get(key))


def merge_states(states: list[dict]) -> dict:
    """Merge the ranks' state_dict()s (e.g. from all_gather_object) into one world-size-free state."""
    if not states:
        raise ValueError("merge_states needs at least one state")
    merged = {key: value for key, value in states[0].items() if key != "lanes"}
    merged["lanes"] = {}
    for i, state in enumerate(states):
        _check_compatible(state, states[0], f"state {i}", "state 0")
        if state.get("batches") != states[0].get("batches"):
            raise ValueError(f"state {i} is at batch {state.get('batches')} but state 0 at {states[0].get('batches')}: "
                             "ranks must be saved after the same step")
        overlap = merged["lanes"].keys() & state["lanes"].keys()
        if overlap:
            raise ValueError(f"lanes {sorted(overlap, key=int)[:8]} appear in more than one state")
        merged["lanes"].update({lane: dict(lane_state) for lane, lane_state in state["lanes"].items()})
    return merged


# --- Held-out set -------------------------------------------------------------------------------------


def held_out_files(config: DataConfig) -> list[Path]:
    """The files of data.val_paths; an empty list means the hash rule holds documents out of the stream."""
    files = expand_paths(config.val_paths)
    if config.val_paths and not files:
        if config.source != "auto":
            raise FileNotFoundError(f"data.val_paths={config.val_paths} match no files (relative to {os.getcwd()}); "
                                    "fix the globs, or set data.val_paths=[] to hold out documents by hash")
        # `auto` means "local files when present": a config written for a machine with local text still
        # runs elsewhere, on the Hub dataset with a hash-rule held-out set.
        logger.warning("data.source=auto: data.val_paths %s match no files relative to the working directory %s; "
                       "holding out documents by hash instead. Set data.source=local to stop with an error instead",
                       config.val_paths, os.getcwd())
    return files


def held_out_documents(config: DataConfig) -> list[str]:
    """The first data.val_docs documents of data.val_paths, or of the source's hash-selected documents."""
    files = held_out_files(config)
    if files:
        docs = list(itertools.islice(iter_documents(files, config.text_field), config.val_docs))
    else:
        if config.val_per_mille <= 0:
            raise ValueError("no held-out set: set data.val_paths, or data.val_per_mille > 0 to hold out by hash")
        source = _open_source(config, "held-out")
        docs = []
        for chunk in source.chunks(epoch=0):
            for _, text in chunk.read(list(range(chunk.size))):
                if is_held_out(text, config.val_per_mille):
                    docs.append(text)
            if len(docs) >= config.val_docs:
                break
        docs = docs[:config.val_docs]
    if not docs:
        raise ValueError("the held-out set is empty: add documents to data.val_paths, or raise data.val_per_mille")
    return docs


def token_stream(documents: list[str], tokenizer) -> np.ndarray:
    """The training layout of documents as one stream: [bos] doc [eos] [bos] doc [eos] ..."""
    return np.concatenate(DocumentEncoder(tokenizer).encode(documents))


def cut_windows(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """Windows of seq_len + 1 tokens beginning at `starts` (any shape), as int64: inputs and shifted labels."""
    return torch.from_numpy(stream[starts[..., None] + np.arange(seq_len + 1)].astype(np.int64))


def validation_batches(config: DataConfig, tokenizer, *, rows: int, n_batches: int, rank: int = 0,
                       world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n_batches global batches of `rows` rows from the held-out set; this rank keeps rows l % world_size == rank.

    The held-out documents are packed as one stream ([bos] doc [eos] ..., windows of seq_len + 1 overlapping by
    one token) and row l of batch b is window b * rows + l. A held-out set shorter than that is recycled from
    its start (with a warning): the loss is then averaged over repeated windows rather than failing the run.
    """
    if rows <= 0 or n_batches <= 0 or rows % world_size or not 0 <= rank < world_size:
        raise ValueError(f"need rows > 0 divisible by world_size, n_batches > 0 and 0 <= rank < world_size "
                         f"(got rows={rows}, n_batches={n_batches}, rank={rank}, world_size={world_size})")
    seq_len = config.seq_len
    stream = token_stream(held_out_documents(config), tokenizer)
    needed = rows * n_batches * seq_len + 1
    if len(stream) < needed:
        logger.warning("the held-out set has %d tokens, fewer than the %d that %d batches of %d x %d need: "
                       "recycling it", len(stream), needed, n_batches, rows, seq_len)
        stream = np.tile(stream, -(-needed // len(stream)))
    starts = np.arange(rows * n_batches).reshape(n_batches, rows)[:, rank::world_size] * seq_len
    windows = cut_windows(stream, starts, seq_len)
    return [(batch[:, :-1].contiguous(), batch[:, 1:].contiguous()) for batch in windows]
