"""The held-out set: data.val_paths, or the documents that the blake2b hash rule keeps out of the training
stream, and the validation batches packed from it."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from pathlib import Path

import numpy as np
import torch

from dist_llama.config import DataConfig
from dist_llama.data.encoding import DocumentEncoder
from dist_llama.data.readers import expand_paths, iter_documents
from dist_llama.data.sources import open_source

logger = logging.getLogger(__name__)


def is_held_out(text: str, per_mille: int) -> bool:
    """The hash rule of the held-out split; blake2b, unlike hash(), is the same in every process."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") * 1000 < per_mille * 2**64


def held_out_files(config: DataConfig) -> list[Path]:
    """The files of data.val_paths; an empty list means the hash rule holds documents out of the stream."""
    files = expand_paths(config.val_paths)
    if config.val_paths and not files:
        if config.source != "auto":
            raise FileNotFoundError(
                f"data.val_paths={config.val_paths} match no files (relative to {os.getcwd()}); "
                "fix the globs, or set data.val_paths=[] to hold out documents by hash"
            )
        # `auto` means "local files when present": a config written for a machine with local text still
        # runs elsewhere, on the Hub dataset with a hash-rule held-out set.
        logger.warning(
            "data.source=auto: data.val_paths %s match no files relative to the working directory %s; "
            "holding out documents by hash instead. Set data.source=local to stop with an error instead",
            config.val_paths,
            os.getcwd(),
        )
    return files


def held_out_documents(config: DataConfig) -> list[str]:
    """The first data.val_docs documents of data.val_paths, or of the source's hash-selected documents."""
    files = held_out_files(config)
    if files:
        docs = list(itertools.islice(iter_documents(files, config.text_field), config.val_docs))
    else:
        if config.val_per_mille <= 0:
            raise ValueError(
                "no held-out set: set data.val_paths, or data.val_per_mille > 0 to hold out by hash"
            )
        source = open_source(config, "held-out")
        docs = []
        for chunk in source.chunks(epoch=0):
            for _, text in chunk.read(list(range(chunk.size))):
                if is_held_out(text, config.val_per_mille):
                    docs.append(text)
            if len(docs) >= config.val_docs:
                break
        docs = docs[: config.val_docs]
    if not docs:
        raise ValueError(
            "the held-out set is empty: add documents to data.val_paths, or raise data.val_per_mille"
        )
    return docs


def token_stream(documents: list[str], tokenizer) -> np.ndarray:
    """The training layout of documents as one stream: [bos] doc [eos] [bos] doc [eos] ..."""
    return np.concatenate(DocumentEncoder(tokenizer).encode(documents))


def cut_windows(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """Windows of seq_len + 1 tokens beginning at `starts` (any shape), as int64: inputs and shifted
    labels."""
    return torch.from_numpy(stream[starts[..., None] + np.arange(seq_len + 1)].astype(np.int64))


def validation_batches(
    config: DataConfig, tokenizer, *, rows: int, n_batches: int, rank: int = 0, world_size: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n_batches global batches of `rows` rows from the held-out set; this rank keeps rows
    l % world_size == rank.

    The held-out documents are packed as one stream ([bos] doc [eos] ..., windows of seq_len + 1 overlapping
    by one token) and row l of batch b is window b * rows + l. A held-out set shorter than that is recycled
    from its start (with a warning): the loss is then averaged over repeated windows rather than failing the
    run.
    """
    if rows <= 0 or n_batches <= 0 or rows % world_size or not 0 <= rank < world_size:
        raise ValueError(
            f"need rows > 0 divisible by world_size, n_batches > 0 and 0 <= rank < world_size "
            f"(got rows={rows}, n_batches={n_batches}, rank={rank}, world_size={world_size})"
        )
    seq_len = config.seq_len
    stream = token_stream(held_out_documents(config), tokenizer)
    needed = rows * n_batches * seq_len + 1
    if len(stream) < needed:
        logger.warning(
            "the held-out set has %d tokens, fewer than the %d that %d batches of %d x %d need: recycling it",
            len(stream),
            needed,
            n_batches,
            rows,
            seq_len,
        )
        stream = np.tile(stream, -(-needed // len(stream)))
    starts = np.arange(rows * n_batches).reshape(n_batches, rows)[:, rank::world_size] * seq_len
    windows = cut_windows(stream, starts, seq_len)
    return [(batch[:, :-1].contiguous(), batch[:, 1:].contiguous()) for batch in windows]
