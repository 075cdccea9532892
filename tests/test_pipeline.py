"""The pipeline end to end on a tiny run: stages, skipping finished ones, resuming, the PI route, the
report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dist_llama.report import generate_report, read_metrics

REPO = Path(__file__).resolve().parents[1]


def environment() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }


def tiny(corpus: Path, mmlu: Path, run_root: Path, **keys) -> list[str]:
    values = {
        "data.paths": f"[{corpus}]",
        "data.val_paths": f"[{corpus}]",
        "data.tokenizer": "offline",
        "data.val_docs": 4,
        "train.run_root": run_root,
        "train.tokens_per_step": 256,
        "train.micro_batch_size": 4,
        "train.log_every": 1,
        "train.eval_every": 2,
        "train.eval_batches": 1,
        "checkpoint.every": 2,
        "logging.tensorboard": "true",
        "eval.mmlu_data": mmlu,
        "eval.limit": 4,
        "eval.batch_size": 4,
        "eval.ppl_data": corpus,
        "eval.ppl_docs": 2,
        **keys,
    }
    return [f"--{key}={value}" for key, value in values.items()]


def pipeline(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "dist_llama.pipeline", *args],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("inputs")
    lines = (shared_data / "owt/tiny.jsonl").read_text().splitlines()
    (folder / "docs.jsonl").write_text("\n".join(lines[:40]) + "\n")
    items = [
        json.loads(line) for line in (shared_data / "tinymmlu/mmlu_test.jsonl").read_text().splitlines()[:200]
    ]
    items.sort(key=lambda item: len(item["input_formatted"]))
    (folder / "mmlu.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items[:4]))
    return folder / "docs.jsonl", folder / "mmlu.jsonl"


def test_pipeline_runs_every_stage_then_skips_and_resumes(inputs, tmp_path):
    # Releases go to hub_release/<train.name> of the checkout; here a folder of the test's own stands in.
    releases = tmp_path / "hub_release"
    args = [
        "--config",
        str(REPO / "configs/debug.yaml"),
        f"--release-root={releases}",
        *tiny(*inputs, tmp_path, **{"data.seq_len": 32, "train.steps": 4, "train.name": "tiny"}),
    ]
    first = pipeline(*args)
    run_dir, release = tmp_path / "tiny", releases / "tiny"
    for produced in (
        "metrics.jsonl",
        "eval/summary.json",
        "eval/ppl_tiny.json",
        "eval/loss_by_position.png",
        "report/results.md",
        "report/loss.png",
    ):
        assert (run_dir / produced).is_file(), produced
    for produced in ("config.json", "model.safetensors", "modeling_dist_llama.py", "model.py"):
        assert (release / produced).is_file(), produced
    assert sorted(os.listdir(releases)) == ["tiny"], "a staging folder was left beside the release"
    assert not (run_dir / "release").exists()
    card = (release / "README.md").read_text()
    assert "tinymmlu_local" in card and "No evaluation results" not in card, "the card quotes the evaluation"
    assert "| final_val_loss |" in first.stdout
    assert_loads_with_transformers(release)

    # Again: nothing to do, nothing rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in [release / "model.safetensors", run_dir / "eval/summary.json"]}
    second = pipeline(*args)
    assert "already finished" in second.stderr and "up to date" in second.stderr
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    assert len(read_metrics(run_dir)[0]) == 4

    # More steps: training resumes from step 4's checkpoint, the later stages run on the new checkpoint.
    pipeline(*args, "--train.steps=6")
    steps = [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert steps == [1, 2, 3, 4, 5, 6], "resumed from the checkpoint, not from scratch"
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert state["evaluate"]["release_of"].endswith("step_00000006")
    assert (release / "model.safetensors").stat().st_mtime_ns != stamps[release / "model.safetensors"]
    assert sorted(os.listdir(releases)) == ["tiny"], "the new release replaced the old one in place"
    assert yaml.safe_load((release / "training_config.yaml").read_text())["train"]["steps"] == 6


def assert_loads_with_transformers(release: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(release, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(release, trust_remote_code=True)
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert bool(torch.isfinite(logits).all())


def test_consolidate_stage_redoes_a_release_replaced_since(tmp_path, monkeypatch):
    """The release lies outside the run directory: another run of the same name, or a consolidate by hand,
    may replace it, and then the pipeline's record of having written it no longer holds."""
    from dist_llama import pipeline as pipeline_module
    from dist_llama.config import load_config
    from dist_llama.stages import StageRunner

    def write_release(checkpoint: Path, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json.new").write_text(str(checkpoint))
        (out / "config.json.new").replace(out / "config.json")  # a new file, as consolidate writes one

    written = []

    def fake_consolidate(checkpoint, out, **_):
        write_release(checkpoint, out)
        written.append((checkpoint.name, out.parent.name))

    monkeypatch.setattr(pipeline_module, "consolidate", fake_consolidate)
    config = load_config(None, [f"--train.run_root={tmp_path}", "--train.name=tiny"])
    state = pipeline_module.PipelineState(config.run_dir)
    step_4, step_6 = config.run_dir / "checkpoints/step_4", config.run_dir / "checkpoints/step_6"

    def stage(checkpoint=step_4, root="hub_release", redo=False):
        run = pipeline_module.RunStages(config, None, [], state, release_root=tmp_path / root)
        run.checkpoint = checkpoint
        redone = {"consolidate"} if redo else set()
        StageRunner(run.stages(("consolidate",)), redo=redone, say=lambda line: None).run()

    stage()
    stage()  # up to date
    write_release(
        step_6, tmp_path / "hub_release" / "tiny"
    )  # replaced by another run's release of the same name
    stage()
    stage(step_6)
    stage(step_6, "elsewhere")
    stage(step_6, "elsewhere", redo=True)
    shutil.rmtree(tmp_path / "elsewhere" / "tiny")
    stage(step_6, "elsewhere")
    stage(step_6, "elsewhere")  # up to date
    assert written == [
        ("step_4", "hub_release"),
        ("step_4", "hub_release"),
        ("step_6", "hub_release"),
        ("step_6", "elsewhere"),
        ("step_6", "elsewhere"),
        ("step_6", "elsewhere"),
    ]


def test_pipeline_position_interpolation_route(inputs, tmp_path):
    common = tiny(*inputs, tmp_path, **{"train.steps": 4})
    releases = tmp_path / "hub_release"
    pipeline(
        f"--release-root={releases}",
        "--stage1-config",
        str(REPO / "configs/debug_short.yaml"),
        "--config",
        str(REPO / "configs/debug_pi.yaml"),
        *common,
        "--data.seq_len=64",
        "--skip=report",
    )
    # Stage 2 is at the same seq_len here only to stay fast; what matters is the wiring and the three curves.
    stage2 = tmp_path / "debug_pi"
    labels = sorted(json.loads(p.read_text())["label"] for p in (stage2 / "eval").glob("ppl_*.json"))
    assert labels == ["debug_pi_after_pi_finetune", "short_no_scaling", "short_pi_x4_no_finetune"]
    config = json.loads((releases / "debug_pi/config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 4.0
    assert (releases / "debug_short/config.json").is_file()
    assert not (stage2 / "report").exists(), "--skip=report was ignored"


def test_pipeline_names_the_failed_stage_and_its_log(tmp_path):
    # Valid config, broken data: the two torchrun children fail after the pipeline has started them.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('not json\n{"text": "x"}\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_llama.pipeline",
            "--config",
            str(REPO / "configs/debug.yaml"),
            "--nproc",
            "2",
            f"--data.paths=[{bad}]",
            f"--data.val_paths=[{bad}]",
            "--data.tokenizer=offline",
            f"--train.run_root={tmp_path}",
            "--train.name=broken",
            "--train.steps=2",
        ],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = tmp_path / "broken" / "logs" / "train.log"
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1, result.stderr[-3000:]
    # One line: the stage, the children's own error, their exit status and the log (dist_llama.stages).
    assert last.startswith("pipeline: error: train (broken, 2 processes) stage failed: "), last
    assert "record 0 is not valid JSON" in last and last.endswith(f" (exit 1, log {log})"), last
    assert "train: running" in result.stderr  # the runner's line before the stage
    assert "CalledProcessError" not in result.stderr
    assert "record 0 is not valid JSON" in log.read_text()  # the children's own output is kept


def test_finished_checkpoint_uses_the_trainers_planned_steps(tmp_path):
    from dist_llama.config import load_config
    from dist_llama.pipeline import finished_checkpoint

    config = load_config(None, [f"--train.run_root={tmp_path}", "--train.name=budget", "--train.steps=100"])
    checkpoint = config.run_dir / "checkpoints" / "step_00000040"
    checkpoint.mkdir(parents=True)
    for meta, finished in [
        ({"step": 40}, False),  # an older format without planned_steps: train.steps decides
        ({"step": 40, "planned_steps": None}, False),  # no time budget: train.steps decides
        ({"step": 100, "planned_steps": None}, True),
        ({"step": 40, "planned_steps": 40}, True),  # a time budget planned 40 steps
        ({"step": 40, "planned_steps": 60}, False),
    ]:
        (checkpoint / "meta.json").write_text(json.dumps({**meta, "tokens_seen": 0, "config": {}}))
        assert (finished_checkpoint(config) == checkpoint) is finished, meta


def test_pipeline_rejects_unknown_stage(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dist_llama.pipeline", "--skip=trian"],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "unknown stage 'trian'" in result.stderr


def test_every_command_reports_a_user_mistake_as_one_error_line(tmp_path, capsys):
    from dist_llama import config, consolidate, counts, evaluate, generate, pipeline, push, report, train
    from dist_llama.cli import error_message

    missing = str(tmp_path / "missing")
    mistakes = {
        "train": (train.main, ["--train.stepz=3"], "unknown key train.stepz"),
        "config": (config.main, ["--config", missing], "not found"),
        "counts": (counts.main, ["--model.preset=huge"], "model.preset='huge' is unknown"),
        "consolidate": (
            consolidate.main,
            ["--checkpoint", missing, "--out", str(tmp_path / "out")],
            "no complete checkpoint",
        ),
        "generate": (generate.main, ["--model", missing, "--prompt", "Hello"], "no such folder"),
        "push": (push.main, ["--dir", missing, "--repo-id", "someone/x", "--dry-run"], "not found"),
        "pipeline": (pipeline.main, ["--skip=trian"], "unknown stage 'trian'"),
        "report": (report.main, ["--run", missing], "metrics.jsonl not found"),
        "evaluate": (evaluate.main, ["irt", "--params", missing, "--samples", missing], "no such file"),
    }
    for command, (main, argv, message) in mistakes.items():
        with pytest.raises(SystemExit) as exit_info:
            status = main(argv)
            raise SystemExit(status)  # evaluate's main returns its status instead of exiting
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2, (command, err)
        assert err.startswith(f"{command}: error: ") and "\n" not in err and message in err, (command, err)
        assert error_message(err) == err.removeprefix(f"{command}: error: ")
    # argparse's own usage errors name the command the same way, after the usage line.
    with pytest.raises(SystemExit) as exit_info:
        consolidate.main(["--out", str(tmp_path / "out")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and last.startswith(
        "consolidate: error: the following arguments are required"
    )
    assert error_message("ValueError: error: something") is None  # a traceback's last line is not ours


def test_report_from_metrics_alone(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [
        {
            "kind": "train",
            "step": s,
            "tokens_seen": 100 * s,
            "loss": 10.0 - s,
            "grad_norm": 1.0 / s,
            "lr": 1e-3,
            "tokens_in_batch": 100,
            "tokens_per_s": 50.0 + s,
            "memory_gib": 1.0,
            "data_wait": 0.01 * s,
            "data_wait_s": 0.1,
        }
        for s in range(1, 6)
    ]
    records.insert(3, {"kind": "val", "step": 3, "tokens_seen": 300, "val_loss": 7.5})
    # A resumed run re-logs step 5: the last record wins.
    records.append({**records[-1], "loss": 4.5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    results = generate_report(run_dir)
    text = results.read_text()
    assert "| final_train_loss | 4.5000 |" in text
    assert "| final_val_loss | 7.5000 |" in text
    assert "| steps | 5 |" in text
    assert "| median_mfu | n/a |" in text
    assert "| median_data_wait | 0.0350 |" in text  # of steps 2-5: the first window is start-up
    for plot in ("loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png", "data_wait.png"):
        assert (run_dir / "report" / plot).stat().st_size > 1000
    assert not (run_dir / "report" / "mfu.png").exists()
    assert text.index("loss.png") < text.index("lr.png"), "the loss plot comes first"


def test_report_needs_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        generate_report(tmp_path)
