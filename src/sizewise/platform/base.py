"""The platform interface: the one place that knows which accelerator exists.

The engine asks a `Platform` for its device, for memory facts, for the attention and
KV-write ops and for a graph wrapper. The reference ops below are plain torch and run
anywhere; accelerator subclasses override what they can do faster.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class MemoryInfo:
    total_bytes: int
    free_bytes: int


@dataclass(slots=True, frozen=True)
class AttentionPath:
    """Which paged-attention implementation a platform runs for given inputs, and what it reads.

    `bounded`: each row reads only its real context (KV bytes proportional to context_lens). The
    reference op gathers every column of the block table it is given: bounded eagerly (the engine
    passes tables as wide as the batch's longest context), not inside a captured graph (the table
    is max_model_len wide there, frozen at capture).
    """

    name: str  # "reference", "triton", "fia-tnd", "fia-bsnd-static"
    fast: bool  # a fused device kernel, not the reference gather + SDPA
    bounded: bool
    reason: str = ""  # why the fast path was not taken; empty when it was


class Platform:
    """Base platform with torch reference ops (correct on every device)."""

    name: str = "base"
    device_type: str = "cpu"
    preferred_block_size: int = 16  # tokens per KV block

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self._peak_bandwidth: float | None = None
        # Paged-attention calls per path name (AttentionPath.name): lets a device check assert
        # that the fast kernel actually ran. Per instance: two engines never share counts.
        self.attention_calls: Counter[str] = Counter()
        self._fallbacks_logged: set[str] = set()

    # ----- device facts -------------------------------------------------
    @property
    def device(self) -> torch.device:
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.device_type, self.index)

    def synchronize(self) -> None:
        pass

    def memory_info(self) -> MemoryInfo:
        raise NotImplementedError

    def default_dtype(self, checkpoint_dtype: torch.dtype) -> torch.dtype:
        """`dtype="auto"`: follow the checkpoint on an accelerator."""
        return checkpoint_dtype

    def peak_bandwidth(self, nbytes: int = 256 << 20, iters: int = 5) -> float:
        """Copy bandwidth in bytes/s (bytes read + written), measured once and cached."""
        if self._peak_bandwidth is None:
            src = torch.empty(nbytes // 2, dtype=torch.uint8, device=self.device)
            dst = torch.empty_like(src)
            dst.copy_(src)
            self.synchronize()
            best = float("inf")
            for _ in range(iters):
                t0 = time.perf_counter()
                dst.copy_(src)
                self.synchronize()
                best = min(best, time.perf_counter() - t0)
            self._peak_bandwidth = 2 * src.numel() / best
        return self._peak_bandwidth

    def device_counters(self) -> dict[str, float]:
        """Vendor counters (e.g. memory-bandwidth utilisation %) as a cross-check for the
        orchestrator's own telemetry; empty where the platform has none. Never required."""
        return {}

    # ----- graphs ---------------------------------------------------------
    @property
    def supports_graphs(self) -> bool:
        return False

    def make_graph(self):  # -> object with capture context / replay()
        raise NotImplementedError(f"{self.name} has no graph capture")

    def graph_pool(self):
        return None

    # ----- ops ------------------------------------------------------------
    def paged_attention_path(
        self, q_dtype: torch.dtype, kv_dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
        block_size: int, num_queries: int, captured: bool,
    ) -> AttentionPath:
        """The path `paged_attention` takes for inputs of these dtypes and shapes, eagerly or
        inside graph capture. Depends on dtypes and shapes only, so it can be asked before any
        tensor exists (the model runner asks it before capturing graphs)."""
        return AttentionPath("reference", fast=False, bounded=not captured, reason=f"{self.name} has no fused kernel")

    def _note_path(self, path: AttentionPath) -> None:
        """Count a call on `path`; say once per (path, reason) why a fast path was not taken."""
        self.attention_calls[path.name] += 1
        if path.reason and path.reason not in self._fallbacks_logged and self.device_type != "cpu":
            self._fallbacks_logged.add(path.reason)
            log.warning("%s paged attention: %s path (%s)", self.name, path.name, path.reason)

    def write_kv(
        self,
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        slot_mapping: torch.Tensor,  # [T] int64, -1 = padding (not written)
    ) -> None:
        num_blocks, block_size = k_cache.shape[:2]
        flat_k = k_cache.view(num_blocks * block_size, *k_cache.shape[2:])
        flat_v = v_cache.view(num_blocks * block_size, *v_cache.shape[2:])
        # Padding slots (-1) land in the last block, a sink the block manager never hands
        # out: the op stays shape-static (no boolean indexing, no host sync) for graphs.
        idx = torch.where(slot_mapping >= 0, slot_mapping, num_blocks * block_size - 1)
        flat_k.index_copy_(0, idx, k.to(flat_k.dtype))
        flat_v.index_copy_(0, idx, v.to(flat_v.dtype))

    def prepare_paged(
        self,
        block_tables: torch.Tensor,  # [B, M] int32, -1 padded
        context_lens: torch.Tensor,  # [B]
        num_queries: int,
        block_size: int,
        dtype: torch.dtype,
    ):
        """Per-step attention metadata shared by every layer (computed once, not per layer).

        The reference returns (flat gather indices [B * M], additive mask [B, 1, Q, L]).
        """
        tables = block_tables.clamp_min(0).long()
        L = tables.shape[1] * block_size
        pos_k = torch.arange(L, device=block_tables.device)
        pos_q = context_lens[:, None].long() - num_queries + torch.arange(num_queries, device=block_tables.device)[None, :]
        visible = pos_k[None, None, :] <= pos_q[:, :, None]  # [B, Q, L]
        mask = torch.zeros(visible.shape, dtype=dtype, device=block_tables.device).masked_fill_(~visible, float("-inf"))
        return tables.reshape(-1), mask[:, None]

    def paged_attention(
        self,
        q: torch.Tensor,  # [B, Q, H, D] queries; Q = 1 for decode, k+1 for verify
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        block_tables: torch.Tensor,  # [B, max_blocks] int32/int64, -1 padded
        context_lens: torch.Tensor,  # [B] tokens in cache incl. the Q new ones
        scale: float,
        prepared=None,  # from prepare_paged(), shared across layers
    ) -> torch.Tensor:  # [B, Q, H, D]
        """Attention of Q trailing queries per sequence over its paged context.

        Query i of sequence b sits at position context_lens[b] - Q + i and sees keys
        at positions <= its own. The reference gathers each sequence's blocks into a
        padded [B, L, Hkv, D] copy, fine on CPU; accelerators override this.
        """
        B, Q, H, D = q.shape
        block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
        if type(self).paged_attention is Platform.paged_attention:  # not reached via a subclass's fallback
            self.attention_calls["reference"] += 1
        if prepared is None:
            prepared = self.prepare_paged(block_tables, context_lens, Q, block_size, q.dtype)
        flat_tables, mask = prepared
        L = mask.shape[-1]
        # index_select copies whole blocks (memcpy rows); advanced indexing is ~4x slower on CPU.
        k = k_cache.index_select(0, flat_tables).view(B, L, Hkv, D).transpose(1, 2)  # [B, Hkv, L, D]
        v = v_cache.index_select(0, flat_tables).view(B, L, Hkv, D).transpose(1, 2)
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        if Q == 1:
            # A decode's H // Hkv query heads of one KV head see the same keys: run them as that
            # head's queries [B, Hkv, G, D], so each K/V row is read once per KV head, not per head.
            out = torch.nn.functional.scaled_dot_product_attention(
                q.view(B, Hkv, H // Hkv, D), k, v, attn_mask=mask, scale=scale)
            return out.reshape(B, 1, H, D)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=mask, scale=scale, enable_gqa=Hkv != H,
        )
        return out.transpose(1, 2)

    def prefill_attention(
        self,
        q: torch.Tensor,  # [T, H, D] new tokens of all sequences, packed
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        cu_seqlens_q: list[int],  # host offsets into T, len B+1
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: list[list[int]],  # host tables, for sequences with cached context
        num_cached: list[int],  # tokens already in cache before this chunk, per seq
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        """Causal attention for packed prefill chunks (prefill is eager, never captured).

        A sequence with no cached context attends within its own chunk; one continuing
        a chunked prefill or hitting the prefix cache also reads its cached blocks.
        """
        H, Hkv = q.shape[1], k.shape[1]
        block_size = k_cache.shape[1]
        outs = []
        for b in range(len(cu_seqlens_q) - 1):
            s, e = cu_seqlens_q[b], cu_seqlens_q[b + 1]
            qb, kb, vb = q[s:e], k[s:e], v[s:e]
            n_cached = num_cached[b]
            if n_cached:
                nblk = (n_cached + block_size - 1) // block_size
                tbl = torch.tensor(block_tables[b][:nblk], device=q.device, dtype=torch.long)
                ck = k_cache[tbl].reshape(-1, Hkv, k.shape[-1])[:n_cached].to(q.dtype)
                cv = v_cache[tbl].reshape(-1, Hkv, v.shape[-1])[:n_cached].to(q.dtype)
                kb = torch.cat([ck, kb], 0)
                vb = torch.cat([cv, vb], 0)
            n_q, n_k = qb.shape[0], kb.shape[0]
            if n_cached:
                mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_cached)
                o = torch.nn.functional.scaled_dot_product_attention(
                    *_bhtd(qb, kb, vb), attn_mask=mask, scale=scale, enable_gqa=Hkv != H,
                )
            else:
                o = torch.nn.functional.scaled_dot_product_attention(
                    *_bhtd(qb, kb, vb), is_causal=True, scale=scale, enable_gqa=Hkv != H,
                )
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs, 0)

    # ----- matmuls ---------------------------------------------------------------
    def pack_linear(self, weight: torch.Tensor) -> torch.Tensor:
        """The form of a linear layer's weight [out, in] that `linear` reads (here: itself).

        Called once at load; a platform may return a kernel-specific layout that replaces the weight.
        """
        return weight

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [..., in], weight: pack_linear's result for [out, in] -> [..., out]
        return torch.nn.functional.linear(x, weight, bias)

    # ----- fused elementwise ops (overridable) --------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Normalise in float32 (as the HF reference does), scale in the model dtype.
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op
        y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps)
        return weight * y.to(x.dtype)


def _bhtd(*xs: torch.Tensor) -> list[torch.Tensor]:
    # [T, H, D] -> [1, H, T, D]: SDPA's fused (flash / memory-efficient) backends take 4-D
    # inputs only; 3-D ones fall back to the unfused math kernel and its [H, T, T] scores.
    return [x.transpose(0, 1).unsqueeze(0) for x in xs]
