"""Schedules, parameter groups, clipping, the batch layout and time-budget plans, and Muon under FSDP2 (CPU,
gloo)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dist_llama.boundary import BudgetError, BudgetPlan, check_budget_plan, plan_steps
from dist_llama.config import ConfigError, OptimConfig, load_config
from dist_llama.model import PRESETS, Transformer
from dist_llama.optim import (
    ShardedMuon,
    build_optimizer,
    is_hidden_matrix,
    lr_factor,
    newton_schulz,
    newton_schulz_dtype,
)
from dist_llama.parallel import DistEnv, parallelize
from dist_llama.run import Run
from dist_llama.step import BatchLayout, TrainingStep

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_cosine_warms_up_linearly_and_ends_exactly_at_the_floor():
    optim = OptimConfig(warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_factor(s, optim, 100) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, optim, 100) == pytest.approx(1.0)
    assert lr_factor(99, optim, 100) == pytest.approx(0.1)  # the last step gets the final rate
    midpoint = 10 + (99 - 10) / 2
    assert lr_factor(int(midpoint), optim, 100) == pytest.approx(0.55, abs=0.02)
    factors = [lr_factor(s, optim, 100) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(factors, factors[1:])), "cosine never rises after warmup"


@pytest.mark.parametrize("shape", ["linear", "sqrt"])
def test_wsd_is_flat_then_decays_over_its_fraction(shape):
    optim = OptimConfig(
        warmup_steps=5, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.3, decay_shape=shape
    )
    total = 100  # decay over steps 70..99
    assert all(lr_factor(s, optim, total) == 1.0 for s in range(5, 70))
    assert lr_factor(99, optim, total) == 0.0
    halfway = lr_factor(70 + 29 // 2, optim, total)
    progress = (29 // 2) / 29
    expected = 1 - progress if shape == "linear" else 1 - math.sqrt(progress)
    assert halfway == pytest.approx(expected)
    factors = [lr_factor(s, optim, total) for s in range(70, 100)]
    assert all(a > b for a, b in zip(factors, factors[1:]))


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_plan_shorter_than_the_warmup_still_decays_to_the_final_rate(schedule):
    """A time budget may plan fewer steps than optim.warmup_steps (25 of 30 here): the warmup shrinks to
    half the steps, the rate then decays, and the last step has the schedule's final rate."""
    optim = OptimConfig(warmup_steps=30, schedule=schedule, min_lr_ratio=0.1)
    factors = [lr_factor(s, optim, 25) for s in range(25)]
    assert factors[-1] == 0.1
    assert factors[:12] == pytest.approx([(s + 1) / 12 for s in range(12)])  # warmup: half of the 25 steps
    assert max(factors) == 1.0 and all(a >= b for a, b in zip(factors[12:], factors[13:]))
    assert lr_factor(0, optim, 1) == 0.1  # a one-step run's only step is its last


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
@pytest.mark.parametrize(
    "warmup, planned_at, planned",
    [(30, 8, 16), (30, 12, 16), (30, 8, 25), (30, 8, 200), (30, 40, 60), (5, 3, 7)],
)
def test_a_time_budget_plan_changes_the_rate_without_a_jump(schedule, warmup, planned_at, planned):
    """Before the plan the rate follows train.steps=100,000: a warmup of 30, so steps 0-7 ran at 1/30 to 8/30
    of the peak. A plan of 16 steps made at step 8 shortens the warmup to 8, and step 8 jumped to the peak.
    Now the rate rises from where it stood by at most one planned warmup increment a step, does not fall at
    the plan (a decay starts after it), and the plan's last step still gets the final rate."""
    optim = OptimConfig(warmup_steps=warmup, schedule=schedule, min_lr_ratio=0.1)
    before = [lr_factor(s, optim, 100_000) for s in range(planned_at)]
    after = [
        lr_factor(s, optim, planned, planned_at=planned_at, total_before_plan=100_000)
        for s in range(planned_at, planned)
    ]
    factors = before + after
    increment = 1 / min(warmup, planned // 2)
    assert max(b - a for a, b in zip(factors, factors[1:])) <= increment + 1e-12
    assert factors[planned_at] >= factors[planned_at - 1]
    assert factors[-1] == 0.1
    # With the plan, the steps before it get the schedule they ran at: one function describes the whole run.
    assert [lr_factor(s, optim, planned, planned_at, 100_000) for s in range(planned_at)] == before


def test_bad_optimizer_settings_name_the_key():
    with pytest.raises(ConfigError, match="optim.schedule='step'"):
        load_config(None, ["--optim.schedule=step"])
    with pytest.raises(ConfigError, match="optim.decay_fraction=0.0"):
        load_config(None, ["--optim.decay_fraction=0"])
    with pytest.raises(ConfigError, match="optim.decay_fraction=1.5"):
        load_config(None, ["--optim.decay_fraction=1.5"])
    with pytest.raises(ConfigError, match="optim.name='sgd'"):
        load_config(None, ["--optim.name=sgd"])
    with pytest.raises(ConfigError, match="train.time_budget_s"):
        load_config(None, ["--train.time_budget_s=0"])


def test_muon_on_a_torch_without_it_is_a_config_error(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ConfigError, match="optim.name=muon needs torch.optim.Muon"):
        load_config(None, ["--optim.name=muon"])


def groups_by_name(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        {
            "kind": type(opt).__name__,
            "weight_decay": g["weight_decay"],
            "lr": g["peak_lr"],
            "names": sorted(names[id(p)] for p in g["params"]),
        }
        for opt in optimizer
        for g in opt.param_groups
    ]


def test_adamw_decays_matrices_only():
    model = Transformer(PRESETS["debug"])
    groups = groups_by_name(model, build_optimizer(model, OptimConfig(weight_decay=0.1), CPU, "fp32"))
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(not n.endswith("norm.weight") for n in decay["names"])
    assert all(n.endswith("norm.weight") for n in no_decay["names"])
    assert len(decay["names"]) + len(no_decay["names"]) == len(list(model.parameters()))


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = Transformer(PRESETS["debug"])
    optim = OptimConfig(name="muon", lr=3e-3, muon_lr=0.02, weight_decay=0.1, muon_weight_decay=0.0)
    muon, adamw_decay, adamw_no_decay = groups_by_name(model, build_optimizer(model, optim, CPU, "fp32"))
    assert muon["kind"] == "ShardedMuon" and muon["lr"] == 0.02 and muon["weight_decay"] == 0.0
    assert all(".layers." in n and n.endswith("proj.weight") for n in muon["names"])
    assert len(muon["names"]) == 7 * PRESETS["debug"].n_layers  # q k v o gate up down
    assert (
        adamw_decay["names"] == ["lm_head.weight", "model.embed_tokens.weight"] and adamw_decay["lr"] == 3e-3
    )
    assert all(n.endswith("norm.weight") for n in adamw_no_decay["names"])
    assert not is_hidden_matrix("model.embed_tokens.weight", model.model.embed_tokens.weight)


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)], ids=["tall", "wide"])
def test_sharded_muon_on_plain_tensors_is_torch_muon_exactly(shape):
    generator = torch.Generator().manual_seed(0)
    ours, reference = (
        torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(1))) for _ in range(2)
    )
    ours_opt = ShardedMuon([ours], lr=0.02, weight_decay=0.1, momentum=0.95)
    reference_opt = torch.optim.Muon([reference], lr=0.02, weight_decay=0.1, momentum=0.95)
    for _ in range(4):
        grad = torch.randn(*shape, generator=generator)
        ours.grad, reference.grad = grad.clone(), grad.clone()
        ours_opt.step()
        reference_opt.step()
    assert torch.equal(ours, reference)
    assert torch.equal(
        ours_opt.state[ours]["momentum_buffer"], reference_opt.state[reference]["momentum_buffer"]
    )


def test_newton_schulz_computes_in_the_training_precision():
    assert [newton_schulz_dtype(p) for p in ("bf16", "fp16", "fp32")] == [
        torch.bfloat16,
        torch.float16,
        torch.float32,
    ]


@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e6])
def test_fp16_newton_schulz_normalises_in_fp32_so_tiny_and_huge_momenta_survive(scale):
    """Entries of 1e-9 underflow to zero in fp16 and entries of 1e6 overflow: cast before the division by the
    norm, they gave zeros and NaN. Normalised first, fp16 stays within 2e-3 of the fp32 result (bf16 within
    1e-2), here and on a matrix of equal singular values, which pass the quintic's peak together (the largest
    intermediates we found)."""
    coefficients = torch.optim._muon.DEFAULT_A, torch.optim._muon.DEFAULT_B, torch.optim._muon.DEFAULT_C
    generator = torch.Generator().manual_seed(0)
    flat = torch.linalg.qr(torch.randn(96, 64, generator=generator))[0].T
    for grad in (torch.randn(64, 96, generator=generator) * scale, flat * scale):
        half = newton_schulz(grad, coefficients, 5, 1e-7, torch.float16)
        full = newton_schulz(grad, coefficients, 5, 1e-7, torch.float32)
        assert half.dtype == torch.float16 and full.dtype == torch.float32
        assert (half.float() - full).abs().max() < 2e-3


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield DistEnv(rank=0, world_size=1, local_rank=0, device=CPU)
    dist.destroy_process_group()


def tiny_batch(seed: int, rows: int = 4, seq: int = 16):
    tokens = torch.randint(
        0, PRESETS["debug"].vocab_size, (rows, seq + 1), generator=torch.Generator().manual_seed(seed)
    )
    return tokens[:, :-1], tokens[:, 1:]


def test_fsdp_muon_step_equals_unsharded_torch_muon(one_process_group):
    """The 1-rank FSDP2 run through our optimizer and train_step equals plain torch.optim.Muon + AdamW
    on an unsharded copy of the model, Newton-Schulz computing in bf16 in both."""
    config = load_config(
        None,
        [
            "--optim.name=muon",
            "--optim.grad_clip=0",
            "--train.loss_chunk_tokens=0",
            "--parallel.mixed_precision=fp32",
        ],
    )
    reference = Transformer(config.model)
    reference.init_weights(0)
    sharded = Transformer(config.model)
    sharded.load_state_dict(reference.state_dict())
    sharded = parallelize(sharded, config.parallel, one_process_group)
    # Newton-Schulz in bf16, as torch.optim.Muon computes it, although the model computes in fp32.
    optimizer = build_optimizer(sharded, config.optim, CPU, "bf16")
    hidden = [p for n, p in reference.named_parameters() if is_hidden_matrix(n, p)]
    rest = [p for n, p in reference.named_parameters() if not is_hidden_matrix(n, p)]
    reference_muon = torch.optim.Muon(
        hidden,
        lr=config.optim.muon_lr,
        momentum=config.optim.muon_momentum,
        weight_decay=config.optim.muon_weight_decay,
    )
    reference_adamw = torch.optim.AdamW(
        [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=config.optim.lr,
        betas=tuple(config.optim.betas),
        eps=config.optim.eps,
    )
    layout = BatchLayout(global_rows=4, rows_per_rank=4, micro_batch_size=4, seq_len=16)
    for seed in range(3):
        inputs, labels = tiny_batch(seed)
        TrainingStep.of(config, sharded, optimizer, layout, CPU, scaler=None).step((inputs, labels), 1.0)
        loss = reference(inputs, labels=labels) / labels.numel()
        loss.backward()
        reference_muon.step()
        reference_adamw.step()
        reference.zero_grad()
    for (name, ours), theirs in zip(sharded.named_parameters(), reference.parameters()):
        assert torch.allclose(ours.full_tensor(), theirs, rtol=0, atol=1e-6), name


def test_grad_clip_zero_means_no_clipping(one_process_group):
    def updated_weights(clip: str) -> torch.Tensor:
        config = load_config(None, [f"--optim.grad_clip={clip}", "--parallel.mixed_precision=fp32"])
        model = Transformer(config.model)
        model.init_weights(0)
        model = parallelize(model, config.parallel, one_process_group)
        optimizer = build_optimizer(model, config.optim, CPU, "fp32")
        layout = BatchLayout(global_rows=4, rows_per_rank=4, micro_batch_size=4, seq_len=16)
        for seed in range(2):
            TrainingStep.of(config, model, optimizer, layout, CPU, scaler=None).step(tiny_batch(seed), 1.0)
        return model.lm_head.weight.full_tensor().clone()

    unclipped = updated_weights("1e9")
    assert torch.equal(updated_weights("0"), unclipped)
    assert torch.equal(updated_weights("null"), unclipped)
    assert not torch.equal(updated_weights("1e-3"), unclipped), "a small limit must change the update"


SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_every_shipped_config_splits_over_1_2_4_and_8_ranks(path, world_size):
    config = load_config(path)
    layout = BatchLayout.of(config.train, config.data.seq_len, world_size)
    assert layout.rows_per_rank * world_size == layout.global_rows
    assert layout.micro_batch_size <= config.train.micro_batch_size
    assert layout.accumulation_steps * layout.micro_batch_size == layout.rows_per_rank


def test_micro_batch_is_a_maximum_and_only_an_uneven_global_batch_fails():
    debug = load_config(REPO / "configs/debug.yaml")  # 16 rows, micro-batch 16
    assert BatchLayout.of(debug.train, debug.data.seq_len, 2).micro_batch_size == 8
    odd = dataclasses.replace(debug, train=dataclasses.replace(debug.train, micro_batch_size=6))
    assert (
        BatchLayout.of(odd.train, odd.data.seq_len, 1).micro_batch_size == 4
    )  # the largest divisor of 16 up to 6
    three_rows = dataclasses.replace(debug, train=dataclasses.replace(debug.train, tokens_per_step=3 * 128))
    with pytest.raises(ConfigError, match="do not divide over world_size=2"):
        BatchLayout.of(three_rows.train, three_rows.data.seq_len, 2)


def test_budget_plan_fits_the_measured_costs_and_refuses_a_budget_too_small(monkeypatch):
    config = load_config(
        None,
        [
            "--train.time_budget_s=100",
            "--train.steps=100000",
            "--train.budget_safety=0",
            "--train.eval_every=10",
            "--checkpoint.every=50",
        ],
    )
    plan = plan_steps(
        config.train, config.checkpoint.every, step=8, step_s=1.0, eval_s=2.0, checkpoint_s=5.0, age_s=20.0
    )
    total = plan.planned_steps  # 80 s left: steps + an evaluation every 10 + checkpoints, finals included

    def cost(n: int) -> float:
        return (n - 8) + 2.0 * (n // 10 - 0 + (n % 10 > 0)) + 5.0 * (n // 50 + (n % 50 > 0))

    assert cost(total) <= 80 < cost(total + 1)
    check_budget_plan(plan)  # fits: no error
    assert (
        plan_steps(dataclasses.replace(config.train, steps=20), 50, 8, 1.0, 2.0, 5.0, 20.0).planned_steps
        == 20
    ), "train.steps caps the plan"

    too_small = plan_steps(
        config.train, config.checkpoint.every, step=8, step_s=1.0, eval_s=2.0, checkpoint_s=5.0, age_s=99.0
    )
    with pytest.raises(
        BudgetError,
        match="train.time_budget_s=100 is too small: 99 s are gone after 8 steps, warm-up and timed",
    ):
        check_budget_plan(too_small)


def test_the_budget_times_a_warm_evaluation():
    """A compiled model compiles its evaluation graphs in the first evaluation (28x a warm one, debug
    model): the plan must charge every evaluation what a warm one costs, so the first is not the one timed.
    Run.plan_budget times its own evaluation and checkpoint and passes the seconds to the boundary."""
    now, calls, planned = [0.0], [], {}

    def validate(warm_up: bool = False) -> None:
        calls.append(warm_up)
        now[0] += 11.5 if len(calls) == 1 else 0.4  # the first pass compiles, whichever it is

    def save() -> None:
        now[0] += 2.0

    def plan(step, eval_s, checkpoint_s, age_s, is_main, write_s):
        planned.update(eval_s=eval_s, checkpoint_s=checkpoint_s)
        return BudgetPlan(20, 0.1, eval_s, checkpoint_s, step, 100.0, age_s)

    run = SimpleNamespace(
        validate=validate,
        save=save,
        clock=SimpleNamespace(wall=lambda: now[0]),
        boundary=SimpleNamespace(plan=plan),
        progress=SimpleNamespace(step=8),
        env=SimpleNamespace(is_main=True),
        total_steps=20,
        logger=SimpleNamespace(log=lambda record, total_steps: None),
        checkpointer=SimpleNamespace(update_meta=lambda step, **fields: None, wait=lambda: None),
    )
    Run.plan_budget(run)
    assert calls == [True, False]
    assert planned == {"eval_s": pytest.approx(0.4), "checkpoint_s": pytest.approx(2.0)}
