"""The environment check, in its own process since it imports torch: this machine, the bundle and the
resolved config.

The preflight stage runs `python -m dist_llama.session preflight`, which writes preflight_report's facts
and problems as JSON, and prints the package versions it found.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dist_llama.session import BadInput
from dist_llama.session.bundle import data_overrides, load_manifest
from dist_llama.session.wheels import import_errors, unmet_requirements

TRAINING_MODULES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "yaml",
    "numpy",
    "pyarrow",
    "tensorboard",
    "psutil",
)
EVALUATION_MODULES = ("lm_eval", "lm_eval.models.huggingface", "datasets", "evaluate", "accelerate", "scipy")
REPORT_MODULES = ("matplotlib",)
REPORTED_PACKAGES = (
    "torch",
    "transformers",
    "huggingface_hub",
    "tokenizers",
    "safetensors",
    "accelerate",
    "numpy",
    "pyarrow",
    "pandas",
    "fsspec",
    "lm_eval",
    "datasets",
)


def preflight_report(
    bundle: Path, inputs: Path, config_path: str, overrides: list[str], require_gpu: bool
) -> tuple[dict, list[str]]:
    """(facts about this machine and the inputs, problems that stop the session)."""
    import platform

    report: dict = {"python": platform.python_version(), "executable": sys.executable}
    errors = import_errors(TRAINING_MODULES + EVALUATION_MODULES + REPORT_MODULES)
    report["import_errors"] = errors
    problems = [
        f"{name} does not import ({error}); training needs it"
        for name, error in errors.items()
        if name in TRAINING_MODULES
    ]
    if problems:
        return report, problems
    problems += _machine(report, require_gpu)
    try:
        manifest = load_manifest(bundle)
    except BadInput as error:
        return report, problems + [str(error)]
    report["unmet"] = unmet_requirements(manifest["wheels"])
    problems += _inputs(report, bundle, manifest, inputs, config_path, overrides)
    return report, problems


def _machine(report: dict, require_gpu: bool) -> list[str]:
    """Package versions, CUDA and the GPU into report; the problem, when a GPU is required and there
    is none."""
    import importlib.metadata

    import torch

    report["packages"] = {}
    for name in REPORTED_PACKAGES:
        try:
            report["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            report["packages"][name] = None
    report["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        report["gpu"] = {
            "name": torch.cuda.get_device_name(),
            "count": torch.cuda.device_count(),
            "free_gib": free / 2**30,
            "total_gib": total / 2**30,
            "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        }
        return []
    report["gpu"] = None
    return (
        ["no GPU visible (torch.cuda.is_available() is False); use --rehearse to run on the CPU"]
        if require_gpu
        else []
    )


def _inputs(
    report: dict, bundle: Path, manifest: dict, inputs: Path, config_path: str, overrides: list[str]
) -> list[str]:
    """The bundle's tokenizer, data and items, and the resolved config, into report; the problems found."""
    import pyarrow.parquet as pq

    from dist_llama.config import ConfigError, load_config, to_dict
    from dist_llama.tokenizer import load_tokenizer

    problems = []
    try:
        tokenizer = load_tokenizer(str(inputs / manifest["tokenizer"]))
        report["tokenizer"] = {
            "vocab": len(tokenizer),
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
        }
    except (OSError, ValueError) as error:
        problems.append(f"the bundle's tokenizer does not load: {error}")
    report["data"] = {
        name: pq.ParquetFile(bundle / name).metadata.num_rows
        for name in [*manifest["train"], manifest["held_out"]]
    }
    report["mmlu_spread"] = {
        "items": manifest["mmlu_spread_items"],
        "subjects": manifest["mmlu_spread_subjects"],
    }
    report["dropped_training_shards"] = manifest["dropped_training_shards"]
    try:
        report["config"] = to_dict(
            load_config(config_path, [*data_overrides(bundle, manifest, inputs), *overrides])
        )
    except ConfigError as error:
        problems.append(f"config error: {error}")
    return problems
