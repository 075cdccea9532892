"""`python -m dist_llama.train` with DCP's file writer slowed down, for tests that act while a checkpoint's
background write is in flight (tests/test_async_checkpoint.py). Used as the script itself or under torchrun:

    SLOW_CHECKPOINT_STEPS=8 SLOW_CHECKPOINT_S=600 python tests/slow_checkpoint_writer.py --config ...

Each rank writes its shards, then sleeps SLOW_CHECKPOINT_S seconds before DCP goes on to the checkpoint's
.metadata, meta.json and the rename; SLOW_CHECKPOINT_STEPS names the steps slowed (comma-separated, or `all`).
The trainer itself is unchanged."""

from __future__ import annotations

import os
import time

from torch.distributed.checkpoint import filesystem

from dist_llama.checkpoint_folders import checkpoint_name
from dist_llama.train import main

STEPS = os.environ.get("SLOW_CHECKPOINT_STEPS", "all")
SECONDS = float(os.environ.get("SLOW_CHECKPOINT_S", "0"))
write_data = filesystem._FileSystemWriter.write_data


def slowed(path) -> bool:
    if STEPS == "all":
        return True
    return any(path.name == checkpoint_name(int(step)) + ".tmp" for step in STEPS.split(","))


def slow_write_data(self, plan, planner):
    written = write_data(self, plan, planner)
    if slowed(self.path):
        time.sleep(SECONDS)
    return written


filesystem._FileSystemWriter.write_data = slow_write_data

if __name__ == "__main__":
    main()
