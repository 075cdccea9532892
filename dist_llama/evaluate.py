"""Evaluation: tinyMMLU through lm-eval-harness (with IRT estimates), and held-out loss by position.

Subcommands of `python -m dist_llama.evaluate` (with no subcommand, `mmlu` is assumed):

  mmlu      --model DIR|HUB_ID --output DIR [--data FILE.jsonl] [--limit N] [--batch-size B] [--device D]
            [--dtype auto|fp32|bf16|fp16] [--irt-params PKL]
            Runs lm-eval (HF backend, trust_remote_code) and writes results.json (lm-eval's results),
            samples_<task>.jsonl (one line per item: doc_id, subject, target, pred, acc, acc_norm, ...),
            per_subject.json, tasks/<task>.yaml and summary.json (accuracy and subject-balanced accuracy
            with 95% CIs, IRT estimates, items/s = items / wall time of lm-eval's run, model load excluded).
  irt       --params PKL --samples SAMPLES.jsonl [--metric acc_norm] [--bench mmlu]
            tinyBenchmarks' irt / pirt / gpirt from a samples file (ours or lm-eval's), as JSON.
  ppl       --model DIR|HUB_ID|CHECKPOINT --data FILE --output DIR [--seq-len 1024] [--docs N]
            [--rope-scaling-factor F] [--label NAME] [--batch-size B] [--device D] [--dtype ...] [--plot PNG]
            Held-out loss in four position buckets of a seq_len window, and overall, as ppl_<label>.json:
            one window of seq_len + 1 tokens from the start of each of the first N documents that are that
            long ([bos] doc [eos], as training encodes them; never joined to a previous document, so
            position p follows p tokens of its own document). The JSON says how many documents were read
            and how many qualified; none qualifying is an error. A checkpoint
            (DCP step folder or run folder) is consolidated to a temporary stock-Llama folder first.
            --rope-scaling-factor F loads the model with linear RoPE scaling (Position Interpolation) of
            factor F, F = 1 with plain RoPE, whatever its config says.
  ppl-plot  --inputs A.json B.json ... --output PLOT.png
            Loss against position (bucket midpoints), one line per label.

Which task runs. Without --data the items are tinyBenchmarks/tinyMMLU from the Hub, with the prompt,
choices and target of lm-eval's built-in `tinyMMLU` task. We run our own copy of that task definition
(written to <output>/tasks/tinyMMLU.yaml) instead of the built-in one because the built-in aggregates
with `tinyBenchmarks` (not on PyPI), which fails to import where it is missing and downloads its
parameter file at run time; its per-item acc_norm is what ours records, and we compute the same gpirt
from it with dist_llama.irt (sha256-pinned parameters). With --data FILE the same definition reads a
local JSONL (tinyMMLU's fields: input_formatted, answer, subject, ...) as task `tinymmlu_local`.
The written task folder also works with the stock CLI (one command line):
  lm_eval --model hf --model_args pretrained=DIR --tasks tinymmlu_local --include_path OUT/tasks
          --batch_size 4 --output_path OUT/cli --log_samples --device cuda:0 --trust_remote_code

Confidence intervals (95%, in summary.json as ci95_low / ci95_high):
  micro accuracy  Wilson score interval over the n items:
                  (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = 1.96.
  subject-balanced (macro) accuracy  mean of the k subject accuracies m_s, with a Student-t interval
                  over them: M -+ t_{0.975, k-1} * sd(m_s) / sqrt(k), clipped to [0, 1]; null when k < 2.
                  It treats subjects as a sample, so it also counts the spread of difficulty between
                  subjects: conservative for "these k subjects", but it stays usable when a subject has
                  one or two items (tinyMMLU), where a within-subject binomial error would be zero.

IRT is computed only for the 100 tinyMMLU anchor items: the Hub task run in full (doc_id i is anchor
i), or a local file whose rows carry `tb_index` and include every anchor (e.g. all of MMLU). Otherwise
summary.json has "irt": null and an "irt_note" saying why.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import re
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from dist_llama import irt

logger = logging.getLogger(__name__)

HUB_TASK = "tinyMMLU"
LOCAL_TASK = "tinymmlu_local"
HUB_DATASET, HUB_DATASET_CONFIG = "tinyBenchmarks/tinyMMLU", "all"
REQUIRED_FIELDS = ("input_formatted", "answer")
IRT_BENCH = "mmlu"
Z95 = 1.959963984540054
N_BUCKETS = 4
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


class EvaluationError(Exception):
    """A user error (missing file, bad option, unloadable model); main() prints it as one line."""


# --- The task definition ------------------------------------------------------------------------------


def task_config(name: str, data: Path | None) -> dict:
    """lm-eval task config equal to the built-in tinyMMLU's except for the data source and the aggregation
    (mean acc / acc_norm instead of tinyBenchmarks' gpirt, which we compute from the samples ourselves)."""
    if data is None:
        source = {"dataset_path": HUB_DATASET, "dataset_name": HUB_DATASET_CONFIG}
    else:
        # lm-eval resolves relative data_files against the working directory, not the YAML: keep it absolute.
        source = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(Path(data).resolve())}}}
    return {
        "task": name,
        **source,
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{input_formatted}}",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "answer",
        "num_fewshot": 0,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 0.0},
    }


def write_task(output_dir: Path, data: Path | None) -> tuple[str, Path]:
    """Write the task YAML into output_dir/tasks (a folder fit for --include_path); return (name, path)."""
    import yaml

    name = HUB_TASK if data is None else LOCAL_TASK
    task_dir = output_dir / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    path = task_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task_config(name, data), sort_keys=False))
    return name, path


def check_mmlu_data(path: Path) -> int:
    """Number of rows of a local tinyMMLU-format JSONL; raises EvaluationError naming the first bad row."""
    if not path.is_file():
        raise EvaluationError(f"--data {path}: no such file")
    n = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvaluationError(f"{path}:{line_no} is not valid JSON ({err})") from None
            missing = [k for k in REQUIRED_FIELDS if not isinstance(row, dict) or k not in row]
            if missing:
                raise EvaluationError(f"{path}:{line_no} lacks tinyMMLU field(s) {missing}; rows need "
                                      f"{list(REQUIRED_FIELDS)} (and 'subject' for the subject-balanced score)")
            n += 1
    if n == 0:
        raise EvaluationError(f"--data {path} holds no rows")
    return n


def spread_subset(path: Path, n_items: int, out: Path) -> Path:
    """Write n_items rows of `path`, evenly spaced over the file, to `out`.

    lm-eval's --limit takes the first rows, which in MMLU's subject order means one or two subjects;
    evenly spaced rows cover every subject, so a small limit still gives a subject-balanced score.
    """
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    step = len(rows) / n_items
    out.write_text("".join(rows[int(i * step)] + "\n" for i in range(n_items)), encoding="utf-8")
    return out


# --- Statistics ---------------------------------------------------------------------------------------


def wilson_interval(successes: float, n: int, z: float = Z95) -> list[float]:
    """Wilson score interval for a binomial proportion (it always contains successes / n)."""
    if n <= 0:
        raise ValueError("the Wilson interval needs n > 0")
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return [max(0.0, center - half), min(1.0, center + half)]


def macro_interval(subject_means: list[float]) -> list[float] | None:
    """Student-t interval of the mean of subject accuracies (see the module docstring); None if k < 2."""
    from scipy.stats import t

    k = len(subject_means)
    if k < 2:
        return None
    mean = sum(subject_means) / k
    sd = math.sqrt(sum((m - mean) ** 2 for m in subject_means) / (k - 1))
    half = float(t.ppf(0.975, k - 1)) * sd / math.sqrt(k)
    return [max(0.0, mean - half), min(1.0, mean + half)]


def subject_means(samples: list[dict], metric: str) -> dict[str, tuple[int, float]] | None:
    """{subject: (n items, mean score)} in subject order; None when some item has no subject."""
    by_subject: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        if sample.get("subject") is None:
            return None
        by_subject[sample["subject"]].append(float(sample[metric]))
    return {subject: (len(v), sum(v) / len(v)) for subject, v in sorted(by_subject.items())}


def accuracy_stats(samples: list[dict], metric: str) -> tuple[dict, dict | None]:
    """(micro, subject-balanced) accuracy of `metric`, each {"value", "ci95_low", "ci95_high", ...}."""
    scores = [float(s[metric]) for s in samples]
    low, high = wilson_interval(sum(scores), len(scores))
    micro = {"value": sum(scores) / len(scores), "ci95_low": low, "ci95_high": high, "n": len(scores)}
    means = subject_means(samples, metric)
    if means is None:
        return micro, None
    values = [m for _, m in means.values()]
    interval = macro_interval(values) or [None, None]
    macro = {"value": sum(values) / len(values), "ci95_low": interval[0], "ci95_high": interval[1],
             "n_subjects": len(values)}
    return micro, macro


# --- IRT ----------------------------------------------------------------------------------------------


def anchor_scores(samples: list[dict], params: dict, metric: str = "acc_norm") -> tuple[list[float] | None, str | None]:
    """The tinyMMLU anchor scores in anchor order (y[i] scores seen_examples[i]), or (None, why not).

    Items that carry `tb_index` are matched by it, so a run over all of MMLU yields the anchors. Items
    without it must be the Hub task's: tinyMMLU's rows are the anchors themselves, doc_id i = anchor i.
    """
    seen = [int(i) for i in params[IRT_BENCH]["seen_examples"]]
    if samples and all("tb_index" in s for s in samples):
        by_index = {int(s["tb_index"]): float(s[metric]) for s in samples}
        covered = sum(i in by_index for i in seen)
        if covered < len(seen):
            return None, (f"IRT not computed: needs the {len(seen)} tinyMMLU anchor items; the data holds "
                          f"{covered} of them (matched by tb_index)")
        return [by_index[i] for i in seen], None
    if len(samples) != len(seen):
        return None, f"IRT not computed: needs the {len(seen)} tinyMMLU anchor items; this run scored {len(samples)}"
    return [float(s[metric]) for s in sorted(samples, key=lambda s: int(s["doc_id"]))], None


def _irt_precheck(samples: list[dict], from_hub_task: bool) -> str | None:
    """Why IRT cannot apply to these items, judged without the parameter file (so nothing is downloaded
    in vain); None if it may apply. tinyMMLU has 100 anchors; the parameter file is checked again later."""
    if not samples:
        return "IRT not computed: no items were scored"
    has_tb_index = all("tb_index" in s for s in samples)
    if not from_hub_task and not has_tb_index:
        return ("IRT not computed: needs the 100 tinyMMLU anchor items; the local data has no tb_index field "
                "to find them by")
    if len(samples) < 100:
        return f"IRT not computed: needs the 100 tinyMMLU anchor items; this run scored only {len(samples)} items"
    if from_hub_task and len(samples) != 100:
        return f"IRT not computed: tinyMMLU should have 100 items, this run scored {len(samples)}"
    return None


def _load_params_file(path: Path) -> dict:
    if not path.is_file():
        raise EvaluationError(f"IRT parameter file {path}: no such file")
    try:
        params = irt.load_irt_params(path)
    except Exception as err:  # noqa: BLE001 - any unreadable or refused pickle is the user's file problem
        raise EvaluationError(f"cannot read IRT parameter file {path}: {err}") from None
    if IRT_BENCH not in params:
        raise EvaluationError(f"IRT parameter file {path} has no {IRT_BENCH!r} bench (has {sorted(params)})")
    return params


def irt_for_samples(samples: list[dict], from_hub_task: bool, params: dict | None = None,
                    params_source: str | None = None, metric: str = "acc_norm") -> dict:
    """summary.json's IRT fields: "irt" ({irt, pirt, gpirt} or None) and "irt_note" (why None).

    params None: the official tinyBenchmarks.pkl, fetched (sha256-checked) only when the items allow IRT.
    """
    note = _irt_precheck(samples, from_hub_task)
    if note is not None:
        return {"irt": None, "irt_note": note}
    if params is None:
        path = irt.fetch_official_params()
        if path is None:
            return {"irt": None, "irt_note": "IRT not computed: tinyBenchmarks parameter file unavailable (the "
                                             "official tinyBenchmarks.pkl could not be downloaded and verified; "
                                             "pass --irt-params FILE)"}
        params = irt.load_irt_params(path, expected_sha256=irt.OFFICIAL_PARAMS_SHA256)
        params_source = f"{path} (official, sha256 {irt.OFFICIAL_PARAMS_SHA256})"
    y, note = anchor_scores(samples, params, metric)
    if y is None:
        return {"irt": None, "irt_note": note}
    return {"irt": irt.estimate(y, params, IRT_BENCH), "irt_note": None, "irt_metric": metric,
            "irt_params": params_source}


# --- Models -------------------------------------------------------------------------------------------


def _torch_dtype(name: str, device: str, auto_means_saved: bool):
    from dist_llama.devices import resolve_dtype

    return "auto" if name == "auto" and auto_means_saved else resolve_dtype(name, device)


def _check_model(model: str, option: str = "--model",
                 expected: str = "a release folder, a Hub id or, for ppl, a checkpoint") -> str:
    """The model (or tokenizer) name to load: see consolidate.local_path_or_hub_id."""
    from dist_llama.consolidate import ReleaseError, local_path_or_hub_id

    try:
        return local_path_or_hub_id(model, option)
    except ReleaseError as err:
        raise EvaluationError(f"{err}; give {expected}") from None


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def load_model(source: str, *, device: str, dtype, rope_scaling_factor: float | None = None,
               min_positions: int | None = None, tokenizer: str | None = None):
    """(model, tokenizer) from a release folder or Hub id, rope scaling overridden when a factor is given.

    rope_scaling_factor F sets linear scaling (Position Interpolation) with factor F, and F = 1 plain RoPE,
    whatever the saved config says; None keeps the saved setting.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=True)
        if rope_scaling_factor is not None:
            theta = _rope_theta(config)
            config.rope_parameters = (
                {"rope_type": "default", "rope_theta": theta} if rope_scaling_factor == 1
                else {"rope_type": "linear", "factor": float(rope_scaling_factor), "rope_theta": theta}
            )
        if min_positions and getattr(config, "max_position_embeddings", min_positions) < min_positions:
            # Extrapolating past the trained length is the point of the long-context study; RoPE has no
            # table to outgrow, the config field only has to admit the positions.
            config.max_position_embeddings = min_positions
        model = AutoModelForCausalLM.from_pretrained(source, config=config, trust_remote_code=True, dtype=dtype)
    except OSError as err:
        raise EvaluationError(f"cannot load model {source}: {str(err).splitlines()[0]}") from None
    model.to(device).eval()

    tok_source = tokenizer or source
    if tokenizer is None and Path(source).is_dir() and not (Path(source) / "tokenizer.json").is_file():
        logger.warning("%s has no tokenizer.json; using the project's (offline-built Mistral) tokenizer", source)
        tok_source = "offline"
    if tok_source == "offline":
        from dist_llama.tokenizer import load_tokenizer

        return model, load_tokenizer("offline")
    try:
        tok_source = _check_model(tok_source, "--tokenizer", "a tokenizer folder or Hub id")
        tok = AutoTokenizer.from_pretrained(tok_source, trust_remote_code=True)
    except OSError as err:
        raise EvaluationError(f"cannot load tokenizer {tok_source}: {str(err).splitlines()[0]}") from None
    return model, tok


# --- tinyMMLU through lm-eval ---------------------------------------------------------------------------


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
    lines = [f"{summary['task']} on {summary['model']}: {summary['n']} items, "
             f"{summary['n_subjects'] or 'no'} subjects, {summary['items_per_s']:.2f} items/s"]
    for metric in ("acc", "acc_norm"):
        lines.append(f"  {metric:<8} {_fmt_stat(summary[metric])}   subject-balanced "
                     f"{_fmt_stat(summary[metric + '_macro'])}   (95% CI)")
    if summary["irt"] is not None:
        lines.append("  IRT      " + "  ".join(f"{k} {v:.4f}" for k, v in summary["irt"].items()))
    else:
        lines.append(f"  IRT      null: {summary['irt_note']}")
    return "\n".join(lines)


def run_mmlu(model: str, output_dir: str | Path, data: str | Path | None = None, limit: int | None = None,
             batch_size: int | str = 4, device: str | None = None, irt_params: str | Path | None = None,
             dtype: str = "auto", tokenizer: str | None = None) -> dict:
    """Evaluate `model` on tinyMMLU (Hub) or a local tinyMMLU-format JSONL; write results, samples, summary.

    Returns the summary dict (also written to output_dir/summary.json). irt_params: a tinyBenchmarks pickle;
    None fetches the official one if (and only if) the item set allows IRT.
    """
    model = _check_model(str(model))
    output_dir = Path(output_dir)
    data = Path(data) if data is not None else None
    if limit is not None and limit <= 0:
        raise EvaluationError(f"--limit must be positive, got {limit}")
    lm_eval_limit = limit
    if data is not None and check_mmlu_data(data) > (limit or float("inf")):
        output_dir.mkdir(parents=True, exist_ok=True)
        data, lm_eval_limit = spread_subset(data, limit, output_dir / "items.jsonl"), None
    if dtype not in DTYPE_CHOICES:
        raise EvaluationError(f"--dtype {dtype!r}: choose one of {DTYPE_CHOICES}")
    # A bad parameter file should fail before the model runs, not after.
    params = _load_params_file(Path(irt_params)) if irt_params is not None else None
    from dist_llama.devices import default_device

    device = device or default_device()
    output_dir.mkdir(parents=True, exist_ok=True)
    task_name, task_path = write_task(output_dir, data)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    hf_model, tok = load_model(model, device=device, dtype=_torch_dtype(dtype, device, auto_means_saved=True),
                               tokenizer=tokenizer)
    lm = HFLM(pretrained=hf_model, tokenizer=tok, trust_remote_code=True, batch_size=batch_size, device=device)
    task_manager = TaskManager(include_path=str(task_path.parent), include_defaults=False)
    start = time.perf_counter()
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=[task_name], task_manager=task_manager, limit=lm_eval_limit,
                                          log_samples=True)
    except (ConnectionError, OSError) as err:
        where = f"{HUB_DATASET} from the Hub" if data is None else str(data)
        raise EvaluationError(f"cannot load the items ({where}): {str(err).splitlines()[0]}; "
                              "for an offline run pass --data FILE.jsonl") from None
    seconds = time.perf_counter() - start

    samples = sorted((_sample_record(s) for s in results.pop("samples")[task_name]), key=lambda r: r["doc_id"])
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
        (output_dir / "per_subject.json").write_text(json.dumps(
            {subject: {"n": n, "acc": m, "acc_norm": by_subject["acc_norm"][subject][1]}
             for subject, (n, m) in by_subject["acc"].items()}, indent=2))
    summary = {
        "task": task_name,
        "model": model,
        "data": str(data.resolve()) if data is not None else f"hf://{HUB_DATASET} ({HUB_DATASET_CONFIG}, test)",
        "n": len(samples),
        "n_subjects": len(by_subject["acc"]) if by_subject["acc"] is not None else None,
        "limit": limit,
        "device": device,
        "dtype": str(hf_model.dtype).removeprefix("torch."),
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


# --- Loss by position -----------------------------------------------------------------------------------


def bucket_edges(seq_len: int, n_buckets: int = N_BUCKETS) -> list[tuple[int, int]]:
    """[start, end) position ranges of n_buckets near-equal buckets (seq_len / n_buckets each when it divides)."""
    cuts = [round(i * seq_len / n_buckets) for i in range(n_buckets + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _resolve_checkpoint(model: str, workdir: str, tokenizer: str | None = None) -> str:
    """An HF folder or Hub id as is; a DCP checkpoint or run folder consolidated into workdir first."""
    path = Path(model)
    if not path.is_dir() or (path / "config.json").is_file():
        return model
    try:
        from dist_llama.consolidate import consolidate
    except ImportError as err:
        raise EvaluationError(f"{model} is not a release folder (no config.json), and checkpoints cannot be "
                              f"consolidated here: {err}") from None
    logger.info("consolidating checkpoint %s into a temporary release folder", model)
    try:
        # Stock Llama: transformers' own RoPE implements the rope_parameters override, and the parity
        # tests tie our model to it.
        return str(consolidate(model, Path(workdir) / "release", dtype="fp32", stock_llama=True,
                               tokenizer=tokenizer))
    except Exception as err:  # noqa: BLE001 - CheckpointError, ReleaseError, ConfigError: all "not a checkpoint"
        raise EvaluationError(f"cannot consolidate {model}: {err}") from None


ENCODE_BATCH = 64  # documents tokenized per call while looking for long enough ones


def _document_windows(documents: Iterable[str], tokenizer, seq_len: int, wanted: int | None):
    """One window of seq_len + 1 tokens from the start of each document that has that many, for the first
    `wanted` such documents (all when None); returns (windows, documents read, longest document's tokens).

    Documents are encoded as training encodes them, [bos] doc [eos], but never joined: in a packed stream
    the late positions of a window mostly follow an earlier, unrelated document (OpenWebText documents
    are shorter than a 1024 window on average), which would dilute a long-context comparison. Here
    position p always has p tokens of its own document before it.
    """
    import numpy as np
    import torch

    from dist_llama.data import DocumentEncoder  # the trainer's document encoding

    encoder = DocumentEncoder(tokenizer)
    documents = iter(documents)
    windows, read, longest = [], 0, 0
    while wanted is None or len(windows) < wanted:
        batch = list(itertools.islice(documents, ENCODE_BATCH))
        if not batch:
            break
        for tokens in encoder.encode(batch):
            read += 1
            longest = max(longest, len(tokens))
            if len(tokens) > seq_len:
                windows.append(tokens[: seq_len + 1])
                if len(windows) == wanted:
                    break
    if not windows:
        return None, read, longest
    return torch.from_numpy(np.stack(windows).astype(np.int64)), read, longest


def loss_by_position(model: str, data: str | Path, seq_len: int = 1024, docs: int | None = 32,
                     rope_scaling_factor: float | None = None, device: str | None = None, dtype: str = "auto",
                     batch_size: int = 8, text_field: str = "text", tokenizer: str | None = None,
                     label: str | None = None) -> dict:
    """Mean next-token loss per position bucket, and overall, over the first `docs` documents of `data`
    that have at least seq_len + 1 tokens, one window from each document's start (see _document_windows).

    Position p is the loss of predicting window token p + 1 from tokens 0..p. model: a release folder,
    Hub id, or DCP checkpoint / run folder (consolidated to a temporary folder first).
    """
    import torch
    import torch.nn.functional as F

    model = _check_model(str(model))
    if seq_len < N_BUCKETS:
        raise EvaluationError(f"--seq-len must be at least {N_BUCKETS}, got {seq_len}")
    if docs is not None and docs <= 0:
        raise EvaluationError(f"--docs must be positive, got {docs}")
    if rope_scaling_factor is not None and not rope_scaling_factor >= 1:
        raise EvaluationError(f"--rope-scaling-factor must be >= 1 (it divides positions), got {rope_scaling_factor}")
    if batch_size <= 0:
        raise EvaluationError(f"--batch-size must be positive, got {batch_size}")
    if dtype not in DTYPE_CHOICES:
        raise EvaluationError(f"--dtype {dtype!r}: choose one of {DTYPE_CHOICES}")
    from dist_llama.data import expand_paths, iter_documents

    if not expand_paths([str(data)]):
        raise EvaluationError(f"--data {data}: no such file")
    from dist_llama.devices import default_device

    device = device or default_device()
    torch_dtype = _torch_dtype(dtype, device, auto_means_saved=False)

    with tempfile.TemporaryDirectory(prefix="dist_llama_eval_") as workdir:
        source = _resolve_checkpoint(model, workdir, tokenizer)
        hf_model, tok = load_model(source, device=device, dtype=torch_dtype, rope_scaling_factor=rope_scaling_factor,
                                   min_positions=seq_len, tokenizer=tokenizer)
    try:
        windows, n_read, longest = _document_windows(iter_documents([str(data)], text_field), tok, seq_len, docs)
    except ValueError as err:
        raise EvaluationError(f"--data {data}: {err}") from None
    if windows is None:
        raise EvaluationError(f"--data {data}: none of its {n_read} documents has the seq_len + 1 = {seq_len + 1} "
                              f"tokens a window needs (the longest has {longest}); give longer documents or "
                              "lower --seq-len")
    logger.info("loss by position: %d documents of at least %d tokens (of %d read), one window from each "
                "document's start", len(windows), seq_len + 1, n_read)
    if docs is not None and len(windows) < docs:
        logger.warning("only %d of the %d documents in %s have at least %d tokens (asked for %d)",
                       len(windows), n_read, data, seq_len + 1, docs)

    loss_sum = torch.zeros(seq_len, dtype=torch.float64)
    with torch.no_grad():
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            out = hf_model(input_ids=batch[:, :-1])
            logits = out.logits if hasattr(out, "logits") else out[0]
            loss = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")
            loss_sum += loss.sum(0).double().cpu()
    per_position = (loss_sum / len(windows)).tolist()

    # {"0-255": mean loss, ...}: keys name inclusive position ranges, in position order.
    buckets = {f"{start}-{end - 1}": sum(per_position[start:end]) / (end - start)
               for start, end in bucket_edges(seq_len)}
    overall = sum(per_position) / seq_len
    rope = getattr(hf_model.config, "rope_parameters", None)
    return {
        "label": label or default_label(model, rope_scaling_factor),
        "model": model,
        "data": str(Path(data).resolve()),
        "seq_len": seq_len,
        "windows": "one from the start of each document of at least seq_len + 1 tokens ([bos] doc [eos])",
        "docs_read": n_read,
        "docs_qualified": len(windows),
        "n_windows": len(windows),
        "n_tokens": len(windows) * seq_len,
        "rope_scaling_factor": rope_scaling_factor,
        "rope_parameters": dict(rope) if rope else None,
        "device": device,
        "dtype": str(hf_model.dtype).removeprefix("torch."),
        "loss": overall,
        "ppl": math.exp(overall),
        "buckets": buckets,
        "loss_by_position": per_position,
    }


def default_label(model: str, rope_scaling_factor: float | None) -> str:
    name = Path(model.rstrip("/")).name or "model"
    return name if rope_scaling_factor is None else f"{name}-rope{rope_scaling_factor:g}"


def bucket_midpoints(buckets: dict[str, float]) -> list[float]:
    """Midpoints of "start-end" bucket names."""
    return [sum(int(x) for x in name.split("-")) / 2 for name in buckets]


def _safe_filename(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def plot_loss_by_position(results: list[dict], path: str | Path) -> Path:
    """Loss at each bucket midpoint, one line per result's label, saved as an image (PNG by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise EvaluationError("nothing to plot: give at least one ppl JSON")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in results:
        ax.plot(bucket_midpoints(result["buckets"]), list(result["buckets"].values()), marker="o",
                label=result["label"])
    seq_lens = sorted({r["seq_len"] for r in results})
    ax.set_title(f"Held-out loss by position (window {', '.join(map(str, seq_lens))} tokens)")
    ax.set_xlabel("position in window (bucket midpoint)")
    ax.set_ylabel("mean next-token loss (nats)")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlim(0, max(seq_lens))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _read_ppl_json(path: Path) -> dict:
    if not path.is_file():
        raise EvaluationError(f"{path}: no such file")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EvaluationError(f"{path} is not JSON ({err})") from None
    if not isinstance(result, dict) or not {"label", "buckets", "seq_len"} <= set(result) \
            or not isinstance(result["buckets"], dict):
        raise EvaluationError(f"{path} is not a ppl result (needs label, seq_len and buckets)")
    return result


# --- Command line -------------------------------------------------------------------------------------


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {value!r}") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {size}")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dist_llama.evaluate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    mmlu = sub.add_parser("mmlu", help="tinyMMLU (or a local tinyMMLU-format JSONL) through lm-eval")
    mmlu.add_argument("--model", required=True, help="release folder or Hub id")
    mmlu.add_argument("--tasks", default=HUB_TASK, choices=[HUB_TASK],
                      help="tinyMMLU, run as our copy of lm-eval's task definition (see the module docstring)")
    mmlu.add_argument("--data", default=None, help="local JSONL with tinyMMLU's fields (default: the Hub dataset)")
    mmlu.add_argument("--limit", type=int, default=None,
                      help="N items: the first N of the Hub task, or N rows spread evenly over a --data file")
    mmlu.add_argument("--batch-size", type=_batch_size, default=4)
    mmlu.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    mmlu.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: as saved (lm-eval's default)")
    mmlu.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the model's)")
    mmlu.add_argument("--irt-params", default=None,
                      help="tinyBenchmarks parameter pickle (default: the official one, if reachable)")
    mmlu.add_argument("--output", required=True, help="output folder")

    irt_cmd = sub.add_parser("irt", help="IRT estimates from a samples jsonl, printed as JSON")
    irt_cmd.add_argument("--params", required=True, help="tinyBenchmarks parameter pickle")
    irt_cmd.add_argument("--samples", required=True, help="samples jsonl (ours or lm-eval --log_samples)")
    irt_cmd.add_argument("--metric", default="acc_norm")
    irt_cmd.add_argument("--bench", default=IRT_BENCH)

    ppl = sub.add_parser("ppl", help="held-out loss by position bucket")
    ppl.add_argument("--model", required=True, help="release folder, Hub id, or DCP checkpoint / run folder")
    ppl.add_argument("--data", required=True, help="documents (.jsonl, .jsonl.zst, .parquet, .txt)")
    ppl.add_argument("--text-field", default="text")
    ppl.add_argument("--seq-len", type=int, default=1024)
    ppl.add_argument("--docs", type=int, default=32, help="first N documents of at least seq-len + 1 tokens")
    ppl.add_argument("--rope-scaling-factor", type=float, default=None,
                     help="override RoPE: linear scaling (Position Interpolation) with this factor; 1 = plain RoPE")
    ppl.add_argument("--label", default=None, help="name in the JSON and the plot (default: model name + factor)")
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ppl.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    ppl.add_argument("--tokenizer", default=None, help="tokenizer folder, Hub id or 'offline' (default: the model's)")
    ppl.add_argument("--output", required=True, help="output folder; writes ppl_<label>.json")
    ppl.add_argument("--plot", default=None, help="also draw this result alone to this image file")

    plot = sub.add_parser("ppl-plot", help="plot loss by position from ppl JSON files")
    plot.add_argument("--inputs", nargs="+", required=True)
    plot.add_argument("--output", required=True, help="image file (e.g. plot.png)")
    return parser


def _run_irt(args) -> dict:
    params = _load_params_file(Path(args.params))
    if not Path(args.samples).is_file():
        raise EvaluationError(f"--samples {args.samples}: no such file")
    try:
        samples = [json.loads(line) for line in Path(args.samples).read_text().splitlines() if line.strip()]
        if samples and all("tb_index" in s for s in samples):
            # Items from a local MMLU file: the anchors are found by tb_index, as in the mmlu command.
            y, note = anchor_scores(samples, params, args.metric)
            if y is None:
                raise EvaluationError(note)
        else:
            y = irt.scores_from_samples(args.samples, metric=args.metric)
        return irt.estimate(y, params, args.bench)
    except (ValueError, KeyError) as err:
        raise EvaluationError(str(err).strip("'\"")) from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"mmlu", "irt", "ppl", "ppl-plot"}
    if argv and argv[0] not in commands and argv[0] not in {"-h", "--help"}:
        argv.insert(0, "mmlu")  # `python -m dist_llama.evaluate --model ...` means mmlu
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a weight-loading bar would run into an error line on stderr
    try:
        if args.command == "mmlu":
            summary = run_mmlu(args.model, args.output, data=args.data, limit=args.limit, batch_size=args.batch_size,
                               device=args.device, irt_params=args.irt_params, dtype=args.dtype,
                               tokenizer=args.tokenizer)
            print(format_summary(summary))
            print(f"wrote results.json, samples_{summary['task']}.jsonl and summary.json to {args.output}")
        elif args.command == "irt":
            print(json.dumps(_run_irt(args)))
        elif args.command == "ppl":
            result = loss_by_position(args.model, args.data, seq_len=args.seq_len, docs=args.docs,
                                      rope_scaling_factor=args.rope_scaling_factor, device=args.device,
                                      dtype=args.dtype, batch_size=args.batch_size, text_field=args.text_field,
                                      tokenizer=args.tokenizer, label=args.label)
            out = Path(args.output)
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"ppl_{_safe_filename(result['label'])}.json"
            path.write_text(json.dumps(result, indent=2))
            buckets = "  ".join(f"{name}: {loss:.4f}" for name, loss in result["buckets"].items())
            print(f"{result['label']}: loss {result['loss']:.4f} over {result['n_windows']} windows (documents of "
                  f"at least {result['seq_len'] + 1} tokens: {result['docs_qualified']} of {result['docs_read']} "
                  f"read) | {buckets}")
            if args.plot:
                plot_loss_by_position([result], args.plot)
                print(f"wrote {args.plot}")
            print(f"wrote {path}")
        else:
            path = plot_loss_by_position([_read_ppl_json(Path(p)) for p in args.inputs], args.output)
            print(f"wrote {path}")
    except EvaluationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
