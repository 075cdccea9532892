"""Train-step time of our Transformer vs transformers' LlamaForCausalLM of the same shape and batch.

Forward + backward + AdamW step, measured in one process, alternating the two models (and which goes
first) each repeat so both see the same machine state; prints the median per model and the ratio (ours / HF; target <= 1.0).

    python benchmarks/bench_model_step.py --preset debug --seq-len 256 --batch 8 --repeats 10
    python benchmarks/bench_model_step.py --preset main --seq-len 1024 --batch 16 --dtype bf16 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dist_llama.devices import DTYPES, default_device
from dist_llama.interop import llama_config_dict
from dist_llama.metrics import memory_gib
from dist_llama.model import PRESETS, Transformer, causal_lm_loss


def build_models(args, device, dtype):
    model_args = dataclasses.replace(PRESETS[args.preset], max_seq_len=max(args.seq_len, PRESETS[args.preset].max_seq_len))
    ours = Transformer(model_args)
    ours.init_weights(0)
    hf_config = LlamaConfig(**llama_config_dict(model_args))
    hf_config._attn_implementation = "sdpa"
    theirs = LlamaForCausalLM(hf_config)
    theirs.load_state_dict(ours.state_dict(), strict=False)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="debug", choices=sorted(PRESETS))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default=default_device())
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    ours, theirs, model_args = build_models(args, device, dtype)
    tokens = torch.randint(0, model_args.vocab_size, (args.batch, args.seq_len + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    fused = device.type == "cuda"
    steps = {
        "ours": step_fn(ours, torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=fused), inputs, labels, False),
        "transformers": step_fn(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=fused), inputs, labels, True),
    }
    times = {name: [] for name in steps}
    for repeat in range(args.warmup + args.repeats):
        # Alternate which model goes first, so neither always runs on a cache the other warmed.
        for name, step in (list(steps.items()) if repeat % 2 == 0 else list(steps.items())[::-1]):
            elapsed = timed(step, device)
            if repeat >= args.warmup:
                times[name].append(elapsed)
    tokens_per_step = args.batch * args.seq_len
    print(f"preset={args.preset} seq_len={args.seq_len} batch={args.batch} dtype={args.dtype} device={device} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} repeats={args.repeats}")
    print(f"{'model':<14}{'median s/step':>15}{'tokens/s':>12}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<14}{median:>15.4f}{tokens_per_step / median:>12,.0f}")
    ratio = statistics.median(times["ours"]) / statistics.median(times["transformers"])
    print(f"ratio ours/transformers: {ratio:.3f} (target <= 1.0)")
    if device.type == "cuda":
        print(f"peak memory (both models in one process): {memory_gib(device):.2f} GiB")


if __name__ == "__main__":
    main()
