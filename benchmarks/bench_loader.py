"""The training loader's throughput for a config: one rank's PackedBatches, timed over whole batches.

    python benchmarks/bench_loader.py --config configs/speedrun.yaml [--seconds 5] [--json OUT]
        [--section.key=value ...]

The batches are those the trainer would take (data.* of the config, its global batch as one rank's rows):
from data.token_cache when the config names one, else tokenized on the fly. The first batch (opening the
source, the first tokenizer call) is left out; then batches are taken for --seconds. Put it beside the
model's tokens/s (benchmarks/bench_model_step.py) to see which of the two limits training; the GPU session's
bench stage does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_llama.config import load_config  # noqa: E402
from dist_llama.data import PackedBatches  # noqa: E402
from dist_llama.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="time spent taking batches after the first"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the result here too")
    args, overrides = parser.parse_known_args()
    config = load_config(args.config, overrides)
    rows = config.train.tokens_per_step // config.data.seq_len
    data = PackedBatches(
        config.data, load_tokenizer(config.data.tokenizer), global_rows=rows, seed=config.train.seed
    )
    try:
        next(data)
        batches, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            next(data)
            batches += 1
        elapsed = time.perf_counter() - start
    finally:
        data.close()
    result = {
        "source": "token cache" if config.data.token_cache else "on the fly",
        "batches": batches,
        "tokens_per_batch": rows * config.data.seq_len,
        "seconds": elapsed,
        "tokens_per_s": batches * rows * config.data.seq_len / elapsed,
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
