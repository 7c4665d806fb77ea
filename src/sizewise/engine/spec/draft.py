"""Draft-model proposals, asked of the draft model's own engine through its public API.

The target's `DraftProposer` hands the draft engine one `DraftItem` per sequence; the draft
engine keeps a shadow sequence per item in its own scheduler and KV cache and runs the proposal
forwards as work of its own (its device seconds and bytes are counted there). After
verification the shadow is rolled back to what the target accepted; it is released when the
target sequence finishes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ...sampling_params import SamplingParams
from ..sequence import Sequence

if TYPE_CHECKING:
    import torch


@dataclass(slots=True)
class DraftItem:
    key: str  # the shadow's name in the draft engine (unique across targets)
    token_ids: list[int]  # the target sequence's prompt + output (read, not kept)
    num_prompt_tokens: int
    params: SamplingParams
    index: int  # the sample's index in its request (seeded streams)
    limit: int  # most tokens to propose


@dataclass(slots=True)
class DraftProposal:
    tokens: list[int]
    probs: "torch.Tensor | None"  # [m, V] the draft's distribution per proposal when it sampled; else None


class DraftEngine(Protocol):
    """What a target needs of its draft model's engine (EngineCore implements it)."""

    name: str
    max_model_len: int

    def propose_drafts(self, items: list[DraftItem], k: int) -> dict[str, DraftProposal]: ...

    def rollback_shadow(self, key: str, num_valid: int) -> None: ...

    def release_shadow(self, key: str) -> None: ...


class DraftProposer:
    def __init__(self, engine: DraftEngine, owner: str) -> None:
        self.engine = engine
        self.owner = owner  # the target's name: shadow keys of two targets never collide

    def key(self, seq: Sequence) -> str:
        return f"{self.owner}/{seq.seq_id}"

    def propose(self, items: list[tuple[Sequence, int]], k: int) -> dict[int, DraftProposal]:
        """items: (sequence, limit); returns proposals by seq_id (some may be missing or empty)."""
        asks = []
        for seq, limit in items:
            if seq.num_tokens + k > self.engine.max_model_len:
                continue
            seq.spec.shadow_key = self.key(seq)
            asks.append(DraftItem(seq.spec.shadow_key, seq.token_ids, seq.num_prompt_tokens, seq.params,
                                  seq.index, limit))
        if not asks:
            return {}
        got = self.engine.propose_drafts(asks, k)
        return {seq.seq_id: got[seq.spec.shadow_key] for seq, _ in items if seq.spec.shadow_key in got}

    def rollback(self, seq: Sequence, n_before: int, proposed: int, accepted: int) -> None:
        """The draft wrote K/V for its first proposed-1 proposals: those accepted stay valid."""
        if seq.spec.shadow_key is not None:
            self.engine.rollback_shadow(seq.spec.shadow_key, n_before + min(accepted, max(proposed - 1, 0)))

    def release(self, seq: Sequence) -> None:
        if seq.spec is not None and seq.spec.shadow_key is not None:
            self.engine.release_shadow(seq.spec.shadow_key)
            seq.spec.shadow_key = None
