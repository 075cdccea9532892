"""The MFU peak table (each GPU variant gets its own dense bf16 peak, the most specific entry first), and the
data-wait share: large behind a slow tokenizer, said once, and close to nothing from the token cache."""

import dataclasses
import logging
import re
import time
from pathlib import Path

import pytest
import torch
from test_data import config, make_docs, tokenizer, write_jsonl  # noqa: F401 (a fixture)

from dist_llama import data, metrics


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.5),  # SXM5
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.5),
        ("NVIDIA H200 NVL", 835.5),
        ("NVIDIA GH200 480GB", 989.5),
        ("NVIDIA A100-SXM4-40GB", 312),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100-PCIE-40GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
    ],
)
def test_peak_of_each_gpu_variant(name, tflops):
    assert metrics.peak_bf16_flops(name) == pytest.approx(tflops * 1e12)


def test_unknown_gpu_has_no_peak():
    for name in ("NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB", "NVIDIA H1000"):
        assert metrics.peak_bf16_flops(name) is None, name


def test_peak_flops_reads_the_cuda_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert metrics.peak_flops(torch.device("cuda", 0), None) == pytest.approx(756.5e12)
    assert metrics.peak_flops(torch.device("cuda", 0), 100.0) == pytest.approx(
        100e12
    )  # the config's override
    assert metrics.peak_flops(torch.device("cpu"), None) is None


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("Tesla T4", 65),
        ("Tesla V100-SXM2-16GB", 125),
        ("Tesla V100-PCIE-32GB", 112),
        ("Tesla V100S-PCIE-32GB", 130),
        ("Tesla P100-PCIE-16GB", 18.7),
        ("Tesla P100-SXM2-16GB", 21.2),
        ("NVIDIA A100-SXM4-80GB", 312),  # a card with bf16 trains fp16 at the same peak
    ],
)
def test_an_fp16_run_is_measured_against_the_cards_fp16_peak(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.peak_flops(torch.device("cuda", 0), None, "fp16") == pytest.approx(tflops * 1e12)


def data_wait_shares(batches, logger, windows=3, steps=6, step_s=0.002) -> list[float]:
    """A training loop's timing around batches from `batches`, each step `step_s` of work, logged per
    window."""
    shares = []
    for window in range(windows):
        wait, start = metrics.DataWait(), time.perf_counter()
        for _ in range(steps):
            wait.next(batches)
            time.sleep(step_s)  # the step
        record = {
            "kind": "train",
            "step": (window + 1) * steps,
            "loss": 1.0,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "tokens_per_s": 1.0,
            "memory_gib": 0.1,
            **wait.take(time.perf_counter() - start),
        }
        logger.log(record, total_steps=18)
        shares.append(record["data_wait"])
    return shares


def test_a_slow_source_makes_the_data_wait_large_and_the_run_says_so_once(
    tmp_path, tokenizer, monkeypatch, caplog, capsys
):
    write_jsonl(tmp_path / "a.jsonl", make_docs(400, seed=40))
    real = data.DocumentEncoder.encode_batch

    def slow(self, texts):
        time.sleep(0.002 * len(texts))  # 500 documents/s, while a step of 4 x 256 tokens takes ~50
        return real(self, texts)

    monkeypatch.setattr(data.DocumentEncoder, "encode_batch", slow)
    logger = metrics.MetricsLogger(tmp_path / "run", True, tensorboard=False, progress=True)
    with caplog.at_level(logging.WARNING, logger="dist_llama.metrics"):
        with data.PackedBatches(
            config([tmp_path / "a.jsonl"], prefetch_steps=1, seq_len=256), tokenizer, global_rows=4
        ) as batches:
            shares = data_wait_shares(batches, logger)
    logger.close()
    assert min(shares) > 0.3, shares
    warnings = [r.message for r in caplog.records if "waited for its batches" in r.message]
    assert len(warnings) == 1 and "data.token_cache" in warnings[0]
    assert "data_wait" in capsys.readouterr().out  # the progress line shows it


def test_the_token_cache_makes_the_data_wait_nearly_nothing(tmp_path, tokenizer, caplog):
    write_jsonl(tmp_path / "a.jsonl", make_docs(400, seed=41))
    cfg = dataclasses.replace(
        config([tmp_path / "a.jsonl"], prefetch_steps=1), token_cache=str(tmp_path / "cache")
    )
    data.build_token_cache(cfg, tokenizer, workers=1)
    logger = metrics.MetricsLogger(tmp_path / "run", True, tensorboard=False, progress=False)
    with caplog.at_level(logging.WARNING, logger="dist_llama.metrics"):
        with data.PackedBatches(cfg, tokenizer, global_rows=4) as batches:
            shares = data_wait_shares(batches, logger, step_s=0.01)
    logger.close()
    assert max(shares[1:]) < 0.05, shares  # the first window holds the start-up
    assert not [r for r in caplog.records if "waited for its batches" in r.message]


def record_kinds_written_by_the_package() -> set[str]:
    """Every `"kind": "..."` a module of the package puts in a metrics record (the data sources' manifest
    kinds are not metrics records)."""
    package = Path(metrics.__file__).parent
    kinds = set()
    for path in package.rglob("*.py"):
        if path.parent.name != "data":
            kinds |= set(re.findall(r'"kind": "(\w+)"', path.read_text()))
    return kinds


def test_every_record_kind_the_trainer_writes_prints_a_progress_line(tmp_path, capsys):
    written = record_kinds_written_by_the_package()
    assert {"train", "val", "started", "plan", "stop"} <= written
    assert written <= set(metrics.PROGRESS_LINES), written - set(metrics.PROGRESS_LINES)
    logger = metrics.MetricsLogger(tmp_path, True, tensorboard=False, progress=True)
    examples = {
        "train": {"loss": 7.1, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0, "memory_gib": 0.1},
        "val": {"val_loss": 7.2},
        "started": {"age_s": 12.0},
        "plan": {"planned_steps": 18},
        "stop": {"reason": "signal SIGUSR1"},
    }
    assert set(examples) == set(metrics.PROGRESS_LINES)
    for kind, fields in examples.items():
        logger.log({"kind": kind, "step": 4, **fields}, total_steps=20)
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(examples) and all(line.startswith("step 4/20 | ") for line in lines)
    assert lines[-1] == "step 4/20 | stopping early: signal SIGUSR1"
    with pytest.raises(ValueError, match="no progress line for records of kind 'mystery'"):
        metrics.MetricsLogger(tmp_path, False, False, False).log({"kind": "mystery", "step": 1}, 20)
