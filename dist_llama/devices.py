"""Device and dtype names shared by training, release, evaluation and the benchmarks, and which precision a
device computes in when asked for `auto`."""

from __future__ import annotations

from collections.abc import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# bf16 runs natively from compute capability 8.0 (Ampere: A100, RTX 30xx) on. Below it (T4 7.5, V100 7.0,
# P100 6.0) bf16 is refused or emulated many times slower, and fp16 is what the tensor cores (or P100's
# fp16 units) compute.
NATIVE_BF16_CAPABILITY = (8, 0)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def auto_precision(
    device: str | torch.device, capability: Callable[[torch.device], tuple[int, int]] | None = None
) -> tuple[str, str]:
    """(precision, why) that `auto` means on this device: bf16 where the GPU computes it natively, fp16 on an
    older GPU (with loss scaling in training), fp32 on a CPU (which gains little from 16 bits).
    capability: the compute-capability query (torch.cuda.get_device_capability), replaceable in tests."""
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32", f"{device.type}: fp32 (no 16-bit tensor cores)"
    major, minor = (capability or torch.cuda.get_device_capability)(device)
    if (major, minor) >= NATIVE_BF16_CAPABILITY:
        return "bf16", f"compute capability {major}.{minor} >= 8.0: native bf16"
    return "fp16", f"compute capability {major}.{minor} < 8.0: no native bf16, fp16 with loss scaling"


def computes(
    precision: str,
    device: str | torch.device,
    capability: Callable[[torch.device], tuple[int, int]] | None = None,
) -> bool:
    """Whether the device computes in `precision` at all (a CPU computes every one, slowly in 16 bits): only
    bf16 below compute capability 8.0 is refused or emulated. capability: as in auto_precision."""
    device = torch.device(device)
    if precision != "bf16" or device.type != "cuda":
        return True
    return (capability or torch.cuda.get_device_capability)(device) >= NATIVE_BF16_CAPABILITY


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """A dtype by name; `auto` is what auto_precision picks for the device."""
    return DTYPES[auto_precision(device)[0] if name == "auto" else name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16", as config.json and our result files spell a dtype."""
    return str(dtype).removeprefix("torch.")
