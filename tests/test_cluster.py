"""Surviving a cluster on CPU (gloo): a stop signal, a dead worker under torchrun --max-restarts, a hung
rank, and slurm/train.sbatch on a real two-node Slurm (slurm/local_cluster.sh) preempted and requeued.

Every interrupted run must end bitwise equal to the uninterrupted run on its mesh: the losses of every step
and the final checkpoint's weights. The torchrun runs are FSDP over 2 ranks; the Slurm job runs 2 ranks on
each of its 2 nodes, HSDP 2x2, and is compared with the same mesh under two torchrun agents.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import train_on_two_nodes

from dist_llama.checkpoint import complete_checkpoints, load_full_model_state
from dist_llama.config import ConfigError, load_config
from dist_llama.parallel import set_nccl_environment
from dist_llama.report import read_metrics
from dist_llama.stopping import STOPPED_FILE, parse_slurm_duration

REPO = Path(__file__).resolve().parents[1]
STEPS, CHECKPOINT_EVERY = 30, 5
HSDP_MESH = "mesh: HSDP, 2 replicas x 2 shard ranks (auto: 2 nodes of 2 ranks)"


def tiny_overrides(corpus: Path, val: Path, run_root: Path, name: str) -> list[str]:
    return [
        f"--data.paths=[{corpus}]",
        f"--data.val_paths=[{val}]",
        "--data.tokenizer=offline",
        "--data.seq_len=32",
        "--data.val_docs=8",
        f"--train.run_root={run_root}",
        f"--train.name={name}",
        f"--train.steps={STEPS}",
        "--train.tokens_per_step=256",
        "--train.micro_batch_size=2",
        "--train.log_every=1",
        "--train.eval_every=10",
        "--train.eval_batches=1",
        f"--checkpoint.every={CHECKPOINT_EVERY}",
        "--checkpoint.keep_last=2",
        "--parallel.mixed_precision=fp32",
    ]  # logging as by default (the progress line, TensorBoard): a stop must not crash what users see


def environment(**extra: str) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        **extra,
    }


def torchrun(args: list[str], max_restarts: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={max_restarts}",
        "-m",
        "dist_llama.train",
        "--config",
        str(REPO / "configs/debug.yaml"),
        *args,
    ]


def start(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=environment(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stopped_by(reason: str, signal_name: str) -> bool:
    """A stop record's reason for a signal that Slurm sends to every node of a 2-node job. The ranks agree on
    the signal at the step boundary (stopping.StopRequest.reason), so rank 0's record names it even when the
    signal reached another rank first (each node's slurmd delivers it; they are milliseconds apart)."""
    return reason == f"signal {signal_name}"


def train_losses(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_metrics(run_dir)[0]}


def steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [
        json.loads(line).get("step", 0) for line in path.read_text().splitlines() if '"kind": "train"' in line
    ]
    return max(steps, default=0)


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert process is None or process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.05)


def workers(agent: subprocess.Popen) -> dict[int, psutil.Process]:
    """The agent's live training processes by rank (read from their environment)."""
    found = {}
    for child in psutil.Process(agent.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
            if (
                rank is not None
                and "dist_llama.train" in " ".join(child.cmdline())
                and child.status() != "zombie"
            ):
                found[int(rank)] = child
        except psutil.NoSuchProcess:
            continue
    return found


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state, meta = load_full_model_state(complete_checkpoints(run_dir / "checkpoints")[-1])
    assert meta.step == STEPS
    return state


def assert_bitwise_equal_runs(run_dir: Path, reference: Path) -> None:
    got, expected = train_losses(run_dir), train_losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected, [
        (step, got[step], expected[step]) for step in expected if got[step] != expected[step]
    ]
    got_weights, expected_weights = final_weights(run_dir), final_weights(reference)
    assert got_weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        assert torch.equal(got_weights[name], tensor), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> Path:
    """The uninterrupted 2-rank run that every interrupted one must equal."""
    root = tmp_path_factory.mktemp("reference")
    result = subprocess.run(
        torchrun(tiny_overrides(*corpus, root, "reference")),
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return root / "reference"


@pytest.fixture(scope="module")
def hsdp_reference(tmp_path_factory, corpus) -> Path:
    """The uninterrupted run on 2 "nodes" of 2 ranks (two torchrun agents on this machine): the HSDP 2x2
    mesh of the 2-node Slurm job, whose gradients are summed in another order than the 2-rank run's."""
    root = tmp_path_factory.mktemp("hsdp_reference")
    output = train_on_two_nodes(
        tiny_overrides(*corpus, root, "reference"), 2, environment(), "dist_llama_cluster_hsdp"
    )
    assert HSDP_MESH in output, output[-3000:]
    return root / "reference"


def test_a_signal_to_one_rank_stops_every_rank_at_one_checkpoint_and_the_run_resumes_exactly(
    reference, corpus, tmp_path
):
    args = tiny_overrides(*corpus, tmp_path, "signalled")
    run_dir = tmp_path / "signalled"
    agent = start(torchrun(args), tmp_path / "first.log")
    wait_for(lambda: steps_done(run_dir) >= 3, 300, "step 3", agent)
    workers(agent)[1].send_signal(signal.SIGUSR1)  # rank 1 alone: rank 0 must learn of it
    assert agent.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()[-3000:]
    log = (tmp_path / "first.log").read_text()
    stopped = json.loads((run_dir / STOPPED_FILE).read_text())
    assert stopped["reason"] == "signal SIGUSR1" and stopped["step"] < STEPS  # named, though rank 1 got it
    assert f"stopping at step {stopped['step']} of {STEPS}" in log
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")][
        -1
    ] == f"step_{stopped['step']:08d}"
    assert steps_done(run_dir) == stopped["step"], "no step may run after the stop"

    result = subprocess.run(
        torchrun(args), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stop_checkpoint = run_dir / "checkpoints" / f"step_{stopped['step']:08d}"
    assert f"resumed from {stop_checkpoint}" in result.stderr
    assert not (run_dir / STOPPED_FILE).exists(), "a finished run leaves no stop record"
    assert_bitwise_equal_runs(run_dir, reference)


def test_five_dead_workers_in_a_row_restart_and_resume_exactly(reference, corpus, tmp_path):
    """torchrun --max-restarts: each SIGKILL of a worker restarts both, which resume from the newest
    complete checkpoint. Five kills of one run, at five different checkpoints, alternating ranks. Each kill
    waits for the restarted workers to have resumed: a kill that lagged a checkpoint behind would otherwise
    find the next kill's condition already met and kill the new workers before they say so."""
    kills = 5
    run_dir = tmp_path / "killed"
    log = tmp_path / "killed.log"
    agent = start(torchrun(tiny_overrides(*corpus, tmp_path, "killed"), max_restarts=kills), log)
    for kill in range(kills):
        checkpoint_step = (kill + 1) * CHECKPOINT_EVERY
        wait_for(
            lambda: (
                log.read_text().count("resumed from") == kill
                and steps_done(run_dir) > checkpoint_step
                and (run_dir / "checkpoints" / f"step_{checkpoint_step:08d}" / "meta.json").is_file()
            ),
            300,
            f"a step after checkpoint {checkpoint_step}",
            agent,
        )
        victim = wait_for(lambda: workers(agent).get(kill % 2), 60, f"rank {kill % 2}", agent)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    assert agent.wait(timeout=600) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert text.count("resumed from") == kills, text[-4000:]
    assert_bitwise_equal_runs(run_dir, reference)


def test_a_hung_rank_stops_the_others_within_the_timeout_naming_it(corpus, tmp_path):
    timeout_s = 4
    run_dir = tmp_path / "hung"
    log = tmp_path / "hung.log"
    agent = start(
        torchrun(tiny_overrides(*corpus, tmp_path, "hung") + [f"--parallel.timeout_s={timeout_s}"]), log
    )
    wait_for(lambda: steps_done(run_dir) >= 3, 300, "step 3", agent)
    hung = workers(agent)[1]
    hung.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        workers(agent)[0].wait(timeout=timeout_s + 60)
        waited = time.monotonic() - stopped_at
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):  # what torchrun does 30 s after its SIGTERM
            hung.send_signal(signal.SIGKILL)
    assert agent.wait(timeout=120) != 0
    text = log.read_text()
    assert waited < timeout_s + 30, f"rank 0 waited {waited:.0f} s"
    lines = [line for line in text.splitlines() if line.startswith("train: error:")]
    assert len(lines) == 1 and re.search(
        rf"step \d+: a collective waited more than parallel.timeout_s={timeout_s} s", lines[0]
    ), text[-3000:]
    assert "--parallel.timeout_s" in lines[0]


def test_nccl_gets_async_error_handling_and_the_flight_recorder_unless_set(monkeypatch, tmp_path):
    for name in (
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "TORCH_NCCL_TRACE_BUFFER_SIZE",
        "TORCH_NCCL_DUMP_ON_TIMEOUT",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "50")  # the user's own setting stays
    set_nccl_environment(str(tmp_path))
    assert (
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        and os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    )
    assert os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "50"
    assert os.environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == f"{tmp_path}/nccl_trace_rank_"


@pytest.mark.parametrize(
    "override, message",
    [
        ("--train.stop_signals=[SIGUSR9]", "train.stop_signals: 'SIGUSR9' is not a signal name"),
        ("--parallel.timeout_s=0", "parallel.timeout_s=0.0 must be positive"),
        ("--train.time_limit_margin_s=-5", "train.time_limit_margin_s=-5.0 must be positive"),
    ],
)
def test_stop_and_timeout_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(REPO / "configs/debug.yaml", [override])


def test_slurm_durations_parse():
    assert parse_slurm_duration("1-02:03:04") == ((26 * 60) + 3) * 60 + 4
    assert parse_slurm_duration("02:03:04") == 7384
    assert parse_slurm_duration("0:58") == 58
    assert parse_slurm_duration("UNLIMITED") is None and parse_slurm_duration("NOT_SET") is None


# --- A real Slurm cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Two Slurm nodes on this machine; skipped (with the reason) where they cannot start, never in CI."""
    folder = tmp_path_factory.mktemp("slurm")
    script = REPO / "slurm/local_cluster.sh"
    result = subprocess.run([str(script), "up", str(folder)], capture_output=True, text=True, timeout=120)
    if result.returncode == 3 and not os.environ.get("CI"):
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        yield {"SLURM_CONF": str(folder / "slurm.conf")}
    finally:
        subprocess.run([str(script), "down", str(folder)], capture_output=True, timeout=120)


def slurm_run(command: list[str], slurm_env: dict) -> str:
    return subprocess.run(
        command, env=environment(**slurm_env), capture_output=True, text=True, check=True, timeout=60
    ).stdout


def job_fields(job: str, slurm_env: dict) -> dict[str, str]:
    text = slurm_run(["scontrol", "show", "job", "-o", job], slurm_env)
    return dict(re.findall(r"(\w+)=(\S*)", text))


def submit(slurm_env: dict, output: Path, args: list[str], *sbatch_options: str, nodes: int = 2) -> str:
    command = [
        "sbatch",
        "--parsable",
        f"--nodes={nodes}",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--output={output}",
        *sbatch_options,
        str(REPO / "slurm/train.sbatch"),
        str(REPO / "configs/debug.yaml"),
        *args,
    ]
    return slurm_run(command, slurm_env).strip().split(";")[0]


def wait_for_state(job: str, slurm_env: dict, states: set[str], timeout: float) -> dict[str, str]:
    return wait_for(
        lambda: (fields := job_fields(job, slurm_env))["JobState"] in states and fields,
        timeout,
        f"job {job} in {states}",
    )


def release(job: str, slurm_env: dict) -> None:
    """A requeued job waits ~120 s for its begin time; let it start sooner. Not at once: slurmd refuses a
    job credential created in the same second as the old one's revocation ("Job credential revoked")."""
    wait_for_state(job, slurm_env, {"PENDING"}, 120)
    time.sleep(3)
    slurm_run(["scontrol", "update", f"JobId={job}", "StartTime=now"], slurm_env)


def test_a_preempted_hsdp_slurm_job_requeues_resumes_and_ends_like_torchrun(
    slurm, hsdp_reference, corpus, tmp_path
):
    """Two preemptions of one job of 2 nodes x 2 ranks (HSDP 2x2: replicas across the nodes, shards within
    each): the time-limit signal (scancel --signal=USR1: the trainer stops and the job requeues itself) and
    Slurm's own requeue (scontrol requeue: SIGTERM, Slurm requeues). Every start must build the same mesh,
    and the job must end bitwise equal to the uninterrupted run on it. The nodes have no GPUs, so
    DIST_LLAMA_PROCS_PER_NODE asks for 2 ranks each, in the job's environment, which a requeue keeps (they
    share the node's one Slurm CPU: nothing is bound here). ~100 s on 2 cores (three starts of 4 ranks)."""
    run_dir = tmp_path / "preempted"
    output = tmp_path / "job.out"
    job = submit(
        {**slurm, "DIST_LLAMA_PROCS_PER_NODE": "2"}, output, tiny_overrides(*corpus, tmp_path, "preempted")
    )

    wait_for(lambda: steps_done(run_dir) >= 4, 300, "step 4 of the first start")
    slurm_run(["scancel", "--signal=USR1", job], slurm)
    release(job, slurm)
    first_stop = json.loads(output.read_text().split("stopped early (")[1].split(")")[0])
    assert stopped_by(first_stop["reason"], "SIGUSR1"), first_stop

    wait_for(lambda: steps_done(run_dir) >= first_stop["step"] + 4, 300, "4 steps after the first resume")
    slurm_run(["scontrol", "requeue", job], slurm)
    release(job, slurm)

    fields = wait_for_state(job, slurm, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600)
    text = output.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "2", (fields, text[-4000:])
    assert "requeue 1 of at most 20" in text and "requeued 2 time(s) so far" in text
    stops = [
        r
        for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "stop"
    ]
    assert len(stops) == 2, stops
    assert stopped_by(stops[0]["reason"], "SIGUSR1") and stopped_by(stops[1]["reason"], "SIGTERM"), stops
    assert text.count("resumed from") == 2
    assert text.count(HSDP_MESH) == 3, text[-4000:]  # rank 0 logs it once per start
    assert_bitwise_equal_runs(run_dir, hsdp_reference)


def test_slurm_time_limit_stops_with_a_checkpoint_and_the_requeue_bound_holds(slurm, corpus, tmp_path):
    """The trainer's own time-limit stop, alone: --time=2 with a 100 s margin stops it ~20 s after the job
    starts (or after its first step, if later), 100 s before Slurm's end; DIST_LLAMA_MAX_REQUEUES=0 then
    refuses the requeue, and says so.

    --signal=USR1@0 (the command line overrides train.sbatch's --signal=USR1@120) turns Slurm's warning
    signal off: slurmctld sends it only for a sig_time above 0. No other sig_time could stay out of the way:
    slurmctld checks time limits every 30 s and sends --signal=USR1@N at its first check at or after
    end - N - 30 s (sbatch(1): "up to 60 seconds earlier than specified"), so even @1 with --time=1 can come
    29 s after the start, before a slowly starting trainer has taken its first step, and @120 comes at the
    first check. Seen: 'signal SIGUSR1' instead of 'time limit' (issue 31). ~30 s (a 2-node job)."""
    run_dir = tmp_path / "limited"
    output = tmp_path / "job.out"
    args = tiny_overrides(*corpus, tmp_path, "limited") + [
        "--train.steps=100000",
        "--train.time_limit_margin_s=100",
    ]
    job = submit({**slurm, "DIST_LLAMA_MAX_REQUEUES": "0"}, output, args, "--time=2", "--signal=USR1@0")
    fields = wait_for_state(job, slurm, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 240)
    text = output.read_text()
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0", (fields, text[-3000:])
    stopped = json.loads((run_dir / STOPPED_FILE).read_text())
    assert stopped["reason"] == "time limit", (stopped, text[-3000:])
    assert complete_checkpoints(run_dir / "checkpoints")[-1].name == f"step_{stopped['step']:08d}"
    assert f"step {stopped['step']}/100000 | stopping early: time limit" in text  # the default progress line
    assert "not requeued: 0 requeues reached DIST_LLAMA_MAX_REQUEUES=0" in text


def test_slurms_time_limit_signal_stops_with_a_checkpoint_before_the_limit(slurm, corpus, tmp_path):
    """Slurm's own warning signal, train.sbatch's --signal=USR1@120, with the trainer's time-limit stop off
    (train.time_limit_margin_s=null), so the signal is the only way to stop before the limit.

    The timing, explicit: submitted with --time=10, the signal cannot come in the first 450 s
    (10 min - 120 s - 30 s). Once training runs (step 3), the time limit is cut so that the job ends about 60
    to 120 s from now: slurmctld checks time limits every 30 s, sends USR1 at its first check at or after
    end - 150 s, which is the next one (within 30 s), and ends the job at its first check at or after the end,
    at least one check (30 s) later. The trainer stops within a step and a checkpoint of the signal, and
    DIST_LLAMA_MAX_REQUEUES=0 refuses the requeue. One node, one rank: rank 0 itself receives the signal.
    ~40 s (start-up to step 3, then up to 30 s for the check)."""
    run_dir = tmp_path / "signalled"
    output = tmp_path / "job.out"
    args = tiny_overrides(*corpus, tmp_path, "signalled") + [
        "--train.steps=100000",
        "--train.time_limit_margin_s=null",
    ]
    job = submit({**slurm, "DIST_LLAMA_MAX_REQUEUES": "0"}, output, args, "--time=10", nodes=1)
    wait_for(lambda: steps_done(run_dir) >= 3, 300, "step 3")
    ran_s = parse_slurm_duration(job_fields(job, slurm)["RunTime"])
    slurm_run(["scontrol", "update", f"JobId={job}", f"TimeLimit={int(ran_s // 60) + 2}"], slurm)
    fields = wait_for_state(job, slurm, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 200)
    text = output.read_text()
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0", (fields, text[-3000:])
    stopped = json.loads((run_dir / STOPPED_FILE).read_text())
    assert stopped["reason"] == "signal SIGUSR1", (stopped, text[-3000:])
    assert complete_checkpoints(run_dir / "checkpoints")[-1].name == f"step_{stopped['step']:08d}"
    assert f"step {stopped['step']}/100000 | stopping early: signal SIGUSR1" in text
    assert "not requeued: 0 requeues reached DIST_LLAMA_MAX_REQUEUES=0" in text


def test_a_failing_slurm_job_is_not_requeued(slurm, corpus, tmp_path):
    output = tmp_path / "job.out"
    args = tiny_overrides(*corpus, tmp_path, "broken") + [
        f"--data.paths=[{tmp_path / 'missing.jsonl'}]",
        "--data.source=local",
    ]
    job = submit({**slurm, "DIST_LLAMA_MAX_RESTARTS": "0"}, output, args)  # torchrun would retry it in vain
    fields = wait_for_state(job, slurm, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 240)
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0", (fields, output.read_text()[-3000:])
    assert "requeueing" not in output.read_text()
