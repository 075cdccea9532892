"""The one runner of the chain of stages that `make run` (dist_llama.pipeline) and the GPU session
(dist_llama.session) both run: the chain's order, and how each stage is skipped, run, timed and reported,
its child processes with their logs and time limits, and the one sentence that says why a child failed.

A command gives StageRunner its Stages; they run in ORDER, whatever order they were given in. A stage is
left out when the user skips it (--skip), when an earlier stage it needs did not pass, when it says it is
up to date (unless --redo names it), or when the deadline, if there is one, leaves it too little time. The
pipeline has no deadline; the session's (dist_llama.session.deadline) gives each stage its allowance.

Standard library only: the GPU session imports this before its install stage has installed anything.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

from dist_llama.cli import error_message

# Every stage, in the order it runs. A command runs those it has: `make run` train, consolidate, evaluate
# and report; the GPU session install, preflight, train, release (a consolidation and a check that the
# folder loads where dist_llama is not importable), evaluate, bench and report.
ORDER = ("install", "preflight", "train", "consolidate", "release", "evaluate", "bench", "report")


def chain(*names: str) -> tuple[str, ...]:
    """A command's stages in the chain's order; ValueError for a name that is not in it."""
    unknown = [name for name in names if name not in ORDER]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a stage of the chain ({', '.join(ORDER)})")
    return tuple(sorted(names, key=ORDER.index))


def stage_list(text: str, known: Collection[str]) -> set[str]:
    """The stages of a comma-separated option (--skip, --redo); ValueError for one the command lacks."""
    names = {name for name in text.split(",") if name}
    unknown = sorted(names - set(known))
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; stages are {', '.join(known)}")
    return names


@dataclass
class Outcome:
    """What one stage did: the line the runner prints for it, a row of the session's summary."""

    stage: str
    status: str = "skipped"  # ok | failed | skipped (running while it runs)
    seconds: float = 0.0
    detail: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Stage:
    """One stage of a command: `run(allowance)` does it and returns its Outcome (allowance: the seconds the
    deadline gives it, None without a limit); `up_to_date()` says why it need not run, or None."""

    name: str
    run: Callable[[float | None], Outcome]
    needs: tuple[str, ...] = ()  # earlier stages that must have ended ok
    up_to_date: Callable[[], str | None] | None = None


class Deadline(Protocol):
    """What the runner asks of a deadline (dist_llama.session.deadline.Deadline is the one there is)."""

    def allowance(self, stage: str) -> float | None: ...

    def worth_starting(self, stage: str, allowance: float | None) -> bool: ...

    def least(self, stage: str) -> float: ...


class StageRunner:
    """Runs stages in ORDER and keeps each one's Outcome; a stage that raises is recorded as failed and its
    exception goes on to the command, which says it in one line."""

    def __init__(
        self,
        stages: Iterable[Stage],
        *,
        skip: Collection[str] = (),
        redo: Collection[str] = (),
        deadline: Deadline | None = None,
        say: Callable[[str], None] = print,
    ):
        self.stages = sorted(stages, key=lambda stage: ORDER.index(stage.name))
        self.skip, self.redo, self.deadline, self.say = skip, redo, deadline, say
        self.outcomes = {stage.name: Outcome(stage.name) for stage in self.stages}

    def run(self) -> dict[str, Outcome]:
        try:
            for stage in self.stages:
                allowance = self.deadline.allowance(stage.name) if self.deadline else None
                reason = self._reason_not_to_run(stage, allowance)
                if reason is None:
                    self._run(stage, allowance)
                    continue
                self.outcomes[stage.name].detail = reason
                if stage.name not in self.skip:
                    self.say(f"{stage.name}: {reason}")
        finally:
            for outcome in self.outcomes.values():
                if outcome.status == "skipped" and not outcome.detail:
                    outcome.detail = "not reached"
        return self.outcomes

    def failed(self) -> bool:
        return any(outcome.status == "failed" for outcome in self.outcomes.values())

    def _reason_not_to_run(self, stage: Stage, allowance: float | None) -> str | None:
        if stage.name in self.skip:
            return "skipped by --skip"
        blocked = [need for need in stage.needs if self.outcomes[need].status != "ok"]
        if blocked:
            return f"{blocked[0]} did not pass"
        current = stage.up_to_date() if stage.up_to_date and stage.name not in self.redo else None
        if current is not None:
            return current
        if self.deadline and not self.deadline.worth_starting(stage.name, allowance):
            least = self.deadline.least(stage.name)
            return f"skipped for time: {allowance:.0f} s allowed, {least:.0f} s needed"
        return None

    def _run(self, stage: Stage, allowance: float | None) -> None:
        self.say(f"{stage.name}: running" + ("" if allowance is None else f" (at most {allowance:.0f} s)"))
        outcome = self.outcomes[stage.name]
        outcome.status, started = "running", time.monotonic()
        try:
            result = stage.run(allowance)
        except BaseException as error:
            outcome.status, outcome.seconds = "failed", time.monotonic() - started
            outcome.detail = "interrupted by SIGTERM" if isinstance(error, Interrupted) else str(error)
            raise
        result.seconds = time.monotonic() - started
        self.outcomes[stage.name] = result
        self.say(f"{stage.name}: {result.status} ({result.seconds:.0f} s) {result.detail}".rstrip())


# Child processes -----------------------------------------------------------------------------------------


class Interrupted(Exception):
    """SIGTERM from whoever runs the command: stop the stage's child, still write what is owed."""


def raise_interrupted(signum, frame):
    raise Interrupted()


@dataclass(frozen=True)
class ProgressMarks:
    """Marks a child must reach in order, each within `within_s` of the one before (the first: of its start),
    and all of them by `all_by` (time.monotonic(); None: no such limit); `reached(mark)` says whether it has.
    A child that misses one is stopped: a compile that hangs, say."""

    marks: tuple[str, ...]
    within_s: float
    reached: Callable[[str], bool]
    all_by: float | None = None


@dataclass
class Child:
    """One finished child process, and what it said went wrong (`error`, from its output alone)."""

    returncode: int | None
    timed_out: bool
    seconds: float
    log: Path
    error: str = ""
    missed: str | None = None  # the progress mark it was stopped for not reaching in time
    missed_within_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.missed is None

    def why(self, log_as: str | None = None) -> str:
        """Why it failed, in one sentence that names its log (as `log_as`; default: the log's file name)."""
        log = log_as or self.log.name
        if self.missed is not None:
            return f"stopped: no {self.missed} within {self.missed_within_s:.0f} s (log {log})"
        if self.timed_out:
            return f"stopped at its time limit after {self.seconds:.0f} s (log {log})"
        return f"{self.error} (exit {self.returncode}, log {log})"


def error_line(output: str) -> str:
    """What a child said went wrong: its own one-line error (`<command>: error: <message>`, dist_llama.cli),
    else the last error-looking line near the end of its output, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    ours = next((message for message in map(error_message, lines) if message), None)
    if ours:
        line = ours
    else:
        looks = re.compile(r"error|exception|traceback|failed|killed", re.IGNORECASE)
        tail = lines[-60:]
        line = ([line for line in tail if looks.search(line)] or tail or ["no output"])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def run_child(
    log: Path,
    command: list[str],
    timeout: float | None = None,
    env: dict | None = None,
    cwd: Path | None = None,
    progress: ProgressMarks | None = None,
    *,
    echo: TextIO | None = None,
) -> Child:
    """Run command in its own process group with its output appended to log (the command first, how it
    ended last) and, with `echo`, copied there as it comes. It is stopped after `timeout` seconds (None: no
    limit), as soon as it misses a mark of `progress`, or when this process is interrupted."""
    start = time.monotonic()
    timeout = None if timeout is None else max(1.0, timeout)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        output_from = handle.tell()
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    with log.open(errors="replace") as output:
        output.seek(output_from)
        tee = _Tee(output, echo)
        try:
            ends = None if timeout is None else start + timeout
            ending, missed, waited = _wait(process, ends, progress, tee)
        except BaseException:
            stop_process_group(process)
            raise
        if ending != "exit":
            stop_process_group(process)
        tee.copy()
    seconds = time.monotonic() - start
    said = {
        "exit": f"exit {process.returncode}",
        "timeout": "stopped at the time limit",
        "missed": f"stopped: no {missed} within {waited:.0f} s",
    }[ending]
    with log.open("a") as handle:
        limit = "" if timeout is None else f" (limit {timeout:.0f} s)"
        handle.write(f"# {said} after {seconds:.1f} s{limit}\n")
    return Child(process.returncode, ending == "timeout", seconds, log, tee.error(), missed, waited)


class _Tee:
    """A child's output as it reaches its log: kept for error_line, and copied to `echo` when given."""

    def __init__(self, output: TextIO, echo: TextIO | None):
        self.output, self.echo, self.text = output, echo, []

    def copy(self) -> None:
        new = self.output.read()
        if new:
            self.text.append(new)
            if self.echo is not None:
                self.echo.write(new)
                self.echo.flush()

    def error(self) -> str:
        return error_line("".join(self.text))


POLL_S = 1.0  # how often a watched child's progress is read
ECHO_POLL_S = 0.1  # how often a child's new output is copied to the console


def _wait(
    process: subprocess.Popen, deadline: float | None, progress: ProgressMarks | None, tee: _Tee
) -> tuple[str, str | None, float]:
    """("exit", None, 0) when the child exits by `deadline`, ("timeout", None, 0) when it does not,
    ("missed", mark, seconds waited for it) when it misses a progress mark first."""
    marks, since = list(progress.marks) if progress else [], time.monotonic()
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return "timeout", None, 0.0
        poll = ECHO_POLL_S if tee.echo is not None else POLL_S if marks else None
        waits = [seconds for seconds in (poll, left) if seconds is not None]
        try:
            process.wait(timeout=min(waits) if waits else None)
            return "exit", None, 0.0
        except subprocess.TimeoutExpired:
            tee.copy()
        while marks and progress.reached(marks[0]):
            marks.pop(0)
            since = time.monotonic()
        now = time.monotonic()
        late = progress is not None and progress.all_by is not None and now > progress.all_by
        if marks and (now - since > progress.within_s or late):
            return "missed", marks[0], now - since


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the child's whole process group (torchrun's workers too), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
