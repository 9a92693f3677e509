"""Which torch device a run, an evaluation or a demo uses: one rule for every entry point."""

from __future__ import annotations

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'. A bare 'cuda' means this process's
    GPU (`local_rank`, as the process group reports it). Asking for CUDA where there is none is an error
    here rather than a stack trace from the first tensor moved."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's text lists twenty device types
        raise ValueError(f"device {name!r}: not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine (use cpu or auto)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index >= torch.cuda.device_count():  # else torch's own traceback
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         "(use cpu or auto)")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a GPU that supports it, or a CPU with the AVX512-BF16 or
    AMX-BF16 instructions (Linux: /proc/cpuinfo). Elsewhere oneDNN emulates bf16, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
