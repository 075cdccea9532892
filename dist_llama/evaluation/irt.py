"""tinyBenchmarks IRT estimates (irt, p-IRT, gp-IRT) for tinyMMLU, reimplemented without the package.

This file owns four things:
  * loading a tinyBenchmarks parameter file (`tinyBenchmarks.pkl`) safely: optional sha256 pin, then a
    restricted unpickler that admits only what pickled numpy arrays need;
  * turning an lm-eval `--log_samples` jsonl into the 100 anchor scores in doc_id order;
  * the estimator itself, reproducing `tinyBenchmarks.evaluate(y, bench)` of
    felipemaiapolo/tinyBenchmarks at commit e9a8b1031b0340571beb6c9ca3a27891be09a8fd;
  * from scored items to estimates: summary.json's IRT fields for an evaluation run, and the estimates
    of the `irt` command from a samples file. IRT is computed only for the 100 tinyMMLU anchor
    items: the Hub task run in full (doc_id i is anchor i), or a local file whose rows carry `tb_index`
    and include every anchor (e.g. all of MMLU). Otherwise summary.json has "irt": null and an
    "irt_note" saying why.

We reimplement instead of depending on `tinyBenchmarks` because it is not on PyPI and downloads its
parameter file from raw.githubusercontent.com at run time, which these machines cannot reach.

The estimator, for one scenario with items 0..N-1 and anchors S (|S| = n, y_s the anchor scores):
  item curve     p_i(theta) = sigmoid( sum_d clip(A[0,d,i] * theta_d - B[0,d,i], -30, 30) )
                 (clip per dimension, then sum; a B with one row broadcasts across all D dimensions,
                 exactly as upstream's numpy expression does)
  ability        theta = argmin_theta -sum_{s in S} [ y_s log(p_s + 1e-10) + (1 - y_s) log(1 - p_s + 1e-10) ]
                 by scipy BFGS from theta = 0 with finite-difference gradients (upstream's call; an exact
                 gradient would move the stopping point when the MLE diverges, e.g. all-correct anchors)
  balance        w_i = N / (n_subscenarios * n_sub(i)), so every subject counts equally
  irt            sum_{s in S} examples_weights_s * y_s
  pirt           lam * mean_{s in S}(w_s y_s) + (1 - lam) * mean_{i not in S}(w_i p_i(theta)),  lam = n / N
  gpirt          optimal_lambda * irt + (1 - optimal_lambda) * pirt

Checked against tests/test_irt.py's reference vectors, which upstream `evaluate` produced. To cross-check
against the package itself where it is installed: put the same pickle in the working directory as
`tinyBenchmarks.pkl` and compare `tinyBenchmarks.evaluate(np.array(y), "mmlu")["mmlu"]` with
`estimate(y, load_irt_params(path))`.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import os
import pickle
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from dist_llama.evaluation import EvaluationError

logger = logging.getLogger(__name__)

OFFICIAL_PARAMS_URL = (
    "https://raw.githubusercontent.com/felipemaiapolo/tinyBenchmarks/"
    "e9a8b1031b0340571beb6c9ca3a27891be09a8fd/tinyBenchmarks/tinyBenchmarks.pkl"
)
# Pinned by a third party; nobody working on this repository has been able to download the file and
# check it, so a mismatch means "investigate", not necessarily "tampered".
OFFICIAL_PARAMS_SHA256 = "c3b6e426dfe7b100fe6d0ee960398e10a8763254bcead3be80cc6bc15abca284"
OFFICIAL_PARAMS_FILENAME = "tinyBenchmarks.pkl"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "dist_llama"
DOWNLOAD_TIMEOUT_S = 20
IRT_BENCH = "mmlu"  # the bench of the parameter file that tinyMMLU's anchors belong to

# Upstream's constants: logits are clipped per dimension, and the log-likelihood adds eps inside the logs.
# Changing either changes theta when the anchors are all right or all wrong.
LOGIT_CLIP = 30.0
LOG_EPS = 1e-10

# Globals a pickle of builtin containers and numpy arrays may reference. Pickles written by numpy 1.x
# name `numpy.core.*`, numpy 2.x `numpy._core.*`; protocol 5 stores arrays via `_frombuffer`, protocol
# <= 2 stores bytes via `_codecs.encode`. Everything else (os.system, eval, ...) is refused.
_NUMPY_CORE_GLOBALS = {
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),
}
_ALLOWED_GLOBALS = (
    {(f"{core}.{sub}", name) for core in ("numpy.core", "numpy._core") for sub, name in _NUMPY_CORE_GLOBALS}
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
    | {("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset")}
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler whose find_class admits only `_ALLOWED_GLOBALS`, so loading cannot run arbitrary code."""

    def find_class(self, module: str, name: str):
        # Protocol <= 2 pickles name Python 2's `__builtin__`; plain pickle renames it the same way.
        if module == "__builtin__":
            module = "builtins"
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: an IRT parameter file holds only dicts, "
                "lists and numpy arrays"
            )
        # `numpy.core` is a deprecated alias in numpy 2, due to go; prefer the real module when present.
        if module.startswith("numpy.core."):
            modern = "numpy._core." + module.removeprefix("numpy.core.")
            try:
                return getattr(importlib.import_module(modern), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_irt_params(path: str | os.PathLike, expected_sha256: str | None = None) -> dict:
    """Load a tinyBenchmarks parameter pickle; check its sha256 first when one is given."""
    data = Path(path).read_bytes()
    if expected_sha256 is not None:
        actual = _sha256_hex(data)
        if actual != expected_sha256.lower():
            raise ValueError(f"sha256 mismatch for {path}: expected {expected_sha256}, got {actual}")
    params = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    if not isinstance(params, dict):
        raise ValueError(f"{path} does not hold a dict of benches (got {type(params).__name__})")
    return params


def fetch_official_params(cache_dir: Path | None = None) -> Path | None:
    """Path of a sha256-verified copy of the official tinyBenchmarks.pkl (downloaded once), or None if
    unobtainable."""
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    target = cache_dir / OFFICIAL_PARAMS_FILENAME
    if target.is_file():
        if _sha256_hex(target.read_bytes()) == OFFICIAL_PARAMS_SHA256:
            return target
        logger.warning("cached %s does not match the pinned sha256; downloading again", target)

    try:
        with urllib.request.urlopen(OFFICIAL_PARAMS_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as err:  # URLError, HTTPError, timeouts, resets
        logger.warning(
            "IRT estimates cannot be computed: could not download %s (%s); name a local copy with "
            "--irt-params FILE (python -m dist_llama.evaluate) or --eval.irt_params=FILE (a config)",
            OFFICIAL_PARAMS_URL,
            err,
        )
        return None
    actual = _sha256_hex(data)
    if actual != OFFICIAL_PARAMS_SHA256:
        logger.warning(
            "IRT estimates cannot be computed: %s has sha256 %s, not the pinned %s",
            OFFICIAL_PARAMS_URL,
            actual,
            OFFICIAL_PARAMS_SHA256,
        )
        return None

    # Write then rename so an interrupted download never leaves a truncated file under the final name.
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".tinyBenchmarks.", delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, target)
    return target


def scores_from_samples(samples_path: str | os.PathLike, metric: str = "acc_norm") -> list[float]:
    """Per-document scores from an lm-eval `--log_samples` jsonl, ordered by doc_id (= anchor index)."""
    by_doc_id: dict[int, float] = {}
    with open(samples_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            sample = json.loads(line)
            if "doc_id" not in sample or metric not in sample:
                raise ValueError(
                    f"{samples_path}:{line_no}: need 'doc_id' and {metric!r}, found keys {sorted(sample)}"
                )
            doc_id = int(sample["doc_id"])
            if doc_id in by_doc_id:
                raise ValueError(f"{samples_path}:{line_no}: duplicate doc_id {doc_id}")
            by_doc_id[doc_id] = float(sample[metric])
    if not by_doc_id:
        raise ValueError(f"{samples_path} holds no samples")
    # With several processes lm-eval writes rank-major, so file order is not doc order.
    doc_ids = sorted(by_doc_id)
    if doc_ids != list(range(len(doc_ids))):
        missing = sorted(set(range(doc_ids[-1] + 1)) - set(doc_ids))
        raise ValueError(
            f"{samples_path}: doc_ids must be exactly 0..n-1; got {len(doc_ids)} ids in "
            f"[{doc_ids[0]}, {doc_ids[-1]}], missing {missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    return [by_doc_id[i] for i in doc_ids]


def item_response_probabilities(theta: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """P(correct) per item; theta (D,), A (1, D, n), B (1, D or 1, n) in tinyBenchmarks' layout."""
    logits = np.clip(A * theta.reshape(1, -1, 1) - B, -LOGIT_CLIP, LOGIT_CLIP).sum(axis=1)
    return 1.0 / (1.0 + np.exp(-logits))[0]


def fit_ability(anchor_scores: np.ndarray, A_seen: np.ndarray, B_seen: np.ndarray) -> np.ndarray:
    """Maximum-likelihood ability theta (D,) from the anchor scores, as upstream fits it."""

    def negative_log_likelihood(theta: np.ndarray) -> float:
        p = item_response_probabilities(theta, A_seen, B_seen)
        return -np.sum(anchor_scores * np.log(p + LOG_EPS) + (1 - anchor_scores) * np.log(1 - p + LOG_EPS))

    dims = A_seen.shape[1]
    return minimize(negative_log_likelihood, np.zeros(dims), method="BFGS").x


def _balance_weights(n_items: int, subscenarios_position: dict) -> np.ndarray:
    weights = np.ones(n_items)
    for positions in subscenarios_position.values():
        weights[positions] = n_items / (len(subscenarios_position) * len(positions))
    return weights


def estimate(y: Sequence[float], params: dict, bench: str = IRT_BENCH) -> dict[str, float]:
    """tinyBenchmarks' {'irt', 'pirt', 'gpirt'} for `bench` from anchor scores y (y[i] scores
    seen_examples[i])."""
    if bench not in params:
        raise KeyError(f"bench {bench!r} not in the parameter file; available benches: {sorted(params)}")
    bench_params = params[bench]
    scenarios = list(bench_params["scenarios_position"])
    if scenarios != [bench]:
        # The multi-scenario benches ('lb', 'helm_lite') return one estimate per scenario upstream;
        # nothing here needs them, so refuse rather than return a single misleading number.
        raise ValueError(
            f"bench {bench!r} has scenarios {scenarios}; only single-scenario benches are supported"
        )

    seen = np.asarray(bench_params["seen_examples"], dtype=np.int64)
    scores = np.asarray(y, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"y must be a flat sequence of scores, got shape {scores.shape}")
    if len(scores) != len(seen):
        raise ValueError(
            f"y must hold one score per anchor item: expected length {len(seen)}, got {len(scores)}"
        )
    if not np.all((scores >= 0) & (scores <= 1)):
        raise ValueError("y must hold scores in [0, 1]")
    if len(np.unique(seen)) != len(seen):
        raise ValueError(f"seen_examples of bench {bench!r} repeats an item")

    A = np.asarray(bench_params["irt_parameters"]["A"], dtype=np.float64)
    B = np.asarray(bench_params["irt_parameters"]["B"], dtype=np.float64)
    positions = np.asarray(bench_params["scenarios_position"][bench], dtype=np.int64)
    # Upstream sizes the item space by the largest position, not by A's width.
    n_items = int(positions.max()) + 1
    if len(positions) != n_items or A.shape[2] < n_items:
        raise ValueError(f"bench {bench!r}: positions must be 0..N-1 and A must cover them (A is {A.shape})")

    theta = fit_ability(scores, A[:, :, seen], B[:, :, seen])
    probabilities = item_response_probabilities(theta, A[:, :, :n_items], B[:, :, :n_items])
    balance = _balance_weights(n_items, bench_params["subscenarios_position"][bench])
    unseen = np.ones(n_items, dtype=bool)
    unseen[seen] = False

    irt = float(np.sum(np.asarray(bench_params["examples_weights"][bench], dtype=np.float64) * scores))
    # p-IRT trusts the observed anchors for the share n/N of the items they are, the IRT model for the rest.
    observed_share = len(seen) / n_items
    pirt = float(
        observed_share * np.mean(balance[seen] * scores)
        + (1 - observed_share) * np.mean(balance[unseen] * probabilities[unseen])
    )
    blend = float(bench_params["optimal_lambdas"][bench])
    gpirt = blend * irt + (1 - blend) * pirt
    return {"irt": irt, "pirt": pirt, "gpirt": gpirt}


# --- From scored items to estimates ------------------------------------------------------------------


def anchor_scores(
    samples: list[dict], params: dict, metric: str = "acc_norm"
) -> tuple[list[float] | None, str | None]:
    """The tinyMMLU anchor scores in anchor order (y[i] scores seen_examples[i]), or (None, why not).

    Items that carry `tb_index` are matched by it, so a run over all of MMLU yields the anchors. Items
    without it must be the Hub task's: tinyMMLU's rows are the anchors themselves, doc_id i = anchor i.
    """
    seen = [int(i) for i in params[IRT_BENCH]["seen_examples"]]
    if samples and all("tb_index" in s for s in samples):
        by_index = {int(s["tb_index"]): float(s[metric]) for s in samples}
        covered = sum(i in by_index for i in seen)
        if covered < len(seen):
            return None, (
                f"IRT not computed: needs the {len(seen)} tinyMMLU anchor items; the data holds "
                f"{covered} of them (matched by tb_index)"
            )
        return [by_index[i] for i in seen], None
    if len(samples) != len(seen):
        return (
            None,
            f"IRT not computed: needs the {len(seen)} tinyMMLU anchor items; this run scored {len(samples)}",
        )
    return [float(s[metric]) for s in sorted(samples, key=lambda s: int(s["doc_id"]))], None


def _irt_precheck(samples: list[dict], from_hub_task: bool) -> str | None:
    """Why IRT cannot apply to these items, judged without the parameter file (so nothing is downloaded
    in vain); None if it may apply. tinyMMLU has 100 anchors; the parameter file is checked again later."""
    if not samples:
        return "IRT not computed: no items were scored"
    has_tb_index = all("tb_index" in s for s in samples)
    if not from_hub_task and not has_tb_index:
        return (
            "IRT not computed: needs the 100 tinyMMLU anchor items; the local data has no tb_index field "
            "to find them by"
        )
    if len(samples) < 100:
        return (
            "IRT not computed: needs the 100 tinyMMLU anchor items; "
            f"this run scored only {len(samples)} items"
        )
    if from_hub_task and len(samples) != 100:
        return f"IRT not computed: tinyMMLU should have 100 items, this run scored {len(samples)}"
    return None


def load_params_file(path: Path) -> dict:
    """A user-given parameter file that holds the tinyMMLU bench; raises EvaluationError naming the file."""
    if not path.is_file():
        raise EvaluationError(f"IRT parameter file {path}: no such file")
    try:
        params = load_irt_params(path)
    except Exception as err:  # noqa: BLE001 - any unreadable or refused pickle is the user's file problem
        raise EvaluationError(f"cannot read IRT parameter file {path}: {err}") from None
    if IRT_BENCH not in params:
        raise EvaluationError(f"IRT parameter file {path} has no {IRT_BENCH!r} bench (has {sorted(params)})")
    return params


def irt_for_samples(
    samples: list[dict],
    from_hub_task: bool,
    params: dict | None = None,
    params_source: str | None = None,
    metric: str = "acc_norm",
) -> dict:
    """summary.json's IRT fields: "irt" ({irt, pirt, gpirt} or None) and "irt_note" (why None).

    params None: the official tinyBenchmarks.pkl, fetched (sha256-checked) only when the items allow IRT.
    """
    note = _irt_precheck(samples, from_hub_task)
    if note is not None:
        return {"irt": None, "irt_note": note}
    if params is None:
        path = fetch_official_params()
        if path is None:
            return {
                "irt": None,
                "irt_note": "IRT not computed: tinyBenchmarks parameter file unavailable (the "
                "official tinyBenchmarks.pkl could not be downloaded and verified; "
                "pass --irt-params FILE)",
            }
        params = load_irt_params(path, expected_sha256=OFFICIAL_PARAMS_SHA256)
        params_source = f"{path} (official, sha256 {OFFICIAL_PARAMS_SHA256})"
    y, note = anchor_scores(samples, params, metric)
    if y is None:
        return {"irt": None, "irt_note": note}
    return {
        "irt": estimate(y, params, IRT_BENCH),
        "irt_note": None,
        "irt_metric": metric,
        "irt_params": params_source,
    }


def estimate_from_samples_file(
    path: str | os.PathLike, params: dict, metric: str = "acc_norm", bench: str = IRT_BENCH
) -> dict:
    """{irt, pirt, gpirt} from a samples jsonl (ours or lm-eval's); raises EvaluationError for unusable
    items."""
    try:
        samples = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        if samples and all("tb_index" in s for s in samples):
            # Items from a local MMLU file: the anchors are found by tb_index, as in the mmlu command.
            y, note = anchor_scores(samples, params, metric)
            if y is None:
                raise EvaluationError(note)
        else:
            y = scores_from_samples(path, metric=metric)
        return estimate(y, params, bench)
    except (ValueError, KeyError) as err:
        raise EvaluationError(str(err).strip("'\"")) from None
