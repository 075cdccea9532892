"""`python -m dist_llama.pipeline --config configs/X.yaml [--release-root DIR] [overrides]`:
train -> consolidate -> evaluate -> report.

The run's files go to run_dir (train.run_root/train.name), its release to hub_release/<train.name> at the
top of the checkout (consolidate.release_dir; --release-root moves it). Every stage records what it
produced, and from what, in run_dir/pipeline.json. Run the command again and it skips the stages whose
inputs have not changed and picks up an interrupted training run from its latest checkpoint.
`--skip STAGE` leaves a stage out; `--redo STAGE` forces it.

The Position Interpolation route is `--stage1-config configs/main_256.yaml --config configs/pi_1024.yaml`:
stage 1 trains at the short length, stage 2 starts from its weights (train.init_from), and the
evaluation compares loss by position for the stage-1 model without scaling, with scaling and no
fine-tune, and after the fine-tune.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from dist_llama.checkpoint import CheckpointError, complete_checkpoints, read_meta
from dist_llama.cli import CommandParser, error_message, fail
from dist_llama.config import Config, ConfigError, load_config, to_dict
from dist_llama.consolidate import (
    RELEASE_ROOT_HELP,
    ReleaseError,
    consolidate,
    release_dir,
    write_model_card,
)

log = logging.getLogger("dist_llama.pipeline")

STAGES = ("train", "consolidate", "evaluate", "report")


class PipelineState:
    """run_dir/pipeline.json: for each finished stage, the inputs it ran on."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "pipeline.json"
        self.stages = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def is_current(self, stage: str, inputs: dict) -> bool:
        return self.stages.get(stage) == inputs

    def record(self, stage: str, inputs: dict) -> None:
        self.stages[stage] = inputs
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.stages, indent=1))


class StageError(RuntimeError):
    """A stage that failed in a child process; the message names the stage and its log."""


def finished_checkpoint(config: Config) -> Path | None:
    """The run's final checkpoint, if training reached its planned step count: the trainer's own
    `planned_steps` in meta.json when it planned one (a time budget; null or absent otherwise), else
    train.steps."""
    found = complete_checkpoints(config.run_dir / "checkpoints")
    if not found:
        return None
    meta = read_meta(found[-1])
    planned = meta.planned_steps
    return found[-1] if meta.step >= (planned if planned is not None else config.train.steps) else None


def run_logged(command: list[str], log_path: Path, stage: str) -> None:
    """Run a child process, its output shown as it comes and appended to log_path.

    A failure raises StageError with the message of the child's own first error line (our commands'
    one-line errors, see dist_llama.cli) rather than the launcher's traceback that follows it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    first_error = None
    with open(log_path, "a", encoding="utf-8") as log_file:
        log_file.write(f"$ {' '.join(command)}\n")
        log_file.flush()
        # Unbuffered: the child's lines reach the console as they are written, not when a buffer fills.
        with subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        ) as child:
            for line in child.stdout:
                sys.stderr.write(line)
                log_file.write(line)
                if first_error is None:
                    first_error = error_message(line)
    if child.returncode != 0:
        cause = f": {first_error}" if first_error else ""
        raise StageError(
            f"{stage} stage failed (exit status {child.returncode}){cause}; its log is {log_path}"
        )


def run_training(config: Config, config_path: str | None, overrides: list[str], nproc: int) -> Path:
    """Train (resuming if a checkpoint exists) unless the run already finished; returns its final
    checkpoint."""
    done = finished_checkpoint(config)
    if done is not None:
        log.info("train: %s already finished (%s)", config.train.name, done.name)
        return done
    if nproc > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "dist_llama.train",
            *(["--config", config_path] if config_path else []),
            *overrides,
        ]
        run_logged(
            command, config.run_dir / "logs" / "train.log", f"train ({config.train.name}, {nproc} processes)"
        )
    else:
        from dist_llama.train import train

        train(config)
    done = finished_checkpoint(config)
    if done is None:
        raise RuntimeError(f"training of {config.train.name} ended without a final checkpoint")
    return done


def consolidate_stage(
    checkpoint: Path, out: Path, name: str, state: PipelineState, key: str, redo: bool
) -> Path:
    """Consolidate checkpoint into out, unless out is still the release this stage wrote from it."""
    inputs = {"checkpoint": str(checkpoint), "release": str(out)}
    written = _written(out)
    if not redo and written is not None and state.is_current(key, {**inputs, "written": written}):
        log.info("%s: %s is up to date", key, out)
        return out
    consolidate(checkpoint, out, dtype="fp32", repo_name=name)
    state.record(key, {**inputs, "written": _written(out)})
    return out


def _written(release: Path) -> list[int] | None:
    """Which writing of the release this is: its config.json's inode and modification time (None without
    one). The release folder lies outside the run directory, so another run of the same train.name, or a
    consolidate by hand, may have replaced it since; a replaced folder has a new config.json. The evaluate
    stage rewrites only README.md, which leaves this as it is."""
    try:
        stat = (release / "config.json").stat()
    except FileNotFoundError:
        return None
    return [stat.st_ino, stat.st_mtime_ns]


def evaluate_stage(config: Config, release: Path, stage1: tuple[Config, Path] | None, eval_dir: Path) -> None:
    from dist_llama.evaluation.mmlu import run_mmlu
    from dist_llama.evaluation.position import loss_by_position, plot_loss_by_position

    eval_dir.mkdir(parents=True, exist_ok=True)
    mmlu_data = config.eval.mmlu_data
    if mmlu_data and not Path(mmlu_data).is_file():
        # The shipped debug config names local items beside the repository; elsewhere use the Hub's tinyMMLU.
        log.warning(
            "eval.mmlu_data=%s not found; evaluating lm-eval's tinyMMLU from the Hub instead", mmlu_data
        )
        mmlu_data = None
    run_mmlu(
        str(release),
        eval_dir,
        data=mmlu_data,
        limit=config.eval.limit,
        batch_size=config.eval.batch_size,
        irt_params=config.eval.irt_params,
    )
    if not config.eval.ppl_data or not Path(config.eval.ppl_data).is_file():
        if config.eval.ppl_data:
            log.warning(
                "eval.ppl_data=%s not found; skipping the loss-by-position measurement", config.eval.ppl_data
            )
        return
    seq_len = config.data.seq_len
    factor = config.model.rope_factor
    # (label, model folder, rope factor override): the final model, and for the PI route the stage-1
    # model without scaling (extrapolation) and with scaling before any fine-tune.
    models = [(config.train.name, release, None)]
    if stage1 is not None:
        _, stage1_release = stage1
        models = [
            ("short_no_scaling", stage1_release, 1.0),
            (f"short_pi_x{factor:g}_no_finetune", stage1_release, factor),
            (f"{config.train.name}_after_pi_finetune", release, None),
        ]
    results = []
    for label, folder, override in models:
        result = loss_by_position(
            str(folder), config.eval.ppl_data, seq_len, config.eval.ppl_docs, rope_scaling_factor=override
        )
        result["label"] = label
        (eval_dir / f"ppl_{label}.json").write_text(json.dumps(result, indent=1))
        results.append(result)
    plot_loss_by_position(results, eval_dir / "loss_by_position.png")


def run_pipeline(
    config: Config,
    config_path: str | None,
    overrides: list[str],
    *,
    stage1_path: str | None = None,
    skip: set[str] = frozenset(),
    redo: set[str] = frozenset(),
    nproc: int = 1,
    release_root: str | Path | None = None,
) -> Path:
    """Returns the results.md of the report (or the run directory when the report is skipped). Releases
    go to release_root/<train.name> (consolidate.release_dir)."""
    run_dir = config.run_dir
    state = PipelineState(run_dir)
    stage1 = None
    if stage1_path is not None:
        stage1_config = load_config(stage1_path, overrides)
        if stage1_config.run_dir == run_dir:
            raise ConfigError(
                "the two stages need different train.name values (they are separate run directories)"
            )
        # Stage 2 starts from stage 1's weights; stage 1 itself trains with the overrides as given.
        stage1_overrides, overrides = overrides, [*overrides, f"--train.init_from={stage1_config.run_dir}"]
        config = load_config(config_path, overrides)
        stage1_release = _release_stage1(
            stage1_config, stage1_path, stage1_overrides, state, skip, redo, nproc, release_root
        )
        stage1 = (stage1_config, stage1_release)

    if "train" in skip:
        checkpoint = _latest_checkpoint(run_dir, f"{run_dir} has no checkpoint to release")
    else:
        checkpoint = run_training(config, config_path, overrides, nproc)

    release = release_dir(config.train.name, release_root)
    if "consolidate" not in skip:
        consolidate_stage(checkpoint, release, config.train.name, state, "consolidate", "consolidate" in redo)

    if "evaluate" not in skip:
        _evaluate_unless_current(config, checkpoint, release, stage1, run_dir / "eval", state, redo)

    if "report" in skip:
        return run_dir
    from dist_llama.report import generate_report

    results = generate_report(run_dir)
    state.record("report", {"checkpoint": str(checkpoint)})
    log.info("report: %s", results)
    return results


def _latest_checkpoint(run_dir: Path, none_found: str) -> Path:
    """With --skip train: the run's latest complete checkpoint (CheckpointError ending in `none_found` when
    there is none)."""
    found = complete_checkpoints(run_dir / "checkpoints")
    if not found:
        raise CheckpointError(f"--skip train, but {none_found}")
    return found[-1]


def _release_stage1(
    stage1_config: Config,
    stage1_path: str,
    overrides: list[str],
    state: PipelineState,
    skip: set[str],
    redo: set[str],
    nproc: int,
    release_root: str | Path | None,
) -> Path:
    """Stage 1 of the Position Interpolation route, trained (unless --skip train) and consolidated; returns
    its release folder."""
    if "train" not in skip:
        checkpoint = run_training(stage1_config, stage1_path, overrides, nproc)
    else:
        checkpoint = _latest_checkpoint(
            stage1_config.run_dir, f"stage 1 ({stage1_config.run_dir}) has no checkpoint"
        )
    return consolidate_stage(
        checkpoint,
        release_dir(stage1_config.train.name, release_root),
        stage1_config.train.name,
        state,
        "consolidate_stage1",
        "consolidate" in redo,
    )


def _evaluate_unless_current(
    config: Config,
    checkpoint: Path,
    release: Path,
    stage1: tuple[Config, Path] | None,
    eval_dir: Path,
    state: PipelineState,
    redo: set[str],
) -> None:
    """The evaluate stage, skipped when it already ran on this checkpoint's release with these eval
    settings (unless --redo evaluate)."""
    eval_inputs = {"release_of": str(checkpoint), "eval": to_dict(config)["eval"]}
    if "evaluate" not in redo and state.is_current("evaluate", eval_inputs):
        log.info("evaluate: results for %s are up to date", checkpoint.name)
        return
    evaluate_stage(config, release, stage1, eval_dir)
    state.record("evaluate", eval_inputs)
    # The model card quotes the evaluation: rewrite it now that results exist.
    write_model_card(
        release,
        checkpoint,
        eval_summary=eval_dir / "summary.json",
        repo_name=config.train.name,
    )


def _parser() -> CommandParser:
    parser = CommandParser(
        command="pipeline",
        description="Train, consolidate, evaluate and report in one command.",
        epilog="Any --section.key=value after the options overrides the config file.",
    )
    parser.add_argument("--config", default=None, help="YAML config (default: the built-in debug config)")
    parser.add_argument(
        "--stage1-config",
        default=None,
        help="train this config first and start --config from its weights (Position Interpolation)",
    )
    parser.add_argument(
        "--skip", default="", help=f"comma-separated stages to leave out: {', '.join(STAGES)}"
    )
    parser.add_argument("--redo", default="", help="comma-separated stages to run even if up to date")
    parser.add_argument("--release-root", default=None, help=RELEASE_ROOT_HELP)
    parser.add_argument(
        "--nproc",
        type=int,
        default=int(os.environ.get("NPROC", 1)),
        help="processes (GPUs) for training; >1 launches torchrun",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args, overrides = _parser().parse_known_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    redo = {s for s in args.redo.split(",") if s}
    for stage in skip | redo:
        if stage not in STAGES:
            fail("pipeline", f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from dist_llama.evaluation import EvaluationError
    from dist_llama.train import NonFiniteError

    try:
        config = load_config(args.config, overrides)
        result = run_pipeline(
            config,
            args.config,
            overrides,
            stage1_path=args.stage1_config,
            skip=skip,
            redo=redo,
            nproc=args.nproc,
            release_root=args.release_root,
        )
    except (
        ConfigError,
        CheckpointError,
        ReleaseError,
        EvaluationError,
        NonFiniteError,
        FileNotFoundError,
        ValueError,
    ) as error:
        fail("pipeline", str(error))
    except StageError as error:
        # Status 1, not 2: the child failed, and whether through a user's mistake is the child's to say.
        fail("pipeline", str(error), status=1)
    print(f"pipeline done: {result}")
    if Path(result).is_file():
        print(Path(result).read_text())


if __name__ == "__main__":
    main()
