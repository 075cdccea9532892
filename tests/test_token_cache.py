"""Tests for the token cache (dist_llama.data.cache, cache_build, cache_manifest): the same batches and data
state as tokenizing on the fly, a checkpoint of either resumed by the other at another world size, the
held-out documents left out, one build per node, refusal of a cache that does not match the config, and
builds that die.

The small tokenizer, the documents and the Hub stand-in are test_data.py's.
"""

import dataclasses
import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import download_worker  # tests/download_worker.py
import pytest
import torch
from test_data import (
    config,
    encode,
    global_windows,
    hub,  # noqa: F401 (a fixture)
    hub_config,
    make_docs,
    tokenizer,  # noqa: F401 (fixtures)
    train_tokenizer,
    write_jsonl,
    write_parquet,
)

from dist_llama import data
from dist_llama.config import ConfigError, load_config, recipe_changes
from dist_llama.data import cache, cache_build, cache_manifest

REPO = Path(__file__).resolve().parents[1]


def cached(cfg, folder):
    return dataclasses.replace(cfg, token_cache=str(folder))


def corpus(folder, seed=30, n=60):
    folder.mkdir()
    docs = make_docs(n, seed=seed)
    write_jsonl(folder / "a.jsonl.zst", docs[: n // 3])
    write_parquet(folder / "b.parquet", docs[n // 3 : 2 * n // 3])
    write_jsonl(folder / "c.jsonl", docs[2 * n // 3 :])
    return docs


@pytest.mark.parametrize("shuffle", [True, False])
def test_the_cache_gives_the_batches_and_state_of_tokenizing_on_the_fly(tmp_path, tokenizer, shuffle):
    corpus(tmp_path / "data")
    text = config([tmp_path / "data" / "*"], shuffle=shuffle, val_per_mille=100)
    tokens = cached(text, tmp_path / "cache")
    cache.build_token_cache(tokens, tokenizer, workers=1)
    from_text, text_state = global_windows(text, tokenizer, global_rows=6, world_size=2, steps=40, seed=3)
    from_cache, cache_state = global_windows(tokens, tokenizer, global_rows=6, world_size=2, steps=40, seed=3)
    assert all(lane["epoch"] >= 1 for lane in text_state["lanes"].values()), "every lane must wrap an epoch"
    for step, (a, b) in enumerate(zip(from_text, from_cache)):
        assert torch.equal(a, b), f"step {step} differs"
    assert cache_state == text_state


@pytest.mark.parametrize(
    "first, then, before, after", [("text", "cache", 2, 3), ("cache", "text", 3, 1), ("cache", "cache", 1, 2)]
)
def test_a_state_of_either_resumes_on_the_other_at_another_world_size(
    tmp_path, tokenizer, first, then, before, after
):
    corpus(tmp_path / "data", seed=32)
    text = config([tmp_path / "data" / "*"], shuffle=True, val_per_mille=100)
    kinds = {"text": text, "cache": cached(text, tmp_path / "cache")}
    cache.build_token_cache(kinds["cache"], tokenizer, workers=1)
    reference, _ = global_windows(text, tokenizer, global_rows=6, world_size=1, steps=20, seed=3)
    head, state = global_windows(kinds[first], tokenizer, global_rows=6, world_size=before, steps=12, seed=3)
    assert any(lane["offset"] > 0 for lane in state["lanes"].values())
    assert any(lane["epoch"] > 0 for lane in state["lanes"].values())
    state = json.loads(json.dumps(state))  # as a checkpoint stores it
    tail, _ = global_windows(
        kinds[then], tokenizer, global_rows=6, world_size=after, steps=8, state=state, seed=3
    )
    for step, batch in enumerate(head + tail):
        assert torch.equal(batch, reference[step]), f"step {step} differs"


def test_held_out_documents_stay_out_of_the_cache(tmp_path, tokenizer):
    docs = corpus(tmp_path / "data", seed=33, n=150)
    cfg = cached(config([tmp_path / "data" / "*"], val_per_mille=100), tmp_path / "cache")
    cache.build_token_cache(cfg, tokenizer, workers=1)
    source = cache.load_token_cache(cfg, tokenizer)
    held_out = [data.is_held_out(doc, 100) for doc in docs]
    assert 5 < sum(held_out) < 30
    for record, (doc, out) in enumerate(zip(docs, held_out)):
        assert source.tokens(record).tolist() == ([] if out else encode(tokenizer, doc))
    assert source.manifest["tokens"] == sum(
        len(encode(tokenizer, d)) for d, out in zip(docs, held_out) if not out
    )
    assert source.manifest["dtype"] == "uint16"

    # With data.val_paths the training stream holds nothing out, and neither does its cache.
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    every = cached(
        config([tmp_path / "data" / "*"], val_per_mille=100, val_paths=[str(tmp_path / "val.jsonl")]),
        tmp_path / "cache_all",
    )
    cache.build_token_cache(every, tokenizer, workers=1)
    assert all(len(cache.load_token_cache(every, tokenizer).tokens(r)) for r in range(len(docs)))


def test_two_build_processes_write_the_same_cache_as_one(tmp_path, tokenizer, monkeypatch):
    corpus(tmp_path / "data", seed=34, n=90)
    monkeypatch.setattr(cache_build, "BUILD_PIECE_DOCS", 7)  # many pieces, shared out between the processes
    cfg = config([tmp_path / "data" / "*"], val_per_mille=100)
    one = cache.build_token_cache(cached(cfg, tmp_path / "one"), tokenizer, workers=1)
    two = cache.build_token_cache(cached(cfg, tmp_path / "two"), tokenizer, workers=2)
    names = sorted(path.name for path in one.iterdir())
    assert names == sorted(path.name for path in two.iterdir())
    assert len([name for name in names if name.startswith("tokens-")]) == 3  # a shard per file
    for name in names:
        if name != cache_manifest.MANIFEST:
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    manifests = [json.loads((folder / cache_manifest.MANIFEST).read_text()) for folder in (one, two)]
    assert [m["workers"] for m in manifests] == [1, 2]
    assert manifests[0]["shards"] == manifests[1]["shards"] and manifests[0]["files"] == manifests[1]["files"]


def test_a_cache_that_does_not_match_the_config_is_refused_in_one_line(tmp_path, tokenizer):
    docs = make_docs(20, seed=35)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": d, "body": d.upper()}) + "\n" for d in docs))
    cfg = cached(config([folder / "*.jsonl"], val_per_mille=50), tmp_path / "cache")
    cache.build_token_cache(cfg, tokenizer, workers=1)
    os.utime(folder / "a.jsonl")  # touched, not changed: still the same data
    with data.PackedBatches(cfg, tokenizer, global_rows=2) as batches:
        next(batches)

    def refused(cfg_, tokenizer_, pattern):
        with pytest.raises(ConfigError, match=pattern) as error:
            data.PackedBatches(cfg_, tokenizer_, global_rows=2)
        assert len(str(error.value).splitlines()) == 1
        assert "data.token_cache" in str(error.value) and "--force" in str(error.value)

    refused(dataclasses.replace(cfg, text_field="body"), tokenizer, r"text field 'text' -> 'body'")
    refused(dataclasses.replace(cfg, val_per_mille=10), tokenizer, r"held-out rule 50 -> 10 per mille")
    refused(cfg, train_tokenizer(vocab_size=300, seed=98), r"tokenizer hash '\w+' -> '\w+'")
    original = (folder / "a.jsonl").read_bytes()
    (folder / "a.jsonl").write_bytes(original.replace(b"doc0:", b"DOC0:"))  # same size, other text
    refused(cfg, tokenizer, r"the content of a\.jsonl")
    (folder / "a.jsonl").write_bytes(original)
    write_jsonl(folder / "b.jsonl", ["another document"])
    refused(cfg, tokenizer, r"files \(name, bytes\): 1 -> 2")
    refused(cached(hub_config(), tmp_path / "cache"), tokenizer, r"kind 'local' -> 'hub'")
    with pytest.raises(ConfigError, match="does not match"):
        cache.build_token_cache(cfg, tokenizer, workers=1)
    cache.build_token_cache(cfg, tokenizer, workers=1, force=True)  # replaced by one that matches
    with data.PackedBatches(cfg, tokenizer, global_rows=2) as batches:
        assert batches.state_dict()["source"]["files"] == 2


def test_a_build_that_dies_leaves_no_cache_and_is_run_again(tmp_path, tokenizer, monkeypatch):
    corpus(tmp_path / "data", seed=36)
    cfg = cached(config([tmp_path / "data" / "*"]), tmp_path / "cache")
    monkeypatch.setattr(cache_build, "BUILD_PIECE_DOCS", 4)
    real, calls = cache_build._encode_piece, []

    def dies(texts):
        calls.append(len(texts))
        if len(calls) == 3:
            raise MemoryError("killed")
        return real(texts)

    monkeypatch.setattr(cache_build, "_encode_piece", dies)
    with pytest.raises(MemoryError):
        cache.build_token_cache(cfg, tokenizer, workers=1)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"], "nothing of the dead build is left"

    # A build killed outright leaves its temporary folder, which the cache's name never points at; a later
    # build on the same host removes it.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".cache.partial-{socket.gethostname()}-{dead.pid}"
    stale.mkdir()
    (stale / "tokens-00000.bin").write_bytes(b"\0" * 10)
    with pytest.raises(FileNotFoundError, match="no token cache"):
        cache.load_token_cache(cfg, tokenizer)
    monkeypatch.setattr(cache_build, "_encode_piece", real)
    with data.PackedBatches(cfg, tokenizer, global_rows=2) as batches:  # builds the missing cache
        next(batches)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "data"]

    (tmp_path / "not_a_cache").mkdir()
    (tmp_path / "not_a_cache" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no token cache"):
        cache.build_token_cache(cached(cfg, tmp_path / "not_a_cache"), tokenizer, workers=1)


def test_only_local_rank_0_builds_the_cache_while_the_others_wait(tmp_path, shared_data):
    lines = (shared_data / "owt" / "tiny.jsonl").read_text().splitlines()[:40]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    context = multiprocessing.get_context("spawn")
    log = tmp_path / "log"
    args = (str(tmp_path / "store"), str(tmp_path / "docs.jsonl"), str(tmp_path / "cache"), str(log))
    workers = [context.Process(target=download_worker.build_cache, args=(rank, *args)) for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
    assert [worker.exitcode for worker in workers] == [0, 0]
    events = log.read_text().splitlines()
    assert events[:2] == ["build start 0", "build end 0"] and "build start 1" not in events
    assert sorted(events[2:]) == ["batch 0 equal", "batch 1 equal"]


def test_hub_dataset_cache_gives_the_same_batches_and_records_the_revision(
    hub, tokenizer, tmp_path, monkeypatch
):
    docs = make_docs(70, seed=37)
    hub.publish(docs, revision="v1")
    monkeypatch.setattr(cache_build, "CACHE_SHARD_ROWS", 16)
    text = hub_config(hub_revision="v1", shuffle=True, val_per_mille=100)
    tokens = cached(text, tmp_path / "hub_cache")
    cache.build_token_cache(tokens, tokenizer, workers=1)
    manifest = json.loads((tmp_path / "hub_cache" / cache_manifest.MANIFEST).read_text())
    assert len(manifest["shards"]) == 5 and manifest["hub_revision"] == "v1" and manifest["files"] == []
    from_text, text_state = global_windows(text, tokenizer, global_rows=4, world_size=1, steps=30, seed=2)
    reads = len(hub.reads)
    from_cache, cache_state = global_windows(tokens, tokenizer, global_rows=4, world_size=2, steps=30, seed=2)
    assert len(hub.reads) == reads, "training from the cache reads no row of the dataset"
    assert all(torch.equal(a, b) for a, b in zip(from_text, from_cache))
    assert cache_state == text_state
    with pytest.raises(ConfigError, match=r"hub revision 'v1' -> 'v2'"):
        data.PackedBatches(dataclasses.replace(tokens, hub_revision="v2"), tokenizer, global_rows=4)


def test_token_cache_is_a_config_key_that_a_resume_may_switch(tmp_path):
    base = load_config(REPO / "configs" / "debug.yaml")
    switched = load_config(REPO / "configs" / "debug.yaml", [f"--data.token_cache={tmp_path / 'cache'}"])
    assert switched.data.token_cache == str(tmp_path / "cache") and base.data.token_cache is None
    assert recipe_changes(base, switched) == []  # the batches are the same, so it is not part of the recipe
    with pytest.raises(ConfigError, match="data.token_cache needs random access"):
        load_config(REPO / "configs" / "debug.yaml", ["--data.token_cache=c", "--data.hub_streaming=true"])


def test_prepare_command_builds_the_cache_and_refuses_a_mismatch_in_one_line(tmp_path, shared_data):
    lines = (shared_data / "owt" / "tiny.jsonl").read_text().splitlines()[:30]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    args = [
        sys.executable,
        "-m",
        "dist_llama.data.prepare",
        "--config",
        str(REPO / "configs" / "debug.yaml"),
        "--workers",
        "1",
        f"--data.paths=[{tmp_path / 'docs.jsonl'}]",
        "--data.tokenizer=offline",
        f"--data.token_cache={tmp_path / 'cache'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    built = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert json.loads((tmp_path / "cache" / cache_manifest.MANIFEST).read_text())["documents"] == 30
    refused = subprocess.run(
        args + ["--data.text_field=body"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("data.prepare: error: the token cache"), refused.stderr[
        -2000:
    ]
    assert "Traceback" not in refused.stderr
