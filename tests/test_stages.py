"""The one runner of the chain of stages (dist_llama.stages), which `make run` and the GPU session share: the
order, what leaves a stage out, a stage that raises, and its child processes."""

from __future__ import annotations

import io
import os
import sys
import time

import pytest

from dist_llama.stages import (
    ORDER,
    Outcome,
    ProgressMarks,
    Stage,
    StageRunner,
    chain,
    error_line,
    run_child,
    stage_list,
)


def recording(ran: list[tuple[str, float | None]], status: str = "ok"):
    """Stage bodies that note their name and allowance in `ran` and end with `status`."""

    def body(name: str):
        def run(allowance):
            ran.append((name, allowance))
            return Outcome(name, status, detail=f"did {name}")

        return run

    return body


def test_stages_run_in_the_chains_order_whatever_order_a_command_gives():
    ran, said = [], []
    body = recording(ran)
    given = ["report", "train", "evaluate", "consolidate"]
    outcomes = StageRunner([Stage(name, body(name)) for name in given], say=said.append).run()
    assert [name for name, _ in ran] == [name for name in ORDER if name in given]
    assert list(outcomes) == [name for name, _ in ran] and all(o.status == "ok" for o in outcomes.values())
    assert said[:2] == ["train: running", "train: ok (0 s) did train"]
    assert chain("report", "install", "release") == ("install", "release", "report")
    with pytest.raises(ValueError, match="'smoke' is not a stage"):
        chain("train", "smoke")


class FakeDeadline:
    """Every stage may take 100 s but the bench 3 s, which needs 30 s; training sets its own budget."""

    def allowance(self, stage):
        return None if stage == "train" else 3.0 if stage == "bench" else 100.0

    def worth_starting(self, stage, allowance):
        return allowance is None or allowance + 1 >= self.least(stage)

    def least(self, stage):
        return 30.0 if stage == "bench" else 1.0


def test_what_leaves_a_stage_out_and_what_is_said_for_it():
    ran, said = [], []
    body = recording(ran)
    current = {"release": "release is up to date", "evaluate": "results are up to date"}
    stages = [
        Stage(
            name,
            body(name) if name != "preflight" else recording(ran, "failed")(name),
            needs=("preflight",) if name == "report" else (),
            up_to_date=(lambda name=name: current.get(name)),
        )
        for name in ("install", "preflight", "train", "release", "evaluate", "bench", "report")
    ]
    runner = StageRunner(
        stages, skip={"install"}, redo={"evaluate"}, deadline=FakeDeadline(), say=said.append
    )
    outcomes = runner.run()
    assert ran == [("preflight", 100.0), ("train", None), ("evaluate", 100.0)]
    detail = {name: (o.status, o.detail) for name, o in outcomes.items()}
    assert detail == {
        "install": ("skipped", "skipped by --skip"),
        "preflight": ("failed", "did preflight"),
        "train": ("ok", "did train"),
        "release": ("skipped", "release is up to date"),
        "evaluate": ("ok", "did evaluate"),  # --redo runs it though it says it is up to date
        "bench": ("skipped", "skipped for time: 3 s allowed, 30 s needed"),
        "report": ("skipped", "preflight did not pass"),
    }
    assert runner.failed()
    assert "install" not in " ".join(said), "a stage the user skipped is not announced"
    assert "train: running" in said and "preflight: running (at most 100 s)" in said
    assert "release: release is up to date" in said and "report: preflight did not pass" in said


def test_a_stage_that_raises_is_failed_and_the_later_ones_not_reached():
    ran = []

    def broken(allowance):
        raise RuntimeError("the trainer's own words")

    stages = [Stage("train", broken), Stage("report", recording(ran)("report"))]
    runner = StageRunner(stages, say=lambda line: None)
    with pytest.raises(RuntimeError, match="the trainer's own words"):
        runner.run()
    assert ran == []
    assert runner.outcomes["train"].status == "failed"
    assert runner.outcomes["train"].detail == "the trainer's own words"
    assert (runner.outcomes["report"].status, runner.outcomes["report"].detail) == ("skipped", "not reached")


def test_stage_lists_name_the_commands_stages():
    assert stage_list("train,,report", ("train", "report")) == {"train", "report"}
    assert stage_list("", ("train",)) == set()
    with pytest.raises(ValueError, match="unknown stage 'trian'; stages are train, report"):
        stage_list("trian", ("train", "report"))


def test_a_failed_child_is_said_in_its_own_words_with_its_exit_and_log(tmp_path):
    script = (
        "import sys\n"
        "print('loading')\n"
        "print('Traceback (most recent call last):')\n"
        "print('train: error: the config names no data', file=sys.stderr)\n"
        "print('RuntimeError: launcher noise')\n"
        "sys.exit(2)"
    )
    log = tmp_path / "logs" / "train.log"
    log.parent.mkdir()
    log.write_text("an earlier run's line: train: error: old news\n")
    echo = io.StringIO()
    child = run_child(log, [sys.executable, "-c", script], env=dict(os.environ), echo=echo)
    assert not child.ok and child.returncode == 2 and child.error == "the config names no data"
    assert child.why() == "the config names no data (exit 2, log train.log)"
    assert child.why(log_as=str(log)).endswith(f"(exit 2, log {log})")
    assert "loading" in echo.getvalue() and "launcher noise" in echo.getvalue()
    text = log.read_text()
    assert text.startswith("an earlier run's line") and "$ " in text and "# exit 2 after" in text
    # Without a one-line error of ours: the last error-looking line near the end.
    assert error_line("starting\nValueError: bad shape\nexiting\n") == "ValueError: bad shape"
    assert error_line("") == "no output"


def test_a_child_past_its_time_limit_is_stopped(tmp_path):
    started = time.monotonic()
    child = run_child(tmp_path / "slow.log", [sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)
    assert child.timed_out and not child.ok and time.monotonic() - started < 20
    assert child.why().startswith("stopped at its time limit after 1 s (log slow.log)")


def test_a_child_that_misses_a_progress_mark_is_stopped_and_one_that_reaches_them_runs_on(tmp_path):
    """Marks in order, each within the limit of the one before: a child that reaches the first mark and then
    hangs is stopped at the second's limit; one that reaches both runs to its end."""
    script = (
        "import pathlib, sys, time\n"
        "folder = pathlib.Path(sys.argv[1])\n"
        "time.sleep(1); (folder / 'first').touch()\n"
        "time.sleep(1)\n"
        "if sys.argv[2] == 'both': (folder / 'second').touch()\n"
        "time.sleep(2 if sys.argv[2] == 'both' else 60)"
    )
    # 5 s per mark: the child's 1 s sleeps and its start-up, with room for a loaded machine.
    progress = ProgressMarks(("first", "second"), 5, lambda mark: (tmp_path / mark).exists())
    hung = run_child(
        tmp_path / "a.log",
        [sys.executable, "-c", script, str(tmp_path), "one"],
        30,
        dict(os.environ),
        tmp_path,
        progress,
    )
    assert not hung.ok and not hung.timed_out and hung.missed == "second" and hung.seconds < 20
    assert hung.why().startswith("stopped: no second within 5 s")
    for name in ("first", "second"):
        (tmp_path / name).unlink(missing_ok=True)
    both = run_child(
        tmp_path / "b.log",
        [sys.executable, "-c", script, str(tmp_path), "both"],
        30,
        dict(os.environ),
        tmp_path,
        progress,
    )
    assert both.ok and both.missed is None and both.seconds >= 4
    # A mark limit far off, but all marks due by all_by (the time an eager rerun needs): stopped there.
    for name in ("first", "second"):
        (tmp_path / name).unlink(missing_ok=True)
    late = ProgressMarks(progress.marks, 30, progress.reached, all_by=time.monotonic() + 1.5)
    cut = run_child(
        tmp_path / "c.log",
        [sys.executable, "-c", script, str(tmp_path), "one"],
        60,
        dict(os.environ),
        tmp_path,
        late,
    )
    assert cut.missed in ("first", "second") and not cut.timed_out and cut.seconds < 15, cut.why()
