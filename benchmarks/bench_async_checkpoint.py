"""The training loop's stall per checkpoint: a synchronous save against checkpoint.async_save, on CPU.

One process (a 1-rank gloo group); the model and optimizer are built as the trainer builds them (FSDP2, the
config's optimizer, fp32), and a few tiny steps run between saves so that the optimizer state exists and the
saves interleave with training. Both modes save through dist_llama's Checkpointer in the same process, in
alternating order. A save's stall is the time Checkpointer.save holds the loop: the whole write when
synchronous; with async_save the copy out of the model's memory, plus any wait for the write before it. Before
each save the loop runs --steps-between steps, and goes on stepping while a write is still in flight (as
training does between checkpoints), so that a save does not start while the previous write is unfinished.

    python benchmarks/bench_async_checkpoint.py --config configs/main.yaml --saves 3 [--optim.name=adamw]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

from dist_llama.checkpoint import Checkpointer, CheckpointMeta
from dist_llama.config import load_config
from dist_llama.model import causal_lm_loss
from dist_llama.parallel import init_distributed, shutdown_distributed
from dist_llama.run import build_model


def in_flight(checkpointer: Checkpointer) -> bool:
    return checkpointer.in_flight is not None and not checkpointer.in_flight.done.done()


def bench(args) -> None:
    config = load_config(Path(args.config), ["--parallel.mixed_precision=fp32", *args.overrides])
    env = init_distributed(config.parallel, "cpu")
    model, optimizer = build_model(config, env, "fp32")
    tokens = torch.randint(0, config.model.vocab_size, (args.batch, args.seq_len + 1))
    folder = Path(args.folder)
    checkpointers = {
        mode: Checkpointer(folder / mode, keep_last=1, is_main=True, async_save=mode == "async")
        for mode in ("sync", "async")
    }
    stalls = {mode: [] for mode in checkpointers}
    complete = []  # async: seconds from the save's start to the checkpoint's rename
    step_s = {"a write in flight": [], "no write in flight": []}

    def step() -> None:
        writing = any(in_flight(c) for c in checkpointers.values())
        start = time.perf_counter()
        causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
        step_s["a write in flight" if writing else "no write in flight"].append(time.perf_counter() - start)

    step()  # the optimizer's state exists from the first step on
    count = 1
    for save in range(args.saves):
        for mode in ("sync", "async") if save % 2 == 0 else ("async", "sync"):
            done = 0
            while done < args.steps_between or any(in_flight(c) for c in checkpointers.values()):
                step()
                done, count = done + 1, count + 1
            checkpointer = checkpointers[mode]
            start = time.perf_counter()
            checkpointer.save(model, optimizer, {}, CheckpointMeta(step=count, tokens_seen=0, config={}))
            stalls[mode].append(time.perf_counter() - start)
            if checkpointer.in_flight is not None:
                complete.append(checkpointer.in_flight.done)
    for checkpointer in checkpointers.values():
        checkpointer.wait()
        checkpointer.close()
    size = sum(p.stat().st_size for p in (folder / "sync").rglob("*") if p.is_file())
    shutil.rmtree(folder)
    shutdown_distributed()
    report(args, config, size, stalls, [future.result() for future in complete], step_s)


def report(args, config, size: int, stalls: dict, complete: list, step_s: dict) -> None:
    print(
        f"{args.config}, optimizer {config.optim.name}, fp32, one CPU process; checkpoint "
        f"{size / 2**30:.2f} GiB; {args.saves} saves per mode; steps of {args.batch} x {args.seq_len} tokens"
    )
    print("| save | stall per save (s), each | median |")
    print("|---|---|---:|")
    for mode, values in stalls.items():
        print(f"| {mode} | {', '.join(f'{v:.2f}' for v in values)} | {statistics.median(values):.2f} |")
    ratio = statistics.median(stalls["async"]) / statistics.median(stalls["sync"])
    print(f"stall ratio async / sync (medians): {ratio:.3f}")
    written = ", ".join(f"{v:.2f}" for v in complete)
    print(f"async checkpoints complete after (s, from the save's start): {written}")
    for name, values in step_s.items():
        if values:
            print(f"step time with {name}: median {statistics.median(values):.2f} s over {len(values)} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/main.yaml")
    parser.add_argument("--saves", type=int, default=3, help="saves per mode")
    parser.add_argument("--steps-between", type=int, default=2, help="steps before each save, at least")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--folder", default="/tmp/bench_async_checkpoint", help="deleted afterwards")
    args, args.overrides = parser.parse_known_args()  # the rest: --section.key=value, as for the trainer
    bench(args)


if __name__ == "__main__":
    main()
