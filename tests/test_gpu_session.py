"""The one-call GPU session, rehearsed on the CPU: the bundle, every stage, the summary, the pack, bad
input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from dist_llama.session.bundle import MANIFEST
from dist_llama.session.pack import PACK_NAME
from dist_llama.session.summary import summary_markdown

REPO = Path(__file__).resolve().parents[1]


# A training run of seconds on the bundle: 8 sequences of 32 tokens a step, micro-batches of 4.
TINY_RUN = [
    "--train.tokens_per_step=256",
    "--train.micro_batch_size=4",
    "--data.seq_len=32",
    "--data.val_docs=4",
    "--train.eval_batches=1",
]


def environment() -> dict:
    # PYTHON: the launch script runs the session with the interpreter running these tests.
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "PYTHON": sys.executable,
    }


def session(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(REPO / "launch/gpu_session.sh"), *args],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def build_bundle(out: Path, inputs: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_llama.session",
            "bundle",
            "--out",
            str(out),
            "--train-data",
            *map(str, inputs["train"]),
            "--held-out",
            str(inputs["held_out"]),
            "--tinymmlu",
            str(inputs["tinymmlu"]),
            "--mmlu",
            str(inputs["mmlu"]),
            "--mmlu-items",
            "8",
            *extra,
        ],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_data) -> dict:
    folder = tmp_path_factory.mktemp("inputs")
    lines = (shared_data / "owt/tiny.jsonl").read_text().splitlines()
    (folder / "train_a.jsonl").write_text("\n".join(lines[:40]) + "\n")
    (folder / "train_b.jsonl").write_text("\n".join(lines[40:80]) + "\n")
    (folder / "held_out.jsonl").write_text("\n".join(lines[80:200]) + "\n")
    return {
        "train": [folder / "train_a.jsonl"],
        "held_out": folder / "held_out.jsonl",
        "tinymmlu": shared_data / "tinymmlu/tinymmlu.jsonl",
        "mmlu": shared_data / "tinymmlu/mmlu_test.jsonl",
        "more_train": [folder / "train_a.jsonl", folder / "train_b.jsonl"],
    }


@pytest.fixture(scope="module")
def bundle(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    result = build_bundle(out, inputs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MiB of 60 MiB" in result.stdout
    return out


def test_bundle_holds_the_data_and_a_manifest(bundle):
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["train"] == ["train/train_a.parquet"] and manifest["dropped_training_shards"] == []
    assert manifest["mmlu_spread_items"] == 8 and manifest["mmlu_spread_subjects"] == 8
    assert "tokenizer/tokenizer.json.gz" in manifest["gzipped"]
    for name, size in manifest["files"].items():
        assert (bundle / name).stat().st_size == size
    import pyarrow.parquet as pq

    assert pq.read_table(bundle / "train/train_a.parquet").num_rows == 40
    assert pq.read_table(bundle / "held_out.parquet").num_rows == 120


def test_bundle_leaves_out_shards_that_do_not_fit_and_refuses_when_nothing_fits(bundle, inputs, tmp_path):
    manifest = json.loads((bundle / MANIFEST).read_text())
    shard = manifest["files"]["train/train_a.parquet"]
    fixed = manifest["bundle_bytes"] - shard + manifest["checkout_bytes"]
    limit_mib = (fixed + 1.5 * shard) / 2**20  # room for one shard, not two
    result = build_bundle(
        tmp_path / "one", {**inputs, "train": inputs["more_train"]}, "--limit-mib", f"{limit_mib:.6f}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "left out training shard" in result.stdout and "train_b.jsonl" in result.stdout
    trimmed = json.loads((tmp_path / "one" / MANIFEST).read_text())
    assert trimmed["train"] == ["train/train_a.parquet"] and len(trimmed["dropped_training_shards"]) == 1

    refused = build_bundle(tmp_path / "none", inputs, "--limit-mib", "0.5")
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "not even one training shard fits" in refused.stderr


def test_rehearsal_runs_every_stage_and_packs_what_must_come_back(bundle, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    tiny = [
        "--train.steps=4",
        *TINY_RUN,
        "--train.eval_every=2",
        "--checkpoint.every=2",
        "--eval.limit=4",
        "--eval.ppl_docs=2",
        "--eval.batch_size=4",
    ]
    # The IRT file does not exist: tinyMMLU's evaluation fails in one line, and the stages after it still run.
    result = session(
        "--rehearse",
        "--bundle",
        str(bundle),
        "--out",
        str(out),
        "--work",
        str(work),
        "--deadline-s",
        "270",
        "--skip=bench",
        "--eval.irt_params=/nonexistent/tinyBenchmarks.pkl",
        *tiny,
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status == {
        "install": "skipped",
        "preflight": "ok",
        "bench": "skipped",
        "train": "ok",
        "release": "ok",
        "evaluate": "failed",
        "report": "ok",
    }, summary["stages"]
    assert [s["stage"] for s in summary["stages"]] == [
        "install",
        "preflight",
        "train",
        "release",
        "evaluate",
        "bench",
        "report",
    ]
    assert summary["stages"][0]["detail"].startswith("the bundle holds no wheels")
    assert (
        summary["stage_plan"]["train"]
        == 270 - sum(v for k, v in summary["stage_plan"].items() if k != "train") - 5
    )
    evaluate = next(s for s in summary["stages"] if s["stage"] == "evaluate")
    # The child's own one-line error, its exit status and its log (dist_llama.stages.Child.why).
    assert (
        "tinymmlu: IRT parameter file /nonexistent/tinyBenchmarks.pkl: no such file "
        "(exit 2, log evaluate_tinymmlu.log)" in evaluate["detail"]
    )
    assert "ppl ok" in evaluate["detail"] and "mmlu_spread ok" in evaluate["detail"]
    assert summary["elapsed_s"] < 270

    release = summary["release"]
    assert release["dist_llama_importable"] is False and release["class"] == "DistLlamaForCausalLM"
    assert (
        release["max_abs_logit_diff"] <= 1e-4 * max(1.0, release["max_abs_logit"])
        and release["max_abs_logit"] > 0
    )
    assert len(release["generations"]) == 3
    assert all(
        g["greedy"].startswith(g["prompt"]) and g["sampled"].startswith(g["prompt"])
        for g in release["generations"]
    )
    assert summary["eval"]["mmlu_spread"]["n"] == 4 and summary["eval"]["tinymmlu"] is None
    assert summary["eval"]["ppl"][0]["seq_len"] == 32
    assert summary["train"]["steps"] == 4 and summary["train"]["final_val_loss"] is not None
    assert summary["preflight"]["config"]["data"]["seq_len"] == 32

    returned = sorted(p.name for p in out.iterdir())
    assert returned == sorted(["summary.md", "summary.json", PACK_NAME, "loss.png", "loss_by_position.png"])
    assert all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir())
    with tarfile.open(out / PACK_NAME) as tar:
        names = tar.getnames()
    run = "session/runs/debug/"
    for expected in (
        "metrics.jsonl",
        "config.yaml",
        "environment.json",
        "eval/mmlu_spread/summary.json",
        "eval/mmlu_spread/samples_tinymmlu_local.jsonl",
        "eval/ppl_debug.json",
        "report/results.md",
        "report/loss.png",
        "release/config.json",
        "release/README.md",
    ):
        assert run + expected in names, expected
    assert any(name.startswith(run + "tensorboard/") for name in names)
    for expected in (
        "session/summary.md",
        "session/release_check.json",
        "session/preflight.json",
        "session/logs/train_debug.log",
        "session/logs/evaluate_tinymmlu.log",
    ):
        assert expected in names, expected
    assert not any("checkpoints" in name or name.endswith(".safetensors") for name in names)

    markdown = (out / "summary.md").read_text()
    assert "## Release check and generations" in markdown and "| evaluate | failed |" in markdown
    table = result.stdout.strip().splitlines()
    assert table[-1].startswith("total ") and any(line.startswith("stage ") for line in table[-12:])


def test_missing_bundle_is_one_line_and_the_summary_is_still_written(tmp_path):
    result = session("--rehearse", "--bundle", str(tmp_path / "no_bundle"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: bundle folder {tmp_path / 'no_bundle'} not found or has no manifest.json: "
        "build it with launch/prepare_gpu_bundle.sh (and name it in the machine's carry)"
    )
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["bad_input"].startswith("bundle folder") and all(
        s["status"] == "skipped" for s in summary["stages"]
    )
    assert (tmp_path / "out/summary.md").is_file()


def test_deadline_too_short_for_the_preflight(bundle, tmp_path):
    result = session("--bundle", str(bundle), "--out", str(tmp_path / "out"), "--deadline-s", "10")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --deadline-s 10 is too short: install and preflight alone need at least 20 s here (gpu)"
    )
    assert json.loads((tmp_path / "out/summary.json").read_text())["bad_input"].startswith("--deadline-s 10")


def test_wheels_that_fail_to_install_and_no_gpu_are_each_one_line(bundle, tmp_path):
    broken = tmp_path / "bundle"
    shutil.copytree(bundle, broken)
    (broken / "wheels").mkdir()
    (broken / "wheels/notapackage-1.0-py3-none-any.whl").write_bytes(b"not a zip file")
    manifest = json.loads((broken / MANIFEST).read_text())
    manifest["wheels"] = ["wheels/notapackage-1.0-py3-none-any.whl"]
    manifest["files"]["wheels/notapackage-1.0-py3-none-any.whl"] = len(b"not a zip file")
    (broken / MANIFEST).write_text(json.dumps(manifest))
    result = session(
        "--bundle", str(broken), "--out", str(tmp_path / "out"), "--config", "configs/debug.yaml"
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert stages["install"]["status"] == "failed"
    assert stages["install"]["detail"].startswith("1 wheel(s) failed to install:")
    assert stages["preflight"]["status"] == "failed" and stages["preflight"]["detail"].startswith(
        "no GPU visible"
    )
    assert stages["train"]["detail"] == "preflight did not pass"
    assert result.stderr.strip().splitlines()[-1].startswith("error: no GPU visible")


def test_unusable_arguments_are_refused(bundle, tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work/old_run").mkdir()
    busy = session(
        "--rehearse",
        "--bundle",
        str(bundle),
        "--out",
        str(tmp_path / "out"),
        "--work",
        str(tmp_path / "work"),
    )
    assert busy.returncode == 2 and "is not empty" in busy.stderr
    stray = session("--rehearse", "--out", str(tmp_path / "out"), "--steps=3")
    assert stray.returncode == 2 and "unrecognized argument '--steps=3'" in stray.stderr
    stage = session("--rehearse", "--out", str(tmp_path / "out"), "--skip=trian")
    assert stage.returncode == 2 and "unknown stage 'trian'" in stage.stderr


def test_bench_checks_the_weights_and_reports_what_the_summary_shows(tmp_path):
    path = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_model_step.py",
            "--preset",
            "debug",
            "--seq-len",
            "16",
            "--batch",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--json",
            str(path),
        ],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    bench = json.loads(path.read_text())
    assert bench["weights_checked_equal"] is True and set(bench["models"]) == {"ours", "transformers"}
    assert all(m["tokens_per_s"] > 0 and m["mfu"] is None for m in bench["models"].values())
    markdown = summary_markdown(
        {
            "mode": "rehearse",
            "date": "today",
            "config": "c",
            "overrides": [],
            "deadline_s": 1,
            "elapsed_s": 1,
            "bad_input": None,
            "stages": [],
            "bench": bench,
        }
    )
    assert "| ours |" in markdown and "| transformers |" in markdown and "ours/transformers" in markdown


def compiled_rehearsal(bundle: Path, tmp_path: Path, skip: str, limit_s: int, env: dict, *extra: str) -> dict:
    """A rehearsal whose training run is compiled and watched with --compile-limit-s `limit_s`, 12 tiny
    steps; returns summary.json, the session having exited 0."""
    out = tmp_path / "out"
    result = subprocess.run(
        [
            str(REPO / "launch/gpu_session.sh"),
            "--rehearse",
            "--bundle",
            str(bundle),
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
            f"--skip={skip}",
            "--compile-limit-s",
            str(limit_s),
            "--parallel.compile=true",
            "--train.steps=12",
            *TINY_RUN,
            *extra,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_a_compile_that_hangs_costs_the_compile_limit_and_training_runs_eager(bundle, tmp_path):
    """No separate smoke run: the compiled training run itself is watched. A C++ compiler that never answers
    hangs inductor, as a broken compile stack could on a GPU machine; without a time-budget plan after
    --compile-limit-s the run is stopped and run again eager, with the time left."""
    hanging = tmp_path / "hanging_cxx"
    hanging.write_text("#!/bin/sh\nsleep 600\n")
    hanging.chmod(0o755)
    env = {**environment(), "CXX": str(hanging)}
    summary = compiled_rehearsal(
        bundle, tmp_path, "bench,release,evaluate,report", 25, env, "--checkpoint.every=2"
    )
    train = next(s for s in summary["stages"] if s["stage"] == "train")
    assert train["status"] == "ok", train
    assert (
        "debug: stopped: no first step within 25 s" in train["detail"]
        and "debug_eager: budget" in train["detail"]
    )
    assert summary["run"] == "debug_eager" and summary["preflight"]["config"]["parallel"]["compile"] is True
    assert train["seconds"] < 25 + 120, "the hang cost its limit, not the stage"


# Loaded by every child of the session (PYTHONPATH): the compiled trainer compiles nothing (no compile cost)
# and hangs when its time budget's measurement begins, after its first step; an eager one runs as it is.
HANG_AFTER_FIRST_STEP = """
import sys, time
command = " ".join(sys.orig_argv)
if "dist_llama.train" in command and command.rfind("compile=true") > command.rfind("compile=false"):
    import torch
    import dist_llama.run
    torch.nn.Module.compile = lambda self, *args, **kwargs: None
    dist_llama.run.Run.plan_budget = lambda self: time.sleep(3600)
"""


def test_a_compiled_run_that_hangs_after_its_first_step_is_resumed_eager_and_released(bundle, tmp_path):
    """The compiled run saves after its first step; when it then hangs (here: where the time budget's
    measurement begins), the eager run resumes that checkpoint rather than starting over, and the session
    releases what it trained."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HANG_AFTER_FIRST_STEP)
    env = {**environment(), "PYTHONPATH": f"{hook}{os.pathsep}{REPO}"}
    # The first step's checkpoint is the only one before the hang.
    # 45 s for each mark: start-up to the first step takes ~8 s here, more on a loaded machine.
    summary = compiled_rehearsal(bundle, tmp_path, "bench,evaluate,report", 45, env, "--checkpoint.every=100")
    stages = {s["stage"]: s for s in summary["stages"]}
    train = stages["train"]
    assert train["status"] == "ok", train
    assert "debug: stopped: no time-budget plan within 4" in train["detail"], train["detail"]
    assert "(latest checkpoint step_00000001)" in train["detail"] and "debug_eager" not in train["detail"]
    eager_log = (tmp_path / "work" / "logs" / "train_debug_eager.log").read_text()
    assert "resumed from" in eager_log and " at step 1 (" in eager_log.split("resumed from")[1][:300]
    assert stages["release"]["status"] == "ok", stages["release"]
    assert summary["run"] == "debug"


def test_the_install_stage_gives_pip_its_allowance(monkeypatch, tmp_path):
    import types

    from dist_llama.session import stages, wheels

    seen = {}

    def pip(command, **kwargs):
        seen["timeout"] = kwargs["timeout"]
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(wheels.subprocess, "run", pip)
    session = types.SimpleNamespace(
        manifest={"wheels": ["wheels/not_installed_here-1.0-py3-none-any.whl"]},
        bundle=tmp_path,
        site=tmp_path / "site",
        mode=types.SimpleNamespace(require_gpu=True),
    )
    outcome = stages.install(session, 120)
    assert seen["timeout"] == 120
    assert outcome.status == "failed" and outcome.detail == "pip did not install the 1 wheel(s) within 120 s"


def test_the_gpu_plan_gives_training_most_of_the_deadline():
    plans = {}
    for mode in ([], ["--rehearse"]):
        result = subprocess.run(
            [sys.executable, "-m", "dist_llama.session", "plan", *mode],
            cwd=REPO,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        plans[bool(mode)] = json.loads(result.stdout)
    gpu = plans[False]
    assert gpu["deadline_s"] == 540 and list(gpu["stages"]) == [
        "install",
        "preflight",
        "train",
        "release",
        "evaluate",
        "bench",
        "report",
    ]
    assert sum(gpu["stages"].values()) + gpu["finish_s"] == gpu["deadline_s"]
    assert gpu["stages"]["train"] >= 0.6 * gpu["deadline_s"] and gpu["train_share"] >= 0.6
    assert gpu["stages"]["bench"] == 0  # the bench runs on time left after the evaluation
    assert plans[True]["mode"] == "rehearse" and plans[True]["stages"]["train"] > 0


def test_unmet_requirements_name_the_package_and_what_was_found(tmp_path, monkeypatch):
    import numpy

    from dist_llama.session.wheels import unmet_requirements

    info = tmp_path / "needy_package-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: needy-package\nVersion: 1.0\n"
        "Requires-Dist: numpy>=999\nRequires-Dist: not-a-package-here\n"
        'Requires-Dist: pyyaml\nRequires-Dist: torch>=999; extra == "gpu"\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert unmet_requirements(
        ["wheels/needy_package-1.0-py3-none-any.whl", "wheels/pyyaml-6.0-py3-none-any.whl"]
    ) == {
        "needy-package 1.0": [f"numpy>=999 (found {numpy.__version__})", "not-a-package-here (not installed)"]
    }


def test_training_builds_the_token_cache_then_reads_it(bundle, tmp_path):
    """The GPU mode's route (Mode.token_cache), taken here by naming the cache: the training run tokenizes the
    bundle's parquet shards once, with every core, and reads token ids from the folder; a second run reuses
    it."""
    out, work = tmp_path / "out", tmp_path / "work"
    result = session(
        "--rehearse",
        "--bundle",
        str(bundle),
        "--out",
        str(out),
        "--work",
        str(work),
        "--skip=bench,release,evaluate,report",
        f"--data.token_cache={work / 'token_cache'}",
        "--train.steps=2",
        *TINY_RUN,
        "--checkpoint.every=2",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = {s["stage"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert stages["preflight"]["status"] == "ok" and stages["train"]["status"] == "ok", stages
    manifest = json.loads((work / "token_cache" / "manifest.json").read_text())
    assert manifest["documents"] > 0 and manifest["tokens"] > 0
    assert "token cache: tokenizing" in (work / "logs" / "train_debug.log").read_text()


def test_the_release_takes_the_attempt_that_saw_the_most_tokens(make_checkpoint):
    """A compiled run that failed late (checkpoint at step 30) and a shorter eager run after it (step 7):
    the compiled run's checkpoint is released, whatever the order of the attempts."""
    from dist_llama.session.context import trained_run

    compiled, eager = make_checkpoint(step=30), make_checkpoint(step=7)
    assert trained_run((compiled, eager)) == compiled
    assert trained_run((eager, compiled, eager)) == compiled
    assert trained_run(()) is None
