"""The session from its Context: it checks the inputs, gives its stages to dist_llama.stages' runner with the
deadline, passing each stage only what it needs of what the earlier stages returned, and always ends with the
summary and the pack."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

from dist_llama.session import BadInput, stages
from dist_llama.session.bundle import MIB, load_manifest, unpack_bundle
from dist_llama.session.context import Context, PreflightFacts, TrainingInterrupted, reported_run
from dist_llama.session.deadline import STAGES
from dist_llama.session.pack import PACK_NAME, pack
from dist_llama.session.summary import final_table, session_summary, summary_markdown
from dist_llama.stages import Interrupted, Outcome, Stage, StageRunner

# Every stage after the preflight needs it passed: it found the GPU, the packages and the config.
BEFORE_PREFLIGHT_PASSED = ("install", "preflight")


class Runner:
    """One session, from its Context. The attributes are the session's record of what the stages returned,
    kept for the stages after them and for the summary; no stage sees the runner."""

    def __init__(self, context: Context):
        self.context = context
        self.preflight = PreflightFacts()
        self.runs: tuple[Path, ...] = ()  # training attempts, in order
        self.release: Path | None = None
        self.bad_input: str | None = None
        work = {
            "install": self._install,
            "preflight": self._preflight,
            "train": self._train,
            "release": self._release,
            "evaluate": self._evaluate,
            "bench": self._bench,
            "report": self._report,
        }
        self.stages = StageRunner(
            [Stage(s, work[s], () if s in BEFORE_PREFLIGHT_PASSED else ("preflight",)) for s in STAGES],
            skip=context.deadline.skip,
            deadline=context.deadline,
            say=self._say,
        )

    def execute(self) -> int:
        """Every stage that can run, then the summary and the pack whatever happened. Exit status: 0 when
        every stage that ran succeeded, 1 when one failed, 2 for bad input."""
        context = self.context
        context.out.mkdir(parents=True, exist_ok=True)
        context.logs.mkdir(parents=True, exist_ok=True)
        print(
            f"session: mode {context.mode.name}, deadline {context.deadline.seconds:.0f} s, bundle "
            f"{context.bundle}, work {context.work}, out {context.out}",
            flush=True,
        )
        try:
            self._check_inputs()
            self.stages.run()
        except BadInput as error:
            self.bad_input = str(error)
            print(f"error: {error}", file=sys.stderr, flush=True)
        except Interrupted as interruption:
            if isinstance(interruption, TrainingInterrupted):
                self.runs = interruption.runs  # the run it stopped is summarised and packed too
            print("session: interrupted (SIGTERM); writing the summary", file=sys.stderr, flush=True)
        finally:
            self._finish()
        if self.bad_input:
            return 2
        return 1 if self.stages.failed() else 0

    def _check_inputs(self) -> None:
        """BadInput for a deadline too short to start, a used work folder or a bad bundle; else the bundle's
        manifest goes into the context and its gzipped files are unpacked."""
        context = self.context
        least = context.deadline.too_short_to_start()
        if least is not None:
            raise BadInput(
                f"--deadline-s {context.deadline.seconds:g} is too short: install and preflight "
                f"alone need at least {least:.0f} s here ({context.mode.name})"
            )
        if context.work.exists() and any(p for p in context.work.iterdir() if p.name != "logs"):
            raise BadInput(
                f"--work {context.work} is not empty: give a new folder "
                "(a finished run there would be resumed)"
            )
        self.context = dataclasses.replace(context, manifest=load_manifest(context.bundle))
        unpack_bundle(context.bundle, self.context.manifest, context.inputs)

    # The stages: each hands the session stage what it needs and keeps what it returns.

    def _install(self, allowance: float | None) -> Outcome:
        outcome = stages.install(self.context, allowance)
        # What it installed goes on the import path of every later child process.
        self.context = dataclasses.replace(self.context, site_installed=outcome.status == "ok")
        return outcome

    def _preflight(self, allowance: float | None) -> Outcome:
        outcome, self.preflight = stages.preflight(self.context, allowance)
        if self.preflight.bad_input:
            self.bad_input = self.preflight.bad_input
            print(f"error: {self.bad_input}", file=sys.stderr, flush=True)
        return outcome

    def _train(self, allowance: float | None) -> Outcome:  # None: training sets its own time budget
        outcome, self.runs = stages.train(self.context, self.preflight)
        return outcome

    def _release(self, allowance: float | None) -> Outcome:
        outcome, self.release = stages.release(self.context, self.runs, allowance)
        return outcome

    def _evaluate(self, allowance: float | None) -> Outcome:
        return stages.evaluate(self.context, self.preflight, self.release, allowance)

    def _bench(self, allowance: float | None) -> Outcome:
        return stages.bench(self.context, allowance)

    def _report(self, allowance: float | None) -> Outcome:
        return stages.report(self.context, self.runs, allowance)

    def _say(self, line: str) -> None:
        print(f"[{self.context.deadline.elapsed():5.0f}s] {line}", flush=True)

    def _finish(self) -> None:
        """summary.json, summary.md, the report's plots and session.tar.gz into OUT, then the closing
        table."""
        context = self.context
        outcomes = list(self.stages.outcomes.values())
        summary = session_summary(context, outcomes, self.preflight, self.runs, self.bad_input)
        (context.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (context.out / "summary.md").write_text(summary_markdown(summary))
        run_dir = reported_run(self.runs)
        for plot in ("loss.png", "loss_by_position.png"):
            if run_dir is not None and (run_dir / "report" / plot).is_file():
                shutil.copyfile(run_dir / "report" / plot, context.out / plot)
        try:
            packed = pack(context.out, context.work, list(self.runs), context.logs)
            print(
                f"packed {len(packed)} files into {context.out / PACK_NAME} "
                f"({(context.out / PACK_NAME).stat().st_size / MIB:.2f} MiB)",
                flush=True,
            )
        except OSError as error:
            print(f"error: packing the run's files failed: {error}", file=sys.stderr, flush=True)
        print(final_table(summary), flush=True)
