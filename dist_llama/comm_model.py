"""What one optimizer step sends between GPUs, from the model's shapes and the run's layout alone, and what
that costs on a cluster's links: the communication model behind `python -m dist_llama.counts --nodes N`.

`step_collectives` lists a step's collectives exactly as dist_llama.comms records them on a run
({(phase, op, dimension, dtype): [count, bytes]}), and tests/test_hsdp.py checks the two are equal on a CPU
mesh, so the bytes below are counted, not guessed. Per micro-batch, over the `shard` ranks (FSDP2):
- an all-gather of the root's parameters (embedding, final norm, output head; kept gathered through
  backward) and of each block in forward, and again in backward for each block freed after its forward
  (parallel.reshard_after_forward: every block but the last by default), in the compute dtype;
- a reduce-scatter of each unit's gradient in the reduce dtype (with reduce_grads=last_micro, on the last
  micro-batch only).
Under HSDP, one all-reduce of each unit's sharded gradient across the `replicate` ranks on the last
micro-batch. Then the step: the gradient norm's all-reduce of every parameter's partial norm (over the shard
ranks: replicas hold copies), the loss's over every rank, and with Muon an all-gather of each hidden matrix.
FSDP2 pads each parameter's first dimension to a multiple of the shard ranks, and the bytes count the padding.

Time: a collective's per-GPU traffic on a ring (comms.ring_bytes) over the bandwidth of the slowest link it
crosses: NVLink within a node, the GPU's own network port (one NIC per GPU, as on H100 nodes) when its ranks
span nodes, as nccl-tests' bus bandwidth is read. Latency is left out: it matters for small messages and
thousands of ranks, not for these multi-megabyte buffers at up to 64 nodes (REPORT.md says what changes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dist_llama.comms import ring_bytes
from dist_llama.model import ModelArgs, Transformer
from dist_llama.optim import is_hidden_matrix

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class StepLayout:
    """How a step runs: the mesh (replicate x shard ranks), micro-batches per step, the compute and reduce
    precisions (fp32 | bf16 | fp16), parallel.reshard_after_forward and parallel.reduce_grads, and the
    optimizer."""

    replicate: int
    shard: int
    micro_batches: int
    precision: str = "bf16"
    reduce_dtype: str = "fp32"
    reshard_after_forward: str = "default"
    reduce_grads: str = "every_micro"
    optimizer: str = "adamw"

    @classmethod
    def of(cls, config, mesh: tuple[int, int], micro_batches: int, precision: str) -> StepLayout:
        """A configured run's step (config.Config) on a (replicate, shard) mesh, computing in `precision`."""
        parallel = config.parallel
        return cls(
            *mesh,
            micro_batches,
            precision,
            parallel.reduce_dtype,
            parallel.reshard_after_forward,
            parallel.reduce_grads,
            config.optim.name,
        )

    @property
    def world_size(self) -> int:
        return self.replicate * self.shard

    @property
    def everyone(self) -> str:
        """The name comms.mesh_dimensions gives the group of every rank."""
        if self.replicate == 1:
            return "shard"
        return "replicate" if self.shard == 1 else "world"


@dataclass(frozen=True)
class ParameterShapes:
    """The shapes FSDP2 shards: the root's parameters and each block's (its units), and Muon's matrices."""

    root: list[torch.Size]
    blocks: list[list[torch.Size]]
    hidden_matrices: list[torch.Size]

    @classmethod
    def of(cls, args: ModelArgs) -> ParameterShapes:
        """Read off a model built on the meta device: no memory, whatever its size."""
        with torch.device("meta"):
            model = Transformer(args)
        root, blocks, hidden = [], [[] for _ in range(args.n_layers)], []
        prefix = "model.layers."
        for name, param in model.named_parameters():
            if name.startswith(prefix):
                blocks[int(name[len(prefix) :].split(".")[0])].append(param.shape)
            else:
                root.append(param.shape)
            if is_hidden_matrix(name, param):
                hidden.append(param.shape)
        return cls(root, blocks, hidden)

    @property
    def tensors(self) -> int:
        return len(self.root) + sum(len(block) for block in self.blocks)


def padded_shard_numel(shapes: list[torch.Size], shard: int) -> int:
    """One rank's share of a unit: FSDP2 splits each parameter's first dimension into `shard` equal,
    padded chunks."""
    return sum(math.ceil(s[0] / shard) * math.prod(s[1:]) for s in shapes)


def step_collectives(args: ModelArgs, layout: StepLayout) -> dict[tuple, list[int]]:
    """{(phase, op, dimension, dtype): [count, bytes]} for one optimizer step (see the module docstring)."""
    shapes = ParameterShapes.of(args)
    blocks = shapes.blocks
    units = [shapes.root, *blocks]
    compute, reduce = DTYPE_NAMES[layout.precision], DTYPE_NAMES[layout.reduce_dtype]
    table: dict[tuple, list[int]] = {}

    def add(phase: str, op: str, dimension: str, dtype: str, count: int, numel: int) -> None:
        row = table.setdefault((phase, op, dimension, dtype), [0, 0])
        row[0], row[1] = row[0] + count, row[1] + numel * DTYPE_BYTES[dtype]

    def gathered(unit) -> int:
        return layout.shard * padded_shard_numel(unit, layout.shard)

    freed = {"always": len(blocks), "default": len(blocks) - 1, "never": 0}[layout.reshard_after_forward]
    last = f"micro-batch {layout.micro_batches}"
    if layout.shard > 1:
        for index in range(1, layout.micro_batches + 1):
            phase = f"micro-batch {index}"
            forward = sum(gathered(unit) for unit in units)
            backward = sum(gathered(unit) for unit in blocks[:freed])
            add(phase, "all_gather", "shard", compute, len(units) + freed, forward + backward)
            if layout.reduce_grads == "every_micro" or phase == last:
                add(phase, "reduce_scatter", "shard", reduce, len(units), sum(gathered(u) for u in units))
    if layout.replicate > 1:
        sharded = sum(padded_shard_numel(unit, layout.shard) for unit in units)
        add(last, "all_reduce", "replicate", reduce, len(units), sharded)
    if layout.shard > 1:
        add("step", "all_reduce", "shard", "float32", 1, shapes.tensors)  # each parameter's partial norm
    if layout.world_size > 1:
        add("step", "all_reduce", layout.everyone, "float32", 1, 1)  # the loss
    if layout.optimizer == "muon" and layout.shard > 1:  # Newton-Schulz on whole matrices
        matrices = shapes.hidden_matrices
        add("step", "all_gather", "shard", "float32", len(matrices), sum(math.prod(s) for s in matrices))
    return table


@dataclass(frozen=True)
class Cluster:
    """Nodes of GPUs: NVLink's bandwidth per direction per GPU in GB/s, the network's per GPU in Gb/s (one
    NIC per GPU), and the compute rate: the card's peak in TFLOP/s and the MFU a step reaches."""

    nodes: int
    gpus_per_node: int
    nvlink_gbytes: float = 450.0
    link_gbits: float = 400.0
    peak_tflops: float = 989.0  # H100 SXM, dense bf16
    mfu: float = 0.4

    def link(self, layout: StepLayout, dimension: str) -> str:
        """ "nvlink" when each of the dimension's groups lies within one node, else "network". A shard group
        is `shard` consecutive ranks (one node's under torchrun); a replicate group takes one rank of each
        shard group, so it spans every rank's nodes, as the group of every rank does."""
        span = layout.shard if dimension == "shard" else layout.world_size
        return "nvlink" if span <= self.gpus_per_node and self.gpus_per_node % span == 0 else "network"


@dataclass(frozen=True)
class StepCost:
    """Per GPU and optimizer step: bytes sent over each link, the seconds each takes, and the compute's."""

    nvlink_bytes: float
    network_bytes: float
    nvlink_s: float
    network_s: float
    compute_s: float

    @property
    def comm_s(self) -> float:
        return self.nvlink_s + self.network_s

    @property
    def step_s(self) -> float:
        """With communication hidden behind compute as FSDP2 overlaps them: the longer of the two."""
        return max(self.compute_s, self.comm_s)


def step_cost(
    args: ModelArgs, layout: StepLayout, cluster: Cluster, tokens_per_gpu: int, flops_per_token: float
) -> StepCost:
    sent = {"nvlink": 0.0, "network": 0.0}
    for (_, op, dimension, _), (_, size) in step_collectives(args, layout).items():
        group = {"shard": layout.shard, "replicate": layout.replicate, "world": layout.world_size}[dimension]
        sent[cluster.link(layout, dimension)] += ring_bytes(op, size, group)
    return StepCost(
        nvlink_bytes=sent["nvlink"],
        network_bytes=sent["network"],
        nvlink_s=sent["nvlink"] / (cluster.nvlink_gbytes * 1e9),
        network_s=sent["network"] / (cluster.link_gbits * 1e9 / 8),
        compute_s=tokens_per_gpu * flops_per_token / (cluster.peak_tflops * 1e12 * cluster.mfu),
    )
