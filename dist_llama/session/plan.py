"""The stages, the two modes the session runs in, and the deadline arithmetic: what each stage may take.

Every stage has a time range (least worth starting, most). A stage may take what is left of the deadline
less what the later stages need to start; before training, the later stages' planned time is kept too,
so that training gets what the plan says it will. All of that is computed here, by Deadline.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from dist_llama.session import REPO

STAGES = ("install", "preflight", "bench", "train", "release", "evaluate", "report")
FINISH_S = 5  # kept after every stage for the summary and the pack


@dataclass(frozen=True)
class Mode:
    """Where the session runs and how its time is shared. Seconds per stage: (least worth starting, most)."""

    name: str
    config: str
    deadline_s: float
    require_gpu: bool
    install_wheels: bool
    bench_args: tuple[str, ...]
    limits: dict[str, tuple[float, float]]
    after_train_s: float  # planned time of release + evaluate + report, kept free when training is planned
    train_grace_s: float  # past its own budget, the trainer is stopped
    train_overrides: tuple[str, ...] = ()  # before the user's own
    mmlu_spread_limit: int | None = None  # items of the spread MMLU file to evaluate (None: all); eval.limit wins
    token_cache: bool = True  # tokenize the training shards once, in the preflight's smoke, into WORK/token_cache


# One H200, a >= 100M model at 1024 tokens. Planned: install ~15 s, preflight ~60 s (a cold compile in the
# smoke warms TORCHINDUCTOR_CACHE_DIR for training), bench ~50 s, release ~45 s (two consolidations, load,
# generation), evaluate ~80 s (three processes), report and pack ~15 s.
GPU = Mode(name="gpu", config="configs/speedrun.yaml", deadline_s=540, require_gpu=True, install_wheels=True,
           bench_args=("--preset", "main", "--seq-len", "1024", "--batch", "16", "--dtype", "bf16", "--compile",
                       "--repeats", "10", "--warmup", "3", "--device", "cuda"),
           limits={"install": (5, 120), "preflight": (30, 200), "bench": (20, 75), "train": (60, 0),
                   "release": (20, 100), "evaluate": (20, 200), "report": (5, 45)},
           after_train_s=160, train_grace_s=30)
# This machine's CPU, the debug model: the same stages and files in under five minutes. The bench leaves
# out compile: on this CPU it costs ~30 s per graph and gains nothing for a tiny model (STACK_NOTES.md).
REHEARSAL = Mode(name="rehearse", config="configs/debug.yaml", deadline_s=290, require_gpu=False, install_wheels=False,
                 bench_args=("--preset", "debug", "--seq-len", "128", "--batch", "8", "--repeats", "3", "--warmup", "1",
                             "--device", "cpu"),
                 limits={"install": (0, 10), "preflight": (15, 90), "bench": (10, 40), "train": (50, 0),
                         "release": (15, 60), "evaluate": (15, 100), "report": (5, 30)},
                 after_train_s=150, train_grace_s=20,
                 # A shared 2-core CPU's step time varies twofold with the load: plan with a quarter kept free.
                 train_overrides=("--train.device=cpu", "--train.budget_safety=0.25"),
                 mmlu_spread_limit=100,  # the debug model scores ~13 items/s here: 1,400 would take two minutes
                 # On 2 cores the cache of the bundle's ~39M tokens takes longer than the 75 s preflight (seen:
                 # 2 shards of 5 in 26 s); the GPU machine's 16 cores build it in seconds. Tokenize on the fly here.
                 token_cache=False)


@dataclass
class Outcome:
    stage: str
    status: str = "skipped"  # ok | failed | skipped
    seconds: float = 0.0
    detail: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_config_path(config: str) -> str:
    """A config path as given when it exists from here, else relative to the checkout (configs/...)."""
    return str(Path(config).resolve()) if Path(config).is_file() else str(REPO / config)


class Deadline:
    """The session's one clock, started when it is made, and every share of the time left."""

    def __init__(self, mode: Mode, seconds: float, skip: set[str]):
        self.start = time.monotonic()
        self.mode = mode
        self.seconds = seconds
        self.skip = skip

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
        later = STAGES[STAGES.index(stage) + 1:]
        return FINISH_S + sum(self.least(s) for s in later if s not in self.skip)

    def allowance(self, stage: str) -> float:
        most = self.mode.limits[stage][1]
        reserve = self.minimum_after(stage)
        if STAGES.index(stage) < STAGES.index("train") and "train" not in self.skip:
            reserve += self.mode.after_train_s - sum(self.least(s) for s in ("release", "evaluate", "report"))
        available = self.remaining() - reserve
        return min(most, available) if most else available

    def worth_starting(self, stage: str, allowance: float) -> bool:
        """Training decides for itself (training_budget); 1 s is rounding, not a plan."""
        return stage == "train" or allowance + 1 >= self.least(stage)

    def training_budget(self) -> float:
        """train.time_budget_s of a training attempt started now: the time left less the later stages' plan."""
        return self.remaining() - self.mode.after_train_s

    def training_timeout(self, budget: float) -> float:
        return budget + self.mode.train_grace_s

    def evaluation_step_allowance(self) -> float:
        """One evaluation process started now: the time left less the report's reserve."""
        return self.remaining() - self.minimum_after("evaluate")

    def evaluation_step_worth_starting(self, allowance: float) -> bool:
        return allowance >= self.least("evaluate") / 2
