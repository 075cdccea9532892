"""The loader: PackedBatches (this rank's batches, made ahead on a prefetch thread by the packer of packing.py
over the token source that data.token_cache chooses), its world-size-free state, merge_states, and the checks
that a saved state continues the same stream."""

from __future__ import annotations

import queue
import threading

import torch

from dist_llama.config import DataConfig
from dist_llama.data.cache import open_token_cache
from dist_llama.data.encoding import DocumentEncoder, limit_tokenizer_threads, rank_cores
from dist_llama.data.heldout import held_out_files
from dist_llama.data.packing import Lane, LanePacker
from dist_llama.data.sources import open_source
from dist_llama.data.token_sources import CachedTokenSource, TokenizingSource

STATE_VERSION = 1


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
    """This rank's share of an endless stream of packed global batches; see the package docstring
    (dist_llama.data).

    Each `next()` gives (inputs, labels), LongTensors of shape (global_rows // world_size, seq_len): the rows
    of the lanes l with l % world_size == rank, in increasing l. `labels` is `inputs` shifted by one token.
    With a cached Hub dataset or a token cache still to build, and a process group of several ranks, every
    rank must build it (and likewise call validation_batches): local rank 0 downloads or builds while the
    others wait at a barrier. With data.token_cache the documents' tokens come from the cache: the same
    batches and state.
    """

    def __init__(
        self,
        config: DataConfig,
        tokenizer,
        *,
        global_rows: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if global_rows <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"need global_rows > 0 and 0 <= rank < world_size (got global_rows={global_rows}, "
                f"rank={rank}, world_size={world_size})"
            )
        if global_rows % world_size:
            raise ValueError(
                f"global_rows={global_rows} (sequences per optimizer step) must be divisible by "
                f"world_size={world_size}: every rank holds the same number of lanes"
            )
        if seed < 0:
            raise ValueError(f"seed={seed} must be non-negative")
        self.config = config
        self.global_rows, self.rank, self.world_size, self.seed = global_rows, rank, world_size, seed
        self.seq_len = config.seq_len
        self.lanes = tuple(range(rank, global_rows, world_size))
        if config.token_cache:
            self._source, self._encoder = open_token_cache(config, tokenizer), None
        else:
            # The rank's share of the node's cores for the tokenizer's threads.
            limit_tokenizer_threads(rank_cores())
            self._source, self._encoder = open_source(config, "training"), DocumentEncoder(tokenizer)
        self._held_out_per_mille = 0 if held_out_files(config) else config.val_per_mille
        self._lane_states = {str(lane): {"epoch": 0, "doc": lane, "offset": 0} for lane in self.lanes}
        self._producer = self._packer = None
        self.batches_yielded = 0

    # The producer is built lazily, from the lane states, so that load_state_dict can come first.
    def _start(self) -> None:
        lanes = [Lane(lane, **self._lane_states[str(lane)]) for lane in self.lanes]
        order = dict(global_rows=self.global_rows, seed=self.seed if self.config.shuffle else None)
        if self._encoder is None:
            tokens = CachedTokenSource(self._source, lanes, **order)
        else:
            tokens = TokenizingSource(
                self._source,
                self._encoder,
                lanes,
                seq_len=self.seq_len,
                held_out_per_mille=self._held_out_per_mille,
                **order,
            )
        packer = LanePacker(lanes, tokens, seq_len=self.seq_len)
        if self.config.prefetch_steps > 0:
            self._producer = _Prefetcher(
                packer.next_batch, self.config.prefetch_steps, f"PackedBatches-rank{self.rank}"
            )
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
        """The lowest epoch among this rank's lanes (lanes drift apart, so they may cross a wrap at different
        steps)."""
        return float(min(state["epoch"] for state in self._lane_states.values()))

    def state_dict(self) -> dict:
        """This rank's lanes as of the last batch returned (not as far as the prefetch thread has got)."""
        return {
            "version": STATE_VERSION,
            "global_rows": self.global_rows,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.config.shuffle,
            "held_out_per_mille": self._held_out_per_mille,
            "batches": self.batches_yielded,
            "source": dict(self._source.identity),
            "lanes": {lane: dict(state) for lane, state in self._lane_states.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a merged state saved at any world size (see merge_states)."""
        _check_compatible(state, self.state_dict(), "the saved data state", "this run")
        missing = [lane for lane in self.lanes if str(lane) not in state["lanes"]]
        if missing:
            raise ValueError(
                f"the saved data state lacks lanes {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                f"of rank {self.rank}: pass the merged state of all ranks (merge_states)"
            )
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
_STATE_KEYS = {
    "global_rows": "global batch rows (train.tokens_per_step / data.seq_len)",
    "seq_len": "data.seq_len",
    "seed": "the data seed",
    "shuffle": "data.shuffle",
    "held_out_per_mille": "the held-out rule (data.val_per_mille, 0 with data.val_paths)",
}


def _check_compatible(state: dict, reference: dict, state_name: str, reference_name: str) -> None:
    if not isinstance(state, dict) or not {"lanes", "global_rows", "seq_len"} <= state.keys():
        raise ValueError(
            f"{state_name} is not a PackedBatches state (it needs lanes, global_rows and seq_len)"
        )
    if state.get("version", STATE_VERSION) != STATE_VERSION:
        raise ValueError(
            f"{state_name} has version {state.get('version')}; this code reads version {STATE_VERSION}"
        )
    for key, meaning in _STATE_KEYS.items():
        if key in state and state[key] != reference[key]:
            raise ValueError(
                f"{state_name} has {key}={state[key]} but {reference_name} has {key}={reference[key]} "
                f"({meaning}): the lanes would not continue the same stream. Use the same setting, or "
                "restart the data stream instead of loading this state"
            )
    # States saved before sources were recorded carry none: nothing to compare them with.
    saved, current = state.get("source"), reference.get("source")
    if saved is not None and current is not None and _source_mismatch(saved, current):
        changed = ", ".join(
            f"{key} {saved.get(key)!r} -> {current.get(key)!r}" for key in _source_mismatch(saved, current)
        )
        raise ValueError(
            f"{state_name} was read from [{saved.get('description')}] but {reference_name} reads "
            f"[{current.get('description')}] ({changed}): its lane positions would point at other "
            "documents. Point data.paths / data.hub_dataset / data.hub_split / data.hub_revision / "
            "data.hub_streaming / data.text_field back at the saved source, or start a new run (another "
            "train.name; train.init_from keeps the weights and restarts the data stream)"
        )


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
            raise ValueError(
                f"state {i} is at batch {state.get('batches')} but state 0 at {states[0].get('batches')}: "
                "ranks must be saved after the same step"
            )
        overlap = merged["lanes"].keys() & state["lanes"].keys()
        if overlap:
            raise ValueError(f"lanes {sorted(overlap, key=int)[:8]} appear in more than one state")
        merged["lanes"].update({lane: dict(lane_state) for lane, lane_state in state["lanes"].items()})
    return merged
