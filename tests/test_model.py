"""The model against transformers' LlamaForCausalLM on the same weights, and its own invariants."""

import dataclasses
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dist_llama.interop import llama_config_dict, model_args_from_llama_dict
from dist_llama.model import (
    PRESETS,
    ChunkedCrossEntropy,
    ModelArgs,
    RopeScaling,
    Transformer,
    causal_lm_loss,
    count_parameters,
    eager_attention,
    precompute_rope,
    rope_angles,
)

DEBUG = dataclasses.replace(PRESETS["debug"], vocab_size=512)


def build_pair(args: ModelArgs, seed: int = 0):
    ours = Transformer(args)
    ours.init_weights(seed)
    # Larger norm gains than 1 make any norm-weight mix-up visible in the logits.
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    theirs = LlamaForCausalLM(LlamaConfig(**llama_config_dict(args))).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in key for key in missing), (missing, unexpected)
    return ours.eval(), theirs


@pytest.mark.parametrize("rope_scaling", [None, RopeScaling("linear", 4.0)], ids=["plain", "linear4"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_logits_match_transformers_llama(rope_scaling, tie):
    args = dataclasses.replace(DEBUG, rope_scaling=rope_scaling, tie_embeddings=tie)
    ours, theirs = build_pair(args)
    tokens = torch.randint(0, args.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(tokens).logits
        got = ours(tokens)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_rope_scaling_changes_logits():
    # Guards the test above: if scaling were ignored on both sides, parity would still hold.
    plain, _ = build_pair(DEBUG)
    scaled = Transformer(dataclasses.replace(DEBUG, rope_scaling=RopeScaling("linear", 4.0))).eval()
    scaled.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, DEBUG.vocab_size, (1, 64))
    with torch.no_grad():
        assert (plain(tokens) - scaled(tokens)).abs().max() > 1e-3


def test_rope_angles_with_factor_equal_angles_at_scaled_positions():
    positions = torch.arange(0, 1024)
    scaled = rope_angles(64, positions, 10000.0, factor=4.0)
    reference = rope_angles(64, positions.float() / 4, 10000.0)
    torch.testing.assert_close(scaled, reference, atol=0, rtol=0)
    cos, _ = precompute_rope(64, torch.tensor([400]), 10000.0, factor=4.0)
    cos_ref, _ = precompute_rope(64, torch.tensor([100]), 10000.0)
    torch.testing.assert_close(cos, cos_ref)


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_sdpa_equals_eager(n_kv_heads):
    args = dataclasses.replace(DEBUG, n_kv_heads=n_kv_heads)
    sdpa = Transformer(args)
    sdpa.init_weights(3)
    eager = Transformer(dataclasses.replace(args, attention="eager"))
    eager.load_state_dict(sdpa.state_dict())
    tokens = torch.randint(0, args.vocab_size, (2, 96))
    with torch.no_grad():
        torch.testing.assert_close(sdpa(tokens), eager(tokens), atol=1e-5, rtol=1e-5)


def test_future_tokens_never_change_earlier_logits():
    model = Transformer(DEBUG).eval()
    model.init_weights(0)
    tokens = torch.randint(0, DEBUG.vocab_size, (1, 64))
    changed = tokens.clone()
    changed[0, 40:] = (changed[0, 40:] + 7) % DEBUG.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :40], b[:, :40], atol=0, rtol=0)
    assert (a[:, 40:] - b[:, 40:]).abs().max() > 1e-4


def test_gqa_has_fewer_kv_parameters_and_matches_transformers():
    mha = count_parameters(dataclasses.replace(DEBUG, n_kv_heads=None))
    gqa = count_parameters(dataclasses.replace(DEBUG, n_kv_heads=1))
    assert gqa["non_embedding"] < mha["non_embedding"]
    for n_kv_heads in (None, 1):
        args = dataclasses.replace(DEBUG, n_kv_heads=n_kv_heads)
        model = Transformer(args)
        counted = sum(p.numel() for p in model.parameters())
        assert counted == count_parameters(args)["total"]


def test_parameter_count_matches_built_model_and_main_preset_is_large_enough():
    for tie in (False, True):
        args = dataclasses.replace(DEBUG, tie_embeddings=tie)
        assert sum(p.numel() for p in Transformer(args).parameters()) == count_parameters(args)["total"]
    assert count_parameters(PRESETS["main"])["non_embedding"] >= 100_000_000


def test_init_is_seeded_and_scales_residual_projections():
    a, b, c = Transformer(DEBUG), Transformer(DEBUG), Transformer(DEBUG)
    a.init_weights(5), b.init_weights(5), c.init_weights(6)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name
    q_std = a.model.layers[0].self_attn.q_proj.weight.std().item()
    o_std = a.model.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(q_std - 0.02) < 0.003
    assert abs(o_std - 0.02 / (2 * DEBUG.n_layers) ** 0.5) < 0.002


def test_llama_config_round_trip():
    for args in (
        DEBUG,
        dataclasses.replace(DEBUG, rope_scaling=RopeScaling("linear", 4.0), tie_embeddings=True),
    ):
        restored = model_args_from_llama_dict(llama_config_dict(args))
        assert restored == dataclasses.replace(
            args, ffn_hidden_dim=args.hidden_dim, multiple_of=restored.multiple_of
        )


def test_eager_attention_mask_and_causal_agree():
    q, k, v = torch.randn(3, 1, 2, 8, 16).unbind(0)
    causal_mask = torch.ones(8, 8, dtype=torch.bool).tril()
    torch.testing.assert_close(
        eager_attention(q, k, v, is_causal=True), eager_attention(q, k, v, attn_mask=causal_mask)
    )


def test_xformers_backend_without_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers` fail, installed or not
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    model = Transformer(dataclasses.replace(DEBUG, attention="xformers"))
    with pytest.raises(ImportError, match="pip install xformers"):
        model(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("chunk", [7, 29, 10_000])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(chunk):
    """Labels in forward: summed cross-entropy chunk by chunk, never the full fp32 logits; chunk sizes
    that do not divide the 3 x 20 tokens and one larger than all of them."""
    model = Transformer(DEBUG)
    model.init_weights(0)
    tokens = torch.randint(0, DEBUG.vocab_size, (3, 21), generator=torch.Generator().manual_seed(0))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    plain = causal_lm_loss(model(inputs), labels, reduction="sum")
    plain.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    chunked = model(inputs, labels=labels, loss_chunk_tokens=chunk)
    chunked.backward()
    assert abs(chunked.item() - plain.item()) <= 1e-6 * plain.item()
    for name, p in model.named_parameters():
        assert (p.grad - expected[name]).norm() <= 1e-6 * expected[name].norm(), name
    with torch.no_grad():  # evaluation: the same sum, no gradient buffers
        assert model(inputs, labels=labels, loss_chunk_tokens=chunk).item() == pytest.approx(
            plain.item(), rel=1e-6
        )


def test_chunked_loss_does_no_gradient_work_under_no_grad():
    """Evaluation: the output head's matmuls are the logits alone (2 x tokens x vocab x dim FLOPs), not the
    two gradient products the training forward also forms, although the weights still require grad."""
    from torch.utils.flop_counter import FlopCounterMode

    head = torch.nn.Linear(DEBUG.dim, DEBUG.vocab_size, bias=False)
    hidden = torch.randn(60, DEBUG.dim, requires_grad=True)
    labels = torch.randint(0, DEBUG.vocab_size, (60,), generator=torch.Generator().manual_seed(0))
    logits_flops = 2 * 60 * DEBUG.vocab_size * DEBUG.dim

    def flops(grad_enabled: bool) -> int:
        with torch.set_grad_enabled(grad_enabled), FlopCounterMode(display=False) as counter:
            ChunkedCrossEntropy.apply(hidden, head.weight, labels, 16, torch.is_grad_enabled())
        return counter.get_total_flops()

    assert flops(True) == 3 * logits_flops  # logits, d/dhidden and d/dweight in the forward pass
    assert flops(False) == logits_flops
