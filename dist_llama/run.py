"""What a training run is made of, and what it does between the loop's lines (train.py).

`Run.start` builds a run, or resumes it from its latest checkpoint: the model and optimizer (TrainingStep:
one optimizer step), the data lanes and validation batches, the checkpointer, the metrics logger and the step
boundary (boundary.py: the step count and what to do between steps). The run then steps (`Run.step`, which
also counts overflow and non-finite steps against their limits), validates, saves, plans its time budget
and stops early, writing each record through metrics.py.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import torch

from dist_llama.boundary import BudgetPlan, StepBoundary, Todo
from dist_llama.checkpoint import Checkpointer, CheckpointMeta, load_model_weights, read_meta
from dist_llama.config import Config, save_config, to_dict
from dist_llama.data import PackedBatches, merge_states, validation_batches
from dist_llama.memory import GIB, MemoryEstimate, StepShape, check_memory_fits
from dist_llama.metrics import (
    MetricsLogger,
    StepMeter,
    TrainingClock,
    environment_record,
    peak_flops,
    plan_record,
    process_age_s,
    read_environment,
    started_record,
    stop_record,
    train_record,
    val_record,
)
from dist_llama.model import Transformer, count_parameters, flops_per_token
from dist_llama.optim import build_optimizer, lr_factor
from dist_llama.parallel import DistEnv, broadcast_object, loss_scaler, parallelize
from dist_llama.resume import recipe_history, resumed_precision
from dist_llama.step import BatchLayout, StepResult, TrainingStep
from dist_llama.stopping import StopRequest, stop_message, write_stop_record
from dist_llama.tokenizer import check_tokenizer, load_tokenizer

log = logging.getLogger("dist_llama.train")


class NonFiniteError(RuntimeError):
    """Loss or gradient norm became NaN/inf more often than train.max_bad_steps allows."""


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
    stepper: TrainingStep
    data: PackedBatches
    val_batches: list
    checkpointer: Checkpointer
    logger: MetricsLogger
    clock: TrainingClock
    precision: str = "fp32"  # what the model computes in (parallel.mixed_precision, auto resolved)
    memory_estimate: MemoryEstimate | None = None  # on a GPU: the step's estimated peak
    progress: Progress = field(default_factory=Progress)
    recipe_changes: list[dict] = field(default_factory=list)  # keys changed on purpose at a resume, in order
    boundary: StepBoundary | None = None  # made once the run knows the step it starts from

    @classmethod
    def start(cls, config: Config, env: DistEnv, stop: StopRequest) -> Run:
        layout = BatchLayout.of(config.train, config.data.seq_len, env.world_size)
        checkpointer = Checkpointer.of(config, env.is_main)
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
        lanes = dict(rank=env.rank, world_size=env.world_size)
        run = cls(
            config,
            env,
            layout,
            TrainingStep.of(
                config,
                model,
                optimizer,
                layout,
                env.device,
                loss_scaler(precision, env.device, config.parallel.initial_loss_scale),
            ),
            PackedBatches(
                config.data, tokenizer, seed=config.train.seed, global_rows=layout.global_rows, **lanes
            ),
            validation_batches(
                config.data, tokenizer, n_batches=config.train.eval_batches, rows=layout.global_rows, **lanes
            ),
            checkpointer,
            MetricsLogger(config.run_dir, env.is_main, config.logging.tensorboard, config.logging.progress),
            TrainingClock(env.device),
            precision=precision,
            memory_estimate=estimate,
            recipe_changes=changes,
        )
        saved_plan = run.resume(resume_from) if resume_from is not None else None
        if resume_from is None and config.train.init_from:
            run.initialise_from(config.train.init_from)
        run.boundary = StepBoundary(
            config.train,
            config.checkpoint.every,
            run.progress.step,
            saved_plan,
            stop.reason,
            run.clock.now,
            share=broadcast_object,
            save_first_step=config.checkpoint.first_step,
        )
        return run

    def resume(self, checkpoint) -> BudgetPlan | None:
        """Model, optimizer, data lanes, progress and loss scale from the checkpoint; returns the time
        budget's plan it kept (the schedule planned before stays the schedule), if the run has a budget."""
        meta = self.checkpointer.load(checkpoint, self.stepper.model, self.stepper.optimizer)
        self.progress = Progress(
            step=meta.step,
            tokens_seen=meta.tokens_seen,
            bad_steps=meta.bad_steps,
            overflow_steps=meta.overflow_steps,
            loss=meta.final_loss,
            val_loss=meta.val_loss,
        )
        self.data.load_state_dict(merge_states(meta.data_lanes))
        scaler = self.stepper.scaler
        if scaler is not None and meta.loss_scaler is not None:  # the same scale, and its growth count
            scaler.load_state_dict(meta.loss_scaler)
        log.info("resumed from %s at step %d (%d tokens seen)", checkpoint, meta.step, meta.tokens_seen)
        return BudgetPlan.from_dict(meta.budget_plan) if self.config.train.time_budget_s is not None else None

    def initialise_from(self, checkpoint: str) -> None:
        meta = load_model_weights(checkpoint, self.stepper.model)
        if self.config.train.init_data_stream == "continue":
            self.data.load_state_dict(merge_states(meta.data_lanes))
        log.info(
            "initialised weights from %s (data stream: %s)", checkpoint, self.config.train.init_data_stream
        )

    @property
    def total_steps(self) -> int:
        return self.boundary.total_steps

    def lr_scale(self, step: int) -> float:
        """The schedule's factor for 0-based `step`, continuous across the time budget's plan."""
        plan, steps = self.boundary.plan_made, self.config.train.steps
        return lr_factor(
            step,
            self.config.optim,
            self.total_steps,
            plan.measured_at_step if plan else None,
            total_before_plan=plan.steps_before or steps if plan else steps,
        )

    def step(self, batch, lr_scale: float) -> StepResult:
        """One optimizer step; counts it, an fp16 overflow (skipped, the scale lowered), and a non-finite step
        (skipped) against train.max_bad_steps."""
        result = self.stepper.step(batch, lr_scale)
        self.progress.step += 1
        self.progress.tokens_seen += self.layout.tokens_per_step
        if result.overflow:
            self.progress.overflow_steps += 1
            self.check_loss_scale()
        elif not (math.isfinite(result.loss) and math.isfinite(result.grad_norm)):
            self.count_bad_step(result)
        return result

    def check_loss_scale(self) -> None:
        scale, floor = self.stepper.scaler.get_scale(), self.config.parallel.min_loss_scale
        step, overflows = self.progress.step, self.progress.overflow_steps
        log.info(
            "step %d: fp16 gradients overflowed; update skipped, loss scale now %g (%d overflow steps)",
            step,
            scale,
            overflows,
        )
        if scale < floor:
            raise NonFiniteError(
                f"step {step}: the fp16 loss scale fell to {scale:g}, below "
                f"parallel.min_loss_scale={floor:g}: the gradients overflow even unscaled ({overflows} "
                "overflow steps). Lower optim.lr, use --parallel.mixed_precision=fp32 (or bf16 on a GPU "
                "that has it), or resume from an earlier checkpoint"
            )

    def count_bad_step(self, result: StepResult) -> None:
        step, limit = self.progress.step, self.config.train.max_bad_steps
        self.progress.bad_steps += 1
        log.warning(
            "step %d: non-finite loss %s or grad norm %s; update skipped", step, result.loss, result.grad_norm
        )
        if self.progress.bad_steps > limit:
            raise NonFiniteError(
                f"step {step}: non-finite loss or gradient norm (loss={result.loss}, grad_norm="
                f"{result.grad_norm}); {self.progress.bad_steps} bad steps > train.max_bad_steps={limit}. "
                "Lower optim.lr, raise optim.warmup_steps, or resume from an earlier checkpoint"
            )

    def between_steps(self, todo: Todo) -> None:
        """Carry out what the boundary decided after this step (its stop apart): validate and save, or at
        the time budget's plan, time a warm evaluation and a checkpoint and plan from them."""
        if todo.plan:
            self.plan_budget()
            return
        if todo.validate:
            self.validate()
        if todo.save:
            self.save()

    def validate(self, warm_up: bool = False) -> None:
        """The validation loss, logged. warm_up: one batch, not logged (a compiled model compiles its
        evaluation graphs there, before the time budget times an evaluation)."""
        loss = self.stepper.validation_loss(self.val_batches[:1] if warm_up else self.val_batches)
        if not warm_up:
            self.progress.val_loss = loss
            self.logger.log(val_record(self.progress, loss), self.total_steps)

    def save(self) -> None:
        progress, plan, scaler = self.progress, self.boundary.plan_made, self.stepper.scaler
        meta = CheckpointMeta(
            step=progress.step,
            tokens_seen=progress.tokens_seen,
            config=to_dict(self.config),
            bad_steps=progress.bad_steps,
            overflow_steps=progress.overflow_steps,
            final_loss=progress.loss,
            val_loss=progress.val_loss,
            budget_plan=plan.to_dict() if plan else None,
            planned_steps=self.total_steps if plan else None,
            recipe_changes=self.recipe_changes,
            loss_scaler=scaler.state_dict() if scaler is not None else None,
            precision=self.precision,
        )
        self.checkpointer.save(self.stepper.model, self.stepper.optimizer, self.data.state_dict(), meta)

    def plan_budget(self) -> None:
        """The time budget's measurement ends: one evaluation (warm: a compiled model compiles its evaluation
        graphs in an untimed pass first; timed cold, the first evaluation cost 28x a warm one, and that cost
        charged to every planned evaluation left over a quarter of the budget unused) and one checkpoint are
        timed, and the plan made from them. A checkpoint costs the loop the time save() holds it (with
        checkpoint.async_save only the copy out of the model's memory), and the run's end waits for the last
        one's whole write: this one is waited for here to time that too. The checkpoint was saved before the
        plan existed: its meta.json then records the plan too, so a run stopped here resumes with it."""
        self.checkpointer.wait()  # a write still in flight (checkpoint.first_step's) would slow what is timed
        self.validate(warm_up=True)
        start = self.clock.wall()
        self.validate()
        middle = self.clock.wall()
        self.save()
        stalled = self.clock.wall()
        self.checkpointer.wait()
        eval_s, checkpoint_s, write_s = middle - start, stalled - middle, self.clock.wall() - middle
        step = self.progress.step
        plan = self.boundary.plan(step, eval_s, checkpoint_s, process_age_s(), self.env.is_main, write_s)
        self.logger.log(plan_record(step, plan), self.total_steps)
        self.checkpointer.update_meta(step, budget_plan=plan.to_dict(), planned_steps=self.total_steps)
        log.info(
            "time budget %.0f s: %d steps planned (a step %.3f s, an evaluation %.1f s, a checkpoint %.1f s "
            "of the loop's time and %.1f s written, %.0f s used so far)",
            plan.budget_s,
            self.total_steps,
            plan.step_s,
            plan.eval_s,
            plan.checkpoint_s,
            plan.write_s,
            plan.age_s,
        )

    def meter(self) -> StepMeter:
        """The speed of this run's steps (tokens/s, MFU against the card's peak, waiting for data)."""
        peak = peak_flops(self.env.device, self.config.logging.peak_tflops, self.precision)
        flops = flops_per_token(self.config.model, self.layout.seq_len)
        return StepMeter(self.clock, peak, flops, self.env.world_size)

    def log_train(self, result: StepResult, lr_scale: float, speed: dict, start_step: int) -> dict:
        self.progress.loss = result.loss
        record = train_record(self, result, lr_scale, speed)
        self.logger.log(record, self.total_steps, start_step)
        return record

    def log_started(self) -> None:
        """After the first step: start-up time, and the allocator's peak beside the memory estimate's
        allocated part (memory.py), so the estimate can be checked on every card."""
        record = started_record(self.progress.step, self.env.device, self.memory_estimate)
        if self.memory_estimate is not None:
            log.info(
                "peak memory after the first step: %.2f GiB allocated, estimate %s",
                record["memory_gib"],
                self.memory_estimate.describe(),
            )
        self.logger.log(record, self.total_steps)

    def stop_early(self, reason: str) -> None:
        self.checkpointer.wait()  # the stop's checkpoint is complete before the run says so
        step = self.progress.step
        self.logger.log(stop_record(step, reason), self.total_steps)
        log.info(stop_message(reason, step, self.total_steps))
        if self.env.is_main:
            write_stop_record(self.config.run_dir, step, reason)

    def close(self) -> None:
        self.checkpointer.close()
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
        StepShape.of(config, layout, precision, env.world_size, env.replicate), capacity
    )
    log.info("memory estimate per GPU: %s of %.1f GiB", estimate.describe(), capacity / GIB)
    return estimate


def write_run_files(config: Config, env: DistEnv, precision: dict, start_step: int) -> None:
    """config.yaml, and environment.json: one record per start of the run (a resume on other hardware or
    software adds its own), oldest first."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, config.run_dir / "config.yaml")
    starts = read_environment(config.run_dir) if start_step else []
    mesh = {"replicate": env.replicate, "shard": env.shard, "why": env.mesh_why}
    record = {
        **environment_record(env.device, env.world_size),
        "mesh": mesh,
        "precision": precision,
        "step": start_step,
    }
    (config.run_dir / "environment.json").write_text(json.dumps(starts + [record], indent=1))


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
