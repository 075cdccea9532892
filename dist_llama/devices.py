"""Device and dtype names shared by training, release, evaluation and the benchmarks."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """A dtype by name; `auto` is bf16 on CUDA (tensor cores) and fp32 elsewhere (CPUs gain little from bf16)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16", as config.json and our result files spell a dtype."""
    return str(dtype).removeprefix("torch.")
