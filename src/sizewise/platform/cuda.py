"""CUDA platform: torch.cuda facts, CUDA graphs, and a Triton paged-attention kernel.

Imported only by `get_platform` when torch sees a CUDA device. Triton is imported lazily
the first time attention runs; without it (or for shapes the kernel does not take) the
torch reference op from `Platform` is used, which is correct but gathers a padded copy
of every sequence's context.

Status: written against the torch.cuda and Triton APIs; the kernel is checked against
the reference op under Triton's CPU interpreter in the unit tests. Not run on a GPU in
the session that wrote it (see docs/platforms.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from .base import AttentionPath, MemoryInfo, Platform

log = logging.getLogger(__name__)

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class CudaGraph:
    """One captured graph: `with g.warmup(): fn(...)`, `with g.capture(): out = fn(...)`, `g.replay()`."""

    def __init__(self, pool) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    @contextlib.contextmanager
    def warmup(self) -> Iterator[None]:
        yield  # nothing to switch on CUDA: eager and captured calls take the same path

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        # torch.cuda.graph captures on its own side stream and syncs around capture.
        with torch.cuda.graph(self.graph, pool=self.pool):
            yield

    def replay(self) -> None:
        self.graph.replay()


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    preferred_block_size = 16

    def __init__(self, index: int = 0) -> None:
        super().__init__(index)
        if index >= torch.cuda.device_count():
            raise ValueError(f"cuda:{index} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
        props = torch.cuda.get_device_properties(index)
        self.device_name: str = props.name
        self.num_sms: int = props.multi_processor_count
        self._pool = None
        self._triton = None  # the triton_paged_attention module once imported
        self._triton_missing = False
        self._nvml_handle = None  # set by the first device_counters() call that finds NVML

    # ----- device facts -------------------------------------------------
    def synchronize(self) -> None:
        torch.cuda.synchronize(self.index)

    def memory_info(self) -> MemoryInfo:
        free, total = torch.cuda.mem_get_info(self.index)
        return MemoryInfo(total_bytes=total, free_bytes=free)

    def peak_bandwidth(self, nbytes: int = 1 << 30, iters: int = 10) -> float:
        """Copy bandwidth in bytes/s (bytes read + written), measured once and cached.

        Timed with CUDA events on the stream, not a host clock around launch + synchronize:
        the base op's 128 MiB -> 128 MiB copy takes ~90 us on an H100, so the launch and
        sync latency a host timer adds (an estimated 10-20 us) would understate the
        bandwidth and overstate every "fraction of roofline" by about that share. 1 GiB moved
        per copy by default (H100 L2: 50 MiB), at most a quarter of what is free (a serving
        process may call this with its models and KV caches resident).
        """
        if self._peak_bandwidth is None:
            n = min(nbytes, self.memory_info().free_bytes // 4) // 2
            with torch.cuda.device(self.index):
                src = torch.empty(n, dtype=torch.uint8, device=self.device)
                dst = torch.empty_like(src)
                dst.copy_(src)  # warm-up
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                best = float("inf")
                for _ in range(iters):
                    start.record()
                    dst.copy_(src)
                    end.record()
                    end.synchronize()
                    best = min(best, start.elapsed_time(end) / 1e3)  # ms -> s
                del src, dst
            self._peak_bandwidth = 2 * n / best
        return self._peak_bandwidth

    def device_counters(self) -> dict[str, float]:
        """NVML utilisation (% of time the GPU / its memory was busy) when pynvml is importable."""
        try:
            import pynvml

            if self._nvml_handle is None:
                pynvml.nvmlInit()
                p = torch.cuda.get_device_properties(self.index)
                # NVML numbers devices physically; find ours by PCI address (CUDA_VISIBLE_DEVICES remaps).
                bus = f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
                self._nvml_handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
            u = pynvml.nvmlDeviceGetUtilizationRates(self._nvml_handle)
            return {"nvml_gpu_util_percent": float(u.gpu), "nvml_memory_util_percent": float(u.memory)}
        except Exception:  # noqa: BLE001 - a cross-check only; absent NVML means no counters
            return {}

    # default_dtype: the base rule (follow the checkpoint) is the CUDA rule.

    # ----- graphs ---------------------------------------------------------
    @property
    def supports_graphs(self) -> bool:
        return True

    def graph_pool(self):
        """One memory pool per platform instance, shared by every graph made from it."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def make_graph(self, pool=None) -> CudaGraph:
        return CudaGraph(self.graph_pool() if pool is None else pool)

    # ----- ops ------------------------------------------------------------
    # write_kv: the base op (index_copy_ into a flat view, -1 -> sink slot) is one
    # capturable kernel per tensor; nothing to gain from a custom kernel here.

    def _triton_module(self):
        if self._triton is None and not self._triton_missing:
            try:
                from . import triton_paged_attention

                self._triton = triton_paged_attention
            except ImportError:
                self._triton_missing = True
                log.warning("triton is not installed: CUDA paged attention uses the torch reference op")
        return self._triton

    def paged_attention_path(
        self, q_dtype: torch.dtype, kv_dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
        block_size: int, num_queries: int, captured: bool,
    ) -> AttentionPath:
        """Triton for half / bf16 / float32 with a same-dtype cache and head_dim <= 256: its loop
        stops at each row's context_lens (a device tensor), so a captured step reads only the real
        context. Otherwise the reference op, which gathers the whole table it is given."""
        why = ""
        if self._triton_module() is None:
            why = "triton is not installed"
        elif q_dtype not in _TRITON_DTYPES:
            why = f"dtype {q_dtype} (the kernel takes float16, bfloat16, float32)"
        elif kv_dtype != q_dtype:
            why = f"KV cache dtype {kv_dtype} != activation dtype {q_dtype}"
        elif head_dim > 256:
            why = f"head_dim {head_dim} > 256"
        elif num_heads % num_kv_heads:
            why = f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads"
        if why:
            return AttentionPath("reference", fast=False, bounded=not captured, reason=why)
        return AttentionPath("triton", fast=True, bounded=True)

    def prepare_paged(
        self,
        block_tables: torch.Tensor,  # [B, M] int32, -1 padded
        context_lens: torch.Tensor,  # [B]
        num_queries: int,
        block_size: int,
        dtype: torch.dtype,
    ):
        """The Triton kernel reads block tables and lengths directly: no per-step metadata.
        Where it cannot run, the reference op's gather indices and mask."""
        if self._triton_module() is not None and dtype in _TRITON_DTYPES:
            return None
        return super().prepare_paged(block_tables, context_lens, num_queries, block_size, dtype)

    def paged_attention(
        self,
        q: torch.Tensor,  # [B, Q, H, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        block_tables: torch.Tensor,  # [B, M] int32, -1 padded
        context_lens: torch.Tensor,  # [B] int32
        scale: float,
        prepared=None,  # from prepare_paged(); only the reference fallback uses it
    ) -> torch.Tensor:  # [B, Q, H, D]
        B, Q, H, D = q.shape
        path = self.paged_attention_path(q.dtype, k_cache.dtype, H, k_cache.shape[2], D, k_cache.shape[1], Q,
                                         captured=torch.cuda.is_current_stream_capturing() if q.is_cuda else False)
        if path.fast and not (q.is_cuda and q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1):
            path = AttentionPath("reference", fast=False, bounded=True,
                                 reason="inputs not on the GPU or head dimension not contiguous")
        self._note_path(path)
        if not path.fast:
            if prepared is None:  # self.prepare_paged may have returned None for Triton: build the reference's
                prepared = super().prepare_paged(block_tables, context_lens, Q, k_cache.shape[1], q.dtype)
            return super().paged_attention(q, k_cache, v_cache, block_tables, context_lens, scale, prepared)
        # Triton launches on the current device; make it the tensors' device.
        with torch.cuda.device(q.device):
            return self._triton.paged_attention(
                q, k_cache, v_cache, block_tables, context_lens, scale, num_sms=self.num_sms
            )
