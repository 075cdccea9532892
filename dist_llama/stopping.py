"""When training stops: the decisions taken at a step boundary, apart from the regular cadences.

- The time budget (`train.time_budget_s`): after warm-up steps, time a few steps, one evaluation and one
  checkpoint, then plan the step count that fits (`TimeBudget`, `plan_steps`).
- A stop signal (`train.stop_signals`, e.g. Slurm's `--signal=USR1@120` before the time limit, or the
  SIGTERM of a preemption): the handler only sets a flag.
- The job's time limit (`train.time_limit_margin_s`): read once from Slurm, so a missed signal still
  leaves time to save.

`StopRequest.reason(step)` is one collective at every step boundary: every rank learns whether any rank
was signalled or is past the time limit, so all of them write the same last checkpoint and stop together.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from dist_llama.config import Config, TrainConfig
from dist_llama.parallel import DistEnv, all_reduce_max, broadcast_object

log = logging.getLogger(__name__)


class BudgetError(ValueError):
    """train.time_budget_s cannot hold even the measured warm-up."""


def process_age_s() -> float:
    """Seconds since this process started: the budget counts imports and set-up too."""
    return time.time() - psutil.Process().create_time()


def events_between(first: int, last: int, every: int) -> int:
    """How many of steps first+1..last fall on a multiple of `every` or are `last` itself."""
    if last <= first:
        return 0
    return last // every - first // every + (1 if last % every else 0)


def plan_steps(config: Config, step: int, step_s: float, eval_s: float, checkpoint_s: float) -> dict:
    """The step count that ends training, its evaluations and checkpoints (the final ones included) inside
    train.time_budget_s, given the measured costs; capped by train.steps. At most `step` when even the next
    step does not fit (check_budget_plan then stops the run)."""
    budget, age = config.train.time_budget_s, process_age_s()
    left = (budget - age) * (1 - config.train.budget_safety)

    def cost(total: int) -> float:
        return ((total - step) * step_s + events_between(step, total, config.train.eval_every) * eval_s
                + events_between(step, total, config.checkpoint.every) * checkpoint_s)

    rate = step_s + eval_s / config.train.eval_every + checkpoint_s / config.checkpoint.every
    total = min(config.train.steps, step + max(0, int((left - eval_s - checkpoint_s) / rate)) + 1)
    while total > step and cost(total) > left:
        total -= 1
    return {"planned_steps": total, "step_s": step_s, "eval_s": eval_s, "checkpoint_s": checkpoint_s,
            "measured_at_step": step, "budget_s": budget, "age_s": age}


def check_budget_plan(plan: dict) -> None:
    """Every rank calls it on the broadcast plan, so all stop together when the budget is too small."""
    if plan["planned_steps"] <= plan["measured_at_step"]:
        raise BudgetError(
            f"train.time_budget_s={plan['budget_s']:g} is too small: {plan['age_s']:.0f} s are gone after "
            f"{plan['measured_at_step']} warm-up steps (a step takes {plan['step_s']:.2f} s, an evaluation "
            f"{plan['eval_s']:.1f} s, a checkpoint {plan['checkpoint_s']:.1f} s); raise the budget, or lower "
            "train.budget_warmup_steps / train.eval_batches")


def measure_pauses(evaluate: Callable[[bool], None], save_checkpoint: Callable[[], None],
                   clock: Callable[[], float]) -> tuple[float, float]:
    """Seconds of one evaluation and one checkpoint, as every later one will take them. The evaluation is
    timed warm: `evaluate(True)` first runs an untimed pass (one batch) in which a compiled model compiles its
    evaluation graphs. Timed cold, the first evaluation cost 28x a warm one (debug model, compiled), and that
    cost charged to every planned evaluation left over a quarter of the budget unused."""
    evaluate(True)
    start = clock()
    evaluate(False)
    middle = clock()
    save_checkpoint()
    return middle - start, clock() - middle


class TimeBudget:
    """The budget's measurement window and its plan. `plan` is None until planned (or without a budget);
    a resumed run passes the plan its checkpoint stored, so the schedule planned before stays the schedule."""

    def __init__(self, train: TrainConfig, start_step: int, saved_plan: dict | None):
        self.enabled = train.time_budget_s is not None
        self.plan = saved_plan if self.enabled else None
        self.measure_from = start_step + train.budget_warmup_steps
        self.measure_to = self.measure_from + train.budget_measure_steps
        self.measure_start = 0.0

    @property
    def waiting(self) -> bool:
        return self.enabled and self.plan is None

    def starts_measuring(self, step: int) -> bool:
        return self.waiting and step == self.measure_from

    def plans_now(self, step: int) -> bool:
        return self.waiting and step == self.measure_to

    def step_s(self, now: float) -> float:
        return (now - self.measure_start) / (self.measure_to - self.measure_from)

    def make_plan(self, config: Config, env: DistEnv, step: int, step_s: float, eval_s: float, checkpoint_s: float) -> dict:
        """Rank 0 plans, every rank takes its plan and checks it (so a budget too small stops all of them)."""
        self.plan = broadcast_object(plan_steps(config, step, step_s, eval_s, checkpoint_s) if env.is_main else None)
        check_budget_plan(self.plan)
        return self.plan


# --- Stopping early: a signal, or the job's time limit --------------------------------------------

STOPPED_FILE = "stopped.json"


def slurm_time_left_s() -> float | None:
    """Seconds left before this Slurm job's time limit, or None outside Slurm or without a limit."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or shutil.which("squeue") is None:
        return None
    try:
        left = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
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


@dataclass
class StopRequest:
    """Collects stop requests between steps; `reason` turns them into one decision every rank shares."""

    signals: tuple[str, ...]
    end_time: float | None  # time.time() at which to stop, from the job's time limit less the margin
    device: torch.device
    received: str | None = None

    @classmethod
    def install(cls, train: TrainConfig, env: DistEnv) -> "StopRequest":
        end_time = None
        if train.time_limit_margin_s is not None:
            left = broadcast_object(slurm_time_left_s() if env.is_main else None)
            if left is not None:
                end_time = time.time() + left - train.time_limit_margin_s
                log.info("Slurm time limit in %.0f s: stopping with a checkpoint %.0f s before it", left,
                         train.time_limit_margin_s)
        # Python takes signal handlers in the main thread only; a trainer run from another thread (a notebook's
        # worker, say) stops on the time limit alone.
        handled = train.stop_signals if threading.current_thread() is threading.main_thread() else []
        request = cls(tuple(handled), end_time, env.device)
        for name in request.signals:
            signal.signal(signal.Signals[name], request._on_signal)
        return request

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the step in flight finishes, and the boundary after it decides for every rank.
        self.received = signal.Signals(signum).name

    def reason(self) -> str | None:
        """One collective: 'signal SIGUSR1' / 'time limit' if any rank asks to stop, the same on every rank."""
        local = 0
        if self.received:
            local = 1
        elif self.end_time is not None and time.time() >= self.end_time:
            local = 2
        flag = all_reduce_max(torch.tensor([local], device=self.device)).item()
        if flag == 0:
            return None
        if flag == 1:
            return f"signal {self.received}" if self.received else "signal (on another rank)"
        return "time limit"

    def close(self) -> None:
        for name in self.signals:
            signal.signal(signal.Signals[name], signal.SIG_DFL)


def stop_message(reason: str, step: int, total_steps: int) -> str:
    return (f"stopping at step {step} of {total_steps} ({reason}): checkpoint written; the same command "
            "resumes from it (checkpoint.resume=auto)")


def write_stop_record(run_dir: Path, step: int, reason: str) -> None:
    """run_dir/stopped.json tells a launcher (slurm/train.sbatch) that the run stopped early and resumes;
    a run that finishes removes it."""
    (run_dir / STOPPED_FILE).write_text(json.dumps({"step": step, "reason": reason, "time": time.time()}))


def clear_stop_record(run_dir: Path) -> None:
    (run_dir / STOPPED_FILE).unlink(missing_ok=True)
