"""The training entry point: `torchrun --nproc_per_node=N -m dist_llama.train --config configs/X.yaml [--section.key=value]`.

`python -m dist_llama.train` runs the same code on one process (a GPU if visible, else the CPU).
The loop reads top-down: setup -> forward_backward -> train_step -> train, with a try/finally that
closes the data thread, the loggers and the process group.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dist_llama.checkpoint import Checkpointer, CheckpointError, load_model_weights
from dist_llama.config import Config, ConfigError, OptimConfig, parse_cli, save_config, to_dict
from dist_llama.data import PackedBatches, merge_states, validation_batches
from dist_llama.metrics import MetricsLogger, environment_record, memory_gib, peak_flops
from dist_llama.model import Transformer, causal_lm_loss, count_parameters, flops_per_token
from dist_llama.parallel import DistEnv, all_reduce_sum, init_distributed, parallelize, shutdown_distributed
from dist_llama.tokenizer import check_tokenizer, load_tokenizer

log = logging.getLogger("dist_llama.train")


class NonFiniteError(RuntimeError):
    """Loss or gradient norm became NaN/inf more often than train.max_bad_steps allows."""


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warmup from 0 over warmup_steps, then cosine decay to lr * min_lr_ratio at total_steps."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    floor = optim.lr * optim.min_lr_ratio
    return floor + 0.5 * (optim.lr - floor) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    # Decay matrices only: norm gains are scales, and decaying them toward 0 fights the normalisation.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             fused=device.type == "cuda")


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
        seq_len, micro = config.data.seq_len, config.train.micro_batch_size
        global_rows = config.train.tokens_per_step // seq_len
        if global_rows % (world_size * micro):
            raise ConfigError(
                f"train.tokens_per_step={config.train.tokens_per_step} is {global_rows} sequences of data.seq_len={seq_len}, "
                f"which does not divide over world_size={world_size} x train.micro_batch_size={micro}; "
                f"make tokens_per_step a multiple of {world_size * micro * seq_len}")
        return cls(global_rows, global_rows // world_size, micro, seq_len)


@contextmanager
def out_of_memory_hint(plan: BatchPlan):
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise RuntimeError(f"out of GPU memory with train.micro_batch_size={plan.micro_batch_size} at seq_len "
                           f"{plan.seq_len}: lower --train.micro_batch_size (gradient accumulation keeps the global "
                           "batch) or set --parallel.activation_checkpointing=full") from error


def forward_backward(model, inputs, labels, tokens_per_rank: int) -> torch.Tensor:
    """Backward of this micro-batch's summed loss over the rank's tokens; FSDP's gradient average
    over ranks then gives the mean over every token of the global batch. Returns the summed loss."""
    loss_sum = causal_lm_loss(model(inputs), labels, reduction="sum")
    (loss_sum / tokens_per_rank).backward()
    return loss_sum.detach()


def train_step(model, optimizer, batch, plan: BatchPlan, lr: float, grad_clip: float, device):
    """One optimizer step over this rank's rows; returns (mean loss over the global batch, pre-clip grad norm)."""
    inputs, labels = (t.to(device, non_blocking=True) for t in batch)
    tokens_per_rank = plan.rows_per_rank * plan.seq_len
    loss_sum = torch.zeros((), device=device)
    for micro in range(plan.accumulation_steps):
        rows = slice(micro * plan.micro_batch_size, (micro + 1) * plan.micro_batch_size)
        loss_sum += forward_backward(model, inputs[rows], labels[rows], tokens_per_rank)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    loss = all_reduce_sum(loss_sum).item() / plan.tokens_per_step
    grad_norm = grad_norm.item()
    if math.isfinite(loss) and math.isfinite(grad_norm):
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


@torch.no_grad()
def evaluate_loss(model, batches, micro_batch_size: int, device) -> float:
    model.eval()
    loss_sum = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device)
    for inputs, labels in batches:
        for start in range(0, inputs.shape[0], micro_batch_size):
            rows = slice(start, start + micro_batch_size)
            logits = model(inputs[rows].to(device))
            loss_sum += causal_lm_loss(logits, labels[rows].to(device), reduction="sum")
            tokens += labels[rows].numel()
    model.train()
    return (all_reduce_sum(loss_sum) / all_reduce_sum(tokens)).item()


def setup_logging(env: DistEnv) -> None:
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")


def train(config: Config) -> dict:
    """Run (or resume) training; returns the last step's metrics."""
    env = init_distributed(config.parallel, config.train.device)
    setup_logging(env)
    try:
        return _train(config, env)
    finally:
        shutdown_distributed()


def _train(config: Config, env: DistEnv) -> dict:
    run_dir = config.run_dir
    plan = BatchPlan.from_config(config, env.world_size)
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
             "(%d ranks x %d micro-batches of %d)", f"{counts['non_embedding']:,}", f"{counts['total']:,}", flops,
             plan.global_rows, plan.seq_len, env.world_size, plan.accumulation_steps, plan.micro_batch_size)

    data = PackedBatches(config.data, tokenizer, global_rows=plan.global_rows, rank=env.rank,
                         world_size=env.world_size, seed=config.train.seed)
    val_batches = validation_batches(config.data, tokenizer, rows=plan.global_rows, n_batches=config.train.eval_batches,
                                     rank=env.rank, world_size=env.world_size)
    checkpointer = Checkpointer(run_dir / "checkpoints", config.checkpoint.keep_last, env.is_main)
    progress = Progress()

    resume_from = checkpointer.find_resume(config.checkpoint.resume)
    if resume_from is not None:
        meta = checkpointer.load(resume_from, model, optimizer)
        progress = Progress(step=meta["step"], tokens_seen=meta["tokens_seen"], bad_steps=meta.get("bad_steps", 0))
        data.load_state_dict(merge_states(meta["data_lanes"]))
        log.info("resumed from %s at step %d (%d tokens seen)", resume_from, progress.step, progress.tokens_seen)
    elif config.train.init_from:
        meta = load_model_weights(config.train.init_from, model)
        if config.train.init_data_stream == "continue":
            data.load_state_dict(merge_states(meta["data_lanes"]))
        log.info("initialised weights from %s (data stream: %s)", config.train.init_from, config.train.init_data_stream)

    logger = MetricsLogger(run_dir, env.is_main, config.train.steps, config.logging.tensorboard, config.logging.progress)
    peak = peak_flops(env.device, config.logging.peak_tflops)
    start_step, last = progress.step, {}
    try:
        window_start, window_tokens = time.perf_counter(), 0
        while progress.step < config.train.steps:
            step = progress.step + 1
            lr = lr_at(progress.step, config.optim, config.train.steps)
            with out_of_memory_hint(plan):
                loss, grad_norm = train_step(model, optimizer, next(data), plan, lr, config.optim.grad_clip, env.device)
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

            if step % config.train.log_every == 0 or step == config.train.steps:
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / elapsed
                last = {"kind": "train", "step": step, "tokens_seen": progress.tokens_seen, "loss": loss,
                        "grad_norm": grad_norm, "lr": lr, "tokens_in_batch": plan.tokens_per_step,
                        "tokens_per_s": tokens_per_s, "epoch": data.epoch,
                        "mfu": flops * tokens_per_s / (peak * env.world_size) if peak else None,
                        "memory_gib": memory_gib(env.device), "time_s": time.perf_counter() - logger.start}
                logger.log(last, start_step)
                window_start, window_tokens = time.perf_counter(), 0

            pause_start = time.perf_counter()  # evaluation and checkpoint time is not training throughput
            if step % config.train.eval_every == 0 or step == config.train.steps:
                val_loss = evaluate_loss(model, val_batches, plan.micro_batch_size, env.device)
                logger.log({"kind": "val", "step": step, "tokens_seen": progress.tokens_seen, "val_loss": val_loss})
                last["val_loss"] = val_loss

            if step % config.checkpoint.every == 0 or step == config.train.steps:
                checkpointer.save(step, model, optimizer, data.state_dict(),
                                  {"tokens_seen": progress.tokens_seen, "bad_steps": progress.bad_steps,
                                   "config": to_dict(config), "final_loss": loss, "val_loss": last.get("val_loss")})
            window_start += time.perf_counter() - pause_start
    finally:
        data.close()
        logger.close()
    return last


def main(argv: list[str] | None = None) -> None:
    _, config = parse_cli("Train a LLaMA model (single process, or under torchrun).", argv)
    try:
        train(config)
    except (ConfigError, CheckpointError, NonFiniteError, FileNotFoundError, ValueError) as error:
        # User-facing problems: one clear line instead of a traceback wall.
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
