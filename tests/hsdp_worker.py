"""Many small training runs in one process group, for tests/test_hsdp.py: each 4-process launch costs ~10 s
before any work, so one launch runs every mesh, micro-batch and optimizer case in turn, through dist_llama's
own parallelize, build_optimizer and TrainingStep (the trainer's step without its data, logging and
checkpoints). Without torchrun it runs the same cases on one process.

    python -m torch.distributed.run --standalone --nproc_per_node=4 tests/hsdp_worker.py OUT.json CASE...
    python tests/hsdp_worker.py OUT.json CASE...

A case is NAME=OVERRIDE,OVERRIDE,... (config overrides, e.g. `hsdp=--parallel.replicate=2`). Each case's
second step is counted (dist_llama.comms): its collectives per micro-batch and for the rest of the step, and
the gradient bytes FSDP2 holds after the first micro-batch. Rank 0 writes {name: {"loss": [...],
"grad_norm": [...], "overflow": [every rank's list], "collectives": [...], "held_after_micro_1": {...}}} to
OUT.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch
from torch.distributed.fsdp import FSDPModule

from dist_llama.comms import count_collectives, mesh_dimensions
from dist_llama.config import load_config
from dist_llama.model import Transformer
from dist_llama.optim import build_optimizer
from dist_llama.parallel import (
    all_gather_objects,
    init_distributed,
    loss_scaler,
    mesh_shape,
    parallelize,
    shutdown_distributed,
    training_precision,
)
from dist_llama.step import BatchLayout, TrainingStep

STEPS = 6
COUNTED_STEP = 2  # the first step also creates the optimizer's state; the second is a step like any other
# A small vocabulary keeps the output head (the debug model's largest matrix at 32k tokens) from dominating.
BASE = [
    "--model.vocab_size=256",
    "--data.seq_len=32",
    "--train.tokens_per_step=512",  # 16 rows: 4 per rank at 4 ranks
    "--parallel.mixed_precision=fp32",
    "--optim.muon_lr=0.02",
]


def global_batch(step: int, rows: int, seq_len: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s global batch: each row a walk of small random increments mod the vocabulary, which the
    model learns within a few steps, so the losses move."""
    generator = torch.Generator().manual_seed(1000 + step)
    steps = torch.randint(0, 4, (rows, seq_len + 1), generator=generator)
    tokens = (steps.cumsum(1) + torch.randint(0, vocab, (rows, 1), generator=generator)) % vocab
    return tokens[:, :-1], tokens[:, 1:]


def run_case(overrides: list[str], env) -> dict:
    config = load_config(None, BASE + overrides)
    shape, why = mesh_shape(config.parallel, env.world_size, env.local_world_size)
    env = dataclasses.replace(env, mesh_shape=shape, mesh_why=why)
    precision = training_precision(config.parallel, env.device)[0]
    layout = BatchLayout.of(config.train, config.data.seq_len, env.world_size)
    torch.manual_seed(0)
    model = Transformer(config.model)
    model.init_weights(seed=0)
    model = parallelize(model, config.parallel, env, precision)
    optimizer = build_optimizer(model, config.optim, env.device, precision)
    scaler = loss_scaler(precision, env.device, config.parallel.initial_loss_scale)
    stepper = TrainingStep.of(config, model, optimizer, layout, env.device, scaler)
    result = {"loss": [], "grad_norm": [], "overflow": [], "mesh": list(shape)}
    for step in range(1, STEPS + 1):
        inputs, labels = global_batch(step, layout.global_rows, layout.seq_len, config.model.vocab_size)
        batch = inputs[env.rank :: env.world_size], labels[env.rank :: env.world_size]
        if step == COUNTED_STEP:
            outcome, result["collectives"], result["held_after_micro_1"] = counted_step(stepper, batch)
        else:
            outcome = stepper.step(batch, 1.0)
        result["loss"].append(outcome.loss)
        result["grad_norm"].append(outcome.grad_norm)
        result["overflow"].append(outcome.overflow)
    result["overflow"] = all_gather_objects(result["overflow"])  # every rank's, to compare
    result["micro_batches"] = layout.accumulation_steps
    return result


def held_gradient_bytes(model) -> dict[str, int]:
    """The gradient bytes FSDP2 holds between micro-batches: whole (unsharded) gradients waiting for their
    reduce-scatter, HSDP's partial sums waiting for the all-reduce, and sharded gradients (FSDP2 internals,
    read for the test only)."""
    held = {"unsharded": 0, "partial": 0, "sharded": 0}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                if group._partial_reduce_output is not None:
                    held["partial"] += nbytes(group._partial_reduce_output)
                for param in group.fsdp_params:
                    whole = param.unsharded_accumulated_grad
                    whole = whole if whole is not None else param._unsharded_param.grad
                    held["unsharded"] += nbytes(whole) if whole is not None else 0
    held["sharded"] = sum(nbytes(p.grad.to_local()) for p in model.parameters() if p.grad is not None)
    return held


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def counted_step(stepper: TrainingStep, batch):
    """One step with its collectives counted: each micro-batch's forward and backward, then the rest of the
    step (the loss sum, gradient norm, clipping, optimizer) as `step`."""
    dimensions = mesh_dimensions(next(stepper.model.parameters()).device_mesh)
    forward_backward, micro, held = stepper.forward_backward, iter(range(1, 1000)), {}
    with count_collectives() as counter:

        def marked(inputs, labels):
            index = next(micro)
            with counter.in_phase(f"micro-batch {index}"):
                loss = forward_backward(inputs, labels)
            if index == 1:
                held.update(held_gradient_bytes(stepper.model))
            return loss

        stepper.forward_backward = marked
        with counter.in_phase("step"):
            outcome = stepper.step(batch, 1.0)
    del stepper.forward_backward
    rows = [[*key, count, size] for key, (count, size) in counter.table(dimensions).items()]
    return outcome, rows, held


def main(out: str, cases: list[str]) -> None:
    env = init_distributed(load_config(None, BASE).parallel, "cpu")
    results = {}
    try:
        for case in cases:
            name, _, overrides = case.partition("=")
            start = time.perf_counter()
            results[name] = run_case([o for o in overrides.split(",") if o], env)
            results[name]["seconds"] = time.perf_counter() - start
    finally:
        shutdown_distributed()
    if env.is_main:
        with open(out, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    main(sys.argv[1], sys.argv[2:])
