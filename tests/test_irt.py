"""Tests for dist_llama.evaluation.irt: reference vectors from upstream tinyBenchmarks, safe loading, input
checks."""

import hashlib
import io
import json
import logging
import os
import pickle
import re
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest

from dist_llama.evaluation import irt

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IRT_REFERENCE = SHARED_DATA / "tinymmlu" / "irt_reference"


def _reference_file(name: str) -> Path:
    path = IRT_REFERENCE / name
    if not path.is_file():
        pytest.fail(
            f"reference data {path} is missing; these tests need the shared/ folder beside the repo root"
        )
    return path


@pytest.fixture(scope="module")
def synthetic_params() -> dict:
    return irt.load_irt_params(_reference_file("synthetic_d5.pkl"))


def _reference_cases() -> list[dict]:
    path = IRT_REFERENCE / "synthetic_d5.expected.json"
    if not path.is_file():
        # Collection cannot pytest.fail; a single placeholder case makes the test fail with the reason.
        return [{"name": "missing-reference-data", "y": None, "expected": None}]
    return json.loads(path.read_text())["cases"]


@pytest.mark.parametrize("case", _reference_cases(), ids=lambda case: case["name"])
def test_estimate_matches_upstream_tinybenchmarks(case, synthetic_params):
    if case["y"] is None:
        pytest.fail(f"reference data {IRT_REFERENCE / 'synthetic_d5.expected.json'} is missing")
    got = irt.estimate(case["y"], synthetic_params, "mmlu")
    expected = case["expected"]
    assert set(got) == {"irt", "pirt", "gpirt"}
    # irt is a plain weighted sum, so only summation rounding may differ; pirt/gpirt go through an
    # optimizer with finite-difference gradients, where the README allows ~1e-4.
    assert abs(got["irt"] - expected["irt"]) <= 1e-12
    assert abs(got["pirt"] - expected["pirt"]) <= 1e-4
    assert abs(got["gpirt"] - expected["gpirt"]) <= 1e-4


def test_estimate_rejects_wrong_length(synthetic_params):
    with pytest.raises(ValueError, match=r"expected length 100, got 99"):
        irt.estimate([1.0] * 99, synthetic_params)


def test_estimate_rejects_scores_outside_unit_interval(synthetic_params):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        irt.estimate([2.0] * 100, synthetic_params)


def test_estimate_names_available_benches(synthetic_params):
    with pytest.raises(KeyError, match="mmlu"):
        irt.estimate([1.0] * 100, synthetic_params, bench="helm_lite")


class _RunsShellCommand:
    """Pickles to a call of os.system; unpickling it with plain pickle.loads would run the command."""

    def __reduce__(self):
        return (os.system, ("echo hacked",))


def test_restricted_unpickler_refuses_code_execution(tmp_path, monkeypatch):
    malicious = tmp_path / "malicious.pkl"
    malicious.write_bytes(pickle.dumps({"mmlu": _RunsShellCommand()}))
    assert b"system" in malicious.read_bytes()
    calls = []
    # Belt and braces: if the unpickler ever let os.system through, record the call instead of running it.
    # (Patched only after pickling, since pickle must find the real os.system by name.)
    monkeypatch.setattr(os, "system", lambda command: calls.append(command) or 0)
    with pytest.raises(pickle.UnpicklingError, match=r"system"):
        irt.load_irt_params(malicious)
    assert calls == []


def test_restricted_unpickler_refuses_builtin_eval(tmp_path):
    # A pickle that names builtins.eval by hand: GLOBAL 'builtins eval', then call it on a string.
    payload = b"cbuiltins\neval\n(V1+1\ntR."
    assert pickle.loads(payload) == 2  # the payload is live, so refusing it below means something
    path = tmp_path / "eval.pkl"
    path.write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        irt.load_irt_params(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_loads_numpy_containers(tmp_path, protocol):
    params = {
        "mmlu": {
            "seen_examples": [3, 1, 2],
            "irt_parameters": {"A": np.arange(6.0).reshape(1, 2, 3)},
            "optimal_lambdas": {"mmlu": np.float64(0.25)},
            "tags": {"a", "b"},
            "frozen": frozenset([1]),
            "pair": (1, 2),
        }
    }
    path = tmp_path / "params.pkl"
    path.write_bytes(pickle.dumps(params, protocol=protocol))
    loaded = irt.load_irt_params(path)["mmlu"]
    np.testing.assert_array_equal(loaded["irt_parameters"]["A"], params["mmlu"]["irt_parameters"]["A"])
    assert loaded["optimal_lambdas"]["mmlu"] == 0.25
    assert loaded["seen_examples"] == [3, 1, 2]
    assert loaded["tags"] == {"a", "b"} and loaded["frozen"] == frozenset([1]) and loaded["pair"] == (1, 2)


def test_restricted_unpickler_loads_numpy1_pickles_without_warnings(tmp_path):
    # The official file predates numpy 2, so its globals say numpy.core.*; protocol 2 spells them out
    # as text, which lets us write such a pickle with numpy 2.
    array = np.linspace(0.0, 1.0, 7).reshape(1, 1, 7)
    payload = pickle.dumps({"A": array, "lam": np.float64(0.5)}, protocol=2)
    assert b"numpy._core.multiarray" in payload
    path = tmp_path / "numpy1.pkl"
    path.write_bytes(payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = irt.load_irt_params(path)
    np.testing.assert_array_equal(loaded["A"], array)
    assert loaded["lam"] == 0.5


def test_load_checks_sha256(tmp_path):
    path = tmp_path / "params.pkl"
    path.write_bytes(pickle.dumps({"mmlu": {}}))
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert irt.load_irt_params(path, expected_sha256=good) == {"mmlu": {}}
    with pytest.raises(ValueError, match="sha256 mismatch"):
        irt.load_irt_params(path, expected_sha256="0" * 64)


def test_official_params_pin_is_well_formed(shared_data):
    assert irt.OFFICIAL_PARAMS_URL.startswith(
        "https://raw.githubusercontent.com/felipemaiapolo/tinyBenchmarks/"
    )
    assert "e9a8b1031b0340571beb6c9ca3a27891be09a8fd" in irt.OFFICIAL_PARAMS_URL
    assert irt.OFFICIAL_PARAMS_URL.endswith("/tinyBenchmarks/tinyBenchmarks.pkl")
    # A sha256 hex digest as hashlib writes it (64 lowercase hex digits), which load_irt_params compares with.
    assert re.fullmatch(r"[0-9a-f]{64}", irt.OFFICIAL_PARAMS_SHA256), irt.OFFICIAL_PARAMS_SHA256
    # The pin is the one the shared tinyMMLU data's README records for upstream's tinyBenchmarks.pkl.
    assert f"sha256 `{irt.OFFICIAL_PARAMS_SHA256}`" in (shared_data / "tinymmlu" / "README.md").read_text()


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_fetch_returns_none_and_warns_when_unreachable(tmp_path, monkeypatch, caplog):
    def unreachable(url, timeout):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(irt.urllib.request, "urlopen", unreachable)
    with caplog.at_level(logging.WARNING, logger=irt.__name__):
        assert irt.fetch_official_params(tmp_path) is None
    assert "IRT estimates cannot be computed" in caplog.text and "unreachable" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_fetch_rejects_download_with_wrong_hash(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(irt.urllib.request, "urlopen", lambda url, timeout: _FakeResponse(b"not the file"))
    with caplog.at_level(logging.WARNING, logger=irt.__name__):
        assert irt.fetch_official_params(tmp_path) is None
    assert "sha256" in caplog.text
    assert not (tmp_path / irt.OFFICIAL_PARAMS_FILENAME).exists()


def test_fetch_caches_verified_download(tmp_path, monkeypatch):
    payload = pickle.dumps({"mmlu": {}})
    monkeypatch.setattr(irt, "OFFICIAL_PARAMS_SHA256", hashlib.sha256(payload).hexdigest())
    downloads = []

    def serve(url, timeout):
        downloads.append(url)
        return _FakeResponse(payload)

    monkeypatch.setattr(irt.urllib.request, "urlopen", serve)
    first = irt.fetch_official_params(tmp_path / "cache")
    second = irt.fetch_official_params(tmp_path / "cache")
    assert first == second == tmp_path / "cache" / irt.OFFICIAL_PARAMS_FILENAME
    assert first.read_bytes() == payload
    assert downloads == [irt.OFFICIAL_PARAMS_URL]  # the second call used the cache


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_scores_from_samples_sorts_rank_major_output_by_doc_id(tmp_path):
    # Two ranks, each writing its own share: file order 0, 2, 4, 1, 3.
    rows = [{"doc_id": d, "acc": d % 2, "acc_norm": d / 10} for d in (0, 2, 4, 1, 3)]
    path = _write_jsonl(tmp_path / "samples.jsonl", rows)
    assert irt.scores_from_samples(path) == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert irt.scores_from_samples(path, metric="acc") == [0.0, 1.0, 0.0, 1.0, 0.0]


def test_scores_from_samples_rejects_gaps(tmp_path):
    path = _write_jsonl(tmp_path / "samples.jsonl", [{"doc_id": d, "acc_norm": 1} for d in (0, 1, 3)])
    with pytest.raises(ValueError, match=r"0\.\.n-1.*missing \[2\]"):
        irt.scores_from_samples(path)


def test_scores_from_samples_rejects_duplicates(tmp_path):
    path = _write_jsonl(tmp_path / "samples.jsonl", [{"doc_id": d, "acc_norm": 1} for d in (0, 1, 1, 2)])
    with pytest.raises(ValueError, match="duplicate doc_id 1"):
        irt.scores_from_samples(path)


def test_scores_from_samples_names_missing_metric(tmp_path):
    path = _write_jsonl(tmp_path / "samples.jsonl", [{"doc_id": 0, "acc": 1}])
    with pytest.raises(ValueError, match="'acc_norm'.*found keys"):
        irt.scores_from_samples(path)
