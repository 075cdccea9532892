"""checkpoint.async_save in the trainer, on CPU (gloo): a SIGKILL while a write is in flight, the resume, and
checkpoints that are the synchronous save's; the time budget's plan.

tests/slow_checkpoint_writer.py slows DCP's file writer down for the runs that need a write in flight at a
known moment; the trainer itself is unchanged. Three 2-rank launches and two 1-rank launches (the budget run
waits for two 3 s writes, the stopped run for one of 8 s): 55 s on the 2-core machine at a load average of
~2 (85 s at ~6) before the stopped run was added, which took 18 s more.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from test_train import REPO, STEPS, command, environment, run, tiny_overrides, train_losses

from dist_llama.checkpoint import verify_checkpoint
from dist_llama.checkpoint_folders import checkpoint_name
from dist_llama.stopping import STOPPED_FILE

EVERY = 4  # checkpoints at steps 4, 8 and 12 of the 12
SLOW_WRITER = str(REPO / "tests" / "slow_checkpoint_writer.py")


def args_for(corpus, root: Path, name: str, *extra: str) -> list[str]:
    return tiny_overrides(*corpus, root, name) + [f"--checkpoint.every={EVERY}", *extra]


def slow_command(nproc: int, args: list[str]) -> list[str]:
    """The trainer with the slowed writer as the program."""
    return command(nproc, args, (SLOW_WRITER,))


def slowed(steps: str, seconds: float) -> dict:
    """The environment in which the slowed writer holds the writes of `steps` (or `all`) for `seconds`."""
    return {**environment(), "SLOW_CHECKPOINT_STEPS": steps, "SLOW_CHECKPOINT_S": str(seconds)}


def wait_while_running(process: subprocess.Popen, reached, what: str) -> None:
    """Poll until `reached()`; the run must not end before, nor take more than 300 s."""
    deadline = time.monotonic() + 300
    while not reached():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"{what} did not come within 300 s"
        time.sleep(0.05)


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / checkpoint_name(step)


def being_written(run_dir: Path, step: int) -> Path:
    """The folder a checkpoint is written into until its rename."""
    return checkpoint(run_dir, step).with_name(checkpoint_name(step) + ".tmp")


def folders(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.startswith('{"kind": "train"') and line.endswith("}"):  # a line being written is left out
            steps.append(json.loads(line)["step"])
    return max(steps)


@pytest.fixture(scope="module")
def synchronous(tmp_path_factory, corpus) -> Path:
    """The reference: 2 ranks, every checkpoint written before the loop goes on."""
    root = tmp_path_factory.mktemp("synchronous")
    run(2, args_for(corpus, root, "sync"))
    return root / "sync"


@pytest.fixture(scope="module")
def killed(tmp_path_factory, corpus) -> SimpleNamespace:
    """A 2-rank async run whose step-8 write is held (its shards written, then 600 s before the rest) while
    the loop goes on to step 12, whose save waits for it: SIGKILLed there, then resumed by the same command
    (unslowed). Returns what the kill left and the resumed run."""
    root = tmp_path_factory.mktemp("killed")
    args, run_dir = args_for(corpus, root, "killed", "--checkpoint.async_save=true"), root / "killed"
    held = being_written(run_dir, 8)
    process = subprocess.Popen(
        slow_command(2, args),
        cwd=REPO,
        env=slowed("8", 600),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_while_running(
            process,
            lambda: steps_logged(run_dir) >= STEPS and len(list(held.glob("*.distcp"))) >= 2,
            "the last step with step 8's write held",
        )
    finally:  # torchrun starts each worker in a session of its own: they are killed one by one
        trainers = []
        with contextlib.suppress(psutil.NoSuchProcess):  # an agent that ended has no workers left
            trainers = psutil.Process(process.pid).children(recursive=True)
        for trainer in trainers:
            with contextlib.suppress(psutil.NoSuchProcess):
                trainer.kill()
        psutil.wait_procs(trainers, timeout=30)
        process.kill()
        process.wait()
    at_kill = SimpleNamespace(folders=folders(run_dir), losses=train_losses(run_dir), held=held)
    return SimpleNamespace(run_dir=run_dir, at_kill=at_kill, resumed=run(2, args))


def test_sigkill_during_an_async_write_resumes_bitwise_from_the_checkpoint_before_it(synchronous, killed):
    """The loop ran on to step 12 while step 8 was written, with the synchronous run's losses; the kill
    left only step_00000008.tmp for it (shards, no meta.json); resume=auto takes step 4 and the run ends
    bitwise as the uninterrupted one, its checkpoints complete."""
    expected = train_losses(synchronous)
    assert killed.at_kill.losses == expected
    assert killed.at_kill.folders == [checkpoint_name(4), checkpoint_name(8) + ".tmp"]
    assert not (killed.at_kill.held / "meta.json").exists()
    assert f"resumed from {checkpoint(killed.run_dir, 4)} at step 4" in killed.resumed.stderr
    assert train_losses(killed.run_dir) == expected
    assert folders(killed.run_dir) == [checkpoint_name(step) for step in (4, 8, 12)]


def test_async_checkpoints_hold_what_synchronous_ones_do(synchronous, killed):
    """Step 4 was written in the background by the killed run, 8 and 12 by the resumed one: each verifies,
    and holds the synchronous checkpoint's shards byte for byte, data lanes, torch RNG and loss."""
    for step in (4, 8, 12):
        written = verify_checkpoint(checkpoint(killed.run_dir, step))
        expected = json.loads((checkpoint(synchronous, step) / "meta.json").read_text())
        assert written.data_lanes == expected["data_lanes"] and written.final_loss == expected["final_loss"]
        # Python's and numpy's generators are not seeded by the trainer; torch's is, and it is the same
        assert [r["torch"] for r in written.rng] == [r["torch"] for r in expected["rng"]]
        shards = sorted(name for name in written.files if name.endswith(".distcp"))
        assert len(shards) == 2
        assert {name: written.files[name] for name in shards} == {
            name: expected["files"][name] for name in shards
        }, f"step {step}: the shards' bytes differ from the synchronous save's"


def test_the_time_budget_plans_with_the_loops_stall_and_waits_for_the_last_write(corpus, tmp_path):
    """Every write takes 3 s more than it would (slowed writer): the plan's checkpoint_s is the loop's
    stall (the copy: a fraction of a second for the debug model), write_s the whole write, and the run ends
    with its last checkpoint complete."""
    delay = 3.0
    args = tiny_overrides(*corpus, tmp_path, "budget") + [
        "--checkpoint.async_save=true",
        "--checkpoint.every=100",  # only the plan's checkpoint and the last one
        "--train.time_budget_s=600",  # far more than 12 steps need: the plan keeps train.steps
    ]
    result = subprocess.run(
        slow_command(1, args), cwd=REPO, env=slowed("all", delay), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()]
    (plan,) = [r for r in records if r["kind"] == "plan"]
    assert plan["measured_at_step"] == 8 and plan["planned_steps"] == STEPS
    assert plan["checkpoint_s"] < delay / 3 < delay <= plan["write_s"], plan
    assert verify_checkpoint(checkpoint(tmp_path / "budget", STEPS)).budget_plan["write_s"] == plan["write_s"]
    assert "checkpoint step_00000012 written: the loop waited" in result.stderr


def test_a_stop_signal_during_an_async_write_waits_for_it_and_saves_the_stop_s_checkpoint(corpus, tmp_path):
    """SIGUSR1 while step 4's write is held for 8 s: the run stops after the step in flight, waits for step
    4's write, writes the stop's checkpoint, and exits 0 with every checkpoint complete and no .tmp folder
    left (~18 s)."""
    args, run_dir = (
        args_for(corpus, tmp_path, "stopped", "--checkpoint.async_save=true"),
        tmp_path / "stopped",
    )
    held = being_written(run_dir, 4)
    process = subprocess.Popen(
        slow_command(1, args),
        cwd=REPO,
        env=slowed("4", 8),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_while_running(
        process,
        lambda: steps_logged(run_dir) >= 5 and bool(list(held.glob("*.distcp"))),
        "step 5 with step 4's write held",
    )
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    stop = json.loads((run_dir / STOPPED_FILE).read_text())
    assert "SIGUSR1" in stop["reason"] and 5 <= stop["step"] < STEPS, stop
    # Which step stops depends on how soon this poll sends the signal (a slow one: only after step 8's
    # save); whichever it is, every write was waited for and renamed.
    names = folders(run_dir)
    assert not [name for name in names if name.endswith(".tmp")], names
    assert names[-1] == checkpoint_name(stop["step"]), names
    for name in names:
        verify_checkpoint(run_dir / "checkpoints" / name)
