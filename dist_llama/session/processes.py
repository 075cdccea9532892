"""One stage's child process: run it with its log and time limit, stop its whole process group, say why it
failed."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class Interrupted(Exception):
    """SIGTERM from whoever runs the session: stop the stage, still write the summary."""


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
    """One finished child process."""

    returncode: int | None
    timed_out: bool
    seconds: float
    log: Path
    missed: str | None = None  # the progress mark it was stopped for not reaching in time
    missed_within_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.missed is None

    def why(self) -> str:
        if self.missed is not None:
            return f"stopped: no {self.missed} within {self.missed_within_s:.0f} s (log {self.log.name})"
        if self.timed_out:
            return f"stopped at its time limit after {self.seconds:.0f} s (log {self.log.name})"
        return f"{last_error_line(self.log)} (exit {self.returncode}, log {self.log.name})"


def last_error_line(log: Path) -> str:
    """The line that says what went wrong: the last error-looking line near the end, else the last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    tail = lines[1:][-60:]  # the first line is the command
    errors = [
        line for line in tail if re.search(r"error|exception|traceback|failed|killed", line, re.IGNORECASE)
    ]
    line = (errors or tail or ["no output"])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def run_child(
    log: Path, command: list[str], timeout: float, env: dict, cwd: Path, progress: ProgressMarks | None = None
) -> Child:
    """Run command with its output in log (the command first, the exit last), stopped after timeout seconds,
    or as soon as it misses a progress mark."""
    start = time.monotonic()
    timeout = max(1.0, timeout)
    with log.open("w") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            ending, missed, waited = _wait(process, start + timeout, progress)
        except Interrupted:
            stop_process_group(process)
            raise
        if ending != "exit":
            stop_process_group(process)
    seconds = time.monotonic() - start
    said = {
        "exit": f"exit {process.returncode}",
        "timeout": "stopped at the time limit",
        "missed": f"stopped: no {missed} within {waited:.0f} s",
    }[ending]
    with log.open("a") as handle:
        handle.write(f"# {said} after {seconds:.1f} s (limit {timeout:.0f} s)\n")
    return Child(process.returncode, ending == "timeout", seconds, log, missed, waited)


POLL_S = 1.0  # how often a watched child's progress is read


def _wait(
    process: subprocess.Popen, deadline: float, progress: ProgressMarks | None
) -> tuple[str, str | None, float]:
    """("exit", None, 0) when the child exits by `deadline`, ("timeout", None, 0) when it does not,
    ("missed", mark, seconds waited for it) when it misses a progress mark first."""
    marks, since = list(progress.marks) if progress else [], time.monotonic()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout", None, 0.0
        try:
            process.wait(timeout=min(POLL_S, left) if marks else left)
            return "exit", None, 0.0
        except subprocess.TimeoutExpired:
            pass
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
