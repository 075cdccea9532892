"""GPU memory of a training step, estimated before the first step from the shapes alone.

Per rank, at the start of backward (where the saved activations peak):
- weights, gradients and optimizer state: fp32 shards of every parameter (FSDP2), so 4 + 4 + 8 bytes per
  parameter for AdamW over the ranks that shard them: every rank under plain FSDP, one shard group under HSDP
  (world size / parallel.replicate). Muon keeps one fp32 momentum per hidden-matrix parameter instead;
- with parallel.reduce_grads=last_micro and several micro-batches, each FSDP unit also keeps its whole,
  unsharded gradient in the reduce dtype until the last micro-batch reduces it: 4 (fp32) or 2 (bf16) bytes
  per parameter, not divided by any rank count. HSDP's deferred all-reduce keeps a buffer the size of the
  sharded gradient instead of it, so it adds nothing;
- gathered parameters: FSDP2 unshards a block in the compute dtype while it runs (and prefetches the next),
  and the root's embedding and output head stay gathered through forward and backward. With
  parallel.reshard_after_forward=never every block stays gathered from its forward to its backward; the
  default (all but the last block freed) and `always` peak alike, the last block being gathered when
  backward starts either way;
- activations: what autograd keeps per token and block (below), or only each block's input for a checkpointed
  block plus one block's activations while it is recomputed;
- the loss: the chunked loss (model.ChunkedCrossEntropy) holds one chunk's fp32 logits and their fp32
  log-softmax at its peak (its 16-bit logits are freed first, and each chunk's buffers before the next
  chunk's logits exist), beside its fp32 gradient buffers for the hidden states and the output head; the
  unchunked loss keeps the whole micro-batch's fp32 log-softmax for backward, where the loss's and the
  logits' fp32 gradients join it. Both figures per logit were measured with torch.profiler
  (tests/test_precision.py);
- overhead: the CUDA context, library workspaces and allocator slack, as a fixed amount plus a share.

Saved per token and block, in bytes (b: the compute dtype's size; RMSNorm keeps an fp32 copy of its input):
two norms 2 x (4 D + 2 b D), attention q, k, v and output b (2 D + 2 kv), the output projection's input b D,
the SwiGLU gate, silu(gate), up and their product 4 b H. So 8 D + b (7 D + 2 kv + 4 H), D the width, kv the
key/value width, H the feed-forward width.

Whether a step fits is decided on the total. What torch's allocator can see is the `allocated` part, the total
less the overhead: torch.cuda.max_memory_allocated after the first step is the number to compare it with, so
that an undercount shows on each card.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dist_llama.config import ConfigError
from dist_llama.model import ModelArgs, count_parameters

GIB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OVERHEAD_BYTES = 0.75 * GIB  # CUDA context and library workspaces: an assumption until a GPU run measures it
OVERHEAD_SHARE = 0.10  # allocator fragmentation on top of what is live
CHECKPOINTING = ("none", "selective", "full")
# The loss's peak bytes per logit, whatever the compute dtype (see the module docstring): chunked, a chunk's
# fp32 logits and their fp32 log-softmax; unchunked, the kept fp32 log-softmax and two fp32 gradients.
CHUNKED_LOSS_BYTES_PER_LOGIT = 8
UNCHUNKED_LOSS_BYTES_PER_LOGIT = 12


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    gathered: float
    activations: float
    loss: float

    @property
    def allocated(self) -> float:
        """What torch's caching allocator hands out at the peak: the part max_memory_allocated measures."""
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations + self.loss

    @property
    def overhead(self) -> float:
        """The CUDA context, library workspaces and fragmentation, which the allocator's peak does not see."""
        return self.allocated * OVERHEAD_SHARE + OVERHEAD_BYTES

    @property
    def total(self) -> float:
        return self.allocated + self.overhead

    def describe(self) -> str:
        """E.g. "9.3 GiB (7.7 allocated: weights 0.10, ..., loss 1.25; overhead 1.52)", in GiB."""
        parts = ("weights", "gradients", "optimizer", "gathered", "activations", "loss")
        return (
            f"{self.total / GIB:.1f} GiB ({self.allocated / GIB:.1f} allocated: "
            + ", ".join(f"{name} {getattr(self, name) / GIB:.2f}" for name in parts)
            + f"; overhead {self.overhead / GIB:.2f})"
        )


def activation_bytes_per_token(args: ModelArgs, compute_bytes: int) -> int:
    """What autograd keeps per token for one block that is not checkpointed (see the module docstring)."""
    kv_width = args.kv_heads * args.head_dim
    return 8 * args.dim + compute_bytes * (7 * args.dim + 2 * kv_width + 4 * args.hidden_dim)


@dataclass(frozen=True)
class StepShape:
    """What a training step's memory depends on: the model, the compute precision, the optimizer, the
    micro-batch and its tokens, activation checkpointing, the ranks (world_size, of which world_size /
    replicate shard the state) and the loss's chunk, and when gradients are reduced. rows_per_rank bounds
    the micro-batches a fitting setting may use (each divides it)."""

    args: ModelArgs
    precision: str
    optimizer: str
    micro_batch: int
    seq_len: int
    checkpointing: str
    world_size: int
    loss_chunk_tokens: int
    rows_per_rank: int
    replicate: int = (
        1  # HSDP's replicas (parallel.replicate): each holds the whole state over its shard ranks
    )
    reduce_grads: str = "every_micro"  # parallel.reduce_grads
    reduce_dtype: str = "fp32"  # parallel.reduce_dtype
    reshard_after_forward: str = "default"  # parallel.reshard_after_forward

    @classmethod
    def of(cls, config, layout, precision: str, world_size: int, replicate: int = 1) -> StepShape:
        """The configured step: config.Config, step.BatchLayout."""
        return cls(
            config.model,
            precision,
            config.optim.name,
            layout.micro_batch_size,
            layout.seq_len,
            config.parallel.activation_checkpointing,
            world_size,
            config.train.loss_chunk_tokens,
            layout.rows_per_rank,
            replicate,
            config.parallel.reduce_grads,
            config.parallel.reduce_dtype,
            config.parallel.reshard_after_forward,
        )

    @property
    def shard_ranks(self) -> int:
        return self.world_size // self.replicate

    @property
    def keeps_unsharded_grads(self) -> bool:
        """last_micro with several micro-batches: every unit's whole gradient waits for the last one."""
        return self.reduce_grads == "last_micro" and self.rows_per_rank > self.micro_batch


def estimate_memory(shape: StepShape) -> MemoryEstimate:
    """Peak bytes per rank of one training step (an estimate: see the module docstring)."""
    args, precision, checkpointing = shape.args, shape.precision, shape.checkpointing
    b = BYTES[precision]
    counts = count_parameters(args)
    total = counts["total"]
    per_block = (counts["non_embedding"] - args.dim) // args.n_layers
    hidden = args.n_layers * (per_block - 2 * args.dim)  # the attention and MLP matrices
    state = 4 * hidden + 8 * (total - hidden) if shape.optimizer == "muon" else 8 * total
    root = counts["embedding"] + counts["lm_head"]
    tokens = shape.micro_batch * shape.seq_len
    full_block = tokens * activation_bytes_per_token(args, b)
    recomputed = {"none": 0, "selective": (args.n_layers + 1) // 2, "full": args.n_layers}[checkpointing]
    activations = (args.n_layers - recomputed) * full_block + recomputed * tokens * b * args.dim
    if recomputed:
        activations += full_block  # the block being recomputed in backward
    activations += tokens * (b * args.dim + 4 * args.dim + 2 * b * args.dim)  # embedding output, final norm
    if shape.loss_chunk_tokens:
        chunk = min(shape.loss_chunk_tokens, tokens)
        gradient_buffers = 4 * (tokens * args.dim + args.vocab_size * args.dim)
        loss = chunk * args.vocab_size * CHUNKED_LOSS_BYTES_PER_LOGIT + gradient_buffers
    else:
        loss = tokens * args.vocab_size * UNCHUNKED_LOSS_BYTES_PER_LOGIT
    unsharded_grads = BYTES[shape.reduce_dtype] * total if shape.keeps_unsharded_grads else 0
    # The block at work (b), the next one prefetched (b), and its gradient in the compute dtype and in fp32
    # for the reduction (b + 4); kept gathered, every block's b and no prefetch on top.
    if shape.reshard_after_forward == "never":
        blocks_gathered = args.n_layers * per_block * b + per_block * (b + 4)
    else:
        blocks_gathered = per_block * (3 * b + 4)
    return MemoryEstimate(
        weights=4 * total / shape.shard_ranks,
        gradients=4 * total / shape.shard_ranks + unsharded_grads,
        optimizer=state / shape.shard_ranks,
        gathered=b * root + blocks_gathered,
        activations=activations,
        loss=loss,
    )


def divisors_down_from(limit: int, rows: int) -> list[int]:
    return [d for d in range(min(limit, rows), 0, -1) if rows % d == 0]


def _sharding_options(shape: StepShape) -> list[dict]:
    """What may change beside the micro-batch and checkpointing, least first: nothing; blocks freed after
    their forward; the reduce-scatter on every micro-batch (no unsharded gradients kept); then the state
    sharded over every rank (no replicas)."""
    options = [{}]
    if shape.reshard_after_forward == "never":
        options.append({"reshard_after_forward": "default"})
    if shape.reduce_grads == "last_micro":
        options.append({**options[-1], "reduce_grads": "every_micro"})
    if shape.replicate > 1:
        options.append({**options[-1], "replicate": 1})
    return options


def _first_fit(shape: StepShape, capacity_bytes: float) -> StepShape | None:
    """The first setting that fits, in the order check_memory_fits names; None when none does."""
    for changes in _sharding_options(shape):
        for mode in CHECKPOINTING:
            for micro in divisors_down_from(shape.micro_batch, shape.rows_per_rank):
                candidate = dataclasses.replace(shape, micro_batch=micro, checkpointing=mode, **changes)
                if estimate_memory(candidate).total <= capacity_bytes:
                    return candidate
    return None


def check_memory_fits(shape: StepShape, capacity_bytes: float) -> MemoryEstimate:
    """The estimate of the configured step; ConfigError in one line when it exceeds the card, naming the first
    setting that fits: the least recomputation (none, then selective, then full checkpointing), then the
    largest micro-batch that divides the rank's rows; failing those, with blocks freed after their forward,
    then with gradients reduced every micro-batch, then with the state sharded over every rank rather than
    replicated."""
    estimate = estimate_memory(shape)
    if estimate.total <= capacity_bytes:
        return estimate
    fits = _first_fit(shape, capacity_bytes)
    where = (
        f"; --train.micro_batch_size={fits.micro_batch} "
        f"--parallel.activation_checkpointing={fits.checkpointing} "
        + (
            f"--parallel.reshard_after_forward={fits.reshard_after_forward} "
            if fits.reshard_after_forward != shape.reshard_after_forward
            else ""
        )
        + (f"--parallel.reduce_grads={fits.reduce_grads} " if fits.reduce_grads != shape.reduce_grads else "")
        + (f"--parallel.replicate={fits.replicate} " if fits.replicate != shape.replicate else "")
        + f"fits (~{estimate_memory(fits).total / GIB:.1f} GiB)"
        if fits
        else "; no micro-batch or checkpointing setting fits: use more GPUs (FSDP shards the weights and "
        "optimizer state) or a smaller model"
    )
    raise ConfigError(
        f"a training step needs ~{estimate.total / GIB:.1f} GiB per GPU (micro-batch {shape.micro_batch} x "
        f"{shape.seq_len} tokens, activation checkpointing {shape.checkpointing}) and the card has "
        f"{capacity_bytes / GIB:.1f} GiB{where}"
    )
