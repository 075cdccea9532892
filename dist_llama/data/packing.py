"""Lanes and the packers: each lane's documents cut into windows of seq_len + 1 tokens, one row per lane of every
batch. _Packer tokenizes on a worker thread a few windows ahead of need; _CachePacker takes the documents'
tokens from the token cache (cache.py)."""

from __future__ import annotations

import heapq
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from dist_llama.data.encoding import DocumentEncoder
from dist_llama.data.heldout import is_held_out

TOKENIZE_BATCH_DOCS = 128  # documents per encode_batch call: large enough to keep every core busy
# And at most this much text per call (a needy lane's one document may exceed it alone). OpenWebText's 128
# documents are ~0.6 MB, so it does not bind there; but 128 documents of megabytes would be one call of hundreds
# of megabytes, minutes of tokenizing before the first batch (BENCHMARKS.md, "Tokenizer pre-split").
TOKENIZE_BATCH_BYTES = 2 << 20
MAX_IN_FLIGHT = 2
HORIZON_BATCHES = 2


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


class _WindowPacker:
    """Makes this rank's batches in order from its lanes, which _fill gives documents. Not thread-safe: exactly one
    thread calls next_batch."""

    def __init__(self, lanes: list[_Lane], *, global_rows: int, seq_len: int, seed: int, shuffle: bool):
        self.lanes, self.global_rows, self.seq_len = lanes, global_rows, seq_len
        self.seed = seed if shuffle else None

    def _fill(self, needy: _Lane) -> None:
        raise NotImplementedError

    def _ahead(self) -> None:
        """Work for the time the batch is being handed over."""

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        windows = np.empty((len(self.lanes), self.seq_len + 1), dtype=np.int64)
        for row, lane in zip(windows, self.lanes):
            while lane.available < self.seq_len + 1:
                self._fill(lane)
            lane.take_window(row, self.seq_len)
        self._ahead()
        windows = torch.from_numpy(windows)
        states = {str(lane.index): lane.state() for lane in self.lanes}
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), states

    def close(self) -> None:
        pass


class _Packer(_WindowPacker):
    """Tokenizes the lanes' documents as read from the source."""

    def __init__(self, source, encoder: DocumentEncoder, lanes: list[_Lane], *, global_rows: int, seq_len: int,
                 seed: int, shuffle: bool, held_out_per_mille: int):
        super().__init__(lanes, global_rows=global_rows, seq_len=seq_len, seed=seed, shuffle=shuffle)
        self.source, self.encoder = source, encoder
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
        size = sum(len(text) for *_, text in picked)
        while candidates and candidates[0][0] < horizon and len(picked) < TOKENIZE_BATCH_DOCS:
            projected, index = candidates[0]
            lane = self.lane_of[index]
            if picked and size + len(lane.texts[0][2]) > TOKENIZE_BATCH_BYTES:
                break
            heapq.heappop(candidates)
            picked.append((lane, *lane.texts.popleft()))
            size += len(picked[-1][3])
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

    def _ahead(self) -> None:
        if len(self.in_flight) < MAX_IN_FLIGHT:
            self._submit()  # tokenize ahead while the batch is handed over

    def close(self) -> None:
        self.tokenizer_thread.shutdown(wait=True, cancel_futures=True)


class _CachePacker(_WindowPacker):
    """Takes each lane's documents from the token cache: lane l's next document is position d of its epoch's order
    (the text source's order), d = l, l + global_rows, ..., skipping held-out (empty) records."""

    def __init__(self, cache, lanes: list[_Lane], *, global_rows: int, seq_len: int, seed: int, shuffle: bool):
        super().__init__(lanes, global_rows=global_rows, seq_len=seq_len, seed=seed, shuffle=shuffle)
        self.cache = cache
        if cache.documents == 0:
            raise ValueError(f"the data source ({cache.describe()}) holds no documents")
        if cache.documents < global_rows:
            raise ValueError(f"the data source has {cache.documents} documents, fewer than the {global_rows} lanes "
                             "(global batch rows): add data or lower train.tokens_per_step")
        self.next_doc = {}
        for lane in lanes:
            if lane.resume[1] >= cache.documents:
                raise ValueError(f"the data state points at document {lane.resume[1]} of epoch {lane.resume[0]}, "
                                 "past the end of the epoch: the data is not the one the state was saved with")
            self.next_doc[lane.index] = lane.resume
        self.orders: dict[int, np.ndarray] = {}  # epoch -> its order, for the epochs the lanes are in

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self.orders:
            oldest = min(epoch for epoch, _ in self.next_doc.values())
            self.orders = {kept: order for kept, order in self.orders.items() if kept >= oldest}
            self.orders[epoch] = self.cache.epoch_order(epoch, self.seed)
        return self.orders[epoch]

    def _fill(self, needy: _Lane) -> None:
        epoch, doc = self.next_doc[needy.index]
        wrapped = 0
        while True:
            if doc >= self.cache.documents:
                epoch, doc, wrapped = epoch + 1, needy.index, wrapped + 1
                if wrapped == 2:
                    raise ValueError(f"lane {needy.index} got no training document in a whole epoch: the source has "
                                     f"too few documents for {self.global_rows} lanes")
            tokens = self.cache.tokens(int(self._order(epoch)[doc]))
            here, doc = doc, doc + self.global_rows
            if len(tokens):
                break
        self.next_doc[needy.index] = (epoch, doc)
        needy.push(epoch, here, tokens)
