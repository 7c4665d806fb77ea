"""Paged attention for decode and speculative verification, written in Triton.

Reads each sequence's KV blocks straight from the paged cache (no padded gather copy).
Flash-decoding layout: the context of a sequence is cut into equal token ranges
("splits"), one program per (sequence, KV head, split) runs an online softmax over its
range for all query heads of the GQA group and all Q trailing query tokens at once (they
share the same K/V loads), and a second small kernel merges the splits. When one split
suffices (large batch), the first kernel writes the final output directly.

Semantics match `Platform.paged_attention`: query i of sequence b sits at position
context_lens[b] - Q + i and sees keys at positions <= its own. Differences, by design:
  * block-table entries < 0 are "no storage": their keys are masked out, never read;
  * a row whose keys are all masked (context_len 0, or all its blocks -1, which is what
    padded batch rows look like) gets an all-zero output, never NaN.

Everything the launch depends on (grid, split size) is derived from tensor *shapes*,
never from tensor values, so the launch is CUDA-graph capturable with no host sync.

This module imports triton at import time; `sizewise.platform.cuda` imports it lazily
and falls back to the torch reference op when triton is missing. On CPU tensors it runs
under Triton's interpreter (TRITON_INTERPRET=1 set before this module is imported),
which is how the unit tests check it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_attn_split_kernel(
    q_ptr,  # [B, Q, H, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    block_tables_ptr,  # [B, M] int32, -1 = no block
    context_lens_ptr,  # [B] int32
    out_ptr,  # [B, Q, H, D] (SINGLE_SPLIT) or unused
    part_acc_ptr,  # [B, Hkv, S, BLOCK_M, BLOCK_D] float32 (split mode)
    part_ml_ptr,  # [B, Hkv, S, 2, BLOCK_M] float32: running max (log2 domain), sum
    scale_log2e,
    stride_qb, stride_qq, stride_qh,
    stride_kn, stride_ks, stride_kh,
    stride_vn, stride_vs, stride_vh,
    stride_btb,
    stride_ob, stride_oq, stride_oh,
    num_kv_heads, num_splits, tokens_per_split, max_blocks,
    Q: tl.constexpr,
    G: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # >= G * Q, power of two, >= 16 (tl.dot minimum)
    BLOCK_N: tl.constexpr,  # keys per inner iteration
    BLOCK_SIZE: tl.constexpr,  # KV cache block size (tokens)
    SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    ctx = tl.load(context_lens_ptr + b)
    # Row r of the tile is query head kvh*G + r // Q at query token r % Q.
    rows = tl.arange(0, BLOCK_M)
    g = rows // Q
    qi = rows % Q
    row_ok = rows < G * Q
    head = kvh * G + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    q = tl.load(
        q_ptr + b * stride_qb + qi[:, None] * stride_qq + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    q_pos = ctx - Q + qi  # [BLOCK_M] absolute position of each query row

    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, ctx)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for t0 in range(start, end, BLOCK_N):
        tok = t0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        blk_col = tok // BLOCK_SIZE
        tok_ok = (tok < end) & (blk_col < max_blocks)
        blk = tl.load(block_tables_ptr + b * stride_btb + blk_col, mask=tok_ok, other=-1)
        tok_ok = tok_ok & (blk >= 0)
        blk64 = tl.maximum(blk, 0).to(tl.int64)  # int64: cache offsets exceed 2**31
        off = tok % BLOCK_SIZE
        kv_mask = tok_ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_cache_ptr + blk64[:, None] * stride_kn + off[:, None] * stride_ks
            + kvh * stride_kh + d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        visible = tok_ok[None, :] & (tok[None, :] <= q_pos[:, None]) & row_ok[:, None]
        s = tl.where(visible, s, float("-inf"))  # [BLOCK_M, BLOCK_N]

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with nothing visible yet keep m = -inf; use 0 as the exp base so that
        # exp2(-inf - base) = 0 instead of exp2(-inf + inf) = NaN.
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_base)
        p = tl.exp2(s - m_base[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + blk64[:, None] * stride_vn + off[:, None] * stride_vs
            + kvh * stride_vh + d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SINGLE_SPLIT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + b * stride_ob + qi[:, None] * stride_oq + head[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    else:
        # Splits past the context store nothing: the merge kernel reads only the first
        # ceil(ctx / tokens_per_split) splits, so idle programs cost a launch, not bandwidth.
        if start < ctx:
            base = (b * num_kv_heads + kvh) * num_splits + split
            tl.store(
                part_acc_ptr + base * BLOCK_M * BLOCK_D + rows[:, None] * BLOCK_D + d[None, :],
                acc,
                mask=row_ok[:, None],
            )
            tl.store(part_ml_ptr + base * 2 * BLOCK_M + rows, m_i, mask=row_ok)
            tl.store(part_ml_ptr + base * 2 * BLOCK_M + BLOCK_M + rows, l_i, mask=row_ok)


@triton.jit
def _paged_attn_merge_kernel(
    out_ptr,  # [B, Q, H, D]
    part_acc_ptr,  # [B, Hkv, S, BLOCK_M, BLOCK_D] float32
    part_ml_ptr,  # [B, Hkv, S, 2, BLOCK_M] float32
    context_lens_ptr,
    stride_ob, stride_oq, stride_oh,
    num_kv_heads, num_splits, tokens_per_split,
    Q: tl.constexpr,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < G * Q
    d = tl.arange(0, BLOCK_D)
    ctx = tl.load(context_lens_ptr + b)
    # Only splits that start inside the context hold anything; the rest are (-inf, 0).
    n_active = tl.minimum((ctx + tokens_per_split - 1) // tokens_per_split, num_splits)
    first = (b * num_kv_heads + kvh) * num_splits

    m_g = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(0, n_active):
        m_s = tl.load(part_ml_ptr + (first + s) * 2 * BLOCK_M + rows, mask=row_ok, other=float("-inf"))
        m_g = tl.maximum(m_g, m_s)
    m_base = tl.where(m_g == float("-inf"), 0.0, m_g)

    l_g = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(0, n_active):
        base = first + s
        m_s = tl.load(part_ml_ptr + base * 2 * BLOCK_M + rows, mask=row_ok, other=float("-inf"))
        l_s = tl.load(part_ml_ptr + base * 2 * BLOCK_M + BLOCK_M + rows, mask=row_ok, other=0.0)
        a_s = tl.load(
            part_acc_ptr + base * BLOCK_M * BLOCK_D + rows[:, None] * BLOCK_D + d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        w = tl.exp2(m_s - m_base)
        l_g += w * l_s
        acc += w[:, None] * a_s

    out = acc / tl.where(l_g == 0.0, 1.0, l_g)[:, None]
    head = kvh * G + rows // Q
    qi = rows % Q
    tl.store(
        out_ptr + b * stride_ob + qi[:, None] * stride_oq + head[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (d[None, :] < HEAD_DIM),
    )


def choose_split(
    batch: int,
    num_kv_heads: int,
    max_tokens: int,
    block_n: int,
    num_sms: int,
    partial_bytes_per_split: int,
    max_split_tokens: int = 512,
    max_partial_bytes: int = 64 << 20,
) -> tuple[int, int]:
    """(num_splits, tokens_per_split) from shapes only, so a captured graph stays valid.

    A batch whose (sequence, KV head) programs already fill the device (about two per SM)
    gets one split and no merge kernel. Otherwise the capacity M * block_size is cut so
    that a full context would give about two programs per SM, but never into splits longer
    than `max_split_tokens`, so a context much shorter than the capacity still spreads over
    several programs; the float32 partials stay under `max_partial_bytes`.
    """
    programs = max(1, batch * num_kv_heads)
    if programs >= 2 * num_sms or max_tokens <= block_n:
        return 1, max(block_n, max_tokens)
    want = math.ceil(2 * num_sms / programs)
    per_split = min(math.ceil(max_tokens / want), max_split_tokens)
    most_splits = max(1, max_partial_bytes // max(1, programs * partial_bytes_per_split))
    per_split = max(per_split, math.ceil(max_tokens / most_splits), block_n)
    per_split = math.ceil(per_split / block_n) * block_n
    splits = math.ceil(max_tokens / per_split)
    if splits <= 1:
        return 1, max(block_n, max_tokens)
    return splits, per_split


def paged_attention(
    q: torch.Tensor,  # [B, Q, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, M] int32, -1 padded
    context_lens: torch.Tensor,  # [B] int32, tokens in cache incl. the Q new ones
    scale: float,
    *,
    num_sms: int = 132,
    num_splits: int | None = None,  # force a split count (tests); None = heuristic
    block_n: int | None = None,  # keys per inner iteration (tests); None = heuristic
) -> torch.Tensor:  # [B, Q, H, D], dtype of q
    B, Q, H, D = q.shape
    _, block_size, Hkv, Dk = k_cache.shape
    if Dk != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not match q head dim {D}")
    if H % Hkv:
        raise ValueError(f"{H} query heads are not a multiple of {Hkv} KV heads")
    if k_cache.dtype != q.dtype:
        raise ValueError(f"q dtype {q.dtype} != cache dtype {k_cache.dtype}")
    G = H // Hkv
    out = torch.empty_like(q)
    if B == 0:
        return out
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_attention needs the head dimension contiguous")
    if block_tables.dtype != torch.int32:
        block_tables = block_tables.to(torch.int32)
    if context_lens.dtype != torch.int32:
        context_lens = context_lens.to(torch.int32)
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    context_lens = context_lens.contiguous()

    M = block_tables.shape[1]
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_M = max(16, triton.next_power_of_2(G * Q))
    # Keep the [BLOCK_M, BLOCK_N] score tile and the K/V tiles within a register budget.
    BLOCK_N = block_n or (64 if BLOCK_D <= 128 and BLOCK_M <= 32 else 32 if BLOCK_M <= 64 else 16)
    max_tokens = M * block_size
    if num_splits is None:
        partial_bytes = 4 * BLOCK_M * (BLOCK_D + 2)
        splits, per_split = choose_split(B, Hkv, max_tokens, BLOCK_N, num_sms, partial_bytes)
    else:
        per_split = max(BLOCK_N, math.ceil(math.ceil(max_tokens / max(1, num_splits)) / BLOCK_N) * BLOCK_N)
        splits = max(1, math.ceil(max_tokens / per_split))
    single = splits == 1
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if single:
        part_acc = part_ml = out  # unused placeholders
    else:
        part_acc = torch.empty(B, Hkv, splits, BLOCK_M, BLOCK_D, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(B, Hkv, splits, 2, BLOCK_M, dtype=torch.float32, device=q.device)
    num_warps = 4 if BLOCK_M * BLOCK_D <= 64 * 128 else 8
    _paged_attn_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_acc, part_ml,
        scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        Hkv, splits, per_split, M,
        Q=Q, G=G, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_SIZE=block_size, SINGLE_SPLIT=single, DOT_PRECISION=dot_precision,
        num_warps=num_warps,
    )
    if not single:
        _paged_attn_merge_kernel[(B, Hkv)](
            out, part_acc, part_ml, context_lens,
            out.stride(0), out.stride(1), out.stride(2),
            Hkv, splits, per_split,
            Q=Q, G=G, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M,
            num_warps=num_warps,
        )
    return out
