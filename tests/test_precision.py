"""Precision on the GPUs students have: what `auto` picks by compute capability, fp16 compute with fp32 master
weights, dynamic loss scaling (an injected overflow), and the memory estimate
(its loss figure measured with the profiler) with its refusal."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from dist_llama.config import ConfigError, load_config
from dist_llama.devices import DTYPES, auto_precision
from dist_llama.memory import (
    CHUNKED_LOSS_BYTES_PER_LOGIT,
    GIB,
    UNCHUNKED_LOSS_BYTES_PER_LOGIT,
    StepShape,
    activation_bytes_per_token,
    check_memory_fits,
    estimate_memory,
)
from dist_llama.model import PRESETS, ChunkedCrossEntropy, Transformer, causal_lm_loss, count_parameters
from dist_llama.optim import build_optimizer
from dist_llama.parallel import DistEnv, loss_scaler, parallelize, training_precision
from dist_llama.step import BatchLayout, TrainingStep

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "device, capability, expected",
    [
        ("cuda", (9, 0), "bf16"),  # H100 / H200
        ("cuda", (8, 0), "bf16"),  # A100
        ("cuda", (7, 5), "fp16"),  # T4
        ("cuda", (7, 0), "fp16"),  # V100
        ("cuda", (6, 0), "fp16"),  # P100
        ("cpu", None, "fp32"),
    ],
)
def test_auto_picks_bf16_where_native_fp16_below_and_fp32_on_a_cpu(device, capability, expected):
    def query(queried):
        assert queried.type == "cuda"
        return capability

    precision, why = auto_precision(torch.device(device), capability=query)
    assert precision == expected
    assert ("compute capability" in why) == (device == "cuda")


def test_an_explicit_precision_is_taken_as_given():
    config = load_config(None, ["--parallel.mixed_precision=fp16"])
    assert training_precision(config.parallel, CPU) == ("fp16", "set by parallel.mixed_precision")
    assert training_precision(load_config(None, []).parallel, CPU)[0] == "fp32"  # auto on a CPU


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield DistEnv(rank=0, world_size=1, local_rank=0, device=CPU)
    dist.destroy_process_group()


def fp16_model(env: DistEnv, *overrides: str):
    config = load_config(None, ["--parallel.mixed_precision=fp16", *overrides])
    model = Transformer(config.model)
    model.init_weights(0)
    model = parallelize(model, config.parallel, env)
    return config, model, build_optimizer(model, config.optim, CPU, "fp16")


def batch(seed: int):
    tokens = torch.randint(
        0, PRESETS["debug"].vocab_size, (4, 17), generator=torch.Generator().manual_seed(seed)
    )
    return tokens[:, :-1], tokens[:, 1:]


LAYOUT = BatchLayout(global_rows=4, rows_per_rank=4, micro_batch_size=4, seq_len=16)


def fp16_step(model, optimizer, scaler=None) -> TrainingStep:
    """A step of LAYOUT with clipping at 1 and fp16's loss scaler (a new one at 2^16 unless given)."""
    scaler = scaler if scaler is not None else loss_scaler("fp16", CPU, 2.0**16)
    return TrainingStep(model, optimizer, LAYOUT, CPU, grad_clip=1.0, scaler=scaler)


def test_fp16_computes_in_fp16_and_keeps_fp32_master_weights(one_process_group):
    config, model, optimizer = fp16_model(one_process_group)
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, i, o: seen.append((i[0].dtype, o.dtype))
    )
    TrainingStep(model, optimizer, LAYOUT, CPU, grad_clip=1.0, scaler=loss_scaler("fp16", CPU, 2.0**16)).step(
        batch(0), 1.0
    )
    assert seen == [(torch.float16, torch.float16)]
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_an_overflow_halves_the_scale_skips_exactly_that_update_and_training_goes_on(one_process_group):
    config, model, optimizer = fp16_model(one_process_group)
    scaler = loss_scaler("fp16", CPU, 2.0**16)
    inject = {"on": False}
    # An inf in the first block's output at the chosen step: every gradient of that step is non-finite.
    model.model.layers[0].register_forward_hook(lambda m, i, o: o * float("inf") if inject["on"] else None)

    def weights():
        return [p.full_tensor().clone() for p in model.parameters()]

    steps = []
    for step in range(4):
        inject["on"] = step == 2
        before = weights()
        result = TrainingStep(model, optimizer, LAYOUT, CPU, grad_clip=1.0, scaler=scaler).step(
            batch(step), 1.0
        )
        changed = any(not torch.equal(a, b) for a, b in zip(before, weights()))
        steps.append((result.overflow, changed, scaler.get_scale()))
    assert steps == [
        (False, True, 2.0**16),
        (False, True, 2.0**16),
        (True, False, 2.0**15),
        (False, True, 2.0**15),
    ]


class MatmulDtypes(TorchDispatchMode):
    """The dtypes of the matrix products issued while it is active, by operator name."""

    MATMULS = ("mm", "addmm", "bmm", "baddbmm")

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set[torch.dtype]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.MATMULS:
            self.seen.setdefault(name, set()).update(a.dtype for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def test_muon_with_fp16_training_issues_no_bf16_matmul(one_process_group):
    """fp16 is what `auto` trains in on a GPU without native bf16 (T4, V100, P100), where a bf16 matmul is
    refused or emulated: torch.optim.Muon's Newton-Schulz casts to bf16. Ours computes in fp16 (its addmm,
    which nothing else in the step issues), and so does the whole step."""
    config, model, optimizer = fp16_model(one_process_group, "--optim.name=muon")
    with MatmulDtypes() as matmuls:
        TrainingStep(
            model, optimizer, LAYOUT, CPU, grad_clip=1.0, scaler=loss_scaler("fp16", CPU, 2.0**16)
        ).step(batch(0), 1.0)
    assert matmuls.seen["addmm"] == {torch.float16}
    assert torch.bfloat16 not in set().union(*matmuls.seen.values()), matmuls.seen


# --- the memory estimate ----------------------------------------------------------------------------------


# The main preset at 1024 tokens in fp16 with AdamW, micro-batches of 8 of a rank's 64 rows, on one GPU.
MAIN_STEP = StepShape(PRESETS["main"], "fp16", "adamw", 8, 1024, "none", 1, 4096, rows_per_rank=64)


def main_estimate(**changes):
    return estimate_memory(dataclasses.replace(MAIN_STEP, **changes))


def test_the_estimate_of_weights_gradients_and_optimizer_state_is_16_bytes_a_parameter_sharded():
    total = count_parameters(PRESETS["main"])["total"]
    for world_size in (1, 2, 8):
        estimate = main_estimate(world_size=world_size)
        assert estimate.weights + estimate.gradients + estimate.optimizer == pytest.approx(
            16 * total / world_size
        )
    muon = main_estimate(optimizer="muon")
    assert (
        muon.optimizer < main_estimate().optimizer
    )  # one momentum, not two moments, for the hidden matrices


def test_the_estimate_of_activations_follows_the_tokens_and_the_checkpointing():
    # The main preset's block keeps 8 D + 2 (7 D + 2 kv + 4 H) bytes a token in fp16: D = kv = 768, H = 2048.
    assert (
        activation_bytes_per_token(PRESETS["main"], 2)
        == 8 * 768 + 2 * (7 * 768 + 2 * 768 + 4 * 2048)
        == 36352
    )
    none, full = main_estimate(), main_estimate(checkpointing="full")
    tokens = 8 * 1024
    blocks = 16 * tokens * 36352
    edges = tokens * (2 * 768 + 4 * 768 + 4 * 768)  # the embedding's output and the final norm
    assert none.activations == blocks + edges
    assert full.activations == 16 * tokens * 2 * 768 + tokens * 36352 + edges  # block inputs + one recomputed
    selective = main_estimate(checkpointing="selective")
    assert full.activations < selective.activations < none.activations
    assert main_estimate(micro_batch=16).activations == 2 * none.activations
    fp32 = main_estimate(precision="fp32")
    assert fp32.activations > none.activations and fp32.total > none.total


def test_a_step_that_will_not_fit_stops_naming_a_setting_that_fits():
    fits = check_memory_fits(MAIN_STEP, 16 * GIB)
    assert fits.total < 16 * GIB
    sixteen = dataclasses.replace(MAIN_STEP, micro_batch=16)
    with pytest.raises(ConfigError) as refused:
        check_memory_fits(sixteen, 12 * GIB)
    eight = main_estimate(micro_batch=8).total / GIB
    assert str(refused.value) == (
        f"a training step needs ~{main_estimate(micro_batch=16).total / GIB:.1f} GiB per GPU (micro-batch "
        "16 x 1024 "
        f"tokens, activation checkpointing none) and the card has 12.0 GiB; --train.micro_batch_size=8 "
        f"--parallel.activation_checkpointing=none fits (~{eight:.1f} GiB)"
    )
    with pytest.raises(ConfigError, match="no micro-batch or checkpointing setting fits: use more GPUs"):
        check_memory_fits(sixteen, 2 * GIB)


def peak_bytes(work) -> int:
    """The peak of the bytes allocated while `work()` runs, from the profiler's memory events (CPU)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_the_loss_peaks_at_the_bytes_per_logit_the_estimate_counts(precision):
    """The peak's growth from 64- to 128-token chunks, per added logit, is the chunked loss's figure (it was
    14 at 16 bits and 12 at 32 while the last chunk's buffers stayed alive into the next); from 128 to 256
    tokens in one piece, the unchunked loss's (forward and backward). The estimate counts these figures."""
    dtype, vocab, dim, tokens = DTYPES[precision], 4096, 16, 512
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, dim, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(vocab, dim, generator=generator).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=generator)

    def chunked(chunk: int) -> int:
        return peak_bytes(lambda: ChunkedCrossEntropy.apply(hidden, weight, labels, chunk, True))

    def unchunked(rows: int) -> int:
        def work():  # as in Transformer.forward, the logits are gone before backward
            logits = (hidden[:rows].detach().requires_grad_() @ weight.T)[None]
            loss = causal_lm_loss(logits, labels[None, :rows], reduction="sum")
            del logits
            loss.backward()

        return peak_bytes(work)

    assert (chunked(128) - chunked(64)) / (64 * vocab) == pytest.approx(CHUNKED_LOSS_BYTES_PER_LOGIT, abs=0.1)
    assert (unchunked(256) - unchunked(128)) / (128 * vocab) == pytest.approx(
        UNCHUNKED_LOSS_BYTES_PER_LOGIT, abs=0.1
    )

    def estimated(chunk: int) -> float:
        return main_estimate(precision=precision, loss_chunk_tokens=chunk).loss

    assert estimated(4096) - estimated(2048) == 2048 * 32000 * CHUNKED_LOSS_BYTES_PER_LOGIT
    assert estimated(0) == 8 * 1024 * 32000 * UNCHUNKED_LOSS_BYTES_PER_LOGIT  # micro-batch 8 x 1024 tokens


def test_the_estimate_names_the_allocators_part_beside_the_total():
    """torch.cuda.max_memory_allocated sees what the allocator hands out, not the CUDA context or
    fragmentation: a measured peak is compared with `allocated`, which describe() shows beside the total."""
    estimate = main_estimate()
    parts = ("weights", "gradients", "optimizer", "gathered", "activations", "loss")
    assert estimate.allocated == sum(getattr(estimate, part) for part in parts)
    assert estimate.total == estimate.allocated + estimate.overhead > estimate.allocated
    described = estimate.describe()
    assert described.startswith(f"{estimate.total / GIB:.1f} GiB ({estimate.allocated / GIB:.1f} allocated: ")
    assert f"; overhead {estimate.overhead / GIB:.2f})" in described
