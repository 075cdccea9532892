"""The step boundary: what a run does between one optimizer step and the next, decided in one place. A pure
decision table: it runs no model, does no I/O and handles no signal; what it needs from outside (the stop
decision every rank shares, the training clock, rank 0's plan) comes in as functions, so its rules are
tested without processes.

`StepBoundary.after(step)` returns a `Todo`:
- validate: every train.eval_every steps and at the last step;
- save: every checkpoint.every steps, at the last step, before a stop, and after the run's first step when
  checkpoint.first_step is set;
- plan: the time budget (`train.time_budget_s`) ends its measurement here. After warm-up steps it timed a
  few steps; the run then times one evaluation and one checkpoint (the loop's stall, and the whole write,
  which differ with checkpoint.async_save) and passes the seconds to `StepBoundary.plan`, which sets the
  step count that fits (`plan_steps`). The plan is kept in every later checkpoint, so a resume keeps it;
- stop: why the run stops here (a stop signal or the job's time limit: stopping.StopRequest), or None.
`StepBoundary.total_steps` is the run's step count: train.steps, or the plan's once planned. The run reads
it when it steps, logs and saves; nothing else keeps a copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from dist_llama.config import TrainConfig


@dataclass(frozen=True)
class Todo:
    """What to do after a step, in this order: validate, save, plan the budget, stop."""

    validate: bool = False
    save: bool = False
    plan: bool = False
    stop: str | None = None  # why the run stops here ("signal SIGUSR1", "time limit"), or None


@dataclass(frozen=True)
class BudgetPlan:
    """The time budget's plan: the step count that fits, and the measurements it was made from. Stored in
    every later checkpoint (meta.json's budget_plan) and logged as the "plan" record."""

    planned_steps: int
    step_s: float
    eval_s: float
    # What a checkpoint holds the training loop (with checkpoint.async_save: the copy, not the write)
    checkpoint_s: float
    measured_at_step: int
    budget_s: float
    age_s: float  # seconds since the process started, when planned
    # The step count the run followed before this plan: train.steps, or the plan it replaced (a resume
    # with train.budget_on_resume=replan). The learning rate is continuous from that schedule.
    steps_before: int | None = None
    # A checkpoint's whole write, which the run's end waits for after the last one (null: checkpoint_s, as
    # in a synchronous save)
    write_s: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> BudgetPlan | None:
        return cls(**values) if values else None


class StepBoundary:
    """The cadences, the time budget and the stop request of a run, from `start_step` on."""

    def __init__(
        self,
        train: TrainConfig,
        save_every: int,
        start_step: int,
        saved_plan: BudgetPlan | None,
        stop_reason: Callable[[], str | None],
        clock: Callable[[], float],
        share: Callable[[BudgetPlan | None], BudgetPlan] = lambda plan: plan,
        save_first_step: bool = False,
    ):
        """stop_reason: the stop decision every rank shares (stopping.StopRequest.reason). clock: training
        time without pauses (metrics.TrainingClock.now). share: rank 0's plan to every rank
        (broadcast_object)."""
        self.train, self.save_every, self.save_first_step = train, save_every, save_first_step
        self.budget = TimeBudget(train, start_step, saved_plan)
        self.stop_reason, self.clock, self.share = stop_reason, clock, share
        if self.budget.starts_measuring(start_step):  # no warm-up steps: the first step is timed too
            self.budget.measure_start = clock()

    @property
    def plan_made(self) -> BudgetPlan | None:
        """The time budget's plan, once made (or as the resumed checkpoint kept it); None without one."""
        return self.budget.plan

    @property
    def total_steps(self) -> int:
        """train.steps, or the budget's planned steps once planned (never more than train.steps)."""
        plan = self.budget.plan
        return min(plan.planned_steps, self.train.steps) if plan else self.train.steps

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

    def plan(
        self,
        step: int,
        eval_s: float,
        checkpoint_s: float,
        age_s: float,
        is_main: bool,
        write_s: float | None = None,
    ) -> BudgetPlan:
        """Rank 0 plans from the measured costs (`age_s`: seconds since its process started; `write_s`: a
        checkpoint's whole write where the loop waits less, `checkpoint_s`); every rank takes its plan and
        checks it (so a budget too small stops all of them). Returns the plan."""
        step_s = self.budget.step_s(self.clock())
        made = (
            plan_steps(self.train, self.save_every, step, step_s, eval_s, checkpoint_s, age_s, write_s)
            if is_main
            else None
        )
        if made is not None:  # what the run followed until now, for a learning rate without a jump
            made = dataclasses.replace(made, steps_before=self.total_steps)
        self.budget.plan, self.budget.replanning = self.share(made), False
        check_budget_plan(self.budget.plan)
        return self.budget.plan


class BudgetError(ValueError):
    """train.time_budget_s cannot hold even the measured warm-up."""


def events_between(first: int, last: int, every: int) -> int:
    """How many of steps first+1..last fall on a multiple of `every` or are `last` itself."""
    if last <= first:
        return 0
    return last // every - first // every + (1 if last % every else 0)


def plan_steps(
    train: TrainConfig,
    save_every: int,
    step: int,
    step_s: float,
    eval_s: float,
    checkpoint_s: float,
    age_s: float,
    write_s: float | None = None,
) -> BudgetPlan:
    """The step count that ends training, its evaluations and checkpoints (the final ones included) inside
    train.time_budget_s, given the measured costs and the seconds already gone; capped by train.steps. At
    most `step` when even the next step does not fit (check_budget_plan then stops the run).

    A checkpoint costs the loop `checkpoint_s`; with a background write (`write_s`, longer) a save also waits
    for the previous write where the steps between them are shorter than it, and the last one's write is
    waited for at the end."""
    budget = train.time_budget_s
    left = (budget - age_s) * (1 - train.budget_safety)
    written = max(write_s if write_s is not None else checkpoint_s, checkpoint_s)
    per_save = max(checkpoint_s, written - save_every * step_s)
    last_write = written - checkpoint_s  # the end's wait after the last save's stall

    def cost(total: int) -> float:
        return (
            (total - step) * step_s
            + events_between(step, total, train.eval_every) * eval_s
            + events_between(step, total, save_every) * per_save
            + last_write
        )

    # From above: each cadence's events number at least (total - step) / its cadence, so no count past this
    # one fits; the loop then steps down to the largest that does.
    rate = step_s + eval_s / train.eval_every + per_save / save_every
    total = min(train.steps, step + max(0, int((left - last_write) / rate)) + 1)
    while total > step and cost(total) > left:
        total -= 1
    return BudgetPlan(total, step_s, eval_s, checkpoint_s, step, budget, age_s, write_s=write_s)


def check_budget_plan(plan: BudgetPlan) -> None:
    """Every rank calls it on the shared plan, so all stop together when the budget is too small."""
    if plan.planned_steps <= plan.measured_at_step:
        raise BudgetError(
            f"train.time_budget_s={plan.budget_s:g} is too small: {plan.age_s:.0f} s are gone after "
            f"{plan.measured_at_step} steps, warm-up and timed (a step takes {plan.step_s:.2f} s, an "
            f"evaluation {plan.eval_s:.1f} s, a checkpoint {plan.checkpoint_s:.1f} s); raise the budget, or "
            "lower train.budget_warmup_steps / train.eval_batches"
        )


class TimeBudget:
    """The budget's measurement window and its plan. `plan` is None until planned (or without a budget);
    a resumed run passes the plan its checkpoint stored, so the schedule planned before stays the schedule."""

    def __init__(self, train: TrainConfig, start_step: int, saved_plan: BudgetPlan | None):
        self.enabled = train.time_budget_s is not None
        self.plan = saved_plan if self.enabled else None
        # replan: the saved plan holds until this process has measured and planned its own
        self.replanning = self.enabled and saved_plan is not None and train.budget_on_resume == "replan"
        self.measure_from = start_step + train.budget_warmup_steps
        self.measure_to = self.measure_from + train.budget_measure_steps
        self.measure_start = 0.0

    @property
    def waiting(self) -> bool:
        return self.enabled and (self.plan is None or self.replanning)

    def starts_measuring(self, step: int) -> bool:
        return self.waiting and step == self.measure_from

    def plans_at(self, step: int) -> bool:
        return self.waiting and step == self.measure_to

    def step_s(self, now: float) -> float:
        return (now - self.measure_start) / (self.measure_to - self.measure_from)
