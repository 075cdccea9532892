"""The session's time: the two modes it runs in (GPU, CPU rehearsal) with their planned times and limits,
and Deadline, the arithmetic of what each stage may take (the option dist_llama.stages' runner asks).

Every stage but training has a planned time, and training gets the rest of the deadline: stage_times() says
how much (`python -m dist_llama.session plan [--rehearse]` prints it). Every stage also has a time range
(least worth starting, most). A stage may take what is left of the deadline less what the later stages need
to start; before training, the later stages' planned time is kept too, so that training gets what
stage_times() says it will. The bench is the exception: it runs after the evaluation, only when time is
left, and nothing is kept for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from dist_llama.stages import chain

STAGES = chain("install", "preflight", "train", "release", "evaluate", "bench", "report")
AFTER_TRAINING = ("release", "evaluate", "report")  # kept free when training's budget is set
UNRESERVED = ("bench",)  # runs on what is left; no earlier stage keeps time for it
FINISH_S = 5  # kept after every stage for the summary and the pack


@dataclass(frozen=True)
class Mode:
    """Where the session runs and how its time is shared. Seconds per stage: `planned` (every stage but train,
    which gets the rest) and `limits` (least worth starting, most)."""

    name: str
    config: str
    deadline_s: float
    require_gpu: bool
    bench_args: tuple[str, ...]
    planned: dict[str, float]
    limits: dict[str, tuple[float, float]]
    train_grace_s: float  # past its own budget, the trainer is stopped
    # A compiled training run must finish its first step within this (start-up, token cache, the
    # training graphs' compile), then plan its time budget within as long again (the evaluation graphs'
    # compile), or it is stopped and run again eager with the time left: a compile that hangs costs this
    # much, not the session.
    compile_limit_s: float
    train_overrides: tuple[str, ...] = ()  # before the user's own
    # Items of the spread MMLU file to evaluate (None: all); the config's eval.limit wins.
    mmlu_spread_limit: int | None = None
    # The training run tokenizes the shards once, with every core, into WORK/token_cache.
    token_cache: bool = True

    @property
    def after_train_s(self) -> float:
        """Planned time of release + evaluate + report, and the summary: what is kept free when
        training's budget is set."""
        return sum(self.planned[stage] for stage in AFTER_TRAINING) + FINISH_S


# One H200, a >= 100M model at 1024 tokens. Planned (not yet measured on that machine): install ~15 s (pip
# from the bundle's wheels), preflight ~25 s (imports torch, reads the config, data and tokenizer), release
# ~40 s (one consolidation, then a load, a stock-Llama comparison and generation in a fresh process), evaluate
# ~75 s (three processes: tinyMMLU, loss by position, the spread MMLU items), report ~10 s. Training gets the
# rest: 370 s of 540 (69%), its own start-up, token cache and compile included.
GPU = Mode(
    name="gpu",
    config="configs/speedrun.yaml",
    deadline_s=540,
    require_gpu=True,
    bench_args=(
        "--preset",
        "main",
        "--seq-len",
        "1024",
        "--batch",
        "16",
        "--dtype",
        "bf16",
        "--compile",
        "--repeats",
        "10",
        "--warmup",
        "3",
        "--device",
        "cuda",
    ),
    planned={"install": 15, "preflight": 25, "release": 40, "evaluate": 75, "bench": 0, "report": 10},
    limits={
        "install": (5, 120),
        "preflight": (15, 120),
        "train": (60, 0),
        "release": (20, 100),
        "evaluate": (20, 200),
        "bench": (30, 75),
        "report": (10, 45),
    },
    train_grace_s=30,
    compile_limit_s=200,
)
# This machine's CPU, the debug model: the same stages and files in under five minutes. The planned times are
# this machine's, from `launch/gpu_session.sh --rehearse` (README: One command on a GPU). The bench leaves out
# compile: on this CPU it costs ~30 s per graph and gains nothing for a tiny model (STACK_NOTES.md).
REHEARSAL = Mode(
    name="rehearse",
    config="configs/debug.yaml",
    deadline_s=290,
    require_gpu=False,
    bench_args=(
        "--preset",
        "debug",
        "--seq-len",
        "128",
        "--batch",
        "8",
        "--repeats",
        "3",
        "--warmup",
        "1",
        "--device",
        "cpu",
    ),
    # Seen 2026-12-03 (all stages ok in 218 s): install 0, preflight 8, release 10, evaluate 25,
    # report 3; planned with room for a loaded CI machine.
    planned={"install": 5, "preflight": 15, "release": 20, "evaluate": 45, "bench": 0, "report": 10},
    limits={
        "install": (0, 60),
        "preflight": (10, 90),
        "train": (50, 0),
        "release": (15, 60),
        "evaluate": (15, 100),
        "bench": (10, 40),
        "report": (5, 30),
    },
    train_grace_s=20,
    compile_limit_s=120,
    # A shared 2-core CPU's step time varies twofold with the load: plan with a quarter free.
    train_overrides=("--train.device=cpu", "--train.budget_safety=0.25"),
    # The debug model scores ~13 items/s here: 1,400 would take two minutes.
    mmlu_spread_limit=100,
    # On 2 cores the cache of the bundle's ~39M tokens takes longer than the whole training stage (seen:
    # 2 shards of 5 in 26 s), so the rehearsal tokenizes on the fly; the GPU machine's 16 cores build it
    # in seconds.
    token_cache=False,
)


def stage_times(mode: Mode, deadline_s: float | None = None) -> dict:
    """The seconds of every stage when each takes its planned time: training gets the rest. This is the JSON
    of `python -m dist_llama.session plan`, and summary.json's "stage_plan" is its "stages"."""
    deadline = mode.deadline_s if deadline_s is None else deadline_s
    stages = {stage: float(mode.planned.get(stage, 0)) for stage in STAGES}
    stages["train"] = deadline - sum(stages.values()) - FINISH_S
    return {
        "mode": mode.name,
        "deadline_s": deadline,
        "stages": stages,
        "finish_s": FINISH_S,
        "train_share": round(stages["train"] / deadline, 3),
    }


class Deadline:
    """The session's one clock, started when it is made, and every share of the time left."""

    def __init__(self, mode: Mode, seconds: float, skip: frozenset[str]):
        self.start = time.monotonic()
        self.mode = mode
        self.seconds = seconds
        self.skip = skip  # stages left out: no time is kept for them

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def least(self, stage: str) -> float:
        return self.mode.limits[stage][0]

    def too_short_to_start(self) -> float | None:
        """The seconds install and preflight need at the least, when the deadline is shorter; else None."""
        least = sum(self.least(s) for s in ("install", "preflight"))
        return least if self.seconds < least else None

    def minimum_after(self, stage: str) -> float:
        """Seconds to keep for the stages after `stage` that will run: their least worth starting."""
        later = STAGES[STAGES.index(stage) + 1 :]
        return FINISH_S + sum(self.least(s) for s in later if s not in self.skip and s not in UNRESERVED)

    def allowance(self, stage: str) -> float | None:
        """The seconds `stage` may take if it starts now; None for training, which sets its own time
        budget (training_budget)."""
        if stage == "train":
            return None
        most = self.mode.limits[stage][1]
        reserve = self.minimum_after(stage)
        if STAGES.index(stage) < STAGES.index("train") and "train" not in self.skip:
            # least(train) and the later stages' least are in minimum_after; keep their planned time instead
            reserve += self.mode.after_train_s - FINISH_S - sum(self.least(s) for s in AFTER_TRAINING)
        available = self.remaining() - reserve
        return min(most, available) if most else available

    def worth_starting(self, stage: str, allowance: float | None) -> bool:
        """Training decides for itself (training_budget); 1 s is rounding, not a plan."""
        return allowance is None or allowance + 1 >= self.least(stage)

    def training_budget(self) -> float:
        """train.time_budget_s of a training attempt started now: the time left, less the planned time
        of the later stages."""
        return self.remaining() - self.mode.after_train_s

    def training_timeout(self, budget: float) -> float:
        return budget + self.mode.train_grace_s

    def evaluation_step_allowance(self) -> float:
        """One evaluation process started now: the time left less the report's reserve."""
        return self.remaining() - self.minimum_after("evaluate")

    def evaluation_step_worth_starting(self, allowance: float) -> bool:
        return allowance >= self.least("evaluate") / 2
