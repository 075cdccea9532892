"""What a run records: metrics.jsonl, tensorboard scalars, a progress line, the environment, MFU, and how long
the training loop waited for its data.

Only rank 0 writes. Every record is one JSON object per line in run_dir/metrics.jsonl, so the report
generator and anyone with pandas can read a run without tensorboard.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import psutil
import torch

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peak FLOP/s, keyed by the words a card's CUDA name must contain. NVIDIA's
# datasheets quote bf16 "with sparsity"; the dense peak is half of that:
#   H100 SXM 1,979 -> 989.5; H100 PCIe 1,513 -> 756.5; H100 NVL 1,671 -> 835.5 (H100 datasheet);
#   H200 SXM 1,979 -> 989.5; H200 NVL 1,671 -> 835.5 (H200 datasheet); GH200 1,979 -> 989.5;
#   A100 40GB and 80GB, SXM and PCIe alike: 624 -> 312 (A100 datasheet).
# CUDA names: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
# "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe", ...
PEAK_BF16_FLOPS: dict[tuple[str, ...], float] = {
    ("H100",): 989.5e12,  # SXM5, which names no form factor
    ("H100", "PCIE"): 756.5e12,
    ("H100", "NVL"): 835.5e12,
    ("H200",): 989.5e12,
    ("H200", "NVL"): 835.5e12,
    ("GH200",): 989.5e12,
    ("A100", "SXM4", "40GB"): 312e12,
    ("A100", "SXM4", "80GB"): 312e12,
    ("A100", "PCIE", "40GB"): 312e12,
    ("A100", "PCIE", "80GB"): 312e12,
    ("A100",): 312e12,
}


# Dense fp16 peak FLOP/s of the cards without bf16 (compute capability < 8.0), where `auto` trains in fp16:
#   Tesla T4 65 (tensor cores; T4 datasheet); V100 SXM2 125, V100 PCIe 112, V100S PCIe 130 (tensor cores; V100
#   datasheet); P100 SXM2 21.2, P100 PCIe 18.7 (no tensor cores: its fp16 units; P100 datasheet).
# CUDA names: "Tesla T4", "Tesla V100-SXM2-16GB", "Tesla V100-PCIE-32GB", "Tesla V100S-PCIE-32GB",
# "Tesla P100-PCIE-16GB", "Tesla P100-SXM2-16GB".
PEAK_FP16_FLOPS: dict[tuple[str, ...], float] = {
    ("T4",): 65e12,
    ("V100",): 125e12,  # SXM2, the usual cloud and cluster part
    ("V100", "SXM2"): 125e12,
    ("V100", "PCIE"): 112e12,
    ("V100S",): 130e12,
    ("P100",): 18.7e12,
    ("P100", "PCIE"): 18.7e12,
    ("P100", "SXM2"): 21.2e12,
}


def _by_name(table: dict[tuple[str, ...], float], device_name: str) -> float | None:
    """The most specific matching entry wins (H100 PCIe, not H100). Names are compared word by word, so
    GH200 is not taken for H200. None for an unknown card."""
    words = set(device_name.upper().replace("-", " ").split())
    matches = [key for key in table if words.issuperset(key)]
    return table[max(matches, key=len)] if matches else None


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its CUDA name."""
    return _by_name(PEAK_BF16_FLOPS, device_name)


def peak_fp16_flops(device_name: str) -> float | None:
    """Dense fp16 peak of a GPU by its CUDA name: the pre-Ampere cards' own, else the bf16 peak (equal on the
    cards that have both)."""
    return _by_name(PEAK_FP16_FLOPS, device_name) or peak_bf16_flops(device_name)


def peak_flops(device: torch.device, override_tflops: float | None, precision: str = "bf16") -> float | None:
    """Peak FLOP/s for MFU, of the precision training computes in (fp32 runs are measured against the bf16
    peak, what the card could do); None on CPU or an unknown GPU (MFU is then left out)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return peak_fp16_flops(name) if precision == "fp16" else peak_bf16_flops(name)


def memory_gib(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on GPU, the process's max resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment_record(device: torch.device, world_size: int) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "git_commit": commit or None,
        "start_time": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({cpu_name()}, {os.cpu_count()} cores)",
        "world_size": world_size,
        "argv": sys.argv,
    }


def read_environment(run_dir: Path) -> list[dict]:
    """environment.json's records, one per start of the run, oldest first (a single record in runs older
    than one list per run)."""
    path = run_dir / "environment.json"
    if not path.is_file():
        return []
    values = json.loads(path.read_text())
    return values if isinstance(values, list) else [values]


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class TrainingClock:
    """Seconds of training, the pauses between steps (evaluation, checkpoints, the budget's plan) left out:
    the throughput window and the time budget's step timing both read `now`, so a pause is excluded from both
    in this one place. On a GPU it synchronizes first, so queued kernels count where they ran."""

    def __init__(self, device: torch.device):
        self.device = device
        self.paused_s = 0.0
        self.paused_at: float | None = None

    def wall(self) -> float:
        """time.perf_counter() once the device has finished its queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def now(self) -> float:
        """Training seconds so far; frozen while paused."""
        return self.paused_at if self.paused_at is not None else self.wall() - self.paused_s

    @contextmanager
    def pause(self):
        self.paused_at = self.now()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - started
            self.paused_at = None


class Throughput:
    """Tokens per second of training time over the window since the last `take`."""

    def __init__(self, clock: TrainingClock):
        self.clock = clock
        self.start, self.tokens = clock.now(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def take(self) -> tuple[float, float]:
        """(tokens per second, the window's seconds), and a new window from now."""
        now = self.clock.now()
        elapsed = now - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        self.start, self.tokens = now, 0
        return rate, elapsed


# Above this share of step time spent waiting for batches, the run says once that the data is the bottleneck.
DATA_WAIT_WARNING = 0.05


class DataWait:
    """The seconds the training loop waits in next(data) for its batches, summed until take() reads them."""

    def __init__(self):
        self.seconds = 0.0

    def next(self, data):
        start = time.perf_counter()
        try:
            return next(data)
        finally:
            self.seconds += time.perf_counter() - start

    def take(self, elapsed_s: float) -> dict:
        """The train record's fields for a window of `elapsed_s` seconds of steps: data_wait_s, and data_wait,
        the share of the window it was."""
        fields = {
            "data_wait_s": self.seconds,
            "data_wait": self.seconds / elapsed_s if elapsed_s > 0 else 0.0,
        }
        self.seconds = 0.0
        return fields


class MetricsLogger:
    """metrics.jsonl, tensorboard and the progress line of rank 0 (`enabled`); the other ranks log nothing."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, progress: bool):
        self.enabled = enabled
        self.progress = progress
        self.start = time.perf_counter()
        self.writer = None
        self.file = None
        self.train_records, self.warned_data_wait = 0, False
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = (run_dir / "metrics.jsonl").open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict, total_steps: int, start_step: int = 0) -> None:
        """Write one record (must hold `step`); `kind` (default "train") is one of PROGRESS_LINES, checked
        whether or not the progress line is on, so that every kind is known to print. The progress line shows
        the step of `total_steps`, and a train record's ETA from the steps done since `start_step`."""
        kind = record.get("kind", "train")
        if kind not in PROGRESS_LINES:
            raise ValueError(f"no progress line for records of kind {kind!r}; add one to PROGRESS_LINES")
        if not self.enabled:
            return
        record = {key: value for key, value in record.items() if value is not None}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, record["step"])
        if self.progress:
            print(self._progress_line(record, total_steps, start_step), flush=True)
        if kind == "train":
            self.train_records += 1
            self._warn_data_wait(record)

    def _warn_data_wait(self, record: dict) -> None:
        # The first window holds the start-up (the first batches, files opened): steady waiting counts from
        # the second.
        share = record.get("data_wait")
        if share is None or self.warned_data_wait or self.train_records < 2 or share <= DATA_WAIT_WARNING:
            return
        self.warned_data_wait = True
        log.warning(
            "step %d: the training loop waited for its batches %.1f%% of the step time (over %.0f%%): the "
            "data cannot keep up. Tokenize once instead of on the fly: --data.token_cache=FOLDER (python -m "
            "dist_llama.data.prepare builds it beforehand)",
            record["step"],
            100 * share,
            100 * DATA_WAIT_WARNING,
        )

    def _progress_line(self, record: dict, total_steps: int, start_step: int) -> str:
        """The console line of a record: the step, then its kind's line (PROGRESS_LINES), and a train
        record's ETA."""
        kind = record.get("kind", "train")
        head = f"step {record['step']}/{total_steps}"
        if kind != "train":
            return f"{head} | {PROGRESS_LINES[kind](record)}"
        elapsed = time.perf_counter() - self.start
        done = record["step"] - start_step
        parts = [head, train_line(record)]
        if done > 0:
            parts.append(f"ETA {format_duration(elapsed / done * (total_steps - record['step']))}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()


def train_line(record: dict) -> str:
    parts = [
        f"loss {record['loss']:.4f}",
        f"lr {record['lr']:.2e}",
        f"grad_norm {record['grad_norm']:.3f}",
        f"{record['tokens_per_s']:,.0f} tok/s",
    ]
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if "loss_scale" in record:
        parts.append(f"loss scale {record['loss_scale']:g}")
    if "data_wait" in record:
        parts.append(f"data_wait {100 * record['data_wait']:.1f}%")
    if "memory_gib" in record:
        parts.append(f"mem {record['memory_gib']:.2f}GiB")
    return " | ".join(parts)


# The console line of each kind of record the trainer writes to metrics.jsonl (the step comes first). A kind
# without one is refused when logged, so a new kind cannot crash a run only where the progress line is on.
PROGRESS_LINES = {
    "train": train_line,
    "val": lambda record: f"val_loss {record['val_loss']:.4f}",
    "started": lambda record: (
        f"first step done {record['age_s']:.0f} s after start (start-up, data, compile)"
    ),
    "plan": lambda record: f"time budget: {record['planned_steps']} steps planned",
    "stop": lambda record: f"stopping early: {record['reason']}",
}


def process_age_s() -> float:
    """Seconds since this process started: the time budget counts imports and set-up too."""
    return time.time() - psutil.Process().create_time()


class StepMeter:
    """The speed of training over the window since the last `take`: tokens per second of training time (the
    clock leaves pauses out), MFU, and the seconds the loop waited for its batches."""

    def __init__(
        self, clock: TrainingClock, peak_flops_per_s: float | None, flops_per_token: float, ranks: int
    ):
        self.throughput, self.data_wait = Throughput(clock), DataWait()
        self.peak, self.flops_per_token, self.ranks = peak_flops_per_s, flops_per_token, ranks

    def next_batch(self, data):
        return self.data_wait.next(data)

    def add(self, tokens: int) -> None:
        self.throughput.add(tokens)

    def take(self) -> dict:
        tokens_per_s, elapsed = self.throughput.take()
        mfu = self.flops_per_token * tokens_per_s / (self.peak * self.ranks) if self.peak else None
        return {"tokens_per_s": tokens_per_s, "mfu": mfu, **self.data_wait.take(elapsed)}


# --- The records a training run writes, one function per kind (PROGRESS_LINES prints each) ---------------


def train_record(run, result, lr_scale: float, speed: dict) -> dict:
    """After a step: its loss, gradient norm and learning rate, the batch, the speed (StepMeter.take), memory,
    and fp16's loss scale. `run` is run.Run."""
    optim, progress = run.config.optim, run.progress
    record = {
        "kind": "train",
        "step": progress.step,
        "tokens_seen": progress.tokens_seen,
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "lr": optim.lr * lr_scale,
        "tokens_in_batch": run.layout.tokens_per_step,
        "epoch": run.data.epoch,
        **speed,
        "memory_gib": memory_gib(run.env.device),
        "time_s": time.perf_counter() - run.logger.start,
    }
    if optim.name == "muon":
        record["muon_lr"] = optim.muon_lr * lr_scale
    if run.stepper.scaler is not None:
        record.update(loss_scale=run.stepper.scaler.get_scale(), overflow_steps=progress.overflow_steps)
    return record


def val_record(progress, val_loss: float) -> dict:
    return {"kind": "val", "step": progress.step, "tokens_seen": progress.tokens_seen, "val_loss": val_loss}


def started_record(step: int, device: torch.device, estimate) -> dict:
    """After the first step: how long start-up, data and compile took, and on a GPU the allocator's peak
    beside the memory estimate's allocated part (memory.MemoryEstimate), which it can exceed."""
    record = {"kind": "started", "step": step, "age_s": process_age_s()}
    if estimate is not None:
        record.update(memory_gib=memory_gib(device), memory_estimate_gib=estimate.allocated / 2**30)
    return record


def plan_record(step: int, plan) -> dict:
    return {"kind": "plan", "step": step, **plan.to_dict()}


def stop_record(step: int, reason: str) -> dict:
    return {"kind": "stop", "step": step, "reason": reason}
