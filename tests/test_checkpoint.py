"""Checkpoint bookkeeping in one process: refusal of non-finite weights, atomicity, pruning, verification, and
async saves (the state copied at save time, complete only once written, a failed write reported)."""

import json
import threading

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import filesystem

from dist_llama.checkpoint import (
    META_FORMAT,
    Checkpointer,
    CheckpointError,
    CheckpointMeta,
    complete_checkpoints,
    read_meta,
    resolve_checkpoint,
    verify_checkpoint,
)
from dist_llama.model import PRESETS, Transformer


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def meta(step: int, tokens_seen: int = 0) -> CheckpointMeta:
    return CheckpointMeta(step=step, tokens_seen=tokens_seen, config={})


def small_model():
    model = Transformer(PRESETS["debug"])
    model.init_weights(0)
    return model, torch.optim.AdamW(model.parameters())


def test_non_finite_weights_are_never_written(process_group, tmp_path):
    model, optimizer = small_model()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="not finite"):
        Checkpointer(tmp_path, keep_last=2, is_main=True).save(model, optimizer, {}, meta(3))
    assert not any(tmp_path.iterdir())


def test_keep_last_prunes_and_interrupted_writes_are_never_picked(process_group, tmp_path):
    model, optimizer = small_model()
    checkpointer = Checkpointer(tmp_path, keep_last=2, is_main=True)
    for step in (1, 2, 3):
        checkpointer.save(model, optimizer, {"lanes": {}}, meta(step, tokens_seen=step))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    (tmp_path / "step_00000009.tmp").mkdir()  # a write that was killed before its rename
    assert checkpointer.find_resume("auto").name == "step_00000003"
    assert resolve_checkpoint(tmp_path).name == "step_00000003"
    saved = verify_checkpoint(tmp_path / "step_00000003")
    assert saved.step == 3 and saved.tokens_seen == 3 and saved.files


def test_truncated_file_and_bad_meta_are_detected(process_group, tmp_path):
    model, optimizer = small_model()
    checkpointer = Checkpointer(tmp_path, keep_last=3, is_main=True)
    first = checkpointer.save(model, optimizer, {}, meta(1, tokens_seen=1))
    second = checkpointer.save(model, optimizer, {}, meta(2, tokens_seen=2))
    shard = next(second.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify_checkpoint(second)
    assert checkpointer.find_resume("auto") == first
    (first / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupted"):
        checkpointer.find_resume(str(first))
    assert checkpointer.find_resume("auto") is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "elsewhere")


def test_load_restores_weights_and_reports_meta(process_group, tmp_path):
    model, optimizer = small_model()
    model(torch.randint(0, 100, (1, 8))).sum().backward()
    optimizer.step()
    saved = Checkpointer(tmp_path, keep_last=1, is_main=True).save(
        model, optimizer, {"lanes": {"0": {}}}, meta(5, tokens_seen=40)
    )
    fresh, fresh_optimizer = small_model()
    loaded = Checkpointer(tmp_path, keep_last=1, is_main=True).load(saved, fresh, fresh_optimizer)
    assert loaded.step == 5 and loaded.data_lanes == [{"lanes": {"0": {}}}]
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert json.loads((saved / "meta.json").read_text())["world_size"] == 1


def test_meta_is_versioned_and_an_unreadable_format_is_named(process_group, tmp_path):
    model, optimizer = small_model()
    saved = Checkpointer(tmp_path, keep_last=3, is_main=True).save(
        model, optimizer, {}, meta(4, tokens_seen=8)
    )
    written = json.loads((saved / "meta.json").read_text())
    assert written["format"] == META_FORMAT and written["step"] == 4
    # Written before the format was versioned: the same fields without `format`, read as they are.
    (saved / "meta.json").write_text(json.dumps({k: v for k, v in written.items() if k != "format"}))
    assert read_meta(saved).tokens_seen == 8
    (saved / "meta.json").write_text(json.dumps({**written, "format": META_FORMAT + 1}))
    with pytest.raises(
        CheckpointError, match=rf"written by a newer dist_llama \(meta.json format {META_FORMAT + 1};"
    ):
        read_meta(saved)
    (saved / "meta.json").write_text(json.dumps({k: v for k, v in written.items() if k != "tokens_seen"}))
    with pytest.raises(CheckpointError, match="lacks tokens_seen"):
        read_meta(saved)


def test_a_saved_checkpoints_meta_can_be_updated_and_still_verifies(process_group, tmp_path):
    model, optimizer = small_model()
    checkpointer = Checkpointer(tmp_path, keep_last=2, is_main=True)
    saved = checkpointer.save(model, optimizer, {}, meta(8, tokens_seen=16))
    checkpointer.update_meta(8, planned_steps=40, budget_plan={"planned_steps": 40})
    updated = verify_checkpoint(saved)
    assert (
        updated.planned_steps == 40
        and updated.budget_plan == {"planned_steps": 40}
        and updated.tokens_seen == 16
    )
    assert sorted(p.name for p in saved.iterdir() if p.name.startswith("meta")) == ["meta.json"]


@pytest.fixture
def held_writes(monkeypatch):
    """DCP's file writer waits for the event before it writes: a background write stays in flight until the
    test sets it."""
    release = threading.Event()
    write_data = filesystem._FileSystemWriter.write_data

    def held(self, plan, planner):
        assert release.wait(timeout=60), "the test never released the write"
        return write_data(self, plan, planner)

    monkeypatch.setattr(filesystem._FileSystemWriter, "write_data", held)
    return release


def test_an_async_save_copies_the_state_and_completes_only_when_written(process_group, tmp_path, held_writes):
    model, optimizer = small_model()
    checkpointer = Checkpointer(tmp_path, keep_last=3, is_main=True, async_save=True)
    held_writes.set()
    checkpointer.save(model, optimizer, {}, meta(1))
    checkpointer.wait()
    held_writes.clear()
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    checkpointer.save(model, optimizer, {}, meta(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002.tmp"]
    assert checkpointer.find_resume("auto").name == "step_00000001"
    with torch.no_grad():  # the steps after a save change the model while its write is in flight
        for parameter in model.parameters():
            parameter.add_(1.0)
    held_writes.set()
    checkpointer.wait()
    assert checkpointer.find_resume("auto").name == "step_00000002"
    fresh, fresh_optimizer = small_model()
    checkpointer.load(tmp_path / "step_00000002", fresh, fresh_optimizer)
    assert all(torch.equal(saved[name], value) for name, value in fresh.state_dict().items())
    checkpointer.close()


def test_update_meta_waits_for_the_write_of_its_checkpoint(process_group, tmp_path, held_writes):
    model, optimizer = small_model()
    checkpointer = Checkpointer(tmp_path, keep_last=3, is_main=True, async_save=True)
    checkpointer.save(model, optimizer, {}, meta(5))
    threading.Timer(0.2, held_writes.set).start()
    checkpointer.update_meta(5, val_loss=2.5)
    assert verify_checkpoint(tmp_path / "step_00000005").val_loss == 2.5
    checkpointer.wait()
    checkpointer.close()


def test_a_failed_background_write_stops_at_the_next_wait_and_is_never_resumed(
    process_group, tmp_path, monkeypatch
):
    model, optimizer = small_model()
    checkpointer = Checkpointer(tmp_path, keep_last=3, is_main=True, async_save=True)
    checkpointer.save(model, optimizer, {}, meta(1))
    checkpointer.wait()

    def full_disk(self, plan, planner):
        raise OSError("No space left on device")

    monkeypatch.setattr(filesystem._FileSystemWriter, "write_data", full_disk)
    checkpointer.save(model, optimizer, {}, meta(2))
    with pytest.raises(CheckpointError, match=r"step 2: the checkpoint's background write failed \(rank 0: "):
        checkpointer.wait()
    assert (tmp_path / "step_00000002.tmp").is_dir()
    assert checkpointer.find_resume("auto").name == "step_00000001"
    checkpointer.close()
