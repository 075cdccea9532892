"""Shared test fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder beside the repository root (../shared/data)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.fail(
            f"shared data folder {path} is missing; these tests need the shared/ folder beside the repo root"
        )
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, shared_data) -> tuple[Path, Path]:
    """Training and held-out .jsonl files for the tiny distributed runs: 300 and 20 documents of
    tiny.jsonl."""
    folder = tmp_path_factory.mktemp("corpus")
    lines = (shared_data / "owt/tiny.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:300]) + "\n")
    (folder / "val.jsonl").write_text("\n".join(lines[-20:]) + "\n")
    return folder / "train.jsonl", folder / "val.jsonl"


REPO_ROOT = Path(__file__).resolve().parents[1]


def _write_dcp_checkpoint(run_dir: Path, overrides: tuple[str, ...], seed: int, step: int) -> Path:
    """One Checkpointer.save of a debug-size model after one AdamW step, from a 1-process gloo group."""
    import torch
    import torch.distributed as dist

    from dist_llama.checkpoint import Checkpointer, CheckpointMeta
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
        tokens = torch.randint(
            0, config.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(seed)
        )
        loss = causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        optimizer.step()
        meta = CheckpointMeta(
            step=step,
            tokens_seen=step * config.train.tokens_per_step,
            config=to_dict(config),
            final_loss=loss.item(),
            val_loss=loss.item() + 0.25,
        )
        Checkpointer(run_dir / "checkpoints", keep_last=2, is_main=True).save(model, optimizer, {}, meta)
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


@pytest.fixture(scope="session")
def tiny_hf_model_dir(tmp_path_factory) -> Path:
    """A stock LlamaForCausalLM folder (random weights from seed 0, 4.2M parameters, mostly the 32k
    embeddings) with the offline Mistral tokenizer: an evaluation target that needs no release code."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dist_llama.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny_hf_model")
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights without moving other tests' random stream
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
    load_tokenizer("offline").save_pretrained(folder)
    return folder


def train_on_two_nodes(args: list[str], nproc_per_node: int, env: dict, rdzv_id: str) -> str:
    """The trainer under two torchrun agents (--nnodes=2) meeting on 127.0.0.1, as slurm/train.sbatch launches
    one per node; returns their output, both agents having exited 0."""
    import os
    import subprocess
    import sys

    port = 29000 + os.getpid() % 1000
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={rank}",
                f"--nproc_per_node={nproc_per_node}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                f"--rdzv_id={rdzv_id}",
                "-m",
                "dist_llama.train",
                *args,
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert all(agent.returncode == 0 for agent in agents), "\n".join(output[-3000:] for output in outputs)
    return "\n".join(outputs)
