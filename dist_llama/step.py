"""One optimizer step and one validation pass over a rank's rows: how the global batch splits over ranks and
micro-batches (BatchLayout), what a step needs (TrainingStep: the model, its optimizer and the numeric
settings), and the one-line errors around a step (step_guard)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dist_llama.config import Config, ConfigError, TrainConfig
from dist_llama.optim import OptimizerGroup, set_learning_rates
from dist_llama.parallel import CollectiveTimeouts, ShardedGradScaler, all_reduce_sum, set_gradient_sync


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

    @property
    def tokens_per_rank(self) -> int:
        return self.rows_per_rank * self.seq_len

    @classmethod
    def of(cls, train: TrainConfig, seq_len: int, world_size: int) -> BatchLayout:
        """train.micro_batch_size is a memory limit, not part of the recipe: the layout uses the largest
        micro-batch up to it that divides the rank's rows. Only a global batch that does not split evenly
        over the ranks is an error, since it would change the recipe."""
        global_rows = train.tokens_per_step // seq_len
        if global_rows % world_size:
            raise ConfigError(
                f"train.tokens_per_step={train.tokens_per_step} is {global_rows} sequences of data.seq_len="
                f"{seq_len}, which do not divide over world_size={world_size} ranks; make tokens_per_step a "
                f"multiple of {world_size * seq_len} or use a world size that divides {global_rows}"
            )
        rows_per_rank = global_rows // world_size
        micro = max(
            d for d in range(1, min(train.micro_batch_size, rows_per_rank) + 1) if rows_per_rank % d == 0
        )
        return cls(global_rows, rows_per_rank, micro, seq_len)

    def out_of_memory_hint(self) -> str:
        return (
            f"out of GPU memory with micro-batches of {self.micro_batch_size} at seq_len {self.seq_len}: "
            "lower --train.micro_batch_size (gradient accumulation keeps the global batch) or set "
            "--parallel.activation_checkpointing=full"
        )


class StepResult(NamedTuple):
    loss: float  # mean over the global batch
    grad_norm: float  # before clipping (and after unscaling)
    overflow: bool = False  # fp16: the scaled gradients overflowed; the update was skipped, the scale halved


@dataclass
class TrainingStep:
    """What one optimizer step needs: the (sharded) model, its optimizer, the batch layout, and the numeric
    settings. `step(batch, lr_scale)` runs one; `validation_loss(batches)` measures without gradients."""

    model: torch.nn.Module
    optimizer: OptimizerGroup
    layout: BatchLayout
    device: torch.device
    grad_clip: float | None = None  # 0 or None: no clipping
    loss_chunk_tokens: int = 0  # 0: the whole micro-batch's logits at once
    scaler: ShardedGradScaler | None = None  # fp16's loss scaler
    reduce_grads: str = "every_micro"  # parallel.reduce_grads: when the micro-batches' gradients are reduced

    @classmethod
    def of(cls, config: Config, model, optimizer, layout: BatchLayout, device, scaler) -> TrainingStep:
        return cls(
            model,
            optimizer,
            layout,
            device,
            config.optim.grad_clip,
            config.train.loss_chunk_tokens,
            scaler,
            config.parallel.reduce_grads,
        )

    def step(self, batch, lr_scale: float) -> StepResult:
        """One optimizer step over this rank's rows. A step whose loss or gradient norm is not finite is not
        applied; with fp16's loss scaler that is an overflow, and the scale is lowered."""
        inputs, labels = (t.to(self.device, non_blocking=True) for t in batch)
        micro = self.layout.micro_batch_size
        loss_sum = torch.zeros((), device=self.device)
        starts = range(0, self.layout.rows_per_rank, micro)
        for start in starts:
            # HSDP's all-reduce across replicas (and with last_micro the reduce-scatter) on the last one only
            set_gradient_sync(self.model, self.reduce_grads, last_micro_batch=start == starts[-1])
            loss_sum += self.forward_backward(inputs[start : start + micro], labels[start : start + micro])
        if self.scaler is not None:  # clipping and the logged norm see the true gradients
            for each in self.optimizer:
                self.scaler.unscale_(each)
        # An infinite limit still measures the norm and scales by exactly 1.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        loss = all_reduce_sum(loss_sum).item() / self.layout.tokens_per_step
        grad_norm = grad_norm.item()
        if math.isfinite(loss) and math.isfinite(grad_norm):  # the norm covers every rank's gradients
            set_learning_rates(self.optimizer, lr_scale)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, self.update_loss_scale())

    def forward_backward(self, inputs, labels) -> torch.Tensor:
        """Backward of this micro-batch's summed loss over the rank's tokens (times the fp16 loss scale, if
        any); FSDP's gradient average over ranks then gives the mean over every token of the global batch.
        Returns the summed loss."""
        loss_sum = self.model(inputs, labels=labels, loss_chunk_tokens=self.loss_chunk_tokens)
        loss = loss_sum / self.layout.tokens_per_rank
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss_sum.detach()

    def update_loss_scale(self) -> bool:
        """fp16: lowered after an overflow (which unscale_ recorded), raised after a long calm. Returns
        whether this step overflowed."""
        if self.scaler is None:
            return False
        scale = self.scaler.get_scale()
        self.scaler.update()
        return self.scaler.get_scale() < scale

    @torch.no_grad()
    def validation_loss(self, batches) -> float:
        """Mean loss per token over the validation batches, every rank's rows together."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device)
        micro = self.layout.micro_batch_size
        for inputs, labels in batches:
            for start in range(0, inputs.shape[0], micro):
                rows = slice(start, start + micro)
                loss_sum += self.model(
                    inputs[rows].to(self.device),
                    labels=labels[rows].to(self.device),
                    loss_chunk_tokens=self.loss_chunk_tokens,
                )
                tokens += labels[rows].numel()
        self.model.train()
        return (all_reduce_sum(loss_sum) / all_reduce_sum(tokens)).item()


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
