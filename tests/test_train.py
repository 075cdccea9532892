"""Distributed training on CPU (gloo): world-size invariance, activation checkpointing, exact resume.

Each launch costs several seconds, so the runs are made once per module and shared by the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import train_on_two_nodes

from dist_llama.checkpoint import CheckpointMeta
from dist_llama.config import ConfigError, load_config, to_dict
from dist_llama.report import read_metrics
from dist_llama.resume import recipe_history, resumed_precision

REPO = Path(__file__).resolve().parents[1]
STEPS, CHECKPOINT_AT = 12, 6


MUON = ["--optim.name=muon", "--optim.schedule=wsd", "--optim.muon_lr=0.02"]


def tiny_overrides(corpus: Path, val: Path, run_root: Path, name: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs/debug.yaml"),
        f"--data.paths=[{corpus}]",
        f"--data.val_paths=[{val}]",
        "--data.tokenizer=offline",
        "--data.seq_len=32",
        "--data.val_docs=8",
        f"--train.run_root={run_root}",
        f"--train.name={name}",
        f"--train.steps={STEPS}",
        "--train.tokens_per_step=256",
        "--train.micro_batch_size=2",
        "--train.log_every=1",
        "--train.eval_every=6",
        "--train.eval_batches=1",
        f"--checkpoint.every={CHECKPOINT_AT}",
        "--checkpoint.keep_last=3",
        "--logging.tensorboard=false",
        "--parallel.mixed_precision=fp32",
    ]


def command(nproc: int, args: list[str], program: tuple[str, ...] = ("-m", "dist_llama.train")) -> list[str]:
    """The trainer (or another program taking its arguments) on one process, or under torchrun."""
    if nproc == 1:
        return [sys.executable, *program, *args]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable, *launcher, *program, *args]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def run(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command(nproc, args), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def train_losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a resumed run appends, and read_metrics keeps the last record of a step."""
    return {record["step"]: record["loss"] for record in read_metrics(run_dir)[0]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """The reference runs, two launches at a time: each spends seconds starting up and waiting on its ranks,
    time the other uses on the 2-core test machine (there: 94 s one after another, 78 s two at a time)."""
    root = tmp_path_factory.mktemp("runs")
    launches = [
        ("one_rank", 1, []),
        ("two_ranks", 2, []),
        ("two_ranks_ac", 2, ["--parallel.activation_checkpointing=full"]),
        ("one_rank_ac", 1, ["--parallel.activation_checkpointing=selective"]),
        ("muon_one_rank", 1, MUON),
        ("muon_two_ranks", 2, MUON),
        ("bf16_two_ranks", 2, ["--parallel.mixed_precision=bf16"]),
        ("fp16_two_ranks", 2, ["--parallel.mixed_precision=fp16"]),
        # A loss scale this high overflows in the first steps and is lowered: the scale is part of the state.
        ("fp16_scaled", 1, ["--parallel.mixed_precision=fp16", f"--parallel.initial_loss_scale={2**20}"]),
    ]

    def launch(name: str, nproc: int, extra: list[str]) -> Path:
        run(nproc, tiny_overrides(*corpus, root, name) + extra)
        return root / name

    with ThreadPoolExecutor(max_workers=2) as pool:
        done = {name: pool.submit(launch, name, nproc, extra) for name, nproc, extra in launches}
        return {name: future.result() for name, future in done.items()}


def test_muon_is_the_same_optimizer_at_one_and_two_ranks(runs):
    """Newton-Schulz must see whole matrices: torch.optim.Muon on FSDP2 shards would orthogonalize each
    rank's half on its own and drift from the 1-rank run within a few steps (5e-3 after 3 steps). What is
    left is the two runs summing gradients in another order; these fp32 runs compute Newton-Schulz in fp32
    (optim.newton_schulz_dtype), and differed by 3.0e-7 at most (bf16 Newton-Schulz: 1.3e-5)."""
    one, two = train_losses(runs["muon_one_rank"]), train_losses(runs["muon_two_ranks"])
    assert sorted(one) == list(range(1, STEPS + 1))
    assert_close_losses(two, one, rel=5e-6)
    adamw = train_losses(runs["one_rank"])
    assert one[STEPS] != adamw[STEPS], "the Muon runs must not be AdamW runs"


def assert_close_losses(got: dict, expected: dict, rel: float, steps=None):
    steps = steps or sorted(expected)
    assert len(steps) >= 6
    for step in steps:
        assert abs(got[step] - expected[step]) <= rel * abs(expected[step]), (step, got[step], expected[step])


def test_one_and_two_ranks_give_the_same_losses(runs):
    one, two = train_losses(runs["one_rank"]), train_losses(runs["two_ranks"])
    assert sorted(one) == list(range(1, STEPS + 1))
    assert_close_losses(two, one, rel=1e-5)
    assert one[STEPS] < one[1], "the loss should fall over a few steps at this learning rate"


def test_activation_checkpointing_does_not_change_losses(runs):
    assert_close_losses(train_losses(runs["two_ranks_ac"]), train_losses(runs["two_ranks"]), rel=1e-6)
    assert_close_losses(train_losses(runs["one_rank_ac"]), train_losses(runs["one_rank"]), rel=1e-6)


def test_run_directory_holds_config_environment_metrics_and_checkpoints(runs):
    run_dir = runs["two_ranks"]
    assert (run_dir / "config.yaml").is_file()
    (environment_record,) = json.loads((run_dir / "environment.json").read_text())  # one start
    assert environment_record["world_size"] == 2 and environment_record["torch"]
    assert environment_record["step"] == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    for key in (
        "step",
        "tokens_seen",
        "loss",
        "grad_norm",
        "lr",
        "tokens_in_batch",
        "tokens_per_s",
        "memory_gib",
        "data_wait",
        "data_wait_s",
    ):
        assert key in train[0], key
    assert all(0 <= r["data_wait"] < 1 and r["data_wait_s"] >= 0 for r in train)
    assert "mfu" not in train[0], "MFU is left out on CPU"
    assert train[-1]["tokens_seen"] == STEPS * 256 and train[0]["tokens_in_batch"] == 256
    assert [r["step"] for r in val] == [6, 12] and all(r["val_loss"] > 0 for r in val)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_00000006", "step_00000012"]


def kill_after_checkpoint(args: list[str], checkpoint: Path) -> None:
    """Start a 2-rank run and SIGKILL every process of it as soon as `checkpoint` is complete."""
    process = subprocess.Popen(
        command(2, args),
        cwd=REPO,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (checkpoint / "meta.json").is_file():
        assert process.poll() is None, "the run ended before writing its checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_sigkill_then_resume_continues_exactly(runs, corpus, tmp_path):
    args = tiny_overrides(*corpus, tmp_path, "killed")
    run_dir = tmp_path / "killed"
    kill_after_checkpoint(args, run_dir / "checkpoints" / f"step_{CHECKPOINT_AT:08d}")
    assert max(train_losses(run_dir)) < STEPS, "the run finished before it was killed; nothing was tested"
    shutil.copytree(run_dir, tmp_path / "killed_copy")

    # (a) Resumed on the same 2 ranks: bitwise the uninterrupted run's losses.
    run(2, args)
    expected = train_losses(runs["two_ranks"])
    resumed = train_losses(run_dir)
    for step in range(CHECKPOINT_AT + 1, STEPS + 1):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])

    # (b) The 2-rank checkpoint resumed on 1 rank: the same token stream, losses within float tolerance.
    one_rank_args = tiny_overrides(*corpus, tmp_path, "killed_copy")
    run(1, one_rank_args)
    assert_close_losses(
        train_losses(tmp_path / "killed_copy"),
        expected,
        rel=1e-5,
        steps=list(range(CHECKPOINT_AT + 1, STEPS + 1)),
    )


def test_a_checkpoint_resumes_from_the_token_cache_on_two_ranks_exactly(runs, corpus, tmp_path):
    """The 1-rank run's checkpoint (tokenized on the fly) resumed on 2 ranks with data.token_cache switched
    on: the cache is built once on the node, the data state is accepted as the same source, and the losses are
    the 2-rank run's (within the float tolerance of a change of world size: other batches would differ by far
    more)."""
    run_dir = tmp_path / "one_rank"
    shutil.copytree(runs["one_rank"], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    result = run(
        2, tiny_overrides(*corpus, tmp_path, "one_rank") + [f"--data.token_cache={tmp_path / 'cache'}"]
    )
    assert (
        f"at step {CHECKPOINT_AT}" in result.stderr and result.stderr.count("token cache: shard 0 done") == 1
    )
    assert_close_losses(
        train_losses(run_dir),
        train_losses(runs["two_ranks"]),
        rel=1e-5,
        steps=list(range(CHECKPOINT_AT + 1, STEPS + 1)),
    )


def test_corrupted_latest_checkpoint_falls_back_and_explicit_path_fails(runs, corpus, tmp_path):
    run_dir = tmp_path / "damaged"
    shutil.copytree(runs["two_ranks"], run_dir)
    latest = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    shard = next(latest.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    # An explicit path to the damaged checkpoint is refused with a message naming the problem.
    args = tiny_overrides(*corpus, tmp_path, "damaged") + [
        f"--checkpoint.resume={latest}",
        f"--train.steps={STEPS + 2}",
    ]
    result = subprocess.run(
        command(1, args), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "checksum mismatch" in result.stderr and "Traceback" not in result.stderr

    # `auto` skips it, resumes from the previous one and redoes the steps after it.
    result = run(1, tiny_overrides(*corpus, tmp_path, "damaged"))
    assert "skipping damaged checkpoint" in result.stderr
    assert f"at step {CHECKPOINT_AT}" in result.stderr


def test_two_node_rendezvous_on_localhost(corpus, tmp_path):
    """Two torchrun agents (--nnodes=2) rendezvous on 127.0.0.1 as slurm/train.sbatch does across nodes."""
    args = tiny_overrides(*corpus, tmp_path, "two_nodes") + ["--train.steps=3", "--checkpoint.every=3"]
    train_on_two_nodes(args, 1, environment(), "dist_llama_test")
    (environment_record,) = json.loads((tmp_path / "two_nodes" / "environment.json").read_text())
    assert environment_record["world_size"] == 2
    assert sorted(train_losses(tmp_path / "two_nodes")) == [1, 2, 3]


def test_slurm_script_is_valid_bash():
    for script in (
        "slurm/train.sbatch",
        "slurm/local_cluster.sh",
        "launch/train.sh",
        "launch/long_context.sh",
    ):
        subprocess.run(["bash", "-n", str(REPO / script)], check=True)


def test_user_mistakes_are_one_line_errors(corpus, tmp_path):
    cases = [
        (["--train.stepz=3"], "unknown key train.stepz"),
        (["--train.tokens_per_step=100"], "must be a multiple of data.seq_len"),
        (["--data.paths=[/nonexistent/*.jsonl]", "--data.source=local"], "/nonexistent"),
        (["--data.seq_len=4096"], "exceeds model.max_seq_len"),
        (["--model.vocab_size=1000"], "vocab"),
    ]
    for extra, message in cases:
        args = tiny_overrides(*corpus, tmp_path, "mistakes") + extra
        result = subprocess.run(
            command(1, args), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300
        )
        assert result.returncode != 0, extra
        assert message in result.stderr, (extra, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (extra, result.stderr[-2000:])


@pytest.mark.parametrize("max_bad_steps, failing_step", [(0, 2), (1, 3)])
def test_non_finite_steps_stop_the_run_naming_the_step(corpus, tmp_path, max_bad_steps, failing_step):
    # lr=1e30: Adam's first update moves every weight by ~1e30, so step 2's gradients overflow.
    args = tiny_overrides(*corpus, tmp_path, "diverged") + [
        "--optim.lr=1e30",
        "--optim.warmup_steps=1",
        f"--train.max_bad_steps={max_bad_steps}",
    ]
    result = subprocess.run(
        command(1, args), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert f"step {failing_step}: non-finite loss or gradient norm" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "diverged" / "checkpoints").exists()


def test_compiled_blocks_train_like_eager_ones(runs, corpus, tmp_path):
    """parallel.compile=true (per-block torch.compile under FSDP2 and activation checkpointing) on CPU,
    against the same 3-step schedule run eager."""
    for name, extra in (("compiled", ["--parallel.compile=true"]), ("eager", [])):
        run(
            1,
            tiny_overrides(*corpus, tmp_path, name)
            + ["--train.steps=3", "--parallel.activation_checkpointing=full", *extra],
        )
    compiled, eager = train_losses(tmp_path / "compiled"), train_losses(tmp_path / "eager")
    for step in (1, 2, 3):
        assert abs(compiled[step] - eager[step]) <= 1e-4 * eager[step], (step, compiled[step], eager[step])


def test_bf16_mixed_precision_trains_close_to_fp32(runs):
    """The GPU's precision path (bf16 compute, fp32 master weights and gradient reduction) on CPU/gloo."""
    bf16, fp32 = train_losses(runs["bf16_two_ranks"]), train_losses(runs["two_ranks"])
    assert_close_losses(bf16, fp32, rel=2e-2)
    assert any(bf16[step] != fp32[step] for step in fp32), "bf16 compute must actually be used"
    assert bf16[STEPS] < bf16[1]


def latest_meta(run_dir: Path) -> dict:
    latest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return json.loads((latest / "meta.json").read_text())


def test_resume_with_a_changed_recipe_stops_unless_allowed(runs, corpus, tmp_path):
    run_dir = tmp_path / "one_rank"
    shutil.copytree(runs["one_rank"], run_dir)
    saved_config = (run_dir / "config.yaml").read_bytes()
    args = tiny_overrides(*corpus, tmp_path, "one_rank") + [f"--train.steps={STEPS + 2}", "--optim.lr=0.1"]
    result = subprocess.run(
        command(1, args), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        "optim.lr: 0.003 -> 0.1" in result.stderr and "--checkpoint.allow_changes=[optim.lr]" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert (run_dir / "config.yaml").read_bytes() == saved_config, (
        "a refused resume must not rewrite config.yaml"
    )

    # Training longer, at another cadence and micro-batch, is no recipe change; a named change is
    # allowed and recorded.
    result = run(
        1,
        args + ["--checkpoint.allow_changes=[optim.lr]", "--train.log_every=2", "--train.micro_batch_size=4"],
    )
    assert "resuming with optim.lr changed on purpose" in result.stderr
    assert latest_meta(run_dir)["recipe_changes"] == [
        {"key": "optim.lr", "old": 0.003, "new": 0.1, "step": STEPS}
    ]
    assert max(train_losses(run_dir)) == STEPS + 2


def test_time_budget_plans_the_steps_and_a_resume_keeps_the_plan(corpus, tmp_path):
    def budget_args(seconds: int) -> list[str]:
        return tiny_overrides(*corpus, tmp_path, "budget") + [
            f"--train.time_budget_s={seconds}",
            "--train.steps=100000",
            "--optim.schedule=wsd",
            "--optim.min_lr_ratio=0.0",
            "--train.log_every=5",
            "--train.eval_every=20",
            "--checkpoint.every=10",
            "--checkpoint.keep_last=100",
        ]

    budget = 30
    started = time.monotonic()
    run(1, budget_args(budget))
    wall = time.monotonic() - started
    run_dir = tmp_path / "budget"
    records, _ = read_metrics(run_dir)
    plans = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"plan"' in line
    ]
    assert len(plans) == 1 and plans[0]["measured_at_step"] == 8  # 3 warm-up + 5 timed steps
    planned = plans[0]["planned_steps"]
    assert 8 < planned < 100000
    assert records[-1]["step"] == planned and records[-1]["lr"] == 0.0, (
        "the last step has the schedule's final rate"
    )
    plan = plans[0]
    # The plan fits the measured costs into what was left (wall time itself depends on the machine's load).
    planned_cost = (
        (planned - 8) * plan["step_s"]
        + (planned // 20 + 1) * plan["eval_s"]
        + (planned // 10 + 1) * plan["checkpoint_s"]
    )
    assert plan["age_s"] + planned_cost <= budget
    assert wall < 3 * budget, f"the run took {wall:.0f} s for a {budget} s budget"
    assert latest_meta(run_dir)["planned_steps"] == planned
    # The checkpoint timed for the plan was saved before the plan existed; it holds the plan all the same,
    # so a run stopped at that step resumes with it.
    at_plan = json.loads((run_dir / "checkpoints" / "step_00000008" / "meta.json").read_text())
    assert at_plan["planned_steps"] == planned
    assert at_plan["budget_plan"] == {k: v for k, v in plan.items() if k not in ("kind", "step")}

    # Resume from a checkpoint taken after planning, with another budget: the planned schedule stands.
    after_plan = [
        c for c in sorted((run_dir / "checkpoints").glob("step_*")) if 8 < int(c.name[5:]) < planned
    ]
    assert after_plan, "no checkpoint between the plan and the end"
    for checkpoint in sorted((run_dir / "checkpoints").glob("step_*")):
        if checkpoint != after_plan[0] and int(checkpoint.name[5:]) > 8:
            shutil.rmtree(checkpoint)
    lr_before = {r["step"]: r["lr"] for r in records}
    run(1, budget_args(5000))
    resumed, _ = read_metrics(run_dir)
    assert resumed[-1]["step"] == planned
    assert {r["step"]: r["lr"] for r in resumed} == lr_before


def test_fp16_with_loss_scaling_trains_close_to_fp32_on_two_ranks(runs):
    """The pre-Ampere path: fp16 compute, fp32 master weights and gradient reduction, a dynamic loss scale
    (test_precision.py shows the compute is fp16)."""
    fp16, fp32 = train_losses(runs["fp16_two_ranks"]), train_losses(runs["two_ranks"])
    assert_close_losses(fp16, fp32, rel=0.02)
    assert fp16 != fp32, "fp16 must not silently train in fp32"
    (environment,) = json.loads((runs["fp16_two_ranks"] / "environment.json").read_text())
    assert environment["precision"] == {"name": "fp16", "why": "set by parallel.mixed_precision"}
    records, _ = read_metrics(runs["fp16_two_ranks"])
    assert all(r["loss_scale"] > 0 and "overflow_steps" in r for r in records)


def test_an_fp16_checkpoint_resumes_with_its_loss_scale_bitwise(runs, corpus, tmp_path):
    """The scaler's state is in every checkpoint: resumed from step 6, the run skips the same overflow steps
    and gives the uninterrupted run's losses and scales bit for bit."""
    original = runs["fp16_scaled"]
    records, _ = read_metrics(original)
    scale = {r["step"]: r["loss_scale"] for r in records}
    assert scale[CHECKPOINT_AT] < 2**20, "an overflow before the checkpoint must have lowered the scale"
    meta = json.loads((original / "checkpoints" / f"step_{CHECKPOINT_AT:08d}" / "meta.json").read_text())
    assert meta["loss_scaler"]["scale"] == scale[CHECKPOINT_AT] and meta["overflow_steps"] > 0
    run_dir = tmp_path / "fp16_scaled"
    shutil.copytree(original, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    extra = ["--parallel.mixed_precision=fp16", f"--parallel.initial_loss_scale={2**20}"]
    result = run(1, tiny_overrides(*corpus, tmp_path, "fp16_scaled") + extra)
    assert f"at step {CHECKPOINT_AT}" in result.stderr
    resumed, _ = read_metrics(run_dir)
    after = [r for r in resumed if r["step"] > CHECKPOINT_AT]
    expected = [r for r in records if r["step"] > CHECKPOINT_AT]
    keys = ("step", "loss", "grad_norm", "loss_scale", "overflow_steps")
    assert [[r[k] for k in keys] for r in after] == [[r[k] for k in keys] for r in expected]


def test_a_collapsing_fp16_loss_scale_stops_the_run_in_one_line(corpus, tmp_path):
    """Overflow steps are skipped, not counted as non-finite steps; a scale that keeps falling (weights blown
    up by a huge rate, so every step overflows) stops the run below parallel.min_loss_scale."""
    args = tiny_overrides(*corpus, tmp_path, "collapse") + [
        "--parallel.mixed_precision=fp16",
        "--optim.lr=1e30",
        "--optim.warmup_steps=1",
        "--train.steps=40",
        # A checkpoint of blown-up weights is refused, which would stop the run first.
        "--checkpoint.every=100",
        "--train.eval_every=100",
    ]
    result = subprocess.run(
        command(1, args), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train: error: step ") and "the fp16 loss scale fell to 0.5, below " in last
    assert "parallel.min_loss_scale=1: the gradients overflow even unscaled" in last
    assert "non-finite loss or gradient norm" not in result.stderr and "Traceback" not in result.stderr


# --- The precision a run computes in, kept on resume --------------------------------------------------

GPU = torch.device("cuda")  # a device name only: the capability query below stands in for the card


def card(major: int, minor: int):
    return lambda device: (major, minor)


def saved_meta(setting: str, precision: str | None) -> CheckpointMeta:
    config = to_dict(load_config(REPO / "configs/debug.yaml", [f"--parallel.mixed_precision={setting}"]))
    return CheckpointMeta(step=40, tokens_seen=0, config=config, precision=precision)


def resume_config(setting: str, *allowed: str):
    overrides = [f"--parallel.mixed_precision={setting}", f"--checkpoint.allow_changes=[{','.join(allowed)}]"]
    return load_config(REPO / "configs/debug.yaml", overrides)


def test_auto_is_decided_when_the_run_starts_and_kept_on_resume():
    # Started with auto on an A100 (bf16), resumed on an H100: still bf16, and on a T4's successor
    # generation the same. Started on a T4 (fp16), resumed on an H100: fp16 goes on, with its loss scale.
    assert resumed_precision(resume_config("auto"), GPU, saved_meta("auto", "bf16"), card(9, 0))[::2] == (
        "bf16",
        None,
    )
    precision, why, change = resumed_precision(
        resume_config("auto"), GPU, saved_meta("auto", "fp16"), card(9, 0)
    )
    assert (precision, change) == ("fp16", None) and "kept by the resume" in why
    # A new run decides by the card, and an explicit bf16 -> auto on the same card is no change.
    assert resumed_precision(resume_config("auto"), GPU, None, card(7, 5))[0] == "fp16"
    assert resumed_precision(resume_config("auto"), GPU, saved_meta("bf16", "bf16"), card(8, 0))[::2] == (
        "bf16",
        None,
    )
    # A checkpoint older than format 3 holds no precision: an explicit setting is its record, auto is not.
    assert resumed_precision(resume_config("auto"), GPU, saved_meta("fp16", None), card(9, 0))[0] == "fp16"
    assert resumed_precision(resume_config("auto"), GPU, saved_meta("auto", None), card(9, 0))[0] == "bf16"


def test_a_resume_that_cannot_keep_the_precision_stops_unless_allowed_and_is_recorded():
    bf16_run = saved_meta("auto", "bf16")
    with pytest.raises(ConfigError) as refused:  # an A100 run resumed on a T4
        resumed_precision(resume_config("auto"), GPU, bf16_run, card(7, 5))
    message = str(refused.value)
    assert "trained in bf16, which this device cannot compute (compute capability 7.5 < 8.0" in message
    assert "means fp16 here" in message and "--checkpoint.allow_changes=[parallel.mixed_precision]" in message
    precision, why, change = resumed_precision(
        resume_config("auto", "parallel.mixed_precision"), GPU, bf16_run, card(7, 5)
    )
    assert precision == "fp16" and change == {"key": "parallel.mixed_precision", "old": "bf16", "new": "fp16"}
    config = resume_config("auto", "parallel.mixed_precision")
    assert recipe_history(config, "step_40", bf16_run, change) == [{**change, "step": 40}]
    # An explicit other precision is a change too, even where the device computes the recorded one.
    with pytest.raises(ConfigError, match="trained in bf16; parallel.mixed_precision=fp16 means fp16 here"):
        resumed_precision(resume_config("fp16"), GPU, bf16_run, card(9, 0))


def test_a_run_started_in_bf16_by_auto_resumes_in_bf16_where_auto_means_fp32(runs, corpus, tmp_path):
    """On a CPU auto means fp32: a checkpoint whose auto meant bf16 (as on a GPU) resumes in bf16, bitwise
    the uninterrupted bf16 run; environment.json keeps both starts."""
    run_dir = tmp_path / "bf16_two_ranks"
    shutil.copytree(runs["bf16_two_ranks"], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    meta_path = run_dir / "checkpoints" / f"step_{CHECKPOINT_AT:08d}" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["precision"] == "bf16"
    meta["config"]["parallel"]["mixed_precision"] = "auto"
    meta_path.write_text(json.dumps(meta))
    result = run(2, tiny_overrides(*corpus, tmp_path, "bf16_two_ranks") + ["--parallel.mixed_precision=auto"])
    assert "precision: bf16 (auto, decided when the run started and kept by the resume)" in result.stderr
    assert train_losses(run_dir) == train_losses(runs["bf16_two_ranks"])
    starts = json.loads((run_dir / "environment.json").read_text())
    assert [(s["step"], s["precision"]["name"]) for s in starts] == [(0, "bf16"), (CHECKPOINT_AT, "bf16")]


@pytest.mark.parametrize("stop_signal", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_with_the_default_logging_stops_with_a_checkpoint_and_resumes_exactly(
    runs, corpus, tmp_path, stop_signal
):
    """`python -m dist_llama.train` as a user runs it (the progress line on): a stop signal after a few steps
    ends the run with exit 0, a checkpoint of that step, stopped.json and a progress line for the stop; the
    same command then finishes bitwise like the uninterrupted run."""
    args = tiny_overrides(*corpus, tmp_path, "signalled")
    run_dir = tmp_path / "signalled"
    log = tmp_path / "first.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            command(1, args), cwd=REPO, env=environment(), stdout=output, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 300
        while (
            not (run_dir / "metrics.jsonl").is_file()
            or '"step": 3' not in (run_dir / "metrics.jsonl").read_text()
        ):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        process.send_signal(stop_signal)
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert stopped["reason"] == f"signal {stop_signal.name}" and 3 <= stopped["step"] < STEPS, text[-3000:]
    assert f"step {stopped['step']}/{STEPS} | stopping early: signal {stop_signal.name}" in text
    assert (run_dir / "checkpoints" / f"step_{stopped['step']:08d}" / "meta.json").is_file()
    run(1, args)
    assert not (run_dir / "stopped.json").exists()
    assert train_losses(run_dir) == train_losses(runs["one_rank"])
