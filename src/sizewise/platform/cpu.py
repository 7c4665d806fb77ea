"""CPU platform: the torch reference ops, memory from the OS."""

from __future__ import annotations

import os

import torch

from .base import MemoryInfo, Platform


# Batch-size hint for oneDNN's weight layout. Measured on an AMD EPYC at one thread (10M Llama,
# all linears of a step): hint 16 is within noise of the best at 1-128 rows; hint 1 is 2.7x
# slower at 16 rows, hint 128 1.3x slower at 16 rows.
_ONEDNN_ROWS_HINT = 16


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"

    def __init__(self, index: int = 0) -> None:
        super().__init__(index)
        self._onednn = _onednn_linear_available()

    def pack_linear(self, weight: torch.Tensor) -> torch.Tensor:
        """float32 weights prepacked for oneDNN (what inductor's CPU freezing does): decode's
        skinny matmuls run 1.3-2x faster than through F.linear's MKL path on this kind of CPU
        (MKL's small-M gemm is slow on AMD). The packed tensor replaces the weight (same bytes)."""
        if not self._onednn or weight.dtype != torch.float32 or weight.is_mkldnn:
            return weight
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ONEDNN_ROWS_HINT)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return torch.nn.functional.linear(x, weight, bias)

    def memory_info(self) -> MemoryInfo:
        total = free = 0
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    key, val = line.split(":", 1)
                    if key == "MemTotal":
                        total = int(val.split()[0]) * 1024
                    elif key == "MemAvailable":
                        free = int(val.split()[0]) * 1024
        except OSError:
            pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            total = free = pages
        return MemoryInfo(total_bytes=total, free_bytes=free)

    def default_dtype(self, checkpoint_dtype: torch.dtype) -> torch.dtype:
        # Half-precision matmuls on CPU are slow and less exact; float32 is the sane default.
        return torch.float32
