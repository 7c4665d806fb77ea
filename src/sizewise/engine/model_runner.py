"""The one owner of tensors: weights, the paged KV cache, step inputs, graphs and the sampler."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..models import AttentionMetadata, Decoder
from ..models.config import ModelConfig
from ..platform import Platform
from .sampler import Sampler, SamplerOutput, SamplingRow, race_key, rng_stream, top_logprobs
from .scheduler import SchedulerOutput
from .sequence import Sequence
from .spec.rejection import rejection_sample

log = logging.getLogger(__name__)


@dataclass(slots=True)
class VerifyResult:
    seq: Sequence
    num_proposed: int  # m
    num_accepted: int  # a <= m
    tokens: list[int]  # the a accepted proposals + the target's next token (before any stop cut)
    logprobs: list[dict[int, float] | None]  # per token, when the request asked for logprobs


@dataclass(slots=True)
class StepResult:
    sampled: list[Sequence]  # sequences that produced a token this step, in `samples` order
    samples: SamplerOutput | None  # None when only verify rows ran
    prompt_logprobs: dict[int, tuple[int, list[dict[int, float]]]]  # seq_id -> (first position, entries)
    verified: list[VerifyResult] = field(default_factory=list)
    num_forwards: int = 1  # model forwards the step ran (each streams the weights once)


class ModelRunner:
    def __init__(
        self,
        model: Decoder,
        cfg: ModelConfig,
        platform: Platform,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        seed: int = 0,
        enforce_eager: bool = True,
        verify_q: int = 0,  # k+1 of speculative verification (0: none); captured like decode
        eos_token_ids: tuple[int, ...] = (),  # the engine's (min_tokens masks them)
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.platform = platform
        self.device = platform.device
        self.dtype = dtype
        self.block_size = block_size
        self.max_blocks_per_seq = (max_model_len + block_size - 1) // block_size
        # One extra block at the end: the sink for padding slots (never handed out).
        shape = (num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = []
        for layer in model.layers:
            k = torch.zeros(shape, dtype=dtype, device=self.device)
            v = torch.zeros(shape, dtype=dtype, device=self.device)
            layer.self_attn.k_cache, layer.self_attn.v_cache = k, v
            self.kv_caches.append((k, v))
        self.sampler = Sampler(self.device, seed)
        self.eos_token_ids = eos_token_ids
        # Step inputs go through page-locked host memory on accelerators, so their copies are
        # asynchronous (the host goes on to the next launch) instead of a synchronous pageable copy.
        self._pin = platform.device_type != "cpu"
        self.graph_runner = None
        blocker = None
        if not enforce_eager and platform.supports_graphs:
            from .graph_runner import DecodeGraphRunner, capture_blocker, decode_q_values

            blocker = capture_blocker(platform, dtype, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, block_size,
                                      decode_q_values(verify_q - 1))
            if blocker:
                log.warning("decode graphs off, decoding eagerly: %s", blocker)
        if not enforce_eager and platform.supports_graphs and blocker is None:
            self.graph_runner = DecodeGraphRunner(
                platform=platform, fn=model.forward_paged_hidden, max_num_seqs=max_num_seqs,
                max_blocks_per_seq=self.max_blocks_per_seq, out_dim=cfg.hidden_size,
                device=self.device, q_values=decode_q_values(verify_q - 1),
            )
            self.graph_runner.capture()

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def step_weight_bytes(self) -> int:
        """Weight bytes a decode step reads: all but an untied input embedding, of which it only
        gathers the batch's rows (a tied one is read whole as the LM head)."""
        total = self.weight_bytes()
        if self.model.lm_head is not None:
            w = self.model.embed_tokens.weight
            total -= w.numel() * w.element_size()
        return total

    # ----- input preparation ---------------------------------------------------------
    def _h2d(self, data: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        # host list -> device tensor, copied in stream order without blocking the host
        return torch.tensor(data, dtype=dtype, pin_memory=self._pin).to(self.device, non_blocking=True)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _block_table_tensor(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [-1] * (width - len(s.block_table)) for s in seqs]
        return self._h2d(rows, torch.int32)

    # ----- the step ------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, draft_probs: dict[int, torch.Tensor] | None = None) -> StepResult:
        """draft_probs: seq_id -> [m, V], the draft distribution of verify rows whose draft sampled."""
        decodes, prefills, chunks = sched.decodes, sched.prefills, sched.prefill_chunks
        sampled: list[Sequence] = []
        samples, plp, forwards = None, {}, 0
        if decodes or prefills:
            forwards += 1
            if decodes and not prefills:
                sampled, sample_logits = list(decodes), self._decode(decodes)  # [B, V]
            else:
                sampled, sample_logits, plp = self._mixed(decodes, prefills, chunks)
            rows = [self._sampling_row(s) for s in sampled]
            samples = self.sampler(sample_logits, rows) if sampled else SamplerOutput([], None, [])
        verified = []
        if sched.verifies:
            forwards += 1
            verified = self._verify(sched.verifies, sched.verify_q, draft_probs or {})
        return StepResult(sampled=sampled, samples=samples, prompt_logprobs=plp, verified=verified,
                          num_forwards=forwards)

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        pos = [s.num_tokens - 1 for s in seqs]
        ids = self._h2d([[s.token_ids[-1]] for s in seqs])
        positions = self._h2d([[p] for p in pos])
        slots = self._h2d([self._slots(s, p, p + 1) for s, p in zip(seqs, pos)])
        block_tables = self._block_table_tensor(seqs)
        context_lens = self._h2d([p + 1 for p in pos], torch.int32)
        if self.graph_runner is not None:
            hidden = self.graph_runner.run(ids, positions, slots, block_tables, context_lens)
        else:
            hidden = self.model.forward_paged_hidden(ids, positions, slots, block_tables, context_lens)
        return self.model.compute_logits(hidden[:, 0])

    def _mixed(self, decodes, prefills, chunks):
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for s in decodes:
            p = s.num_tokens - 1
            ids.append(s.token_ids[p])
            positions.append(p)
            slots.extend(self._slots(s, p, p + 1))
        cu = [0]
        sample_idx: list[int] = list(range(len(decodes)))
        sampled: list[Sequence] = list(decodes)
        plp_rows: list[tuple[Sequence, int, int]] = []  # (seq, first packed index, count)
        base = len(decodes)
        for s, n in zip(prefills, chunks):
            start = s.num_cached_tokens
            ids.extend(s.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(self._slots(s, start, start + n))
            if s.request.params.prompt_logprobs is not None and start < s.num_prompt_tokens:
                plp_rows.append((s, base + cu[-1], n))
            cu.append(cu[-1] + n)
            if start + n == s.num_tokens:
                sample_idx.append(base + cu[-1] - 1)
                sampled.append(s)
        meta = AttentionMetadata(
            slot_mapping=self._h2d(slots),
            num_decodes=len(decodes),
            decode_q=1,
            block_tables=self._block_table_tensor(decodes) if decodes else None,
            context_lens=self._h2d([s.num_tokens for s in decodes], torch.int32) if decodes else None,
            cu_seqlens_q=cu,
            prefill_num_cached=[s.num_cached_tokens for s in prefills],
            prefill_block_tables=[s.block_table for s in prefills],
        )
        hidden = self.model(self._h2d(ids), self._h2d(positions), meta)
        logits = self.model.compute_logits(hidden[sample_idx]) if sample_idx else None
        plp = {s.seq_id: self._prompt_logprobs(s, hidden, first, n) for s, first, n in plp_rows}
        return sampled, logits, plp

    def _prompt_logprobs(
        self, seq: Sequence, hidden: torch.Tensor, first: int, n: int,
    ) -> tuple[int, list[dict[int, float]]]:
        """(start+1, entries for prompt positions start+1 .. start+n); position 0 has none.

        hidden: [T, hidden] the step's packed states; this chunk's rows start at `first`.
        """
        top = seq.request.params.prompt_logprobs
        start = seq.num_cached_tokens
        end = min(start + n, seq.num_prompt_tokens - 1)  # logits at p predict token p+1
        entries: list[dict[int, float]] = []
        if end > start:
            lp = torch.log_softmax(self.model.compute_logits(hidden[first:first + end - start]), -1)
            entries = top_logprobs(lp, seq.token_ids[start + 1:end + 1], top)
        return start + 1, entries

    def forward_verify(
        self,
        input_ids: torch.Tensor,  # [B, Q] long
        positions: torch.Tensor,  # [B, Q] long
        slot_mapping: torch.Tensor,  # [B, Q] long, -1 = padding
        block_tables: torch.Tensor,  # [B, m] int32
        context_lens: torch.Tensor,  # [B] int32
    ) -> torch.Tensor:  # logits [B, Q, V]
        """Speculative verification (Q = k+1): the captured body for this Q when there is one."""
        gr = self.graph_runner
        if gr is not None and input_ids.shape[1] in gr.q_values:
            hidden = gr.run(input_ids, positions, slot_mapping, block_tables, context_lens)
        else:
            hidden = self.model.forward_paged_hidden(input_ids, positions, slot_mapping, block_tables, context_lens)
        return self.model.compute_logits(hidden)

    def _verify(self, seqs: list[Sequence], Q: int, draft_probs: dict[int, torch.Tensor]) -> list[VerifyResult]:
        """Verify each row's last token + `spec_token_ids` (m <= k, padded to k) in one forward."""
        dev = self.device
        k = Q - 1
        B = len(seqs)
        props = [s.spec_token_ids for s in seqs]
        ids, pos, slots, ctx = [], [], [], []
        for s, toks in zip(seqs, props):
            m, n = len(toks), s.num_tokens
            ids.append([s.token_ids[-1]] + toks + [0] * (k - m))
            pos.append(list(range(n - 1, n + k)))
            slots.append(self._slots(s, n - 1, n + m) + [-1] * (k - m))
            ctx.append(n + k)
        logits = self.forward_verify(
            self._h2d(ids), self._h2d(pos), self._h2d(slots), self._block_table_tensor(seqs),
            self._h2d(ctx, torch.int32),
        )  # [B, Q, V]
        V = logits.shape[-1]
        want_lp = [s.params.logprobs is not None for s in seqs]
        raw_lp = torch.log_softmax(logits[torch.tensor(want_lp, device=dev)].float(), -1) if any(want_lp) else None
        # Row (b, j) is "sequence b + its first j proposals": penalties and min_tokens see them.
        srows = [self._sampling_row(s, toks[:j]) for s, toks in zip(seqs, props) for j in range(Q)]
        proc, probs = self.sampler.distribution(logits.reshape(B * Q, V).float(), srows)
        sampled_rows = [b for b, s in enumerate(seqs) if s.seq_id in draft_probs and props[b]]
        dprobs = drows = None
        if sampled_rows:
            drows = torch.tensor(sampled_rows, device=dev)
            dprobs = torch.zeros(len(sampled_rows), k, V, device=dev)  # padding positions: never read
            for i, b in enumerate(sampled_rows):
                dprobs[i, : len(props[b])] = draft_probs[seqs[b].seq_id].to(dev)
        num_acc, nxt = rejection_sample(
            torch.tensor([toks + [0] * (k - len(toks)) for toks in props], device=dev),
            [len(toks) for toks in props],
            proc.view(B, Q, V).argmax(-1),
            probs.view(B, Q, V) if probs is not None else None,
            dprobs, drows,
            [s.params.greedy for s in seqs],
            [[srows[b * Q + j].race_key for j in range(Q)] for b in range(B)],
            self.sampler,
        )
        host = torch.stack([num_acc, nxt], 1).tolist()
        results = []
        lp_i = 0
        for b, s in enumerate(seqs):
            a, tok = host[b]
            out = props[b][:a] + [tok]
            lps: list[dict[int, float] | None] = [None] * len(out)
            if want_lp[b]:
                lps = top_logprobs(raw_lp[lp_i], out, s.params.logprobs)
                lp_i += 1
            results.append(VerifyResult(s, len(props[b]), a, out, lps))
        return results

    def _sampling_row(self, seq: Sequence, extra: list[int] | tuple[int, ...] = ()) -> SamplingRow:
        """`extra`: tokens assumed appended after seq's tokens (speculative verification rows)."""
        p = seq.params
        key = None
        if p.seed is not None:
            if seq.rng_stream is None:
                seq.rng_stream = rng_stream(p.seed, seq.index)
            key = race_key(seq.rng_stream, seq.num_output_tokens + len(extra))
        block = None
        if seq.num_output_tokens + len(extra) < p.min_tokens:
            req = seq.request
            if req.min_tokens_block is None:
                req.min_tokens_block = sorted(set(self.eos_token_ids) | req.stop_ids)
            block = req.min_tokens_block or None
        return SamplingRow(
            params=p,
            race_key=key,
            output_token_ids=seq.output_token_ids + list(extra) if p.needs_penalties else [],
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens] if p.repetition_penalty != 1.0 else [],
            block_eos=block,
        )
