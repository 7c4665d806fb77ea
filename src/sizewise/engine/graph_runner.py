"""Graph-captured decode: one captured model body per (Q, batch-size bucket).

Single-stream decode is memory-bound only once the Python launch overhead is gone; this
class removes it by capturing the whole decode step (every layer, every kernel) once per
batch-size bucket at startup and replaying it each step.

How a step runs (`run`):
  1. pick the smallest bucket >= B;
  2. copy the B real rows into static device buffers (the addresses the graph reads);
  3. fill rows B..bucket with padding (below) so the padded rows are harmless;
  4. replay the graph for (Q, bucket); return the first B rows of its output.

Padding rows (documented contract, relied on by every platform's ops):
  input_ids 0, positions 0, slot_mapping -1 (the KV write lands in the sink block that is
  never allocated), block_tables -1 everywhere, context_len = Q. context_len = Q means the
  padded row's Q queries sit at positions 0..Q-1 and each sees at least one key position,
  so no attention row is fully masked on any backend (fully masked rows are NaN-prone on
  some fused kernels). Reference op: -1 blocks clamp to block 0 -> finite garbage;
  Triton: -1 blocks are masked -> zeros; NPU: -1 blocks are clamped to block 0 (finite).
  Columns of a real row's block table beyond what the caller passed are filled with -1.

Modes:
  * "graph": the platform supports graphs and enforce_eager is False: capture + replay.
  * "eager-bucket": no graph support (CPU) but the same bucket/padding path, calling the
    function on the padded static buffers. This makes the padding logic testable on CPU
    and proves padding does not change results.
  * "eager": enforce_eager=True: `run` calls the function directly, no buffers.

The returned output in graph mode is a view into graph-owned memory: consume it before the
next `run` of this runner. Graphs of one runner share one memory pool, and each graph's output
stays allocated in it for the runner's life (`held_bytes`): the engine captures the body up to
the final hidden states [bucket, Q, hidden] and computes logits eagerly for the real rows, so a
float32 [bucket, Q, vocab] logits tensor per graph is never held (0.7 GB per engine at a 152K
vocabulary, 64 sequences, k=4), and padded rows never pay for the LM head.

Requirements on `fn` for capture: pure tensor code, no host sync (.item(), .tolist(),
torch.tensor(host_list)), no data-dependent shapes, same kernels every call.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import torch

from ..clock import WALL
from ..platform.base import Platform

log = logging.getLogger(__name__)

ForwardPaged = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]

# Ascend stream resources are limited and every graph costs capture time and memory:
# keep the list short. Sizes past 64 step by 1.5x / 2x.
_BASE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def default_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, ... capped at max_num_seqs (always included)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    out = [b for b in _BASE_BUCKETS if b < max_num_seqs]
    b = _BASE_BUCKETS[-1]
    while b * 2 < max_num_seqs:  # beyond the table: keep doubling
        b *= 2
        out.append(b)
    out.append(max_num_seqs)
    return out


def graph_held_bytes(buckets: Sequence[int], q_values: Sequence[int], out_dim: int, elt: int) -> int:
    """Bytes the captured graphs of one runner hold for its life: every (Q, bucket) graph's
    [bucket, Q, out_dim] output stays allocated in the shared pool (`DecodeGraphRunner.held_bytes`)."""
    return sum(buckets) * sum(set(q_values)) * out_dim * elt


def capture_blocker(
    platform: Platform, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
    q_values: Sequence[int],
) -> str | None:
    """Why decode graphs must not be captured for this model on `platform`, or None.

    A captured step's block tables are max_model_len wide and its lengths live on the device.
    Capture pays only where the platform's captured attention reads each row's real context
    (CUDA's Triton kernel loops up to context_lens). Where it would read the whole table (the
    reference gather; NPU's static FIA path), every step would stream max_model_len keys per row
    and capture would allocate [bucket, max_model_len, Hkv, D] gathers: eager decode, which reads
    the batch's real blocks, is the better trade.
    """
    for q in q_values:
        path = platform.paged_attention_path(dtype, dtype, num_heads, num_kv_heads, head_dim, block_size, q,
                                             captured=True)
        if not path.bounded:
            detail = f": {path.reason}" if path.reason else ""
            return (f"captured {path.name} attention (Q={q}) would read max_model_len keys per row, "
                    f"not the real context{detail}")
    return None


def decode_q_values(num_speculative_tokens: int) -> tuple[int, ...]:
    """Query lengths an engine captures: 1 (decode), and k+1 (verification) when it speculates."""
    return (1, num_speculative_tokens + 1) if num_speculative_tokens > 0 else (1,)


class DecodeGraphRunner:
    def __init__(
        self,
        fn: ForwardPaged,
        *,
        platform: Platform | None = None,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        out_dim: int,  # last dim of fn's output [B, Q, out_dim]
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,  # of fn's output; None = not checked
        q_values: Sequence[int] = (1,),
        buckets: Sequence[int] | None = None,
        enforce_eager: bool = False,
        warmup_iters: int = 2,
    ) -> None:
        if max_blocks_per_seq < 1:
            raise ValueError(f"max_blocks_per_seq must be >= 1, got {max_blocks_per_seq}")
        if not q_values or any(q < 1 for q in q_values):
            raise ValueError(f"q_values must be positive query lengths, got {list(q_values)}")
        self.fn = fn
        self.platform = platform
        if device is None:
            device = platform.device if platform is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.out_dim = out_dim
        self.dtype = dtype
        self.q_values = tuple(sorted(set(q_values)))
        bl = sorted(set(buckets)) if buckets is not None else default_buckets(max_num_seqs)
        if not bl or bl[0] < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {bl}")
        self.buckets = bl
        self.max_batch = bl[-1]
        self.warmup_iters = warmup_iters
        if enforce_eager:
            self.mode = "eager"
        elif platform is not None and platform.supports_graphs:
            self.mode = "graph"
        else:
            self.mode = "eager-bucket"
        self._graphs: dict[tuple[int, int], object] = {}
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.captured = False
        if self.mode == "eager":
            return
        N, M, dev = self.max_batch, max_blocks_per_seq, self.device
        # Per-Q token buffers; block tables and context lens are shared (same shape for all Q).
        self._ids = {q: torch.zeros(N, q, dtype=torch.long, device=dev) for q in self.q_values}
        self._pos = {q: torch.zeros(N, q, dtype=torch.long, device=dev) for q in self.q_values}
        self._slots = {q: torch.full((N, q), -1, dtype=torch.long, device=dev) for q in self.q_values}
        self._tables = torch.full((N, M), -1, dtype=torch.int32, device=dev)
        self._ctx = torch.zeros(N, dtype=torch.int32, device=dev)

    # ----- buckets ------------------------------------------------------------------
    def bucket_for(self, batch: int) -> int:
        """Smallest bucket >= batch."""
        if batch < 1:
            raise ValueError(f"batch size must be >= 1, got {batch}")
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(
            f"batch of {batch} sequences exceeds the largest decode bucket {self.max_batch}; "
            "raise max_num_seqs or split the batch"
        )

    # ----- static buffers -------------------------------------------------------------
    def _stage(
        self,
        input_ids: torch.Tensor,  # [B, Q]
        positions: torch.Tensor,  # [B, Q]
        slot_mapping: torch.Tensor,  # [B, Q]
        block_tables: torch.Tensor,  # [B, m], m <= max_blocks_per_seq
        context_lens: torch.Tensor,  # [B]
        bucket: int,
    ) -> None:
        """Copy the real rows into the static buffers and pad rows B..bucket."""
        B, Q = input_ids.shape
        m = block_tables.shape[1]
        ids, pos, slots = self._ids[Q], self._pos[Q], self._slots[Q]
        ids[:B].copy_(input_ids, non_blocking=True)
        pos[:B].copy_(positions, non_blocking=True)
        slots[:B].copy_(slot_mapping, non_blocking=True)
        self._tables[:B, :m].copy_(block_tables, non_blocking=True)
        if m < self.max_blocks_per_seq:
            self._tables[:B, m:].fill_(-1)
        self._ctx[:B].copy_(context_lens, non_blocking=True)
        if B < bucket:
            self._fill_padding(Q, B, bucket)

    def _fill_padding(self, q_len: int, start: int, end: int) -> None:
        self._ids[q_len][start:end].fill_(0)
        self._pos[q_len][start:end].fill_(0)
        self._slots[q_len][start:end].fill_(-1)
        self._tables[start:end].fill_(-1)
        self._ctx[start:end].fill_(q_len)  # context_len = Q: see the module docstring

    def _static_args(self, q_len: int, bucket: int) -> tuple[torch.Tensor, ...]:
        return (
            self._ids[q_len][:bucket],
            self._pos[q_len][:bucket],
            self._slots[q_len][:bucket],
            self._tables[:bucket],
            self._ctx[:bucket],
        )

    def _check_output(self, out: torch.Tensor, q_len: int, bucket: int) -> None:
        want = (bucket, q_len, self.out_dim)
        if tuple(out.shape) != want or (self.dtype is not None and out.dtype != self.dtype):
            raise ValueError(
                f"the captured function returned {tuple(out.shape)} {out.dtype}, expected {want} {self.dtype}"
            )

    @property
    def held_bytes(self) -> int:
        """Bytes the captured graphs keep allocated between replays: their outputs (the pool's
        transient activations are reused across graphs and replays)."""
        return sum(o.numel() * o.element_size() for o in self._outputs.values())

    # ----- capture --------------------------------------------------------------------
    def capture(self) -> None:
        """Warm up and capture every (Q, bucket) graph. No-op outside graph mode."""
        if self.mode != "graph" or self.captured:
            return
        platform = self.platform
        total = len(self.q_values) * len(self.buckets)
        mem0 = platform.memory_info().free_bytes
        t0 = WALL.now()  # capture happens on the real device: its log reports real seconds
        done = 0
        log.info("capturing %d decode graphs (Q=%s, buckets=%s)", total, list(self.q_values), self.buckets)
        with torch.inference_mode():
            for q_len in self.q_values:
                # Largest first: later (smaller) graphs reuse the pool memory the largest reserved.
                for bucket in reversed(self.buckets):
                    self._fill_padding(q_len, 0, bucket)  # all-padding: writes hit only the sink
                    args = self._static_args(q_len, bucket)
                    graph = platform.make_graph()
                    # Warm-up compiles kernels (Triton JIT, cuBLAS handles) outside capture;
                    # a platform graph may need to know it is warming up (NPU: same op path).
                    warm = getattr(graph, "warmup", None)
                    with warm() if warm is not None else contextlib.nullcontext():
                        for _ in range(max(1, self.warmup_iters)):
                            out = self.fn(*args)
                    self._check_output(out, q_len, bucket)
                    platform.synchronize()
                    with graph.capture():
                        out = self.fn(*args)
                    self._graphs[(q_len, bucket)] = graph
                    self._outputs[(q_len, bucket)] = out
                    done += 1
                    log.debug("captured decode graph Q=%d bucket=%d (%d/%d)", q_len, bucket, done, total)
        platform.synchronize()
        self.captured = True
        used = mem0 - platform.memory_info().free_bytes
        log.info(
            "captured %d decode graphs in %.1f s, %.1f MiB device memory",
            total, WALL.now() - t0, used / 2**20,
        )

    # ----- run ------------------------------------------------------------------------
    def run(
        self,
        input_ids: torch.Tensor,  # [B, Q] long
        positions: torch.Tensor,  # [B, Q] long
        slot_mapping: torch.Tensor,  # [B, Q] long, -1 = padding
        block_tables: torch.Tensor,  # [B, m] int32, m <= max_blocks_per_seq, -1 padded
        context_lens: torch.Tensor,  # [B] int32
    ) -> torch.Tensor:  # [B, Q, out_dim]
        if self.mode == "eager":
            return self.fn(input_ids, positions, slot_mapping, block_tables, context_lens)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, Q], got shape {tuple(input_ids.shape)}")
        B, Q = input_ids.shape
        if Q not in self._ids:
            raise ValueError(f"query length {Q} was not set up; this runner has q_values={list(self.q_values)}")
        if block_tables.dim() != 2 or block_tables.shape[0] != B:
            raise ValueError(f"block_tables must be [B={B}, m], got {tuple(block_tables.shape)}")
        if block_tables.shape[1] > self.max_blocks_per_seq:
            raise ValueError(
                f"block table has {block_tables.shape[1]} columns, more than max_blocks_per_seq="
                f"{self.max_blocks_per_seq}"
            )
        bucket = self.bucket_for(B)
        if self.mode == "graph" and not self.captured:
            raise RuntimeError("DecodeGraphRunner.run before capture()")
        self._stage(input_ids, positions, slot_mapping, block_tables, context_lens, bucket)
        if self.mode == "graph":
            self._graphs[(Q, bucket)].replay()
            return self._outputs[(Q, bucket)][:B]
        out = self.fn(*self._static_args(Q, bucket))
        return out[:B]
