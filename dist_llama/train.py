"""The training entry point: `torchrun --nproc_per_node=N -m dist_llama.train --config configs/X.yaml [--section.key=value]`.

`python -m dist_llama.train` runs the same code on one process (a GPU if visible, else the CPU).
The loop reads top-down: setup -> forward_backward -> train_step -> train, with a try/finally that
closes the data thread, the loggers and the process group.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dist_llama.checkpoint import Checkpointer, CheckpointError, load_model_weights, read_meta
from dist_llama.cli import user_errors
from dist_llama.config import Config, ConfigError, from_dict, parse_cli, recipe_changes, save_config, to_dict
from dist_llama.data import PackedBatches, merge_states, validation_batches
from dist_llama.metrics import DataWait, MetricsLogger, environment_record, memory_gib, peak_flops
from dist_llama.model import Transformer, count_parameters, flops_per_token
from dist_llama.optim import build_optimizer, lr_factor, set_learning_rates
from dist_llama.parallel import (CollectiveTimeout, DistEnv, all_reduce_sum, collective_timeout_hint, init_distributed,
                                 parallelize, set_step_timeout, shutdown_distributed)
from dist_llama.stopping import (BudgetError, StopRequest, TimeBudget, clear_stop_record, measure_pauses,
                                 process_age_s, stop_message, write_stop_record)
from dist_llama.tokenizer import check_tokenizer, load_tokenizer

log = logging.getLogger("dist_llama.train")


class NonFiniteError(RuntimeError):
    """Loss or gradient norm became NaN/inf more often than train.max_bad_steps allows."""


@dataclass
class Progress:
    step: int = 0
    tokens_seen: int = 0
    bad_steps: int = 0


@dataclass
class BatchPlan:
    """How one optimizer step's global batch splits over ranks and micro-batches."""

    global_rows: int
    rows_per_rank: int
    micro_batch_size: int
    seq_len: int

    @property
    def accumulation_steps(self) -> int:
        return self.rows_per_rank // self.micro_batch_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_rows * self.seq_len

    @classmethod
    def from_config(cls, config: Config, world_size: int) -> "BatchPlan":
        """train.micro_batch_size is a memory limit, not part of the recipe: the plan uses the largest
        micro-batch up to it that divides the rank's rows. Only a global batch that does not split evenly
        over the ranks is an error, since it would change the recipe."""
        seq_len = config.data.seq_len
        global_rows = config.train.tokens_per_step // seq_len
        if global_rows % world_size:
            raise ConfigError(
                f"train.tokens_per_step={config.train.tokens_per_step} is {global_rows} sequences of data.seq_len={seq_len}, "
                f"which do not divide over world_size={world_size} ranks; make tokens_per_step a multiple of "
                f"{world_size * seq_len} or use a world size that divides {global_rows}")
        rows_per_rank = global_rows // world_size
        micro = max(d for d in range(1, min(config.train.micro_batch_size, rows_per_rank) + 1) if rows_per_rank % d == 0)
        return cls(global_rows, rows_per_rank, micro, seq_len)


@contextmanager
def out_of_memory_hint(plan: BatchPlan):
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise RuntimeError(f"out of GPU memory with micro-batches of {plan.micro_batch_size} at seq_len "
                           f"{plan.seq_len}: lower --train.micro_batch_size (gradient accumulation keeps the global "
                           "batch) or set --parallel.activation_checkpointing=full") from error


def forward_backward(model, inputs, labels, tokens_per_rank: int, loss_chunk_tokens: int) -> torch.Tensor:
    """Backward of this micro-batch's summed loss over the rank's tokens; FSDP's gradient average
    over ranks then gives the mean over every token of the global batch. Returns the summed loss."""
    loss_sum = model(inputs, labels=labels, loss_chunk_tokens=loss_chunk_tokens)
    (loss_sum / tokens_per_rank).backward()
    return loss_sum.detach()


def train_step(model, optimizer, batch, plan: BatchPlan, lr_scale: float, config: Config, device):
    """One optimizer step over this rank's rows; returns (mean loss over the global batch, pre-clip grad norm)."""
    inputs, labels = (t.to(device, non_blocking=True) for t in batch)
    tokens_per_rank = plan.rows_per_rank * plan.seq_len
    loss_sum = torch.zeros((), device=device)
    for micro in range(plan.accumulation_steps):
        rows = slice(micro * plan.micro_batch_size, (micro + 1) * plan.micro_batch_size)
        loss_sum += forward_backward(model, inputs[rows], labels[rows], tokens_per_rank, config.train.loss_chunk_tokens)
    # grad_clip 0 or null: no clipping. An infinite limit still measures the norm and scales by exactly 1.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip or math.inf)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    loss = all_reduce_sum(loss_sum).item() / plan.tokens_per_step
    grad_norm = grad_norm.item()
    if math.isfinite(loss) and math.isfinite(grad_norm):
        set_learning_rates(optimizer, lr_scale)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


@torch.no_grad()
def evaluate_loss(model, batches, micro_batch_size: int, loss_chunk_tokens: int, device) -> float:
    model.eval()
    loss_sum = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device)
    for inputs, labels in batches:
        for start in range(0, inputs.shape[0], micro_batch_size):
            rows = slice(start, start + micro_batch_size)
            loss_sum += model(inputs[rows].to(device), labels=labels[rows].to(device), loss_chunk_tokens=loss_chunk_tokens)
            tokens += labels[rows].numel()
    model.train()
    return (all_reduce_sum(loss_sum) / all_reduce_sum(tokens)).item()


def setup_logging(env: DistEnv) -> None:
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")


def train(config: Config) -> dict:
    """Run (or resume) training; returns the last step's metrics."""
    env = init_distributed(config.parallel, config.train.device, trace_dir=str(config.run_dir))
    setup_logging(env)
    try:
        return _train(config, env)
    finally:
        shutdown_distributed()


def check_recipe(config: Config, meta: dict, checkpoint) -> list[dict]:
    """Resuming with a changed recipe would leave weights that config.yaml no longer describes: stop,
    unless every changed key is in checkpoint.allow_changes. Returns the allowed changes, for the record."""
    changes = recipe_changes(from_dict(meta["config"]), config)
    refused = [change for change in changes if change["key"] not in config.checkpoint.allow_changes]
    if refused:
        listed = "; ".join(f"{c['key']}: {c['old']!r} -> {c['new']!r}" for c in refused)
        keys = ",".join(c["key"] for c in refused)
        raise ConfigError(f"{checkpoint} was trained with another recipe ({listed}); start a new run with "
                          f"--train.name=NEW_NAME, or resume with the change on purpose: --checkpoint.allow_changes=[{keys}]")
    for change in changes:
        log.warning("resuming with %s changed on purpose: %r -> %r", change["key"], change["old"], change["new"])
    return [{**change, "step": meta["step"]} for change in changes]


def _train(config: Config, env: DistEnv) -> dict:
    run_dir = config.run_dir
    plan = BatchPlan.from_config(config, env.world_size)
    checkpointer = Checkpointer(run_dir / "checkpoints", config.checkpoint.keep_last, env.is_main)
    resume_from = checkpointer.find_resume(config.checkpoint.resume)
    recipe_history = []
    if resume_from is not None:  # checked before anything is written, so a refused resume changes nothing
        saved = read_meta(resume_from)
        recipe_history = saved.get("recipe_changes", []) + check_recipe(config, saved, resume_from)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        (run_dir / "environment.json").write_text(json.dumps(environment_record(env.device, env.world_size), indent=1))

    tokenizer = load_tokenizer(config.data.tokenizer)
    check_tokenizer(tokenizer, config.model.vocab_size)

    torch.manual_seed(config.train.seed)
    model = Transformer(config.model)
    model.init_weights(seed=config.train.seed)
    model = parallelize(model, config.parallel, env)
    optimizer = build_optimizer(model, config.optim, env.device)

    counts = count_parameters(config.model)
    flops = flops_per_token(config.model, plan.seq_len)
    log.info("parameters: %s non-embedding, %s total; %.3g FLOPs/token; %d x %d tokens per step "
             "(%d ranks x %d micro-batches of %d); optimizer %s, %s schedule", f"{counts['non_embedding']:,}",
             f"{counts['total']:,}", flops, plan.global_rows, plan.seq_len, env.world_size, plan.accumulation_steps,
             plan.micro_batch_size, config.optim.name, config.optim.schedule)
    if plan.micro_batch_size < min(config.train.micro_batch_size, plan.rows_per_rank):
        log.info("micro-batch %d (the largest up to train.micro_batch_size=%d that divides the %d rows per rank)",
                 plan.micro_batch_size, config.train.micro_batch_size, plan.rows_per_rank)

    data = PackedBatches(config.data, tokenizer, global_rows=plan.global_rows, rank=env.rank,
                         world_size=env.world_size, seed=config.train.seed)
    val_batches = validation_batches(config.data, tokenizer, rows=plan.global_rows, n_batches=config.train.eval_batches,
                                     rank=env.rank, world_size=env.world_size)
    progress = Progress()
    budget_plan = None
    if resume_from is not None:
        meta = checkpointer.load(resume_from, model, optimizer)
        progress = Progress(step=meta["step"], tokens_seen=meta["tokens_seen"], bad_steps=meta.get("bad_steps", 0))
        data.load_state_dict(merge_states(meta["data_lanes"]))
        if config.train.time_budget_s is not None:
            budget_plan = meta.get("budget_plan")  # the schedule planned before stays the schedule
        log.info("resumed from %s at step %d (%d tokens seen)", resume_from, progress.step, progress.tokens_seen)
    elif config.train.init_from:
        meta = load_model_weights(config.train.init_from, model)
        if config.train.init_data_stream == "continue":
            data.load_state_dict(merge_states(meta["data_lanes"]))
        log.info("initialised weights from %s (data stream: %s)", config.train.init_from, config.train.init_data_stream)

    # Without a budget, train.steps is the schedule's length. With one, train.steps is only the upper
    # bound until the plan: the measured steps use it, which matters only for a cosine schedule that is
    # already past its warmup then.
    budget = TimeBudget(config.train, progress.step, budget_plan)
    total_steps = min(budget.plan["planned_steps"], config.train.steps) if budget.plan else config.train.steps
    logger = MetricsLogger(run_dir, env.is_main, total_steps, config.logging.tensorboard, config.logging.progress)
    peak = peak_flops(env.device, config.logging.peak_tflops)
    start_step, last = progress.step, {}
    stop = StopRequest.install(config.train, env)
    if env.is_main:
        clear_stop_record(run_dir)

    def synchronize() -> float:
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def evaluate(step: int) -> float:
        val_loss = evaluate_loss(model, val_batches, plan.micro_batch_size, config.train.loss_chunk_tokens, env.device)
        logger.log({"kind": "val", "step": step, "tokens_seen": progress.tokens_seen, "val_loss": val_loss})
        last["val_loss"] = val_loss
        return val_loss

    def save_checkpoint(step: int) -> None:
        checkpointer.save(step, model, optimizer, data.state_dict(),
                          {"tokens_seen": progress.tokens_seen, "bad_steps": progress.bad_steps,
                           "config": to_dict(config), "final_loss": last.get("loss"), "val_loss": last.get("val_loss"),
                           "budget_plan": budget.plan, "planned_steps": total_steps if budget.plan else None,
                           "recipe_changes": recipe_history})

    def plan_budget(step: int) -> int:
        """Time one evaluation and one checkpoint after the measured steps, then plan the step count."""
        step_s = budget.step_s(synchronize())

        def evaluation(warm_up: bool) -> None:
            if warm_up:
                evaluate_loss(model, val_batches[:1], plan.micro_batch_size, config.train.loss_chunk_tokens, env.device)
            else:
                evaluate(step)
        eval_s, checkpoint_s = measure_pauses(evaluation, lambda: save_checkpoint(step), synchronize)
        budget_plan = budget.make_plan(config, env, step, step_s, eval_s, checkpoint_s)
        logger.log({"kind": "plan", "step": step, **budget_plan})
        log.info("time budget %.0f s: %d steps planned (a step %.3f s, an evaluation %.1f s, a checkpoint "
                 "%.1f s, %.0f s used so far)", budget_plan["budget_s"], budget_plan["planned_steps"], step_s,
                 budget_plan["eval_s"], checkpoint_s, budget_plan["age_s"])
        return budget_plan["planned_steps"]

    try:
        window_start, window_tokens = time.perf_counter(), 0
        timeout_key, timeout_s = "parallel.init_timeout_s", config.parallel.init_timeout_s
        data_wait = DataWait()
        while progress.step < total_steps:
            step = progress.step + 1
            lr_scale = lr_factor(progress.step, config.optim, total_steps)
            with out_of_memory_hint(plan), collective_timeout_hint(step, timeout_s, timeout_key):
                loss, grad_norm = train_step(model, optimizer, data_wait.next(data), plan, lr_scale, config, env.device)
            if step == start_step + 1:  # loading and compile are behind: a long wait now means a hung rank
                set_step_timeout(config.parallel.timeout_s)
                timeout_key, timeout_s = "parallel.timeout_s", config.parallel.timeout_s
                # How long start-up, data and compile took; a launcher can tell from it that the run is training.
                logger.log({"kind": "started", "step": step, "time_s": process_age_s()})
            progress.step = step
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                progress.bad_steps += 1
                log.warning("step %d: non-finite loss %s or grad norm %s; update skipped", step, loss, grad_norm)
                if progress.bad_steps > config.train.max_bad_steps:
                    raise NonFiniteError(f"step {step}: non-finite loss or gradient norm (loss={loss}, "
                                         f"grad_norm={grad_norm}); {progress.bad_steps} bad steps > "
                                         f"train.max_bad_steps={config.train.max_bad_steps}. Lower optim.lr, "
                                         "raise optim.warmup_steps, or resume from an earlier checkpoint")
            progress.tokens_seen += plan.tokens_per_step
            window_tokens += plan.tokens_per_step

            if step % config.train.log_every == 0 or step == total_steps:
                elapsed = synchronize() - window_start
                tokens_per_s = window_tokens / elapsed
                last.update({"kind": "train", "step": step, "tokens_seen": progress.tokens_seen, "loss": loss,
                             "grad_norm": grad_norm, "lr": config.optim.lr * lr_scale, "tokens_in_batch": plan.tokens_per_step,
                             "tokens_per_s": tokens_per_s, "epoch": data.epoch,
                             "mfu": flops * tokens_per_s / (peak * env.world_size) if peak else None,
                             "memory_gib": memory_gib(env.device), "time_s": time.perf_counter() - logger.start,
                             **data_wait.take(elapsed)})
                if config.optim.name == "muon":
                    last["muon_lr"] = config.optim.muon_lr * lr_scale
                logger.log({k: v for k, v in last.items() if k != "val_loss"}, start_step)
                window_start, window_tokens = time.perf_counter(), 0

            pause_start = time.perf_counter()  # evaluation and checkpoint time is not training throughput
            with collective_timeout_hint(step, timeout_s, timeout_key):
                if budget.starts_measuring(step):
                    budget.measure_start = synchronize()
                planned_now = budget.plans_now(step)  # the plan's own evaluation also serves this step's regular one
                if planned_now:
                    total_steps = logger.total_steps = plan_budget(step)
                stop_reason = stop.reason() if step < total_steps else None
                if stop_reason:  # one checkpoint of this step on every rank, then a clean exit
                    save_checkpoint(step)
                    logger.log({"kind": "stop", "step": step, "reason": stop_reason})
                    log.info(stop_message(stop_reason, step, total_steps))
                    if env.is_main:
                        write_stop_record(run_dir, step, stop_reason)
                    break
                if not planned_now and (step % config.train.eval_every == 0 or step == total_steps):
                    evaluate(step)
                if step % config.checkpoint.every == 0 or step == total_steps:  # again here: this one records the plan
                    save_checkpoint(step)
            paused = time.perf_counter() - pause_start
            window_start += paused
            budget.measure_start += paused
    finally:
        stop.close()
        data.close()
        logger.close()
    return last


def main(argv: list[str] | None = None) -> None:
    _, config = parse_cli("train", "Train a LLaMA model (single process, or under torchrun).", argv)
    with user_errors("train", ConfigError, CheckpointError, NonFiniteError, BudgetError, CollectiveTimeout,
                     FileNotFoundError, ValueError):
        train(config)


if __name__ == "__main__":
    main()
