"""Everything distributed: process group, device, the device mesh, FSDP2 sharding (HSDP on a 2-D mesh),
gradient synchronisation across micro-batches, activation checkpointing, compile.

The model (model.py) knows nothing of this file. `python -m dist_llama.train` without torchrun runs
the same code path with a one-process group, so there is no second, untested single-device branch.

The mesh is (replicate, shard): FSDP2 shards parameters, gradients and optimizer state over the `shard`
ranks, and each of the `replicate` groups holds a whole copy (HSDP). A block's all-gather and reduce-scatter
then stay within a shard group (a node, by default), and only one all-reduce per FSDP unit and step crosses
between groups. With replicate 1 the mesh is the 1-D mesh of plain FSDP.
What else spans ranks needs nothing of its own on the 2-D mesh: the gradient norm (DTensor's) is reduced once,
over the shard ranks only, since the replicas hold copies; Muon gathers each matrix over the shard ranks;
the loss, validation and the fp16 scaler's overflow flag are summed over every rank, each of which holds its
own data lanes (tests/test_hsdp.py counts these collectives).
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
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from dist_llama.config import ConfigError, ParallelConfig
from dist_llama.devices import DTYPES, auto_precision
from dist_llama.model import Transformer

log = logging.getLogger(__name__)


MESH_DIMS = ("replicate", "shard")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1  # the ranks on this node (torchrun's LOCAL_WORLD_SIZE)
    mesh_shape: tuple[int, int] | None = None  # (replicate, shard); None: plain FSDP over every rank
    mesh_why: str = ""  # how mesh_shape was chosen, for the log

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def replicate(self) -> int:
        return self.mesh_shape[0] if self.mesh_shape else 1

    @property
    def shard(self) -> int:
        return self.mesh_shape[1] if self.mesh_shape else self.world_size


def mesh_shape(
    parallel: ParallelConfig, world_size: int, local_world_size: int
) -> tuple[tuple[int, int], str]:
    """((replicate, shard), why). parallel.replicate and parallel.shard when set (one of them: the other is
    what divides the world); neither: shard over each node's ranks and replicate across nodes when the run
    spans several nodes of several ranks each, else plain FSDP over every rank. A shape that does not make
    the world stops in one line."""
    replicate, shard = parallel.replicate, parallel.shard
    if replicate is None and shard is None:
        if 1 < local_world_size < world_size and world_size % local_world_size == 0:
            nodes = world_size // local_world_size
            return (nodes, local_world_size), f"auto: {nodes} nodes of {local_world_size} ranks"
        if local_world_size == world_size:
            return (1, world_size), "auto: one node"
        return (1, world_size), f"auto: {local_world_size} rank(s) on this node of {world_size}"
    if replicate is not None and shard is not None:
        if replicate * shard != world_size:
            raise ConfigError(
                f"parallel.replicate={replicate} x parallel.shard={shard} is {replicate * shard} ranks, but "
                f"the run has {world_size}; make their product {world_size}, or set one of them (the other "
                "follows)"
            )
        return (replicate, shard), "set by parallel.replicate and parallel.shard"
    key, given = ("parallel.replicate", replicate) if replicate is not None else ("parallel.shard", shard)
    if world_size % given:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ConfigError(
            f"{key}={given} does not divide the {world_size} ranks of the run; choose one of "
            f"{', '.join(map(str, divisors))}, or null for the default"
        )
    other = world_size // given
    return ((given, other) if replicate is not None else (other, given)), f"set by {key}"


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
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    # Before any process group exists, so that an impossible shape stops with nothing to clean up.
    shape, why = mesh_shape(parallel, world_size, local_world_size)
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
    return DistEnv(rank, world_size, local_rank, device, local_world_size, shape, why)


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
            "which is hung, stopped or far slower; every rank stops so that torchrun or Slurm can restart "
            f"the job. If steps (or checkpoints) really take this long, raise --{self.key}"
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
    # Its found-inf flag meets FSDP2's DTensor gradients as a one-element tensor, which DTensor replicates
    # with a warning on every run; the replication is what the scaler needs.
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
    """Activation checkpointing, per-block compile, then FSDP2 on env's mesh (device_mesh): each block its
    own unit, then the root, computing in `precision` (default: training_precision's for the device) and
    reducing gradients in parallel.reduce_dtype.

    The model must already hold its full, seeded weights (see Transformer.init_weights): sharding a
    meta-initialised model and re-initialising per rank gives every rank the same random stream.
    """
    model.to(env.device)
    apply_activation_checkpointing(model, parallel.activation_checkpointing)
    if parallel.compile:
        for block in model.model.layers:
            block.compile()  # in place: parameter names stay those of transformers' Llama
    mesh = device_mesh(env)
    log.info("mesh: %s", describe_mesh(env, parallel))
    # Parameters stay fp32 (the optimizer's master copy); 16 bits only for compute.
    precision = precision or training_precision(parallel, env.device)[0]
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=DTYPES[parallel.reduce_dtype])
    blocks = model.model.layers
    for index, block in enumerate(blocks):
        reshard = reshards_after_forward(parallel.reshard_after_forward, index, len(blocks))
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    # The root (embedding, final norm, output head) stays gathered: its backward starts as its forward ends.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def reshards_after_forward(policy: str, index: int, blocks: int) -> bool:
    """Whether block `index` frees its gathered parameters after its forward (parallel.reshard_after_forward).
    `default` keeps the last block's: backward needs them at once, so freeing them would only gather them
    again (one all-gather per micro-batch saved, no memory at the peak added: the last block is gathered
    when backward starts either way)."""
    if policy == "default":
        return index < blocks - 1
    return policy == "always"


def device_mesh(env: DistEnv) -> DeviceMesh:
    """The 1-D mesh of plain FSDP when nothing is replicated, else the 2-D (replicate, shard) mesh of HSDP.
    Ranks r * shard ... (r + 1) * shard - 1 form shard group r: under torchrun, one node's ranks."""
    if env.replicate == 1:
        return init_device_mesh(env.device.type, (env.shard,), mesh_dim_names=MESH_DIMS[1:])
    return init_device_mesh(env.device.type, (env.replicate, env.shard), mesh_dim_names=MESH_DIMS)


def describe_mesh(env: DistEnv, parallel: ParallelConfig) -> str:
    """E.g. "HSDP, 2 replicas x 8 shard ranks (auto: 2 nodes of 8 ranks); gradients in fp32 reduce-scattered
    every micro-batch, all-reduced across replicas after the last micro-batch"."""
    if env.replicate == 1:
        mesh = f"FSDP over {env.shard} rank(s)"
    else:
        mesh = f"HSDP, {env.replicate} replicas x {env.shard} shard ranks"
    collectives = []
    if env.shard > 1:
        when = "every micro-batch" if parallel.reduce_grads == "every_micro" else "after the last micro-batch"
        collectives.append(f"reduce-scattered {when}")
    if env.replicate > 1:
        collectives.append("all-reduced across replicas after the last micro-batch")
    sync = ", ".join(collectives) or "kept (one rank)"
    return f"{mesh} ({env.mesh_why or 'set'}); gradients in {parallel.reduce_dtype} {sync}"


def set_gradient_sync(model: torch.nn.Module, reduce_grads: str, last_micro_batch: bool) -> None:
    """Before each micro-batch's forward and backward: which gradient collectives its backward runs.

    HSDP's all-reduce across replicas runs on the last micro-batch only: until then FSDP2 adds each
    micro-batch's reduce-scattered shard into a buffer the size of the sharded gradient, which stands in for
    it (the sharded gradient is made on the last micro-batch only), so deferring it costs no memory. With
    reduce_grads=last_micro the reduce-scatter waits too: each FSDP unit then keeps its whole, unsharded
    gradient (in the reduce dtype) until the last micro-batch, what memory.estimate_memory adds. FSDP2's
    setters recurse into every FSDP unit below the module they are called on (each block, and the root)."""
    if not isinstance(model, FSDPModule):
        return
    if reduce_grads == "last_micro":
        model.set_requires_gradient_sync(last_micro_batch)
    else:
        model.set_requires_all_reduce(last_micro_batch)


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
