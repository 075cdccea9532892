"""The lm-eval task we run, and checks of a local file of items.

Which task runs. Without --data the items are tinyBenchmarks/tinyMMLU from the Hub, with the prompt,
choices and target of lm-eval's built-in `tinyMMLU` task. We run our own copy of that task definition
(written to <output>/tasks/tinyMMLU.yaml) instead of the built-in one because the built-in aggregates
with `tinyBenchmarks` (not on PyPI), which fails to import where it is missing and downloads its
parameter file at run time; its per-item acc_norm is what ours records, and we compute the same gpirt
from it with dist_llama.evaluation.irt (sha256-pinned parameters). With --data FILE the same definition
reads a local JSONL (tinyMMLU's fields: input_formatted, answer, subject, ...) as task `tinymmlu_local`.
The written task folder also works with the stock CLI (one command line):
  lm_eval --model hf --model_args pretrained=DIR --tasks tinymmlu_local --include_path OUT/tasks
          --batch_size 4 --output_path OUT/cli --log_samples --device cuda:0 --trust_remote_code
"""

from __future__ import annotations

import json
from pathlib import Path

from dist_llama.evaluation import EvaluationError

HUB_TASK = "tinyMMLU"
LOCAL_TASK = "tinymmlu_local"
HUB_DATASET, HUB_DATASET_CONFIG = "tinyBenchmarks/tinyMMLU", "all"
REQUIRED_FIELDS = ("input_formatted", "answer")


def task_config(name: str, data: Path | None) -> dict:
    """lm-eval task config equal to the built-in tinyMMLU's except for the data source and the aggregation
    (mean acc / acc_norm instead of tinyBenchmarks' gpirt, which we compute from the samples ourselves)."""
    if data is None:
        source = {"dataset_path": HUB_DATASET, "dataset_name": HUB_DATASET_CONFIG}
    else:
        # lm-eval resolves relative data_files against the working directory, not the YAML: keep it absolute.
        source = {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(Path(data).resolve())}},
        }
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
                raise EvaluationError(
                    f"{path}:{line_no} lacks tinyMMLU field(s) {missing}; rows need "
                    f"{list(REQUIRED_FIELDS)} (and 'subject' for the subject-balanced score)"
                )
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
