"""The step boundary: what a run does between one optimizer step and the next, decided in one place.

`StepBoundary.after(step)` returns a `Todo`:
- validate: every train.eval_every steps and at the last step;
- save: every checkpoint.every steps, at the last step, before a stop, and after the run's first step when
  checkpoint.first_step is set;
- plan: the time budget (`train.time_budget_s`) ends its measurement here. After warm-up steps it timed a
  few steps; now one evaluation and one checkpoint are timed too (validate and save), and
  `StepBoundary.plan` sets the step count that fits (`plan_steps`). The plan is kept in every later
  checkpoint, so a resume keeps it;
- stop: a stop signal (`train.stop_signals`, e.g. Slurm's `--signal=USR1@120` before the time limit, or the
  SIGTERM of a preemption; the handler only sets a flag) or the job's time limit
  (`train.time_limit_margin_s`, read once from Slurm, so a missed signal still leaves time to save).
  `StopRequest.reason` is one collective: every rank learns whether any rank asks to stop, so all of them
  write the same last checkpoint and stop.
The run carries the Todo out (train.py). StepBoundary does no I/O and runs no model: its collectives come in
as functions, so its rules are tested without processes.
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

from dist_llama.config import TrainConfig
from dist_llama.parallel import DistEnv, all_reduce_max, broadcast_object

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Todo:
    """What to do after a step, in this order: validate, save, plan the budget, stop."""

    validate: bool = False
    save: bool = False
    plan: bool = False
    stop: str | None = None  # why the run stops here ("signal SIGUSR1", "time limit"), or None


class StepBoundary:
    """The cadences, the time budget and the stop request of a run, from `start_step` on."""

    def __init__(
        self,
        train: TrainConfig,
        save_every: int,
        start_step: int,
        saved_plan: dict | None,
        stop_reason: Callable[[], str | None],
        clock: Callable[[], float],
        share: Callable[[dict | None], dict] = lambda plan: plan,
        save_first_step: bool = False,
    ):
        """stop_reason: the stop decision every rank shares (StopRequest.reason). clock: training time without
        pauses (metrics.TrainingClock.now). share: rank 0's plan to every rank (broadcast_object)."""
        self.train, self.save_every, self.save_first_step = train, save_every, save_first_step
        self.budget = TimeBudget(train, start_step, saved_plan)
        self.stop_reason, self.clock, self.share = stop_reason, clock, share
        if self.budget.starts_measuring(start_step):  # no warm-up steps: the first step is timed too
            self.budget.measure_start = clock()

    @property
    def total_steps(self) -> int:
        """train.steps, or the budget's planned steps once planned (never more than train.steps)."""
        return (
            min(self.budget.plan["planned_steps"], self.train.steps) if self.budget.plan else self.train.steps
        )

    def after(self, step: int) -> Todo:
        last = step >= self.total_steps
        stop = None if last else self.stop_reason()  # a collective: every rank asks at the same boundaries
        if self.budget.starts_measuring(step):
            self.budget.measure_start = self.clock()
        if not last and self.budget.plans_at(step):
            return Todo(validate=True, save=True, plan=True, stop=stop)
        if stop:
            return Todo(save=True, stop=stop)
        return Todo(
            validate=last or step % self.train.eval_every == 0,
            save=last or step % self.save_every == 0 or (step == 1 and self.save_first_step),
        )

    def plan(self, step: int, eval_s: float, checkpoint_s: float, is_main: bool) -> dict:
        """Rank 0 plans from the measured costs; every rank takes its plan and checks it (so a budget too
        small stops all of them). Returns the plan."""
        step_s = self.budget.step_s(self.clock())
        made = (
            plan_steps(self.train, self.save_every, step, step_s, eval_s, checkpoint_s) if is_main else None
        )
        self.budget.plan = self.share(made)
        check_budget_plan(self.budget.plan)
        return self.budget.plan


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


def plan_steps(
    train: TrainConfig, save_every: int, step: int, step_s: float, eval_s: float, checkpoint_s: float
) -> dict:
    """The step count that ends training, its evaluations and checkpoints (the final ones included) inside
    train.time_budget_s, given the measured costs; capped by train.steps. At most `step` when even the next
    step does not fit (check_budget_plan then stops the run)."""
    budget, age = train.time_budget_s, process_age_s()
    left = (budget - age) * (1 - train.budget_safety)

    def cost(total: int) -> float:
        return (
            (total - step) * step_s
            + events_between(step, total, train.eval_every) * eval_s
            + events_between(step, total, save_every) * checkpoint_s
        )

    rate = step_s + eval_s / train.eval_every + checkpoint_s / save_every
    total = min(train.steps, step + max(0, int((left - eval_s - checkpoint_s) / rate)) + 1)
    while total > step and cost(total) > left:
        total -= 1
    return {
        "planned_steps": total,
        "step_s": step_s,
        "eval_s": eval_s,
        "checkpoint_s": checkpoint_s,
        "measured_at_step": step,
        "budget_s": budget,
        "age_s": age,
    }


def check_budget_plan(plan: dict) -> None:
    """Every rank calls it on the shared plan, so all stop together when the budget is too small."""
    if plan["planned_steps"] <= plan["measured_at_step"]:
        raise BudgetError(
            f"train.time_budget_s={plan['budget_s']:g} is too small: {plan['age_s']:.0f} s are gone after "
            f"{plan['measured_at_step']} steps, warm-up and timed (a step takes {plan['step_s']:.2f} s, an "
            f"evaluation {plan['eval_s']:.1f} s, a checkpoint {plan['checkpoint_s']:.1f} s); raise the "
            "budget, or lower train.budget_warmup_steps / train.eval_batches"
        )


def measure_pauses(
    evaluate: Callable[[bool], None], save_checkpoint: Callable[[], None], clock: Callable[[], float]
) -> tuple[float, float]:
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

    def plans_at(self, step: int) -> bool:
        return self.waiting and step == self.measure_to

    def step_s(self, now: float) -> float:
        return (now - self.measure_start) / (self.measure_to - self.measure_from)


# --- Stopping early: a signal, or the job's time limit --------------------------------------------

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
        # Python takes signal handlers in the main thread only; a trainer run from another
        # thread (a notebook's
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
        """One collective: 'signal SIGUSR1' / 'time limit' if any rank asks to stop, the same on every
        rank."""
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
