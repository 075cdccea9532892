"""`python -m dist_llama.counts [--config FILE] [--section.key=value ...]`: parameter and FLOP table.

With no config it lists every named preset; with a config (and overrides) it describes that model
at the config's sequence length.

`--nodes 1,2,4 [--gpus-per-node 8] [--link-gbps 400] [--nvlink-gbytes 450] [--mfu 0.4] [--peak-tflops 989]`
adds the communication model (comm_model.py): per optimizer step of the configured batch
(train.tokens_per_step over all GPUs), the bytes each GPU sends over NVLink and over the network under
plain FSDP over every GPU and under HSDP (shard within a node, replicate across nodes), the time each
takes at those bandwidths against the compute time at that MFU, and the layout with the shorter step.
"""

from __future__ import annotations

import sys

from dist_llama.cli import user_errors
from dist_llama.comm_model import Cluster, StepLayout, step_cost
from dist_llama.config import ConfigError, load_config
from dist_llama.config.loading import config_argument_parser
from dist_llama.model import PRESETS, ModelArgs, count_parameters, flops_per_token
from dist_llama.step import BatchLayout


def describe(name: str, args: ModelArgs, seq_len: int) -> str:
    counts = count_parameters(args)
    return (
        f"{name:<10} dim={args.dim:<5} layers={args.n_layers:<3} heads={args.n_heads}/{args.kv_heads:<3} "
        f"ffn={args.hidden_dim:<5} seq={seq_len:<5} non-embedding={counts['non_embedding'] / 1e6:8.2f}M "
        f"total={counts['total'] / 1e6:8.2f}M  FLOPs/token={flops_per_token(args, seq_len) / 1e9:.3f}G"
    )


COLUMNS = (
    f"{'nodes':>5} {'GPUs':>5} {'layout':<6} {'micro':>5} {'NVLink GB':>9} {'network GB':>10} "
    f"{'NVLink ms':>9} {'network ms':>10} {'compute ms':>10} {'step ms':>8} {'tokens/s/GPU':>12}"
)


def communication_table(config, cluster_args: dict, node_counts: list[int]) -> list[str]:
    """One line per node count and layout (FSDP over every GPU; HSDP once there are several nodes), the
    recommended layout marked with *."""
    train, seq_len = config.train, config.data.seq_len
    # On the H100s this models, `auto` computes in bf16.
    requested = config.parallel.mixed_precision
    precision = "bf16" if requested == "auto" else requested
    per_token = flops_per_token(config.model, seq_len)
    lines = [COLUMNS]
    for nodes in node_counts:
        cluster = Cluster(nodes, **cluster_args)
        gpus = nodes * cluster.gpus_per_node
        batch = BatchLayout.of(train, seq_len, gpus)
        meshes = {"FSDP": (1, gpus)} | ({"HSDP": (nodes, cluster.gpus_per_node)} if nodes > 1 else {})
        costs = {}
        for name, (replicate, shard) in meshes.items():
            layout = StepLayout.of(config, (replicate, shard), batch.accumulation_steps, precision)
            costs[name] = step_cost(config.model, layout, cluster, batch.tokens_per_rank, per_token)
        best = min(costs, key=lambda name: (costs[name].step_s, costs[name].network_bytes))
        for name, cost in costs.items():
            marked = name + ("*" if name == best else "")
            lines.append(
                f"{nodes:>5} {gpus:>5} {marked:<6} {batch.accumulation_steps:>5} "
                f"{cost.nvlink_bytes / 1e9:>9.3f} {cost.network_bytes / 1e9:>10.3f} "
                f"{cost.nvlink_s * 1e3:>9.1f} {cost.network_s * 1e3:>10.1f} {cost.compute_s * 1e3:>10.1f} "
                f"{cost.step_s * 1e3:>8.1f} {batch.tokens_per_rank / cost.step_s:>12,.0f}"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = config_argument_parser("counts", "Parameter and FLOP counts, and what N nodes would send.")
    parser.add_argument("--nodes", help="node counts for the communication model, e.g. 1,2,4,8")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--link-gbps", type=float, default=400.0, help="network Gbit/s per GPU (400: IB NDR)")
    parser.add_argument(
        "--nvlink-gbytes", type=float, default=450.0, help="NVLink GB/s per direction per GPU"
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense 16-bit peak")
    parser.add_argument(
        "--mfu", type=float, default=0.4, help="the share of the peak a step's compute reaches"
    )
    options, overrides = parser.parse_known_args(argv)
    if options.config is None and not overrides and options.nodes is None:
        for name, args in PRESETS.items():
            print(describe(name, args, args.max_seq_len))
        return
    with user_errors("counts", ConfigError):
        config = load_config(options.config, overrides)
        print(describe(config.train.name, config.model, config.data.seq_len))
        if options.nodes is not None:
            node_counts = parse_node_counts(options.nodes)
            cluster_args = {
                "gpus_per_node": options.gpus_per_node,
                "nvlink_gbytes": options.nvlink_gbytes,
                "link_gbits": options.link_gbps,
                "peak_tflops": options.peak_tflops,
                "mfu": options.mfu,
            }
            print(
                f"per GPU and optimizer step of {config.train.tokens_per_step:,} tokens; "
                f"{options.gpus_per_node} GPUs a node, NVLink {options.nvlink_gbytes:g} GB/s, network "
                f"{options.link_gbps:g} Gb/s per GPU; compute at {options.mfu:.0%} of "
                f"{options.peak_tflops:g} TFLOP/s; * the shorter step"
            )
            print("\n".join(communication_table(config, cluster_args, node_counts)))


def parse_node_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"--nodes={text!r}: give positive node counts separated by commas, e.g. 1,2,4,8")
    return counts


if __name__ == "__main__":
    main()
