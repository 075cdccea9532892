"""Sharded training checkpoints with torch.distributed.checkpoint (DCP).

Layout of run_dir/checkpoints/step_00000100/: DCP's `.metadata` and `__R_0.distcp` shards (model and optimizer
through the state-dict APIs, so wrapper prefixes never reach the files), and `meta.json`: a CheckpointMeta
(step, tokens seen, the resolved config, the time budget's plan, the data-loader state of every lane, RNG
states, and a sha256 of every file), versioned by its `format`. A checkpoint is written under `step_X.tmp` and
renamed when complete, so an interrupted write is never picked; the checksums catch files damaged afterwards.
DCP reshards on load: a checkpoint from N ranks resumes on M ranks.

With checkpoint.async_save the save returns once the model and optimizer state are copied out of the model's
memory (DCP's async save, on a gloo group of the checkpoints' own, so it runs beside NCCL training too); the
files, meta.json and the rename follow in the background. One save is in flight at most: the next save, a
stop and the end of training wait for it (`Checkpointer.wait`), and a write that failed stops every rank
there with a CheckpointError. Until its rename the checkpoint is a `.tmp` folder, never resumed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from dist_llama.checkpoint_folders import META_FILE, PREFIX, checkpoint_name, complete_checkpoints
from dist_llama.checkpoint_writes import InFlight, ReusedCpuCopy
from dist_llama.parallel import all_gather_objects, broadcast_object

log = logging.getLogger(__name__)

# The shape of meta.json. 0: written before it was versioned (the same fields as 1, no `format`). A change of
# its fields raises this, and CheckpointMeta.from_json learns to read the older shapes.
META_FORMAT = 3  # 3: the precision the run computes in; 2: fp16's loss scaler and overflow count (older read
# as the newest without them)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, corrupted or incompatible."""


@dataclass
class CheckpointMeta:
    """What meta.json holds beside the DCP shards. The trainer fills the run's part; Checkpointer.save adds
    the data lanes, RNG states, world size and file checksums, which every rank contributes."""

    step: int
    tokens_seen: int
    config: dict  # the resolved run config (config.to_dict)
    bad_steps: int = 0
    overflow_steps: int = 0  # fp16 steps skipped for an overflow
    # Fp16's loss scaler state (scale, growth count), so a resume continues it
    loss_scaler: dict | None = None
    # What the run computes in: parallel.mixed_precision with `auto` resolved when the run started, which a
    # resume keeps (null in checkpoints older than format 3)
    precision: str | None = None
    final_loss: float | None = None  # the last logged training loss
    val_loss: float | None = None
    budget_plan: dict | None = None  # the time budget's plan, kept by a resume
    planned_steps: int | None = None  # the step count that plan set (null without a budget)
    recipe_changes: list[dict] = field(default_factory=list)  # keys changed on purpose at a resume
    data_lanes: list[dict] = field(default_factory=list)  # every rank's loader state (data.merge_states)
    rng: list[dict] = field(default_factory=list)  # every rank's RNG states
    world_size: int = 1
    files: dict[str, str] = field(default_factory=dict)  # sha256 of every file of the checkpoint
    format: int = META_FORMAT

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=_json_default)

    @classmethod
    def from_json(cls, values: dict, where: Path) -> CheckpointMeta:
        version = values.get("format", 0)
        if version > META_FORMAT:
            raise CheckpointError(
                f"{where} was written by a newer dist_llama (meta.json format {version}; this "
                f"one reads formats up to {META_FORMAT}): update dist_llama to use it"
            )
        known = {item.name for item in dataclasses.fields(cls)}
        missing = [
            item.name
            for item in dataclasses.fields(cls)
            if item.default is dataclasses.MISSING
            and item.default_factory is dataclasses.MISSING
            and item.name not in values
        ]
        unknown = sorted(set(values) - known)
        if missing or unknown:
            problem = f"lacks {', '.join(missing)}" if missing else f"has unknown fields {', '.join(unknown)}"
            raise CheckpointError(
                f"{where} {problem} (meta.json format {version}, this dist_llama reads "
                f"{META_FORMAT}): it was not written by a dist_llama trainer this one can resume"
            )
        return cls(**{**values, "format": META_FORMAT})


def _files_digest(folder: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != META_FILE:
            sha = hashlib.sha256()
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 22), b""):
                    sha.update(chunk)
            digests[path.name] = sha.hexdigest()
    return digests


def read_meta(checkpoint: Path) -> CheckpointMeta:
    meta_path = checkpoint / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint: {META_FILE} is missing")
    try:
        values = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{meta_path} is corrupted ({error}); use an earlier checkpoint") from None
    return CheckpointMeta.from_json(values, meta_path)


def verify_checkpoint(checkpoint: Path) -> CheckpointMeta:
    """Compare every file with the checksums written at save time; returns the metadata."""
    meta = read_meta(checkpoint)
    expected = meta.files
    actual = _files_digest(checkpoint)
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise CheckpointError(f"{checkpoint} is incomplete: missing {', '.join(missing)}")
    damaged = sorted(name for name in expected if actual[name] != expected[name])
    if damaged:
        raise CheckpointError(f"{checkpoint} is corrupted: checksum mismatch in {', '.join(damaged)}")
    return meta


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run directory / checkpoints folder for its latest complete checkpoint."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    for folder in (path / "checkpoints", path):
        found = complete_checkpoints(folder)
        if found:
            return found[-1]
    raise CheckpointError(
        f"no complete checkpoint at {path}: expected a {PREFIX}N folder with {META_FILE}, "
        "or a run directory holding checkpoints/"
    )


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in checkpoint metadata")


def params_are_finite(model: torch.nn.Module) -> bool:
    local_ok = all(
        bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters()
    )
    # On the parameters' device: NCCL reduces CUDA tensors only.
    flag = torch.tensor([0.0 if local_ok else 1.0], device=next(model.parameters()).device)
    dist.all_reduce(flag)
    return flag.item() == 0


class Checkpointer:
    def __init__(
        self,
        folder: Path,
        keep_last: int,
        is_main: bool,
        async_save: bool = False,
        write_timeout_s: float = 600,
    ):
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.is_main = is_main
        self.async_save = async_save
        self.write_timeout_s = write_timeout_s  # how long the ranks wait for each other's background write
        self.in_flight: InFlight | None = None
        # Made at the first async save: the writes' own gloo group, the thread that waits for a write and then
        # digests and renames, and the CPU copy the writes read
        self._group = self._finisher = self._stager = None

    @classmethod
    def of(cls, config, is_main: bool) -> Checkpointer:
        """The run's checkpointer (config.Config): run_dir/checkpoints, as checkpoint.* says. A background
        write waits for the other ranks' as long as loading a checkpoint may (parallel.init_timeout_s)."""
        saving = config.checkpoint
        folder = config.run_dir / "checkpoints"
        return cls(folder, saving.keep_last, is_main, saving.async_save, config.parallel.init_timeout_s)

    def save(self, model, optimizer, data_state: dict, meta: CheckpointMeta) -> Path:
        """Collective: every rank calls it with this rank's loader state; rank 0 writes meta.json. With
        async_save it returns once the state is copied out of the model's memory, and the checkpoint is
        complete later (`wait`)."""
        started = time.perf_counter()
        self.wait()  # at most one save in flight
        step = meta.step
        if not params_are_finite(model):
            raise CheckpointError(
                f"step {step}: model weights are not finite; refusing to write a checkpoint"
            )
        final = self.folder / checkpoint_name(step)
        staging = final.with_name(final.name + ".tmp")
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        # Gathered now, on the default group: the loader and RNG states of this step, not of a later one.
        meta = dataclasses.replace(
            meta,
            data_lanes=all_gather_objects(data_state),
            rng=all_gather_objects(rng_state()),
            world_size=dist.get_world_size(),
        )
        if not self.async_save:
            dcp.save(state, checkpoint_id=staging)
            self._complete(meta, staging, final)
            dist.barrier()
            return final
        self._start_async()
        written = dcp.async_save(  # the copy is done when it returns, with the write's future
            state, checkpoint_id=staging, process_group=self._group, async_stager=self._stager
        )
        completion = self._finisher.submit(self._finish, written, meta, staging, final, started)
        self.in_flight = InFlight(step, staging, time.perf_counter() - started, completion)
        return final

    def _start_async(self) -> None:
        if self._group is not None:
            return
        # Every rank reaches its first async save together. A group's timeout is fixed when it is made:
        # without one, gloo's 30 minutes would keep the other ranks waiting that long for a dead rank's write.
        self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.write_timeout_s))
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint_finisher")
        self._stager = ReusedCpuCopy()

    def _finish(self, written: Future, meta: CheckpointMeta, staging: Path, final: Path, started: float):
        written.result()  # rank 0's DCP save returns once every rank's files are written
        self._complete(meta, staging, final)
        return time.perf_counter() - started

    def _complete(self, meta: CheckpointMeta, staging: Path, final: Path) -> None:
        """Rank 0: meta.json with the checksums, then the rename that makes the checkpoint complete."""
        if not self.is_main:
            return
        meta = dataclasses.replace(meta, files=_files_digest(staging))
        (staging / META_FILE).write_text(meta.to_json())
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        self._prune()

    def wait(self) -> None:
        """Collective: the save in flight, if any, is complete on every rank when this returns. A write that
        failed on any rank raises CheckpointError on all of them, naming the step (its `.tmp` folder is
        left, and never resumed)."""
        pending, self.in_flight = self.in_flight, None
        if pending is None:  # saves are collective: the ranks agree on whether one is in flight
            return
        error = pending.completion.exception()
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(
            errors, None if error is None else f"{type(error).__name__}: {error}", self._group
        )
        failed = [f"rank {rank}: {text}" for rank, text in enumerate(errors) if text is not None]
        if failed:
            raise CheckpointError(
                f"step {pending.step}: the checkpoint's background write failed ({'; '.join(failed)}); "
                f"{pending.staging.name} is incomplete, and a resume takes the checkpoint before it"
            )
        log.info(
            "checkpoint %s written: the loop waited %.2f s, and it was complete %.2f s after the save began",
            checkpoint_name(pending.step),
            pending.stall_s,
            pending.completion.result(),
        )

    def close(self) -> None:
        """This rank's write in flight finishes before the process group goes (no collective: the run may
        be stopping on an error); a failure is logged, the checkpoint left incomplete."""
        pending, self.in_flight = self.in_flight, None
        if pending is not None and pending.completion.exception() is not None:
            log.warning(
                "checkpoint %s was not completed: %s", pending.staging, pending.completion.exception()
            )
        if self._finisher is not None:
            self._finisher.shutdown()
            self._stager.close()

    def update_meta(self, step: int, **fields) -> None:
        """Rank 0 rewrites fields of a saved checkpoint's meta.json (outside its checksums), through a file
        renamed into place, so an interrupted write leaves the old meta.json."""
        if not self.is_main:
            return
        if self.in_flight is not None and self.in_flight.step == step:
            # Its meta.json exists once the write is done. A write that failed is left to wait(), which stops
            # every rank; raised here, it would stop rank 0 alone.
            if self.in_flight.completion.exception() is not None:
                return
        path = self.folder / checkpoint_name(step) / META_FILE
        meta = dataclasses.replace(read_meta(path.parent), **fields)
        staging = path.with_name(META_FILE + ".tmp")
        staging.write_text(meta.to_json())
        staging.replace(path)

    def _prune(self) -> None:
        for old in complete_checkpoints(self.folder)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def find_resume(self, resume: str) -> Path | None:
        """The checkpoint to resume from: `none`, `auto` (latest intact, falling back past damaged ones), or a
        path."""
        if resume == "none":
            return None
        if resume != "auto":
            checkpoint = resolve_checkpoint(resume)
            self._verify_everywhere(checkpoint)
            return checkpoint
        for checkpoint in reversed(complete_checkpoints(self.folder)):
            try:
                self._verify_everywhere(checkpoint)
                return checkpoint
            except CheckpointError as error:
                log.warning("skipping damaged checkpoint: %s", error)
        return None

    def _verify_everywhere(self, checkpoint: Path) -> None:
        # Rank 0 reads every file once; the others take its verdict, so all ranks pick the same checkpoint.
        verdict = None
        if self.is_main:
            try:
                verify_checkpoint(checkpoint)
            except CheckpointError as error:
                verdict = str(error)
        verdict = broadcast_object(verdict)
        if verdict is not None:
            raise CheckpointError(verdict)

    def load(self, checkpoint: Path, model, optimizer) -> CheckpointMeta:
        """Restore model and optimizer shards (resharding as needed); returns meta.json's contents."""
        meta = read_meta(checkpoint)
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        try:
            dcp.load(state, checkpoint_id=checkpoint)
        except Exception as error:  # DCP raises many types for unreadable or mismatched files
            raise CheckpointError(f"cannot load {checkpoint}: {error}") from error
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if meta.world_size == dist.get_world_size():
            set_rng_state(meta.rng[dist.get_rank()])
        return meta


def load_model_weights(checkpoint: str | Path, model) -> CheckpointMeta:
    """Weights only, for a fine-tune starting from a trained model (fresh optimizer and schedule)."""
    checkpoint = resolve_checkpoint(checkpoint)
    meta = verify_checkpoint(checkpoint)
    state = {"model": get_model_state_dict(model)}
    try:
        dcp.load(state, checkpoint_id=checkpoint)
    except Exception as error:
        raise CheckpointError(f"cannot load model weights from {checkpoint}: {error}") from error
    set_model_state_dict(model, state["model"])
    return meta


def load_full_model_state(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """The full (unsharded) model state dict of a checkpoint, on CPU, with no process group."""
    checkpoint = resolve_checkpoint(checkpoint)
    meta = verify_checkpoint(checkpoint)
    try:
        metadata = dcp.FileSystemReader(checkpoint).read_metadata()
        # Empty tensors of the stored shapes for the "model" entries only (the optimizer's are twice as
        # large and not needed); dcp.load fills them in place.
        model_state = {}
        for key, item in metadata.state_dict_metadata.items():
            path = metadata.planner_data.get(key, ())
            if path[:1] == ("model",) and isinstance(item, TensorStorageMetadata):
                model_state[".".join(map(str, path[1:]))] = torch.empty(
                    item.size, dtype=item.properties.dtype
                )
        if not model_state:
            raise CheckpointError(f"{checkpoint} holds no model weights")
        with warnings.catch_warnings():  # "no process group: assuming a single process" is the intent here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": model_state}, checkpoint_id=checkpoint, no_dist=True)
    except CheckpointError:
        raise
    except Exception as error:  # DCP raises many types for unreadable files
        raise CheckpointError(f"cannot read model weights from {checkpoint}: {error}") from error
    return model_state, meta
