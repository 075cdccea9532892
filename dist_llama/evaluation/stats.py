"""Accuracy and its 95% confidence intervals (in summary.json as ci95_low / ci95_high).

micro accuracy  Wilson score interval over the n items:
                (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = 1.96.
subject-balanced (macro) accuracy  mean of the k subject accuracies m_s, with a Student-t interval
                over them: M -+ t_{0.975, k-1} * sd(m_s) / sqrt(k), clipped to [0, 1]; null when k < 2.
                It treats subjects as a sample, so it also counts the spread of difficulty between
                subjects: conservative for "these k subjects", but it stays usable when a subject has
                one or two items (tinyMMLU), where a within-subject binomial error would be zero.
"""

from __future__ import annotations

import math
from collections import defaultdict

Z95 = 1.959963984540054


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
    macro = {
        "value": sum(values) / len(values),
        "ci95_low": interval[0],
        "ci95_high": interval[1],
        "n_subjects": len(values),
    }
    return micro, macro
