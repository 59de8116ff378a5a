"""Model FLOPs utilisation: achieved model FLOP/s over the accelerators' peak dense bf16 FLOP/s.

Model FLOPs come from the model family's `flops_per_token` (model.registry: 6N plus the attention term,
PaLM appendix B);
recomputation for activation checkpointing is not counted, as MFU (unlike HFU) prescribes.
"""

from __future__ import annotations

# Peak dense (no sparsity) bf16 tensor-core FLOP/s per device, from the vendors' datasheets.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989.4e12,  # SXM
    "H100 NVL": 835.0e12,
    "H100 PCIe": 756.0e12,
    "H100": 989.4e12,  # SXM
    "A100": 312.0e12,
    "L40S": 362.05e12,
    "A10G": 70.0e12,
    "L4": 121.0e12,
}


def peak_flops(device_name: str | None, override: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device by its name (e.g. torch.cuda.get_device_name()), or None if
    unknown (CPUs: set cluster.peak_flops_per_device to a peak you measured)."""
    if override:
        return override
    if not device_name:
        return None
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in device_name.lower():
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(tokens_per_s: float, flops_per_token: float, world_size: int, peak_per_device: float | None) -> float | None:
    """Fraction of the cluster's peak the model FLOPs reach; None when the peak is unknown."""
    if not peak_per_device:
        return None
    return tokens_per_s * flops_per_token / (world_size * peak_per_device)
