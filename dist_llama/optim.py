"""Optimizers and learning-rate schedules: AdamW, or Muon for the hidden matrices with AdamW for the rest.

Muon (Jordan et al. 2024; `torch.optim.Muon`) orthogonalizes each matrix's momentum with a Newton-Schulz
iteration, which is a function of the WHOLE matrix. Under FSDP2 every parameter is a DTensor holding one
row block per rank, and `torch.optim.Muon` applied to it would orthogonalize each rank's block on its own:
a different optimizer at every world size. `ShardedMuon` keeps torch's algorithm and state (momentum
sharded like the parameter, so DCP saves and reshards it like AdamW's moments) and gathers the full
momentum-corrected gradient before Newton-Schulz. Every rank then orthogonalizes the same full matrix and
keeps its own rows: the update is the unsharded one, at the cost of one all-gather per matrix and
Newton-Schulz repeated on every rank (small next to the forward and backward at these sizes).

Newton-Schulz computes in the training precision (`newton_schulz_dtype`): torch's Muon always casts to bf16,
which a GPU without native bf16 (T4, V100, P100: where `auto` trains in fp16) refuses or emulates.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from dist_llama.config import ConfigError, OptimConfig
from dist_llama.devices import DTYPES, dtype_name

try:  # torch >= 2.9; the learning-rate rule stays torch's own, so Muon's update is torch.optim.Muon's
    from torch.optim._muon import _adjust_lr
except ImportError:  # pragma: no cover - depends on the installed torch
    _adjust_lr = None

log = logging.getLogger(__name__)


def lr_factor(
    step: int,
    optim: OptimConfig,
    total_steps: int,
    planned_at: int | None = None,
    total_before_plan: int | None = None,
) -> float:
    """The schedule as a multiple of the peak learning rate at 0-based `step` of `total_steps`.

    Linear warmup over warmup_steps, then
    - cosine: a half cosine from 1 down to min_lr_ratio;
    - wsd (warmup-stable-decay, Hägele et al. 2024, arXiv 2405.18392): 1 until the last decay_fraction of
      the steps, then down to min_lr_ratio, linearly or as 1 - sqrt.
    The warmup takes at most half the steps, so a run shorter than twice optim.warmup_steps (a time budget's
    short plan) still decays; the last step (total_steps - 1) gets exactly min_lr_ratio. The factor depends
    on total_steps only through where the warmup ends and the decay sits: raising train.steps on resume moves
    the WSD decay to the new end, so a run resumed from a checkpoint taken in the stable phase continues as
    if it had been planned longer; steps already decayed are not undone.

    A time budget's plan (made after `planned_at` steps, which ran on the schedule of `total_before_plan`
    steps; total_steps is then the planned count) changes the schedule without a jump: from the factor its
    last step before the plan ran at, the rate rises by at most one planned warmup increment (1 / the
    planned warmup) a step until it meets the planned schedule, and a decay does not start before the plan.
    Without a plan the schedule is the unplanned one, bit for bit.
    """
    if planned_at is None:
        return _scheduled(step, optim, total_steps, decay_from=0)
    if step < planned_at:
        return _scheduled(step, optim, total_before_plan, decay_from=0)
    planned = _scheduled(step, optim, total_steps, decay_from=planned_at)
    warmup = min(optim.warmup_steps, total_steps // 2)
    if step >= total_steps - 1 or warmup == 0:
        return planned
    reached = _scheduled(planned_at - 1, optim, total_before_plan, decay_from=0) if planned_at else 0.0
    return min(planned, reached + (step - planned_at + 1) / warmup)


def _scheduled(step: int, optim: OptimConfig, total_steps: int, decay_from: int) -> float:
    """lr_factor's schedule for a run of total_steps whose decay starts at step `decay_from` or later."""
    last = total_steps - 1
    if step >= last:
        return optim.min_lr_ratio
    warmup = min(optim.warmup_steps, total_steps // 2)
    if step < warmup:
        return (step + 1) / warmup
    decay_start = max(warmup, decay_from)
    if optim.schedule == "wsd":
        decay_start = max(decay_start, total_steps - round(optim.decay_fraction * total_steps))
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, last - decay_start)
    if optim.schedule == "wsd":
        remaining = 1.0 - progress if optim.decay_shape == "linear" else 1.0 - math.sqrt(progress)
    else:
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * remaining


def set_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group runs at its own peak rate (`peak_lr`) times the schedule's factor."""
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor


def is_hidden_matrix(name: str, param: torch.nn.Parameter) -> bool:
    """The 2-D weights inside the blocks (attention and MLP projections): what Muon is for. Embeddings and
    the output head are lookups / a classifier over tokens rather than hidden maps, and stay with AdamW."""
    return param.dim() == 2 and ".layers." in f".{name}"


def build_optimizer(
    model: torch.nn.Module, optim: OptimConfig, device: torch.device, precision: str
) -> OptimizerGroup:
    """AdamW over every parameter, or (optim.name=muon) Muon at optim.muon_lr for the hidden matrices and
    AdamW at optim.lr for embeddings, head and norm gains. Weight decay applies to matrices only: norm
    gains are scales, and decaying them toward 0 fights the normalisation. `precision` is the training
    precision (parallel.training_precision's), which Muon's Newton-Schulz computes in."""
    named = list(model.named_parameters())
    if optim.name == "muon":
        if _adjust_lr is None:
            raise ConfigError(
                f"optim.name=muon: this torch ({torch.__version__}) has no torch.optim.Muon; "
                "use torch >= 2.9 or --optim.name=adamw"
            )
        hidden = [p for n, p in named if is_hidden_matrix(n, p)]
        ns_dtype = newton_schulz_dtype(precision)
        log.info("Muon: Newton-Schulz in %s (training precision %s)", dtype_name(ns_dtype), precision)
        muon = ShardedMuon(
            [{"params": hidden, "peak_lr": optim.muon_lr}],
            lr=optim.muon_lr,
            momentum=optim.muon_momentum,
            weight_decay=optim.muon_weight_decay,
            ns_dtype=ns_dtype,
        )
        rest = [p for n, p in named if not is_hidden_matrix(n, p)]
        return OptimizerGroup([muon, _adamw(rest, optim, device)])
    return OptimizerGroup([_adamw([p for _, p in named], optim, device)])


def _adamw(params: list, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    groups = [
        {
            "params": [p for p in params if p.dim() >= 2],
            "weight_decay": optim.weight_decay,
            "peak_lr": optim.lr,
        },
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "peak_lr": optim.lr},
    ]
    return torch.optim.AdamW(
        groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=device.type == "cuda"
    )


def newton_schulz_dtype(precision: str) -> torch.dtype:
    """What Muon's Newton-Schulz computes in for a training precision: the dtype the model's own matmuls
    use, which the device therefore computes natively. bf16 as torch.optim.Muon does (bit for bit); fp16 where
    a GPU has no native bf16; fp32 where training is fp32: on a CPU, which has no 16-bit matrix units (most
    emulate bf16 matmuls), or on a GPU where fp32 was asked for."""
    return DTYPES[precision]


def newton_schulz(
    grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """torch.optim.Muon's orthogonalization (torch.optim._muon._zeropower_via_newtonschulz) in `dtype`; in
    bf16 the same operations in the same order as torch's, so the same bits.

    Dividing by the Frobenius norm bounds the spectral norm by 1, and the quintic a s + b s^3 + c s^5 with
    torch's coefficients (3.4445, -4.7750, 2.0315) maps [0, 1.21] into itself (its peak is 1.20 at s = 0.55):
    X stays below 1.21, X X^T below 1.45, and the addmm's terms below 7 (b X X^T is the largest), far inside
    fp16's 65504. fp16's danger is the input instead: a momentum entry above 65504 overflows in the cast and
    one below 6e-8 vanishes. So fp16 (and fp32) divide by the norm in fp32 and cast the unit-norm matrix;
    bf16, with fp32's range, casts first as torch does.
    """
    a, b, c = coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    if tall:
        x = x.T
    x = (x / x.norm().clamp(min=eps)).to(dtype)
    for _ in range(steps):
        gram = x @ x.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    return x.T if tall else x


class ShardedMuon(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz step sees the whole matrix when parameters are FSDP2 DTensors,
    and computes in `ns_dtype` (newton_schulz_dtype).

    Same hyperparameters, state (`momentum_buffer`) and update as torch's single-tensor Muon; on plain
    tensors with the default bf16 it is that update exactly.
    """

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **muon_options):
        super().__init__(params, **muon_options)
        self.ns_dtype = ns_dtype  # not a group option: the state dict and checkpoints stay torch's

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(grad, 1 - momentum)  # elementwise: fine on each rank's rows
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                full = update.full_tensor() if isinstance(update, DTensor) else update
                orthogonal = newton_schulz(
                    full, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
                )
                if isinstance(param, DTensor):
                    # Every rank holds the same full result; keep this rank's rows without communication.
                    orthogonal = distribute_tensor(
                        orthogonal, param.device_mesh, param.placements, src_data_rank=None
                    )
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(orthogonal, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss


class OptimizerGroup:
    """The optimizers of one model, stepped as one. Iterating yields them: that is how
    torch.distributed.checkpoint's get_state_dict/set_state_dict take several optimizers of one model,
    so checkpoints hold every optimizer's state under the parameters' names (and reshard it)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    def __iter__(self):
        return iter(self.optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)
