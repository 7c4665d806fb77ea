"""Named accelerators for the virtual device: memory, bandwidth, compute and what a step costs.

A `HardwareProfile` states its figures and where they come from. The roofline step cost built
on it (`cost.RooflineCost`) is an estimate until measured on the device: the efficiencies and
the per-step floor are assumptions, written down here so an operator can change them.

`SimPlatform` is the `Platform` the engines and the memory planner see on the virtual device:
the profile's memory (so the planner's real budget sets the KV blocks, and KV pressure and
preemption happen as they would), its nominal bandwidth (the telemetry's peak), bf16 on
accelerators, and no tensors ever allocated (the simulated runner holds none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..platform.base import MemoryInfo, Platform

GB = 1e9


@dataclass(slots=True, frozen=True)
class HardwareProfile:
    name: str
    memory_bytes: int  # device memory (the planner's memory_fraction applies to it)
    bandwidth: float  # peak memory bandwidth, bytes/s (datasheet)
    bandwidth_efficiency: float  # the fraction of it a decode step's weight + KV stream achieves
    flops: float  # dense bf16/fp16 FLOP/s (datasheet)
    flops_efficiency: float  # the fraction a prefill achieves
    step_floor_s: float  # per-step time that no byte or FLOP explains: launches, scheduling, sampling
    dtype: torch.dtype = torch.bfloat16
    block_size: int = 16
    graphs: bool = True  # decode graphs captured (the planner reserves their outputs)
    interleave_s: float = 0.0  # extra cost of a step right after another model's step
    source: str = ""


PROFILES: dict[str, HardwareProfile] = {
    "h100": HardwareProfile(
        name="h100", memory_bytes=80 * 2**30, bandwidth=3.35e12, bandwidth_efficiency=0.7, flops=989e12,
        flops_efficiency=0.5, step_floor_s=1.5e-3,
        source="NVIDIA H100 SXM datasheet: 80 GB HBM3 at 3.35 TB/s, 989 TFLOPS dense BF16. Efficiency 0.7: "
               "DESIGN.md's measured graph-captured decode step on an H100 reached 0.43-0.81 of the copy-bandwidth "
               "roofline (1B-7B); floor 1.5 ms per step (host scheduling, sampling, launches: assumed). No "
               "interleaving penalty: a model's weights never fit the 50 MB L2, every step streams them from HBM."),
    "h200": HardwareProfile(
        name="h200", memory_bytes=141 * 10**9, bandwidth=4.8e12, bandwidth_efficiency=0.7, flops=989e12,
        flops_efficiency=0.5, step_floor_s=1.5e-3,
        source="NVIDIA H200 SXM datasheet: 141 GB HBM3e at 4.8 TB/s, 989 TFLOPS dense BF16; efficiency and floor "
               "as the h100 profile (assumed)."),
    "ascend-910b": HardwareProfile(
        name="ascend-910b", memory_bytes=64 * 2**30, bandwidth=1.6e12, bandwidth_efficiency=0.5, flops=313e12,
        flops_efficiency=0.4, step_floor_s=5e-3, block_size=128,
        source="Ascend 910B: 64 GB HBM at ~1.6 TB/s, ~313 TFLOPS FP16 (Huawei's figures for the 910B family; SKUs "
               "differ). Efficiency 0.5 and a 5 ms floor put a Qwen2.5-7B bf16 decode step at batch 1 at ~24 ms, "
               "inside the ~20-35 ms TPOT vllm-ascend users report for a 7B on one 910B (as stated in issue 23; "
               "not measured here). KV block size 128, as vLLM-Ascend uses on NPU."),
    "cpu": HardwareProfile(
        name="cpu", memory_bytes=24 * 2**30, bandwidth=20e9, bandwidth_efficiency=0.5, flops=100e9,
        flops_efficiency=0.5, step_floor_s=3e-3, dtype=torch.float32, graphs=False,
        source="A small x86 VM (2 cores): ~20 GB/s DRAM, ~100 GFLOP/s fp32, 3 ms of Python per step (assumed). "
               "The demo family's models are host-bound here: prefer the measured profile "
               "(profiles/cpu-measured.json), fitted on a real run."),
}


class SimPlatform(Platform):
    """The virtual device as the engine and the planner see it (no tensors are ever made on it)."""

    device_type = "cpu"  # what torch sees: nothing is allocated, dtypes are only sized

    def __init__(self, profile: HardwareProfile) -> None:
        super().__init__(0)
        self.profile = profile
        self.name = f"sim:{profile.name}"
        self.preferred_block_size = profile.block_size
        self._peak_bandwidth = profile.bandwidth

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(total_bytes=self.profile.memory_bytes, free_bytes=self.profile.memory_bytes)

    def default_dtype(self, checkpoint_dtype: torch.dtype) -> torch.dtype:
        return self.profile.dtype

    @property
    def supports_graphs(self) -> bool:
        return self.profile.graphs
