"""The training entry point:

    torchrun --nproc_per_node=N -m dist_llama.train --config configs/X.yaml [--section.key=value]

`python -m dist_llama.train` runs the same code on one process (a GPU if visible, else the CPU).

What is where, from the entry point down (the file defines each piece before the code that uses it, so
it reads bottom-up):
    train            the process group and logging around the loop; a try/finally closes the data thread,
                     the loggers and the process group
    training_loop    one step, its log line, then what the step boundary decides (boundary.py): validate,
                     save, plan the time budget, stop
    Run              what a run is made of (model, optimizer, data, validation batches, checkpointer,
                     metrics logger, progress, fp16's loss scaler), built or resumed by Run.start, with its
                     own step, validate and save
    train_step       one optimizer step over the rank's rows: forward_backward per micro-batch, clip, step
    BatchLayout      how the global batch splits over ranks and micro-batches
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from dist_llama.boundary import (
    BudgetError,
    StepBoundary,
    StopRequest,
    Todo,
    clear_stop_record,
    measure_pauses,
    process_age_s,
    stop_message,
    write_stop_record,
)
from dist_llama.checkpoint import Checkpointer, CheckpointError, CheckpointMeta, load_model_weights, read_meta
from dist_llama.cli import user_errors
from dist_llama.config import (
    Config,
    ConfigError,
    TrainConfig,
    from_dict,
    parse_cli,
    recipe_changes,
    save_config,
    to_dict,
)
from dist_llama.data import PackedBatches, merge_states, validation_batches
from dist_llama.devices import computes
from dist_llama.memory import GIB, MemoryEstimate, check_memory_fits
from dist_llama.metrics import (
    DataWait,
    MetricsLogger,
    Throughput,
    TrainingClock,
    environment_record,
    memory_gib,
    peak_flops,
    read_environment,
)
from dist_llama.model import Transformer, count_parameters, flops_per_token
from dist_llama.optim import OptimizerGroup, build_optimizer, lr_factor, set_learning_rates
from dist_llama.parallel import (
    CollectiveTimeout,
    CollectiveTimeouts,
    DistEnv,
    ShardedGradScaler,
    all_reduce_sum,
    broadcast_object,
    init_distributed,
    loss_scaler,
    parallelize,
    shutdown_distributed,
    training_precision,
)
from dist_llama.tokenizer import check_tokenizer, load_tokenizer

log = logging.getLogger("dist_llama.train")


class NonFiniteError(RuntimeError):
    """Loss or gradient norm became NaN/inf more often than train.max_bad_steps allows."""


@dataclass(frozen=True)
class BatchLayout:
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
    def of(cls, train: TrainConfig, seq_len: int, world_size: int) -> BatchLayout:
        """train.micro_batch_size is a memory limit, not part of the recipe: the layout uses the largest
        micro-batch up to it that divides the rank's rows. Only a global batch that does not split evenly
        over the ranks is an error, since it would change the recipe."""
        global_rows = train.tokens_per_step // seq_len
        if global_rows % world_size:
            raise ConfigError(
                f"train.tokens_per_step={train.tokens_per_step} is {global_rows} sequences of "
                f"data.seq_len={seq_len}, "
                f"which do not divide over world_size={world_size} ranks; make tokens_per_step a multiple of "
                f"{world_size * seq_len} or use a world size that divides {global_rows}"
            )
        rows_per_rank = global_rows // world_size
        micro = max(
            d for d in range(1, min(train.micro_batch_size, rows_per_rank) + 1) if rows_per_rank % d == 0
        )
        return cls(global_rows, rows_per_rank, micro, seq_len)

    def out_of_memory_hint(self) -> str:
        return (
            f"out of GPU memory with micro-batches of {self.micro_batch_size} at seq_len {self.seq_len}: "
            "lower "
            "--train.micro_batch_size (gradient accumulation keeps the global batch) or set "
            "--parallel.activation_checkpointing=full"
        )


@contextmanager
def step_guard(step: int, layout: BatchLayout, timeouts: CollectiveTimeouts):
    """Around a step and its boundary: running out of GPU memory names the settings that help, and a
    collective that gave up waiting names the step and the timeout to raise. Both in one line, without a
    traceback."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise RuntimeError(layout.out_of_memory_hint()) from error
    except RuntimeError as error:
        timeout = timeouts.explain(step, error)
        if timeout is None:
            raise
        raise timeout from error


def forward_backward(
    model,
    inputs,
    labels,
    tokens_per_rank: int,
    loss_chunk_tokens: int,
    scaler: ShardedGradScaler | None = None,
) -> torch.Tensor:
    """Backward of this micro-batch's summed loss over the rank's tokens (times the fp16 loss scale, if any);
    FSDP's gradient average over ranks then gives the mean over every token of the global batch. Returns the
    summed loss."""
    loss_sum = model(inputs, labels=labels, loss_chunk_tokens=loss_chunk_tokens)
    loss = loss_sum / tokens_per_rank
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss_sum.detach()


class StepResult(NamedTuple):
    loss: float  # mean over the global batch
    grad_norm: float  # before clipping (and after unscaling)
    overflow: bool = False  # fp16: the scaled gradients overflowed; the update was skipped, the scale halved


def train_step(
    model,
    optimizer,
    batch,
    layout: BatchLayout,
    lr_scale: float,
    grad_clip: float | None,
    loss_chunk_tokens: int,
    device,
    scaler: ShardedGradScaler | None = None,
) -> StepResult:
    """One optimizer step over this rank's rows. A step whose loss or gradient norm is not finite is not
    applied; with fp16's loss scaler (parallel.loss_scaler) that is an overflow, and the scale is lowered."""
    inputs, labels = (t.to(device, non_blocking=True) for t in batch)
    tokens_per_rank = layout.rows_per_rank * layout.seq_len
    loss_sum = torch.zeros((), device=device)
    for micro in range(layout.accumulation_steps):
        rows = slice(micro * layout.micro_batch_size, (micro + 1) * layout.micro_batch_size)
        loss_sum += forward_backward(
            model, inputs[rows], labels[rows], tokens_per_rank, loss_chunk_tokens, scaler
        )
    if scaler is not None:  # clipping and the logged norm see the true gradients
        for each in optimizer:
            scaler.unscale_(each)
    # grad_clip 0 or null: no clipping. An infinite limit still measures the norm and scales by exactly 1.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    loss = all_reduce_sum(loss_sum).item() / layout.tokens_per_step
    grad_norm = grad_norm.item()
    if math.isfinite(loss) and math.isfinite(grad_norm):  # the norm covers every rank's gradients
        set_learning_rates(optimizer, lr_scale)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    overflow = False
    if scaler is not None:  # lowered after an overflow (which unscale_ recorded), raised after a long calm
        scale = scaler.get_scale()
        scaler.update()
        overflow = scaler.get_scale() < scale
    return StepResult(loss, grad_norm, overflow)


@torch.no_grad()
def validation_loss(model, batches, micro_batch_size: int, loss_chunk_tokens: int, device) -> float:
    """Mean loss per token over the validation batches, every rank's rows together."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device)
    for inputs, labels in batches:
        for start in range(0, inputs.shape[0], micro_batch_size):
            rows = slice(start, start + micro_batch_size)
            loss_sum += model(
                inputs[rows].to(device), labels=labels[rows].to(device), loss_chunk_tokens=loss_chunk_tokens
            )
            tokens += labels[rows].numel()
    model.train()
    return (all_reduce_sum(loss_sum) / all_reduce_sum(tokens)).item()


@dataclass
class Progress:
    step: int = 0
    tokens_seen: int = 0
    bad_steps: int = 0
    overflow_steps: int = 0  # fp16 steps skipped because the scaled gradients overflowed
    loss: float | None = None  # the last logged training loss
    val_loss: float | None = None


@dataclass
class Run:
    """What a training run is made of. Run.start builds it, or resumes it from its latest checkpoint."""

    config: Config
    env: DistEnv
    layout: BatchLayout
    model: torch.nn.Module
    optimizer: OptimizerGroup
    data: PackedBatches
    val_batches: list
    checkpointer: Checkpointer
    logger: MetricsLogger
    precision: str = "fp32"  # what the model computes in (parallel.mixed_precision, auto resolved)
    scaler: ShardedGradScaler | None = None  # fp16's loss scaler
    # On a GPU: the step's estimated peak, checked against the card
    memory_estimate: MemoryEstimate | None = None
    progress: Progress = field(default_factory=Progress)
    # The time budget's plan, once made (or as the resumed checkpoint kept it), and the step count it set.
    budget_plan: dict | None = None
    planned_steps: int | None = None
    recipe_changes: list[dict] = field(default_factory=list)  # keys changed on purpose at a resume, in order

    @classmethod
    def start(cls, config: Config, env: DistEnv) -> Run:
        layout = BatchLayout.of(config.train, config.data.seq_len, env.world_size)
        checkpointer = Checkpointer(config.run_dir / "checkpoints", config.checkpoint.keep_last, env.is_main)
        resume_from = checkpointer.find_resume(config.checkpoint.resume)
        saved = read_meta(resume_from) if resume_from is not None else None
        # Both checks come before anything is written: a refusal changes nothing.
        precision, why, precision_change = resumed_precision(config, env.device, saved)
        changes = recipe_history(config, resume_from, saved, precision_change)
        log.info("precision: %s (%s)", precision, why)
        estimate = check_gpu_memory(config, layout, precision, env)
        if env.is_main:
            write_run_files(config, env, {"name": precision, "why": why}, saved.step if saved else 0)
        tokenizer = load_tokenizer(config.data.tokenizer)
        check_tokenizer(tokenizer, config.model.vocab_size)
        model, optimizer = build_model(config, env, precision)
        log_shapes(config, layout, env)
        lanes = dict(global_rows=layout.global_rows, rank=env.rank, world_size=env.world_size)
        data = PackedBatches(config.data, tokenizer, seed=config.train.seed, **lanes)
        val_batches = validation_batches(
            config.data,
            tokenizer,
            n_batches=config.train.eval_batches,
            rows=layout.global_rows,
            rank=env.rank,
            world_size=env.world_size,
        )
        logger = MetricsLogger(
            config.run_dir,
            env.is_main,
            config.train.steps,
            config.logging.tensorboard,
            config.logging.progress,
        )
        run = cls(
            config,
            env,
            layout,
            model,
            optimizer,
            data,
            val_batches,
            checkpointer,
            logger,
            precision=precision,
            scaler=loss_scaler(precision, env.device, config.parallel.initial_loss_scale),
            memory_estimate=estimate,
            recipe_changes=changes,
        )
        if resume_from is not None:
            run.resume(resume_from)
        elif config.train.init_from:
            run.initialise_from(config.train.init_from)
        return run

    def resume(self, checkpoint) -> None:
        meta = self.checkpointer.load(checkpoint, self.model, self.optimizer)
        self.progress = Progress(
            step=meta.step,
            tokens_seen=meta.tokens_seen,
            bad_steps=meta.bad_steps,
            overflow_steps=meta.overflow_steps,
            loss=meta.final_loss,
            val_loss=meta.val_loss,
        )
        self.data.load_state_dict(merge_states(meta.data_lanes))
        if self.scaler is not None and meta.loss_scaler is not None:  # the same scale, and its growth count
            self.scaler.load_state_dict(meta.loss_scaler)
        if self.config.train.time_budget_s is not None:  # the schedule planned before stays the schedule
            self.budget_plan, self.planned_steps = meta.budget_plan, meta.planned_steps
        log.info("resumed from %s at step %d (%d tokens seen)", checkpoint, meta.step, meta.tokens_seen)

    def initialise_from(self, checkpoint: str) -> None:
        meta = load_model_weights(checkpoint, self.model)
        if self.config.train.init_data_stream == "continue":
            self.data.load_state_dict(merge_states(meta.data_lanes))
        log.info(
            "initialised weights from %s (data stream: %s)", checkpoint, self.config.train.init_data_stream
        )

    def step(self, batch, lr_scale: float) -> StepResult:
        """One optimizer step; counts it, an fp16 overflow (skipped, the scale lowered), and a non-finite step
        (skipped) against train.max_bad_steps."""
        result = train_step(
            self.model,
            self.optimizer,
            batch,
            self.layout,
            lr_scale,
            self.config.optim.grad_clip,
            self.config.train.loss_chunk_tokens,
            self.env.device,
            self.scaler,
        )
        self.progress.step += 1
        self.progress.tokens_seen += self.layout.tokens_per_step
        if result.overflow:
            self.progress.overflow_steps += 1
            self.check_loss_scale()
        elif not (math.isfinite(result.loss) and math.isfinite(result.grad_norm)):
            self.count_bad_step(result)
        return result

    def check_loss_scale(self) -> None:
        scale, floor = self.scaler.get_scale(), self.config.parallel.min_loss_scale
        log.info(
            "step %d: fp16 gradients overflowed; update skipped, loss scale now %g (%d overflow steps)",
            self.progress.step,
            scale,
            self.progress.overflow_steps,
        )
        if scale < floor:
            raise NonFiniteError(
                f"step {self.progress.step}: the fp16 loss scale fell to {scale:g}, below "
                "parallel.min_loss_scale="
                f"{floor:g}: the gradients overflow even unscaled ({self.progress.overflow_steps} overflow "
                "steps). "
                "Lower optim.lr, use --parallel.mixed_precision=fp32 (or bf16 on a GPU that has it), or "
                "resume "
                "from an earlier checkpoint"
            )

    def count_bad_step(self, result: StepResult) -> None:
        step, train = self.progress.step, self.config.train
        self.progress.bad_steps += 1
        log.warning(
            "step %d: non-finite loss %s or grad norm %s; update skipped", step, result.loss, result.grad_norm
        )
        if self.progress.bad_steps > train.max_bad_steps:
            raise NonFiniteError(
                f"step {step}: non-finite loss or gradient norm (loss={result.loss}, "
                f"grad_norm={result.grad_norm}); "
                f"{self.progress.bad_steps} bad steps > train.max_bad_steps={train.max_bad_steps}. Lower "
                "optim.lr, "
                "raise optim.warmup_steps, or resume from an earlier checkpoint"
            )

    def validate(self, warm_up: bool = False) -> None:
        """The validation loss, logged. warm_up: one batch, not logged (a compiled model compiles its
        evaluation graphs there, before the time budget times an evaluation)."""
        batches = self.val_batches[:1] if warm_up else self.val_batches
        loss = validation_loss(
            self.model,
            batches,
            self.layout.micro_batch_size,
            self.config.train.loss_chunk_tokens,
            self.env.device,
        )
        if not warm_up:
            self.progress.val_loss = loss
            self.logger.log(
                {
                    "kind": "val",
                    "step": self.progress.step,
                    "tokens_seen": self.progress.tokens_seen,
                    "val_loss": loss,
                }
            )

    def save(self) -> None:
        progress = self.progress
        meta = CheckpointMeta(
            step=progress.step,
            tokens_seen=progress.tokens_seen,
            config=to_dict(self.config),
            bad_steps=progress.bad_steps,
            overflow_steps=progress.overflow_steps,
            final_loss=progress.loss,
            val_loss=progress.val_loss,
            budget_plan=self.budget_plan,
            planned_steps=self.planned_steps,
            recipe_changes=self.recipe_changes,
            loss_scaler=self.scaler.state_dict() if self.scaler is not None else None,
            precision=self.precision,
        )
        self.checkpointer.save(self.model, self.optimizer, self.data.state_dict(), meta)

    def log_train(
        self,
        result: StepResult,
        lr_scale: float,
        throughput: Throughput,
        data_wait: DataWait,
        peak: float | None,
        flops: float,
        start_step: int,
    ) -> dict:
        tokens_per_s, elapsed = throughput.take()
        self.progress.loss = result.loss
        optim = self.config.optim
        record = {
            "kind": "train",
            "step": self.progress.step,
            "tokens_seen": self.progress.tokens_seen,
            "loss": result.loss,
            "grad_norm": result.grad_norm,
            "lr": optim.lr * lr_scale,
            "tokens_in_batch": self.layout.tokens_per_step,
            "tokens_per_s": tokens_per_s,
            "epoch": self.data.epoch,
            "mfu": flops * tokens_per_s / (peak * self.env.world_size) if peak else None,
            "memory_gib": memory_gib(self.env.device),
            "time_s": time.perf_counter() - self.logger.start,
            **data_wait.take(elapsed),
        }
        if optim.name == "muon":
            record["muon_lr"] = optim.muon_lr * lr_scale
        if self.scaler is not None:
            record.update(loss_scale=self.scaler.get_scale(), overflow_steps=self.progress.overflow_steps)
        self.logger.log(record, start_step)
        return record

    def record_plan(self, plan: dict, boundary: StepBoundary) -> None:
        """The time budget's plan: logged, and written into the checkpoint just saved at this step (which was
        timed before the plan existed), so that a run stopped here resumes with it."""
        self.budget_plan, self.planned_steps = plan, boundary.total_steps
        self.logger.total_steps = boundary.total_steps
        self.logger.log({"kind": "plan", "step": self.progress.step, **plan})
        self.checkpointer.update_meta(self.progress.step, budget_plan=plan, planned_steps=self.planned_steps)
        log.info(
            "time budget %.0f s: %d steps planned (a step %.3f s, an evaluation %.1f s, a checkpoint %.1f s, "
            "%.0f s used so far)",
            plan["budget_s"],
            self.planned_steps,
            plan["step_s"],
            plan["eval_s"],
            plan["checkpoint_s"],
            plan["age_s"],
        )

    def log_started(self) -> None:
        """After the first step: how long start-up, data and compile took, and the peak memory beside its
        estimate (memory.py), so the estimate can be checked on every card."""
        record = {"kind": "started", "step": self.progress.step, "age_s": process_age_s()}
        if self.memory_estimate is not None:
            record.update(
                memory_gib=memory_gib(self.env.device),
                memory_estimate_gib=self.memory_estimate.allocated / GIB,
            )
            log.info(  # the allocator's peak against the estimate's allocated part, which it can exceed
                "peak memory after the first step: %.2f GiB allocated, estimate %s",
                record["memory_gib"],
                self.memory_estimate.describe(),
            )
        self.logger.log(record)

    def close(self) -> None:
        self.data.close()
        self.logger.close()


def check_gpu_memory(
    config: Config, layout: BatchLayout, precision: str, env: DistEnv
) -> MemoryEstimate | None:
    """On a GPU, the step's estimated peak memory; a step that will not fit the card stops here in one
    line."""
    if env.device.type != "cuda":
        return None
    capacity = torch.cuda.get_device_properties(env.device).total_memory
    estimate = check_memory_fits(
        config.model,
        capacity,
        micro_batch=layout.micro_batch_size,
        rows_per_rank=layout.rows_per_rank,
        checkpointing=config.parallel.activation_checkpointing,
        precision=precision,
        optimizer=config.optim.name,
        seq_len=layout.seq_len,
        world_size=env.world_size,
        loss_chunk_tokens=config.train.loss_chunk_tokens,
    )
    log.info("memory estimate per GPU: %s of %.1f GiB", estimate.describe(), capacity / GIB)
    return estimate


def write_run_files(config: Config, env: DistEnv, precision: dict, start_step: int) -> None:
    """config.yaml, and environment.json: one record per start of the run (a resume on other hardware or
    software adds its own), oldest first."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, config.run_dir / "config.yaml")
    path = config.run_dir / "environment.json"
    starts = read_environment(config.run_dir) if start_step else []
    record = {**environment_record(env.device, env.world_size), "precision": precision, "step": start_step}
    path.write_text(json.dumps(starts + [record], indent=1))


def resumed_precision(
    config: Config, device: torch.device, saved: CheckpointMeta | None, capability=None
) -> tuple[str, str, dict | None]:
    """(precision, why, change): what the run computes in. `auto` is decided once, when the run starts, and
    kept on resume (a checkpoint records it), so a run does not switch between bf16 and fp16 (with a fresh
    loss scale) because it resumed on another card. A resume in another precision, set explicitly or
    because the device cannot compute the recorded one (bf16 below compute capability 8.0), is a recipe
    change: refused, unless parallel.mixed_precision is in checkpoint.allow_changes; then `change` is
    {"key", "old", "new"} for the recipe history. capability: as in devices.auto_precision."""
    setting = config.parallel.mixed_precision
    wanted, why = training_precision(config.parallel, device, capability)
    recorded = saved.precision if saved is not None else None
    if saved is not None and recorded is None:  # a checkpoint older than format 3: its setting, if explicit
        recorded = from_dict(saved.config).parallel.mixed_precision
        recorded = None if recorded == "auto" else recorded
    if recorded is None or recorded == wanted:
        return wanted, why, None
    if setting == "auto" and computes(recorded, device, capability):
        return recorded, "auto, decided when the run started and kept by the resume", None
    change = {"key": "parallel.mixed_precision", "old": recorded, "new": wanted}
    if change["key"] in config.checkpoint.allow_changes:
        log.warning("resuming in %s, not in the checkpoint's %s, on purpose (%s)", wanted, recorded, why)
        return wanted, f"{why}; changed from {recorded} on purpose at the resume", change
    cannot = "" if computes(recorded, device, capability) else f", which this device cannot compute ({why})"
    raise ConfigError(
        f"the checkpoint at step {saved.step} was trained in {recorded}{cannot}; parallel.mixed_precision="
        f"{setting} means {wanted} here. Resume in {recorded} on a device that computes it, or go on in "
        f"{wanted} on purpose: --checkpoint.allow_changes=[parallel.mixed_precision] (recorded in the "
        "checkpoints' recipe history)"
    )


def recipe_history(
    config: Config, checkpoint, saved: CheckpointMeta | None, precision_change: dict | None
) -> list[dict]:
    """Resuming with a changed recipe would leave weights that config.yaml no longer describes: stop, unless
    every changed key is in checkpoint.allow_changes. Returns every change on purpose so far, for the
    record. The precision is compared as computed (resumed_precision), not as the setting's text: `auto`
    may mean bf16 on one card and fp16 on another, and `bf16` -> `auto` on the same card is no change."""
    if saved is None:
        return []
    changes = [
        change
        for change in recipe_changes(from_dict(saved.config), config)
        if change["key"] != "parallel.mixed_precision"
    ] + ([precision_change] if precision_change else [])
    refused = [change for change in changes if change["key"] not in config.checkpoint.allow_changes]
    if refused:
        listed = "; ".join(f"{c['key']}: {c['old']!r} -> {c['new']!r}" for c in refused)
        keys = ",".join(c["key"] for c in refused)
        raise ConfigError(
            f"{checkpoint} was trained with another recipe ({listed}); start a new run with "
            f"--train.name=NEW_NAME, or resume with the change on purpose: "
            f"--checkpoint.allow_changes=[{keys}]"
        )
    for change in changes:
        log.warning(
            "resuming with %s changed on purpose: %r -> %r", change["key"], change["old"], change["new"]
        )
    return saved.recipe_changes + [{**change, "step": saved.step} for change in changes]


def build_model(config: Config, env: DistEnv, precision: str):
    """The model from its seed (full weights on every rank, then sharded), and its optimizer."""
    torch.manual_seed(config.train.seed)
    model = Transformer(config.model)
    model.init_weights(seed=config.train.seed)
    model = parallelize(model, config.parallel, env, precision)
    return model, build_optimizer(model, config.optim, env.device, precision)


def log_shapes(config: Config, layout: BatchLayout, env: DistEnv) -> None:
    counts = count_parameters(config.model)
    log.info(
        "parameters: %s non-embedding, %s total; %.3g FLOPs/token; %d x %d tokens per step "
        "(%d ranks x %d micro-batches of %d); optimizer %s, %s schedule",
        f"{counts['non_embedding']:,}",
        f"{counts['total']:,}",
        flops_per_token(config.model, layout.seq_len),
        layout.global_rows,
        layout.seq_len,
        env.world_size,
        layout.accumulation_steps,
        layout.micro_batch_size,
        config.optim.name,
        config.optim.schedule,
    )
    if layout.micro_batch_size < min(config.train.micro_batch_size, layout.rows_per_rank):
        log.info(
            "micro-batch %d (the largest up to train.micro_batch_size=%d that divides the %d rows per rank)",
            layout.micro_batch_size,
            config.train.micro_batch_size,
            layout.rows_per_rank,
        )


def between_steps(run: Run, boundary: StepBoundary, clock: TrainingClock, todo: Todo) -> None:
    """Carry out what the boundary decided for this step (validate, save, plan), its stop apart."""
    if todo.plan:  # the budget's measurement ends: a warm evaluation and a checkpoint, timed, then the plan
        eval_s, checkpoint_s = measure_pauses(run.validate, run.save, clock.wall)
        run.record_plan(boundary.plan(run.progress.step, eval_s, checkpoint_s, run.env.is_main), boundary)
        return
    if todo.validate:
        run.validate()
    if todo.save:
        run.save()


def stop_early(run: Run, reason: str, total_steps: int) -> None:
    step = run.progress.step
    run.logger.log({"kind": "stop", "step": step, "reason": reason})
    log.info(stop_message(reason, step, total_steps))
    if run.env.is_main:
        write_stop_record(run.config.run_dir, step, reason)


def training_loop(run: Run, stop: StopRequest) -> dict:
    """Step, log, then the boundary's decision, until the last step or a stop. Returns the last train
    record."""
    config, clock = run.config, TrainingClock(run.env.device)
    boundary = StepBoundary(
        config.train,
        config.checkpoint.every,
        run.progress.step,
        run.budget_plan,
        stop.reason,
        clock.now,
        share=broadcast_object,
        save_first_step=config.checkpoint.first_step,
    )
    run.logger.total_steps = boundary.total_steps
    run.planned_steps = boundary.total_steps if run.budget_plan else None
    timeouts, throughput, data_wait = CollectiveTimeouts(config.parallel), Throughput(clock), DataWait()
    peak, flops = (
        peak_flops(run.env.device, config.logging.peak_tflops, run.precision),
        flops_per_token(config.model, run.layout.seq_len),
    )
    start_step, last = run.progress.step, {}
    while run.progress.step < boundary.total_steps:
        step = run.progress.step + 1
        planned_at = run.budget_plan["measured_at_step"] if run.budget_plan else None
        lr_scale = lr_factor(
            step - 1, config.optim, boundary.total_steps, planned_at, total_before_plan=config.train.steps
        )
        with step_guard(step, run.layout, timeouts):
            result = run.step(data_wait.next(run.data), lr_scale)
        throughput.add(run.layout.tokens_per_step)
        if step == start_step + 1:  # loading and compile are behind: a long wait now means a hung rank
            timeouts.first_step_done()
            run.log_started()

        # once in a while: the metrics line
        if step % config.train.log_every == 0 or step == boundary.total_steps:
            last = run.log_train(result, lr_scale, throughput, data_wait, peak, flops, start_step)

        # between steps (not training time): validate, save, plan the time budget, stop
        with clock.pause(), step_guard(step, run.layout, timeouts):
            todo = boundary.after(step)
            between_steps(run, boundary, clock, todo)
        if todo.stop:
            stop_early(run, todo.stop, boundary.total_steps)
            break
    return {**last, "val_loss": run.progress.val_loss}


def setup_logging(env: DistEnv) -> None:
    logging.basicConfig(
        level=logging.INFO if env.is_main else logging.WARNING,
        format=f"%(asctime)s [rank {env.rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def train(config: Config) -> dict:
    """Run (or resume) training; returns the last train record with the last validation loss."""
    env = init_distributed(config.parallel, config.train.device, trace_dir=str(config.run_dir))
    setup_logging(env)
    run = stop = None
    try:
        run = Run.start(config, env)
        stop = StopRequest.install(config.train, env)
        if env.is_main:
            clear_stop_record(config.run_dir)
        return training_loop(run, stop)
    finally:
        if stop is not None:
            stop.close()
        if run is not None:
            run.close()
        shutdown_distributed()


def main(argv: list[str] | None = None) -> None:
    _, config = parse_cli("train", "Train a LLaMA model (single process, or under torchrun).", argv)
    with user_errors(
        "train",
        ConfigError,
        CheckpointError,
        NonFiniteError,
        BudgetError,
        CollectiveTimeout,
        FileNotFoundError,
        ValueError,
    ):
        train(config)


if __name__ == "__main__":
    main()
