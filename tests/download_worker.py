"""One rank of a two-rank, one-node gloo group that loads through sources._once_per_node, for test_data.py.

A module of its own so that a spawned rank imports torch and dist_llama.data only, not the test file's imports.
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
            outcomes.append(f"result {sources._once_per_node(load)}")
        except Exception as error:  # noqa: BLE001 - reported to the test
            outcomes.append(f"{type(error).__name__}: {error}")
    dist.destroy_process_group()
    with open(f"{results}.{rank}", "w") as fh:
        json.dump(outcomes, fh)
