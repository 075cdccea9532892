"""Evaluation of a released model: tinyMMLU through lm-eval-harness (with IRT estimates), and held-out
loss by position. The command line over all of it is dist_llama/evaluate.py (`python -m dist_llama.evaluate`).

Where things live:
  tasks.py     the lm-eval task definition (our copy of tinyMMLU's), checks of a local item file, and
               the evenly spread subset a small --limit takes
  models.py    what is evaluated: a release folder, a Hub id, or a checkpoint consolidated first, loaded
               with an optional RoPE scaling override
  mmlu.py      the lm-eval run and what it writes (samples, per-subject scores, summary.json)
  stats.py     accuracy with 95% intervals (Wilson over items, Student-t over subjects)
  irt.py       tinyBenchmarks' IRT estimator, and which scored items it takes as the tinyMMLU anchors
  position.py  loss by position in a window of each document, and its plot
"""


class EvaluationError(Exception):
    """A user error (missing file, bad option, unloadable model); the command prints it as one line."""
