"""HSDP: the 2-D (replicate, shard) mesh, on CPU with gloo.

The mesh's shape and its one-line refusals, the memory estimate's shard count, and then two kinds of
launches. One 4-process launch of tests/hsdp_worker.py runs every mesh, micro-batch, optimizer and precision
case through parallelize and TrainingStep, counting each case's second step's collectives; a 1-process launch
beside it gives the 1-rank curves. A chain of trainer runs resumes one run across meshes (2x2 -> 1x4 -> 4x1
-> one process). Each 4-process launch costs ~10 s before any work on the 2-core test machine; measured
there (with other work running, load ~7): the worker launches 48-53 s, the resume chain 90-92 s, the rest
under a second, 144 s for the file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_on_two_nodes
from test_train import assert_close_losses, environment, run, tiny_overrides, train_losses

from dist_llama.comm_model import StepLayout, step_collectives
from dist_llama.config import ConfigError, load_config
from dist_llama.memory import StepShape, check_memory_fits, estimate_memory
from dist_llama.metrics import read_environment
from dist_llama.model import PRESETS, count_parameters
from dist_llama.parallel import mesh_shape, training_precision
from dist_llama.report import read_metrics

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "hsdp_worker.py"
MESHES = {
    "flat": ["--parallel.replicate=1"],
    "hsdp": ["--parallel.replicate=2", "--parallel.shard=2"],
    "ddp": ["--parallel.shard=1"],
}
MICRO = {1: ["--train.micro_batch_size=4"], 4: ["--train.micro_batch_size=1"]}  # micro-batches at 4 ranks
OPTIMIZERS = {"adamw": [], "muon": ["--optim.name=muon"]}
VARIANTS = {  # 4 micro-batches, AdamW, on the flat and the HSDP mesh
    "last": ["--parallel.reduce_grads=last_micro"],
    "bf16reduce": ["--parallel.reduce_dtype=bf16"],
    "bf16": ["--parallel.mixed_precision=bf16"],
    # A loss scale this high overflows in the first steps: every rank must skip the same steps.
    "fp16": ["--parallel.mixed_precision=fp16", f"--parallel.initial_loss_scale={2**20}"],
}
RESHARD = {policy: [f"--parallel.reshard_after_forward={policy}"] for policy in ("always", "never")}


def four_rank_cases() -> dict[str, list[str]]:
    cases = {
        f"{mesh}-{optimizer}-{micro}": MESHES[mesh] + OPTIMIZERS[optimizer] + MICRO[micro]
        for mesh in ("flat", "hsdp")
        for optimizer in OPTIMIZERS
        for micro in MICRO
    }
    cases["ddp-adamw-4"] = MESHES["ddp"] + MICRO[4]
    cases["hsdp-ac-4"] = MESHES["hsdp"] + MICRO[4] + ["--parallel.activation_checkpointing=full"]
    for variant, overrides in VARIANTS.items():
        for mesh in ("flat", "hsdp"):
            cases[f"{mesh}-{variant}-4"] = MESHES[mesh] + MICRO[4] + overrides
    for policy, overrides in RESHARD.items():
        cases[f"hsdp-{policy}-4"] = MESHES["hsdp"] + MICRO[4] + overrides
    # 250 rows of the embedding and output head over 4 shard ranks: FSDP2 pads them to 252.
    cases["flat-padded-1"] = MESHES["flat"] + MICRO[1] + ["--model.vocab_size=250"]
    return cases


ONE_RANK_CASES = {
    f"one-{name}": overrides + ["--train.micro_batch_size=16"] for name, overrides in OPTIMIZERS.items()
}


def worker_command(nproc: int, out: Path, cases: dict[str, list[str]]) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, str(WORKER), str(out), *(f"{name}={','.join(o)}" for name, o in cases.items())]


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> dict[str, dict]:
    """Every case's losses, grad norms, overflows and counted collectives: the 4-rank and 1-rank launches run
    side by side (~55 s together when measured; the 1-rank one is the shorter)."""
    folder = tmp_path_factory.mktemp("hsdp")
    launches = [
        (folder / "four.json", worker_command(4, folder / "four.json", four_rank_cases())),
        (folder / "one.json", worker_command(1, folder / "one.json", ONE_RANK_CASES)),
    ]
    processes = [
        subprocess.Popen(
            command, cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _, command in launches
    ]
    results = {}
    for (out, _), process in zip(launches, processes):
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-5000:]
        results.update(json.loads(out.read_text()))
    return results


def curve(result: dict, key: str = "loss") -> dict[int, float]:
    return dict(enumerate(result[key], start=1))


# --- the mesh's shape ------------------------------------------------------------------------------------


def parallel(*overrides: str):
    return load_config(None, list(overrides)).parallel


def test_the_default_mesh_shards_within_a_node_and_replicates_across_nodes():
    assert mesh_shape(parallel(), 16, 8)[0] == (2, 8)  # two nodes of 8 GPUs: HSDP
    assert mesh_shape(parallel(), 8, 8)[0] == (1, 8)  # one node: plain FSDP
    assert mesh_shape(parallel(), 1, 1)[0] == (1, 1)
    assert mesh_shape(parallel(), 4, 1)[0] == (1, 4)  # one rank per node: FSDP over the nodes, not DDP
    assert mesh_shape(parallel(), 12, 8)[0] == (1, 12)  # nodes of unequal size: plain FSDP
    assert mesh_shape(parallel("--parallel.replicate=4"), 16, 8)[0] == (4, 4)
    assert mesh_shape(parallel("--parallel.shard=16"), 16, 8)[0] == (1, 16)
    assert mesh_shape(parallel("--parallel.shard=1"), 4, 4)[0] == (4, 1)  # DDP-like
    assert mesh_shape(parallel("--parallel.replicate=2", "--parallel.shard=2"), 4, 4)[0] == (2, 2)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["--parallel.replicate=3"],
            "parallel.replicate=3 does not divide the 8 ranks of the run; choose one of 1, 2, 4, 8",
        ),
        (["--parallel.shard=5"], "parallel.shard=5 does not divide the 8 ranks"),
        (
            ["--parallel.replicate=2", "--parallel.shard=2"],
            "parallel.replicate=2 x parallel.shard=2 is 4 ranks, but the run has 8",
        ),
    ],
)
def test_a_mesh_that_does_not_make_the_world_stops_in_one_line(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as error:
        mesh_shape(parallel(*overrides), 8, 8)
    assert "\n" not in str(error.value)


def test_the_new_keys_are_checked_and_may_change_on_resume():
    with pytest.raises(ConfigError, match="parallel.reduce_grads='often' is not valid"):
        parallel("--parallel.reduce_grads=often")
    with pytest.raises(ConfigError, match="parallel.shard=0 must be positive"):
        parallel("--parallel.shard=0")
    from dist_llama.config.recipe import is_resumable

    assert all(is_resumable(f"parallel.{key}") for key in ("replicate", "shard", "reduce_grads"))
    assert not is_resumable("parallel.reduce_dtype"), "a resume in another reduce dtype is a recipe change"


# --- memory ----------------------------------------------------------------------------------------------

MAIN_STEP = StepShape(PRESETS["main"], "bf16", "adamw", 8, 1024, "none", 16, 4096, rows_per_rank=32)


def test_the_state_is_sharded_over_one_replica_and_last_micro_keeps_whole_gradients():
    total = count_parameters(PRESETS["main"])["total"]
    flat, hsdp = estimate_memory(MAIN_STEP), estimate_memory(StepShape(**{**vars(MAIN_STEP), "replicate": 2}))
    assert flat.weights == 4 * total / 16 and hsdp.weights == 4 * total / 8
    assert hsdp.optimizer == 2 * flat.optimizer and hsdp.activations == flat.activations
    last = StepShape(**{**vars(MAIN_STEP), "reduce_grads": "last_micro"})
    assert estimate_memory(last).gradients - flat.gradients == 4 * total  # fp32 whole gradients
    bf16 = StepShape(**{**vars(last), "reduce_dtype": "bf16"})
    assert estimate_memory(bf16).gradients - flat.gradients == 2 * total
    one_micro_batch = StepShape(**{**vars(last), "micro_batch": 32})
    assert not one_micro_batch.keeps_unsharded_grads, "with one micro-batch nothing waits"


def test_blocks_kept_gathered_cost_every_block_s_16_bit_parameters():
    kept = StepShape(**{**vars(MAIN_STEP), "reshard_after_forward": "never"})
    always = StepShape(**{**vars(MAIN_STEP), "reshard_after_forward": "always"})
    args = PRESETS["main"]
    per_block = (count_parameters(args)["non_embedding"] - args.dim) // args.n_layers
    assert estimate_memory(always) == estimate_memory(MAIN_STEP), "default and always peak alike"
    # every block's bf16 parameters, less the prefetched block the policies that free them hold
    extra = (args.n_layers - 2) * 2 * per_block
    assert estimate_memory(kept).gathered - estimate_memory(MAIN_STEP).gathered == extra
    least = {"micro_batch": 1, "checkpointing": "full"}
    capacity = estimate_memory(StepShape(**{**vars(MAIN_STEP), **least})).total + 1
    with pytest.raises(ConfigError, match="checkpointing=full --parallel.reshard_after_forward=default fits"):
        check_memory_fits(StepShape(**{**vars(kept), **least}), capacity)


def test_a_step_that_fits_only_unreplicated_names_the_setting():
    shape = StepShape(**{**vars(MAIN_STEP), "world_size": 64, "replicate": 64, "reduce_grads": "last_micro"})
    least = {"replicate": 1, "reduce_grads": "every_micro", "micro_batch": 1, "checkpointing": "full"}
    capacity = estimate_memory(StepShape(**{**vars(shape), **least})).total
    with pytest.raises(ConfigError, match="--parallel.reduce_grads=every_micro --parallel.replicate=1 fits"):
        check_memory_fits(shape, capacity + 1)


# --- one 4-process launch: meshes, micro-batches, optimizers, precisions ----------------------------------


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("micro", MICRO)
def test_hsdp_and_ddp_give_the_curves_of_flat_fsdp_and_of_one_rank(worker, optimizer, micro):
    """fp32: the losses and gradient norms of each mesh, with 1 or 4 micro-batches, are the 1-rank run's
    within the suite's tolerance for a change of world size. A gradient missing a replica's half, a norm
    summed over the copies, or Muon orthogonalising a shard would each differ by far more."""
    one = worker[f"one-{optimizer}"]
    meshes = ["flat", "hsdp"] + (["ddp"] if (optimizer, micro) == ("adamw", 4) else [])
    for mesh in meshes:
        result = worker[f"{mesh}-{optimizer}-{micro}"]
        assert (
            result["micro_batches"] == micro
            and result["mesh"] == {"flat": [1, 4], "hsdp": [2, 2], "ddp": [4, 1]}[mesh]
        )
        assert_close_losses(curve(result), curve(one), rel=1e-5)
        assert_close_losses(curve(result, "grad_norm"), curve(one, "grad_norm"), rel=1e-5)
    assert curve(one)[6] < curve(one)[1] - 0.2, "the loss must move, or equal curves prove little"


def test_reduce_scatter_after_the_last_micro_batch_only_gives_the_same_curve(worker):
    for mesh in ("flat", "hsdp"):
        assert_close_losses(curve(worker[f"{mesh}-last-4"]), curve(worker[f"{mesh}-adamw-4"]), rel=1e-5)


def test_checkpointed_blocks_defer_the_all_reduce_too(worker):
    """Activation checkpointing wraps each block before FSDP2 shards it: the deferral reaches those units as
    well (one all-reduce per unit, on the last micro-batch), and the curve is the unwrapped one's."""
    assert counted(worker["hsdp-ac-4"]) == counted(worker["hsdp-adamw-4"])
    assert_close_losses(curve(worker["hsdp-ac-4"]), curve(worker["hsdp-adamw-4"]), rel=1e-6)


def test_bf16_reduction_halves_the_bytes_and_moves_the_loss_little(worker):
    """parallel.reduce_dtype=bf16 over 6 steps, 4 micro-batches: the losses left fp32 reduction's by 2.6e-5
    (flat) and 2.9e-5 (HSDP, whose partial sums across micro-batches are bf16 too) at most, the gradient norms
    by 1e-3; the reduce-scatters and all-reduces carry half the bytes."""
    for mesh in ("flat", "hsdp"):
        bf16, fp32 = worker[f"{mesh}-bf16reduce-4"], worker[f"{mesh}-adamw-4"]
        assert bf16["loss"] != fp32["loss"], "the setting must act"
        assert_close_losses(curve(bf16), curve(fp32), rel=1e-4)
        reductions = {
            tuple(row[:3]): row[3:]
            for row in bf16["collectives"]
            if row[1] in ("reduce_scatter", "all_reduce")
        }
        for row in fp32["collectives"]:
            if row[1] in ("reduce_scatter", "all_reduce") and row[0] != "step":
                assert reductions[tuple(row[:3])] == ["bfloat16", row[4], row[5] // 2], row


def test_16_bit_compute_on_the_hsdp_mesh_is_flat_fsdp_s(worker):
    """bf16 and fp16 compute (fp16 with its loss scaler, started high enough to overflow): HSDP gives flat
    FSDP's curve, and every rank skips the same steps."""
    for precision in ("bf16", "fp16"):
        hsdp, flat = worker[f"hsdp-{precision}-4"], worker[f"flat-{precision}-4"]
        assert_close_losses(curve(hsdp), curve(flat), rel=1e-5)
        for result in (hsdp, flat):
            assert all(ranks == result["overflow"][0] for ranks in result["overflow"]), result["overflow"]
    overflows = worker["hsdp-fp16-4"]["overflow"][0]
    assert any(overflows) and not all(overflows), overflows
    assert_close_losses(curve(worker["hsdp-bf16-4"]), curve(worker["one-adamw"]), rel=1e-3)  # 1.7e-4 measured


# --- the collectives of one step -------------------------------------------------------------------------


def modelled(case: str, result: dict) -> dict:
    """The communication model's table (dist_llama.comm_model) for a 4-rank case: from the model's shapes and
    the case's settings alone, never from what the worker counted."""
    from hsdp_worker import BASE

    config = load_config(None, BASE + four_rank_cases()[case])
    precision = training_precision(config.parallel, torch.device("cpu"))[0]
    layout = StepLayout.of(config, tuple(result["mesh"]), result["micro_batches"], precision)
    return step_collectives(config.model, layout)


def counted(result: dict) -> dict:
    return {tuple(row[:4]): row[4:] for row in result["collectives"]}


def test_the_communication_model_counts_every_collective_of_a_step_exactly(worker):
    """Every 4-rank case (flat, HSDP and DDP-like meshes; 1 and 4 micro-batches; AdamW and Muon;
    reduce-scatter deferred; bf16 reduction and compute; reshard policies; a vocabulary whose rows do not
    divide over the ranks): which collectives, on which mesh dimension, in which dtype, how many and how many
    bytes, per micro-batch and for the rest of the step, as the recorder counted them. fp16 adds its scaler's
    overflow agreement, which the model leaves out (a 4-byte flag)."""
    cases = [case for case in four_rank_cases() if "fp16" not in case]
    for case in cases:
        assert counted(worker[case]) == modelled(case, worker[case]), case
    per_micro_batch = {
        row[0]: row[4] for row in worker["hsdp-adamw-4"]["collectives"] if row[1] == "all_gather"
    }
    layers = load_config(None, ["--model.vocab_size=256"]).model.n_layers
    # The root once, each block in forward, and each block but the last again in backward.
    assert per_micro_batch == {f"micro-batch {i}": 1 + 2 * layers - 1 for i in range(1, 5)}


def test_reshard_policies_change_the_all_gathers_not_the_curve(worker):
    """default frees every block but the last after its forward, always every block, never none (no all-gather
    in backward); the losses are the same to the bit."""
    gathers = {
        policy: sum(
            row[4]
            for row in worker[f"hsdp-{policy}-4"]["collectives"]
            if row[:2] == ["micro-batch 1", "all_gather"]
        )
        for policy in ("adamw", "always", "never")
    }
    layers = load_config(None, ["--model.vocab_size=256"]).model.n_layers
    assert gathers == {"adamw": 2 * layers, "always": 2 * layers + 1, "never": layers + 1}
    for policy in ("always", "never"):
        assert worker[f"hsdp-{policy}-4"]["loss"] == worker["hsdp-adamw-4"]["loss"], policy


def test_last_micro_reduces_once_and_holds_the_whole_gradient_the_estimate_counts(worker):
    total = sum(row[5] for row in worker["flat-adamw-1"]["collectives"] if row[1] == "reduce_scatter")
    for mesh in ("flat", "hsdp"):
        reduce_scatters = [
            row for row in worker[f"{mesh}-last-4"]["collectives"] if row[1] == "reduce_scatter"
        ]
        assert [row[0] for row in reduce_scatters] == ["micro-batch 4"], reduce_scatters
        assert worker[f"{mesh}-last-4"]["held_after_micro_1"]["unsharded"] == total  # 4 bytes per parameter
    shape = StepShape(PRESETS["debug"], "fp32", "adamw", 1, 32, "none", 4, 0, rows_per_rank=4)
    extra = estimate_memory(StepShape(**{**vars(shape), "reduce_grads": "last_micro"})).gradients
    assert extra - estimate_memory(shape).gradients == 4 * count_parameters(PRESETS["debug"])["total"]
    # HSDP's deferred all-reduce: a partial sum the size of the sharded gradient, which does not exist yet.
    held = worker["hsdp-adamw-4"]["held_after_micro_1"]
    assert held == {"unsharded": 0, "partial": total // 2, "sharded": 0}


def test_ddp_like_mesh_only_all_reduces(worker):
    """replicate=4, shard=1: FSDP2 skips its all-gathers and reduce-scatters over a shard group of one rank;
    one all-reduce per unit of the whole gradient on the last micro-batch, and the loss's."""
    ops = {(row[0], row[1], row[2]): row[4] for row in worker["ddp-adamw-4"]["collectives"]}
    assert ops == {("micro-batch 4", "all_reduce", "replicate"): 3, ("step", "all_reduce", "replicate"): 1}


# --- the trainer: one run resumed across meshes ------------------------------------------------------------

RESUMES = [(4, "1x4", MESHES["flat"]), (4, "4x1", MESHES["ddp"]), (1, "one process", [])]


def run_on_two_nodes(args: list[str]) -> str:
    """The trainer on two "nodes" of 2 processes each, as slurm/train.sbatch launches one agent per node."""
    return train_on_two_nodes(args, 2, environment(), "dist_llama_hsdp_test")


def test_a_run_resumes_across_meshes(corpus, tmp_path):
    """A trainer run of 8 steps on two "nodes" of 2 processes (two torchrun agents), where the default mesh is
    2x2 HSDP, saves every 2 steps. A copy of it from its step-2 checkpoint on
    (its later checkpoints and metrics removed) resumes on 1x4 for 2 steps, then on 4x1, then on one
    process: steps 3 to 8 are the 2x2 run's within the tolerance of a change of world size. A constant
    learning rate (no warmup, no decay) keeps the schedule as it was when train.steps is raised at each
    resume. ~95 s: three 4-process launches and one of one process."""
    constant = ["--optim.warmup_steps=0", "--optim.min_lr_ratio=1.0", "--checkpoint.every=2"]
    # Muon: its momentum (sharded like its matrices) and AdamW's moments (the rest) both reshard.
    settings = constant + ["--optim.name=muon", "--checkpoint.keep_last=4", "--train.eval_every=100"]
    output = run_on_two_nodes(tiny_overrides(*corpus, tmp_path, "hsdp") + settings + ["--train.steps=8"])
    assert "mesh: HSDP, 2 replicas x 2 shard ranks (auto: 2 nodes of 2 ranks)" in output, output[-3000:]
    chain = tmp_path / "chain"
    shutil.copytree(tmp_path / "hsdp", chain)
    (chain / "metrics.jsonl").unlink()
    for step in (4, 6, 8):
        shutil.rmtree(chain / "checkpoints" / f"step_{step:08d}")
    for index, (nproc, mesh, overrides) in enumerate(RESUMES, start=2):
        args = (
            tiny_overrides(*corpus, tmp_path, "chain") + settings + overrides + [f"--train.steps={2 * index}"]
        )
        result = run(nproc, args)
        assert f"step_{2 * index - 2:08d} at step {2 * index - 2}" in result.stderr, (
            mesh,
            result.stderr[-2000:],
        )
    meshes = [(start["mesh"]["replicate"], start["mesh"]["shard"]) for start in read_environment(chain)]
    assert meshes == [(2, 2), (1, 4), (4, 1), (1, 1)], "environment.json records each start's mesh"
    chained, uninterrupted = train_losses(chain), train_losses(tmp_path / "hsdp")
    assert sorted(chained) == list(range(3, 9))
    assert_close_losses(chained, uninterrupted, rel=1e-5, steps=list(range(3, 9)))
    # Each run validates after its last step: the one process's validation is the 2x2 mesh's.
    validated = {
        name: {r["step"]: r["val_loss"] for r in read_metrics(tmp_path / name)[1]}
        for name in ("chain", "hsdp")
    }
    assert abs(validated["chain"][8] - validated["hsdp"][8]) <= 1e-5 * validated["hsdp"][8], validated
