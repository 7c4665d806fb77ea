"""Per-sequence speculative state (no torch: it lives on `Sequence.spec`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .ngram import NgramIndex
from .strategy import Strategy


@dataclass(slots=True)
class SpecState:
    strategy: Strategy
    index: NgramIndex | None = None  # prompt lookup's n-gram index over prompt + output
    shadow_key: str | None = None  # the draft engine's shadow of this sequence, once it has one
    num_draft_tokens: int = 0  # proposed and verified, this sequence
    num_accepted_tokens: int = 0
    # pld_adaptive: back off after poor acceptance (skip `skip` steps, then probe again)
    accept_ema: float = 1.0
    skip: int = 0
    backoff: int = 1
    proposed_at: int = 0  # the sequence's length when this step's proposal was made
