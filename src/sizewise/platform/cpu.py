"""CPU platform: the torch reference ops, memory from the OS."""

from __future__ import annotations

import os

import torch

from .base import MemoryInfo, Platform


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"

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
