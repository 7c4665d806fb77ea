"""One native decoder for the Llama / Mistral / Qwen2 / Qwen3 families, reading a paged KV cache.

Family differences are flags on `ModelConfig`: q/k/v bias (Qwen2; Llama / Qwen3 with
`attention_bias`, which also biases o_proj), MLP biases (Llama `mlp_bias`), per-head q/k
RMSNorm and an explicit head_dim (Qwen3), rope scaling (Llama 3), tied embeddings. q/k/v and
gate/up projections are fused at load time so a decode step launches fewer matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..platform import Platform
from .config import ModelConfig


@dataclass(slots=True)
class AttentionMetadata:
    """Where each token of a packed step sits in the paged cache.

    The first `num_decode_tokens` tokens are `num_decodes` sequences with `decode_q` tokens each
    (decode: 1, speculative verify: k+1), attended through `paged_attention`; the rest are prefill
    chunks attended through `prefill_attention` (eager, host metadata).
    """

    slot_mapping: torch.Tensor  # [T] int64, -1 = padding
    # decode / verify part (device tensors, graph-capturable)
    num_decodes: int = 0
    decode_q: int = 1
    block_tables: torch.Tensor | None = None  # [num_decodes, max_blocks] int32
    context_lens: torch.Tensor | None = None  # [num_decodes] int32
    # prefill part (host lists, eager only)
    cu_seqlens_q: list[int] | None = None  # offsets relative to the prefill part
    prefill_num_cached: list[int] | None = None
    prefill_block_tables: list[list[int]] | None = None
    paged_prepared: object = None  # platform.prepare_paged(...) result, shared by all layers

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes * self.decode_q


class Linear(nn.Linear):
    """nn.Linear whose matmul the platform runs, on a weight the platform may have repacked at
    load (`Decoder.pack_weights`): CPU reads a oneDNN layout."""

    def __init__(self, in_features: int, out_features: int, bias: bool, platform: Platform) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.platform = platform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.platform.linear(x, self.weight, self.bias)

    def pack(self) -> None:
        packed = self.platform.pack_linear(self.weight.data)
        if packed is not self.weight.data:
            self.weight = nn.Parameter(packed, requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, platform: Platform) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.platform = platform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.platform.rms_norm(x, self.weight, self.eps)


class Rotary(nn.Module):
    """cos/sin tables for every position up to max_position, HF's rotate-half layout."""

    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__()
        inv_freq = cfg.rope_inv_freq()
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos(), persistent=False)
        # rotate_half(x) * sin == roll(x, D/2) * [-sin_lo, sin_hi]: the sign lives in the table
        # so a step's rotation is roll, mul, addcmul (not neg, two slices, cat, mul, mul, add).
        self.register_buffer("sin", torch.cat([-freqs.sin(), freqs.sin()], dim=-1), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        # positions: [T] -> cos, signed sin: [T, 1, D], looked up once per step for all layers
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D], cos / signed sin: [T, 1, D] (Rotary.tables) -> [T, heads, D]
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, platform: Platform) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias, platform)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, cfg.o_bias, platform)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, platform) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, platform) if cfg.qk_norm else None
        self.platform = platform
        # Bound by the ModelRunner that owns the cache: [num_blocks, block_size, Hkv, D] each.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        # x: [T, hidden]
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is None:
            # q and k side by side in one rotation: [T, H + Hkv, D]
            qk = apply_rotary(qkv[:, :self.q_size + self.kv_size].view(T, -1, self.head_dim), *rope)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        else:
            q = self.q_norm(qkv[:, :self.q_size].view(T, self.num_heads, self.head_dim))
            k = self.k_norm(qkv[:, self.q_size:self.q_size + self.kv_size].view(T, self.num_kv_heads, self.head_dim))
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        self.platform.write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)

        nd = meta.num_decode_tokens
        outs = []
        if meta.num_decodes:
            qd = q[:nd].view(meta.num_decodes, meta.decode_q, self.num_heads, self.head_dim)
            od = self.platform.paged_attention(
                qd, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens, self.scale,
                prepared=meta.paged_prepared,
            )
            outs.append(od.reshape(nd, self.num_heads, self.head_dim))
        if nd < T:
            op = self.platform.prefill_attention(
                q[nd:], k[nd:], v[nd:], meta.cu_seqlens_q, self.k_cache, self.v_cache,
                meta.prefill_block_tables, meta.prefill_num_cached, self.scale,
            )
            outs.append(op)
        o = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, platform: Platform) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias, platform)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, platform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, platform: Platform) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, platform)
        self.self_attn = Attention(cfg, platform)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, platform)
        self.mlp = MLP(cfg, platform)

    def forward(self, x, rope, meta):
        x = x + self.self_attn(self.input_layernorm(x), rope, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, platform: Platform, max_position: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.platform = platform
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, platform) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, platform)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, False, platform)
        self.rotary = Rotary(cfg, max_position)

    def pack_weights(self) -> None:
        """Once loaded: every linear weight into the platform's layout. A tied head stays as the
        embedding (the lookup needs the plain layout; a packed copy would double the largest matrix)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.pack()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden: [T, hidden]
        x = self.embed_tokens(input_ids)
        rope = self.rotary.tables(positions, x.dtype)
        if meta.num_decodes and meta.paged_prepared is None:
            attn = self.layers[0].self_attn
            meta.paged_prepared = attn.platform.prepare_paged(
                meta.block_tables, meta.context_lens, meta.decode_q, attn.k_cache.shape[1], x.dtype
            )
        for layer in self.layers:
            x = layer(x, rope, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [..., hidden] -> logits: [..., V] float32
        logits = F.linear(hidden, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(hidden)
        return logits.float()

    def forward_paged_hidden(
        self,
        input_ids: torch.Tensor,  # [B, Q]
        positions: torch.Tensor,  # [B, Q]
        slot_mapping: torch.Tensor,  # [B, Q]
        block_tables: torch.Tensor,  # [B, M] int32
        context_lens: torch.Tensor,  # [B] int32
    ) -> torch.Tensor:  # final hidden states [B, Q, hidden]
        """The decode / verify body: static shapes, no host sync, so it can be graph-captured."""
        B, Q = input_ids.shape
        meta = AttentionMetadata(
            slot_mapping=slot_mapping.reshape(-1), num_decodes=B, decode_q=Q,
            block_tables=block_tables, context_lens=context_lens,
        )
        return self.forward(input_ids.reshape(-1), positions.reshape(-1), meta).view(B, Q, -1)

    def forward_paged(self, input_ids, positions, slot_mapping, block_tables, context_lens) -> torch.Tensor:
        # the body's arguments -> logits [B, Q, V] float32
        hidden = self.forward_paged_hidden(input_ids, positions, slot_mapping, block_tables, context_lens)
        return self.compute_logits(hidden)
