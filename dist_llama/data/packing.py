"""The packer: each lane's documents back to back, cut into windows of seq_len + 1 tokens, one row per lane of
every batch (the layout in the package docstring).

Where a lane's documents come from, tokenized on the fly or read from the token cache, is a token source's
business (token_sources.py). The packer only asks its source to fill a lane that holds less than a window, so
the windows cannot depend on which source gave the tokens, nor on when.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch


class Lane:
    """One lane's tokenized documents not yet emitted (`segments`), and its position in them.

    segments[0] holds the next window's first token at `offset`; `available` counts the tokens from there on.
    """

    def __init__(self, index: int, epoch: int, doc: int, offset: int):
        self.index = index
        # Resume point: documents before (epoch, doc) are not this lane's any more; `offset` tokens of
        # document (epoch, doc) itself were already emitted.
        self.resume = (epoch, doc)
        self.resume_offset = offset
        self.segments: deque[tuple[int, int, np.ndarray]] = deque()  # (epoch, doc, tokens)
        self.offset = 0
        self.available = 0

    def push(self, epoch: int, doc: int, tokens: np.ndarray) -> None:
        """Append the lane's next document (when the resume point has an offset, the first is that one)."""
        if not self.segments and self.resume_offset:
            if (epoch, doc) != self.resume or self.resume_offset >= len(tokens):
                where = f"token {self.resume_offset} of document {self.resume[1]} of epoch {self.resume[0]}"
                raise ValueError(
                    f"lane {self.index}: the state points at {where}, but that document is not "
                    "there or has fewer tokens: the data or the tokenizer is not the one the "
                    "state was saved with"
                )
            self.offset = self.resume_offset
            self.available -= self.resume_offset
        self.segments.append((epoch, doc, tokens))
        self.available += len(tokens)

    def take_window(self, out: np.ndarray, seq_len: int) -> None:
        """Copy the next seq_len + 1 tokens into `out`, then advance by seq_len (the last token is shared)."""
        filled, offset = 0, self.offset
        for _, _, tokens in self.segments:
            n = min(len(tokens) - offset, len(out) - filled)
            out[filled : filled + n] = tokens[offset : offset + n]
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


class LanePacker:
    """This rank's batches, in order: row i of each is lanes[i]'s next window; each comes with the lanes'
    states as of it.

    `tokens` is a token source (token_sources.py) over the same lanes. Not thread-safe: exactly one thread
    (the loader's prefetch thread) calls next_batch.
    """

    def __init__(self, lanes: list[Lane], tokens, *, seq_len: int):
        self.lanes, self.tokens, self.seq_len = lanes, tokens, seq_len

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        windows = np.empty((len(self.lanes), self.seq_len + 1), dtype=np.int64)
        for row, lane in zip(windows, self.lanes):
            while lane.available < self.seq_len + 1:
                self.tokens.fill(lane)
            lane.take_window(row, self.seq_len)
        self.tokens.work_ahead()  # e.g. start tokenizing while the batch is handed over
        windows = torch.from_numpy(windows)
        states = {str(lane.index): lane.state() for lane in self.lanes}
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), states

    def close(self) -> None:
        self.tokens.close()
