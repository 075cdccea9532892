"""The token cache: the configured training documents tokenized once, by every core, and read back by index.

A cache folder (data.token_cache) holds

    manifest.json       what the tokens were made from and the shards (cache_manifest.py)
    tokens-NNNNN.bin    each document as the lanes take it, [bos] ids [eos], back to back (uint16 when the
                        vocabulary fits, else uint32); read with numpy.memmap
    offsets-NNNNN.npy   int64, one more than the shard's documents: document i is
                        tokens[offsets[i]:offsets[i + 1]], empty for a document the hash rule holds out
                        (held-out text is never tokenized into it)

Documents are numbered in the source's own order: the sorted files and each file's records in order (one
shard per file), or a Hub dataset's rows (cache_build.CACHE_SHARD_ROWS rows a shard). TokenCache reads a
record's tokens, and orders an epoch by the same functions that order the text (sources.local_epoch_order /
row_order); token_sources.CachedTokenSource hands the tokens to the lanes of the same packer that tokenizing
on the fly feeds, and the data state records the same source identity. So a run from the cache and a run
that tokenizes on the fly give the same batches, bit for bit, and either resumes the other's checkpoints.

This module reads a cache (load_token_cache, or open_token_cache, which builds a missing one first);
cache_build.py builds one (build_token_cache) and cache_manifest.py decides whether one matches the config.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dist_llama.config import DataConfig
from dist_llama.data.cache_build import build_token_cache
from dist_llama.data.cache_manifest import ExpectedCache, read_manifest, refusal
from dist_llama.data.encoding import DocumentEncoder
from dist_llama.data.sources import local_epoch_order, once_per_node, row_order

logger = logging.getLogger(__name__)


class TokenCache:
    """A built cache (load_token_cache): the documents' tokens by record number, and each epoch's order
    of records."""

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


def load_token_cache(config: DataConfig, tokenizer) -> TokenCache:
    """The cache of config.token_cache, checked against the config (ConfigError naming what differs)."""
    folder = Path(config.token_cache)
    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(
            f"no token cache in {folder}: build it with python -m dist_llama.data.prepare"
        )
    differences = ExpectedCache(config, DocumentEncoder(tokenizer)).differences(manifest)
    if differences:
        raise refusal(folder, differences)
    source = TokenCache(folder, manifest)
    logger.info("training data: %s", source.describe())
    return source


def open_token_cache(config: DataConfig, tokenizer) -> TokenCache:
    """load_token_cache, building the cache first where it is missing: once per node (local rank 0 builds
    while the node's other ranks wait, as for a Hub download). A collective in a process group of several
    ranks."""

    def load():
        if read_manifest(Path(config.token_cache)) is None:
            build_token_cache(config, tokenizer)
        return load_token_cache(config, tokenizer)

    return once_per_node(load)
