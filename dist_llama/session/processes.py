"""One stage's child process: run it with its log and time limit, stop its whole process group, say why it failed."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
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

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def why(self) -> str:
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
    errors = [line for line in tail if re.search(r"error|exception|traceback|failed|killed", line, re.IGNORECASE)]
    line = (errors or tail or ["no output"])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def run_child(log: Path, command: list[str], timeout: float, env: dict, cwd: Path) -> Child:
    """Run command with its output in log (the command first, the exit last), stopped after timeout seconds."""
    start = time.monotonic()
    with log.open("w") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode, timed_out = process.wait(timeout=max(1.0, timeout)), False
        except (subprocess.TimeoutExpired, Interrupted) as stop:
            stop_process_group(process)
            if isinstance(stop, Interrupted):
                raise
            returncode, timed_out = process.returncode, True
    seconds = time.monotonic() - start
    with log.open("a") as handle:
        handle.write(f"# {'stopped at the time limit' if timed_out else f'exit {returncode}'} after {seconds:.1f} s "
                     f"(limit {timeout:.0f} s)\n")
    return Child(returncode, timed_out, seconds, log)


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
