"""Tests for dist_llama.data: packing without padding, lane coverage, world-size-free resume, held-out split,
the Hub dataset (cached with random access, or streamed) and the data source a state was saved from.

A small byte-level BPE tokenizer trained in a second stands in for the Mistral one (which has its own test at
the end). Expected streams are built here from the documents themselves (file order, d % global_rows lanes),
not from the packer's internals. The Hub is replaced by parquet shards on disk, the format it serves, read
through the real `datasets` builder.
"""

import json
import logging
import multiprocessing
import os
import random
import re
import threading
import time

import datasets
import download_worker  # tests/download_worker.py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dist_llama import data
from dist_llama.config import DataConfig
from dist_llama.data import packing, sources, token_sources

WORDS = (
    "the of and to in is was for on that with as by at from it an be this are have or not which but "
    "river stone light market engine garden letter winter signal bridge orbit copper violet harbor"
).split()
SEQ_LEN = 16


def make_docs(n: int, seed: int = 0, prefix: str = "doc") -> list[str]:
    rng = random.Random(seed)
    return [
        f"{prefix}{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for i in range(n)
    ]


def train_tokenizer(vocab_size: int = 400, seed: int = 99) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on make_docs(300, seed), with <unk> <s> </s> as ids 0, 1, 2."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(make_docs(300, seed=seed), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    return hf


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer()


def encode(tokenizer, text: str) -> list[int]:
    """The oracle: one document as the packer must emit it."""
    return (
        [tokenizer.bos_token_id]
        + tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
        + [tokenizer.eos_token_id]
    )


def write_jsonl(path, docs, field="text"):
    lines = "".join(json.dumps({field: doc, "id": i}) + "\n" for i, doc in enumerate(docs)).encode()
    if path.name.endswith(".zst"):
        lines = zstandard.ZstdCompressor().compress(lines)
    path.write_bytes(lines)
    return path


def write_parquet(path, docs, field="text"):
    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path, row_group_size=4)
    return path


def config(paths, **overrides) -> DataConfig:
    values = dict(
        source="local",
        paths=[str(p) for p in paths],
        seq_len=SEQ_LEN,
        shuffle=False,
        val_per_mille=0,
        prefetch_steps=2,
    )
    values.update(overrides)
    return DataConfig(**values)


def windows(batches, steps: int) -> list[torch.Tensor]:
    """`steps` batches as full (rows, seq_len + 1) windows, checking the shapes and the label shift."""
    out = []
    for _ in range(steps):
        inputs, labels = next(batches)
        assert inputs.dtype == labels.dtype == torch.long
        assert inputs.shape == labels.shape == (len(batches.lanes), batches.seq_len)
        assert torch.equal(inputs[:, 1:], labels[:, :-1])
        out.append(torch.cat([inputs, labels[:, -1:]], dim=1))
    return out


def global_windows(config_, tokenizer, *, global_rows, world_size, steps, state=None, seed=0):
    """Run every rank of a world for `steps` steps; returns the global windows and the merged final state."""
    ranks = [
        data.PackedBatches(
            config_, tokenizer, global_rows=global_rows, rank=r, world_size=world_size, seed=seed
        )
        for r in range(world_size)
    ]
    try:
        if state is not None:
            for batches in ranks:
                batches.load_state_dict(state)
        per_rank = [windows(batches, steps) for batches in ranks]
        merged = data.merge_states([batches.state_dict() for batches in ranks])
    finally:
        for batches in ranks:
            batches.close()
    out = []
    for step in range(steps):
        rows = [per_rank[lane % world_size][step][lane // world_size] for lane in range(global_rows)]
        out.append(torch.stack(rows))
    return out, merged


def lane_streams(window_list) -> list[list[int]]:
    """Each row's token stream: consecutive windows share one token."""
    streams = [w.tolist() for w in window_list[0]]
    for batch in window_list[1:]:
        for stream, row in zip(streams, batch.tolist()):
            assert stream[-1] == row[0], "consecutive windows of a lane must overlap by exactly one token"
            stream.extend(row[1:])
    return streams


def split_documents(stream: list[int], bos: int, eos: int) -> list[tuple[int, ...]]:
    """The complete [bos] ... [eos] documents of a stream that starts at a document boundary."""
    docs, start = [], 0
    assert stream[0] == bos
    for i, token in enumerate(stream):
        if token == eos:
            docs.append(tuple(stream[start : i + 1]))
            start = i + 1
    return docs


def expected_lane_stream(tokenizer, epoch_order, lane, global_rows, length) -> list[int]:
    """Lane `lane`'s stream over repeated unshuffled epochs, cut to `length` tokens."""
    stream = []
    while len(stream) < length:
        for doc in epoch_order[lane::global_rows]:
            stream.extend(encode(tokenizer, doc))
    return stream[:length]


# --- Reading --------------------------------------------------------------------------------------------


def test_all_formats_are_read_in_sorted_file_order(tmp_path):
    docs = make_docs(11)
    write_jsonl(tmp_path / "a.jsonl", docs[0:3])
    write_jsonl(tmp_path / "b.jsonl.zst", docs[3:6])
    write_parquet(tmp_path / "c.parquet", docs[6:9])
    (tmp_path / "d1.txt").write_text(docs[9])
    (tmp_path / "d2.txt").write_text(docs[10])
    assert data.read_documents([tmp_path / "*"]) == docs
    assert data.read_documents([tmp_path / "*.txt", tmp_path / "a.jsonl"], limit=4) == docs[0:3] + docs[9:10]
    write_jsonl(tmp_path / "other.jsonl", docs[:2], field="content")
    assert data.read_documents([tmp_path / "other.jsonl"], text_field="content") == docs[:2]
    with pytest.raises(ValueError, match="no field 'text'"):
        data.read_documents([tmp_path / "other.jsonl"])
    with pytest.raises(FileNotFoundError, match="nothing"):
        data.read_documents([tmp_path / "nothing*.jsonl"])
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        data.read_documents([tmp_path / "*"])


def test_all_formats_pack_in_file_order(tmp_path, tokenizer):
    docs = make_docs(13, seed=1)
    write_jsonl(tmp_path / "a.jsonl", docs[0:4])
    write_jsonl(tmp_path / "b.jsonl.zst", docs[4:8])
    write_parquet(tmp_path / "c.parquet", docs[8:11])
    (tmp_path / "d1.txt").write_text(docs[11])
    (tmp_path / "d2.txt").write_text(docs[12])
    with data.PackedBatches(config([tmp_path / "*"]), tokenizer, global_rows=2) as batches:
        streams = lane_streams(windows(batches, 12))
    for lane, stream in enumerate(streams):
        assert stream == expected_lane_stream(tokenizer, docs, lane, 2, len(stream))


# --- Packing --------------------------------------------------------------------------------------------


def test_lane_windows_reproduce_documents_with_no_padding(tmp_path, tokenizer):
    docs = make_docs(40, seed=2)
    write_jsonl(tmp_path / "part-0.jsonl", docs[:25])
    write_jsonl(tmp_path / "part-1.jsonl.zst", docs[25:])
    with data.PackedBatches(config([tmp_path / "part-*"]), tokenizer, global_rows=4) as batches:
        streams = lane_streams(windows(batches, 40))  # about two epochs per lane
        assert batches.epoch >= 1.0
    for lane, stream in enumerate(streams):
        assert len(stream) == 40 * SEQ_LEN + 1
        assert stream == expected_lane_stream(tokenizer, docs, lane, 4, len(stream))


class ListTokenSource(token_sources.TokenSource):
    """The token source interface at its smallest: lane l gets docs[l::global_rows], one per fill."""

    def __init__(self, docs, lanes, global_rows):
        super().__init__(lanes, global_rows=global_rows, seed=None)
        self.docs, self.next_doc = docs, {lane.index: lane.resume for lane in lanes}

    def fill(self, lane):
        epoch, doc = self.next_doc[lane.index]
        if doc >= len(self.docs):
            epoch, doc = epoch + 1, lane.index
        lane.push(epoch, doc, self.docs[doc])
        self.next_doc[lane.index] = (epoch, doc + self.global_rows)


def test_the_packer_cuts_whatever_its_token_source_pushes_into_lane_windows_and_resumes():
    docs = [np.arange(10 * d, 10 * d + 2 + d % 5, dtype=np.int32) for d in range(9)]  # 2 to 6 tokens each
    global_rows, seq_len = 3, 4

    def run(states, steps):
        lanes = [packing.Lane(lane, **states[str(lane)]) for lane in range(global_rows)]
        packer = packing.LanePacker(lanes, ListTokenSource(docs, lanes, global_rows), seq_len=seq_len)
        batches = [packer.next_batch() for _ in range(steps)]
        return [torch.cat([inputs, labels[:, -1:]], dim=1) for inputs, labels, _ in batches], batches[-1][2]

    fresh = {str(lane): {"epoch": 0, "doc": lane, "offset": 0} for lane in range(global_rows)}
    reference, _ = run(fresh, 12)
    for lane, stream in enumerate(lane_streams(reference)):
        epochs = [token for _ in range(12) for doc in docs[lane::global_rows] for token in doc.tolist()]
        assert stream == epochs[: len(stream)]
    head, state = run(fresh, 5)
    assert any(lane["offset"] for lane in state.values()) and any(lane["epoch"] for lane in state.values())
    tail, _ = run(state, 7)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, reference))


def test_realistic_documents_pack_exactly(shared_data, tokenizer):
    # Real web text: long and short documents, so lanes drift apart and tokenizer batches mix lanes.
    path = shared_data / "owt" / "tiny.jsonl"
    docs = data.read_documents([path])
    with data.PackedBatches(config([path], seq_len=64), tokenizer, global_rows=8) as batches:
        streams = lane_streams(windows(batches, 120))
    for lane, stream in enumerate(streams):
        assert stream == expected_lane_stream(tokenizer, docs, lane, 8, len(stream))


def test_special_token_text_inside_a_document_stays_text(tmp_path, tokenizer):
    docs = ["a page that mentions </s> and <s> in its text", "second"]
    write_jsonl(tmp_path / "a.jsonl", docs)
    with data.PackedBatches(config([tmp_path / "a.jsonl"]), tokenizer, global_rows=1) as batches:
        stream = lane_streams(windows(batches, 6))[0]
    first = split_documents(stream, 1, 2)[0]
    assert first[0] == 1 and first[-1] == 2 and 1 not in first[1:-1] and 2 not in first[1:-1]
    assert tokenizer.decode(first[1:-1]) == docs[0]


def test_ranks_own_disjoint_lanes_covering_every_document_once_per_epoch(tmp_path, tokenizer):
    docs = make_docs(50, seed=3)
    write_jsonl(tmp_path / "a.jsonl", docs[:20])
    write_parquet(tmp_path / "b.parquet", docs[20:])
    cfg = config([tmp_path / "*"], shuffle=True)
    ranks = [
        data.PackedBatches(cfg, tokenizer, global_rows=4, rank=r, world_size=2, seed=5) for r in range(2)
    ]
    assert ranks[0].lanes == (0, 2) and ranks[1].lanes == (1, 3)
    epoch_0 = {}
    for batches in ranks:
        with batches:
            streams = lane_streams(windows(batches, 60))
            assert batches.epoch >= 1.0, "every lane must have finished epoch 0"
        for lane, stream in zip(batches.lanes, streams):
            epoch_0[lane] = split_documents(stream, 1, 2)[: len(range(lane, 50, 4))]
    seen = [doc for lane_docs in epoch_0.values() for doc in lane_docs]
    assert sorted(seen) == sorted(tuple(encode(tokenizer, doc)) for doc in docs)
    assert epoch_0[0] != [tuple(encode(tokenizer, doc)) for doc in docs[0::4]], (
        "shuffle=True must change the order"
    )


def test_epoch_wraps_and_increments(tmp_path, tokenizer):
    docs = ["one two", "three four five", "six", "seven eight"]
    write_jsonl(tmp_path / "tiny.jsonl", docs)
    with data.PackedBatches(
        config([tmp_path / "tiny.jsonl"], seq_len=4), tokenizer, global_rows=2
    ) as batches:
        assert batches.epoch == 0.0
        for step in range(1, 31):
            next(batches)
            lanes = batches.state_dict()["lanes"]
            for lane in (0, 1):
                # Lane l owns documents l and l + 2; its position after `step` windows is step
                # * seq_len tokens.
                lengths = [len(encode(tokenizer, docs[d])) for d in (lane, lane + 2)]
                epoch, within = divmod(step * 4, sum(lengths))
                doc, offset = (lane, within) if within < lengths[0] else (lane + 2, within - lengths[0])
                assert lanes[str(lane)] == {"epoch": epoch, "doc": doc, "offset": offset}
            assert batches.epoch == min(state["epoch"] for state in lanes.values())
    assert batches.epoch >= 3


def test_shuffle_is_seeded(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", make_docs(30, seed=4)[:15])
    write_jsonl(tmp_path / "b.jsonl", make_docs(30, seed=4)[15:])
    cfg = config([tmp_path / "*.jsonl"], shuffle=True)

    def first(seed, cfg_=cfg):
        with data.PackedBatches(cfg_, tokenizer, global_rows=3, seed=seed) as batches:
            return torch.stack(windows(batches, 3))

    assert torch.equal(first(7), first(7))
    assert not torch.equal(first(7), first(8))
    assert not torch.equal(first(7), first(7, config([tmp_path / "*.jsonl"], shuffle=False)))


def test_shuffle_permutes_files_then_documents_within_each_file(tmp_path, tokenizer):
    files = [make_docs(3, seed=20 + k, prefix=f"file{k}doc") for k in range(6)]
    for k, docs in enumerate(files):
        write_jsonl(tmp_path / f"part-{k}.jsonl", docs)
    file_of = {tuple(encode(tokenizer, doc)): k for k, docs in enumerate(files) for doc in docs}
    first_files, orders = set(), set()
    for seed in range(4):
        with data.PackedBatches(
            config([tmp_path / "*.jsonl"], shuffle=True), tokenizer, global_rows=1, seed=seed
        ) as b:
            stream = lane_streams(windows(b, 40))[0]
        epoch_0 = split_documents(stream, 1, 2)[:18]
        blocks = [file_of[doc] for doc in epoch_0]
        assert blocks == [k for k in blocks[::3] for _ in range(3)], "a file's documents stay together"
        assert sorted(blocks[::3]) == list(range(6))
        first_files.add(blocks[0])
        orders.add(tuple(epoch_0))
    assert len(first_files) > 1 and len(orders) == 4


def test_one_rank_and_two_ranks_give_the_same_global_batches(shared_data, tokenizer):
    cfg = config([shared_data / "owt" / "tiny.jsonl"], shuffle=True, val_per_mille=50, seq_len=64)
    one, _ = global_windows(cfg, tokenizer, global_rows=8, world_size=1, steps=6)
    two, _ = global_windows(cfg, tokenizer, global_rows=8, world_size=2, steps=6)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (3, 2)])
def test_resume_on_another_world_size_continues_the_stream(tmp_path, tokenizer, before, after):
    docs = make_docs(30, seed=6)
    write_jsonl(tmp_path / "a.jsonl.zst", docs[:12])
    write_parquet(tmp_path / "b.parquet", docs[12:])
    # Shuffled, with hash-held-out documents, and long enough that lanes wrap into the next epoch.
    cfg = config([tmp_path / "*"], shuffle=True, val_per_mille=100)
    reference, _ = global_windows(cfg, tokenizer, global_rows=6, world_size=1, steps=20, seed=3)
    head, state = global_windows(cfg, tokenizer, global_rows=6, world_size=before, steps=12, seed=3)
    assert any(lane["offset"] > 0 for lane in state["lanes"].values()), (
        "resume mid-document must be exercised"
    )
    assert any(lane["epoch"] > 0 for lane in state["lanes"].values()), "resume after a wrap must be exercised"
    state = json.loads(json.dumps(state))  # as a checkpoint stores it
    tail, _ = global_windows(cfg, tokenizer, global_rows=6, world_size=after, steps=8, state=state, seed=3)
    for step, batch in enumerate(head + tail):
        assert torch.equal(batch, reference[step]), f"step {step} differs"


def test_state_is_as_of_the_last_batch_returned(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", make_docs(40, seed=7))
    cfg = config([tmp_path / "a.jsonl"], prefetch_steps=4)
    with data.PackedBatches(cfg, tokenizer, global_rows=2) as prefetching:
        fresh = prefetching.state_dict()
        assert fresh["lanes"] == {
            "0": {"epoch": 0, "doc": 0, "offset": 0},
            "1": {"epoch": 0, "doc": 1, "offset": 0},
        }
        next(prefetching)
        deadline = time.time() + 10
        while not prefetching._producer._queue.full() and time.time() < deadline:
            time.sleep(0.01)  # let the thread run ahead
        assert prefetching._producer._queue.full()
        with data.PackedBatches(
            config([tmp_path / "a.jsonl"], prefetch_steps=0), tokenizer, global_rows=2
        ) as inline:
            next(inline)
            assert prefetching.state_dict() == inline.state_dict()
            assert prefetching.state_dict()["batches"] == 1


def test_close_stops_the_thread_and_next_resumes_after_the_last_batch(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", make_docs(40, seed=8))
    cfg = config([tmp_path / "a.jsonl"], prefetch_steps=3)
    with data.PackedBatches(cfg, tokenizer, global_rows=2) as uninterrupted:
        expected = windows(uninterrupted, 6)
    batches = data.PackedBatches(cfg, tokenizer, global_rows=2)
    got = windows(batches, 3)
    thread = batches._producer._thread
    assert thread.is_alive() and thread.daemon
    batches.close()
    assert not thread.is_alive()
    assert not any(t.name.startswith("PackedBatches") for t in threading.enumerate())
    got += windows(batches, 3)  # the batches the closed thread had prefetched are made again
    batches.close()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_thread_errors_reach_the_consumer_and_other_lanes_skip_without_parsing(tmp_path, tokenizer):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": doc}) for doc in make_docs(20, seed=9)]
    lines[5] = "{this is not json"  # document 5 belongs to lane 1 of 2
    path.write_text("\n".join(lines) + "\n")
    with data.PackedBatches(config([path]), tokenizer, global_rows=2, rank=0, world_size=2) as lane_0:
        windows(lane_0, 5)  # lane 0 never parses line 5
    with data.PackedBatches(config([path]), tokenizer, global_rows=2, rank=1, world_size=2) as lane_1:
        with pytest.raises(ValueError, match=r"a\.jsonl, record 5 is not valid JSON"):
            windows(lane_1, 5)
        with pytest.raises(ValueError, match="not valid JSON"):
            next(lane_1)  # and it keeps failing rather than hanging


def test_a_tokenizer_batch_is_bounded_by_bytes_so_megabyte_documents_start_at_once(
    tmp_path, tokenizer, monkeypatch
):
    # Counted in documents alone, the first batch would take one 2 MB document per lane, and the next one all
    # the others: minutes of tokenizing for one batch of a real corpus of such documents.
    rng = random.Random(11)
    docs = [" ".join(rng.choice(WORDS) for _ in range(420_000))[:2_000_000] for _ in range(8)]
    write_jsonl(tmp_path / "long.jsonl", docs)
    handed = []
    real = data.DocumentEncoder.encode_batch

    def recording(self, texts):
        handed.append([len(text) for text in texts])
        return real(self, texts)

    monkeypatch.setattr(data.DocumentEncoder, "encode_batch", recording)
    start = time.perf_counter()
    with data.PackedBatches(
        config([tmp_path / "long.jsonl"], seq_len=64), tokenizer, global_rows=4
    ) as batches:
        windows(batches, 1)
    assert handed[0] == [2_000_000], "the first batch is the needy lane's one document"
    assert all(len(sizes) == 1 or sum(sizes) <= token_sources.TOKENIZE_BATCH_BYTES for sizes in handed)
    assert time.perf_counter() - start < 120


# --- Held-out set ---------------------------------------------------------------------------------------


def test_hash_rule_is_pinned():
    # blake2b of the UTF-8 text: the same in every process and Python version. Changing it moves the split.
    assert [data.is_held_out(f"doc{i}", 500) for i in range(10)] == PINNED_HASH_RULE
    assert not data.is_held_out("anything", 0) and data.is_held_out("anything", 1000)


PINNED_HASH_RULE = [False, True, True, False, True, True, False, False, False, True]


def test_hash_held_out_documents_are_never_trained_on(tmp_path, tokenizer):
    docs = make_docs(120, seed=10)
    write_jsonl(tmp_path / "a.jsonl", docs[:70])
    write_jsonl(tmp_path / "b.jsonl.zst", docs[70:])
    cfg = config([tmp_path / "*"], shuffle=True, val_per_mille=150, val_docs=6)
    held = [doc for doc in docs if data.is_held_out(doc, 150)]
    assert 6 < len(held) < 40
    assert data.held_out_documents(cfg) == held[:6]
    with data.PackedBatches(cfg, tokenizer, global_rows=4) as batches:
        streams = lane_streams(windows(batches, 100))
        assert batches.epoch >= 1.0
    trained = {doc for stream in streams for doc in split_documents(stream, 1, 2)}
    assert trained == {tuple(encode(tokenizer, doc)) for doc in docs if doc not in held}

    valid = data.validation_batches(cfg, tokenizer, rows=2, n_batches=2)
    stream = [token for doc in held[:6] for token in encode(tokenizer, doc)]
    assert len(stream) > 4 * SEQ_LEN
    expected = [stream[w * SEQ_LEN : w * SEQ_LEN + SEQ_LEN + 1] for w in range(4)]
    got = [torch.cat([x[row], y[row, -1:]]).tolist() for x, y in valid for row in range(2)]
    assert got == expected


def test_val_paths_mode_and_rank_split(tmp_path, tokenizer, caplog):
    write_jsonl(tmp_path / "train.jsonl", make_docs(20, seed=11))
    val_docs = make_docs(10, seed=12, prefix="val")
    write_jsonl(tmp_path / "val.jsonl", val_docs)
    # val_per_mille would hold out nearly everything, but with val_paths the hash rule is off.
    cfg = config(
        [tmp_path / "train.jsonl"], val_paths=[str(tmp_path / "val.jsonl")], val_docs=4, val_per_mille=999
    )
    assert data.held_out_documents(cfg) == val_docs[:4]
    with data.PackedBatches(cfg, tokenizer, global_rows=2) as batches:
        assert len(windows(batches, 3)) == 3

    full = data.validation_batches(cfg, tokenizer, rows=4, n_batches=2)
    stream = [token for doc in val_docs[:4] for token in encode(tokenizer, doc)]
    assert full[0][0][0].tolist() == stream[:SEQ_LEN]
    assert (
        full[1][0][0].tolist() == stream[4 * SEQ_LEN : 5 * SEQ_LEN]
    )  # batch 1, row 0 is window 1 * rows + 0
    for rank in range(2):
        mine = data.validation_batches(cfg, tokenizer, rows=4, n_batches=2, rank=rank, world_size=2)
        for (x, y), (fx, fy) in zip(mine, full):
            assert torch.equal(x, fx[rank::2]) and torch.equal(y, fy[rank::2])

    with caplog.at_level(logging.WARNING, logger="dist_llama.data"):
        recycled = data.validation_batches(cfg, tokenizer, rows=8, n_batches=4)
    assert "recycling" in caplog.text and len(recycled) == 4
    assert recycled[0][0].shape == (8, SEQ_LEN)

    with pytest.raises(FileNotFoundError, match="data.val_paths"):
        data.held_out_documents(
            config([tmp_path / "train.jsonl"], val_paths=[str(tmp_path / "missing*.jsonl")])
        )
    with pytest.raises(ValueError, match="no held-out set"):
        data.held_out_documents(config([tmp_path / "train.jsonl"]))


# --- Errors ---------------------------------------------------------------------------------------------


def test_clear_errors(tmp_path, tokenizer, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", make_docs(12, seed=13))
    with pytest.raises(FileNotFoundError, match=r"nope/\*\.jsonl"):
        data.PackedBatches(config(["nope/*.jsonl"]), tokenizer, global_rows=2)

    def unreachable(*args):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(sources, "_load_hub_dataset", unreachable)
    with pytest.raises(FileNotFoundError, match=r"match no files and the Hub dataset .* could not be opened"):
        data.PackedBatches(config(["nope/*.jsonl"], source="auto"), tokenizer, global_rows=2)

    with pytest.raises(ValueError, match="divisible by world_size=4"):
        data.PackedBatches(config([tmp_path / "a.jsonl"]), tokenizer, global_rows=6, rank=0, world_size=4)

    with data.PackedBatches(
        config([tmp_path / "a.jsonl"]), tokenizer, global_rows=2, rank=0, world_size=2
    ) as b:
        next(b)
        partial = b.state_dict()
    for name, cfg, rows in [
        ("seq_len", config([tmp_path / "a.jsonl"], seq_len=32), 2),
        ("global_rows", config([tmp_path / "a.jsonl"]), 4),
        ("shuffle", config([tmp_path / "a.jsonl"], shuffle=True), 2),
    ]:
        with data.PackedBatches(cfg, tokenizer, global_rows=rows) as other:
            with pytest.raises(ValueError, match=name):
                other.load_state_dict(partial)
    with data.PackedBatches(config([tmp_path / "a.jsonl"]), tokenizer, global_rows=2) as other:
        with pytest.raises(ValueError, match="merge_states"):
            other.load_state_dict(partial)  # rank 0's lanes only
    with pytest.raises(ValueError, match="more than one state"):
        data.merge_states([partial, partial])

    (tmp_path / "empty.jsonl").write_text("\n")
    with data.PackedBatches(config([tmp_path / "empty.jsonl"]), tokenizer, global_rows=2) as b:
        with pytest.raises(ValueError, match="no documents"):
            next(b)
    with data.PackedBatches(config([tmp_path / "a.jsonl"]), tokenizer, global_rows=16) as b:
        with pytest.raises(ValueError, match="fewer than the 16 lanes"):
            next(b)


# --- The Hub dataset: parquet shards on disk behind the real `datasets` builder ---------------------------


class LocalHub:
    """`datasets.load_dataset_builder` pointed at parquet shards in a folder instead of the Hub; everything
    after it (conversion to Arrow in a cache, memory-mapping, streaming) is the real code. `revisions` maps a
    revision to its folder (None: the default branch). `reads` collects every row index read through
    Dataset[...]."""

    def __init__(self, root, monkeypatch):
        self.root, self.calls, self.reads = root, [], []
        real_builder, real_getitem = datasets.load_dataset_builder, datasets.Dataset.__getitem__

        def builder(name, revision=None, **kwargs):
            assert not kwargs, f"unexpected load_dataset_builder arguments {kwargs}"
            self.calls.append((name, revision))
            shards = sorted(str(path) for path in (root / str(revision)).iterdir())
            module = "parquet" if shards[0].endswith(".parquet") else "json"
            return real_builder(module, data_files={"train": shards}, cache_dir=str(root / "cache"))

        def recording_getitem(dataset, key):
            self.reads.extend(key if isinstance(key, list) else [key] if isinstance(key, int) else [])
            return real_getitem(dataset, key)

        monkeypatch.setattr(datasets, "load_dataset_builder", builder)
        monkeypatch.setattr(datasets.Dataset, "__getitem__", recording_getitem)

    def publish(self, docs, revision=None, shards=3, suffix="parquet"):
        folder = self.root / str(revision)
        folder.mkdir(parents=True)
        per_shard = -(-len(docs) // shards)
        write = write_parquet if suffix == "parquet" else write_jsonl
        for k in range(shards):
            write(
                folder / f"train-{k:05d}-of-{shards:05d}.{suffix}", docs[k * per_shard : (k + 1) * per_shard]
            )


@pytest.fixture
def hub(tmp_path, monkeypatch) -> LocalHub:
    return LocalHub(tmp_path / "hub", monkeypatch)


def hub_config(**overrides) -> DataConfig:
    return config([], source="hub", **overrides)


def test_hub_dataset_is_cached_packs_in_row_order_and_records_its_revision(hub, tokenizer):
    docs = make_docs(40, seed=14)
    hub.publish(docs, revision="v1")
    cfg = hub_config(hub_revision="v1")
    with data.PackedBatches(cfg, tokenizer, global_rows=4) as batches:
        streams = lane_streams(windows(batches, 30))
        source = batches.state_dict()["source"]
    assert hub.calls == [(cfg.hub_dataset, "v1")]
    for lane, stream in enumerate(streams):
        assert stream == expected_lane_stream(tokenizer, docs, lane, 4, len(stream))
    assert list((hub.root / "cache").rglob("*.arrow")), "the dataset must be converted to an Arrow cache"
    assert (source["kind"], source["dataset"], source["split"], source["streaming"], source["documents"]) == (
        "hub",
        cfg.hub_dataset,
        "train",
        False,
        40,
    )
    assert (
        source["revision"] and source["fingerprint"]
    )  # what the revision resolved to, as the builder saw it
    assert source["revision"] in source["description"]


def test_hub_dataset_shuffles_every_row_once_per_epoch_and_resumes_on_another_world_size(hub, tokenizer):
    docs = make_docs(24, seed=15)
    hub.publish(docs)
    with data.PackedBatches(hub_config(shuffle=True), tokenizer, global_rows=4, seed=2) as batches:
        streams = lane_streams(windows(batches, 60))
        assert batches.epoch >= 1.0
    epoch_0 = [doc for stream in streams for doc in split_documents(stream, 1, 2)[:6]]  # 24 rows, 4 lanes
    assert sorted(epoch_0) == sorted(tuple(encode(tokenizer, doc)) for doc in docs), "each row once per epoch"
    assert epoch_0 != [
        tuple(encode(tokenizer, doc)) for doc in docs[0::4] + docs[1::4] + docs[2::4] + docs[3::4]
    ], "shuffle=True must change the order"

    # With hash-held-out rows, resumed at another world size.
    cfg = hub_config(shuffle=True, val_per_mille=100)
    assert 0 < sum(data.is_held_out(doc, 100) for doc in docs) < len(docs) // 2
    reference, _ = global_windows(cfg, tokenizer, global_rows=4, world_size=1, steps=16, seed=2)
    head, state = global_windows(cfg, tokenizer, global_rows=4, world_size=2, steps=9, seed=2)
    assert any(lane["offset"] > 0 for lane in state["lanes"].values())
    tail, _ = global_windows(
        cfg, tokenizer, global_rows=4, world_size=1, steps=7, seed=2, state=json.loads(json.dumps(state))
    )
    for step, batch in enumerate(head + tail):
        assert torch.equal(batch, reference[step]), f"step {step} differs"


def test_hub_resume_seeks_and_a_rank_reads_only_its_lanes_rows(hub, tokenizer, monkeypatch):
    monkeypatch.setattr(
        sources, "HUB_CHUNK_ROWS", 8
    )  # many chunks, so that a resume has whole chunks to skip
    hub.publish(make_docs(600, seed=16))  # more rows than the reader reads ahead: no lane wraps into epoch 1
    cfg = hub_config()
    with data.PackedBatches(cfg, tokenizer, global_rows=4, rank=1, world_size=2) as rank_1:
        windows(rank_1, 8)
    assert hub.reads and {row % 4 for row in hub.reads} == {1, 3}, "rank 1 of 2 owns lanes 1 and 3 only"
    assert len(hub.reads) == len(set(hub.reads)), "no row is read twice"

    reference, state = global_windows(cfg, tokenizer, global_rows=4, world_size=1, steps=30)
    resume_docs = {int(lane): lane_state["doc"] for lane, lane_state in state["lanes"].items()}
    assert min(resume_docs.values()) >= 2 * sources.HUB_CHUNK_ROWS, (
        "the resume point must lie past whole chunks"
    )
    hub.reads.clear()
    with data.PackedBatches(cfg, tokenizer, global_rows=4, rank=0, world_size=2) as rank_0:
        rank_0.load_state_dict(state)
        resumed = windows(rank_0, 3)
    assert hub.reads, "the resumed run must read rows"
    for row in hub.reads:
        assert row % 4 in (0, 2) and row >= resume_docs[row % 4], (
            f"row {row} lies before its lane's resume point"
        )
    continued, _ = global_windows(cfg, tokenizer, global_rows=4, world_size=1, steps=3, state=state)
    for step, batch in enumerate(resumed):
        assert torch.equal(batch, continued[step][0::2])


def test_hub_streaming_is_an_option_and_resumes(hub, tokenizer, caplog):
    docs = make_docs(60, seed=17)
    # JSON lines: a shuffled parquet stream sleeps 5 s each time it ends (datasets' guard for an Arrow thread
    # shutdown bug), and the stream is opened a dozen times here. The code under test is the same for both.
    hub.publish(docs, suffix="jsonl")
    cfg = config(
        ["no/such/*.jsonl"], source="auto", shuffle=True, val_per_mille=100, val_docs=3, hub_streaming=True
    )
    with caplog.at_level(logging.INFO, logger="dist_llama.data"):
        reference, state = global_windows(cfg, tokenizer, global_rows=4, world_size=1, steps=10)
    assert "streamed" in caplog.text and hub.calls[0] == (cfg.hub_dataset, None)
    assert state["source"]["streaming"] is True
    assert not list((hub.root / "cache").rglob("*.arrow")), "a stream is not downloaded"
    head, state = global_windows(cfg, tokenizer, global_rows=4, world_size=2, steps=5)
    tail, _ = global_windows(cfg, tokenizer, global_rows=4, world_size=1, steps=5, state=state)
    for a, b in zip(reference, head + tail):
        assert torch.equal(a, b)
    assert data.held_out_documents(cfg) == [doc for doc in docs if data.is_held_out(doc, 100)][:3]


def test_hub_held_out_set_is_the_hash_rule_over_the_rows(hub):
    docs = make_docs(200, seed=18)
    hub.publish(docs)
    assert (
        data.held_out_documents(hub_config(val_per_mille=100, val_docs=5))
        == [doc for doc in docs if data.is_held_out(doc, 100)][:5]
    )
    with pytest.raises(ValueError, match=r"no column 'body' \(data.text_field\)"):
        data.held_out_documents(hub_config(val_per_mille=100, text_field="body"))


def test_only_local_rank_0_downloads_while_the_others_wait(tmp_path):
    context = multiprocessing.get_context("spawn")
    log, results = tmp_path / "log", tmp_path / "results"
    workers = [
        context.Process(
            target=download_worker.run, args=(rank, str(tmp_path / "store"), str(log), str(results))
        )
        for rank in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    # Rank 1 loads only after rank 0 has finished, and not at all when rank 0 failed.
    assert log.read_text().splitlines() == [
        "works start 0",
        "works end 0",
        "works start 1",
        "works end 1",
        "fails start 0",
    ]
    rank_0, rank_1 = (json.loads((tmp_path / f"results.{rank}").read_text()) for rank in range(2))
    assert rank_0 == ["result 0", "ConnectionError: no route to huggingface.co"]
    assert rank_1[0] == "result 1"
    assert "local rank 0 could not load it" in rank_1[1] and "no route to huggingface.co" in rank_1[1]


# --- The source a state was saved from ------------------------------------------------------------------


def test_resume_on_another_data_source_is_refused_naming_old_and_new(tmp_path, tokenizer, hub):
    docs = make_docs(30, seed=19)
    write_jsonl(tmp_path / "a.jsonl", docs)
    with data.PackedBatches(config([tmp_path / "a.jsonl"]), tokenizer, global_rows=2) as batches:
        next(batches)
        state = json.loads(json.dumps(batches.state_dict()))
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "a.jsonl").write_bytes((tmp_path / "a.jsonl").read_bytes())
    with data.PackedBatches(config([moved / "a.jsonl"]), tokenizer, global_rows=2) as same_files:
        same_files.load_state_dict(state)  # the same files in another folder are the same data

    write_jsonl(tmp_path / "b.jsonl", make_docs(5, seed=20))
    (tmp_path / "body.jsonl").write_text(
        "".join(json.dumps({"text": doc, "body": doc.upper()}) + "\n" for doc in docs)
    )
    hub.publish(docs)
    changes = [
        (config([tmp_path / "*.jsonl"], val_per_mille=0), r"files 1 -> 3"),
        (config([tmp_path / "body.jsonl"], text_field="body"), r"text_field 'text' -> 'body'"),
        (hub_config(), r"kind 'local' -> 'hub'"),
    ]
    for cfg, change in changes:
        with data.PackedBatches(cfg, tokenizer, global_rows=2) as other:
            with pytest.raises(
                ValueError, match=r"was read from \[local, .*\] but this run reads \[.*\]"
            ) as error:
                other.load_state_dict(state)
        assert len(str(error.value).splitlines()) == 1
        assert "data.paths" in str(error.value) and "train.init_from" in str(error.value)
        assert re.search(change, str(error.value)), str(error.value)

    legacy = {key: value for key, value in state.items() if key != "source"}
    with data.PackedBatches(config([tmp_path / "a.jsonl"]), tokenizer, global_rows=2) as batches:
        batches.load_state_dict(legacy)  # saved before sources were recorded: nothing to compare


def test_resume_on_another_hub_revision_or_access_is_refused(hub, tokenizer):
    docs = make_docs(30, seed=21)
    hub.publish(docs, revision="v1")
    hub.publish(docs[:-1] + ["a changed last document"], revision="v2")
    with data.PackedBatches(hub_config(hub_revision="v1"), tokenizer, global_rows=2) as batches:
        next(batches)
        state = batches.state_dict()
    with data.PackedBatches(hub_config(hub_revision="v1"), tokenizer, global_rows=2) as same:
        same.load_state_dict(state)
    for overrides, change in [
        ({"hub_revision": "v2"}, "fingerprint"),
        ({"hub_revision": "v1", "hub_streaming": True}, "streaming False -> True"),
    ]:
        with data.PackedBatches(hub_config(**overrides), tokenizer, global_rows=2) as other:
            with pytest.raises(ValueError, match=change):
                other.load_state_dict(state)
    pinned_elsewhere = json.loads(json.dumps(state))
    pinned_elsewhere["source"]["revision"] = "0123abcd"
    with data.PackedBatches(hub_config(hub_revision="v1"), tokenizer, global_rows=2) as other:
        with pytest.raises(ValueError, match=r"revision '0123abcd' -> '\w+'.*data.hub_revision"):
            other.load_state_dict(pinned_elsewhere)
    with pytest.raises(ValueError, match="was read from"):
        data.merge_states([state, {**pinned_elsewhere, "lanes": {}}])


def test_auto_fallback_to_the_hub_warns_naming_the_missing_paths_and_the_directory(
    tmp_path, hub, tokenizer, monkeypatch, caplog
):
    hub.publish(make_docs(20, seed=22))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a config written for the repository root, run from another directory
    cfg = config(["../shared/data/owt/tiny.jsonl"], source="auto")
    with caplog.at_level(logging.INFO, logger="dist_llama.data"):
        with data.PackedBatches(cfg, tokenizer, global_rows=2) as batches:
            next(batches)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    for part in ("../shared/data/owt/tiny.jsonl", str(elsewhere), cfg.hub_dataset, "data.source=local"):
        assert part in warnings[0]

    write_jsonl(tmp_path / "tiny.jsonl", make_docs(20, seed=22))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dist_llama.data"):
        with data.PackedBatches(
            config([str(tmp_path / "tiny.jsonl")], source="auto"), tokenizer, global_rows=2
        ) as b:
            next(b)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert "local, 1 file(s)" in caplog.text


# --- The real tokenizer ---------------------------------------------------------------------------------


def test_real_mistral_tokenizer_packs_bos_doc_eos(shared_data):
    from dist_llama.tokenizer import load_tokenizer

    mistral = load_tokenizer(source="offline")
    assert (mistral.bos_token_id, mistral.eos_token_id) == (1, 2)
    path = shared_data / "owt" / "tiny.jsonl"
    docs = data.read_documents([path], limit=4)
    with data.PackedBatches(config([path], seq_len=128), mistral, global_rows=2) as batches:
        streams = lane_streams(windows(batches, 4))
    for lane, stream in enumerate(streams):
        assert stream == expected_lane_stream(mistral, docs, lane, 2, len(stream))


def test_the_encoder_gives_the_full_encodings_ids_without_offsets(shared_data):
    from dist_llama.tokenizer import load_tokenizer

    mistral = load_tokenizer(source="offline")
    encoder = data.DocumentEncoder(mistral)
    assert encoder._encode_batch.__name__ == "encode_batch_fast"  # tokenizers >= 0.21, as pinned
    docs = data.read_documents([shared_data / "owt" / "tiny.jsonl"], limit=200)
    full = encoder.backend.encode_batch(docs, add_special_tokens=False)  # with character offsets
    assert [tokens.tolist() for tokens in encoder.encode(docs)] == [[1] + e.ids + [2] for e in full]


def test_the_tokenizer_threads_are_the_ranks_share_of_its_cores(tmp_path, tokenizer, monkeypatch):
    from dist_llama.data import encoding

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert encoding.rank_cores() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert encoding.rank_cores() == 2
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    write_jsonl(tmp_path / "a.jsonl", make_docs(10))
    data.PackedBatches(config([tmp_path / "a.jsonl"]), tokenizer, global_rows=2).close()
    assert os.environ["RAYON_NUM_THREADS"] == "2"  # 16 cores shared by 8 ranks
    encoding.limit_tokenizer_threads(5)  # set already (by the user, or before): left as it is
    assert os.environ["RAYON_NUM_THREADS"] == "2"


def test_missing_val_paths_fall_back_to_the_hash_rule_only_with_auto(tmp_path, tokenizer, caplog):
    docs = make_docs(200)
    write_jsonl(tmp_path / "train.jsonl", docs)
    missing = str(tmp_path / "nowhere" / "*.jsonl")
    auto = config(
        [str(tmp_path / "train.jsonl")], source="auto", val_paths=[missing], val_per_mille=200, val_docs=5
    )
    with caplog.at_level(logging.WARNING, logger="dist_llama.data"):
        held_out = data.held_out_documents(auto)
    assert len(held_out) == 5 and all(data.is_held_out(text, 200) for text in held_out)
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert missing in warning and os.getcwd() in warning and "data.source=local" in warning
    with pytest.raises(FileNotFoundError, match="data.val_paths"):
        data.held_out_documents(config([str(tmp_path / "train.jsonl")], source="local", val_paths=[missing]))
