"""Speculation for one engine (the target): strategies, proposals before the scheduler runs,
bookkeeping after verification. Not thread-safe: driven by the engine's step."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import InvalidRequestError
from ..sequence import Sequence
from .draft import DraftEngine, DraftProposer
from .pld import PromptLookupProposer
from .state import SpecState
from .strategy import BATCHING, MAX_SPEC_TOKENS, PROPOSERS, STRATEGIES, Strategy

if TYPE_CHECKING:
    import torch

_EMA_ALPHA = 0.05  # per-engine acceptance-rate EMA, one update per verified sequence and proposer


@dataclass(slots=True)
class ProposerCounters:
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0  # sequence-verifications
    acceptance_ema: float = 0.0  # accepted / proposed, EMA over verifications

    def record(self, proposed: int, accepted: int) -> None:
        rate = accepted / proposed
        if self.verify_steps == 0:
            self.acceptance_ema = rate
        else:
            self.acceptance_ema += _EMA_ALPHA * (rate - self.acceptance_ema)
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        self.verify_steps += 1


class Speculator:
    def __init__(self, name: str, k: int, lookup_min: int, lookup_max: int, batching: str, max_model_len: int) -> None:
        if not 0 < k <= MAX_SPEC_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in [1, {MAX_SPEC_TOKENS}] (0 disables), got {k}")
        if batching not in BATCHING:
            raise ValueError(f"spec_batching must be one of {BATCHING}, got {batching!r}")
        self.name = name
        self.k = k
        self.max_model_len = max_model_len
        self.pld = PromptLookupProposer(lookup_min, lookup_max)
        self.draft: DraftProposer | None = None
        self.counters = {p: ProposerCounters() for p in PROPOSERS}
        self._proposed: list[tuple[Sequence, int, int]] = []  # this step's (seq, length then, m)

    # ----- setup ------------------------------------------------------------------------------
    def attach_draft(self, engine: DraftEngine) -> None:
        self.draft = DraftProposer(engine, self.name)

    def strategy(self, name: str) -> Strategy:
        """The engine's strategy called `name`, or InvalidRequestError naming the choices."""
        if name == "auto":
            raise InvalidRequestError(
                "strategy 'auto' is the router's (it picks a model and a strategy); an engine takes "
                f"one of {', '.join(STRATEGIES)} (adaptive prompt lookup is 'pld_adaptive')", param="strategy",
            )
        try:
            s = Strategy(name)
        except ValueError:
            raise InvalidRequestError(
                f"strategy must be one of {', '.join(STRATEGIES)}, got {name!r}", param="strategy") from None
        if s is Strategy.DRAFT and self.draft is None:
            raise InvalidRequestError(f"strategy 'draft' needs a draft model attached to "
                                      f"{self.name!r}; none is", param="strategy")
        return s

    def init_seq(self, seq: Sequence, strategy: Strategy) -> None:
        if strategy is not Strategy.PLAIN:
            seq.spec = SpecState(strategy)

    # ----- proposals (before the scheduler runs) ------------------------------------------------
    def limit(self, seq: Sequence) -> int:
        """How many tokens may be proposed for `seq` this step (0: decode plainly)."""
        n = seq.num_tokens
        # Padded verify positions run to n-1+k: keep them inside the rotary table and block table.
        if n + self.k > self.max_model_len:
            return 0
        p = seq.params
        left = self.max_model_len - n  # tokens that may still be appended
        if p.max_tokens is not None:
            left = min(left, p.max_tokens - seq.num_output_tokens)
        return max(0, min(self.k, left - 1))  # the target adds one token of its own

    def propose(self, running: list[Sequence]) -> "dict[int, torch.Tensor]":
        """Fill `spec_token_ids` of the running sequences about to decode that speculate.
        Returns the draft's distributions [m, V] by seq_id where it sampled its proposals."""
        self._proposed = []
        want_draft: list[tuple[Sequence, int]] = []
        for seq in running:
            seq.spec_token_ids = []
            if seq.spec is None or seq.num_uncomputed != 1:
                continue
            limit = self.limit(seq)
            if limit < 1:
                continue
            if seq.spec.strategy is Strategy.DRAFT:
                want_draft.append((seq, limit))
            else:
                seq.spec_token_ids = self.pld.propose(seq, limit)
        probs: dict = {}
        if want_draft and self.draft is not None:
            by_id = {s.seq_id: s for s, _ in want_draft}
            for seq_id, prop in self.draft.propose(want_draft, self.k).items():
                seq = by_id[seq_id]
                seq.spec_token_ids = prop.tokens
                if prop.probs is not None and not seq.params.greedy:
                    probs[seq_id] = prop.probs
        for seq in running:
            if seq.spec_token_ids:
                self._proposed.append((seq, seq.num_tokens, len(seq.spec_token_ids)))
        return probs

    # ----- after verification -----------------------------------------------------------------
    def end_step(self, accepted: dict[int, int]) -> None:
        """accepted: seq_id -> accepted proposals, for every sequence whose proposals were verified
        this step (rows the scheduler did not verify, or verified as empty padded rows because their
        proposals did not fit, decoded plainly: their proposals count as not made)."""
        for seq, n_before, m in self._proposed:
            st = seq.spec
            a = accepted.get(seq.seq_id)
            if a is not None:
                self.counters[st.strategy.proposer].record(m, a)
                st.num_draft_tokens += m
                st.num_accepted_tokens += a
                self.pld.observe(seq, m, a)
            if st.strategy is Strategy.DRAFT and self.draft is not None and not seq.is_finished:
                self.draft.rollback(seq, n_before, m, a or 0)
            seq.spec_token_ids = []
        self._proposed = []

    def release(self, seq: Sequence) -> None:
        """The sequence finished or was aborted: free its shadow in the draft engine now."""
        if self.draft is not None:
            self.draft.release(seq)

    def stats(self) -> dict[str, ProposerCounters]:
        return {p: dataclasses.replace(c) for p, c in self.counters.items()}
