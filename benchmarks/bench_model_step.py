"""Train-step time of our Transformer vs transformers' LlamaForCausalLM of the same shape, weights and batch.

Forward + backward + AdamW step (fused on CUDA, for both), measured in one process. Phase 1 alternates
the two eager models (and which goes first) each repeat so both see the same machine state; phase 2
times our model with per-block torch.compile (`--compile`, as `parallel.compile` does in training).
Prints, per model: median s/step, tokens/s, MFU (on a GPU with a known peak) and the step's peak memory
above what was resident before it (activations, gradients, temporaries); then the ratio ours / HF
(target <= 1.0). `--json FILE` writes the same numbers after each phase, so a run stopped during
compilation keeps the eager results.

Both models are cast whole to --dtype (pure bf16 weights and AdamW state with `--dtype bf16`, unlike
training's fp32 master weights): this compares the model code, not the training recipe.

    python benchmarks/bench_model_step.py --preset debug --seq-len 256 --batch 8 --repeats 10
    python benchmarks/bench_model_step.py --preset main --seq-len 1024 --batch 16 --dtype bf16 --compile
        --json bench.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dist_llama.devices import DTYPES, default_device
from dist_llama.interop import llama_config_dict
from dist_llama.metrics import memory_gib, peak_flops
from dist_llama.model import PRESETS, Transformer, causal_lm_loss, flops_per_token


def build_models(args, device, dtype):
    """(ours, transformers', model args): the HF model holds exactly our weights, or this raises."""
    model_args = dataclasses.replace(
        PRESETS[args.preset], max_seq_len=max(args.seq_len, PRESETS[args.preset].max_seq_len)
    )
    ours = Transformer(model_args)
    ours.init_weights(0)
    hf_config = LlamaConfig(**llama_config_dict(model_args))
    hf_config._attn_implementation = "sdpa"
    theirs = LlamaForCausalLM(hf_config)
    # strict=True: a renamed or missing parameter would leave HF with its random init and make the
    # comparison meaningless; the tensor check below also catches a tied head that failed to tie.
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours_params, their_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    if ours_params.keys() != their_params.keys():
        raise SystemExit(
            f"parameter names differ: only ours {sorted(ours_params.keys() - their_params.keys())[:4]}, "
            f"only transformers' {sorted(their_params.keys() - ours_params.keys())[:4]}"
        )
    different = [name for name, p in ours_params.items() if not torch.equal(p, their_params[name])]
    if different:
        raise SystemExit(f"transformers' model does not hold our weights after loading: {different[:4]}")
    return ours.to(device, dtype), theirs.to(device, dtype), model_args


def step_fn(model, optimizer, inputs, labels, is_hf):
    def step():
        logits = model(inputs).logits if is_hf else model(inputs)
        causal_lm_loss(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_peak_gib(step, device) -> float | None:
    """Peak memory of one step above what was allocated before it (CUDA only: the CPU has no per-step
    peak)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - resident) / 2**30


def summarize(values: list[float], tokens_per_step: int, flops: float, peak: float | None) -> dict:
    median = statistics.median(values)
    tokens_per_s = tokens_per_step / median
    return {
        "median_s_per_step": median,
        "tokens_per_s": tokens_per_s,
        "repeats": len(values),
        "mfu": flops * tokens_per_s / peak if peak else None,
    }


def print_table(record: dict) -> None:
    print(f"{'model':<22}{'median s/step':>15}{'tokens/s':>12}{'MFU':>8}{'step peak GiB':>15}")
    for name, result in record["models"].items():
        mfu = f"{100 * result['mfu']:.1f}%" if result.get("mfu") is not None else "n/a"
        memory = f"{result['step_peak_gib']:.2f}" if result.get("step_peak_gib") is not None else "n/a"
        print(
            f"{name:<22}{result['median_s_per_step']:>15.4f}{result['tokens_per_s']:>12,.0f}{mfu:>8}{memory:>15}"
        )
    for key, value in record["ratios"].items():
        print(f"ratio {key}: {value:.3f}")


def write_json(path: str | None, record: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(record, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="debug", choices=sorted(PRESETS))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default=default_device())
    parser.add_argument(
        "--compile", action="store_true", help="also time our model with per-block torch.compile"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="peak for MFU (default: from the GPU name)"
    )
    parser.add_argument("--json", default=None, help="write the results to this file (after each phase)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "error: --device cuda but no CUDA device is visible\n")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    ours, theirs, model_args = build_models(args, device, dtype)
    tokens = torch.randint(0, model_args.vocab_size, (args.batch, args.seq_len + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    fused = device.type == "cuda"
    tokens_per_step = args.batch * args.seq_len
    flops = flops_per_token(model_args, args.seq_len)
    peak = peak_flops(device, args.peak_tflops)
    record = {
        "preset": args.preset,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "flops_per_token": flops,
        "peak_flops": peak,
        "weights_checked_equal": True,
        "models": {},
        "ratios": {},
    }
    print(
        f"preset={args.preset} seq_len={args.seq_len} batch={args.batch} dtype={args.dtype} "
        f"device={record['device']} threads={record['threads']} torch={torch.__version__} "
        f"repeats={args.repeats}",
        flush=True,
    )

    compiled = copy.deepcopy(ours) if args.compile else None  # same weights, before any step changes them
    steps = {
        "ours": step_fn(
            ours, torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=fused), inputs, labels, False
        ),
        "transformers": step_fn(
            theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=fused), inputs, labels, True
        ),
    }
    times = {name: [] for name in steps}
    for repeat in range(args.warmup + args.repeats):
        # Alternate which model goes first, so neither always runs on a cache the other warmed.
        for name, step in list(steps.items()) if repeat % 2 == 0 else list(steps.items())[::-1]:
            elapsed = timed(step, device)
            if repeat >= args.warmup:
                times[name].append(elapsed)
    for name, step in steps.items():
        record["models"][name] = {
            **summarize(times[name], tokens_per_step, flops, peak),
            "step_peak_gib": step_peak_gib(step, device),
        }
    record["ratios"]["ours/transformers (s per step, target <= 1.0)"] = (
        record["models"]["ours"]["median_s_per_step"] / record["models"]["transformers"]["median_s_per_step"]
    )
    write_json(args.json, record)

    if compiled is not None:
        for block in compiled.model.layers:
            block.compile()  # in place, as parallel.compile does in training
        step = step_fn(
            compiled, torch.optim.AdamW(compiled.parameters(), lr=1e-4, fused=fused), inputs, labels, False
        )
        compile_s = timed(step, device)  # the first call compiles
        for _ in range(args.warmup - 1):
            step()
        values = [timed(step, device) for _ in range(args.repeats)]
        record["models"]["ours_compiled"] = {
            **summarize(values, tokens_per_step, flops, peak),
            "step_peak_gib": step_peak_gib(step, device),
            "first_step_s (compiles)": compile_s,
        }
        record["ratios"]["ours_compiled/transformers (s per step)"] = (
            record["models"]["ours_compiled"]["median_s_per_step"]
            / record["models"]["transformers"]["median_s_per_step"]
        )
        write_json(args.json, record)

    print_table(record)
    if device.type == "cuda":
        print(f"process peak memory (all models in one process): {memory_gib(device):.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())
