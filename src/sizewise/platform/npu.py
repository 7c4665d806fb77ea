"""Ascend NPU platform: torch.npu facts, NPUGraph capture, torch_npu fused ops.

UNVERIFIED: written against the public torch_npu documentation (op-plugin docs for
npu_fused_infer_attention_score, npu_scatter_pa_kv_cache, npu_rms_norm, NPUGraph) and how
vllm-ascend calls those ops in 2026 (torch 2.10 + torch-npu 2.10.0.post4, CANN 9.1.0); it has
never been run on an Ascend device. Every fused op has a guarded fallback to the torch
reference op, and the reference path is what the CPU tests check. See docs/platforms.md.

Besides `platform.npu_available()` (which imports torch_npu only to ask whether it sees a
device), this is the only module that imports torch_npu, and only `get_platform("npu...")`
imports this module.

KV writes use `torch_npu.npu_scatter_pa_kv_cache` ("Norm" cache mode: key [T, Hkv, D] into
[num_blocks, block_size, Hkv, D] at slot_mapping), which replaced `_npu_reshape_and_cache` in
vllm-ascend in July 2026; torch_npu builds without it fall back to `_npu_reshape_and_cache`.

Paged attention uses `torch_npu.npu_fused_infer_attention_score` (FIA) with a block table
over the cache viewed as [num_blocks, block_size, Hkv*D]. FIA takes the per-sequence lengths as *host* integer lists, and an
NPUGraph freezes whatever host values it saw at capture. So there are two paths:

  * eager (not capturing): the TND layout, as vllm-ascend decodes: the queries flattened to
    [B*Q, H, D], actual_seq_lengths the cumulative query ends (Q, 2Q, ..., B*Q),
    actual_seq_lengths_kv the exact context lengths, sparse_mode=3 (right-down causal) with
    the 2048x2048 triangular mask FIA documents, which gives query i of Q the keys
    <= ctx - Q + i (for Q = 1: every key). context_lens is read to the host once per forward
    (in prepare_paged, else memoised across layers) -- one sync per step, acceptable eagerly.
  * static (inside graph warm-up/capture), BSND layout: the host lengths are the *capacity*,
    M * block_size for every row, and the real context length and causality come from a
    device-built boolean mask [B, 1, Q, M*block_size] (True = masked, sparse_mode=0). All
    host-side op parameters depend on shapes only, so one capture serves every step with
    no host update. Cost: every row reads all M blocks of its table (the -1 entries are
    clamped to block 0, as in the reference op), i.e. KV bytes scale with max_model_len,
    not with the context. FIA also documents that num_blocks must cover the blocks
    implied by the lengths of all rows, so a bucket with B * M > num_blocks falls back to
    the reference op (correct, slower). The faster follow-up is torch_npu's graph task update
    (graph_task_group_begin/end + graph_task_update_begin/end re-issuing FIA.out with the
    new lengths before each replay), which is what vLLM-Ascend does; it needs host
    context lengths at replay time and is not implemented here.

KV block size: FIA's paged mode wants block_size a multiple of 128 (min 128, max 512),
hence `preferred_block_size = 128`. Other block sizes use the reference op.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch_npu  # noqa: F401  (registers torch.npu; only get_platform imports this module)

from .base import AttentionPath, MemoryInfo, Platform

log = logging.getLogger(__name__)

_FIA_MAX_Q = 16  # FIA's cap on query tokens per sequence in these modes (speculative k+1)
_FIA_MASK_SIZE = 2048  # sparse_mode 2/3/4 take a fixed 2048x2048 "optimised" mask
_FIA_TND_HEAD_DIMS = (64, 128, 192)  # the TND layout's documented head sizes (others raise in the op)


@dataclass(slots=True)
class _FiaPrepared:
    """Per-step FIA inputs shared by all layers (see NpuPlatform.prepare_paged)."""

    tables: torch.Tensor  # [B, M] int32, -1 clamped to block 0
    static: bool  # built inside graph warm-up/capture: capacity lengths + mask
    mask: torch.Tensor | None  # [B, 1, Q, M*block_size] bool, True = masked (static only)
    lens: list[int] | None  # exact host context lengths (eager only)


class NpuGraph:
    """One NPUGraph. The platform is told when its warm-up or capture is running, so the
    attention op takes the shape-static path in both (the same op variant is warmed up
    that is then captured)."""

    def __init__(self, platform: "NpuPlatform", pool) -> None:
        self.graph = torch.npu.NPUGraph()
        self.pool = pool
        self._platform = platform

    @contextlib.contextmanager
    def warmup(self) -> Iterator[None]:
        with self._platform._static_region():
            yield

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        with self._platform._static_region(), torch.npu.graph(self.graph, pool=self.pool):
            yield

    def replay(self) -> None:
        self.graph.replay()


class NpuPlatform(Platform):
    name = "npu"
    device_type = "npu"
    preferred_block_size = 128

    def __init__(self, index: int = 0) -> None:
        super().__init__(index)
        count = torch.npu.device_count()
        if index >= count:
            raise ValueError(f"npu:{index} requested but only {count} NPU device(s) are visible")
        self._pool = None
        self._static_depth = 0  # > 0 while an NpuGraph warms up or captures
        self._causal_mask: torch.Tensor | None = None  # the 2048x2048 FIA mask, on device
        # Memo of the last context_lens read to host: the tensor itself (held, so that a later
        # step's fresh tensor can never pass for it) and its version counter at the read.
        self._lens_src: torch.Tensor | None = None
        self._lens_version = -1
        self._lens_host: list[int] = []
        self._scale_kw: str | None = None  # FIA's scale keyword differs across torch_npu versions
        self._fia_ok = hasattr(torch_npu, "npu_fused_infer_attention_score")
        self._scatter_kv_ok = hasattr(torch_npu, "npu_scatter_pa_kv_cache")
        self._reshape_cache_ok = hasattr(torch_npu, "_npu_reshape_and_cache")
        self._rms_ok = hasattr(torch_npu, "npu_rms_norm")

    # ----- device facts -------------------------------------------------
    def synchronize(self) -> None:
        torch.npu.synchronize(self.device)

    def memory_info(self) -> MemoryInfo:
        free, total = torch.npu.mem_get_info(self.device)
        return MemoryInfo(total_bytes=total, free_bytes=free)

    def device_counters(self) -> dict[str, float]:
        """`npu-smi info -t usages -i N` percentages (HBM usage / bandwidth, AI core), if the tool
        exists. N is the npu-smi card id, assumed equal to the device index (UNVERIFIED)."""
        import shutil
        import subprocess

        if shutil.which("npu-smi") is None:
            return {}
        try:
            text = subprocess.run(
                ["npu-smi", "info", "-t", "usages", "-i", str(self.index)],
                capture_output=True, text=True, timeout=2.0,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            key, sep, val = line.partition(":")
            key = key.strip()
            if sep and key.endswith("(%)"):
                try:
                    name = "npu_smi_" + key[:-3].strip().lower().replace(" ", "_") + "_percent"
                    out.setdefault(name, float(val.strip()))  # first chip of the card
                except ValueError:
                    continue
        return out

    # ----- graphs ---------------------------------------------------------
    @property
    def supports_graphs(self) -> bool:
        return hasattr(torch.npu, "NPUGraph") and hasattr(torch.npu, "graph")

    def graph_pool(self):
        """One memory pool per platform instance, shared by every graph made from it."""
        if self._pool is None:
            self._pool = torch.npu.graph_pool_handle()
        return self._pool

    def make_graph(self, pool=None) -> NpuGraph:
        return NpuGraph(self, self.graph_pool() if pool is None else pool)

    @contextlib.contextmanager
    def _static_region(self) -> Iterator[None]:
        self._static_depth += 1
        try:
            yield
        finally:
            self._static_depth -= 1

    # ----- ops ------------------------------------------------------------
    def write_kv(
        self,
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        slot_mapping: torch.Tensor,  # [T] int64, -1 = padding
    ) -> None:
        if not ((self._scatter_kv_ok or self._reshape_cache_ok)
                and k_cache.dtype in (torch.float16, torch.bfloat16) and k.dtype == k_cache.dtype):
            return super().write_kv(k, v, k_cache, v_cache, slot_mapping)
        num_blocks, block_size = k_cache.shape[:2]
        # Neither op's documentation promises to skip negative slots: send padding to the sink's
        # last slot, as the reference op does.
        slots = torch.where(slot_mapping >= 0, slot_mapping, num_blocks * block_size - 1).to(torch.int32)
        if self._scatter_kv_ok:
            # cache_mode by keyword, as vllm-ascend passes it: the op's documented default is
            # "PA_NZ" (an NZ-format cache [num_blocks, Hkv*D/16, block_size, 16]); our 4-D
            # [num_blocks, block_size, Hkv, D] caches are the "Norm" layout.
            torch_npu.npu_scatter_pa_kv_cache(k.contiguous(), v.contiguous(), k_cache, v_cache, slots,
                                              cache_mode="Norm")
        else:
            # Positional arguments: the slot keyword was renamed (slot_mapping -> slot_indices)
            # between CANN releases.
            torch_npu._npu_reshape_and_cache(k.contiguous(), v.contiguous(), k_cache, v_cache, slots)

    def _host_lens(self, context_lens: torch.Tensor) -> list[int]:
        # Every layer of one forward passes the same context_lens tensor: read it once. Match
        # by identity against a held reference, not by (id, data_ptr, version): once the last
        # step's tensor is freed, the next step's fresh one may get its id and (caching
        # allocator) its address, at version 0 again, and would reuse stale lengths.
        if context_lens is not self._lens_src or context_lens._version != self._lens_version:
            self._lens_host = [int(x) for x in context_lens.tolist()]
            self._lens_src, self._lens_version = context_lens, context_lens._version
        return self._lens_host

    def _fia(self, q, k, v, *, scale: float, **kwargs) -> torch.Tensor:
        if self._scale_kw is None:
            try:
                out = torch_npu.npu_fused_infer_attention_score(q, k, v, scale=scale, **kwargs)[0]
                self._scale_kw = "scale"
                return out
            except TypeError:  # torch_npu <= 6.x calls it scale_value
                self._scale_kw = "scale_value"
        return torch_npu.npu_fused_infer_attention_score(q, k, v, **{self._scale_kw: scale}, **kwargs)[0]

    def paged_attention_path(
        self, q_dtype: torch.dtype, kv_dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
        block_size: int, num_queries: int, captured: bool,
    ) -> AttentionPath:
        """Eager: FIA in the TND layout with exact host lengths (reads each row's context). Inside
        graph capture: FIA in BSND with capacity lengths and a mask (reads every block of the
        table: max_model_len per row; the model runner does not capture that, see
        ModelRunner). Anything FIA's documentation excludes: the reference op."""
        why = self._fia_reason(q_dtype, block_size, num_queries)
        if not why:  # the step can take FIA: this layer's own shapes
            if kv_dtype != q_dtype:
                why = f"KV cache dtype {kv_dtype} != activation dtype {q_dtype}"
            elif num_heads % num_kv_heads or num_heads // num_kv_heads > 64:
                why = f"{num_heads} query heads over {num_kv_heads} KV heads (FIA: a multiple, group <= 64)"
            elif not captured and head_dim not in _FIA_TND_HEAD_DIMS:
                why = f"head_dim {head_dim} (FIA's TND layout takes {', '.join(map(str, _FIA_TND_HEAD_DIMS))})"
            elif captured and head_dim % 16:
                why = f"head_dim {head_dim} (FIA's BSND layout takes multiples of 16)"
        if why:
            return AttentionPath("reference", fast=False, bounded=not captured, reason=why)
        if captured:
            return AttentionPath("fia-bsnd-static", fast=True, bounded=False)
        return AttentionPath("fia-tnd", fast=True, bounded=True)

    def _fia_reason(self, dtype: torch.dtype, block_size: int, num_queries: int) -> str:
        """Why FIA cannot serve a step of this dtype, block size and query length ("" when it can):
        the checks that hold for every layer of the step (prepare_paged's), before each layer's own."""
        if not self._fia_ok:
            return "torch_npu has no npu_fused_infer_attention_score"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"dtype {dtype} (FIA takes float16, bfloat16)"
        if block_size % 128 or block_size > 512:
            return f"block_size {block_size} (FIA's paged mode takes multiples of 128 up to 512)"
        if num_queries > _FIA_MAX_Q:
            return f"{num_queries} query tokens per sequence (FIA takes up to {_FIA_MAX_Q})"
        return ""

    def _prepare_fia(
        self, block_tables: torch.Tensor, context_lens: torch.Tensor, num_queries: int, block_size: int
    ) -> "_FiaPrepared":
        # -1 entries are not validated by FIA: clamp them to block 0 (finite data, and every
        # read of it is masked or belongs to a padded row), as the reference op does.
        tables = block_tables.clamp_min(0).to(torch.int32)  # [B, M]
        if self._static_depth > 0:
            kv_len = tables.shape[1] * block_size
            pos_k = torch.arange(kv_len, device=tables.device)
            pos_q = (context_lens.to(torch.long)[:, None] - num_queries
                     + torch.arange(num_queries, device=tables.device)[None, :])  # [B, Q]
            mask = (pos_k[None, None, :] > pos_q[:, :, None]).unsqueeze(1)  # [B, 1, Q, kv_len], True = masked
            return _FiaPrepared(tables=tables, static=True, mask=mask, lens=None)
        return _FiaPrepared(tables=tables, static=False, mask=None, lens=self._host_lens(context_lens))

    def prepare_paged(
        self,
        block_tables: torch.Tensor,  # [B, M] int32, -1 padded
        context_lens: torch.Tensor,  # [B]
        num_queries: int,
        block_size: int,
        dtype: torch.dtype,
    ):
        """Once per step: FIA's block table (and static mask, or host lengths) for all layers."""
        if self._fia_reason(dtype, block_size, num_queries):
            return super().prepare_paged(block_tables, context_lens, num_queries, block_size, dtype)
        return self._prepare_fia(block_tables, context_lens, num_queries, block_size)

    def paged_attention(
        self,
        q: torch.Tensor,  # [B, Q, H, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        block_tables: torch.Tensor,  # [B, M] int32, -1 padded
        context_lens: torch.Tensor,  # [B] int32
        scale: float,
        prepared=None,  # from prepare_paged(), shared across layers
    ) -> torch.Tensor:  # [B, Q, H, D]
        B, Q, H, D = q.shape
        num_blocks, block_size, Hkv, _ = k_cache.shape
        M = block_tables.shape[1]
        static = self._static_depth > 0
        path = self.paged_attention_path(q.dtype, k_cache.dtype, H, Hkv, D, block_size, Q, captured=static)
        if path.fast and static and B * M > num_blocks:
            # FIA documents that num_blocks must cover the blocks the lengths imply for all rows.
            path = AttentionPath("reference", fast=False, bounded=False,
                                 reason=f"{B} rows x {M} blocks exceed the cache's {num_blocks} blocks")
        self._note_path(path)
        if not path.fast:
            if prepared is None or isinstance(prepared, _FiaPrepared):  # the reference needs its own
                prepared = super().prepare_paged(block_tables, context_lens, Q, block_size, q.dtype)
            return super().paged_attention(q, k_cache, v_cache, block_tables, context_lens, scale, prepared)
        if not isinstance(prepared, _FiaPrepared) or prepared.static != static:
            prepared = self._prepare_fia(block_tables, context_lens, Q, block_size)
        k = k_cache.view(num_blocks, block_size, Hkv * D)  # [num_blocks, block_size, Hkv*D]
        v = v_cache.view(num_blocks, block_size, Hkv * D)
        common = dict(num_heads=H, num_key_value_heads=Hkv, block_table=prepared.tables, block_size=block_size)
        if prepared.static:
            out = self._fia(
                q.contiguous(), k, v, scale=scale, input_layout="BSND", atten_mask=prepared.mask, sparse_mode=0,
                actual_seq_lengths=[Q] * B, actual_seq_lengths_kv=[M * block_size] * B, **common,
            )
        else:
            qt = q.reshape(B * Q, H, D).contiguous()  # [T, H, D]; FIA rejects non-contiguous inputs
            out = self._fia(
                qt, k, v, scale=scale, input_layout="TND", atten_mask=self._fia_causal_mask(q.device), sparse_mode=3,
                actual_seq_lengths=list(range(Q, B * Q + 1, Q)), actual_seq_lengths_kv=prepared.lens, **common,
            )
        return out.view(B, Q, H, D)

    def _fia_causal_mask(self, device: torch.device) -> torch.Tensor:
        if self._causal_mask is None:
            n = _FIA_MASK_SIZE
            self._causal_mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)
        return self._causal_mask

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not self._rms_ok or weight.dtype != x.dtype:
            return super().rms_norm(x, weight, eps)
        return torch_npu.npu_rms_norm(x, weight, epsilon=eps)[0]
