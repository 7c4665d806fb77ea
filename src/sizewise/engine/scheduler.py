"""Continuous-batching policy: who runs this step, how many tokens each, who is preempted.

Each step first gives every running sequence that is decoding its next slot (preempting the
newest running sequences when the cache is full), then turns decode rows that carry a proposal
(`Sequence.spec_token_ids`) into verify rows where the token budget and free blocks allow (never
preempting for it), then spends what is left of the token budget on prefill: chunks of prompts
already admitted, then new admissions from the waiting queue. Shadow sequences that a target
engine's drafts live in (this engine being the draft model) hold blocks here too; they are evicted
before any request of this engine is preempted. No torch here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus
from .spec.strategy import PADDED_MAX_WASTE


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    num_speculative_tokens: int = 0  # k: a verify row computes k+1 positions (0: no verify rows)
    spec_batching: str = "split"  # split | padded | auto (EngineConfig.spec_batching)


@dataclass(slots=True)
class SchedulerOutput:
    decodes: list[Sequence] = field(default_factory=list)  # one new token each
    prefills: list[Sequence] = field(default_factory=list)
    prefill_chunks: list[int] = field(default_factory=list)  # tokens computed per prefill seq
    # last token + spec_token_ids (m <= k, possibly 0: a plain row riding along) in one Q = k+1 forward
    verifies: list[Sequence] = field(default_factory=list)
    verify_q: int = 0  # k+1
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills and not self.verifies

    @property
    def num_tokens(self) -> int:
        """Positions the step's forwards compute (a verify row: all k+1, padding included)."""
        return len(self.decodes) + sum(self.prefill_chunks) + len(self.verifies) * self.verify_q


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is preempted first
        self.num_preemptions = 0
        self.shadows: dict[str, Sequence] = {}  # a target engine's draft shadows (see engine/spec/draft.py)

    # ----- queue management ------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish (or abort) a sequence wherever it is and free its blocks at once."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ----- the step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        k = cfg.num_speculative_tokens
        out = SchedulerOutput(verify_q=k + 1 if k else 0)
        bm = self.block_manager
        budget = cfg.max_num_batched_tokens

        # 1. decodes: every running sequence with exactly one token left to compute.
        for seq in list(self.running):
            if seq not in self.running or seq.num_uncomputed != 1:
                continue
            while not bm.can_append(seq, 1):
                if self._evict_shadow():
                    continue
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                bm.append_slots(seq, 1)
                out.decodes.append(seq)
                budget -= 1

        # 1b. verify rows: a decode row with a proposal takes k more positions of the budget and
        # slots for its m proposals, where blocks are free beyond one per decoding sequence (kept
        # for the next step); otherwise it decodes plainly. Speculation never preempts.
        if k:
            reserve = len(out.decodes)
            for seq in list(out.decodes):
                m = len(seq.spec_token_ids)
                if not m:
                    continue
                need = bm.blocks_to_append(seq, 1 + m)
                if m > k or budget < k or (need and bm.num_free_blocks - need < reserve):
                    seq.spec_token_ids = []
                    continue
                bm.append_slots(seq, 1 + m)
                out.decodes.remove(seq)
                out.verifies.append(seq)
                budget -= k

        # 2. prefill chunks of admitted sequences, oldest first.
        for seq in self.running:
            if budget <= 0:
                break
            if seq.num_uncomputed > 1:
                chunk = min(seq.num_uncomputed, budget)
                out.prefills.append(seq)
                out.prefill_chunks.append(chunk)
                budget -= chunk

        # 3. admissions, FIFO; a preempted sequence is not readmitted in the step it left.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq in out.preempted:
                break
            # While anything decodes, keep one block spare so this admission does not force a
            # preemption on the next step.
            if not bm.can_allocate(seq, reserve=len(out.decodes) and 1):
                break
            self.waiting.popleft()
            use_cache = seq.request.params.prompt_logprobs is None
            bm.allocate(seq, use_prefix_cache=use_cache)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunk = min(seq.num_uncomputed, budget)
            if seq.num_uncomputed == 1:
                out.decodes.append(seq)  # whole prompt cached but its last token
            else:
                out.prefills.append(seq)
                out.prefill_chunks.append(chunk)
            budget -= chunk

        # 4. padded batching: plain decode rows join the verify forward as empty proposals, so
        # the step is one forward, while the positions they waste stay few.
        if out.verifies and out.decodes and not out.prefills and (
            cfg.spec_batching == "padded"
            or (cfg.spec_batching == "auto" and len(out.decodes) * k <= PADDED_MAX_WASTE)
        ):
            for seq in list(out.decodes):
                if budget >= k and seq.num_tokens + k <= cfg.max_model_len:
                    out.decodes.remove(seq)
                    out.verifies.append(seq)
                    budget -= k
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Recompute-style preemption: free the blocks; the sequence re-prefills later."""
        self.running.remove(seq)
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        seq.request.metrics.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)
        if seq in out.decodes:
            out.decodes.remove(seq)
        seq.spec_token_ids = []

    # ----- shadows of a target engine's drafts ------------------------------------------
    def _evict_shadow(self) -> bool:
        """Free the blocks of one shadow (the newest); it re-prefills when next asked to draft."""
        for shadow in reversed(self.shadows.values()):
            if shadow.block_table:
                self.block_manager.free_seq(shadow)
                return True
        return False

    def schedule_shadow(self, shadow: Sequence, num_tokens: int) -> bool:
        """Slots for `shadow`'s uncomputed tokens and `num_tokens - shadow.num_tokens` more (its
        proposals), where blocks are free beyond one per running sequence of this engine (its own
        requests come first). False: no room, it proposes nothing this step."""
        bm = self.block_manager
        reserve = len(self.running)
        if not shadow.block_table:
            if not bm.can_allocate(shadow, reserve=reserve):
                return False
            bm.allocate(shadow, use_prefix_cache=True)
        need = num_tokens - shadow.num_cached_tokens
        if bm.blocks_to_append(shadow, need) + reserve > bm.num_free_blocks:
            return False
        bm.append_slots(shadow, need)
        return True
