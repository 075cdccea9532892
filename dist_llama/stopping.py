"""Stopping early, with a checkpoint: a stop signal (`train.stop_signals`, e.g. Slurm's `--signal=USR1@120`
before the time limit, or the SIGTERM of a preemption; the handler only sets a flag) or the job's time limit
(`train.time_limit_margin_s`, read once from Slurm, so a missed signal still leaves time to save).
`StopRequest.reason` is one collective: every rank learns whether any rank asks to stop, so all of them write
the same last checkpoint and stop (the step boundary asks it: boundary.py). `stopped.json` tells a launcher
(slurm/train.sbatch) that the run stopped early and resumes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_llama.config import TrainConfig
from dist_llama.parallel import DistEnv, all_reduce_max, broadcast_object

log = logging.getLogger(__name__)

STOPPED_FILE = "stopped.json"


def slurm_time_left_s() -> float | None:
    """Seconds left before this Slurm job's time limit, or None outside Slurm or without a limit."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or shutil.which("squeue") is None:
        return None
    try:
        left = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError) as error:
        log.warning("cannot read the Slurm job's time limit (%s); stopping only on a signal", error)
        return None
    return parse_slurm_duration(left)


def parse_slurm_duration(text: str) -> float | None:
    """squeue's %L: '[days-]hours:minutes:seconds', 'minutes:seconds', or 'UNLIMITED'/'NOT_SET'."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text)
    if not match:
        return None
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


TIME_LIMIT = 1  # StopRequest.reason's code for the job's time limit; a signal's is this plus its number


@dataclass
class StopRequest:
    """Collects stop requests between steps; `reason` turns them into one decision every rank shares."""

    signals: tuple[str, ...]
    end_time: float | None  # time.time() at which to stop, from the job's time limit less the margin
    device: torch.device
    received: str | None = None

    @classmethod
    def install(cls, train: TrainConfig, env: DistEnv) -> StopRequest:
        end_time = None
        if train.time_limit_margin_s is not None:
            left = broadcast_object(slurm_time_left_s() if env.is_main else None)
            if left is not None:
                end_time = time.time() + left - train.time_limit_margin_s
                log.info(
                    "Slurm time limit in %.0f s: stopping with a checkpoint %.0f s before it",
                    left,
                    train.time_limit_margin_s,
                )
        # Python takes signal handlers in the main thread only; a trainer run from another thread (a
        # notebook's worker, say) stops on the time limit alone.
        handled = train.stop_signals if threading.current_thread() is threading.main_thread() else []
        request = cls(tuple(handled), end_time, env.device)
        for name in request.signals:
            signal.signal(signal.Signals[name], request._on_signal)
        return request

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the step in flight finishes, and the boundary after it decides for every rank.
        self.received = signal.Signals(signum).name

    def reason(self) -> str | None:
        """One collective: 'signal SIGUSR1' / 'time limit' if any rank asks to stop, the same on every rank.
        The ranks agree on the largest code (TIME_LIMIT, else a signal's number above it), so a rank that did
        not receive the signal names it too, and a signal wins over the time limit."""
        local = 0
        if self.received:
            local = TIME_LIMIT + signal.Signals[self.received].value
        elif self.end_time is not None and time.time() >= self.end_time:
            local = TIME_LIMIT
        code = int(all_reduce_max(torch.tensor([local], device=self.device)).item())
        if code == 0:
            return None
        if code == TIME_LIMIT:
            return "time limit"
        return f"signal {signal.Signals(code - TIME_LIMIT).name}"

    def close(self) -> None:
        for name in self.signals:
            signal.signal(signal.Signals[name], signal.SIG_DFL)


def stop_message(reason: str, step: int, total_steps: int) -> str:
    return (
        f"stopping at step {step} of {total_steps} ({reason}): checkpoint written; the same command "
        "resumes from it (checkpoint.resume=auto)"
    )


def write_stop_record(run_dir: Path, step: int, reason: str) -> None:
    """run_dir/stopped.json tells a launcher (slurm/train.sbatch) that the run stopped early and resumes;
    a run that finishes removes it."""
    (run_dir / STOPPED_FILE).write_text(json.dumps({"step": step, "reason": reason, "time": time.time()}))


def clear_stop_record(run_dir: Path) -> None:
    (run_dir / STOPPED_FILE).unlink(missing_ok=True)
