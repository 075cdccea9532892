"""tinyMMLU (or a local file of MMLU items) through lm-eval-harness, and what the run writes.

`run_mmlu` writes results.json (lm-eval's results), samples_<task>.jsonl (one line per item: doc_id,
subject, target, pred, acc, acc_norm, ...), per_subject.json, tasks/<task>.yaml and summary.json
(accuracy and subject-balanced accuracy with 95% CIs, IRT estimates, items/s = items / wall time of
lm-eval's run, model load excluded). The task is described in tasks.py, the intervals in stats.py.
"""

from __future__ import annotations

import json
import time
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
    data = Path(data) if data is not None else None
    if limit is not None and limit <= 0:
        raise EvaluationError(f"--limit must be positive, got {limit}")
    lm_eval_limit = limit
    if data is not None and check_mmlu_data(data) > (limit or float("inf")):
        output_dir.mkdir(parents=True, exist_ok=True)
        data, lm_eval_limit = spread_subset(data, limit, output_dir / "items.jsonl"), None
    check_dtype(dtype)
    # A bad parameter file should fail before the model runs, not after.
    params = load_params_file(Path(irt_params)) if irt_params is not None else None
    device = device or default_device()
    output_dir.mkdir(parents=True, exist_ok=True)
    task_name, task_path = write_task(output_dir, data)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

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
            model=lm, tasks=[task_name], task_manager=task_manager, limit=lm_eval_limit, log_samples=True
        )
    except (ConnectionError, OSError) as err:
        where = f"{HUB_DATASET} from the Hub" if data is None else str(data)
        raise EvaluationError(
            f"cannot load the items ({where}): {str(err).splitlines()[0]}; "
            "for an offline run pass --data FILE.jsonl"
        ) from None
    seconds = time.perf_counter() - start

    samples = sorted(
        (_sample_record(s) for s in results.pop("samples")[task_name]), key=lambda r: r["doc_id"]
    )
    results_path = output_dir / "results.json"
    results_path.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    samples_path = output_dir / f"samples_{task_name}.jsonl"
    with open(samples_path, "w", encoding="utf-8") as f:
        for record in samples:
            f.write(json.dumps(record) + "\n")

    acc, acc_macro = accuracy_stats(samples, "acc")
    acc_norm, acc_norm_macro = accuracy_stats(samples, "acc_norm")
    by_subject = {metric: subject_means(samples, metric) for metric in ("acc", "acc_norm")}
    if by_subject["acc"] is not None:
        (output_dir / "per_subject.json").write_text(
            json.dumps(
                {
                    subject: {"n": n, "acc": m, "acc_norm": by_subject["acc_norm"][subject][1]}
                    for subject, (n, m) in by_subject["acc"].items()
                },
                indent=2,
            )
        )
    summary = {
        "task": task_name,
        "model": model,
        "data": str(data.resolve())
        if data is not None
        else f"hf://{HUB_DATASET} ({HUB_DATASET_CONFIG}, test)",
        "n": len(samples),
        "n_subjects": len(by_subject["acc"]) if by_subject["acc"] is not None else None,
        "limit": limit,
        "device": device,
        "dtype": dtype_name(hf_model.dtype),
        "batch_size": batch_size,
        "acc": acc,
        "acc_macro": acc_macro,
        "acc_norm": acc_norm,
        "acc_norm_macro": acc_norm_macro,
        "ci_method_micro": "Wilson score interval, 95%",
        "ci_method_macro": "Student-t interval over subject means (k-1 df), 95%, clipped to [0, 1]",
        **irt_for_samples(samples, data is None, params, str(irt_params) if irt_params else None),
        "eval_seconds": seconds,
        "items_per_s": len(samples) / seconds,
    }
    if acc_macro is None:
        summary["macro_note"] = "some items have no 'subject' field, so there is no subject-balanced score"
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
