"""What a resume may change. A resume compares the config with the checkpoint's: a change that alters the
trajectory (learning rate, data, model shape, seed, ...) stops in one line, unless the key is named in
checkpoint.allow_changes, which the recipe history records. The precision a run computes in is compared as
computed, not as the setting's text: `auto` is decided once, when the run starts, and kept."""

from __future__ import annotations

import logging

import torch

from dist_llama.checkpoint import CheckpointMeta
from dist_llama.config import Config, ConfigError, from_dict, recipe_changes
from dist_llama.devices import computes
from dist_llama.parallel import training_precision

log = logging.getLogger("dist_llama.train")


def resumed_precision(
    config: Config, device: torch.device, saved: CheckpointMeta | None, capability=None
) -> tuple[str, str, dict | None]:
    """(precision, why, change): what the run computes in. `auto` is decided once, when the run starts, and
    kept on resume (a checkpoint records it), so a run does not switch between bf16 and fp16 (with a fresh
    loss scale) because it resumed on another card. A resume in another precision, set explicitly or
    because the device cannot compute the recorded one (bf16 below compute capability 8.0), is a recipe
    change: refused, unless parallel.mixed_precision is in checkpoint.allow_changes; then `change` is
    {"key", "old", "new"} for the recipe history. capability: as in devices.auto_precision."""
    setting = config.parallel.mixed_precision
    wanted, why = training_precision(config.parallel, device, capability)
    recorded = saved.precision if saved is not None else None
    if saved is not None and recorded is None:  # a checkpoint older than format 3: its setting, if explicit
        recorded = from_dict(saved.config).parallel.mixed_precision
        recorded = None if recorded == "auto" else recorded
    if recorded is None or recorded == wanted:
        return wanted, why, None
    if setting == "auto" and computes(recorded, device, capability):
        return recorded, "auto, decided when the run started and kept by the resume", None
    change = {"key": "parallel.mixed_precision", "old": recorded, "new": wanted}
    if change["key"] in config.checkpoint.allow_changes:
        log.warning("resuming in %s, not in the checkpoint's %s, on purpose (%s)", wanted, recorded, why)
        return wanted, f"{why}; changed from {recorded} on purpose at the resume", change
    cannot = "" if computes(recorded, device, capability) else f", which this device cannot compute ({why})"
    raise ConfigError(
        f"the checkpoint at step {saved.step} was trained in {recorded}{cannot}; parallel.mixed_precision="
        f"{setting} means {wanted} here. Resume in {recorded} on a device that computes it, or go on in "
        f"{wanted} on purpose: --checkpoint.allow_changes=[parallel.mixed_precision] (recorded in the "
        "checkpoints' recipe history)"
    )


def recipe_history(
    config: Config, checkpoint, saved: CheckpointMeta | None, precision_change: dict | None
) -> list[dict]:
    """Resuming with a changed recipe would leave weights that config.yaml no longer describes: stop, unless
    every changed key is in checkpoint.allow_changes. Returns every change on purpose so far, for the
    record. The precision is compared as computed (resumed_precision), not as the setting's text: `auto`
    may mean bf16 on one card and fp16 on another, and `bf16` -> `auto` on the same card is no change."""
    if saved is None:
        return []
    changes = [
        change
        for change in recipe_changes(from_dict(saved.config), config)
        if change["key"] != "parallel.mixed_precision"
    ] + ([precision_change] if precision_change else [])
    refused = [change for change in changes if change["key"] not in config.checkpoint.allow_changes]
    if refused:
        listed = "; ".join(f"{c['key']}: {c['old']!r} -> {c['new']!r}" for c in refused)
        keys = ",".join(c["key"] for c in refused)
        raise ConfigError(
            f"{checkpoint} was trained with another recipe ({listed}); start a new run with "
            f"--train.name=NEW_NAME, or resume with the change on purpose: "
            f"--checkpoint.allow_changes=[{keys}]"
        )
    for change in changes:
        log.warning(
            "resuming with %s changed on purpose: %r -> %r", change["key"], change["old"], change["new"]
        )
    return saved.recipe_changes + [{**change, "step": saved.step} for change in changes]
