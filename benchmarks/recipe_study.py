"""The optimizer/schedule study behind configs/speedrun.yaml: one small model, equal tokens, one change at a
time.

Every run trains the same model from the same seed on the same local shards, and is scored on the same
held-out documents (tiny.jsonl shares none with the shards). Runs already finished are read, not redone,
so the command can be repeated (or extended with more --runs) cheaply.

    python benchmarks/recipe_study.py --out docs/report/recipe_study
    python benchmarks/recipe_study.py --out docs/report/recipe_study --runs adamw_cosine muon_wsd --steps 20
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from dist_llama.report import read_metrics

REPO = Path(__file__).resolve().parents[1]

# One small model for every run: 4 blocks of width 128 at 256 tokens (the 32k-token vocabulary makes
# even this 9.0M-parameter model mostly embedding and head: 0.8M non-embedding parameters).
MODEL = [
    "--model.dim=128",
    "--model.n_layers=4",
    "--model.n_heads=4",
    "--model.n_kv_heads=null",
    "--model.max_seq_len=256",
    "--data.seq_len=256",
]
WSD = ["--optim.schedule=wsd", "--optim.decay_fraction=0.3", "--optim.min_lr_ratio=0.0"]
RUNS = {
    # today's recipe (configs/debug.yaml: AdamW, cosine to 0.1 x lr) and a sweep around its rate
    "adamw_cosine": ["--optim.lr=3e-3"],
    "adamw_cosine_lr1.5e-3": ["--optim.lr=1.5e-3"],
    "adamw_cosine_lr6e-3": ["--optim.lr=6e-3"],
    # one change: the schedule
    "adamw_wsd": ["--optim.lr=3e-3", *WSD],
    # one more change: Muon for the hidden matrices (AdamW keeps embeddings, head and norms at 3e-3)
    "muon_wsd": ["--optim.name=muon", "--optim.muon_lr=0.02", "--optim.lr=3e-3", *WSD],
    "muon_wsd_lr0.01": ["--optim.name=muon", "--optim.muon_lr=0.01", "--optim.lr=3e-3", *WSD],
    "muon_wsd_lr0.04": ["--optim.name=muon", "--optim.muon_lr=0.04", "--optim.lr=3e-3", *WSD],
}
# What a 2-core CPU affords in about an hour: the three recipes and one step of the sweep around each
# optimizer.
DEFAULT_RUNS = ["adamw_cosine", "adamw_cosine_lr6e-3", "adamw_wsd", "muon_wsd", "muon_wsd_lr0.04"]


def train(name: str, extra: list[str], args) -> None:
    command = [
        sys.executable,
        "-m",
        "dist_llama.train",
        "--config",
        str(REPO / "configs/debug.yaml"),
        *MODEL,
        "--data.source=local",
        f"--data.paths=[{args.data}]",
        f"--data.val_paths=[{args.val}]",
        f"--data.val_docs={args.val_docs}",
        f"--train.run_root={args.out / 'runs'}",
        f"--train.name={name}",
        f"--train.steps={args.steps}",
        f"--train.tokens_per_step={args.tokens_per_step}",
        f"--optim.warmup_steps={args.steps // 6}",
        f"--train.eval_every={args.eval_every}",
        "--train.eval_batches=1",
        "--train.log_every=10",
        f"--checkpoint.every={args.steps}",
        "--checkpoint.keep_last=1",
        "--logging.progress=false",
        "--logging.tensorboard=false",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, cwd=REPO, env=env, check=True)


def write_results(names: list[str], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        "| run | changes from debug.yaml + the study model | final held-out loss | best held-out loss "
        "| final train loss |",
        "|---|---|---:|---:|---:|",
    ]
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for name in names:
        train_records, val_records = read_metrics(args.out / "runs" / name)
        rows.append(
            f"| {name} | `{' '.join(RUNS[name])}` | {val_records[-1]['val_loss']:.4f} | "
            f"{min(r['val_loss'] for r in val_records):.4f} | {train_records[-1]['loss']:.4f} |"
        )
        axis.plot(
            [r["tokens_seen"] / 1e6 for r in val_records],
            [r["val_loss"] for r in val_records],
            label=name,
            marker=".",
        )
    axis.set_xlabel("tokens seen (millions)")
    axis.set_ylabel("held-out loss")
    axis.set_title(f"Recipe study: {args.steps} steps x {args.tokens_per_step:,} tokens, same seed and data")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    low = min(min(line.get_ydata()) for line in axis.get_lines())
    axis.set_ylim(low - 0.1, low + 2.5)
    figure.tight_layout()
    figure.savefig(args.out / "recipe_study.png", dpi=120)
    (args.out / "recipe_study.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--tokens-per-step", type=int, default=2048)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--val-docs", type=int, default=32)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/owt/train/*.jsonl.zst"))
    parser.add_argument("--val", default=str(REPO.parent / "shared/data/owt/tiny.jsonl"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.runs:
        train(name, RUNS[name], args)
    write_results(args.runs, args)


if __name__ == "__main__":
    main()
