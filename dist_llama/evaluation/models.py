"""What is evaluated, loaded: a release folder, a Hub id, or a training checkpoint consolidated first.

Every model loads through transformers (trust_remote_code), as a user of the release would load it;
a checkpoint becomes a temporary stock-Llama release folder, whose RoPE honours the scaling override
that the long-context comparison needs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dist_llama.devices import DTYPES, resolve_dtype
from dist_llama.evaluation import EvaluationError

logger = logging.getLogger(__name__)

DTYPE_CHOICES = ("auto", *DTYPES)


def check_dtype(name: str) -> None:
    if name not in DTYPE_CHOICES:
        raise EvaluationError(f"--dtype {name!r}: choose one of {DTYPE_CHOICES}")


def torch_dtype_for(name: str, device: str, auto_means_saved: bool):
    """The dtype to load with: `auto` is the saved dtype when auto_means_saved, else
    devices.resolve_dtype's."""
    return "auto" if name == "auto" and auto_means_saved else resolve_dtype(name, device)


def checked_model_name(
    model: str,
    option: str = "--model",
    expected: str = "a release folder, a Hub id or, for ppl, a checkpoint",
) -> str:
    """The model (or tokenizer) name to load: see consolidate.local_path_or_hub_id."""
    from dist_llama.consolidate import ReleaseError, local_path_or_hub_id

    try:
        return local_path_or_hub_id(model, option)
    except ReleaseError as err:
        raise EvaluationError(f"{err}; give {expected}") from None


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def load_model(
    source: str,
    *,
    device: str,
    dtype,
    rope_scaling_factor: float | None = None,
    min_positions: int | None = None,
    tokenizer: str | None = None,
):
    """(model, tokenizer) from a release folder or Hub id, rope scaling overridden when a factor is given.

    rope_scaling_factor F sets linear scaling (Position Interpolation) with factor F, and F = 1 plain RoPE,
    whatever the saved config says; None keeps the saved setting.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=True)
        if rope_scaling_factor is not None:
            theta = _rope_theta(config)
            config.rope_parameters = (
                {"rope_type": "default", "rope_theta": theta}
                if rope_scaling_factor == 1
                else {"rope_type": "linear", "factor": float(rope_scaling_factor), "rope_theta": theta}
            )
        if min_positions and getattr(config, "max_position_embeddings", min_positions) < min_positions:
            # Extrapolating past the trained length is the point of the long-context study; RoPE has no
            # table to outgrow, the config field only has to admit the positions.
            config.max_position_embeddings = min_positions
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, trust_remote_code=True, dtype=dtype
        )
    except OSError as err:
        raise EvaluationError(f"cannot load model {source}: {str(err).splitlines()[0]}") from None
    model.to(device).eval()

    tok_source = tokenizer or source
    if tokenizer is None and Path(source).is_dir() and not (Path(source) / "tokenizer.json").is_file():
        logger.warning(
            "%s has no tokenizer.json; using the project's (offline-built Mistral) tokenizer", source
        )
        tok_source = "offline"
    if tok_source == "offline":
        from dist_llama.tokenizer import load_tokenizer

        return model, load_tokenizer("offline")
    try:
        tok_source = checked_model_name(tok_source, "--tokenizer", "a tokenizer folder or Hub id")
        tok = AutoTokenizer.from_pretrained(tok_source, trust_remote_code=True)
    except OSError as err:
        raise EvaluationError(f"cannot load tokenizer {tok_source}: {str(err).splitlines()[0]}") from None
    return model, tok


def consolidate_if_checkpoint(model: str, workdir: str, tokenizer: str | None = None) -> str:
    """An HF folder or Hub id as is; a DCP checkpoint or run folder consolidated into workdir first."""
    path = Path(model)
    if not path.is_dir() or (path / "config.json").is_file():
        return model
    try:
        from dist_llama.consolidate import consolidate
    except ImportError as err:
        raise EvaluationError(
            f"{model} is not a release folder (no config.json), and checkpoints cannot be "
            f"consolidated here: {err}"
        ) from None
    logger.info("consolidating checkpoint %s into a temporary release folder", model)
    try:
        # Stock Llama: transformers' own RoPE implements the rope_parameters override, and the parity
        # tests tie our model to it.
        return str(
            consolidate(model, Path(workdir) / "release", dtype="fp32", stock_llama=True, tokenizer=tokenizer)
        )
    except Exception as err:  # noqa: BLE001 - CheckpointError, ReleaseError, ConfigError: all "not a checkpoint"
        raise EvaluationError(f"cannot consolidate {model}: {err}") from None
