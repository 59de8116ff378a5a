"""MFU accounting: the peak table lookup and the formula."""

import pytest

from orchestrator.train.mfu import PEAK_BF16_FLOPS, mfu, peak_flops


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.4e12),
    ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA H100 PCIe", 756.0e12),
    ("NVIDIA A100-SXM4-80GB", 312.0e12),
])
def test_peak_by_device_name(name, peak):
    assert peak_flops(name) == peak


def test_unknown_device_and_cpu_have_no_peak_unless_configured():
    assert peak_flops(None) is None
    assert peak_flops("Intel Xeon") is None
    assert peak_flops(None, override=2e12) == 2e12
    assert peak_flops("NVIDIA H200", override=1e12) == 1e12  # a measured peak wins


def test_mfu_formula():
    # 1000 tokens/s x 6e9 FLOPs/token on 2 devices of 1e13 FLOP/s peak -> 0.3
    assert mfu(1000, 6e9, 2, 1e13) == pytest.approx(0.3)
    assert mfu(1000, 6e9, 2, None) is None
    assert all(v > 1e13 for v in PEAK_BF16_FLOPS.values())
