"""Counting the collectives a piece of training issues: which operation, over which ranks (a mesh dimension),
in what dtype and how many bytes.

While `count_collectives()` is open, torch.distributed's collective functions (FSDP2's all-gathers and
reduce-scatters, HSDP's all-reduce, the trainer's loss sum, the fp16 scaler's overflow flag) and the
functional collectives DTensor issues (the gradient norm's sum, Muon's whole-matrix gathers) are wrapped,
and each call is recorded once (a wrapped function that calls another is one collective). Their names
differ by torch version: FSDP2 calls `all_gather_single` / `reduce_scatter_single` in torch 2.13 and
`all_gather_into_tensor` / `reduce_scatter_tensor` in 2.11; whichever exist are wrapped. torch's own
CommDebugMode would count them, but it raised IndexError in its module hook on an FSDP2 model (torch 2.13).

Bytes are the collective's whole buffer, as nccl-tests count a collective's size: the gathered output of an
all-gather, the input of a reduce-scatter, the tensor of an all-reduce or broadcast. Over a ring of n ranks
each rank sends (n - 1) / n of that for an all-gather or a reduce-scatter and 2 (n - 1) / n for an
all-reduce (`ring_bytes`). dist_llama/comm_model.py reproduces `bytes` exactly (tests/test_hsdp.py).
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# (function name, operation, which argument holds the tensor counted, whether its size is per rank)
_DIST = (
    ("all_gather_single", "all_gather", "output_tensor", False),
    ("all_gather_into_tensor", "all_gather", "output_tensor", False),
    ("reduce_scatter_single", "reduce_scatter", "input", False),
    ("reduce_scatter_tensor", "reduce_scatter", "input", False),
    ("all_reduce", "all_reduce", "tensor", False),
    ("broadcast", "broadcast", "tensor", False),
    ("all_gather", "all_gather", "tensor", True),
)
_FUNCTIONAL = (
    ("all_gather_single", "all_gather", "self", True),
    ("all_gather_tensor", "all_gather", "self", True),
    ("reduce_scatter_single", "reduce_scatter", "self", False),
    ("reduce_scatter_tensor", "reduce_scatter", "self", False),
    ("all_reduce", "all_reduce", "self", False),
)
RING_SHARE = {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 2, "broadcast": 1}


@dataclass(frozen=True)
class Collective:
    op: str  # all_gather | reduce_scatter | all_reduce | broadcast
    ranks: tuple[int, ...]  # the group's global ranks
    dtype: str  # e.g. "float32"
    bytes: int  # the whole buffer (see the module docstring)
    phase: str = ""  # what the counter was told was running

    @property
    def group_size(self) -> int:
        return len(self.ranks)

    @property
    def wire_bytes(self) -> float:
        """What each rank sends over a ring of the group's ranks."""
        return ring_bytes(self.op, self.bytes, self.group_size)


def ring_bytes(op: str, size: float, ranks: int) -> float:
    """What each of `ranks` ranks sends over a ring for a collective of `size` bytes (the whole buffer)."""
    return RING_SHARE[op] * size * (ranks - 1) / ranks


class CollectiveCounter:
    """The collectives recorded while count_collectives() is open, each tagged with the phase it ran in."""

    def __init__(self):
        self.records: list[Collective] = []
        self.phase = ""
        self._depth = threading.local()

    @contextmanager
    def in_phase(self, name: str):
        before, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = before

    def table(self, dimensions: dict[tuple[int, ...], str] | None = None) -> dict[tuple, list[int]]:
        """{(phase, op, dimension, dtype): [count, bytes]}; a group is named by `dimensions`
        (mesh_dimensions), else "N ranks"."""
        dimensions = dimensions or {}
        table: dict[tuple, list[int]] = {}
        for record in self.records:
            dimension = dimensions.get(record.ranks, f"{record.group_size} ranks")
            row = table.setdefault((record.phase, record.op, dimension, record.dtype), [0, 0])
            row[0] += 1
            row[1] += record.bytes
        return table

    def counts(self) -> Counter:
        """{(phase, op): calls}."""
        return Counter((record.phase, record.op) for record in self.records)

    def _wrap(self, function, op: str, counted: str, per_rank: bool, functional: bool):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            depth = getattr(self._depth, "value", 0)
            if depth == 0:
                self.records.append(
                    self._record(signature.bind(*args, **kwargs), op, counted, per_rank, functional)
                )
            self._depth.value = depth + 1
            try:
                return function(*args, **kwargs)
            finally:
                self._depth.value = depth

        return wrapper

    def _record(self, bound, op: str, counted: str, per_rank: bool, functional: bool) -> Collective:
        arguments = bound.arguments
        group = arguments.get("group")
        if functional:  # a mesh and dimension, a group name or a list of ranks: a process group
            group = dist.distributed_c10d._resolve_process_group(funcol._resolve_group_name(group))
        ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
        tensor: torch.Tensor = arguments[counted]
        size = tensor.numel() * tensor.element_size() * (len(ranks) if per_rank else 1)
        return Collective(op, ranks, str(tensor.dtype).removeprefix("torch."), size, self.phase)


@contextmanager
def count_collectives():
    """Record every collective issued inside the block (see the module docstring); yields the counter."""
    counter = CollectiveCounter()
    originals = []
    for module, functions, functional in ((dist, _DIST, False), (funcol, _FUNCTIONAL, True)):
        for name, op, counted, per_rank in functions:
            if hasattr(module, name):
                original = getattr(module, name)
                originals.append((module, name, original))
                setattr(module, name, counter._wrap(original, op, counted, per_rank, functional))
    try:
        yield counter
    finally:
        for module, name, original in reversed(originals):
            setattr(module, name, original)


def mesh_dimensions(mesh) -> dict[tuple[int, ...], str]:
    """{this rank's group on each mesh dimension: the dimension's name}, and every rank as "world" unless a
    dimension spans them all (plain FSDP's shard dimension)."""
    names = {}
    for index, name in enumerate(mesh.mesh_dim_names or range(mesh.ndim)):
        names[tuple(dist.get_process_group_ranks(mesh.get_group(index)))] = str(name)
    names.setdefault(tuple(range(dist.get_world_size())), "world")
    return names
