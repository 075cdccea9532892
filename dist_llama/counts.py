"""`python -m dist_llama.counts [--config FILE] [--section.key=value ...]`: parameter and FLOP table.

With no config it lists every named preset; with a config (and overrides) it describes that model
at the config's sequence length.
"""

from __future__ import annotations

import sys

from dist_llama.config import parse_cli
from dist_llama.model import PRESETS, ModelArgs, count_parameters, flops_per_token


def describe(name: str, args: ModelArgs, seq_len: int) -> str:
    counts = count_parameters(args)
    return (
        f"{name:<10} dim={args.dim:<5} layers={args.n_layers:<3} heads={args.n_heads}/{args.kv_heads:<3} "
        f"ffn={args.hidden_dim:<5} seq={seq_len:<5} non-embedding={counts['non_embedding'] / 1e6:8.2f}M "
        f"total={counts['total'] / 1e6:8.2f}M  FLOPs/token={flops_per_token(args, seq_len) / 1e9:.3f}G"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        _, config = parse_cli("counts", "Parameter and FLOP counts of a configured model.", argv)
        print(describe(config.train.name, config.model, config.data.seq_len))
        return
    for name, args in PRESETS.items():
        print(describe(name, args, args.max_seq_len))


if __name__ == "__main__":
    main()
