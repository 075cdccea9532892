"""Shared test fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder beside the repository root (../shared/data)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.fail(f"shared data folder {path} is missing; these tests need the shared/ folder beside the repo root")
    return path


REPO_ROOT = Path(__file__).resolve().parents[1]


def _write_dcp_checkpoint(run_dir: Path, overrides: tuple[str, ...], seed: int, step: int) -> Path:
    """One Checkpointer.save of a debug-size model after one AdamW step, from a 1-process gloo group."""
    import torch
    import torch.distributed as dist

    from dist_llama.checkpoint import Checkpointer
    from dist_llama.config import load_config, to_dict
    from dist_llama.model import Transformer, causal_lm_loss

    config = load_config(REPO_ROOT / "configs" / "debug.yaml", ["--data.tokenizer=offline", *overrides])
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized; the checkpoint fixture makes its own")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = Transformer(config.model)
        model.init_weights(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tokens = torch.randint(0, config.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(seed))
        loss = causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        optimizer.step()
        extra = {"tokens_seen": step * config.train.tokens_per_step, "config": to_dict(config),
                 "final_loss": loss.item(), "val_loss": loss.item() + 0.25}
        Checkpointer(run_dir / "checkpoints", keep_last=2, is_main=True).save(step, model, optimizer, data_state={},
                                                                              extra=extra)
    finally:
        dist.destroy_process_group()
    return run_dir


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """Factory: make_checkpoint(*overrides, seed=0, step=7) -> a run directory holding checkpoints/step_N.

    A small DCP checkpoint written by checkpoint.Checkpointer (model + AdamW state + meta.json with the
    resolved config of configs/debug.yaml, tokenizer "offline", plus `--section.key=value` overrides),
    without the trainer. Made once per distinct arguments per session.
    """
    made: dict = {}

    def make(*overrides: str, seed: int = 0, step: int = 7) -> Path:
        key = (overrides, seed, step)
        if key not in made:
            made[key] = _write_dcp_checkpoint(tmp_path_factory.mktemp("run"), overrides, seed, step)
        return made[key]

    return make
