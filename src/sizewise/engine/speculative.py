"""Speculative decoding: prompt-lookup (n-gram) and draft-model proposals, verified losslessly.

Per step, every running sequence whose request chose a speculative strategy ("pld", "draft",
"auto") and that has a proposal of m <= k tokens is verified by the target model in one
forward over Q = k+1 positions: its last token plus the m proposed tokens, padded to k (padded
positions write their K/V to the sink block and are never accepted). k is fixed per engine, so
the verify forward has a static shape per batch bucket and can be graph-captured like decode
(`ModelRunner.forward_verify`). The only host round trip is the one plain decode already makes:
the accepted count and the next token of each row come back with one `.tolist()`.

Exactness (the output distribution is the target's, token by token):
  * the target distribution p_j at verify position j is the sampler's own (`Sampler.distribution`)
    over the row "sequence + first j proposed tokens": temperature, top-k/p, min-p, penalties and
    min_tokens apply exactly as in plain decode;
  * greedy: proposal j is accepted iff it equals argmax p_j; the first mismatch (or the bonus
    position after m accepts) emits argmax p_j — token for token what plain greedy decode emits;
  * sampling: proposal x_j drawn from q_j is accepted with probability min(1, p_j(x)/q_j(x));
    on the first rejection the token is drawn from normalize(max(0, p_j - q_j)); after m accepts
    the bonus token is drawn from p_m. For prompt lookup (and a greedy draft) q_j is a point
    mass, which reduces to: accept with probability p_j(x), else draw from p_j without x. We
    do that by drawing, at each position, the very race plain decoding would draw there (keyed
    by seed and output index for seeded requests, `sampler.race_key`) and accepting x_j iff the
    token it samples is x_j: a seeded request then emits plain decoding's tokens exactly,
    whatever it shares a batch with, and whether or not it speculated in a step;
  * accepted tokens go through the engine's normal per-token finish check (EOS, stop ids, stop
    strings, max_tokens, context length), so nothing past a stop is ever emitted.

KV consistency: writes are position-indexed, so a rejected position is simply overwritten later;
the target's `num_cached_tokens` becomes n + accepted. The draft model (a second resident
EngineCore with the same tokenizer) keeps one shadow sequence per target sequence in its own
paged cache; its `num_cached_tokens` is rolled back to the accepted length after verification
and the next proposal first catches up on whatever the draft has not computed yet.

Speculation never causes preemption: verify slots are reserved only where blocks are free
(keeping one block per decoding sequence in reserve); otherwise the sequence decodes plainly.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..sampling_params import InvalidRequestError
from .sampler import rng_stream
from .sequence import Request, Sequence

if TYPE_CHECKING:
    from .core import EngineCore
    from .sampler import Sampler
    from .scheduler import SchedulerOutput

log = logging.getLogger(__name__)

STRATEGIES = ("plain", "pld", "draft", "auto")
PROPOSERS = ("pld", "draft")  # the keys of the per-core counters ("auto" proposes with pld)
BATCHING = ("split", "padded", "auto")
# spec_batching="auto": plain rows ride along in the verify forward (one forward per step instead
# of two) while the positions they waste (k per plain row) stay this few; beyond that the wasted
# compute costs more than the second forward's overhead saves. Measured on CPU with the demo
# small / medium tiers (benchmarks/speculative.py, batches 4-16): padded won up to ~16 wasted
# positions and lost 10-17% beyond ~28. A memory-bound accelerator step stays flat much longer,
# so there this is conservative.
PADDED_MAX_WASTE = 16
MAX_SPEC_TOKENS = 15  # Ascend's fused attention caps the per-sequence query length at 16
_EMA_ALPHA = 0.05  # per-core acceptance-rate EMA, one update per verify step and proposer
_DRAFT_SEED_SALT = 0x5DEECE66D  # seeded draft sampling must not share the target's RNG stream


# ----- prompt lookup ----------------------------------------------------------------------------
def prompt_lookup(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> np.ndarray:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's suffix n-gram.

    tokens: [L] int64, prompt + output. The suffix n-gram is tried from max_n down to min_n; the
    match must end before the last token (so at least one continuation token exists). When the
    continuation runs into the end of the sequence (the match overlaps the text being copied, as
    in a loop of period P), it goes on as the copy would: proposal j repeats proposal j - P.
    Host-side and vectorised: O(n * L) numpy compares on the token ids the engine already has on
    the host.
    """
    L = int(tokens.shape[0])
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        pattern = tokens[L - n:]
        # hits[i]: tokens[i:i+n] == pattern, for starts i in [0, L-n-1]
        hits = tokens[: L - n] == pattern[0]
        for j in range(1, n):
            hits &= tokens[j: L - n + j] == pattern[j]
        idx = np.flatnonzero(hits)
        if idx.size:
            start = int(idx[-1]) + n
            cont = tokens[start: start + k]
            return np.resize(cont, k) if cont.shape[0] < k else cont  # cyclic: the copy continues
    return tokens[:0]


# ----- verification -----------------------------------------------------------------------------
def rejection_sample(
    draft_tokens: torch.Tensor,  # [B, k] long, proposals (positions >= num_proposed are padding)
    num_proposed: list[int],  # [B] m per row (host), 0 <= m <= k
    target_argmax: torch.Tensor,  # [B, k+1] argmax of the processed target logits
    target_probs: torch.Tensor | None,  # [B, k+1, V] target distribution; None when all rows greedy
    draft_probs: torch.Tensor | None,  # [R, k, V] q of the rows that sampled their proposal
    draft_rows: torch.Tensor | None,  # [R] long, which rows those are; every other q is a point mass
    greedy: list[bool],  # [B]
    race_keys: list[list[int | None]],  # [B][k+1] keyed race per position (seeded rows) or None
    sampler: "Sampler",  # draws the races (and the shared stream's uniforms)
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [B] long, next_token [B] long
    """Accept a prefix of each row's proposal and pick the token after it, exactly as the target
    distribution would (see the module docstring).

    Every sampled row draws the race plain decoding would draw at each of its m+1 positions, and
    y_j = argmax(p_j / race_j) is the token plain decoding would sample there. A point-mass
    proposal x_j (prompt lookup, greedy draft) is accepted iff y_j == x_j: probability p_j(x_j),
    the rejection rule's min(1, p/q) for q = 1, and on the first mismatch y_j is a draw from p_j
    without x_j, the normalised residual. So a seeded row emits exactly plain decoding's tokens.
    A sampled draft proposal (q_j not a point mass) keeps the general rule: accept with a uniform
    u < p/q, on rejection race the residual max(0, p - q)."""
    B, k = draft_tokens.shape
    dev = draft_tokens.device
    m = torch.tensor(num_proposed, device=dev)
    valid = torch.arange(k, device=dev)[None, :] < m[:, None]  # [B, k]
    is_greedy = torch.tensor(greedy, device=dev)
    if target_probs is None:
        accept = (draft_tokens == target_argmax[:, :k]) & valid
        num_accepted = accept.long().cumprod(1).sum(1)
        return num_accepted, target_argmax.gather(1, num_accepted[:, None]).squeeze(1)
    V = target_probs.shape[-1]
    sampled_q = set(draft_rows.tolist()) if draft_rows is not None else set()
    races = torch.ones(B, k + 1, V, device=dev)
    u = torch.ones(B, k, device=dev)  # only rows with a sampled q read it
    for i in range(B):
        if greedy[i]:
            continue
        for j in range(num_proposed[i] + 1):
            sampler.race(races[i, j], race_keys[i][j])
        if i in sampled_q and num_proposed[i]:
            u[i, : num_proposed[i]] = sampler.uniform(num_proposed[i], race_keys[i][0])
    y = (target_probs / races).argmax(-1)  # [B, k+1] what plain decoding samples at each position
    accept = torch.where(is_greedy[:, None], draft_tokens == target_argmax[:, :k], draft_tokens == y[:, :k])
    if draft_probs is not None:
        p_x = target_probs[draft_rows, :k].gather(-1, draft_tokens[draft_rows][..., None]).squeeze(-1)  # [R, k]
        q_x = draft_probs.gather(-1, draft_tokens[draft_rows][..., None]).squeeze(-1)
        accept[draft_rows] = u[draft_rows] * q_x < p_x  # u < p/q without dividing by a q that may underflow
    accept &= valid
    num_accepted = accept.long().cumprod(1).sum(1)  # [B] length of the accepted prefix
    next_token = torch.where(is_greedy[:, None], target_argmax, y).gather(1, num_accepted[:, None]).squeeze(1)
    if draft_probs is not None:
        # Rows with a sampled q: after a rejection, race the residual at the rejected position.
        R = draft_rows.shape[0]
        a = num_accepted[draft_rows]
        gather_v = a[:, None, None].expand(R, 1, V)
        p_a = target_probs[draft_rows].gather(1, gather_v).squeeze(1)  # [R, V]
        pad_q = torch.cat([draft_probs, torch.zeros(R, 1, V, dtype=draft_probs.dtype, device=dev)], 1)
        resid = (p_a - pad_q.gather(1, gather_v).squeeze(1)).clamp_min(0.0)
        # A rejection implies p(x) < q(x), so the residual has mass; guard rounding anyway.
        use_resid = (a < m[draft_rows])[:, None] & (resid.sum(-1, keepdim=True) > 0)
        race_a = races[draft_rows].gather(1, gather_v).squeeze(1)
        drawn = (torch.where(use_resid, resid, p_a) / race_a).argmax(-1)
        next_token[draft_rows] = torch.where(is_greedy[draft_rows], next_token[draft_rows], drawn)
    return num_accepted, next_token


# ----- state --------------------------------------------------------------------------------------
@dataclass(slots=True)
class SpecState:
    """Per target sequence; lives in `Sequence.spec` (None for plain sequences)."""

    strategy: str  # pld | draft | auto
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # prompt + output
    num_tokens: int = 0  # filled prefix of `tokens`
    draft_seq: Sequence | None = None  # shadow sequence in the draft core's cache
    num_draft_tokens: int = 0  # proposed and verified, this sequence
    num_accepted_tokens: int = 0
    # auto: back off after poor acceptance (skip `skip` steps, then probe again)
    accept_ema: float = 1.0
    skip: int = 0
    backoff: int = 1

    def sync_tokens(self, seq: Sequence) -> np.ndarray:
        n = seq.num_tokens
        if n > self.tokens.shape[0]:
            grown = np.zeros(max(2 * self.tokens.shape[0], n + 64), dtype=np.int64)
            grown[: self.num_tokens] = self.tokens[: self.num_tokens]
            self.tokens = grown
        if n > self.num_tokens:
            self.tokens[self.num_tokens: n] = seq.token_ids[self.num_tokens: n]
            self.num_tokens = n
        return self.tokens[:n]


@dataclass(slots=True)
class ProposerCounters:
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0  # sequence-verifications
    acceptance_ema: float = 0.0  # accepted / proposed, EMA over verify steps

    def record(self, proposed: int, accepted: int, rows: int) -> None:
        if proposed <= 0:
            return
        rate = accepted / proposed
        if self.verify_steps == 0:
            self.acceptance_ema = rate
        else:
            self.acceptance_ema += _EMA_ALPHA * (rate - self.acceptance_ema)
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        self.verify_steps += rows


@dataclass(slots=True)
class _Row:
    seq: Sequence
    proposer: str  # pld | draft | plain (a plain row riding along in padded mode)
    tokens: list[int]  # m proposed tokens
    q: torch.Tensor | None = None  # [m, V] draft distribution when the draft sampled


@dataclass(slots=True)
class VerifyBatch:
    rows: list[_Row]


@dataclass(slots=True)
class VerifyResult:
    seq: Sequence
    proposer: str
    num_proposed: int
    num_accepted: int
    tokens: list[int]  # accepted proposals + the target's next token (before any stop cut)
    logprobs: list[dict[int, float] | None]  # per token, when the request asked for logprobs


class SpeculativeDecoder:
    """Speculation for one EngineCore (the target). Not thread-safe: driven by the core's step."""

    def __init__(self, core: "EngineCore", k: int, lookup_min: int, lookup_max: int, batching: str) -> None:
        if not 0 < k <= MAX_SPEC_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in [1, {MAX_SPEC_TOKENS}] (0 disables), got {k}")
        if not 1 <= lookup_min <= lookup_max:
            raise ValueError(
                f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {lookup_min} and {lookup_max}"
            )
        if batching not in BATCHING:
            raise ValueError(f"spec_batching must be one of {BATCHING}, got {batching!r}")
        self.core = core
        self.k = k
        self.lookup_min, self.lookup_max = lookup_min, lookup_max
        self.batching = batching
        self.draft: "EngineCore | None" = None
        self.counters = {p: ProposerCounters() for p in PROPOSERS}
        self.last_num_tokens = 0  # tokens the last verify forward computed (for step stats)
        self.last_kv_tokens = 0

    # ----- setup ------------------------------------------------------------------------------
    def attach_draft(self, draft: "EngineCore") -> None:
        core = self.core
        if draft is core:
            raise ValueError("a core cannot be its own draft model")
        if draft.vocab_size != core.vocab_size:
            raise ValueError(
                f"draft {draft.name!r} has vocabulary size {draft.vocab_size}, target {core.name!r} has "
                f"{core.vocab_size}: draft and target must share one tokenizer"
            )
        if draft.tokenizer.get_vocab() != core.tokenizer.get_vocab():
            raise ValueError(f"draft {draft.name!r} and target {core.name!r} do not share one tokenizer")
        self.draft = draft

    def validate_strategy(self, strategy: str) -> None:
        if strategy not in STRATEGIES:
            raise InvalidRequestError(
                f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}", param="strategy"
            )
        if strategy == "draft" and self.draft is None:
            raise InvalidRequestError(
                f"strategy 'draft' needs a draft model attached to {self.core.name!r}; none is",
                param="strategy",
            )

    def init_seq(self, seq: Sequence, strategy: str) -> None:
        if strategy != "plain":
            seq.spec = SpecState(strategy)

    def release(self, seq: Sequence) -> None:
        """The target sequence finished or was aborted: free its shadow in the draft cache now."""
        st = seq.spec
        if st is not None and st.draft_seq is not None and self.draft is not None:
            self.draft.block_manager.free_seq(st.draft_seq)
            st.draft_seq = None

    # ----- proposals ----------------------------------------------------------------------------
    def _limit(self, seq: Sequence) -> int:
        """How many tokens may be proposed for `seq` this step (0: decode plainly)."""
        n = seq.num_tokens
        # Padded verify positions run to n-1+k: keep them inside the rotary table and block table.
        if n + self.k > self.core.max_model_len:
            return 0
        p = seq.params
        left = self.core.max_model_len - n  # tokens that may still be appended
        if p.max_tokens is not None:
            left = min(left, p.max_tokens - seq.num_output_tokens)
        return max(0, min(self.k, left - 1))  # the target adds one token of its own

    def _propose_pld(self, seq: Sequence, st: SpecState, limit: int) -> list[int]:
        if st.strategy == "auto" and st.skip > 0:
            st.skip -= 1
            return []
        toks = prompt_lookup(st.sync_tokens(seq), limit, self.lookup_min, self.lookup_max)
        return toks.tolist()

    def prepare(self, sched: "SchedulerOutput") -> VerifyBatch | None:
        """Pick this step's verify rows out of `sched.decodes` (they leave the plain decode)."""
        self.last_num_tokens = self.last_kv_tokens = 0
        cands = [s for s in sched.decodes if s.spec is not None]
        if not cands:
            return None
        rows: list[_Row] = []
        want_draft: list[tuple[Sequence, int]] = []
        for seq in cands:
            limit = self._limit(seq)
            if limit < 1:
                continue
            if seq.spec.strategy == "draft":
                want_draft.append((seq, limit))
                continue
            toks = self._propose_pld(seq, seq.spec, limit)
            if toks:
                rows.append(_Row(seq, "pld", toks))
        if want_draft:
            rows.extend(self._propose_draft(want_draft))
        if not rows:
            return None
        bm = self.core.block_manager
        reserve = len(sched.decodes)  # keep a block per decoder for the next step
        chosen: list[_Row] = []
        for r in rows:
            need = bm.blocks_to_append(r.seq, len(r.tokens) + 1)
            if need and bm.num_free_blocks - need < reserve:
                continue  # no room to speculate: this sequence decodes plainly
            bm.append_slots(r.seq, len(r.tokens) + 1)
            chosen.append(r)
        if not chosen:
            return None
        ids = {id(r.seq) for r in chosen}
        sched.decodes = [s for s in sched.decodes if id(s) not in ids]
        padded = self.batching == "padded" or (
            self.batching == "auto" and len(sched.decodes) * self.k <= PADDED_MAX_WASTE
        )
        if padded and sched.decodes and not sched.prefills:
            # Plain rows ride along with m = 0 (exactly a plain decode) so the step is one forward.
            ride = [s for s in sched.decodes if s.num_tokens + self.k <= self.core.max_model_len]
            chosen.extend(_Row(s, "plain", []) for s in ride)
            ids = {id(s) for s in ride}
            sched.decodes = [s for s in sched.decodes if id(s) not in ids]
        return VerifyBatch(chosen)

    def _propose_draft(self, items: list[tuple[Sequence, int]]) -> list[_Row]:
        """k greedy (or sampled) steps of the draft model over every draft sequence at once."""
        draft = self.draft
        bm = draft.block_manager
        runner = draft.runner
        active: list[tuple[Sequence, Sequence, int]] = []  # (target, shadow, limit)
        # The draft core may serve requests of its own: leave a block per running sequence of it.
        reserve = len(draft.scheduler.running)
        # The draft's decode batch must fit its own largest (graph) bucket; the rest decode plainly.
        for seq, limit in items[: draft.config.max_num_seqs]:
            if seq.num_tokens + self.k > draft.max_model_len:
                continue
            st = seq.spec
            d = st.draft_seq
            if d is None:
                d = self._new_shadow(seq)
                if not bm.can_allocate(d, reserve=reserve):
                    continue
                bm.allocate(d, use_prefix_cache=True)
                st.draft_seq = d
            else:
                d.token_ids.extend(seq.token_ids[d.num_tokens:])
            # room for the catch-up tokens plus the limit-1 proposals whose K/V the draft writes
            need_tokens = seq.num_tokens + limit - 1 - d.num_cached_tokens
            if bm.blocks_to_append(d, need_tokens) + reserve > bm.num_free_blocks:
                continue
            bm.append_slots(d, need_tokens)
            active.append((seq, d, limit))
        if not active:
            return []
        proposals: dict[int, list[int]] = {id(s): [] for s, _, _ in active}
        qs: dict[int, list[torch.Tensor]] = {id(s): [] for s, _, _ in active}
        with torch.inference_mode():
            # Round 1: catch up on everything the draft has not computed (usually 1-2 tokens).
            decodes = [d for _, d, _ in active if d.num_uncomputed == 1]
            prefills = [d for _, d, _ in active if d.num_uncomputed > 1]
            if prefills:
                order, logits, _ = runner._mixed(decodes, prefills, [d.num_uncomputed for d in prefills])
            else:
                order, logits = decodes, runner._decode(decodes)
            by_shadow = {id(d): (s, lim) for s, d, lim in active}
            for d in order:
                d.num_cached_tokens = d.num_tokens
                bm.commit(d)
            step = [(by_shadow[id(d)][0], d, by_shadow[id(d)][1]) for d in order]
            for j in range(self.k):
                self._draft_sample(step, logits, proposals, qs)
                step = [t for t in step if len(proposals[id(t[0])]) < t[2]]
                if not step or j == self.k - 1:
                    break
                logits = runner._decode([d for _, d, _ in step])
        rows = []
        for seq, d, _ in active:
            del d.token_ids[seq.num_tokens:]  # proposals are not the draft's tokens until accepted
            toks = proposals[id(seq)]
            q = torch.stack(qs[id(seq)]) if qs[id(seq)] and not seq.params.greedy else None
            rows.append(_Row(seq, "draft", toks, q))
        return rows

    def _draft_sample(self, step, logits, proposals, qs) -> None:
        runner = self.draft.runner
        shadows = [d for _, d, _ in step]
        out = runner.sampler(logits, [runner._sampling_row(d) for d in shadows])
        for i, (seq, d, _) in enumerate(step):
            tok = out.token_ids[i]
            d.token_ids.append(tok)
            proposals[id(seq)].append(tok)
            if out.probs is not None and not seq.params.greedy:
                qs[id(seq)].append(out.probs[i].to(self.core.runner.device))

    def _new_shadow(self, seq: Sequence) -> Sequence:
        draft = self.draft
        # The draft only proposes: no logprobs, and (when seeded) an RNG stream of its own.
        params = dataclasses.replace(seq.params, logprobs=None, prompt_logprobs=None, n=1)
        req = Request(seq.request.request_id + "#draft", seq.request.prompt_token_ids, params)
        d = Sequence(next(draft._seq_ids), req, seq.index, seq.token_ids[: seq.num_prompt_tokens])
        d.token_ids.extend(seq.token_ids[seq.num_prompt_tokens:])
        if params.seed is not None:
            d.rng_stream = rng_stream(params.seed, seq.index, salt=_DRAFT_SEED_SALT)
        return d

    # ----- verification -------------------------------------------------------------------------
    @torch.inference_mode()
    def verify(self, batch: VerifyBatch) -> list[VerifyResult]:
        runner = self.core.runner
        dev = runner.device
        k, Q = self.k, self.k + 1
        rows = batch.rows
        B = len(rows)
        ids, pos, slots, ctx = [], [], [], []
        for r in rows:
            s, m = r.seq, len(r.tokens)
            n = s.num_tokens
            ids.append([s.token_ids[-1]] + r.tokens + [0] * (k - m))
            pos.append(list(range(n - 1, n + k)))
            slots.append(runner._slots(s, n - 1, n + m) + [-1] * (k - m))
            ctx.append(n + k)
        logits = runner.forward_verify(
            torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), torch.tensor(slots, device=dev),
            runner._block_table_tensor([r.seq for r in rows]), torch.tensor(ctx, dtype=torch.int32, device=dev),
        )  # [B, Q, V]
        V = logits.shape[-1]
        self.last_num_tokens = B * Q
        self.last_kv_tokens = sum(ctx)
        want_lp = [r.seq.params.logprobs is not None for r in rows]
        raw_lp = torch.log_softmax(logits[torch.tensor(want_lp, device=dev)].float(), -1) if any(want_lp) else None
        # Row (b, j) is "sequence b + its first j proposals": penalties and min_tokens see them.
        srows = [runner._sampling_row(r.seq, r.tokens[:j]) for r in rows for j in range(Q)]
        proc, probs = runner.sampler.distribution(logits.reshape(B * Q, V).float(), srows)
        greedy = [r.seq.params.greedy for r in rows]
        draft_probs = draft_rows = None
        sampled_rows = [b for b, r in enumerate(rows) if r.q is not None]
        if sampled_rows:
            draft_rows = torch.tensor(sampled_rows, device=dev)
            draft_probs = torch.zeros(len(sampled_rows), k, V, device=dev)  # padding positions: never read
            for i, b in enumerate(sampled_rows):
                draft_probs[i, : len(rows[b].tokens)] = rows[b].q
        num_acc, nxt = rejection_sample(
            torch.tensor([r.tokens + [0] * (k - len(r.tokens)) for r in rows], device=dev),
            [len(r.tokens) for r in rows],
            proc.view(B, Q, V).argmax(-1),
            probs.view(B, Q, V) if probs is not None else None,
            draft_probs,
            draft_rows,
            greedy,
            [[srows[b * Q + j].race_key for j in range(Q)] for b in range(B)],
            runner.sampler,
        )
        host = torch.stack([num_acc, nxt], 1).tolist()  # the step's one host round trip
        results = []
        lp_i = 0
        for b, r in enumerate(rows):
            a, tok = host[b]
            out = r.tokens[:a] + [tok]
            lps: list[dict[int, float] | None] = [None] * len(out)
            if want_lp[b]:
                lps = self._logprobs(raw_lp[lp_i], out, r.seq.params.logprobs)
                lp_i += 1
            results.append(VerifyResult(r.seq, r.proposer, len(r.tokens), a, out, lps))
        return results

    @staticmethod
    def _logprobs(lp: torch.Tensor, tokens: list[int], top: int) -> list[dict[int, float]]:
        # lp: [Q, V] raw log-softmax (as plain decode reports: before penalties / temperature)
        n = len(tokens)
        chosen = lp[torch.arange(n), torch.tensor(tokens)].tolist()
        tv, ti = lp[:n].topk(top, dim=-1) if top else (None, None)
        tv, ti = (tv.tolist(), ti.tolist()) if top else (None, None)
        out = []
        for j, t in enumerate(tokens):
            d = {t: chosen[j]}
            for c in range(top):
                d.setdefault(ti[j][c], tv[j][c])
            out.append(d)
        return out

    def after_verify(self, res: VerifyResult, n_before: int) -> None:
        """Bookkeeping once the core has appended the result's tokens (or finished the sequence)."""
        seq, st, a, m = res.seq, res.seq.spec, res.num_accepted, res.num_proposed
        if m == 0:
            return
        self.counters[res.proposer].record(m, a, 1)
        st.num_draft_tokens += m
        st.num_accepted_tokens += a
        if st.strategy == "auto":
            st.accept_ema += 0.5 * (a / m - st.accept_ema)
            if st.accept_ema < 0.3:  # proposals keep failing: stop paying for verification a while
                st.skip, st.backoff = st.backoff, min(2 * st.backoff, 64)
                st.accept_ema = 0.5  # probe again after the back-off
            elif a == m:
                st.backoff = 1
        d = st.draft_seq
        if d is not None and not seq.is_finished:
            # The draft wrote K/V for its first m-1 proposals; those accepted are valid.
            d.num_cached_tokens = n_before + min(a, m - 1)

    # ----- stats --------------------------------------------------------------------------------
    def stats(self) -> dict[str, ProposerCounters]:
        return {p: dataclasses.replace(c) for p, c in self.counters.items()}
