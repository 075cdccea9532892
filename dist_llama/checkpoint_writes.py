"""What an async checkpoint save needs beside the Checkpointer (checkpoint.py): the reused CPU copy the
background write reads, and the record of the write in flight."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.staging import AsyncStager


class ReusedCpuCopy(AsyncStager):
    """Copies the state for an async save into CPU buffers made once and reused, so no later save allocates
    them again: DCP's default stager allocates at every save, and in torch 2.11 one kept across saves fails at
    its second; BlockingAsyncStager's cache is pinned, which needs CUDA. A GPU state's buffers are pinned and
    shared (registered with CUDA at their exact size, as DCP's own stager does, not rounded up by the pinned
    allocator). A write reads the buffers until it is done, and the next copy waits for it (one save in flight
    at most)."""

    # The copy is blocking (_copy_state_dict's non_blocking=False): done when stage returns, so the write's
    # thread reads finished buffers without a stream synchronisation.
    _synchronize_after_execute = False

    def __init__(self):
        self.buffers = self.layout = None

    def stage(self, state_dict: dict) -> dict:
        layout = list(_tensor_layout(state_dict))  # a state that does not fit the buffers gets new ones
        if layout != self.layout:
            on_gpu = any(item[-1] == "cuda" for item in layout)
            self.buffers = _create_cpu_state_dict(state_dict, pin_memory=on_gpu, share_memory=on_gpu)
            self.layout = layout
        return _copy_state_dict(state_dict, self.buffers)

    def close(self) -> None:
        self.buffers = self.layout = None


def _tensor_layout(value, path: tuple = ()):
    """Every leaf's path, and a tensor's shape, dtype and device type: what the reused buffers must match."""
    if isinstance(value, torch.Tensor):
        yield path, value.shape, value.dtype, value.device.type
    elif isinstance(value, (dict, list, tuple)):
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            yield from _tensor_layout(item, (*path, key))
    else:
        yield path, type(value).__name__


@dataclass
class InFlight:
    """A checkpoint written in the background: `completion` gives the seconds from the save's start to this
    rank's files written (on rank 0: to the rename)."""

    step: int
    staging: Path
    stall_s: float  # how long the save held the training loop (the copy out of the model's memory)
    completion: Future
