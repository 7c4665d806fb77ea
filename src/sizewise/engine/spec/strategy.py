"""How a request is decoded, as the engine names it (the router's `auto` is a different thing:
it lets the orchestrator choose the tier and the strategy, and never reaches an engine)."""

from __future__ import annotations

import enum


class Strategy(str, enum.Enum):
    PLAIN = "plain"
    PLD = "pld"  # prompt lookup: n-gram proposals from the sequence's own text
    PLD_ADAPTIVE = "pld_adaptive"  # prompt lookup that backs off while its proposals keep failing
    DRAFT = "draft"  # proposals of a smaller resident model with the same tokenizer

    @property
    def proposer(self) -> str | None:
        """The proposer that serves it (the key of the engine's per-proposer counters)."""
        return _PROPOSER[self]


_PROPOSER = {Strategy.PLAIN: None, Strategy.PLD: "pld", Strategy.PLD_ADAPTIVE: "pld", Strategy.DRAFT: "draft"}
STRATEGIES = tuple(s.value for s in Strategy)
PROPOSERS = ("pld", "draft")
BATCHING = ("split", "padded", "auto")
MAX_SPEC_TOKENS = 15  # Ascend's fused attention caps the per-sequence query length at 16
# spec_batching="auto": plain rows ride along in the verify forward (one forward per step instead
# of two) while the positions they waste (k per plain row) stay this few; beyond that the wasted
# compute costs more than the second forward's overhead saves. Measured on CPU with the demo
# small / medium tiers (benchmarks/speculative.py, batches 4-16): padded won up to ~16 wasted
# positions and lost 10-17% beyond ~28. A memory-bound accelerator step stays flat much longer,
# so there this is conservative.
PADDED_MAX_WASTE = 16
