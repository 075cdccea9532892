"""The config's declarations: each section a frozen dataclass whose keys are declared once, beside their
fields, with their default, allowed values, bounds and whether a resume may change them (`setting`), then
the rules that involve several keys of a section (`Section.check`) or several sections (`Config`).
"""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from dist_llama.model import PRESETS, ModelArgs


class ConfigError(ValueError):
    """A user mistake in a config file or override; printed without a traceback by the entry points."""


# --- Declaring a key: default, allowed values, and whether a resume may change it, in one place -----


def setting(
    default=dataclasses.MISSING,
    *,
    factory=None,
    choices: tuple = (),
    positive: bool = False,
    non_negative: bool = False,
    interval: str | None = None,
    resumable: bool = False,
):
    """One config key. choices: the values it accepts. Its bounds, checked unless the value is null:
    positive, non_negative or an interval ("(0, 1]", "[0, 1)"). resumable: a resumed run may change it (how
    fast, how often or where: not the trajectory of the weights); any other change is refused on resume
    unless named in checkpoint.allow_changes. Undeclared, a key is not resumable: the safe side."""
    metadata = {
        "choices": tuple(choices),
        "positive": positive,
        "non_negative": non_negative,
        "interval": interval,
        "resumable": resumable,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _in_interval(value: float, interval: str) -> bool:
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    return above and below


class Section:
    """A config section: `__post_init__` checks each key against its declaration (`setting`), then the
    section's own rules (`check`). NAME is the section's name in files and overrides."""

    NAME: ClassVar[str] = ""
    ALL_RESUMABLE: ClassVar[bool] = False  # every key of the section may change on resume

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            _check_declared(f"{self.NAME}.{item.name}", getattr(self, item.name), item.metadata)
        self.check()

    def check(self) -> None:
        """Rules that involve several keys of the section."""

    @classmethod
    def resumable_keys(cls) -> list[str]:
        return [
            item.name
            for item in dataclasses.fields(cls)
            if cls.ALL_RESUMABLE or item.metadata.get("resumable")
        ]


def _check_declared(key: str, value, declared) -> None:
    if declared.get("choices") and value not in declared["choices"]:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(declared['choices'])}")
    if value is None:
        return
    if declared.get("positive") and value <= 0:
        raise ConfigError(f"{key}={value} must be positive")
    if declared.get("non_negative") and value < 0:
        raise ConfigError(f"{key}={value} must not be negative")
    if declared.get("interval") and not _in_interval(value, declared["interval"]):
        raise ConfigError(f"{key}={value} must be in {declared['interval']}")


# --- The sections, and Config, which holds them -----------------------------------------------------

# The defaults are the embedded debug run (`python -m dist_llama.train` with no config): the debug model
# on the Hub dataset. configs/*.yaml set everything a real run needs.


@dataclass(frozen=True)
class DataConfig(Section):
    NAME: ClassVar[str] = "data"
    # local | hub | auto (local paths when they match files, else the Hub dataset)
    source: str = setting("auto", choices=("local", "hub", "auto"))
    paths: list[str] = setting(factory=list)  # globs of .jsonl, .jsonl.zst, .parquet, .txt files
    hub_dataset: str = setting("ashaba1in/small_openwebtext")
    hub_split: str = setting("train")
    # a commit or tag of the Hub dataset; recorded in every checkpoint
    hub_revision: str | None = setting(None)
    # Stream instead of the cached, memory-mapped download (datasets too large for the disk).
    hub_streaming: bool = setting(False)
    text_field: str = setting("text")
    val_paths: list[str] = setting(factory=list)  # held-out files; empty: a hash rule on the stream
    # With no val_paths: documents whose hash falls below this are held out.
    val_per_mille: int = setting(5, non_negative=True)
    val_docs: int = setting(64, positive=True, resumable=True)  # documents in the held-out set
    tokenizer: str = setting("auto", resumable=True)  # hub | offline | auto | a saved tokenizer folder
    seq_len: int = setting(128, positive=True)
    shuffle: bool = setting(True)
    prefetch_steps: int = setting(4, resumable=True)  # batches tokenized ahead by the background thread
    # A folder of pre-tokenized documents (python -m dist_llama.data.prepare), built on first use by each
    # node's local rank 0 when missing; null: tokenize on the fly. The batches are the same either way.
    token_cache: str | None = setting(None, resumable=True)

    def check(self) -> None:
        if self.token_cache is not None and self.hub_streaming:
            raise ConfigError(
                "data.token_cache needs random access to the documents, which data.hub_streaming=true "
                "does not give: set data.hub_streaming=false (the cached download) or "
                "data.token_cache=null"
            )
        if self.token_cache == "":
            raise ConfigError(
                "data.token_cache='' is not a folder; give a path, or null to tokenize on the fly"
            )


@dataclass(frozen=True)
class OptimConfig(Section):
    NAME: ClassVar[str] = "optim"
    lr: float = setting(3e-3, positive=True)
    min_lr_ratio: float = setting(0.1, non_negative=True)  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = setting(20, non_negative=True)
    betas: list[float] = setting(factory=lambda: [0.9, 0.95])
    eps: float = setting(1e-8)
    weight_decay: float = setting(0.1, non_negative=True)
    # max global gradient norm; 0 or null: no clipping
    grad_clip: float | None = setting(1.0, non_negative=True)
    # adamw | muon (Muon for the hidden matrices, AdamW for embeddings, head and norm gains)
    name: str = setting("adamw", choices=("adamw", "muon"))
    # cosine | wsd (warmup, stable at lr, then decay over the last decay_fraction)
    schedule: str = setting("cosine", choices=("cosine", "wsd"))
    decay_fraction: float = setting(0.3, interval="(0, 1]")  # wsd: share of the steps spent decaying
    # wsd: linear | 1 - sqrt (Hägele et al. 2024)
    decay_shape: str = setting("linear", choices=("linear", "sqrt"))
    # muon: rate of the hidden matrices (lr is the AdamW groups')
    muon_lr: float = setting(0.02, positive=True)
    muon_momentum: float = setting(0.95)
    # muon: decoupled, scaled by muon_lr (so 0.1 here is far stronger than AdamW's 0.1)
    muon_weight_decay: float = setting(0.0, non_negative=True)

    def check(self) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas={self.betas} must have two values, e.g. [0.9, 0.95]")
        if self.name == "muon" and not hasattr(torch.optim, "Muon"):
            raise ConfigError(
                f"optim.name=muon needs torch.optim.Muon (torch >= 2.9), and this torch is "
                f"{torch.__version__}; upgrade torch or use --optim.name=adamw"
            )


@dataclass(frozen=True)
class TrainConfig(Section):
    NAME: ClassVar[str] = "train"
    name: str = setting("debug", resumable=True)
    run_root: str = setting("runs", resumable=True)  # the run directory is run_root/name
    seed: int = setting(1337)
    steps: int = setting(150, positive=True, resumable=True)
    # The global batch in tokens; gradient accumulation follows from it.
    tokens_per_step: int = setting(2048, positive=True)
    # Sequences per forward pass per rank, a memory limit:
    # the largest divisor of the rank's rows up to it is used.
    micro_batch_size: int = setting(16, positive=True, resumable=True)
    eval_every: int = setting(50, positive=True, resumable=True)
    eval_batches: int = setting(2, positive=True, resumable=True)
    log_every: int = setting(10, positive=True, resumable=True)
    device: str = setting("auto", choices=("auto", "cpu", "cuda"), resumable=True)
    # A checkpoint to load the model weights from (a Position Interpolation fine-tune).
    init_from: str | None = setting(None, resumable=True)
    # With init_from: restart the data stream, or continue it (same seq_len and batch).
    init_data_stream: str = setting("restart", choices=("restart", "continue"), resumable=True)
    # Non-finite loss or grad-norm steps skipped before the run stops.
    max_bad_steps: int = setting(0, non_negative=True, resumable=True)
    # Wall-clock budget from process start; steps is then an upper bound. null: no budget.
    time_budget_s: float | None = setting(None, positive=True, resumable=True)
    # With a budget: steps left out of the step-time measurement (compile, allocator), then steps timed.
    budget_warmup_steps: int = setting(3, non_negative=True, resumable=True)
    budget_measure_steps: int = setting(5, positive=True, resumable=True)
    # With a budget: share of the remaining time kept free for step-time jitter.
    budget_safety: float = setting(0.03, interval="[0, 1)", resumable=True)
    # A resumed run with a budget keeps the plan its checkpoint holds (keep: a budget does not span sessions),
    # or measures and plans again for this process's budget (replan: the GPU session's eager rerun, whose
    # time and step speed are not the compiled run's).
    budget_on_resume: str = setting("keep", choices=("keep", "replan"), resumable=True)
    # Cross-entropy this many tokens at a time (no full fp32 logits); 0: in one piece.
    loss_chunk_tokens: int = setting(4096, non_negative=True, resumable=True)
    # Signals that stop training at the next step with a checkpoint (preemption, Slurm's --signal before
    # the time limit); the handler only sets a flag, every rank then stops at the same step.
    stop_signals: list[str] = setting(factory=lambda: ["SIGUSR1", "SIGTERM"], resumable=True)
    # Under Slurm: stop this long before the job's time limit; null: never.
    time_limit_margin_s: float | None = setting(90.0, positive=True, resumable=True)

    def check(self) -> None:
        unknown = [name for name in self.stop_signals if name not in signal.Signals.__members__]
        if unknown:
            raise ConfigError(
                f"train.stop_signals: {unknown[0]!r} is not a signal name; use names such as SIGUSR1, SIGTERM"
            )


@dataclass(frozen=True)
class CheckpointConfig(Section):
    NAME: ClassVar[str] = "checkpoint"
    ALL_RESUMABLE: ClassVar[bool] = True
    every: int = setting(50, positive=True)
    keep_last: int = setting(2, positive=True)
    resume: str = setting("auto")  # auto (the latest complete checkpoint of the run) | none | PATH
    # Also save after the run's first step, so there is a resumable point before the first cadence and
    # before the time budget's plan (the GPU session sets it for a compiled run: a compile that hangs later
    # loses no step).
    first_step: bool = setting(False)
    # Write checkpoints in the background (DCP's async save on a gloo group of its own): training waits only
    # while the model and optimizer state are copied out of its memory, not for the write. At most one save
    # is in flight; a checkpoint is complete (resumable, consolidated) only once its write has finished.
    async_save: bool = setting(False)
    # keys that may differ from the checkpoint's recipe on resume
    allow_changes: list[str] = setting(factory=list)


@dataclass(frozen=True)
class LoggingConfig(Section):
    NAME: ClassVar[str] = "logging"
    ALL_RESUMABLE: ClassVar[bool] = True
    tensorboard: bool = setting(True)
    progress: bool = setting(True)  # live progress line on rank 0
    peak_tflops: float | None = setting(None)  # null: detected from the GPU name


@dataclass(frozen=True)
class ParallelConfig(Section):
    NAME: ClassVar[str] = "parallel"
    # none | full | selective (every other block)
    activation_checkpointing: str = setting("none", choices=("none", "full", "selective"), resumable=True)
    # auto: bf16 on a GPU of compute capability >= 8.0, fp16 (with loss scaling) on an older one,
    # fp32 on a CPU
    mixed_precision: str = setting("auto", choices=("auto", "bf16", "fp16", "fp32"))
    # fp16: the dynamic loss scale's start (torch's default), and the floor below which the run stops
    # (the gradients overflow even unscaled)
    initial_loss_scale: float = setting(65536.0, positive=True, resumable=True)
    min_loss_scale: float = setting(1.0, positive=True, resumable=True)
    compile: bool = setting(False, resumable=True)
    # auto: nccl on CUDA, gloo on CPU
    backend: str = setting("auto", choices=("auto", "nccl", "gloo"), resumable=True)
    # Collectives until the first step ends (loading, compile, checkpoint reads), then after it: a rank
    # that waits longer for another stops the run.
    init_timeout_s: float = setting(600.0, positive=True, resumable=True)
    timeout_s: float = setting(300.0, positive=True, resumable=True)
    # The device mesh (replicate x shard ranks): FSDP2 shards the model over the `shard` ranks and each of
    # the `replicate` groups holds a copy (HSDP). null: worked out from the launch (parallel.mesh_shape):
    # shard within a node and replicate across nodes, plain FSDP on one node. replicate=WORLD_SIZE,
    # shard=1 is DDP-like. A resume may change it: the checkpoint reshards.
    replicate: int | None = setting(None, positive=True, resumable=True)
    shard: int | None = setting(None, positive=True, resumable=True)
    # every_micro: each micro-batch's gradients are reduce-scattered over the shard ranks as backward runs;
    # last_micro: only the last micro-batch's backward reduces (each FSDP unit keeps its whole, unsharded
    # gradient in the reduce dtype until then). The all-reduce across replicas runs once per step either way.
    reduce_grads: str = setting("every_micro", choices=("every_micro", "last_micro"), resumable=True)
    # The dtype gradients are reduced in: bf16 sends half fp32's bytes and rounds each reduction's result to
    # bf16 (HSDP's sum over the micro-batches before its all-reduce is kept in bf16 too)
    reduce_dtype: str = setting("fp32", choices=("fp32", "bf16"))
    # When a block's gathered parameters are freed after its forward (to be gathered again for its
    # backward): default: every block but the last, whose backward comes straight after the forward
    # (torchtitan's choice); always: every block; never: none (ZeRO-2-like: no all-gather in backward, the
    # whole model's 16-bit parameters held from forward to backward). The root's are never freed: its
    # backward starts at once.
    reshard_after_forward: str = setting("default", choices=("default", "always", "never"), resumable=True)


@dataclass(frozen=True)
class EvalConfig(Section):
    NAME: ClassVar[str] = "eval"
    ALL_RESUMABLE: ClassVar[bool] = True
    mmlu_data: str | None = setting(None)  # local tinyMMLU-format jsonl; null: lm-eval's tinyMMLU task (Hub)
    limit: int | None = setting(None)
    batch_size: int = setting(4)
    # tinyBenchmarks parameter file; null: the official one, if reachable
    irt_params: str | None = setting(None)
    ppl_data: str | None = setting(None)  # held-out jsonl for loss by position
    ppl_docs: int = setting(32)  # documents of at least seq_len + 1 tokens, one window from the start of each


SECTIONS = (DataConfig, OptimConfig, TrainConfig, CheckpointConfig, LoggingConfig, ParallelConfig, EvalConfig)


@dataclass(frozen=True)
class Config:
    model: ModelArgs = field(default_factory=lambda: PRESETS["debug"])
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        """The rules that span sections."""
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                "lower data.seq_len or raise model.max_seq_len "
                "(with rope_scaling for Position Interpolation)"
            )
        if self.train.tokens_per_step % self.data.seq_len:
            raise ConfigError(
                f"train.tokens_per_step={self.train.tokens_per_step} must be a multiple of "
                f"data.seq_len={self.data.seq_len} (batches are whole sequences, no padding)"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_root) / self.train.name
