"""Everything distributed: process group, device, FSDP2 sharding, activation checkpointing, compile.

The model (model.py) knows nothing of this file. `python -m dist_llama.train` without torchrun runs
the same code path with a one-process group, so there is no second, untested single-device branch.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from dist_llama.config import ConfigError, ParallelConfig
from dist_llama.devices import DTYPES, auto_precision
from dist_llama.model import Transformer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than its timeout for another rank (hung, stopped, or far slower)."""


def set_nccl_environment(trace_dir: str) -> None:
    """NCCL settings that turn a hang into an error and a trace: async error handling aborts a timed-out
    collective (so the process exits and torchrun or Slurm can act), and the flight recorder dumps each
    rank's last collectives to trace_dir/nccl_trace_rank_N. A variable already set is left as it is."""
    for name, value in {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": f"{trace_dir}/nccl_trace_rank_",
    }.items():
        os.environ.setdefault(name, value)


def init_distributed(parallel: ParallelConfig, device_request: str, trace_dir: str = ".") -> DistEnv:
    """Join the torchrun group, or make a one-process group when launched with plain python. Collectives
    wait parallel.init_timeout_s until CollectiveTimeouts.first_step_done shortens it."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_request, local_rank)
    backend = (
        parallel.backend if parallel.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    )
    if backend == "nccl":
        set_nccl_environment(trace_dir)
    timeout = timedelta(seconds=parallel.init_timeout_s)
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(
                backend,
                device_id=device if device.type == "cuda" else None,
                timeout=timeout,
                store=attempt_store(rank, world_size, timeout),
                rank=rank,
                world_size=world_size,
            )
        else:
            # An in-process store: no ports, no environment variables for the single-process user.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistEnv(rank, world_size, local_rank, device)


def attempt_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The launcher's store, with keys of this restart attempt only.

    torchrun's agent keeps one TCPStore server for every restart of its workers (the shared rendezvous
    store), and env:// adds no prefix per attempt: the restarted workers then read the dead attempt's
    gloo addresses, and either fail ("Connection refused" in connectFullMesh) or wait forever for a peer
    that connects elsewhere. A prefix of TORCHELASTIC_RESTART_COUNT gives each attempt its own keys.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=rank == 0 and not agent_hosts_store,
        timeout=timeout,
        multi_tenant=True,
    )
    return dist.PrefixStore(f"dist_llama/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def set_step_timeout(seconds: float) -> None:
    for group in list(dist.distributed_c10d._world.pg_names):
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds), group)


class CollectiveTimeouts:
    """How long a collective waits for the other ranks: parallel.init_timeout_s until the first step is done
    (loading, compile, checkpoint reads), then parallel.timeout_s. After the first step a collective that
    waits longer than a step ever should means a hung rank (torchtitan does the same with its train
    timeout)."""

    def __init__(self, parallel: ParallelConfig):
        self.key, self.seconds = "parallel.init_timeout_s", parallel.init_timeout_s
        self.after_first_step = parallel.timeout_s

    def first_step_done(self) -> None:
        set_step_timeout(self.after_first_step)
        self.key, self.seconds = "parallel.timeout_s", self.after_first_step

    def explain(self, step: int, error: RuntimeError) -> CollectiveTimeout | None:
        """The one-line error for a collective that gave up waiting; None for any other error."""
        if "timed out" not in str(error).lower() and "timeout" not in str(error).lower():
            return None
        return CollectiveTimeout(
            f"step {step}: a collective waited more than {self.key}={self.seconds:g} s for another rank, "
            "which is "
            "hung, stopped or far slower; every rank stops so that torchrun or Slurm can restart the job. "
            "If steps "
            f"(or checkpoints) really take this long, raise --{self.key}"
        )


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def training_precision(parallel: ParallelConfig, device: torch.device, capability=None) -> tuple[str, str]:
    """(precision, why): parallel.mixed_precision, with `auto` resolved for the device
    (devices.auto_precision, whose capability query tests may replace)."""
    if parallel.mixed_precision == "auto":
        return auto_precision(device, capability)
    return parallel.mixed_precision, "set by parallel.mixed_precision"


def loss_scaler(precision: str, device: torch.device, initial_scale: float) -> ShardedGradScaler | None:
    """fp16's dynamic loss scaling (None for other precisions). fp16 holds numbers up to 65504 and down to
    6e-8: the loss is multiplied by the scale before backward, so small gradients do not underflow to zero,
    and the gradients divided by it before clipping and the update. A step whose scaled gradients overflow
    is skipped and the scale halved; 2000 steps without one double it. ShardedGradScaler agrees on an
    overflow across the ranks, so every rank skips the same steps and keeps the same scale."""
    if precision != "fp16":
        return None
    # Its found-inf flag meets FSDP2's DTensor gradients as a one-element tensor, which
    # DTensor replicates with
    # a warning on every run; the replication is what the scaler needs.
    warnings.filterwarnings("ignore", message="Found a non-scalar tensor with numel=1", category=UserWarning)
    return ShardedGradScaler(device=device.type, init_scale=initial_scale)


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """Recompute block activations in backward: `full` every block, `selective` every other one."""
    if mode == "none":
        return
    for index, block in enumerate(model.model.layers):
        if mode == "full" or index % 2 == 0:
            # Non-reentrant: works with FSDP2 and keeps results bitwise equal to no checkpointing.
            model.model.layers[index] = checkpoint_wrapper(block, preserve_rng_state=False)


def parallelize(
    model: Transformer, parallel: ParallelConfig, env: DistEnv, precision: str | None = None
) -> Transformer:
    """Activation checkpointing, per-block compile, then FSDP2: each block its own unit, then the root,
    computing in `precision` (default: training_precision's for the device).

    The model must already hold its full, seeded weights (see Transformer.init_weights): sharding a
    meta-initialised model and re-initialising per rank gives every rank the same random stream.
    """
    model.to(env.device)
    apply_activation_checkpointing(model, parallel.activation_checkpointing)
    if parallel.compile:
        for block in model.model.layers:
            block.compile()  # in place: parameter names stay those of transformers' Llama
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    # Parameters stay fp32 (the optimizer's master copy); 16 bits only for compute, fp32
    # for gradient reduction.
    precision = precision or training_precision(parallel, env.device)[0]
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def all_gather_objects(obj) -> list:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
