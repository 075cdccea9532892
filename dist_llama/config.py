"""The one configuration path: nested frozen dataclasses, loaded from YAML, overridden by --section.key=value.

Unknown sections or keys, wrong types and invalid combinations raise ConfigError, whose message names
the key, the value and what is allowed. `python -m dist_llama.config --config FILE [overrides]` prints
the resolved config.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from dist_llama.cli import CommandParser, user_errors
from dist_llama.model import PRESETS, ModelArgs, RopeScaling


class ConfigError(ValueError):
    """A user mistake in a config file or override; printed without a traceback by the entry points."""


# The defaults are the embedded debug run (`python -m dist_llama.train` with no config): the debug model
# on the Hub dataset. configs/*.yaml set everything a real run needs.


@dataclass(frozen=True)
class DataConfig:
    source: str = "auto"  # local | hub | auto (local paths when they match files, else the Hub dataset)
    paths: list[str] = field(default_factory=list)  # globs of .jsonl, .jsonl.zst, .parquet, .txt files
    hub_dataset: str = "ashaba1in/small_openwebtext"
    hub_split: str = "train"
    hub_revision: str | None = None  # a commit or tag of the Hub dataset; recorded in every checkpoint
    hub_streaming: bool = False  # stream instead of the cached, memory-mapped download (datasets too large for disk)
    text_field: str = "text"
    val_paths: list[str] = field(default_factory=list)  # held-out files; empty: a hash rule on the stream
    val_per_mille: int = 5  # with no val_paths: documents whose hash falls below this are held out
    val_docs: int = 64  # documents in the held-out set
    tokenizer: str = "auto"  # hub | offline | auto | a saved tokenizer folder
    seq_len: int = 128
    shuffle: bool = True
    prefetch_steps: int = 4  # batches tokenized ahead by the background thread
    # A folder of pre-tokenized documents (python -m dist_llama.data.prepare), built on first use by each node's
    # local rank 0 when missing; null: tokenize on the fly. The batches are the same either way.
    token_cache: str | None = None


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0  # max global gradient norm; 0 or null: no clipping
    name: str = "adamw"  # adamw | muon (Muon for the hidden matrices, AdamW for embeddings, head and norm gains)
    schedule: str = "cosine"  # cosine | wsd (warmup, stable at lr, then decay over the last decay_fraction)
    decay_fraction: float = 0.3  # wsd: share of the steps spent decaying to lr * min_lr_ratio
    decay_shape: str = "linear"  # wsd: linear | sqrt (1 - sqrt, Hägele et al. 2024)
    muon_lr: float = 0.02  # muon: learning rate of the hidden matrices (lr is then the AdamW groups')
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0  # muon: decoupled, scaled by muon_lr (so 0.1 here is far stronger than AdamW's 0.1)


@dataclass(frozen=True)
class TrainConfig:
    name: str = "debug"
    run_root: str = "runs"  # the run directory is run_root/name
    seed: int = 1337
    steps: int = 150
    tokens_per_step: int = 2048  # global batch in tokens; gradient accumulation follows from it
    micro_batch_size: int = 16  # sequences per forward pass per rank
    eval_every: int = 50
    eval_batches: int = 2
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda
    init_from: str | None = None  # a checkpoint: load model weights only (Position Interpolation fine-tune)
    init_data_stream: str = "restart"  # with init_from: restart the data stream, or continue it (same seq_len and batch)
    max_bad_steps: int = 0  # non-finite loss/grad-norm steps skipped before the run stops
    time_budget_s: float | None = None  # wall-clock budget from process start; steps is then an upper bound
    budget_warmup_steps: int = 3  # with a budget: steps left out of the step-time measurement (compile, allocator)
    budget_measure_steps: int = 5  # with a budget: steps timed to plan the rest
    budget_safety: float = 0.03  # with a budget: share of the remaining time kept free for step-time jitter
    loss_chunk_tokens: int = 4096  # cross-entropy this many tokens at a time (no full fp32 logits); 0: in one piece
    # Signals that stop training at the next step with a checkpoint (preemption, Slurm's --signal before the
    # time limit); the handler only sets a flag, every rank then stops at the same step.
    stop_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    time_limit_margin_s: float | None = 90.0  # under Slurm: stop this long before the job's time limit; null: never


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 50
    keep_last: int = 2
    resume: str = "auto"  # auto (latest complete checkpoint of the run) | none | PATH
    allow_changes: list[str] = field(default_factory=list)  # keys that may differ from the checkpoint's recipe on resume


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    progress: bool = True  # live progress line on rank 0
    peak_tflops: float | None = None  # None: detected from the GPU name


@dataclass(frozen=True)
class ParallelConfig:
    activation_checkpointing: str = "none"  # none | full | selective (every other block)
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    init_timeout_s: float = 600.0  # collectives until the first step ends (loading, compile, checkpoint reads)
    timeout_s: float = 300.0  # collectives after it: a rank that waits longer for another stops the run


@dataclass(frozen=True)
class EvalConfig:
    mmlu_data: str | None = None  # local tinyMMLU-format jsonl; None: lm-eval's tinyMMLU task (Hub)
    limit: int | None = None
    batch_size: int = 4
    irt_params: str | None = None  # tinyBenchmarks parameter file; None: the official one, if reachable
    ppl_data: str | None = None  # held-out jsonl for loss by position
    ppl_docs: int = 32  # documents of at least seq_len + 1 tokens, one window from the start of each


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

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_root) / self.train.name


CHOICES = {
    "data.source": ("local", "hub", "auto"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.init_data_stream": ("restart", "continue"),
    "parallel.activation_checkpointing": ("none", "full", "selective"),
    "parallel.mixed_precision": ("auto", "bf16", "fp32"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "optim.name": ("adamw", "muon"),
    "optim.schedule": ("cosine", "wsd"),
    "optim.decay_shape": ("linear", "sqrt"),
}


def _validate(config: Config) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(allowed)}")
    positive = ["data.seq_len", "data.val_docs", "train.steps", "train.tokens_per_step", "train.micro_batch_size",
                "train.eval_every", "train.eval_batches", "train.log_every", "checkpoint.every",
                "checkpoint.keep_last", "optim.lr", "optim.muon_lr", "train.budget_measure_steps"]
    for key in positive:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    if config.data.seq_len > config.model.max_seq_len:
        raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={config.model.max_seq_len}; "
                          "lower data.seq_len or raise model.max_seq_len (with rope_scaling for Position Interpolation)")
    if config.train.tokens_per_step % config.data.seq_len:
        raise ConfigError(f"train.tokens_per_step={config.train.tokens_per_step} must be a multiple of "
                          f"data.seq_len={config.data.seq_len} (batches are whole sequences, no padding)")
    for key in ("optim.warmup_steps", "optim.weight_decay", "optim.grad_clip", "optim.min_lr_ratio", "optim.muon_weight_decay",
                "train.max_bad_steps", "data.val_per_mille", "train.budget_warmup_steps", "train.loss_chunk_tokens"):
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is not None and value < 0:
            raise ConfigError(f"{key}={value} must not be negative")
    if not 0 < config.optim.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction={config.optim.decay_fraction} must be in (0, 1]: the share of the "
                          "steps spent decaying, e.g. 0.3")
    if not 0 <= config.train.budget_safety < 1:
        raise ConfigError(f"train.budget_safety={config.train.budget_safety} must be in [0, 1), e.g. 0.03")
    if config.train.time_budget_s is not None and config.train.time_budget_s <= 0:
        raise ConfigError(f"train.time_budget_s={config.train.time_budget_s} must be positive, or null for no budget")
    if config.optim.name == "muon" and not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"optim.name=muon needs torch.optim.Muon (torch >= 2.9), and this torch is {torch.__version__}; "
                          "upgrade torch or use --optim.name=adamw")
    for key in ("parallel.init_timeout_s", "parallel.timeout_s", "train.time_limit_margin_s"):
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    unknown_signals = [name for name in config.train.stop_signals if name not in signal.Signals.__members__]
    if unknown_signals:
        raise ConfigError(f"train.stop_signals: {unknown_signals[0]!r} is not a signal name; use names such as "
                          "SIGUSR1, SIGTERM")
    if config.data.token_cache is not None and config.data.hub_streaming:
        raise ConfigError("data.token_cache needs random access to the documents, which data.hub_streaming=true does "
                          "not give: set data.hub_streaming=false (the cached download) or data.token_cache=null")
    if config.data.token_cache == "":
        raise ConfigError("data.token_cache='' is not a folder; give a path, or null to tokenize on the fly")
    if len(config.optim.betas) != 2:
        raise ConfigError(f"optim.betas={config.optim.betas} must have two values, e.g. [0.9, 0.95]")


# --- Building dataclasses from plain dicts, with messages that name the key -------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check (and where lossless, convert) a YAML value to the annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key} may not be null")
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {[f.name for f in dataclasses.fields(tp)]}, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; anyone typing a learning rate means the number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key}={value!r} must be of type {_type_name(tp)}")
    return value


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        if prefix:
            raise ConfigError(f"unknown key {prefix}.{unknown[0]}; valid keys of {prefix}: {', '.join(names)}")
        raise ConfigError(f"unknown section {unknown[0]}; valid sections: {', '.join(names)}")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{prefix}: {error}") from None


def _model_section(values: dict) -> dict:
    """A model section may name a preset (default: debug); its other keys override the preset's fields.
    `model: main` is short for `model: {preset: main}`."""
    values = {"preset": values} if isinstance(values, str) else dict(values)
    preset = values.pop("preset", "debug")
    if preset not in PRESETS:
        raise ConfigError(f"model.preset={preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    return {**to_dict(PRESETS[preset]), **values}


# What may differ between a checkpoint's config and the config that resumes it: keys (or whole sections)
# that change how fast, how often or where, not the trajectory of the weights. Anything else is refused
# unless named in checkpoint.allow_changes.
RESUMABLE = ("train.steps", "train.time_budget_s", "train.budget_warmup_steps", "train.budget_measure_steps",
             "train.budget_safety", "train.name", "train.run_root", "train.log_every", "train.eval_every", "train.eval_batches",
             "train.device", "train.micro_batch_size", "train.loss_chunk_tokens", "train.max_bad_steps",
             "train.init_from", "train.init_data_stream", "data.prefetch_steps", "data.tokenizer", "data.val_docs",
             "train.stop_signals", "train.time_limit_margin_s", "data.token_cache",
             "parallel.activation_checkpointing", "parallel.compile", "parallel.backend", "parallel.init_timeout_s",
             "parallel.timeout_s",
             "checkpoint", "logging", "eval")


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}; lists and other values are leaves."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def is_resumable(key: str) -> bool:
    return any(key == name or key.startswith(f"{name}.") for name in RESUMABLE)


def recipe_changes(saved: Config, config: Config) -> list[dict]:
    """The keys outside RESUMABLE whose values differ, as [{"key", "old", "new"}]."""
    old, new = flatten(to_dict(saved)), flatten(to_dict(config))
    return [{"key": key, "old": old.get(key), "new": new.get(key)}
            for key in sorted(set(old) | set(new)) if not is_resumable(key) and old.get(key) != new.get(key)]


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def from_dict(values: dict) -> Config:
    values = dict(values or {})
    if "model" in values and isinstance(values["model"], (str, dict, type(None))):
        values["model"] = _model_section(values["model"] or {})
    for name, section in values.items():
        if not isinstance(section, (dict, type(None))):
            raise ConfigError(f"section {name} must be a mapping of keys, got {section!r}")
    config = _build(Config, {name: dict(section or {}) for name, section in values.items()}, "")
    _validate(config)
    return config


def parse_override(text: str) -> tuple[list[str], object]:
    """'--train.steps=10' -> (['train', 'steps'], 10); values are parsed as YAML (ints, floats, bools, lists, null)."""
    if not text.startswith("--") or "=" not in text:
        raise ConfigError(f"override {text!r} must look like --section.key=value")
    key, raw = text[2:].split("=", 1)
    parts = key.split(".")
    if len(parts) < 2:
        raise ConfigError(f"override {text!r} must name a section and a key, e.g. --train.steps=100")
    return parts, yaml.safe_load(raw) if raw != "" else ""


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; the presets are in configs/ (e.g. configs/debug.yaml)")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML ({problem}); fix the file at that line and column") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(values).__name__}")
    for text in overrides:
        parts, value = parse_override(text)
        target = values
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"cannot override {text!r}: {part} is not a section")
        target[parts[-1]] = value
    return from_dict(values)


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def config_argument_parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = CommandParser(command=command, description=description,
                           epilog="Any --section.key=value after the options overrides the config file.")
    parser.add_argument("--config", default=None, help="YAML file in configs/ (default: the built-in debug config)")
    return parser


def parse_cli(command: str, description: str, argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    """Parse --config and --section.key=value overrides; exit with a one-line message on a user mistake."""
    parser = config_argument_parser(command, description)
    args, overrides = parser.parse_known_args(argv)
    with user_errors(command, ConfigError):
        return args, load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> None:
    parser = config_argument_parser("config", "Print the resolved configuration.")
    parser.add_argument("--run-dir", action="store_true", help="print only the run directory (train.run_root/train.name)")
    args, overrides = parser.parse_known_args(argv)
    with user_errors("config", ConfigError):
        config = load_config(args.config, overrides)
    sys.stdout.write(f"{config.run_dir}\n" if args.run_dir else yaml.safe_dump(to_dict(config), sort_keys=False))


if __name__ == "__main__":
    main()
