"""Tests for dist_llama.data: packing without padding, lane coverage, world-size-free resume, held-out split.

A small byte-level BPE tokenizer trained in a second stands in for the Mistral one (which has its own test at
the end). Expected streams are built here from the documents
themselves (file order, d % global_rows lanes), not from the packer's internals.
"""

import json
import logging
import random
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dist_llama import data
from dist_llama.config import DataConfig

WORDS = ("the of and to in is was for on that with as by at from it an be this are have or not which but "
         "river stone light market engine garden letter winter signal bridge orbit copper violet harbor").split()
SEQ_LEN = 16


def make_docs(n: int, seed: int = 0, prefix: str = "doc") -> list[str]:
    rng = random.Random(seed)
    return [f"{prefix}{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_docs(300, seed=99), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    return hf


def encode(tokenizer, text: str) -> list[int]:
    """The oracle: one document as the packer must emit it."""
    return [tokenizer.bos_token_id] + tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids + [
        tokenizer.eos_token_id]


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
    values = dict(source="local", paths=[str(p) for p in paths], seq_len=SEQ_LEN, shuffle=False, val_per_mille=0,
                  prefetch_steps=2)
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
    ranks = [data.PackedBatches(config_, tokenizer, global_rows=global_rows, rank=r, world_size=world_size, seed=seed)
             for r in range(world_size)]
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
            docs.append(tuple(stream[start:i + 1]))
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
    ranks = [data.PackedBatches(cfg, tokenizer, global_rows=4, rank=r, world_size=2, seed=5) for r in range(2)]
    assert ranks[0].lanes == (0, 2) and ranks[1].lanes == (1, 3)
    epoch_0 = {}
    for batches in ranks:
        with batches:
            streams = lane_streams(windows(batches, 60))
            assert batches.epoch >= 1.0, "every lane must have finished epoch 0"
        for lane, stream in zip(batches.lanes, streams):
            epoch_0[lane] = split_documents(stream, 1, 2)[:len(range(lane, 50, 4))]
    seen = [doc for lane_docs in epoch_0.values() for doc in lane_docs]
    assert sorted(seen) == sorted(tuple(encode(tokenizer, doc)) for doc in docs)
    assert epoch_0[0] != [tuple(encode(tokenizer, doc)) for doc in docs[0::4]], "shuffle=True must change the order"


def test_epoch_wraps_and_increments(tmp_path, tokenizer):
    docs = ["one two", "three four five", "six", "seven eight"]
    write_jsonl(tmp_path / "tiny.jsonl", docs)
    with data.PackedBatches(config([tmp_path / "tiny.jsonl"], seq_len=4), tokenizer, global_rows=2) as batches:
        assert batches.epoch == 0.0
        for step in range(1, 31):
            next(batches)
            lanes = batches.state_dict()["lanes"]
            for lane in (0, 1):
                # Lane l owns documents l and l + 2; its position after `step` windows is step * seq_len tokens.
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
        with data.PackedBatches(config([tmp_path / "*.jsonl"], shuffle=True), tokenizer, global_rows=1, seed=seed) as b:
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
    assert any(lane["offset"] > 0 for lane in state["lanes"].values()), "resume mid-document must be exercised"
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
        assert fresh["lanes"] == {"0": {"epoch": 0, "doc": 0, "offset": 0}, "1": {"epoch": 0, "doc": 1, "offset": 0}}
        next(prefetching)
        deadline = time.time() + 10
        while not prefetching._producer._queue.full() and time.time() < deadline:
            time.sleep(0.01)  # let the thread run ahead
        assert prefetching._producer._queue.full()
        with data.PackedBatches(config([tmp_path / "a.jsonl"], prefetch_steps=0), tokenizer, global_rows=2) as inline:
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
    expected = [stream[w * SEQ_LEN:w * SEQ_LEN + SEQ_LEN + 1] for w in range(4)]
    got = [torch.cat([x[row], y[row, -1:]]).tolist() for x, y in valid for row in range(2)]
    assert got == expected


def test_val_paths_mode_and_rank_split(tmp_path, tokenizer, caplog):
    write_jsonl(tmp_path / "train.jsonl", make_docs(20, seed=11))
    val_docs = make_docs(10, seed=12, prefix="val")
    write_jsonl(tmp_path / "val.jsonl", val_docs)
    # val_per_mille would hold out nearly everything, but with val_paths the hash rule is off.
    cfg = config([tmp_path / "train.jsonl"], val_paths=[str(tmp_path / "val.jsonl")], val_docs=4, val_per_mille=999)
    assert data.held_out_documents(cfg) == val_docs[:4]
    with data.PackedBatches(cfg, tokenizer, global_rows=2) as batches:
        assert len(windows(batches, 3)) == 3

    full = data.validation_batches(cfg, tokenizer, rows=4, n_batches=2)
    stream = [token for doc in val_docs[:4] for token in encode(tokenizer, doc)]
    assert full[0][0][0].tolist() == stream[:SEQ_LEN]
    assert full[1][0][0].tolist() == stream[4 * SEQ_LEN:5 * SEQ_LEN]  # batch 1, row 0 is window 1 * rows + 0
    for rank in range(2):
        mine = data.validation_batches(cfg, tokenizer, rows=4, n_batches=2, rank=rank, world_size=2)
        for (x, y), (fx, fy) in zip(mine, full):
            assert torch.equal(x, fx[rank::2]) and torch.equal(y, fy[rank::2])

    with caplog.at_level(logging.WARNING, logger="dist_llama.data"):
        recycled = data.validation_batches(cfg, tokenizer, rows=8, n_batches=4)
    assert "recycling" in caplog.text and len(recycled) == 4
    assert recycled[0][0].shape == (8, SEQ_LEN)

    with pytest.raises(FileNotFoundError, match="data.val_paths"):
        data.held_out_documents(config([tmp_path / "train.jsonl"], val_paths=[str(tmp_path / "missing*.jsonl")]))
    with pytest.raises(ValueError, match="no held-out set"):
        data.held_out_documents(config([tmp_path / "train.jsonl"]))


# --- Errors ---------------------------------------------------------------------------------------------


def test_clear_errors(tmp_path, tokenizer, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", make_docs(12, seed=13))
    with pytest.raises(FileNotFoundError, match=r"nope/\*\.jsonl"):
        data.PackedBatches(config(["nope/*.jsonl"]), tokenizer, global_rows=2)

    def unreachable(name, split):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(data, "_load_hub_dataset", unreachable)
    with pytest.raises(FileNotFoundError, match=r"match no files and the Hub dataset .* could not be opened"):
        data.PackedBatches(config(["nope/*.jsonl"], source="auto"), tokenizer, global_rows=2)

    with pytest.raises(ValueError, match="divisible by world_size=4"):
        data.PackedBatches(config([tmp_path / "a.jsonl"]), tokenizer, global_rows=6, rank=0, world_size=4)

    with data.PackedBatches(config([tmp_path / "a.jsonl"]), tokenizer, global_rows=2, rank=0, world_size=2) as b:
        next(b)
        partial = b.state_dict()
    for name, cfg, rows in [("seq_len", config([tmp_path / "a.jsonl"], seq_len=32), 2),
                            ("global_rows", config([tmp_path / "a.jsonl"]), 4),
                            ("shuffle", config([tmp_path / "a.jsonl"], shuffle=True), 2)]:
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


# --- Hub streaming (a local dataset streamed through datasets, as the Hub one would be) -------------------


def test_hub_source_streams_shuffles_and_resumes(tmp_path, tokenizer, monkeypatch, caplog):
    import datasets  # a required dependency: a broken install must fail here, not skip
    docs = make_docs(60, seed=14)
    write_jsonl(tmp_path / "hub.jsonl", docs)
    calls = []

    def local_stream(name, split):
        calls.append((name, split))
        return datasets.load_dataset("json", data_files=str(tmp_path / "hub.jsonl"), split="train", streaming=True)

    monkeypatch.setattr(data, "_load_hub_dataset", local_stream)
    cfg = config(["no/such/*.jsonl"], source="auto", shuffle=True, val_per_mille=100, val_docs=3)
    with caplog.at_level(logging.INFO, logger="dist_llama.data"):
        reference, _ = global_windows(cfg, tokenizer, global_rows=4, world_size=1, steps=10)
    assert "hub" in caplog.text and calls[0] == (cfg.hub_dataset, cfg.hub_split)
    head, state = global_windows(cfg, tokenizer, global_rows=4, world_size=2, steps=5)
    tail, _ = global_windows(cfg, tokenizer, global_rows=4, world_size=1, steps=5, state=state)
    for a, b in zip(reference, head + tail):
        assert torch.equal(a, b)
    assert data.held_out_documents(cfg) == [doc for doc in docs if data.is_held_out(doc, 100)][:3]


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


def test_missing_val_paths_fall_back_to_the_hash_rule_only_with_auto(tmp_path, tokenizer):
    docs = make_docs(200)
    write_jsonl(tmp_path / "train.jsonl", docs)
    missing = str(tmp_path / "nowhere" / "*.jsonl")
    auto = config([str(tmp_path / "train.jsonl")], source="auto", val_paths=[missing], val_per_mille=200, val_docs=5)
    held_out = data.held_out_documents(auto)
    assert len(held_out) == 5 and all(data.is_held_out(text, 200) for text in held_out)
    with pytest.raises(FileNotFoundError, match="data.val_paths"):
        data.held_out_documents(config([str(tmp_path / "train.jsonl")], source="local", val_paths=[missing]))
