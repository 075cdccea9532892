"""DistLlamaConfig: the transformers configuration of a dist_llama release.

Field names are LlamaConfig's, and model_type is "llama": one release folder serves every client, each
deciding by what it reads in config.json.
- transformers with trust_remote_code=True follows auto_map: this class, then DistLlamaForCausalLM,
  which runs model.py (the code that trained).
- transformers without it takes model_type "llama": stock LlamaConfig and LlamaForCausalLM, same weights.
- llama.cpp's convert_hf_to_gguf.py loads the config with trust_remote_code=False and picks its converter by
  architectures[0], LlamaForCausalLM; vLLM picks its model class by architectures, TGI by model_type.
So architectures always says LlamaForCausalLM, even when transformers saves this config for
DistLlamaForCausalLM (a fine-tune re-saved with save_pretrained): see to_dict. Translation to the model's
own ModelArgs happens in modeling_dist_llama.py, through interop.py.
"""

from transformers import PreTrainedConfig


class DistLlamaConfig(PreTrainedConfig):
    model_type = "llama"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 1024
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    rope_parameters: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    attention: str = "sdpa"  # model.py's attention backend: sdpa | eager | xformers

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict:
        # save_pretrained sets architectures to the saving class's name, DistLlamaForCausalLM, which no other
        # client knows; what this class's code computes is stock Llama's model.
        output = super().to_dict()
        output["architectures"] = ["LlamaForCausalLM"]
        return output

    def validate_architecture(self):
        if self.hidden_size != self.num_attention_heads * self.head_dim:
            raise ValueError(
                f"hidden_size={self.hidden_size} must equal num_attention_heads * head_dim "
                f"({self.num_attention_heads} * {self.head_dim}): model.py has no separate head_dim"
            )
        if self.hidden_act != "silu" or self.attention_bias or self.mlp_bias:
            raise ValueError("dist_llama models use SwiGLU (hidden_act=silu) and bias-free linear layers")


__all__ = ["DistLlamaConfig"]
