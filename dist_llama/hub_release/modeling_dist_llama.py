"""DistLlamaForCausalLM: the trained dist_llama model behind transformers' AutoModelForCausalLM API.

This file holds no model code. `model.py` (dist_llama/model.py, copied verbatim into the release folder)
defines the network and its forward pass; `interop.py` (dist_llama/interop.py) maps the Llama-style
config to ModelArgs. What lives here is the transformers contract: weight names, KV cache, padding
masks, loss, generation, attention choice and activation checkpointing.
"""

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

from .configuration_dist_llama import DistLlamaConfig
from .interop import model_args_from_llama_dict
from .model import Transformer

# transformers' attn_implementation -> model.py's attention backend. Other implementations (flash
# attention, flex attention, Hub kernels) would need their own attention code: they are refused.
ATTENTION_BACKENDS = {"sdpa": "sdpa", "eager": "eager"}

# transformers renamed the KV cache from `past_key_values` to `cache` within 5.x: 5.17 passes
# `past_key_values=` to forward and reads `outputs.past_key_values` in generate; later releases use `cache`.
# The forward takes either name and answers in the one this transformers' output class has.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def attention_backend(requested: str | None, recorded: str) -> str:
    """model.py's backend for a requested attn_implementation; None (nothing requested) keeps the
    release's."""
    if requested is None:
        return recorded
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attn_implementation={requested!r} is not supported by DistLlamaForCausalLM, which runs "
            f"model.py's own attention: choose one of {sorted(ATTENTION_BACKENDS)} (sdpa: torch's "
            "scaled_dot_product_attention; eager: the plain-torch reference)"
        )
    return ATTENTION_BACKENDS[requested]


class RecomputedForward:
    """A block's forward, run under a checkpoint function while the block trains: its activations are
    recomputed in backward instead of kept (activation checkpointing, per block, as training does it).
    Set on the block instance, so the block is not wrapped and parameter names do not change."""

    def __init__(self, block: torch.nn.Module, forward, checkpoint_function):
        self.block, self.forward, self.checkpoint_function = block, forward, checkpoint_function

    def __call__(self, *args, **kwargs):
        if self.block.training and torch.is_grad_enabled():
            return self.checkpoint_function(self.forward, *args, **kwargs)
        return self.forward(*args, **kwargs)


class DistLlamaPreTrainedModel(PreTrainedModel):
    config_class = DistLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True


class DistLlamaForCausalLM(DistLlamaPreTrainedModel, GenerationMixin):
    """A model.py Transformer (composition), with transformers' interface around it.

    The Transformer is held as `self.transformer` outside the module tree, and this object and it share
    one dict of submodules (`model`, `lm_head`). So parameter names are `model.layers.0.self_attn.q_proj.
    weight`, ..., `lm_head.weight`: Llama's and the safetensors', not `transformer.model...`; and a
    submodule that transformers, peft or accelerate put in place here is the one the Transformer runs.
    """

    # transformers 5 wants a {target: source} dict; it is applied only when config.tie_word_embeddings.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DistLlamaConfig):
        # from_pretrained(..., attn_implementation=X) sets this before __init__; None when nothing was asked.
        backend = attention_backend(config._attn_implementation, config.attention)
        super().__init__(config)
        if backend in ATTENTION_BACKENDS:  # model.config._attn_implementation then says what actually runs
            self.config._attn_implementation_internal = backend
        transformer = Transformer(model_args_from_llama_dict(config.to_dict(), attention=backend))
        self.model = transformer.model
        self.lm_head = transformer.lm_head
        transformer._modules = self._modules
        object.__setattr__(self, "transformer", transformer)  # not registered: its modules already are
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func=checkpoint, every_n_layers: int = 1
    ):
        """transformers' activation checkpointing (gradient_checkpointing_enable, Trainer's
        gradient_checkpointing=True): every n-th block recomputes its activations in backward, with
        gradient_checkpointing_func (transformers passes non-reentrant torch.utils.checkpoint, as training's
        parallel.apply_activation_checkpointing uses)."""
        for index, block in enumerate(self.model.layers):
            if isinstance(block.__dict__.get("forward"), RecomputedForward):
                block.forward = block.forward.forward  # back to the forward it wrapped
            block.gradient_checkpointing = enable and index % every_n_layers == 0
            if block.gradient_checkpointing:
                block.forward = RecomputedForward(block, block.forward, gradient_checkpointing_func)

    @property
    def recomputes_activations(self) -> bool:
        """Whether any block runs under activation checkpointing (transformers' own property for this
        was renamed within 5.x, from is_gradient_checkpointing to is_activation_checkpointing)."""
        return any(getattr(block, "gradient_checkpointing", False) for block in self.model.layers)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: DynamicCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if input_ids is None or kwargs.get("inputs_embeds") is not None:
            raise ValueError("DistLlamaForCausalLM takes input_ids (inputs_embeds is not supported)")
        if cache is None:
            cache = past_key_values  # the name transformers <= 5.17 uses
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and self.recomputes_activations:
            use_cache = False  # a recomputed block would append its keys and values to the cache twice
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0
        positions, attn_mask = _positions_and_mask(input_ids, attention_mask, position_ids, past)
        kv_caches = None
        if cache is not None:
            kv_caches = [
                lambda k, v, i=i: cache.update(k, v, i) for i in range(self.transformer.args.n_layers)
            ]

        logits = self.transformer(input_ids, positions=positions, attn_mask=attn_mask, kv_caches=kv_caches)
        if isinstance(logits_to_keep, int):
            logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
        else:
            logits = logits[:, logits_to_keep]

        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted inside
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})


def _positions_and_mask(input_ids, attention_mask, position_ids, past: int):
    """RoPE positions and attention mask for `input_ids` that follow `past` cached tokens.

    attention_mask (batch, past + seq) marks real tokens with 1 (left padding has 0s). Positions count
    real tokens only, so a left-padded row gets the same positions as the prompt alone. The mask is
    None in the plain case (no cache, no padding: model.py uses SDPA's causal kernel); otherwise it is
    an explicit bool mask, since SDPA's is_causal aligns a short query block with the first keys.
    """
    seq = input_ids.shape[1]
    device = input_ids.device
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be (batch, past + seq) of 0/1, got shape {tuple(attention_mask.shape)}"
        )
    padded = attention_mask is not None and not bool(attention_mask[:, : past + seq].all())
    if position_ids is None:
        if padded:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + seq]
        else:
            position_ids = torch.arange(past, past + seq, device=device)
    if position_ids.dim() == 2 and bool((position_ids == position_ids[:1]).all()):
        position_ids = position_ids[0]  # same positions in every row: one set of RoPE angles
    if not padded and past == 0:
        return position_ids, None

    key_pos = torch.arange(past + seq, device=device)
    query_pos = torch.arange(past, past + seq, device=device)
    allowed = key_pos[None, :] <= query_pos[:, None]  # (seq, past + seq), causal
    if padded:
        allowed = allowed[None] & attention_mask[:, None, : past + seq].bool()
        # A padding query would see no key at all (softmax of nothing is NaN, and NaN spreads through the
        # next layers' values); let it see itself. Real queries never see padding keys.
        allowed = allowed | (key_pos[None, None, :] == query_pos[None, :, None])
    return position_ids, allowed.unsqueeze(-3)  # add the head axis


__all__ = ["DistLlamaForCausalLM", "DistLlamaPreTrainedModel"]
