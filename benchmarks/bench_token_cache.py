"""The token cache: what its build costs against the bare tokenizer, what the loader gives from it against
the on-the-fly packer, and whether a training loop's thread is slowed by either running beside it.

    build    the first --docs documents of --paths (rewritten to a temporary .jsonl.zst, as bench_packer.py
             does): the bare tokenizer (bench_packer.py's: encode_batch + ids over texts in memory,
             --batch-docs a call) against build_token_cache with 1 process (this one) and with 2 (spawned):
             tokens/s, the build's time from the file (read, parse, tokenize, write) to the manifest.
    loader   PackedBatches (one rank, --rows lanes x --seq-len) from that cache and tokenizing on the fly, the
             process pinned to one core (os.sched_setaffinity) unless --cores: steady-state tokens/s
             (bench_packer.py's packer(): from 10% to 90% of the tokens taken).
    beside   a fixed CPU matmul loop (torch, one thread) standing in for the training loop's thread: each step
             is --matmuls products of 512 x 512, then one batch is taken from the loader (prefetching on its
             own thread, as in training). The matmul time per step (next() left out) with no loader, with the
             cache, and with the on-the-fly packer (each variant first in turn across repeats); ratios to no
             loader.

Every part runs --repeats times, the variants alternating within a repeat so that they share the machine's
load; the load average (`uptime`) is printed before and after.

    python benchmarks/bench_token_cache.py --docs 2000 --repeats 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one tokenizer thread: every variant tokenizes on one core

import torch  # noqa: E402
import zstandard  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_packer import bare, packer  # noqa: E402  (this folder is the script's, first on sys.path)

from dist_llama import data  # noqa: E402
from dist_llama.config import DataConfig  # noqa: E402
from dist_llama.tokenizer import load_tokenizer  # noqa: E402

DEFAULT_PATHS = [str(Path(__file__).resolve().parents[2] / "shared/data/owt/train/shard-00000.jsonl.zst")]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def build(config: DataConfig, tokenizer, folder: Path, workers: int) -> float:
    start = time.perf_counter()
    data.build_token_cache(
        dataclasses.replace(config, token_cache=str(folder)), tokenizer, workers=workers, force=True
    )
    seconds = time.perf_counter() - start
    return json.loads((folder / "manifest.json").read_text())["tokens"] / seconds


def matmul_per_step(batches, steps: int, matmuls: int) -> float:
    """Median seconds of one step's matmuls, a batch taken from `batches` (None: no loader) after each
    step."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        for _ in range(matmuls):
            torch.mm(a, b)
        times.append(time.perf_counter() - start)
        if batches is not None:
            next(batches)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", nargs="+", default=DEFAULT_PATHS)
    parser.add_argument("--docs", type=int, default=2000, help="the first documents of --paths; 0: all")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--parts", nargs="+", default=["build", "loader", "beside"], choices=["build", "loader", "beside"]
    )
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-docs", type=int, default=256)
    parser.add_argument(
        "--cache-tokens", type=int, default=40_000_000, help="tokens the cached loader is timed over"
    )
    parser.add_argument(
        "--text-tokens", type=int, default=2_000_000, help="tokens the on-the-fly packer is timed over"
    )
    parser.add_argument(
        "--cores", type=int, default=1, help="cores the loader part is pinned to; 0: no pinning"
    )
    parser.add_argument("--steps", type=int, default=60, help="beside: steps per variant")
    parser.add_argument("--matmuls", type=int, default=20, help="beside: 512 x 512 products per step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(source="offline")
    texts = data.read_documents(args.paths, limit=args.docs or None)
    print(
        f"{len(texts)} documents, {sum(len(t.encode()) for t in texts) / 1e6:.1f} MB of text "
        f"from {args.paths}; {os.cpu_count()} CPUs, RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']}"
    )
    print(f"before: {uptime()}")
    results: dict[str, list[float]] = {}

    def record(key: str, value: float, unit: str = "tokens/s") -> None:
        results.setdefault(key, []).append(value)
        print(
            f"  {key:<40} {value:>12,.3f} {unit}" if unit == "s" else f"  {key:<40} {value:>12,.0f} {unit}",
            flush=True,
        )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "subset.jsonl.zst"
        lines = "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()
        corpus.write_bytes(zstandard.ZstdCompressor(level=19).compress(lines))
        text_config = DataConfig(
            source="local",
            paths=[str(corpus)],
            seq_len=args.seq_len,
            shuffle=False,
            val_per_mille=0,
            prefetch_steps=4,
        )
        cache_config = dataclasses.replace(text_config, token_cache=str(tmp / "cache"))
        data.build_token_cache(cache_config, tokenizer, workers=1)
        for repeat in range(args.repeats):
            print(f"[{repeat}]")
            if "build" in args.parts:
                tokens, seconds = bare(tokenizer, texts, args.batch_docs, with_ids=True)
                record("bare tokenizer (1 thread)", tokens / seconds)
                record("cache build, 1 process", build(text_config, tokenizer, tmp / "build", 1))
                record("cache build, 2 processes", build(text_config, tokenizer, tmp / "build", 2))
            if "loader" in args.parts:
                affinity = os.sched_getaffinity(0)
                if args.cores:
                    os.sched_setaffinity(0, sorted(affinity)[: args.cores])
                try:
                    record(
                        "loader from the cache",
                        packer(cache_config, tokenizer, args.rows, args.cache_tokens)["steady"],
                    )
                    record(
                        "loader tokenizing on the fly",
                        packer(text_config, tokenizer, args.rows, args.text_tokens)["steady"],
                    )
                finally:
                    os.sched_setaffinity(0, affinity)
            if "beside" in args.parts:
                variants = [
                    ("matmul step, no loader", None),
                    ("matmul step, cache loader beside", cache_config),
                    ("matmul step, on-the-fly beside", text_config),
                ]
                for name, loader_config in (
                    variants[repeat % 3 :] + variants[: repeat % 3]
                ):  # each goes first in turn
                    if loader_config is None:
                        record(name, matmul_per_step(None, args.steps, args.matmuls), "s")
                        continue
                    with data.PackedBatches(loader_config, tokenizer, global_rows=args.rows) as batches:
                        record(name, matmul_per_step(batches, args.steps, args.matmuls), "s")
    print(f"after: {uptime()}")
    print(f"medians of {args.repeats}:")
    for key, values in results.items():
        runs = ", ".join(f"{v:,.3f}" for v in values)
        print(f"  {key:<40} {statistics.median(values):>14,.3f}   (runs: {runs})")
    ratios = {
        "cache build 1 process / bare": ("cache build, 1 process", "bare tokenizer (1 thread)"),
        "cache build 2 processes / bare": ("cache build, 2 processes", "bare tokenizer (1 thread)"),
        "loader cache / on the fly": ("loader from the cache", "loader tokenizing on the fly"),
        "matmul step, cache beside / none": ("matmul step, cache loader beside", "matmul step, no loader"),
        "matmul step, on the fly beside / none": ("matmul step, on-the-fly beside", "matmul step, no loader"),
    }
    for name, (top, bottom) in ratios.items():
        if top in results:
            per_run = [a / b for a, b in zip(results[top], results[bottom])]
            runs = ", ".join(f"{r:.3f}" for r in per_run)
            print(f"  {name:<40} {statistics.median(per_run):>8.3f}   (runs: {runs})")


if __name__ == "__main__":
    main()
