"""Session: what the stages share (folders, the bundle, the preflight's facts, the runs made), the commands
and environment of their child processes, and the loop that runs the stages in order and always ends with
the summary and the pack."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from dist_llama.session import REPO, BadInput
from dist_llama.session.bundle import MIB, data_overrides, load_manifest, unpack_bundle
from dist_llama.session.pack import PACK_NAME, pack
from dist_llama.session.plan import STAGES, Deadline, Mode, Outcome, resolve_config_path
from dist_llama.session.processes import Child, Interrupted, run_child
from dist_llama.session.stages import RUNNERS
from dist_llama.session.summary import final_table, session_summary, summary_markdown


class Session:
    def __init__(self, mode: Mode, args: argparse.Namespace, overrides: list[str]):
        self.mode = mode
        self.skip = set(args.skip)
        self.deadline = Deadline(mode, args.deadline_s if args.deadline_s is not None else mode.deadline_s, self.skip)
        self.config = resolve_config_path(args.config or mode.config)
        self.out = Path(args.out).resolve()
        self.bundle = Path(args.bundle).resolve()
        self.user_overrides = overrides
        self.nproc = args.nproc
        self.work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="dist_llama_session_"))
        self.logs = self.work / "logs"
        self.inputs = self.work / "inputs"  # the bundle's gzipped files, unpacked
        self.site = self.work / "site"
        self.outcomes = {stage: Outcome(stage) for stage in STAGES}
        self.manifest: dict | None = None
        self.preflight: dict = {}
        self.site_installed = False
        self.runs: list[Path] = []  # training attempts, in order
        self.release: Path | None = None
        self.bad_input: str | None = None

    # Child processes -------------------------------------------------------------------------------

    def env(self) -> dict:
        env = dict(os.environ)
        paths = ([str(self.site)] if self.site_installed else []) + [str(REPO)]
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(self.work / "hf"),
                    "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                    "TQDM_DISABLE": "1",  # progress bars would fill the logs with carriage returns
                    # Training's compile fills this cache, so the bench's compile of the same blocks is warm.
                    "TORCHINDUCTOR_CACHE_DIR": str(self.work / "inductor_cache")})
        return env

    def run(self, label: str, command: list[str], timeout: float, env: dict | None = None, cwd: Path | None = None,
            **watch) -> Child:
        """A child process with its log in logs/LABEL.log; `watch`: run_child's started/start_within."""
        return run_child(self.logs / f"{label}.log", command, timeout, env or self.env(), cwd or REPO, **watch)

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def trainer(self, overrides: list[str]) -> list[str]:
        launcher = (self.python("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}")
                    if self.nproc > 1 else self.python())
        return [*launcher, "-m", "dist_llama.train", "--config", self.config, *self.base_overrides(), *overrides]

    def session_overrides(self) -> list[str]:
        """The mode's overrides, then the user's (the preflight adds the bundle's data itself). With a token
        cache, the training run builds it first with every core, then reads token ids from it."""
        cache = [f"--data.token_cache={self.work / 'token_cache'}"] if self.mode.token_cache else []
        return [*self.mode.train_overrides, *cache, *self.user_overrides]

    def base_overrides(self) -> list[str]:
        return [*data_overrides(self.bundle, self.manifest, self.inputs), *self.session_overrides()]

    def resolved(self, section: str, key: str, default=None):
        return (self.preflight.get("config") or {}).get(section, {}).get(key, default)

    @property
    def device(self) -> str:
        return "cuda" if self.mode.require_gpu else "cpu"

    # The runs --------------------------------------------------------------------------------------

    def trained_run(self) -> Path | None:
        """The latest training attempt that left a checkpoint (a timed-out run keeps its last one)."""
        from dist_llama.checkpoint import complete_checkpoints

        with_checkpoints = [run for run in self.runs if complete_checkpoints(run / "checkpoints")]
        return with_checkpoints[-1] if with_checkpoints else None

    def reported_run(self) -> Path | None:
        """The run whose files the report and summary show: the released one, else the last that logged."""
        if not self.runs:
            return None
        logged = [run for run in self.runs if (run / "metrics.jsonl").is_file()]
        return self.trained_run() or (logged[-1] if logged else None)

    # The whole session -----------------------------------------------------------------------------

    def execute(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        print(f"session: mode {self.mode.name}, deadline {self.deadline.seconds:.0f} s, bundle {self.bundle}, "
              f"work {self.work}, out {self.out}", flush=True)
        try:
            self._check_inputs()
            self._stages()
        except BadInput as error:
            self.bad_input = str(error)
            print(f"error: {error}", file=sys.stderr, flush=True)
        except Interrupted:
            print("session: interrupted (SIGTERM); writing the summary", file=sys.stderr, flush=True)
            for outcome in self.outcomes.values():
                if outcome.status == "running":
                    outcome.status, outcome.detail = "failed", "interrupted by SIGTERM"
        finally:
            self._finish()
        if self.bad_input:
            return 2
        return 1 if any(o.status == "failed" for o in self.outcomes.values()) else 0

    def _check_inputs(self) -> None:
        least = self.deadline.too_short_to_start()
        if least is not None:
            raise BadInput(f"--deadline-s {self.deadline.seconds:g} is too short: install and preflight alone need "
                           f"at least {least:.0f} s here ({self.mode.name})")
        if self.work.exists() and any(p for p in self.work.iterdir() if p.name != "logs"):
            raise BadInput(f"--work {self.work} is not empty: give a new folder (a finished run there would be resumed)")
        self.manifest = load_manifest(self.bundle)
        unpack_bundle(self.bundle, self.manifest, self.inputs)

    def _stages(self) -> None:
        for stage in STAGES:
            outcome = self.outcomes[stage]
            if stage in self.skip:
                outcome.detail = "skipped by --skip"
                continue
            if stage not in ("install", "preflight") and self.outcomes["preflight"].status != "ok":
                outcome.detail = "preflight did not pass"
                continue
            allowance = self.deadline.allowance(stage)
            if not self.deadline.worth_starting(stage, allowance):
                outcome.detail = (f"skipped for time: {allowance:.0f} s allowed, {self.deadline.least(stage):.0f} s "
                                  "needed")
                self._say(f"{stage}: {outcome.detail}")
                continue
            self._say(f"{stage}: running" + ("" if stage == "train" else f" (at most {allowance:.0f} s)"))
            outcome.status = "running"
            started = time.monotonic()
            result = RUNNERS[stage](self, allowance)
            result.seconds = time.monotonic() - started
            self.outcomes[stage] = result
            self._say(f"{stage}: {result.status} ({result.seconds:.0f} s) {result.detail}")
            if self.bad_input and stage == "preflight":
                print(f"error: {self.bad_input}", file=sys.stderr, flush=True)
        for outcome in self.outcomes.values():
            if outcome.status == "skipped" and not outcome.detail:
                outcome.detail = "not reached"

    def _say(self, line: str) -> None:
        print(f"[{self.deadline.elapsed():5.0f}s] {line}", flush=True)

    def _finish(self) -> None:
        summary = session_summary(self)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (self.out / "summary.md").write_text(summary_markdown(summary))
        run_dir = self.reported_run()
        for plot in ("loss.png", "loss_by_position.png"):
            if run_dir is not None and (run_dir / "report" / plot).is_file():
                shutil.copyfile(run_dir / "report" / plot, self.out / plot)
        try:
            packed = pack(self.out, self.work, self.runs, self.logs)
            print(f"packed {len(packed)} files into {self.out / PACK_NAME} "
                  f"({(self.out / PACK_NAME).stat().st_size / MIB:.2f} MiB)", flush=True)
        except OSError as error:
            print(f"error: packing the run's files failed: {error}", file=sys.stderr, flush=True)
        print(final_table(summary), flush=True)
