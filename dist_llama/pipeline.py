"""`python -m dist_llama.pipeline --config configs/X.yaml [--release-root DIR] [overrides]`:
train -> consolidate -> evaluate -> report, run by dist_llama.stages' runner (the GPU session's too).

The run's files go to run_dir (train.run_root/train.name), its release to hub_release/<train.name> at the
top of the checkout (consolidate.release_dir; --release-root moves it). Every stage records what it
produced, and from what, in run_dir/pipeline.json. Run the command again and it skips the stages whose
inputs have not changed and picks up an interrupted training run from its latest checkpoint.
`--skip STAGE` leaves a stage out; `--redo STAGE` runs it even when it is up to date.

The Position Interpolation route is `--stage1-config configs/main_256.yaml --config configs/pi_1024.yaml`:
stage 1 trains at the short length, stage 2 starts from its weights (train.init_from), and the
evaluation compares loss by position for the stage-1 model without scaling, with scaling and no
fine-tune, and after the fine-tune.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from dist_llama.checkpoint import CheckpointError, complete_checkpoints, read_meta
from dist_llama.cli import CommandParser, fail
from dist_llama.config import Config, ConfigError, load_config, to_dict
from dist_llama.consolidate import (
    RELEASE_ROOT_HELP,
    ReleaseError,
    consolidate,
    release_dir,
    write_model_card,
)
from dist_llama.stages import Outcome, Stage, StageRunner, chain, run_child, stage_list

log = logging.getLogger("dist_llama.pipeline")

STAGES = chain("train", "consolidate", "evaluate", "report")


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
    """A stage that failed in a child process; the message names the stage, the child's error and its log."""


def finished_checkpoint(config: Config) -> Path | None:
    """The run's final checkpoint, if training reached its planned step count: train.steps, or the
    `planned_steps` in meta.json where the trainer planned one (a time budget; null or absent otherwise)."""
    found = complete_checkpoints(config.run_dir / "checkpoints")
    if not found:
        return None
    meta = read_meta(found[-1])
    planned = meta.planned_steps
    return found[-1] if meta.step >= (planned if planned is not None else config.train.steps) else None


def run_training(config: Config, config_path: str | None, overrides: list[str], nproc: int) -> Path:
    """Train, resuming if a checkpoint exists: in this process, or under torchrun in a child (its output shown
    as it comes and appended to run_dir/logs/train.log). Returns the final checkpoint."""
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
        log_path = config.run_dir / "logs" / "train.log"
        # Unbuffered: the children's lines reach the console as they are written, not when a buffer fills.
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        child = run_child(log_path, command, env=env, echo=sys.stderr)
        if not child.ok:
            label = f"train ({config.train.name}, {nproc} processes)"
            raise StageError(f"{label} stage failed: {child.why(log_as=str(log_path))}")
    else:
        from dist_llama.train import train

        train(config)
    done = finished_checkpoint(config)
    if done is None:
        raise RuntimeError(f"training of {config.train.name} ended without a final checkpoint")
    return done


@dataclass
class RunStages:
    """One training run's stages: train, consolidate (its release, into release_root/<train.name>),
    evaluate and report. A stage is up to date when pipeline.json records that it ran on the same inputs;
    the checkpoint trained, or found, is what the later stages work from."""

    config: Config
    config_path: str | None
    overrides: list[str]
    state: PipelineState
    nproc: int = 1
    release_root: str | Path | None = None
    release_key: str = "consolidate"  # the consolidation's record in pipeline.json
    stage1: tuple[Config, Path] | None = None  # the PI route's stage 1: its config and release
    checkpoint: Path | None = None
    results: Path | None = None  # the report's results.md

    def stages(self, names: tuple[str, ...] = STAGES) -> list[Stage]:
        stages = {
            "train": Stage("train", self.train, up_to_date=self.training_finished),
            "consolidate": Stage("consolidate", self.consolidate, up_to_date=self.release_current),
            "evaluate": Stage("evaluate", self.evaluate, up_to_date=self.evaluation_current),
            "report": Stage("report", self.report),
        }
        return [stages[name] for name in names]

    @property
    def release(self) -> Path:
        return release_dir(self.config.train.name, self.release_root)

    def trained(self) -> Path:
        """The checkpoint the later stages work from; with --skip train, the run's latest."""
        if self.checkpoint is None:
            found = complete_checkpoints(self.config.run_dir / "checkpoints")
            if not found:
                raise CheckpointError(f"--skip train, but {self.config.run_dir} has no checkpoint to release")
            self.checkpoint = found[-1]
        return self.checkpoint

    def training_finished(self) -> str | None:
        done = finished_checkpoint(self.config)
        if done is None:
            return None
        self.checkpoint = done
        return f"{self.config.train.name} already finished ({done.name})"

    def train(self, allowance: float | None) -> Outcome:
        self.checkpoint = run_training(self.config, self.config_path, self.overrides, self.nproc)
        return Outcome("train", "ok", detail=f"final checkpoint {self.checkpoint.name}")

    def _release_inputs(self) -> dict:
        return {"checkpoint": str(self.trained()), "release": str(self.release)}

    def release_current(self) -> str | None:
        """Whether the release is still the one this stage wrote from this checkpoint."""
        written = _written(self.release)
        if written is None:
            return None
        current = self.state.is_current(self.release_key, {**self._release_inputs(), "written": written})
        return f"{self.release} is up to date" if current else None

    def consolidate(self, allowance: float | None) -> Outcome:
        inputs = self._release_inputs()
        consolidate(self.trained(), self.release, dtype="fp32", repo_name=self.config.train.name)
        self.state.record(self.release_key, {**inputs, "written": _written(self.release)})
        return Outcome("consolidate", "ok", detail=str(self.release))

    def _evaluation_inputs(self) -> dict:
        return {"release_of": str(self.trained()), "eval": to_dict(self.config)["eval"]}

    def evaluation_current(self) -> str | None:
        """Whether the evaluation already ran on this checkpoint's release with these eval settings."""
        current = self.state.is_current("evaluate", self._evaluation_inputs())
        return f"results for {self.trained().name} are up to date" if current else None

    def evaluate(self, allowance: float | None) -> Outcome:
        eval_dir = self.config.run_dir / "eval"
        evaluate_stage(self.config, self.release, self.stage1, eval_dir)
        self.state.record("evaluate", self._evaluation_inputs())
        # The model card quotes the evaluation: rewrite it now that results exist.
        name = self.config.train.name
        write_model_card(self.release, self.trained(), eval_summary=eval_dir / "summary.json", repo_name=name)
        return Outcome("evaluate", "ok", detail=str(eval_dir))

    def report(self, allowance: float | None) -> Outcome:
        from dist_llama.report import generate_report

        self.results = generate_report(self.config.run_dir)
        self.state.record("report", {"checkpoint": str(self.trained())})
        return Outcome("report", "ok", detail=str(self.results))


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
    state = PipelineState(config.run_dir)
    stage1 = None
    if stage1_path is not None:
        stage1_config = load_config(stage1_path, overrides)
        if stage1_config.run_dir == config.run_dir:
            raise ConfigError(
                "the two stages need different train.name values (they are separate run directories)"
            )
        # Stage 2 starts from stage 1's weights; stage 1 itself trains with the overrides as given.
        stage1_overrides, overrides = overrides, [*overrides, f"--train.init_from={stage1_config.run_dir}"]
        config = load_config(config_path, overrides)
        first = RunStages(
            stage1_config,
            stage1_path,
            stage1_overrides,
            state,
            nproc=nproc,
            release_root=release_root,
            release_key="consolidate_stage1",
        )
        # Stage 2's evaluation needs stage 1's release: only its training may be skipped.
        StageRunner(
            first.stages(("train", "consolidate")), skip=skip & {"train"}, redo=redo, say=log.info
        ).run()
        stage1 = (stage1_config, first.release)
    run = RunStages(
        config, config_path, overrides, state, nproc=nproc, release_root=release_root, stage1=stage1
    )
    StageRunner(run.stages(), skip=skip, redo=redo, say=log.info).run()
    return run.results or config.run_dir


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
    try:
        skip, redo = stage_list(args.skip, STAGES), stage_list(args.redo, STAGES)
    except ValueError as error:
        fail("pipeline", str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from dist_llama.evaluation import EvaluationError
    from dist_llama.run import NonFiniteError

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
