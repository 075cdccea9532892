"""The communication model's costs and its command (`python -m dist_llama.counts --nodes ...`). Its bytes are
checked against the collectives counted on a 4-rank CPU mesh in tests/test_hsdp.py; here: which link each
collective takes, the time at a bandwidth, and what the command prints and refuses."""

from __future__ import annotations

import pytest

from dist_llama.comm_model import Cluster, StepLayout, step_collectives, step_cost
from dist_llama.config import load_config
from dist_llama.counts import main
from dist_llama.model import PRESETS, count_parameters

MAIN = PRESETS["main"]


def test_hsdp_sends_one_sharded_gradient_over_the_network_and_the_rest_over_nvlink():
    """Two nodes of 8: HSDP's only network traffic (beside the loss's 4 bytes) is the all-reduce of each
    GPU's eighth of the fp32 gradient, 2 (n - 1) / n of it on a ring of 2; FSDP over both nodes sends every
    all-gather and reduce-scatter over the network."""
    cluster = Cluster(2, 8, nvlink_gbytes=450, link_gbits=400, peak_tflops=989, mfu=0.4)
    hsdp = step_cost(MAIN, StepLayout(2, 8, 1), cluster, 1024, 1e9)
    flat = step_cost(MAIN, StepLayout(1, 16, 1), cluster, 1024, 1e9)
    total = count_parameters(MAIN)["total"]
    assert hsdp.network_bytes == pytest.approx(4 * total / 8, rel=1e-3)  # padding and the loss: the rest
    assert flat.nvlink_bytes == 0 and flat.network_bytes > 10 * hsdp.network_bytes
    assert hsdp.network_s == pytest.approx(hsdp.network_bytes / 50e9)  # 400 Gb/s is 50 GB/s
    assert hsdp.compute_s == pytest.approx(1024 * 1e9 / (989e12 * 0.4))
    assert hsdp.step_s == max(hsdp.compute_s, hsdp.nvlink_s + hsdp.network_s)


def test_one_node_is_all_nvlink_and_bf16_halves_the_reductions():
    one_node = step_cost(MAIN, StepLayout(1, 8, 4), Cluster(1, 8), 1024, 1e9)
    assert one_node.network_bytes == 0 and one_node.nvlink_bytes > 0
    fp32 = step_collectives(MAIN, StepLayout(2, 8, 4))
    bf16 = step_collectives(MAIN, StepLayout(2, 8, 4, reduce_dtype="bf16"))
    for (phase, op, dimension, _), (count, size) in fp32.items():
        if op in ("reduce_scatter", "all_reduce") and phase != "step":
            assert bf16[(phase, op, dimension, "bfloat16")] == [count, size // 2]


def test_the_command_prints_both_layouts_and_marks_the_shorter_step(capsys):
    main(["--config", "configs/main.yaml", "--nodes", "1,8", "--link-gbps", "100"])
    lines = capsys.readouterr().out.splitlines()
    rows = {tuple(line.split()[:3]): line.split() for line in lines if line.split()[:1] in (["1"], ["8"])}
    assert set(rows) == {("1", "8", "FSDP*"), ("8", "64", "FSDP"), ("8", "64", "HSDP*")}, lines
    flat, hsdp = rows[("8", "64", "FSDP")], rows[("8", "64", "HSDP*")]
    assert float(flat[5]) > 10 * float(hsdp[5]), "network GB: HSDP crosses nodes once per step"
    assert float(hsdp[9]) < float(flat[9]), "step ms"
    # The configured batch: 524,288 tokens over 64 GPUs is 8 rows each, one micro-batch of micro_batch_size 16
    assert flat[3] == "1" and load_config("configs/main.yaml", []).train.micro_batch_size == 16


@pytest.mark.parametrize("nodes", ["0", "two", ""])
def test_node_counts_that_are_not_positive_numbers_stop_in_one_line(capsys, nodes):
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "configs/main.yaml", "--nodes", nodes])
    assert exit_.value.code != 0
    error = capsys.readouterr().err
    assert "--nodes" in error and "e.g. 1,2,4,8" in error and error.count("\n") == 1, error
