"""The training entry point:

    torchrun --nproc_per_node=N -m dist_llama.train --config configs/X.yaml [--section.key=value]

`python -m dist_llama.train` runs the same code on one process (a GPU if visible, else the CPU).

The file reads top-down: `train` sets up the process group, the stop request and the run, and closes them
whatever happens; `training_loop` is the spine: one step, its metrics line, then what the step boundary
decides (validate, save, plan the time budget, stop). What a run is made of and does is run.py; one
optimizer step is step.py; the decisions between steps are boundary.py; the records are metrics.py.
"""

from __future__ import annotations

import logging

from dist_llama.boundary import BudgetError
from dist_llama.checkpoint import CheckpointError
from dist_llama.cli import user_errors
from dist_llama.config import Config, ConfigError, parse_cli
from dist_llama.parallel import (
    CollectiveTimeout,
    CollectiveTimeouts,
    DistEnv,
    init_distributed,
    shutdown_distributed,
)
from dist_llama.run import NonFiniteError, Run
from dist_llama.step import step_guard
from dist_llama.stopping import StopRequest, clear_stop_record

log = logging.getLogger("dist_llama.train")


def train(config: Config) -> dict:
    """Run (or resume) training; returns the last train record with the last validation loss."""
    env = init_distributed(config.parallel, config.train.device, trace_dir=str(config.run_dir))
    setup_logging(env)
    run = stop = None
    try:
        stop = StopRequest.install(config.train, env)
        run = Run.start(config, env, stop)
        if env.is_main:
            clear_stop_record(config.run_dir)
        return training_loop(run)
    finally:
        if stop is not None:
            stop.close()
        if run is not None:
            run.close()
        shutdown_distributed()


def training_loop(run: Run) -> dict:
    """Step, log, then the boundary's decision, until the last step or a stop. Returns the last train
    record."""
    config, layout = run.config, run.layout
    timeouts, meter = CollectiveTimeouts(config.parallel), run.meter()
    start_step, last = run.progress.step, {}
    while run.progress.step < run.total_steps:
        step = run.progress.step + 1
        lr_scale = run.lr_scale(step - 1)
        with step_guard(step, layout, timeouts):
            result = run.step(meter.next_batch(run.data), lr_scale)
        meter.add(layout.tokens_per_step)
        if step == start_step + 1:  # loading and compile are behind: a long wait now means a hung rank
            timeouts.first_step_done()
            run.log_started()

        # once in a while: the metrics line
        if step % config.train.log_every == 0 or step == run.total_steps:
            last = run.log_train(result, lr_scale, meter.take(), start_step)

        # between steps (not training time): validate, save, plan the time budget, stop
        with run.clock.pause(), step_guard(step, layout, timeouts):
            todo = run.boundary.after(step)
            run.between_steps(todo)
        if todo.stop:
            run.stop_early(todo.stop)
            break

    # the last checkpoint is complete before the run ends (checkpoint.async_save writes it in the background)
    run.checkpointer.wait()
    return {**last, "val_loss": run.progress.val_loss}


def setup_logging(env: DistEnv) -> None:
    logging.basicConfig(
        level=logging.INFO if env.is_main else logging.WARNING,
        format=f"%(asctime)s [rank {env.rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> None:
    _, config = parse_cli("train", "Train a LLaMA model (single process, or under torchrun).", argv)
    errors = (ConfigError, CheckpointError, NonFiniteError, BudgetError, CollectiveTimeout, FileNotFoundError)
    with user_errors("train", *errors, ValueError):
        train(config)


if __name__ == "__main__":
    main()
