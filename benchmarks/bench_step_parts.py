"""Two parts of a train step, measured on their own.

`loss`: peak memory and time of one forward + backward of the main preset, the plain loss (full fp32
logits) against the chunked one (model(..., labels=..., loss_chunk_tokens=N)). Each variant runs in a
fresh process, so its peak resident memory is its own; memory is the peak during the step above the
resident memory before it.

`head`: the loss alone (hidden states -> logits -> cross-entropy, forward + backward) at the main preset's
width and vocabulary, plain against chunked, alternating, in one process.

`optimizer`: one optimizer step over the main preset's hidden matrices (attention and MLP projections,
random gradients), AdamW against Muon (ShardedMuon on plain tensors, i.e. torch.optim.Muon's update).

    python benchmarks/bench_step_parts.py loss --batch 8 --seq-len 256 --chunk 512
    python benchmarks/bench_step_parts.py head --tokens 2048 --chunk 1024 --repeats 3
    python benchmarks/bench_step_parts.py optimizer --repeats 5 [--layers 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from dist_llama.model import PRESETS, ChunkedCrossEntropy, Transformer, causal_lm_loss
from dist_llama.optim import ShardedMuon, is_hidden_matrix


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def one_loss_step(args) -> dict:
    """In this process: one forward + backward with the chosen loss; prints its time and peak memory."""
    torch.manual_seed(0)
    model = Transformer(PRESETS["main"])
    model.init_weights(0)
    tokens = torch.randint(0, model.args.vocab_size, (args.batch, args.seq_len + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    before = rss_mib()
    start = time.perf_counter()
    if args.chunk:
        loss = model(inputs, labels=labels, loss_chunk_tokens=args.chunk)
    else:
        loss = causal_lm_loss(model(inputs), labels, reduction="sum")
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "chunk": args.chunk,
        "seconds": seconds,
        "peak_above_start_mib": peak - before,
        "loss": loss.item(),
    }


def bench_loss(args) -> None:
    results = {0: [], args.chunk: []}
    for repeat in range(args.repeats):
        order = [0, args.chunk] if repeat % 2 == 0 else [args.chunk, 0]  # alternate who goes first
        for chunk in order:
            command = [
                sys.executable,
                __file__,
                "loss-once",
                f"--batch={args.batch}",
                f"--seq-len={args.seq_len}",
                f"--chunk={chunk}",
            ]
            results[chunk].append(
                json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            )
    print(
        f"main preset, batch {args.batch} x {args.seq_len} tokens, fp32 on CPU, "
        f"{args.repeats} repeats (median)"
    )
    print("| loss | step time (s) | peak memory above start (MiB) | loss value |")
    print("|---|---:|---:|---:|")
    for chunk, runs in results.items():
        label = "plain (full fp32 logits)" if chunk == 0 else f"chunked, {chunk} tokens"
        print(
            f"| {label} | {statistics.median(r['seconds'] for r in runs):.2f} | "
            f"{statistics.median(r['peak_above_start_mib'] for r in runs):,.0f} | {runs[0]['loss']:.4f} |"
        )


def bench_head(args) -> None:
    torch.manual_seed(0)
    args_main = PRESETS["main"]
    hidden = torch.randn(args.tokens, args_main.dim, requires_grad=True)
    weight = (torch.randn(args_main.vocab_size, args_main.dim) * 0.02).requires_grad_()
    labels = torch.randint(0, args_main.vocab_size, (args.tokens,))
    variants = {
        "plain": lambda: causal_lm_loss((hidden @ weight.T)[None], labels[None], reduction="sum"),
        f"chunked, {args.chunk} tokens": lambda: ChunkedCrossEntropy.apply(
            hidden, weight, labels, args.chunk, True
        ),
    }
    times = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, loss in variants.items() if repeat % 2 == 0 else reversed(variants.items()):
            start = time.perf_counter()
            loss().backward()
            times[name].append(time.perf_counter() - start)
            hidden.grad = weight.grad = None
    print(
        f"loss alone: {args.tokens} tokens x {args_main.dim} -> {args_main.vocab_size}, fp32 on CPU, "
        f"{args.repeats} repeats"
    )
    print("| loss | forward + backward (s), each repeat | median |")
    print("|---|---|---:|")
    for name, values in times.items():
        print(f"| {name} | {', '.join(f'{v:.2f}' for v in values)} | {statistics.median(values):.2f} |")


def bench_optimizer(args) -> None:
    torch.manual_seed(0)
    model = Transformer(PRESETS["main"])
    layers = tuple(f"model.layers.{i}." for i in range(args.layers or model.args.n_layers))
    hidden = [p for n, p in model.named_parameters() if is_hidden_matrix(n, p) and n.startswith(layers)]
    for p in hidden:
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {"adamw": torch.optim.AdamW(hidden, lr=1e-3), "muon": ShardedMuon(hidden, lr=0.02)}
    times = {name: [] for name in optimizers}
    for repeat in range(args.repeats + 1):
        for name, optimizer in optimizers.items() if repeat % 2 == 0 else reversed(optimizers.items()):
            start = time.perf_counter()
            optimizer.step()
            if repeat:  # the first step allocates the state
                times[name].append(time.perf_counter() - start)
    count = sum(p.numel() for p in hidden)
    print(
        f"main preset: the hidden matrices of {len(layers)} of {model.args.n_layers} blocks "
        f"({len(hidden)} matrices, {count / 1e6:.1f}M parameters), CPU, {args.repeats} steps (median)"
    )
    print("| optimizer | step time (s) |")
    print("|---|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.3f} |")
    print(f"Muon / AdamW: {statistics.median(times['muon']) / statistics.median(times['adamw']):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["loss", "loss-once", "head", "optimizer"])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument(
        "--layers", type=int, default=0, help="optimizer: the first N blocks' matrices (0: all)"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.part == "loss-once":
        print(json.dumps(one_loss_step(args)))
    elif args.part == "loss":
        bench_loss(args)
    elif args.part == "head":
        bench_head(args)
    else:
        bench_optimizer(args)


if __name__ == "__main__":
    main()
