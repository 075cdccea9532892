"""Tokenizing: documents -> [bos] ids [eos] token arrays, the layout every lane, the token cache and the
held-out stream use; the tokenizer's identity (what the token cache records) and the cores its Rust threads
may use."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np

logger = logging.getLogger(__name__)


def rank_cores() -> int:
    """The cores this process may run on, shared with the other ranks of its node (torchrun's
    LOCAL_WORLD_SIZE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def limit_tokenizer_threads(threads: int) -> None:
    """Size the Rust tokenizer's thread pool (RAYON_NUM_THREADS), unless the user set it. The pool is made on
    the first parallel encode of the process and keeps its size, so this must come before any."""
    if "RAYON_NUM_THREADS" not in os.environ:
        os.environ["RAYON_NUM_THREADS"] = str(threads)


class DocumentEncoder:
    """Documents -> [bos] + ids + [eos] as int32 arrays, through a private copy of the Rust tokenizer.

    Picklable (as its tokenizer's JSON), so that the token cache's build processes each get the same one.
    """

    def __init__(self, tokenizer):
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if self.bos is None or self.eos is None:
            raise ValueError(
                f"the tokenizer needs bos and eos tokens (bos_token_id={self.bos}, eos_token_id={self.eos})"
            )
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(
                f"{type(tokenizer).__name__} has no backend_tokenizer: pass a fast (Rust) tokenizer"
            )
        # A copy of our own: no truncation or padding left enabled by another caller,
        # and no sharing across threads.
        try:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
        except Exception:  # noqa: BLE001 - a pipeline that cannot be serialised is used as it is
            logger.warning("could not copy the tokenizer; using it directly")
        self._set_backend(backend)

    def _set_backend(self, backend) -> None:
        backend.no_truncation()
        backend.no_padding()
        # A web page that contains the text "</s>" must not end its document early: special-token strings in
        # the text are encoded as plain text, as SentencePiece does.
        backend.encode_special_tokens = True
        self.backend = backend
        # tokenizers >= 0.21: the same ids without computing character offsets, which nothing here reads.
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def __getstate__(self) -> dict:
        return {"tokenizer": self.backend.to_str(), "bos": self.bos, "eos": self.eos}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer

        self.bos, self.eos = state["bos"], state["eos"]
        self._set_backend(Tokenizer.from_str(state["tokenizer"]))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def identity(self) -> dict:
        """What decides the ids: a hash of the normalizer, pre-tokenizer, model (vocabulary and merges) and
        added tokens, with bos and eos. The decoder, padding and truncation are left out."""
        spec = json.loads(self.backend.to_str())
        decisive = {key: spec.get(key) for key in ("normalizer", "pre_tokenizer", "model", "added_tokens")}
        digest = hashlib.blake2b(json.dumps(decisive, sort_keys=True).encode(), digest_size=16).hexdigest()
        return {"hash": digest, "vocab_size": self.vocab_size, "bos": self.bos, "eos": self.eos}

    def encode_batch(self, texts: list[str]) -> list:
        """Rust encodings; the GIL is released meanwhile, so this runs on a thread of its own."""
        return self._encode_batch(texts, add_special_tokens=False)

    def to_tokens(self, encoding) -> np.ndarray:
        ids = encoding.ids
        tokens = np.empty(len(ids) + 2, dtype=np.int32)
        tokens[0], tokens[1:-1], tokens[-1] = self.bos, ids, self.eos
        return tokens

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [self.to_tokens(encoding) for encoding in self.encode_batch(texts)]
