"""Peak FLOP/s for the MFU estimate: dense datasheet numbers (no sparsity) by GPU name and precision.

MFU = training FLOPs per image x images/s / peak FLOP/s. A device not in the table (and any CPU) has
no MFU unless a peak is configured (monitoring.peak_tflops).
"""

from __future__ import annotations

PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2},
    "V100": {"bf16": None, "fp16": 125.0, "fp32": 15.7},
}


def peak_flops(device_name: str | None, precision: str = "fp32", override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of `device_name` at `precision`; the override wins; None when unknown."""
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            value = peaks.get(precision) or peaks.get("fp32")
            return value * 1e12 if value else None
    return None
