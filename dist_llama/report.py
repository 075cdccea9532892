"""`python -m dist_llama.report --run runs/X [--out DIR]`: plots and a results table from a run's own files.

Reads run_dir/metrics.jsonl, environment.json, config.yaml and whatever the evaluation left in
run_dir/eval/ (summary.json from lm-eval, ppl_*.json from the loss-by-position measurement), and writes
PNG plots (training and validation loss vs tokens first, then lr, grad norm, tokens/s, MFU, loss by
position) and results.md, which REPORT.md quotes. Nothing here is typed by hand.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import yaml  # noqa: E402

from dist_llama.cards import format_value  # noqa: E402
from dist_llama.cli import CommandParser, user_errors  # noqa: E402
from dist_llama.metrics import read_environment  # noqa: E402


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """Train and val records; a resumed run re-logs the steps after its checkpoint, so the last record
    wins."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory (made by dist_llama.train)?")
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "val": {}}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_kind.setdefault(record.get("kind", "train"), {})[record["step"]] = record
    return (
        [by_kind["train"][s] for s in sorted(by_kind["train"])],
        [by_kind["val"][s] for s in sorted(by_kind["val"])],
    )


def _line_plot(
    path: Path, title: str, ylabel: str, series: list[tuple[str, list, list]], xlabel: str, logy=False
):
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, xs, ys in series:
        axes.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if logy:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def training_plots(train: list[dict], val: list[dict], out: Path, name: str) -> list[Path]:
    """loss.png first (train and val loss vs tokens), then one plot per logged training metric."""
    out.mkdir(parents=True, exist_ok=True)
    tokens = [r["tokens_seen"] for r in train]
    written = []
    loss_series = [("train loss", tokens, [r["loss"] for r in train])]
    if val:
        loss_series.append(("val loss", [r["tokens_seen"] for r in val], [r["val_loss"] for r in val]))
    written.append(out / "loss.png")
    _line_plot(written[-1], f"{name}: loss", "cross-entropy (nats/token)", loss_series, "tokens seen")
    for key, title, logy in [
        ("lr", "learning rate", False),
        ("grad_norm", "gradient norm (before clipping)", True),
        ("tokens_per_s", "throughput (tokens/s)", False),
        ("mfu", "model FLOPs utilisation", False),
        ("data_wait", "share of step time waiting for batches", False),
    ]:
        points = [(r["tokens_seen"], r[key]) for r in train if key in r]
        if points:
            written.append(out / f"{key}.png")
            _line_plot(
                written[-1], f"{name}: {title}", key, [(key, *map(list, zip(*points)))], "tokens seen", logy
            )
    return written


def run_summary(run_dir: Path, train: list[dict], val: list[dict]) -> dict:
    starts = read_environment(run_dir)
    environment = {**starts[-1], "start_time": starts[0]["start_time"]} if starts else {}
    config = (
        yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    )
    # Skip the first logging window: it includes start-up and warm-up, not steady-state speed.
    steady = train[1:] or train
    return {
        "run": run_dir.name,
        "device": environment.get("device"),
        "world_size": environment.get("world_size"),
        "date": environment.get("start_time"),
        "git_commit": environment.get("git_commit"),
        "seq_len": config.get("data", {}).get("seq_len"),
        "steps": train[-1]["step"] if train else 0,
        "tokens_seen": train[-1]["tokens_seen"] if train else 0,
        "final_train_loss": train[-1]["loss"] if train else None,
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "best_val_loss": min(r["val_loss"] for r in val) if val else None,
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady) if steady else None,
        "median_mfu": statistics.median(r["mfu"] for r in steady if "mfu" in r)
        if any("mfu" in r for r in steady)
        else None,
        "peak_memory_gib": max(r["memory_gib"] for r in train) if train else None,
        # The share of step time the loop waited for batches (runs from before it was logged have none).
        "median_data_wait": statistics.median(r["data_wait"] for r in steady if "data_wait" in r)
        if any("data_wait" in r for r in steady)
        else None,
    }


def results_markdown(
    summary: dict, eval_summary: dict | None, ppl: list[dict], plots: list[Path], out: Path
) -> str:
    lines = [
        f"### Run `{summary['run']}`",
        "",
        f"Device: {summary['device']} x {summary['world_size']}, started {summary['date']}, "
        f"commit `{(summary['git_commit'] or 'unknown')[:12]}`.",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for key in (
        "seq_len",
        "steps",
        "tokens_seen",
        "final_train_loss",
        "final_val_loss",
        "best_val_loss",
        "median_tokens_per_s",
        "median_mfu",
        "median_data_wait",
        "peak_memory_gib",
    ):
        lines.append(f"| {key} | {format_value(summary[key], 1 if key == 'median_tokens_per_s' else 4)} |")
    if eval_summary:
        lines += ["", "Evaluation (`eval/summary.json`):", "", "| metric | value |", "| --- | --- |"]
        for key, value in eval_summary.items():
            if isinstance(value, (int, float, str)) or value is None:
                lines.append(f"| {key} | {format_value(value)} |")
            elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
                lines.append(f"| {key} | [{value[0]:.4f}, {value[1]:.4f}] |")
            elif isinstance(value, dict) and all(
                isinstance(v, (int, float)) or v is None for v in value.values()
            ):
                lines.append(
                    f"| {key} | " + ", ".join(f"{k}={format_value(v)}" for k, v in value.items()) + " |"
                )
    if ppl:
        buckets = list(ppl[0]["buckets"].keys()) if isinstance(ppl[0].get("buckets"), dict) else []
        if buckets:
            lines += [
                "",
                "Held-out loss by position (`eval/ppl_*.json`):",
                "",
                "| model | " + " | ".join(buckets) + " | all |",
                "| --- " * (len(buckets) + 2) + "|",
            ]
            for result in ppl:
                lines.append(
                    f"| {result.get('label', '?')} | "
                    + " | ".join(format_value(result["buckets"][b]) for b in buckets)
                    + f" | {format_value(result.get('loss'))} |"
                )
    lines += [""] + [f"![{p.stem}]({p.relative_to(out)})" for p in plots] + [""]
    return "\n".join(lines)


def generate_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write plots and results.md for run_dir into out (default run_dir/report); returns results.md's path."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report"
    train, val = read_metrics(run_dir)
    plots = training_plots(train, val, out, run_dir.name)
    eval_dir = run_dir / "eval"
    eval_summary = (
        json.loads((eval_dir / "summary.json").read_text()) if (eval_dir / "summary.json").is_file() else None
    )
    ppl = (
        [json.loads(p.read_text()) for p in sorted(eval_dir.glob("ppl_*.json"))] if eval_dir.is_dir() else []
    )
    if ppl:
        from dist_llama.evaluation.position import plot_loss_by_position

        plots.append(out / "loss_by_position.png")
        plot_loss_by_position(ppl, plots[-1])
    summary = run_summary(run_dir, train, val)
    (out / "summary.json").write_text(
        json.dumps({"run": summary, "eval": eval_summary, "ppl": ppl}, indent=1)
    )
    results = out / "results.md"
    results.write_text(results_markdown(summary, eval_summary, ppl, plots, out))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(command="report", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory (runs/NAME)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/report)")
    args = parser.parse_args(argv)
    with user_errors("report", FileNotFoundError):
        results = generate_report(Path(args.run), Path(args.out) if args.out else None)
    print(f"wrote {results} and its plots")


if __name__ == "__main__":
    sys.exit(main())
