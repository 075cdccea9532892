"""Tokenizing: documents -> [bos] ids [eos] token arrays, the layout every lane and the held-out stream use."""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


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
