"""Token sources: where the packer's lanes (packing.py) get their next documents, as [bos] ids [eos] arrays.

Both sources give lane l the documents at positions l, l + global_rows, l + 2 * global_rows, ... of each
epoch's order (sources.py), from the lane's resume point on and without the held-out ones, and push them into
the lane when the packer asks them to fill it:

    TokenizingSource    reads this rank's lanes' documents from a text source (local files or a Hub dataset)
                        and tokenizes them in batches on a worker thread, a few windows ahead of need
    CachedTokenSource   reads each document's tokens by index from the token cache (cache.py), where a
                        held-out document is an empty record

A source decides only when a lane's tokens arrive, never which tokens they are: so the batches are the same,
bit for bit, from either source, and a checkpoint of one resumes on the other.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from dist_llama.data.cache import TokenCache
from dist_llama.data.encoding import DocumentEncoder
from dist_llama.data.heldout import is_held_out
from dist_llama.data.packing import Lane

TOKENIZE_BATCH_DOCS = 128  # documents per encode_batch call: large enough to keep every core busy
# And at most this much text per call (a needy lane's one document may exceed it alone). OpenWebText's 128
# documents are ~0.6 MB, so it does not bind there; but 128 documents of megabytes would be one call of
# hundreds of megabytes, minutes of tokenizing before the first batch (BENCHMARKS.md, "Tokenizer pre-split").
TOKENIZE_BATCH_BYTES = 2 << 20
MAX_IN_FLIGHT = 2
HORIZON_BATCHES = 2


class TokenSource:
    """What LanePacker asks of a source. A source is made for this rank's lanes, at their resume points, and
    `fill` pushes a lane's next documents into it in the lane's order (and may push other lanes' on the way).
    Also the checks of an epoch's size that both sources make, in the same words."""

    def __init__(self, lanes: list[Lane], *, global_rows: int, seed: int | None):
        self.lanes, self.global_rows = lanes, global_rows
        self.seed = seed  # of the epoch order; None: unshuffled

    def fill(self, lane: Lane) -> None:
        """Push at least one more of `lane`'s documents into it (other lanes' may come along)."""
        raise NotImplementedError

    def work_ahead(self) -> None:
        """Work for the time the batch is being handed over."""

    def close(self) -> None:
        pass

    def _check_size(self, documents: int, description: str) -> None:
        if documents == 0:
            raise ValueError(f"the data source ({description}) holds no documents")
        if documents < self.global_rows:
            raise ValueError(
                f"the data source has {documents} documents, fewer than the {self.global_rows} "
                "lanes (global batch rows): add data or lower train.tokens_per_step"
            )

    @staticmethod
    def _past_the_end(epoch: int, doc: int) -> ValueError:
        return ValueError(
            f"the data state points at document {doc} of epoch {epoch}, past the end of the "
            "epoch: the data is not the one the state was saved with"
        )

    def _starved(self, lane: Lane) -> ValueError:
        return ValueError(
            f"lane {lane.index} got no training document in a whole epoch: the source has too "
            f"few documents for {self.global_rows} lanes"
        )


class CachedTokenSource(TokenSource):
    """Lane l's next document is position d of its epoch's order, d = l, l + global_rows, ..., read from the
    token cache by record number; a held-out document is an empty record, and is skipped."""

    def __init__(self, cache: TokenCache, lanes: list[Lane], *, global_rows: int, seed: int | None):
        super().__init__(lanes, global_rows=global_rows, seed=seed)
        self.cache = cache
        self._check_size(cache.documents, cache.describe())
        for lane in lanes:
            if lane.resume[1] >= cache.documents:
                raise self._past_the_end(*lane.resume)
        self.next_doc = {lane.index: lane.resume for lane in lanes}  # (epoch, position) of each lane's next
        self.orders: dict[int, np.ndarray] = {}  # epoch -> its order, for the epochs the lanes are in

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self.orders:
            oldest = min(epoch for epoch, _ in self.next_doc.values())
            self.orders = {kept: order for kept, order in self.orders.items() if kept >= oldest}
            self.orders[epoch] = self.cache.epoch_order(epoch, self.seed)
        return self.orders[epoch]

    def fill(self, lane: Lane) -> None:
        epoch, doc = self.next_doc[lane.index]
        wrapped = 0
        while True:
            if doc >= self.cache.documents:
                epoch, doc, wrapped = epoch + 1, lane.index, wrapped + 1
                if wrapped == 2:  # a whole epoch of held-out documents for this lane
                    raise self._starved(lane)
            tokens = self.cache.tokens(int(self._order(epoch)[doc]))
            here, doc = doc, doc + self.global_rows
            if len(tokens):
                break
        self.next_doc[lane.index] = (epoch, doc)
        lane.push(epoch, here, tokens)


class _LaneTexts:
    """A lane's documents on their way from the text source: read (`texts`), then in a tokenizer batch."""

    def __init__(self, lane: Lane):
        self.lane = lane
        self.texts: deque[tuple[int, int, str]] = deque()  # (epoch, doc, text)
        self.tokenizing = 0  # documents of this lane in a tokenizer batch not yet unpacked
        self.tokenizing_estimate = 0  # and their tokens, estimated as characters / 4
        self.unpacked = 0  # documents pushed into the lane

    @property
    def projected(self) -> int:
        """The tokens the lane will hold once its batches in flight are unpacked (estimated)."""
        return self.lane.available + self.tokenizing_estimate


class TokenizingSource(TokenSource):
    """Reads the lanes' documents from a text source (sources.py) and tokenizes them on a worker thread.

    The text source is read once, in epoch order, for all of this rank's lanes, and each document is routed to
    its lane's queue; another rank's lanes' records are never parsed. Queued documents stay text until their
    lane is a few windows from running dry, so that tokenizing runs only a little ahead of need.
    """

    def __init__(
        self,
        source,
        encoder: DocumentEncoder,
        lanes: list[Lane],
        *,
        global_rows: int,
        seed: int | None,
        seq_len: int,
        held_out_per_mille: int,
    ):
        super().__init__(lanes, global_rows=global_rows, seed=seed)
        self.source, self.encoder, self.seq_len = source, encoder, seq_len
        self.held_out_per_mille = held_out_per_mille
        self.queues = {lane.index: _LaneTexts(lane) for lane in lanes}
        self.owned = np.zeros(global_rows, dtype=bool)
        self.owned[list(self.queues)] = True
        # Read a few documents per lane at a time, so that one encode_batch call has work for every core.
        self.read_ahead = -(-TOKENIZE_BATCH_DOCS // len(lanes))
        self.documents_unpacked, self.tokens_unpacked = 1, seq_len  # for the mean document length
        self.reader_epoch = min(lane.resume for lane in lanes)[0]
        self.documents = self._owned_documents()
        # encode_batch runs on this one worker while our thread parses, unpacks ids and packs windows (which
        # hold the GIL); batches are submitted and unpacked in order, one or two in flight.
        self.tokenizer_thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="PackedBatches-tokenizer"
        )
        self.in_flight: deque[tuple[list[tuple[_LaneTexts, int, int, int]], Future]] = deque()

    # --- Reading: the text source -> the lanes' queues ----------------------------------------------------

    def _owned_documents(self) -> Iterator[tuple[_LaneTexts, int, int, str]]:
        """This rank's training documents in epoch order, forever, as (queue, epoch, doc, text)."""
        epoch, start = min(lane.resume for lane in self.lanes)
        while True:
            self.reader_epoch = epoch
            size, yielded = 0, 0
            for chunk in self.source.chunks(epoch, start, self.seed):
                for queue, doc, text in self._chunk_documents(chunk, epoch, start):
                    yielded += 1
                    yield queue, epoch, doc, text
                size = chunk.base + chunk.size
            # A stream's size is known only at its end, so an epoch is checked once read.
            if start > 0 and size <= start:
                raise self._past_the_end(epoch, start)
            self._check_size(size, self.source.describe())
            if start == 0 and yielded == 0:
                raise ValueError(
                    f"a whole epoch of {size} documents gave this rank's lanes no training "
                    "document; the source is too small for this many lanes"
                )
            epoch, start = epoch + 1, 0

    def _chunk_documents(self, chunk, epoch: int, start: int) -> Iterator[tuple[_LaneTexts, int, str]]:
        """(queue, doc, text) of a chunk's training documents that this rank's lanes have still to take."""
        docs = chunk.base + np.arange(chunk.size)
        mine = (docs >= start) & self.owned[docs % self.global_rows]
        # Only this rank's lanes' documents from each lane's resume point on are read at all.
        wanted = [
            j
            for j in np.flatnonzero(mine).tolist()
            if (epoch, chunk.base + j) >= self.queues[(chunk.base + j) % self.global_rows].lane.resume
        ]
        for j, text in chunk.read(wanted):
            if self.held_out_per_mille and is_held_out(text, self.held_out_per_mille):
                continue
            doc = chunk.base + j
            yield self.queues[doc % self.global_rows], doc, text

    def _read(self, queue: _LaneTexts) -> None:
        """Route documents from the stream into their queues until `queue` has `read_ahead` texts waiting."""
        first_epoch, had = self.reader_epoch, len(queue.texts)
        while len(queue.texts) < self.read_ahead:
            owner, epoch, doc, text = next(self.documents)
            owner.texts.append((epoch, doc, text))
            if len(queue.texts) == had and self.reader_epoch - first_epoch >= 2:
                raise self._starved(queue.lane)

    # --- Tokenizing: the queues -> tokenizer batches -> the lanes ------------------------------------------

    def _submit(self, needy: _LaneTexts | None = None) -> None:
        """Start tokenizing a batch: `needy`'s next document, then those of the lanes closest to running dry.

        Lanes drift apart (their documents differ in length), so the stream is read far ahead for the fastest
        lane while the slowest still has documents queued. Which documents go into which batch never changes
        the output: each lane's documents are unpacked in its own order.
        """
        # Tokenize for the lanes holding the fewest tokens (counting documents being tokenized), up to a
        # horizon that leaves room for two full tokenizer batches beyond the next window: enough to keep a
        # batch in flight, few enough that little is tokenized ahead.
        mean_document = self.tokens_unpacked / self.documents_unpacked
        horizon = self.seq_len + 1 + HORIZON_BATCHES * TOKENIZE_BATCH_DOCS * mean_document / len(self.lanes)
        for queue in self.queues.values():
            # Reading is cheap; without it the tokenizer would idle until this lane runs dry.
            if not queue.texts and (queue is needy or queue.projected < horizon):
                self._read(queue)
        picked = self._pick(needy, horizon)
        if not picked:
            return
        batch = []
        for queue, epoch, doc, text in picked:
            queue.tokenizing += 1
            queue.tokenizing_estimate += len(text) // 4
            batch.append((queue, epoch, doc, len(text) // 4))
        future = self.tokenizer_thread.submit(self.encoder.encode_batch, [text for *_, text in picked])
        self.in_flight.append((batch, future))

    def _pick(self, needy: _LaneTexts | None, horizon: float) -> list[tuple[_LaneTexts, int, int, str]]:
        """The next batch's documents, taken from their queues: `needy`'s first, then one at a time from the
        lane projected to hold the fewest tokens while that is below `horizon`, up to TOKENIZE_BATCH_DOCS
        documents and TOKENIZE_BATCH_BYTES of text."""
        picked = [] if needy is None else [(needy, *needy.texts.popleft())]
        candidates = [
            (queue.projected + (len(picked[0][3]) // 4 if queue is needy else 0), index)
            for index, queue in self.queues.items()
            if queue.texts
        ]
        heapq.heapify(candidates)
        size = sum(len(text) for *_, text in picked)
        while candidates and candidates[0][0] < horizon and len(picked) < TOKENIZE_BATCH_DOCS:
            projected, index = candidates[0]
            queue = self.queues[index]
            if picked and size + len(queue.texts[0][2]) > TOKENIZE_BATCH_BYTES:
                break
            heapq.heappop(candidates)
            picked.append((queue, *queue.texts.popleft()))
            size += len(picked[-1][3])
            if queue.texts:
                heapq.heappush(candidates, (projected + len(picked[-1][3]) // 4, index))
        return picked

    def _unpack_oldest(self) -> None:
        batch, future = self.in_flight.popleft()
        encodings = future.result()
        if len(self.in_flight) < MAX_IN_FLIGHT:
            self._submit()  # keep the tokenizer busy while this thread unpacks
        for (queue, epoch, doc, estimate), encoding in zip(batch, encodings):
            queue.tokenizing -= 1
            queue.tokenizing_estimate -= estimate
            tokens = self.encoder.to_tokens(encoding)
            queue.lane.push(epoch, doc, tokens)
            queue.unpacked += 1
            self.documents_unpacked += 1
            self.tokens_unpacked += len(tokens)

    def fill(self, lane: Lane) -> None:
        queue = self.queues[lane.index]
        if not queue.tokenizing:
            self._submit(queue)
        target = queue.unpacked + 1
        while queue.unpacked < target:
            self._unpack_oldest()

    def work_ahead(self) -> None:
        if len(self.in_flight) < MAX_IN_FLIGHT:
            self._submit()  # tokenize ahead while the batch is handed over

    def close(self) -> None:
        self.tokenizer_thread.shutdown(wait=True, cancel_futures=True)
