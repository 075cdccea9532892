"""What the session tells: summary.json (every stage's outcome and the run's numbers), summary.md (the same
for a reader, one section per stage that produced something) and the short table printed last."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dist_llama.session import read_json
from dist_llama.session.context import Context, PreflightFacts, reported_run
from dist_llama.session.deadline import stage_times
from dist_llama.stages import Outcome

BUNDLE_FACTS = (
    "created",
    "train",
    "dropped_training_shards",
    "mmlu_spread_items",
    "mmlu_spread_subjects",
    "bundle_bytes",
)


def session_summary(
    context: Context,
    outcomes: list[Outcome],
    preflight: PreflightFacts,
    runs: tuple[Path, ...],
    bad_input: str | None,
) -> dict:
    """summary.json: the session's settings, every stage's outcome beside its planned time, and what the
    stages left in the work folder (the preflight's facts, the bench, the reported run's numbers)."""
    run_dir = reported_run(runs)
    report = read_json(run_dir / "report" / "summary.json") if run_dir else None
    return {
        "mode": context.mode.name,
        "deadline_s": context.deadline.seconds,
        "elapsed_s": round(context.deadline.elapsed(), 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": context.config,
        "overrides": list(context.user_overrides),
        "bad_input": bad_input,
        "work": str(context.work),
        "stages": [o.as_dict() for o in outcomes],
        "stage_plan": stage_times(context.mode, context.deadline.seconds)["stages"],
        "preflight": preflight.report or None,
        "bundle": {key: (context.manifest or {}).get(key) for key in BUNDLE_FACTS},
        "bench": read_json(context.work / "bench.json"),
        "run": run_dir.name if run_dir else None,
        "train": (report or {}).get("run"),
        "plan": trainer_budget_record(run_dir) if run_dir else None,
        "release": read_json(context.work / "release_check.json"),
        "eval": _evaluation_results(run_dir),
    }


def _evaluation_results(run_dir: Path | None) -> dict:
    if run_dir is None:
        return {}
    return {
        "tinymmlu": read_json(run_dir / "eval" / "summary.json"),
        "mmlu_spread": read_json(run_dir / "eval" / "mmlu_spread" / "summary.json"),
        "ppl": [read_json(p) for p in sorted((run_dir / "eval").glob("ppl_*.json"))],
    }


def trainer_budget_record(run_dir: Path) -> dict | None:
    """The trainer's time-budget record from metrics.jsonl (kind "plan": planned steps, measured step time),
    if it wrote one; summary.json's "plan"."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a stopped trainer
            continue
    plans = [record for record in records if record.get("kind") == "plan"]
    return plans[-1] if plans else None


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _accuracy(summary: dict | None) -> str:
    if not summary:
        return "n/a"
    acc = summary["acc"]
    text = f"{acc['value']:.4f} [{acc['ci95_low']:.4f}, {acc['ci95_high']:.4f}] (n={summary['n']})"
    if summary.get("irt"):
        text += " IRT " + ", ".join(f"{k} {v:.4f}" for k, v in summary["irt"].items())
    return text


def summary_markdown(summary: dict) -> str:
    lines = [
        f"# GPU session ({summary['mode']}), {summary['date']}",
        "",
        f"Config `{summary['config']}` {' '.join(summary['overrides'])}; deadline "
        f"{summary['deadline_s']:g} s, used {summary['elapsed_s']:g} s.",
        "",
    ]
    if summary["bad_input"]:
        lines += [f"**Stopped: {summary['bad_input']}**", ""]
    planned = summary.get("stage_plan") or {}
    lines += ["| stage | status | seconds | planned | detail |", "| --- | --- | --- | --- | --- |"]
    lines += [
        f"| {s['stage']} | {s['status']} | {s['seconds']:.0f} | {_fmt(planned.get(s['stage']), 0)} | "
        f"{s['detail'].replace('|', chr(92) + '|')} |"
        for s in summary["stages"]
    ]
    for section in (_machine, _bench, _training, _evaluation, _release):
        lines += section(summary)
    failed = [s for s in summary["stages"] if s["status"] != "ok"]
    if failed:
        lines += ["", "## Not done", ""] + [f"- {s['stage']}: {s['status']}: {s['detail']}" for s in failed]
    return "\n".join(lines) + "\n"


def _machine(summary: dict) -> list[str]:
    preflight = summary.get("preflight") or {}
    if not preflight.get("packages"):
        return []
    gpu = preflight.get("gpu")
    device = (
        f"{gpu['name']} (x{gpu['count']}, compute capability {gpu['capability']}), "
        f"{gpu['free_gib']:.1f} of {gpu['total_gib']:.1f} GiB free"
        if gpu
        else "no GPU (CPU)"
    )
    return [
        "",
        "## Machine",
        "",
        f"{device}; Python {preflight['python']}; CUDA {preflight.get('cuda')}; "
        + ", ".join(f"{k} {v}" for k, v in preflight["packages"].items()),
    ]


def _bench(summary: dict) -> list[str]:
    bench = summary.get("bench")
    if not bench:
        return []
    lines = [
        "",
        "## Model step: ours vs transformers' Llama (`benchmarks/bench_model_step.py`)",
        "",
        f"{bench['preset']} preset, {bench['batch']} x {bench['seq_len']} tokens, {bench['dtype']}, "
        f"{bench['device']}, torch {bench['torch']}, {bench['repeats']} repeats (medians).",
        "",
        "| model | s/step | tokens/s | MFU | step peak GiB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, m in bench["models"].items():
        mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "n/a"
        lines.append(
            f"| {name} | {m['median_s_per_step']:.4f} | {m['tokens_per_s']:,.0f} | {mfu} | "
            f"{_fmt(m.get('step_peak_gib'), 2)} |"
        )
    return lines + [""] + [f"- {key}: {value:.3f}" for key, value in bench["ratios"].items()]


def _training(summary: dict) -> list[str]:
    train = summary.get("train")
    if not train:
        return []
    lines = ["", f"## Training (`{summary['run']}`)", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in train.items() if key not in ("run",)]
    if summary.get("plan"):
        budget = ", ".join(f"{k} {_fmt(v)}" for k, v in summary["plan"].items() if k != "kind")
        lines += ["", "Plan: " + budget]
    return lines


def _evaluation(summary: dict) -> list[str]:
    evaluation = summary.get("eval") or {}
    if not (evaluation.get("tinymmlu") or evaluation.get("mmlu_spread") or evaluation.get("ppl")):
        return []
    lines = [
        "",
        "## Evaluation (accuracy with its 95% Wilson interval)",
        "",
        f"- tinyMMLU (100 items): {_accuracy(evaluation.get('tinymmlu'))}",
        f"- MMLU spread over all subjects: {_accuracy(evaluation.get('mmlu_spread'))}",
    ]
    for result in evaluation.get("ppl") or []:
        if result:
            buckets = ", ".join(f"{k}: {v:.4f}" for k, v in result["buckets"].items())
            lines.append(
                f"- held-out loss by position, window {result['seq_len']} ({result['label']}, "
                f"{result['n_windows']} documents): {buckets}; all {result['loss']:.4f}"
            )
    return lines


def _release(summary: dict) -> list[str]:
    release = summary.get("release")
    if not (release and release.get("generations")):
        return []
    lines = [
        "",
        "## Release check and generations",
        "",
        f"Loaded as `{release['class']}` with trust_remote_code where dist_llama is not importable; "
        f"logits vs stock LlamaForCausalLM: max |diff| {release['max_abs_logit_diff']:.3g} (max |logit| "
        f"{release['max_abs_logit']:.3g}). Sampling: {json.dumps(release['sampling'])}.",
        "",
    ]
    for item in release["generations"]:
        lines += [
            f"- greedy: {json.dumps(item['greedy'], ensure_ascii=False)} (stock Llama greedy equal: "
            f"{item['greedy_equals_stock_llama']})",
            f"  sampled: {json.dumps(item['sampled'], ensure_ascii=False)}",
        ]
    return lines


def final_table(summary: dict) -> str:
    """A few lines that fit the end of a console: each stage, then the headline numbers."""
    rows = [(s["stage"], s["status"], f"{s['seconds']:.0f}s", s["detail"]) for s in summary["stages"]]
    train = summary.get("train") or {}
    if train:
        mfu = train.get("median_mfu")
        rows.append(
            (
                "result",
                "train",
                "",
                f"{_fmt(train.get('steps'))} steps, "
                f"{_fmt(train.get('tokens_seen'))} tokens, "
                f"val loss {_fmt(train.get('final_val_loss'))}, "
                f"{_fmt(train.get('median_tokens_per_s'), 0)} tok/s"
                + (f", MFU {100 * mfu:.1f}%" if mfu else ""),
            )
        )
    evaluation = summary.get("eval") or {}
    for key, label in (("tinymmlu", "tinyMMLU"), ("mmlu_spread", "MMLU")):
        if evaluation.get(key):
            rows.append(("result", label, "", _accuracy(evaluation[key])))
    width = 110
    lines = [f"{'stage':<10} {'status':<8} {'time':>6}  detail"]
    for stage, status, seconds, detail in rows:
        detail = detail if len(detail) <= width else detail[: width - 3] + "..."
        lines.append(f"{stage:<10} {status:<8} {seconds:>6}  {detail}")
    where = "summary.md" if not summary["bad_input"] else f"summary.md (stopped: {summary['bad_input']})"
    lines.append(f"total {summary['elapsed_s']:.0f} s of {summary['deadline_s']:g} s; summary in {where}")
    return "\n".join(lines)
