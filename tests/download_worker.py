"""One rank of a two-rank, one-node gloo group that loads through sources.once_per_node, for test_data.py.

A module of its own so that a spawned rank imports torch and dist_llama.data only, not the test file's
imports.
"""

import json
import os
import time

from dist_llama.data import sources


def run(rank: int, store: str, log: str, results: str) -> None:
    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(rank)  # one node of two ranks, as torchrun would set it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    outcomes = []
    for scenario in ("works", "fails"):

        def load():
            with open(log, "a") as fh:
                fh.write(f"{scenario} start {rank}\n")
            if scenario == "fails" and rank == 0:
                raise ConnectionError("no route to huggingface.co")
            time.sleep(0.5 if rank == 0 else 0.0)  # rank 1 would log first, were it not waiting
            with open(log, "a") as fh:
                fh.write(f"{scenario} end {rank}\n")
            return rank

        try:
            outcomes.append(f"result {sources.once_per_node(load)}")
        except Exception as error:  # noqa: BLE001 - reported to the test
            outcomes.append(f"{type(error).__name__}: {error}")
    dist.destroy_process_group()
    with open(f"{results}.{rank}", "w") as fh:
        json.dump(outcomes, fh)


def build_cache(rank: int, store: str, docs: str, folder: str, log: str) -> None:
    """open_token_cache on one rank of a two-rank node; logs builds and whether its batches equal on-the-fly
    ones."""
    import dataclasses

    import torch
    import torch.distributed as dist

    from dist_llama import data
    from dist_llama.config import DataConfig
    from dist_llama.data import cache
    from dist_llama.tokenizer import load_tokenizer

    os.environ["LOCAL_RANK"] = str(rank)
    real_build = cache.build_token_cache

    def build(*args, **kwargs):
        with open(log, "a") as fh:
            fh.write(f"build start {rank}\n")
        time.sleep(0.5)  # rank 1 would build too, were it not waiting
        folder_ = real_build(*args, **kwargs, workers=1)
        with open(log, "a") as fh:
            fh.write(f"build end {rank}\n")
        return folder_

    cache.build_token_cache = build
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    tokenizer = load_tokenizer("offline")
    text = DataConfig(source="local", paths=[docs], seq_len=32, val_per_mille=0, prefetch_steps=1)
    with (
        data.PackedBatches(
            dataclasses.replace(text, token_cache=folder), tokenizer, global_rows=4, rank=rank, world_size=2
        ) as from_cache,
        data.PackedBatches(text, tokenizer, global_rows=4, rank=rank, world_size=2) as from_text,
    ):
        equal = all(torch.equal(next(from_cache)[0], next(from_text)[0]) for _ in range(5))
    dist.destroy_process_group()
    with open(log, "a") as fh:
        fh.write(f"batch {rank} {'equal' if equal else 'differs'}\n")
