"""Platform selection. Importing this package never imports torch_npu."""

from __future__ import annotations

import torch

from .base import AttentionPath, MemoryInfo, Platform
from .cpu import CpuPlatform

__all__ = ["AttentionPath", "MemoryInfo", "Platform", "CpuPlatform", "get_platform", "npu_available"]


def npu_available() -> bool:
    """True when torch_npu is installed and sees a device (imports it only then)."""
    import importlib.util

    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401

        return torch.npu.is_available()
    except Exception:  # noqa: BLE001 - a broken CANN install means "no NPU"
        return False


def get_platform(device: str | torch.device | None = "auto") -> Platform:
    """`auto` picks NPU, then CUDA, then CPU; `cuda:1`, `npu:0`, `cpu` pick explicitly."""
    spec = "auto" if device is None else str(device)
    kind, _, idx = spec.partition(":")
    if idx and not idx.isdigit():
        raise ValueError(f"unknown device {spec!r}; expected 'auto', 'cpu', 'cuda[:N]' or 'npu[:N]'")
    index = int(idx) if idx else 0
    if kind == "auto":
        if npu_available():
            kind = "npu"
        elif torch.cuda.is_available():
            kind = "cuda"
        else:
            kind = "cpu"
    if kind == "cpu":
        return CpuPlatform(index)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no CUDA device")
        from .cuda import CudaPlatform

        return CudaPlatform(index)
    if kind == "npu":
        if not npu_available():
            raise ValueError("device 'npu' requested but torch_npu is not installed or sees no NPU")
        from .npu import NpuPlatform

        return NpuPlatform(index)
    raise ValueError(f"unknown device {spec!r}; expected 'auto', 'cpu', 'cuda[:N]' or 'npu[:N]'")
