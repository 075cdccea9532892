"""The step boundary's rules without processes: cadences, the stop request, the time budget's measurement and
plan, and the training clock that leaves pauses out."""

import pytest
import torch

from dist_llama import metrics
from dist_llama.boundary import BudgetError, BudgetPlan, StepBoundary, Todo, plan_steps
from dist_llama.config import load_config


def make(*overrides: str, start_step: int = 0, saved_plan=None, stop_at: dict | None = None, clock=None):
    config = load_config(None, list(overrides))
    asked = []

    def stop_reason():
        asked.append(len(asked))
        return (stop_at or {}).get(len(asked))

    made = StepBoundary(
        config.train,
        config.checkpoint.every,
        start_step,
        saved_plan,
        stop_reason,
        clock or (lambda: 0.0),
        save_first_step=config.checkpoint.first_step,
    )
    return made, asked


def test_validate_and_save_follow_their_cadences_and_the_last_step_does_both():
    steps, _ = make("--train.steps=12", "--train.eval_every=4", "--checkpoint.every=6")
    todos = {step: steps.after(step) for step in range(1, 13)}
    assert [s for s, t in todos.items() if t.validate] == [4, 8, 12]
    assert [s for s, t in todos.items() if t.save] == [6, 12]
    assert not any(t.plan or t.stop for t in todos.values())


def test_checkpoint_first_step_also_saves_after_the_runs_first_step_only():
    steps, _ = make("--train.steps=12", "--checkpoint.every=6", "--checkpoint.first_step=true")
    assert [step for step in range(1, 13) if steps.after(step).save] == [1, 6, 12]
    resumed, _ = make(
        "--train.steps=12", "--checkpoint.every=6", "--checkpoint.first_step=true", start_step=6
    )
    assert [step for step in range(7, 13) if resumed.after(step).save] == [12]


def test_a_stop_request_saves_that_step_and_the_last_step_asks_no_collective():
    steps, asked = make(
        "--train.steps=6", "--train.eval_every=4", "--checkpoint.every=100", stop_at={5: "time limit"}
    )
    todos = [steps.after(step) for step in range(1, 7)]
    assert todos[4] == Todo(save=True, stop="time limit")  # step 5: save, no validation, stop
    assert todos[3] == Todo(validate=True)
    assert len(asked) == 5, "every boundary but the last asks every rank whether to stop"


def test_the_budget_measures_after_its_warm_up_then_plans_with_a_timed_evaluation_and_checkpoint():
    now = [0.0]
    steps, _ = make(
        "--train.time_budget_s=100",
        "--train.steps=100000",
        "--train.budget_safety=0",
        "--train.budget_warmup_steps=3",
        "--train.budget_measure_steps=5",
        "--train.eval_every=50",
        "--checkpoint.every=50",
        clock=lambda: now[0],
    )
    for step in range(1, 8):
        now[0] = {3: 101.5}.get(step, 0.0)  # the clock is read once, when the 3 warm-up steps are done
        assert not steps.after(step).plan and steps.total_steps == 100000
    now[0] = 104.0  # steps 4..8 took 2.5 s
    assert steps.after(8) == Todo(validate=True, save=True, plan=True)
    plan = steps.plan(8, eval_s=1.0, checkpoint_s=2.0, age_s=10.0, is_main=True)
    assert plan.step_s == pytest.approx(0.5) and plan.measured_at_step == 8
    assert steps.total_steps == plan.planned_steps > 8 and steps.plan_made == plan
    assert not steps.after(9).plan, "one plan per run"


def test_a_resumed_plan_stands_and_a_plan_too_small_stops():
    saved = BudgetPlan(
        30, step_s=1.0, eval_s=1.0, checkpoint_s=1.0, measured_at_step=8, budget_s=100, age_s=9
    )
    steps, _ = make("--train.time_budget_s=100", "--train.steps=100000", start_step=20, saved_plan=saved)
    assert steps.total_steps == 30 and not any(steps.after(s).plan for s in range(21, 31))
    capped, _ = make("--train.time_budget_s=100", "--train.steps=25", start_step=20, saved_plan=saved)
    assert capped.total_steps == 25

    now = [5.0]  # with no warm-up steps the first step is timed too: from the loop's start
    late, _ = make(
        "--train.time_budget_s=100",
        "--train.steps=100000",
        "--train.budget_warmup_steps=0",
        "--train.budget_measure_steps=1",
        clock=lambda: now[0],
    )
    now[0] = 5.5
    assert late.after(1).plan
    with pytest.raises(BudgetError, match=r"is too small: 99 s are gone after 1 steps.*a step takes 0.50 s"):
        late.plan(1, eval_s=1.0, checkpoint_s=1.0, age_s=99.0, is_main=True)


def test_the_training_clock_leaves_pauses_out_of_throughput(monkeypatch):
    wall = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: wall[0])
    clock = metrics.TrainingClock(torch.device("cpu"))
    throughput = metrics.Throughput(clock)
    wall[0] += 2.0  # two seconds of steps
    throughput.add(1000)
    with clock.pause():
        frozen = clock.now()
        wall[0] += 30.0  # an evaluation and a checkpoint
        assert clock.now() == frozen
    wall[0] += 2.0
    throughput.add(1000)
    assert throughput.take() == (pytest.approx(500.0), pytest.approx(4.0))


def test_a_resume_may_replan_its_budget_and_keeps_the_old_plan_until_then():
    """train.budget_on_resume=replan (the GPU session's eager rerun): the kept plan's step count holds while
    this process measures, then its own plan replaces it, noting the count it replaces."""
    saved = BudgetPlan(300, 0.1, 1.0, 1.0, measured_at_step=8, budget_s=370, age_s=40, steps_before=100000)
    now = [0.0]
    steps, _ = make(
        "--train.time_budget_s=60",
        "--train.steps=100000",
        "--train.budget_on_resume=replan",
        "--train.budget_warmup_steps=2",
        "--train.budget_measure_steps=2",
        start_step=200,
        saved_plan=saved,
        clock=lambda: now[0],
    )
    assert steps.total_steps == 300 and not steps.after(201).plan
    now[0] = 10.0
    assert not steps.after(202).plan and not steps.after(203).plan  # timed from step 202
    now[0] = 11.0
    assert steps.after(204).plan
    replanned = steps.plan(204, eval_s=1.0, checkpoint_s=1.0, age_s=20.0, is_main=True)
    assert replanned.steps_before == 300 and replanned.measured_at_step == 204
    assert steps.total_steps == replanned.planned_steps != 300 and not steps.after(205).plan
    kept, _ = make("--train.time_budget_s=60", "--train.steps=100000", start_step=200, saved_plan=saved)
    assert kept.total_steps == 300 and not any(kept.after(s).plan for s in range(201, 210))


def test_an_async_checkpoint_costs_the_plan_its_stall_and_the_end_its_last_write():
    """With checkpoint.async_save a save holds the loop for the copy only (checkpoint_s, 1 s here) while the
    write takes write_s (20 s): a save also waits for the previous write where the steps between two saves
    take less than it, and the end of the run waits for the last one. 1000 s left, 1 s steps."""
    config = load_config(
        None, ["--train.time_budget_s=1000", "--train.budget_safety=0", "--train.steps=100000"]
    )

    def planned(every: int, checkpoint_s: float, write_s: float | None = None) -> int:
        return plan_steps(config.train, every, 0, 1.0, 0.0, checkpoint_s, 0.0, write_s).planned_steps

    assert planned(50, 20.0) == planned(50, 20.0, 20.0) == 700  # synchronous: 700 steps + 14 saves of 20 s
    assert planned(50, 1.0, 20.0) == 961  # 961 steps + 20 stalls of 1 s + the last write's other 19 s
    assert planned(10, 20.0) == 330
    assert planned(10, 1.0, 20.0) == 490  # every save waits 10 s for the write before it: 490 + 49 x 10 + 19
    older = {"planned_steps": 30, "step_s": 1.0, "eval_s": 1.0, "checkpoint_s": 1.0}
    assert BudgetPlan.from_dict({**older, "measured_at_step": 8, "budget_s": 100, "age_s": 9}).write_s is None
