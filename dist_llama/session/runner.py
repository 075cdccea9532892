"""The loop that runs one session: it checks the inputs, runs the stages in order, passing each only what it
needs of what the earlier stages returned, and always ends with the summary and the pack."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from dist_llama.session import BadInput, stages
from dist_llama.session.bundle import MIB, load_manifest, unpack_bundle
from dist_llama.session.context import Context, Outcome, PreflightFacts, TrainingInterrupted, reported_run
from dist_llama.session.deadline import STAGES
from dist_llama.session.pack import PACK_NAME, pack
from dist_llama.session.processes import Interrupted
from dist_llama.session.summary import final_table, session_summary, summary_markdown


class Runner:
    """One session, from its Context. The attributes are the runner's record of what the stages returned,
    kept for the stages after them and for the summary; no stage sees the runner."""

    def __init__(self, context: Context):
        self.context = context
        self.outcomes = {stage: Outcome(stage) for stage in STAGES}
        self.preflight = PreflightFacts()
        self.runs: tuple[Path, ...] = ()  # training attempts, in order
        self.release: Path | None = None
        self.bad_input: str | None = None

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
            self._run_stages()
        except BadInput as error:
            self.bad_input = str(error)
            print(f"error: {error}", file=sys.stderr, flush=True)
        except Interrupted as interruption:
            if isinstance(interruption, TrainingInterrupted):
                self.runs = interruption.runs  # the run it stopped is summarised and packed too
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
                f"--work {context.work} is not empty: give a new folder (a finished run there "
                "would be resumed)"
            )
        self.context = dataclasses.replace(context, manifest=load_manifest(context.bundle))
        unpack_bundle(context.bundle, self.context.manifest, context.inputs)

    def _run_stages(self) -> None:
        deadline = self.context.deadline
        for stage in STAGES:
            outcome = self.outcomes[stage]
            if stage in deadline.skip:
                outcome.detail = "skipped by --skip"
                continue
            if stage not in ("install", "preflight") and self.outcomes["preflight"].status != "ok":
                outcome.detail = "preflight did not pass"
                continue
            allowance = deadline.allowance(stage)
            if not deadline.worth_starting(stage, allowance):
                outcome.detail = (
                    f"skipped for time: {allowance:.0f} s allowed, {deadline.least(stage):.0f} s needed"
                )
                self._say(f"{stage}: {outcome.detail}")
                continue
            self._say(f"{stage}: running" + ("" if stage == "train" else f" (at most {allowance:.0f} s)"))
            outcome.status = "running"
            started = time.monotonic()
            result = self._run_stage(stage, allowance)
            result.seconds = time.monotonic() - started
            self.outcomes[stage] = result
            self._say(f"{stage}: {result.status} ({result.seconds:.0f} s) {result.detail}")
            if stage == "preflight" and self.preflight.bad_input:
                self.bad_input = self.preflight.bad_input
                print(f"error: {self.bad_input}", file=sys.stderr, flush=True)
        for outcome in self.outcomes.values():
            if outcome.status == "skipped" and not outcome.detail:
                outcome.detail = "not reached"

    def _run_stage(self, stage: str, allowance: float) -> Outcome:
        """One stage, given what it needs of the earlier stages' products; what it returns is kept."""
        context = self.context
        if stage == "install":
            outcome = stages.install(context, allowance)
            # What it installed goes on the import path of every later child process.
            self.context = dataclasses.replace(context, site_installed=outcome.status == "ok")
        elif stage == "preflight":
            outcome, self.preflight = stages.preflight(context, allowance)
        elif stage == "train":
            outcome, self.runs = stages.train(context, self.preflight, allowance)
        elif stage == "release":
            outcome, self.release = stages.release(context, self.runs, allowance)
        elif stage == "evaluate":
            outcome = stages.evaluate(context, self.preflight, self.release, allowance)
        elif stage == "bench":
            outcome = stages.bench(context, allowance)
        else:
            outcome = stages.report(context, self.runs, allowance)
        return outcome

    def _say(self, line: str) -> None:
        print(f"[{self.context.deadline.elapsed():5.0f}s] {line}", flush=True)

    def _finish(self) -> None:
        """summary.json, summary.md, the report's plots and session.tar.gz into OUT; the table printed
        last."""
        context = self.context
        summary = session_summary(
            context, list(self.outcomes.values()), self.preflight, self.runs, self.bad_input
        )
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
