"""One stage's child process: run it with its log and time limit, stop its whole process group, say why it
failed."""

from __future__ import annotations

import math
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


@dataclass
class Child:
    """One finished child process."""

    returncode: int | None
    timed_out: bool
    seconds: float
    log: Path
    stalled_after_s: float | None = None  # stopped because `started()` was still False by then

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.stalled_after_s is None

    def why(self) -> str:
        if self.stalled_after_s is not None:
            return f"stopped: no sign of progress after {self.stalled_after_s:.0f} s (log {self.log.name})"
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
    log: Path,
    command: list[str],
    timeout: float,
    env: dict,
    cwd: Path,
    started: Callable[[], bool] | None = None,
    start_within: float = math.inf,
) -> Child:
    """Run command with its output in log (the command first, the exit last), stopped after timeout seconds,
    or after start_within seconds when `started()` is still False then (a compile that hangs, say)."""
    start = time.monotonic()
    timeout = max(1.0, timeout)
    with log.open("w") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            ending = _wait(process, start, timeout, started, start_within)
        except Interrupted:
            stop_process_group(process)
            raise
        if ending != "exit":
            stop_process_group(process)
    seconds = time.monotonic() - start
    said = {
        "exit": f"exit {process.returncode}",
        "timeout": "stopped at the time limit",
        "stalled": f"stopped: no sign of progress after {start_within:.0f} s",
    }[ending]
    with log.open("a") as handle:
        handle.write(f"# {said} after {seconds:.1f} s (limit {timeout:.0f} s)\n")
    return Child(
        process.returncode, ending == "timeout", seconds, log, start_within if ending == "stalled" else None
    )


def _wait(
    process: subprocess.Popen,
    start: float,
    timeout: float,
    started: Callable[[], bool] | None,
    start_within: float,
) -> str:
    """'exit', 'timeout', or 'stalled' (started() still False start_within seconds after start)."""
    if started is not None and start_within < timeout:
        try:
            process.wait(timeout=start_within)
            return "exit"
        except subprocess.TimeoutExpired:
            if not started():
                return "stalled"
    try:
        process.wait(timeout=max(0.0, timeout - (time.monotonic() - start)))
        return "exit"
    except subprocess.TimeoutExpired:
        return "timeout"


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
