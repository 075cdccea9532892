"""Tests for dist_llama.evaluation and its command line: tinyMMLU through lm-eval, IRT, loss by position,
plots, CLI errors.

All on CPU with tiny random models and local data. The Hub is off (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE,
in this process and in subprocesses), and the tinyBenchmarks parameter download is replaced by a stub
that fails the test if it is ever called.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from dist_llama import evaluate
from dist_llama.evaluation import EvaluationError, irt, mmlu, position, stats

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PPL_SEQ_LEN, PPL_DOCS = 64, 3


@pytest.fixture(scope="module", autouse=True)
def offline():
    import datasets.config
    import huggingface_hub.constants

    def no_download(*args, **kwargs):
        raise AssertionError("a test tried to download the tinyBenchmarks parameter file")

    with pytest.MonkeyPatch.context() as patch:
        for name, value in OFFLINE_ENV.items():
            patch.setenv(name, value)
        # The libraries read these flags when first imported, possibly before this module set the variables.
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        patch.setattr(irt, "fetch_official_params", no_download)
        yield


def _subprocess_env() -> dict:
    return {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- tinyMMLU on local items ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mmlu_items(shared_data, tmp_path_factory) -> Path:
    """8 items (3 + 3 + 2) of the 3 subjects with the shortest prompts, answers spread over A-D."""
    by_subject = defaultdict(list)
    with open(shared_data / "tinymmlu" / "mmlu_test.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            by_subject[row["subject"]].append(row)
    shortest = lambda rows: sorted(rows, key=lambda r: len(r["input_formatted"]))  # noqa: E731
    subjects = sorted(by_subject, key=lambda s: len(shortest(by_subject[s])[0]["input_formatted"]))[:3]
    chosen = []
    for subject, count in zip(subjects, (3, 3, 2)):
        one_per_answer = {}
        for row in shortest(by_subject[subject]):
            one_per_answer.setdefault(row["answer"], row)
        chosen += shortest(one_per_answer.values())[:count]
    path = tmp_path_factory.mktemp("mmlu") / "items.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in chosen))
    return path


@pytest.fixture(scope="module")
def mmlu_run(tiny_hf_model_dir, mmlu_items, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mmlu_out")
    summary = mmlu.run_mmlu(tiny_hf_model_dir, out, data=mmlu_items, batch_size=4, device="cpu")
    return out, summary


def test_mmlu_offline_writes_results_samples_and_summary(mmlu_run, mmlu_items):
    out, summary = mmlu_run
    items = _read_jsonl(mmlu_items)
    samples = _read_jsonl(out / "samples_tinymmlu_local.jsonl")
    assert [s["doc_id"] for s in samples] == list(range(len(items))) == list(range(8))
    for sample, item in zip(samples, items):
        assert (sample["subject"], sample["tb_index"]) == (item["subject"], item["tb_index"])
        assert sample["target"] == item["answer"]
        logliks = sample["loglikelihoods"]
        assert len(logliks) == 4 and all(math.isfinite(x) for x in logliks)
        assert sample["pred"] == logliks.index(max(logliks))
        assert sample["acc"] == float(sample["pred"] == sample["target"])

    results = json.loads((out / "results.json").read_text())
    assert results["results"]["tinymmlu_local"]["acc,none"] == pytest.approx(summary["acc"]["value"])
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (summary["task"], summary["n"], summary["n_subjects"]) == ("tinymmlu_local", 8, 3)
    task_yaml = (out / "tasks" / "tinymmlu_local.yaml").read_text()
    assert str(mmlu_items.resolve()) in task_yaml and "{{input_formatted}}" in task_yaml
    assert summary["items_per_s"] > 0


def test_mmlu_summary_accuracies_come_from_the_samples(mmlu_run):
    out, summary = mmlu_run
    samples = _read_jsonl(out / "samples_tinymmlu_local.jsonl")
    for metric in ("acc", "acc_norm"):
        scores = [s[metric] for s in samples]
        micro = summary[metric]
        assert micro["value"] == pytest.approx(sum(scores) / len(scores))
        assert 0 <= micro["ci95_low"] <= micro["value"] <= micro["ci95_high"] <= 1
        assert micro["ci95_high"] - micro["ci95_low"] > 0.2  # 8 items cannot pin accuracy down

        by_subject = defaultdict(list)
        for s in samples:
            by_subject[s["subject"]].append(s[metric])
        subject_means = [sum(v) / len(v) for v in by_subject.values()]
        macro = summary[f"{metric}_macro"]
        assert macro["n_subjects"] == 3
        assert macro["value"] == pytest.approx(sum(subject_means) / 3)
        assert 0 <= macro["ci95_low"] <= macro["value"] <= macro["ci95_high"] <= 1
    per_subject = json.loads((out / "per_subject.json").read_text())
    assert sorted(per_subject) == sorted({s["subject"] for s in samples})
    assert sum(v["n"] for v in per_subject.values()) == 8


def test_mmlu_irt_is_null_with_a_reason_for_non_anchor_items(mmlu_run):
    _, summary = mmlu_run
    assert summary["irt"] is None
    assert "100 tinyMMLU anchor items" in summary["irt_note"]


def test_confidence_intervals_match_textbook_values():
    # Wilson: 0 of 10 -> [0, z^2 / (n + z^2)]; 5 of 10 -> 0.5 -+ 0.2634 (Agresti & Coull 1998, table values)
    assert stats.wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert stats.wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    # Student t over subject means: mean 0.5, sd 0.1, k = 5 -> 0.5 -+ 2.7764 * 0.1 / sqrt(5)
    means = [0.4, 0.45, 0.5, 0.55, 0.6]
    sd = math.sqrt(sum((m - 0.5) ** 2 for m in means) / 4)
    assert stats.macro_interval(means) == pytest.approx(
        [0.5 - 2.7764 * sd / math.sqrt(5), 0.5 + 2.7764 * sd / math.sqrt(5)], abs=1e-4
    )
    assert stats.macro_interval([0.5]) is None


# --- IRT ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_params_path(shared_data) -> Path:
    return shared_data / "tinymmlu" / "irt_reference" / "synthetic_d5.pkl"


@pytest.fixture(scope="module")
def synthetic_params(synthetic_params_path) -> dict:
    return irt.load_irt_params(synthetic_params_path)


def test_irt_subcommand_prints_the_estimates_of_a_samples_file(
    tmp_path, shared_data, synthetic_params_path, synthetic_params
):
    cases = json.loads(
        (shared_data / "tinymmlu" / "irt_reference" / "synthetic_d5.expected.json").read_text()
    )["cases"]
    case = next(c for c in cases if c["name"] == "bernoulli_0.6")
    # lm-eval writes rank-major order with several processes: the file order must not matter.
    order = list(range(100))
    random.Random(0).shuffle(order)
    samples = tmp_path / "samples_tinyMMLU.jsonl"
    samples.write_text(
        "".join(
            json.dumps({"doc_id": i, "acc": case["y"][i], "acc_norm": case["y"][i]}) + "\n" for i in order
        )
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_llama.evaluate",
            "irt",
            "--params",
            str(synthetic_params_path),
            "--samples",
            str(samples),
        ],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed == irt.estimate(case["y"], synthetic_params)
    for key in ("irt", "pirt", "gpirt"):
        assert printed[key] == pytest.approx(case["expected"][key], abs=1e-4)


def test_irt_subcommand_finds_anchors_by_tb_index_or_refuses(
    tmp_path, synthetic_params_path, synthetic_params
):
    seen = [int(i) for i in synthetic_params["mmlu"]["seen_examples"]]
    scores = {index: float(k % 3 == 0) for k, index in enumerate(seen)}
    extra = [i for i in range(300) if i not in scores][:50]
    rows = [
        {"doc_id": d, "tb_index": i, "acc": scores.get(i, 1.0), "acc_norm": scores.get(i, 1.0)}
        for d, i in enumerate(sorted(set(seen) | set(extra)))
    ]
    command = [
        sys.executable,
        "-m",
        "dist_llama.evaluate",
        "irt",
        "--params",
        str(synthetic_params_path),
        "--samples",
    ]
    full = tmp_path / "full.jsonl"
    full.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run(
        [*command, str(full)], capture_output=True, text=True, env=_subprocess_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == irt.estimate([scores[i] for i in seen], synthetic_params)
    # 100 items that are not the anchors must not be scored as if they were.
    partial = tmp_path / "partial.jsonl"
    partial.write_text(
        "".join(
            json.dumps({**r, "doc_id": d}) + "\n"
            for d, r in enumerate(r for r in rows if r["tb_index"] not in seen[:10])
        )
    )
    proc = subprocess.run(
        [*command, str(partial)], capture_output=True, text=True, env=_subprocess_env(), timeout=120
    )
    assert proc.returncode != 0 and "anchor" in proc.stderr


def test_irt_anchor_selection(synthetic_params, monkeypatch):
    seen = [int(i) for i in synthetic_params["mmlu"]["seen_examples"]]
    rng = random.Random(1)

    # All of MMLU with tb_index, in a shuffled order: the anchors are picked by tb_index.
    full = [{"doc_id": i, "tb_index": i, "acc_norm": float(rng.random() < 0.4)} for i in range(14042)]
    rng.shuffle(full)
    score_of = {s["tb_index"]: s["acc_norm"] for s in full}
    got = irt.irt_for_samples(full, from_hub_task=False, params=synthetic_params, params_source="synthetic")
    assert got["irt"] == irt.estimate([score_of[i] for i in seen], synthetic_params)
    assert got["irt_note"] is None

    # The Hub task: doc_id i is anchor i.
    hub = [{"doc_id": i, "acc_norm": float(rng.random() < 0.5)} for i in range(100)]
    by_doc = [s["acc_norm"] for s in hub]
    rng.shuffle(hub)
    assert irt.irt_for_samples(hub, True, synthetic_params)["irt"] == irt.estimate(by_doc, synthetic_params)

    # Not the anchors: null, with the reason.
    got = irt.irt_for_samples(hub[:99], True, synthetic_params)
    assert got["irt"] is None and "99" in got["irt_note"]
    got = irt.irt_for_samples(hub, False, synthetic_params)
    assert got["irt"] is None and "tb_index" in got["irt_note"]
    missing_one = [s for s in full if s["tb_index"] != seen[0]]
    got = irt.irt_for_samples(missing_one, False, synthetic_params)
    assert got["irt"] is None and "99 of them" in got["irt_note"]

    # No parameter file given and none downloadable.
    monkeypatch.setattr(irt, "fetch_official_params", lambda *args, **kwargs: None)
    got = irt.irt_for_samples(hub, True, None)
    assert got["irt"] is None and "parameter file unavailable" in got["irt_note"]


# --- Loss by position -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def owt_tiny(shared_data) -> Path:
    return shared_data / "owt" / "tiny.jsonl"


@pytest.fixture(scope="module")
def ppl_results(tiny_hf_model_dir, owt_tiny) -> dict:
    """loss_by_position of the tiny model without override, with PI factor 4, and with factor 1."""
    return {
        factor: position.loss_by_position(
            tiny_hf_model_dir, owt_tiny, PPL_SEQ_LEN, PPL_DOCS, rope_scaling_factor=factor, device="cpu"
        )
        for factor in (None, 4.0, 1.0)
    }


def test_loss_by_position_buckets(ppl_results):
    from dist_llama.data import read_documents
    from dist_llama.tokenizer import load_tokenizer

    result = ppl_results[None]
    assert list(result["buckets"]) == ["0-15", "16-31", "32-47", "48-63"]
    per_position = result["loss_by_position"]
    assert len(per_position) == PPL_SEQ_LEN and all(math.isfinite(x) for x in per_position)
    for name, loss in result["buckets"].items():
        start, end = map(int, name.split("-"))
        assert loss == pytest.approx(sum(per_position[start : end + 1]) / (end - start + 1))
    assert result["loss"] == pytest.approx(sum(per_position) / PPL_SEQ_LEN)
    # A random model is near-uniform over the 32000-token vocabulary.
    assert abs(result["loss"] - math.log(32000)) < 0.5
    # The first documents of tiny.jsonl are all longer than a window: one window from each one's start.
    tok = load_tokenizer("offline")
    docs = read_documents([result["data"]], limit=PPL_DOCS)
    assert (result["docs_read"], result["docs_qualified"], result["n_windows"]) == (
        PPL_DOCS,
        PPL_DOCS,
        PPL_DOCS,
    )
    windows, read, _ = position._document_windows(docs, tok, PPL_SEQ_LEN, None)
    assert windows.tolist() == [
        [tok.bos_token_id, *tok(doc, add_special_tokens=False)["input_ids"]][: PPL_SEQ_LEN + 1]
        for doc in docs
    ]


@pytest.fixture(scope="module")
def mixed_lengths(owt_tiny, tmp_path_factory) -> tuple[Path, list[str]]:
    """Short documents (fewer than PPL_SEQ_LEN + 1 tokens) between long ones from tiny.jsonl."""
    from dist_llama.data import read_documents

    long_docs = read_documents([owt_tiny], limit=3)
    docs = ["A short note.", long_docs[0], "Another short one, of a few words.", long_docs[1], long_docs[2]]
    path = tmp_path_factory.mktemp("mixed") / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return path, long_docs


def test_loss_by_position_takes_one_window_from_each_long_document(tiny_hf_model_dir, mixed_lengths):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from dist_llama.tokenizer import load_tokenizer

    path, long_docs = mixed_lengths
    result = position.loss_by_position(tiny_hf_model_dir, path, PPL_SEQ_LEN, 2, device="cpu")
    # The first two long documents are documents 2 and 4: four read, the short ones skipped.
    assert (result["docs_read"], result["docs_qualified"], result["n_windows"]) == (4, 2, 2)
    tok = load_tokenizer("offline")
    # Each window starts at its own document's [bos]: no position follows an earlier document's tokens.
    windows = torch.tensor(
        [
            [tok.bos_token_id, *tok(doc, add_special_tokens=False)["input_ids"]][: PPL_SEQ_LEN + 1]
            for doc in long_docs[:2]
        ]
    )
    model = LlamaForCausalLM.from_pretrained(tiny_hf_model_dir).eval()
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
    expected = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(0)
    assert result["loss_by_position"] == pytest.approx(expected.tolist(), abs=1e-5)

    everything = position.loss_by_position(tiny_hf_model_dir, path, PPL_SEQ_LEN, None, device="cpu")
    assert (everything["docs_read"], everything["docs_qualified"]) == (5, 3)


def test_loss_by_position_refuses_when_no_document_is_long_enough(tiny_hf_model_dir, mixed_lengths):
    path, _ = mixed_lengths
    with pytest.raises(
        EvaluationError,
        match=r"none of its 5 documents has the seq_len \+ 1 = 4097 tokens"
        r".*lower --seq-len",
    ):
        position.loss_by_position(tiny_hf_model_dir, path, 4096, 8, device="cpu")


def test_rope_scaling_factor_overrides_positions_only(ppl_results):
    base, scaled, unscaled = ppl_results[None], ppl_results[4.0], ppl_results[1.0]
    assert scaled["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert unscaled["rope_parameters"]["rope_type"] == "default"
    # Position 0 attends to itself only, where RoPE cannot matter; every later position sees scaled angles.
    assert scaled["loss_by_position"][0] == pytest.approx(base["loss_by_position"][0], abs=1e-6)
    assert all(a != b for a, b in zip(scaled["loss_by_position"][1:], base["loss_by_position"][1:]))
    assert scaled["buckets"] != base["buckets"]
    assert unscaled["loss_by_position"] == base["loss_by_position"]


def test_ppl_command_and_plot(tiny_hf_model_dir, owt_tiny, ppl_results, tmp_path, capsys):
    code = evaluate.main(
        [
            "ppl",
            "--model",
            str(tiny_hf_model_dir),
            "--data",
            str(owt_tiny),
            "--seq-len",
            str(PPL_SEQ_LEN),
            "--docs",
            str(PPL_DOCS),
            "--rope-scaling-factor",
            "4",
            "--label",
            "pi x4",
            "--device",
            "cpu",
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 0
    written = json.loads((tmp_path / "ppl_pi_x4.json").read_text())
    assert written["label"] == "pi x4"
    assert written["buckets"] == pytest.approx(ppl_results[4.0]["buckets"])
    assert "0-15" in capsys.readouterr().out

    baseline = tmp_path / "ppl_base.json"
    baseline.write_text(json.dumps({**ppl_results[None], "label": "no scaling"}))
    plot = tmp_path / "loss_by_position.png"
    assert (
        evaluate.main(
            ["ppl-plot", "--inputs", str(baseline), str(tmp_path / "ppl_pi_x4.json"), "--output", str(plot)]
        )
        == 0
    )
    data = plot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


# --- User errors: one line, non-zero exit -------------------------------------------------------------------


def test_user_errors_are_one_line(
    tmp_path, tiny_hf_model_dir, mmlu_items, owt_tiny, synthetic_params_path, capsys
):
    bad_pickle = tmp_path / "bad.pkl"
    bad_pickle.write_bytes(b"not a pickle")
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text(json.dumps({"question": "q", "answer": 0}) + "\n")
    cases = {
        "no model": [
            "ppl",
            "--model",
            str(tmp_path / "missing"),
            "--data",
            str(owt_tiny),
            "--output",
            str(tmp_path),
        ],
        "no data": [
            "--model",
            str(tiny_hf_model_dir),
            "--data",
            str(tmp_path / "none.jsonl"),
            "--output",
            str(tmp_path),
        ],
        "bad row": [
            "mmlu",
            "--model",
            str(tiny_hf_model_dir),
            "--data",
            str(bad_rows),
            "--output",
            str(tmp_path),
        ],
        "bad params": [
            "mmlu",
            "--model",
            str(tiny_hf_model_dir),
            "--data",
            str(mmlu_items),
            "--irt-params",
            str(bad_pickle),
            "--output",
            str(tmp_path),
        ],
        "no samples": [
            "irt",
            "--params",
            str(synthetic_params_path),
            "--samples",
            str(tmp_path / "none.jsonl"),
        ],
        "factor < 1": [
            "ppl",
            "--model",
            str(tiny_hf_model_dir),
            "--data",
            str(owt_tiny),
            "--rope-scaling-factor",
            "0.5",
            "--output",
            str(tmp_path),
        ],
        "no tokenizer": [
            "mmlu",
            "--model",
            str(tiny_hf_model_dir),
            "--data",
            str(mmlu_items),
            "--tokenizer",
            str(tmp_path / "no" / "tokenizer"),
            "--output",
            str(tmp_path),
        ],
        "short docs": [
            "ppl",
            "--model",
            str(tiny_hf_model_dir),
            "--data",
            str(owt_tiny),
            "--docs",
            "2",
            "--seq-len",
            "100000",
            "--device",
            "cpu",
            "--output",
            str(tmp_path),
        ],
    }
    errors = {}
    for name, argv in cases.items():
        assert evaluate.main(argv) == 2, name
        errors[name] = capsys.readouterr().err.strip()
        assert errors[name].startswith("evaluate: error: ") and "\n" not in errors[name], (name, errors[name])
    assert "input_formatted" in errors["bad row"] and "bad.jsonl:1" in errors["bad row"]
    assert "bad.pkl" in errors["bad params"]
    assert "no such folder" in errors["no model"] and "no such folder" in errors["no tokenizer"]
    assert "none of its 707 documents" in errors["short docs"] and "--seq-len" in errors["short docs"]
    assert not (tmp_path / "results.json").exists()  # every case stopped before evaluating


# --- Our release (trust_remote_code) and the stock lm_eval CLI --------------------------------------------


@pytest.fixture(scope="module")
def custom_release(make_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(run directory with a DCP checkpoint, its release folder with our model code)."""
    from dist_llama.consolidate import consolidate

    run_dir = make_checkpoint()
    return run_dir, consolidate(run_dir, tmp_path_factory.mktemp("release") / "release")


@pytest.fixture(scope="module")
def custom_release_mmlu(custom_release, mmlu_items, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("release_mmlu")
    return out, mmlu.run_mmlu(custom_release[1], out, data=mmlu_items, batch_size=4, device="cpu")


def test_mmlu_on_our_release_with_remote_code(custom_release, custom_release_mmlu):
    config = json.loads((custom_release[1] / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" in config  # stock Llama, our code by auto_map
    out, summary = custom_release_mmlu
    samples = _read_jsonl(out / "samples_tinymmlu_local.jsonl")
    assert [s["doc_id"] for s in samples] == list(range(8))
    assert summary["acc"]["value"] == pytest.approx(sum(s["acc"] for s in samples) / 8)


def test_ppl_of_a_checkpoint_matches_its_release(custom_release, owt_tiny):
    # The run folder is consolidated to stock Llama; the release runs our code. With the same PI override
    # both must give the same losses, so our config honours the rope_parameters override too.
    run_dir, release = custom_release
    from_checkpoint = position.loss_by_position(
        run_dir, owt_tiny, PPL_SEQ_LEN, 2, rope_scaling_factor=4, device="cpu"
    )
    from_release = position.loss_by_position(
        release, owt_tiny, PPL_SEQ_LEN, 2, rope_scaling_factor=4, device="cpu"
    )
    assert from_checkpoint["rope_parameters"]["factor"] == from_release["rope_parameters"]["factor"] == 4
    assert from_checkpoint["n_windows"] == from_release["n_windows"] > 0
    assert from_checkpoint["loss_by_position"] == pytest.approx(from_release["loss_by_position"], abs=1e-4)


def test_stock_lm_eval_cli_on_our_release(custom_release, custom_release_mmlu, tmp_path):
    """The reference command (lm_eval --model hf ... --log_samples --trust_remote_code), with our task
    folder."""
    release = custom_release[1]
    out, _ = custom_release_mmlu
    cli_out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={release}",
            "--tasks",
            "tinymmlu_local",
            "--include_path",
            str(out / "tasks"),
            "--batch_size",
            "4",
            "--output_path",
            str(cli_out),
            "--log_samples",
            "--device",
            "cpu",
            "--trust_remote_code",
            "--limit",
            "2",
        ],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results_files = list(cli_out.rglob("results_*.json"))
    samples_files = list(cli_out.rglob("samples_tinymmlu_local_*.jsonl"))
    assert len(results_files) == len(samples_files) == 1, sorted(cli_out.rglob("*"))
    metrics = json.loads(results_files[0].read_text())["results"]["tinymmlu_local"]
    assert 0 <= metrics["acc,none"] <= 1
    # Same model, same task: the CLI scores the first two items as our Python-API run did.
    ours = {s["doc_id"]: s for s in _read_jsonl(out / "samples_tinymmlu_local.jsonl")}
    cli = sorted(_read_jsonl(samples_files[0]), key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in cli] == [0, 1]
    for sample in cli:
        mine = ours[sample["doc_id"]]
        assert sample["acc"] == mine["acc"]
        # lm-eval's samples file writes each (loglikelihood, is_greedy) pair as strings.
        assert [float(r[0]) for r in sample["filtered_resps"]] == pytest.approx(
            mine["loglikelihoods"], abs=1e-3
        )


def test_limit_on_local_data_spreads_items_over_the_file(tmp_path):
    from dist_llama.evaluation.tasks import spread_subset

    source = tmp_path / "all.jsonl"
    source.write_text("".join(json.dumps({"subject": chr(ord("a") + i)}) + "\n" for i in range(10)))
    picked = [
        json.loads(line)["subject"]
        for line in spread_subset(source, 5, tmp_path / "some.jsonl").read_text().splitlines()
    ]
    assert picked == ["a", "c", "e", "g", "i"]
