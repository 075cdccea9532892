"""The LLaMA model: RMSNorm, RoPE, grouped-query attention, SwiGLU, pre-normalization blocks.

Pure torch: no torch.distributed, no I/O, no config files. Parallelism lives in parallel.py, and the
Hugging Face release (hub_release/) imports this very file, so there is one copy of the model code.

Parameter names and tensor layouts match transformers' LlamaForCausalLM one for one
(`model.layers.N.self_attn.q_proj.weight`, ...), so released weights load into stock Llama unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_BACKENDS = ("sdpa", "xformers", "eager")
ROPE_SCALING_TYPES = ("linear",)


@dataclass(frozen=True)
class RopeScaling:
    """Position Interpolation (arXiv 2306.15595): positions are divided by `factor` before rotation."""

    type: str = "linear"
    factor: float = 1.0

    def __post_init__(self):
        if self.type not in ROPE_SCALING_TYPES:
            raise ValueError(
                f"rope_scaling.type={self.type!r} is not supported; choose one of {ROPE_SCALING_TYPES}"
            )
        if not self.factor >= 1.0:
            raise ValueError(f"rope_scaling.factor={self.factor} must be >= 1 (it divides positions)")


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 768
    n_layers: int = 16
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: as many as n_heads (no grouped-query attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_hidden_dim: int | None = None  # None: 2/3 * 4 * dim rounded up, as in the LLaMA paper
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 1024
    tie_embeddings: bool = False
    attention: str = "sdpa"
    init_std: float = 0.02

    def __post_init__(self):
        checks = [
            (
                self.dim > 0 and self.n_layers > 0 and self.n_heads > 0,
                "dim, n_layers and n_heads must be positive",
            ),
            (self.dim % self.n_heads == 0, f"n_heads={self.n_heads} must divide dim={self.dim}"),
            (self.head_dim % 2 == 0, f"head dim dim/n_heads={self.head_dim} must be even for RoPE"),
            (
                self.n_heads % self.kv_heads == 0,
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}",
            ),
            (
                self.attention in ATTENTION_BACKENDS,
                f"attention={self.attention!r}; choose one of {ATTENTION_BACKENDS}",
            ),
            (self.vocab_size > 0 and self.max_seq_len > 0, "vocab_size and max_seq_len must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def rope_factor(self) -> float:
        return self.rope_scaling.factor if self.rope_scaling else 1.0


# Named sizes. "main" is our >= 100M non-embedding-parameter model (`python -m dist_llama.counts` counts it).
PRESETS: dict[str, ModelArgs] = {
    "debug": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=256),
    "main": ModelArgs(dim=768, n_layers=16, n_heads=12, multiple_of=256, max_seq_len=1024),
}


# --- RoPE as two pure functions -------------------------------------------------------------------
# Convention: half rotation (transformers' `rotate_half`): dimension i is paired with i + head_dim/2.
# Meta's original checkpoints pair interleaved dimensions (2i, 2i+1); transformers permutes q/k weights
# on conversion so that half rotation is equivalent. We train in the half-rotation layout directly,
# so our weights need no permutation to load into LlamaForCausalLM.


def rope_angles(head_dim: int, positions: torch.Tensor, theta: float, factor: float = 1.0) -> torch.Tensor:
    """Rotation angles (*positions.shape, head_dim/2); Position Interpolation divides positions by factor."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    )
    return (positions.float() / factor)[..., None] * inv_freq  # positions may be (seq,) or (batch, seq)


def precompute_rope(head_dim: int, positions: torch.Tensor, theta: float, factor: float = 1.0):
    """cos and sin of shape (*positions.shape, head_dim), duplicated over the two halves."""
    angles = rope_angles(head_dim, positions, theta, factor)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (batch, heads, seq, head_dim) by per-position angles (seq, head_dim)."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return (x * cos + rotated_half * sin).to(x.dtype)


# --- Layers -----------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as transformers does) so bf16 training does not lose the small variances.
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def eager_attention(q, k, v, attn_mask=None, is_causal=False):
    """Reference attention (test oracle): softmax(q k^T / sqrt(d) + mask) v, in fp32."""
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(
            k.shape[-2] - q.shape[-2]
        )
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = (
            scores.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else scores + attn_mask
        )
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def xformers_attention(q, k, v, attn_mask=None, is_causal=False):
    try:
        from xformers.ops import LowerTriangularMask, memory_efficient_attention
    except ImportError as error:
        raise ImportError(
            "model.attention=xformers needs the xformers package: pip install xformers, "
            "or set model.attention=sdpa"
        ) from error
    if attn_mask is not None:
        raise ValueError("the xformers backend supports causal training only; use attention=sdpa with a mask")
    bias = LowerTriangularMask() if is_causal else None
    # xformers wants (batch, seq, heads, head_dim)
    out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


def sdpa_attention(q, k, v, attn_mask=None, is_causal=False):
    # enable_gqa lets the kernel share each key/value head across its query group without copying them.
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1]
    )


ATTENTION_FUNCTIONS = {"sdpa": sdpa_attention, "xformers": xformers_attention, "eager": eager_attention}


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.attend = ATTENTION_FUNCTIONS[args.attention]

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache(k, v)
        if self.n_kv_heads != self.n_heads and self.attend is not sdpa_attention:
            repeats = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        # With a cache, queries are the last tokens of a longer key sequence; SDPA's is_causal is
        # top-left aligned, so decoding must pass an explicit mask instead.
        out = self.attend(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, blocks and final norm: the `model.` prefix of transformers' Llama names."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_caches=None,
        labels: torch.Tensor | None = None,
        loss_chunk_tokens: int = 0,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab); with `labels`, the summed next-token cross-entropy instead, computed
        `loss_chunk_tokens` tokens at a time so the (tokens, vocab) fp32 logits never exist at once (0: in one
        piece). positions defaults to 0..seq-1; attn_mask is for padded decoding."""
        hidden = self.hidden_states(input_ids, positions, attn_mask, kv_caches)
        if labels is None:
            return self.lm_head(hidden)
        if loss_chunk_tokens <= 0:
            return causal_lm_loss(self.lm_head(hidden), labels, reduction="sum")
        # Grad mode is read here: inside the Function's forward it is always off, and its needs_input_grad
        # follows requires_grad, which a trainable weight keeps under torch.no_grad() (evaluation).
        return ChunkedCrossEntropy.apply(
            hidden.flatten(0, 1),
            self.lm_head.weight,
            labels.flatten(),
            loss_chunk_tokens,
            torch.is_grad_enabled(),
        )

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_caches=None,
    ) -> torch.Tensor:
        """The final-normed hidden states (batch, seq, dim) that the output head maps to logits."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = precompute_rope(self.args.head_dim, positions, self.args.rope_theta, self.args.rope_factor)
        # Batched positions (left padding) give per-row angles: add the head axis for broadcasting.
        if cos.dim() == 3:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        h = self.model.embed_tokens(input_ids)
        for index, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, attn_mask, kv_caches[index] if kv_caches is not None else None)
        return self.model.norm(h)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """normal(0, init_std) for every matrix, residual-output projections (o_proj, down_proj) scaled by
        1/sqrt(2 n_layers) as in GPT-2, so the residual stream's variance does not grow with depth;
        norms start at 1. Seeded here so every rank or process builds bit-identical weights."""
        generator = torch.Generator(device="cpu")
        if seed is not None:
            generator.manual_seed(seed)
        residual_std = self.args.init_std / math.sqrt(2 * self.args.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else self.args.init_std
            # Draw on CPU with our generator: identical values whatever the device.
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of next-token prediction; labels are already shifted (the packer yields
    inputs/labels)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction=reduction)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` over (tokens, dim) hidden states, a chunk of tokens at a
    time.

    The plain loss materialises the whole micro-batch's fp32 logits (16 x 1024 x 32000 x 4 bytes = 2 GiB,
    kept for backward). Here each chunk's logits exist only while its loss and gradients are computed:
    the forward pass also computes d(sum)/d(hidden) and d(sum)/d(weight) (softmax minus one-hot, times the
    chunk's hidden states or the weight), and backward only scales them by the incoming gradient. No
    matmul is recomputed; the extra memory is one (tokens, dim) and one (vocab, dim) fp32 buffer. Logits
    are computed in the inputs' dtype and the softmax in fp32, as `causal_lm_loss` does.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk_tokens: int,
        grad_enabled: bool,
    ):
        needs_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            log_probs = torch.log_softmax((hidden[rows] @ weight.T).float(), dim=-1)
            total -= log_probs.gather(1, labels[rows, None]).sum()
            if needs_grad:
                grad_logits = log_probs.exp_()  # the softmax, in the same buffer
                grad_logits[torch.arange(grad_logits.shape[0], device=labels.device), labels[rows]] -= 1.0
                grad_logits = grad_logits.to(hidden.dtype)
                grad_hidden[rows] = grad_logits @ weight
                grad_weight += grad_logits.T @ hidden[rows]
                del grad_logits
            # Free this chunk's buffers before the next chunk's logits are formed. Held until their names
            # were rebound, the last chunk's fp32 log-probabilities and 16-bit gradient raised the peak from 8
            # to 14 bytes per chunk logit (memory.CHUNKED_LOSS_BYTES_PER_LOGIT counts the 8).
            del log_probs
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.input_dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.input_dtypes
        return (
            (grad_hidden * grad_total).to(hidden_dtype),
            (grad_weight * grad_total).to(weight_dtype),
            None,
            None,
            None,
        )


# --- Counts -----------------------------------------------------------------------------------------


def count_parameters(args: ModelArgs) -> dict[str, int]:
    """Total and non-embedding parameter counts, from the shapes alone (no model is built)."""
    attention = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.kv_heads)
    feed_forward = 3 * args.dim * args.hidden_dim
    per_layer = attention + feed_forward + 2 * args.dim
    non_embedding = args.n_layers * per_layer + args.dim  # + final norm
    embedding = args.vocab_size * args.dim
    head = 0 if args.tie_embeddings else args.vocab_size * args.dim
    return {
        "total": non_embedding + embedding + head,
        "non_embedding": non_embedding,
        "embedding": embedding,
        "lm_head": head,
    }


def flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Training FLOPs per token: 6 * N + 12 * n_layers * dim * seq_len.

    6N: each weight is used in one multiply-add (2 FLOPs) in the forward pass and two in the backward
    pass (input and weight gradients), N counting every matmul weight including the output head but not
    the embedding lookup. The attention term: per layer, q k^T and attention-times-v are each
    2 * seq_len * dim FLOPs per token forward, times 3 for forward + backward: 12 * dim * seq_len
    (as in the PaLM paper's MFU definition, counting the full, unmasked attention matrix).
    """
    counts = count_parameters(args)
    matmul_params = counts["non_embedding"] + args.vocab_size * args.dim
    return 6 * matmul_params + 12 * args.n_layers * args.dim * seq_len
