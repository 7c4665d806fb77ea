"""Token sampling over a batch with per-row parameters.

Sampling uses the exponential-race trick (argmax of p / E with E ~ Exp(1)), which draws exactly
from p with one random vector (the race) per row. A seeded request's race for its t-th output
token is drawn from a generator seeded with `race_key(stream, t)`: it depends on the seed, the
sequence's index and t only (as a per-request generator's t-th draw would), so a seeded result
does not depend on what else shares the batch, on preemption (recompute draws the same race) or
on speculation (verification draws the race plain decoding would have drawn for each token: see
engine/spec/).
Probabilities are returned with the tokens: speculative verification needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling_params import SamplingParams


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    probs: torch.Tensor | None  # [N, V] final sampling distribution (None when all greedy)
    logprobs: list[dict[int, float] | None]  # per row: sampled token first, then top-N


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: nearby inputs give unrelated outputs."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def rng_stream(seed: int, index: int, salt: int = 0) -> int:
    """The stream of sequence `index` of a request seeded with `seed` (salt: another consumer)."""
    return _mix64((seed & _MASK64) ^ _mix64(index + 1) ^ _mix64(salt + 0x9E3779B97F4A7C15))


def race_key(stream: int, index: int) -> int:
    """Seed of the race for output token number `index` (0: the first generated token)."""
    return _mix64(stream ^ _mix64(index + 0x632BE59BD9B4E019)) >> 1  # manual_seed takes < 2^63


@dataclass(slots=True)
class SamplingRow:
    params: SamplingParams
    race_key: int | None  # seeded rows: race_key(stream, index of the output token sampled); else None
    output_token_ids: list[int]
    prompt_token_ids: list[int]
    block_eos: list[int] | None  # ids masked while min_tokens is not yet reached


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    # logits: [N, V]
    V = logits.shape[-1]
    dev = logits.device
    for i, r in enumerate(rows):
        p = r.params
        if not p.needs_penalties:
            continue
        out_ids = torch.tensor(r.output_token_ids, dtype=torch.long, device=dev)
        counts = torch.zeros(V, device=dev).index_add_(0, out_ids, torch.ones(len(out_ids), device=dev)) if len(out_ids) else torch.zeros(V, device=dev)
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            if r.prompt_token_ids:
                seen[torch.tensor(r.prompt_token_ids, dtype=torch.long, device=dev)] = True
            row = torch.where(seen, torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty), row)
        row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        logits[i] = row
    return logits


def top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    # logits: [N, V]; top_k: [N] long (>= V: off); top_p: [N] float (1: off); min_p: [N] float (0: off)
    # transformers' warper order: each filter sees the distribution the previous one renormalised.
    V = logits.shape[-1]
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    # Top-k by value: ties with the k-th logit stay (as in transformers and vLLM).
    kth = sorted_logits.gather(1, (top_k.clamp(1, V) - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    # Top-p drops a token when the mass at or below it is <= 1 - top_p: the token crossing
    # top_p stays. Summed from the least likely up, as transformers sums.
    probs = sorted_logits.softmax(-1)
    below = probs.flip(-1).cumsum(-1).flip(-1)
    remove = (below <= 1 - top_p[:, None]) & (top_p < 1)[:, None]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(-1)
    sorted_logits = sorted_logits.masked_fill(probs < min_p[:, None] * probs[:, :1], float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


def top_logprobs(lp: torch.Tensor, tokens: list[int], top: int | list[int]) -> list[dict[int, float]]:
    """Per row: {chosen token: its logprob, then the top-N tokens: theirs} (vLLM's shape).

    lp: [N, V] log-softmax; tokens: [N] the chosen token per row; top: N per row (or one for all).
    """
    n = len(tokens)
    tops = [top] * n if isinstance(top, int) else top
    width = max(tops, default=0)
    chosen = lp[:n].gather(1, torch.tensor(tokens, device=lp.device)[:, None]).squeeze(1).tolist()
    tv, ti = lp[:n].topk(width, dim=-1) if width else (None, None)
    tv, ti = (tv.tolist(), ti.tolist()) if width else (None, None)
    out = []
    for j, t in enumerate(tokens):
        d = {t: chosen[j]}
        for c in range(tops[j]):
            d.setdefault(ti[j][c], tv[j][c])
        out.append(d)
    return out


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)  # unseeded rows
        self._keyed = torch.Generator(device=device)  # reseeded per seeded row and position

    def race(self, out: torch.Tensor, key: int | None) -> torch.Tensor:
        """Fill `out` with Exp(1) draws: the keyed race of a seeded row, else the shared stream's."""
        if key is None:
            return out.exponential_(generator=self.generator)
        return out.exponential_(generator=self._keyed.manual_seed(key))

    def uniform(self, n: int, key: int | None) -> torch.Tensor:
        """n U(0, 1) draws (speculative acceptance tests) for a row whose first race is keyed `key`."""
        if key is None:
            return torch.rand(n, generator=self.generator, device=self.device)
        return torch.rand(n, generator=self._keyed.manual_seed(_mix64(key ^ 0xA5A5A5A5A5A5A5A5) >> 1), device=self.device)

    def distribution(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-row target distribution, shared by plain sampling and speculative verification.

        logits: [N, V] float32 (rows may be modified in place). Returns the processed logits
        [N, V] (penalties and min_tokens masks applied: greedy takes their argmax) and the
        sampling distribution [N, V] after temperature / top-k / top-p / min-p (None when
        every row is greedy).
        """
        V = logits.shape[-1]
        if any(r.params.needs_penalties for r in rows):
            logits = apply_penalties(logits.clone(), rows)
        for i, r in enumerate(rows):
            if r.block_eos:
                logits[i, r.block_eos] = float("-inf")
        greedy = [r.params.greedy for r in rows]
        if all(greedy):
            return logits, None
        temps = torch.tensor([1.0 if g else r.params.temperature for g, r in zip(greedy, rows)], device=logits.device)
        scaled = logits / temps[:, None]
        if any(r.params.top_k or r.params.top_p < 1.0 or r.params.min_p > 0.0 for r in rows):
            top_k = torch.tensor([r.params.top_k or V for r in rows], device=logits.device)
            top_p = torch.tensor([r.params.top_p for r in rows], device=logits.device)
            min_p = torch.tensor([r.params.min_p for r in rows], device=logits.device)
            scaled = top_k_top_p_min_p(scaled, top_k, top_p, min_p)
        return logits, scaled.softmax(-1)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        # logits: [N, V] float32, one row per sequence that samples this step
        N = logits.shape[0]
        raw_logprobs = None
        want_lp = [r.params.logprobs is not None for r in rows]
        if any(want_lp):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits, probs = self.distribution(logits, rows)

        greedy = [r.params.greedy for r in rows]
        if probs is None:
            tokens = logits.argmax(-1)
        else:
            race = torch.empty_like(probs)
            for i, r in enumerate(rows):
                self.race(race[i], r.race_key)
            tokens = (probs / race).argmax(-1)
            if any(greedy):
                g = torch.tensor(greedy, device=logits.device)
                tokens = torch.where(g, logits.argmax(-1), tokens)
        token_list = tokens.tolist()

        logprobs: list[dict[int, float] | None] = [None] * N
        if raw_logprobs is not None:
            rows_lp = [i for i in range(N) if want_lp[i]]
            picked = top_logprobs(raw_logprobs[rows_lp], [token_list[i] for i in rows_lp],
                                  [rows[i].params.logprobs for i in rows_lp])
            for i, d in zip(rows_lp, picked):
                logprobs[i] = d
        return SamplerOutput(token_ids=token_list, probs=probs, logprobs=logprobs)
