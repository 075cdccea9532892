"""tinyMMLU (or a local file of MMLU items) through lm-eval-harness, and what the run writes.

`run_mmlu` writes results.json (lm-eval's results), samples_<task>.jsonl (one line per item: doc_id,
subject, target, pred, acc, acc_norm, ...), per_subject.json, tasks/<task>.yaml and summary.json
(accuracy and subject-balanced accuracy with 95% CIs, IRT estimates, items/s = items / wall time of
lm-eval's run, model load excluded). The task is described in tasks.py, the intervals in stats.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from dist_llama.devices import default_device, dtype_name
from dist_llama.evaluation import EvaluationError
from dist_llama.evaluation.irt import irt_for_samples, load_params_file
from dist_llama.evaluation.models import check_dtype, checked_model_name, load_model, torch_dtype_for
from dist_llama.evaluation.stats import accuracy_stats, subject_means
from dist_llama.evaluation.tasks import (
    HUB_DATASET,
    HUB_DATASET_CONFIG,
    check_mmlu_data,
    spread_subset,
    write_task,
)


def _sample_record(sample: dict) -> dict:
    doc = sample["doc"]
    logliks = [float(r[0]) for r in sample["filtered_resps"]]
    record = {
        "doc_id": int(sample["doc_id"]),
        "subject": doc.get("subject"),
        "target": int(sample["target"]),
        "pred": max(range(len(logliks)), key=logliks.__getitem__),
        "acc": float(sample["acc"]),
        "acc_norm": float(sample["acc_norm"]),
        "loglikelihoods": logliks,
        "doc_hash": sample.get("doc_hash"),
        "prompt_hash": sample.get("prompt_hash"),
    }
    if "tb_index" in doc:
        record["tb_index"] = int(doc["tb_index"])
    return record


def _fmt_stat(stat: dict | None) -> str:
    if stat is None:
        return "n/a"
    if stat["ci95_low"] is None:
        return f"{stat['value']:.4f} [CI n/a]"
    return f"{stat['value']:.4f} [{stat['ci95_low']:.4f}, {stat['ci95_high']:.4f}]"


def format_summary(summary: dict) -> str:
    lines = [
        f"{summary['task']} on {summary['model']}: {summary['n']} items, "
        f"{summary['n_subjects'] or 'no'} subjects, {summary['items_per_s']:.2f} items/s"
    ]
    for metric in ("acc", "acc_norm"):
        lines.append(
            f"  {metric:<8} {_fmt_stat(summary[metric])}   subject-balanced "
            f"{_fmt_stat(summary[metric + '_macro'])}   (95% CI)"
        )
    if summary["irt"] is not None:
        lines.append("  IRT      " + "  ".join(f"{k} {v:.4f}" for k, v in summary["irt"].items()))
    else:
        lines.append(f"  IRT      null: {summary['irt_note']}")
    return "\n".join(lines)


def run_mmlu(
    model: str,
    output_dir: str | Path,
    data: str | Path | None = None,
    limit: int | None = None,
    batch_size: int | str = 4,
    device: str | None = None,
    irt_params: str | Path | None = None,
    dtype: str = "auto",
    tokenizer: str | None = None,
) -> dict:
    """Evaluate `model` on tinyMMLU (Hub) or a local tinyMMLU-format JSONL; write results, samples, summary.

    Returns the summary dict (also written to output_dir/summary.json). irt_params: a tinyBenchmarks pickle;
    None fetches the official one if (and only if) the item set allows IRT.
    """
    model = checked_model_name(str(model))
    output_dir = Path(output_dir)
    data, lm_eval_limit = _items_to_run(data, limit, output_dir)
    check_dtype(dtype)
    # A bad parameter file should fail before the model runs, not after.
    params = load_params_file(Path(irt_params)) if irt_params is not None else None
    device = device or default_device()
    output_dir.mkdir(parents=True, exist_ok=True)
    task_name, task_path = write_task(output_dir, data)
    run = _run_lm_eval(model, tokenizer, device, dtype, batch_size, task_name, task_path, data, lm_eval_limit)
    samples = _write_results(output_dir, task_name, run.results)
    accuracy = _accuracy_with_intervals(samples)
    n_subjects = _write_per_subject(output_dir, samples)
    summary = {
        "task": task_name,
        "model": model,
        "data": _items_source(data),
        "n": len(samples),
        "n_subjects": n_subjects,
        "limit": limit,
        "device": device,
        "dtype": run.model_dtype,
        "batch_size": batch_size,
        **accuracy,
        **irt_for_samples(samples, data is None, params, str(irt_params) if irt_params else None),
        "eval_seconds": run.seconds,
        "items_per_s": len(samples) / run.seconds,
    }
    if accuracy["acc_macro"] is None:
        summary["macro_note"] = "some items have no 'subject' field, so there is no subject-balanced score"
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _items_to_run(
    data: str | Path | None, limit: int | None, output_dir: Path
) -> tuple[Path | None, int | None]:
    """(the item file, None for the Hub task; the limit lm-eval applies).

    lm-eval's limit takes a file's first N rows; for a local file the N rows are spread evenly over it
    instead, written to output_dir/items.jsonl, which lm-eval then runs whole.
    """
    data = Path(data) if data is not None else None
    if limit is not None and limit <= 0:
        raise EvaluationError(f"--limit must be positive, got {limit}")
    if data is not None and check_mmlu_data(data) > (limit or float("inf")):
        output_dir.mkdir(parents=True, exist_ok=True)
        return spread_subset(data, limit, output_dir / "items.jsonl"), None
    return data, limit


def _items_source(data: Path | None) -> str:
    return str(data.resolve()) if data is not None else f"hf://{HUB_DATASET} ({HUB_DATASET_CONFIG}, test)"


@dataclass
class _LmEvalRun:
    results: dict  # lm-eval's results, samples included
    seconds: float  # lm-eval's own wall time, the model load excluded
    model_dtype: str  # the dtype the model's weights were loaded in


def _run_lm_eval(
    model: str,
    tokenizer: str | None,
    device: str,
    dtype: str,
    batch_size: int | str,
    task_name: str,
    task_path: Path,
    data: Path | None,
    limit: int | None,
) -> _LmEvalRun:
    """Load the model and run the task through lm-eval's HF backend, logging every sample (`limit`: lm-eval's,
    the first N items)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hf_model, tok = load_model(
        model, device=device, dtype=torch_dtype_for(dtype, device, auto_means_saved=True), tokenizer=tokenizer
    )
    lm = HFLM(
        pretrained=hf_model, tokenizer=tok, trust_remote_code=True, batch_size=batch_size, device=device
    )
    task_manager = TaskManager(include_path=str(task_path.parent), include_defaults=False)
    start = time.perf_counter()
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[task_name], task_manager=task_manager, limit=limit, log_samples=True
        )
    except (ConnectionError, OSError) as err:
        where = f"{HUB_DATASET} from the Hub" if data is None else str(data)
        raise EvaluationError(
            f"cannot load the items ({where}): {str(err).splitlines()[0]}; "
            "for an offline run pass --data FILE.jsonl"
        ) from None
    seconds = time.perf_counter() - start
    return _LmEvalRun(results, seconds, dtype_name(hf_model.dtype))


def _write_results(output_dir: Path, task_name: str, results: dict) -> list[dict]:
    """results.json (lm-eval's results without the samples) and samples_<task>.jsonl; returns the samples'
    records in doc_id order."""
    from lm_eval.utils import handle_non_serializable

    samples = sorted(
        (_sample_record(s) for s in results.pop("samples")[task_name]), key=lambda r: r["doc_id"]
    )
    results_path = output_dir / "results.json"
    results_path.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    samples_path = output_dir / f"samples_{task_name}.jsonl"
    with open(samples_path, "w", encoding="utf-8") as f:
        for record in samples:
            f.write(json.dumps(record) + "\n")
    return samples


def _accuracy_with_intervals(samples: list[dict]) -> dict:
    """summary.json's accuracy fields: micro and subject-balanced, acc and acc_norm, and how the CIs were
    made."""
    acc, acc_macro = accuracy_stats(samples, "acc")
    acc_norm, acc_norm_macro = accuracy_stats(samples, "acc_norm")
    return {
        "acc": acc,
        "acc_macro": acc_macro,
        "acc_norm": acc_norm,
        "acc_norm_macro": acc_norm_macro,
        "ci_method_micro": "Wilson score interval, 95%",
        "ci_method_macro": "Student-t interval over subject means (k-1 df), 95%, clipped to [0, 1]",
    }


def _write_per_subject(output_dir: Path, samples: list[dict]) -> int | None:
    """per_subject.json (items, acc and acc_norm of each subject); returns the number of subjects, None
    (and no file) when some item has no subject."""
    by_subject = {metric: subject_means(samples, metric) for metric in ("acc", "acc_norm")}
    if by_subject["acc"] is None:
        return None
    (output_dir / "per_subject.json").write_text(
        json.dumps(
            {
                subject: {"n": n, "acc": m, "acc_norm": by_subject["acc_norm"][subject][1]}
                for subject, (n, m) in by_subject["acc"].items()
            },
            indent=2,
        )
    )
    return len(by_subject["acc"])
