"""Mapping between our ModelArgs and transformers' Llama configuration (field names and rope settings).

Our parameter names and layouts already equal transformers' Llama ones (see model.py), so the
configuration is all that needs translating, both ways.
"""

from __future__ import annotations

from .model import ModelArgs, RopeScaling  # relative: the release folder carries this file verbatim


def llama_config_dict(args: ModelArgs) -> dict:
    """Keyword arguments for transformers.LlamaConfig (transformers 5 form: rope settings in
    rope_parameters)."""
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:
        rope = {
            "rope_type": args.rope_scaling.type,
            "factor": args.rope_scaling.factor,
            "rope_theta": args.rope_theta,
        }
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": args.init_std,
    }


def model_args_from_llama_dict(config: dict, attention: str = "sdpa") -> ModelArgs:
    """The inverse of llama_config_dict; accepts transformers 4's rope_scaling/rope_theta keys too."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None if rope_type == "default" else RopeScaling(type=rope_type, factor=float(rope["factor"]))
    return ModelArgs(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads"),
        vocab_size=config["vocab_size"],
        ffn_hidden_dim=config["intermediate_size"],
        norm_eps=config["rms_norm_eps"],
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_seq_len=config["max_position_embeddings"],
        tie_embeddings=config.get("tie_word_embeddings", False),
        attention=attention,
        init_std=config.get("initializer_range", 0.02),
    )
