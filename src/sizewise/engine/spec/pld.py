"""Prompt-lookup proposals: the n-gram matcher over the sequence's own prompt + output."""

from __future__ import annotations

from ..sequence import Sequence
from .ngram import NgramIndex
from .strategy import Strategy

_BACKOFF_MAX = 64  # pld_adaptive: the longest pause (steps) after proposals kept failing
_BACKOFF_ACCEPT = 0.3  # pld_adaptive pauses when its acceptance EMA falls below this


class PromptLookupProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        NgramIndex(min_n, max_n)  # validates
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        st = seq.spec
        if st.strategy is Strategy.PLD_ADAPTIVE and st.skip > 0:
            st.skip -= 1
            return []
        if st.index is None:
            st.index = NgramIndex(self.min_n, self.max_n)
        st.index.sync(seq.token_ids)
        return st.index.propose(limit)

    @staticmethod
    def observe(seq: Sequence, proposed: int, accepted: int) -> None:
        """pld_adaptive: stop paying for verification a while when proposals keep failing."""
        st = seq.spec
        if st.strategy is not Strategy.PLD_ADAPTIVE or proposed == 0:
            return
        st.accept_ema += 0.5 * (accepted / proposed - st.accept_ema)
        if st.accept_ema < _BACKOFF_ACCEPT:
            st.skip, st.backoff = st.backoff, min(2 * st.backoff, _BACKOFF_MAX)
            st.accept_ema = 0.5  # probe again after the back-off
        elif accepted == proposed:
            st.backoff = 1
