"""What the stages are given and what they give back.

Context is what is fixed for the whole session: the mode and its deadline, the folders, the bundle and its
manifest, the training config and the user's overrides; and from those, the commands, environment and logs
of the stages' child processes. It is frozen: no stage changes it.

A stage returns its Outcome (dist_llama.stages), and the stages whose products later stages use return those
too: the preflight its facts (PreflightFacts), training the runs it made, the release its folder. The
session's runner passes each later stage only what it needs of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dist_llama.checkpoint_folders import META_FILE, complete_checkpoints
from dist_llama.session import REPO
from dist_llama.session.bundle import data_overrides
from dist_llama.session.deadline import Deadline, Mode
from dist_llama.stages import Child, Interrupted, ProgressMarks, run_child


def resolve_config_path(config: str) -> str:
    """A config path as given when it exists from here, else relative to the checkout (configs/...)."""
    return str(Path(config).resolve()) if Path(config).is_file() else str(REPO / config)


def python(*args: str) -> list[str]:
    """A command run by this interpreter: the one whose packages the preflight checked."""
    return [sys.executable, *args]


@dataclass(frozen=True)
class Context:
    """What every stage is given. Made from the command line; the runner fills in the last two fields (in
    a copy) before any stage reads them: the manifest once the bundle is checked, and site_installed from
    the install stage's outcome."""

    mode: Mode
    deadline: Deadline
    config: str  # the training config's path
    user_overrides: tuple[str, ...]  # --section.key=value from the command line
    nproc: int  # training processes; more than one launches torchrun
    bundle: Path
    out: Path  # the few files that come back
    work: Path  # runs, weights, logs: what stays on the machine
    manifest: dict | None = None
    site_installed: bool = False  # the bundle's wheels are installed in `site`

    @classmethod
    def from_command_line(cls, mode: Mode, args: argparse.Namespace, overrides: list[str]) -> Context:
        """The session's context from `python -m dist_llama.session` arguments.
        OSError when the work folder cannot be made."""
        deadline_s = args.deadline_s if args.deadline_s is not None else mode.deadline_s
        work = (
            Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="dist_llama_session_"))
        )
        return cls(
            mode=mode,
            deadline=Deadline(mode, deadline_s, frozenset(args.skip)),
            config=resolve_config_path(args.config or mode.config),
            user_overrides=tuple(overrides),
            nproc=args.nproc,
            bundle=Path(args.bundle).resolve(),
            out=Path(args.out).resolve(),
            work=work,
        )

    # Folders -----------------------------------------------------------------------------------------

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    @property
    def inputs(self) -> Path:
        """The bundle's gzipped files, unpacked."""
        return self.work / "inputs"

    @property
    def site(self) -> Path:
        """Where the install stage puts the bundle's wheels."""
        return self.work / "site"

    @property
    def device(self) -> str:
        return "cuda" if self.mode.require_gpu else "cpu"

    # Training overrides -----------------------------------------------------------------------------

    def session_overrides(self) -> list[str]:
        """The mode's overrides, then the user's (the preflight adds the bundle's data itself). With a token
        cache, the training run builds it first with every core, then reads token ids from it."""
        cache = [f"--data.token_cache={self.work / 'token_cache'}"] if self.mode.token_cache else []
        return [*self.mode.train_overrides, *cache, *self.user_overrides]

    def base_overrides(self) -> list[str]:
        """The bundle's data, then session_overrides(): what every command that reads the config is given."""
        return [*data_overrides(self.bundle, self.manifest, self.inputs), *self.session_overrides()]

    # Child processes --------------------------------------------------------------------------------

    def env(self) -> dict:
        env = dict(os.environ)
        paths = ([str(self.site)] if self.site_installed else []) + [str(REPO)]
        paths += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.update(
            {
                "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1",
                "HF_HOME": str(self.work / "hf"),
                "MPLBACKEND": "Agg",
                "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "TQDM_DISABLE": "1",  # progress bars would fill the logs with carriage returns
                # Training's compile fills this cache, so the bench's compile of the same blocks is warm.
                "TORCHINDUCTOR_CACHE_DIR": str(self.work / "inductor_cache"),
            }
        )
        return env

    def run(
        self,
        label: str,
        command: list[str],
        timeout: float,
        env: dict | None = None,
        cwd: Path | None = None,
        progress: ProgressMarks | None = None,
    ) -> Child:
        """A child process with its log in logs/LABEL.log (dist_llama.stages.run_child), stopped at
        `timeout` or when it misses a mark of `progress`."""
        return run_child(
            self.logs / f"{label}.log", command, timeout, env or self.env(), cwd or REPO, progress
        )

    def trainer(self, overrides: list[str]) -> list[str]:
        launcher = (
            python("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}")
            if self.nproc > 1
            else python()
        )
        return [
            *launcher,
            "-m",
            "dist_llama.train",
            "--config",
            self.config,
            *self.base_overrides(),
            *overrides,
        ]


@dataclass(frozen=True)
class PreflightFacts:
    """What the preflight found (its preflight.json: the machine, the packages, the resolved config), and the
    bad input that stops the session (no GPU, a config error), if it found one."""

    report: dict = dataclasses.field(default_factory=dict)
    bad_input: str | None = None

    def resolved(self, section: str, key: str, default=None):
        """A value of the training config as the preflight resolved it."""
        return (self.report.get("config") or {}).get(section, {}).get(key, default)


class TrainingInterrupted(Interrupted):
    """SIGTERM during the training stage: the runs it made, the one stopped too, are still summarised
    and packed."""

    def __init__(self, runs: tuple[Path, ...]):
        super().__init__()
        self.runs = runs


def trained_run(runs: tuple[Path, ...]) -> Path | None:
    """The training attempt whose latest checkpoint saw the most tokens (a timed-out run keeps its last one;
    an eager attempt may resume the compiled one's folder), or None when none left a checkpoint."""
    seen = {}
    for run in dict.fromkeys(runs):
        checkpoints = complete_checkpoints(run / "checkpoints")
        if checkpoints:
            seen[run] = json.loads((checkpoints[-1] / META_FILE).read_text())["tokens_seen"]
    return max(seen, key=seen.get) if seen else None


def reported_run(runs: tuple[Path, ...]) -> Path | None:
    """The run whose files the report and summary show: the released one, else the last that logged."""
    if not runs:
        return None
    logged = [run for run in runs if (run / "metrics.jsonl").is_file()]
    return trained_run(runs) or (logged[-1] if logged else None)
