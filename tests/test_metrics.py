"""The MFU peak table: each GPU variant gets its own dense bf16 peak, the most specific entry first."""

import pytest
import torch

from dist_llama import metrics


@pytest.mark.parametrize("name, tflops", [
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
])
def test_peak_of_each_gpu_variant(name, tflops):
    assert metrics.peak_bf16_flops(name) == pytest.approx(tflops * 1e12)


def test_unknown_gpu_has_no_peak():
    for name in ("NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB", "NVIDIA H1000"):
        assert metrics.peak_bf16_flops(name) is None, name


def test_peak_flops_reads_the_cuda_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert metrics.peak_flops(torch.device("cuda", 0), None) == pytest.approx(756.5e12)
    assert metrics.peak_flops(torch.device("cuda", 0), 100.0) == pytest.approx(100e12)  # the config's override
    assert metrics.peak_flops(torch.device("cpu"), None) is None
