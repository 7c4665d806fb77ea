"""Continuous-batching policy: who runs this step, how many tokens each, who is preempted.

Each step first gives every running sequence that is decoding its next slot (preempting the
newest running sequences when the cache is full), then spends what is left of the token budget
on prefill: chunks of prompts already admitted, then new admissions from the waiting queue.
No torch here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048


@dataclass(slots=True)
class SchedulerOutput:
    decodes: list[Sequence] = field(default_factory=list)  # one new token each
    prefills: list[Sequence] = field(default_factory=list)
    prefill_chunks: list[int] = field(default_factory=list)  # tokens computed per prefill seq
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(self.prefill_chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is preempted first
        self.num_preemptions = 0

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
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens

        # 1. decodes: every running sequence with exactly one token left to compute.
        for seq in list(self.running):
            if seq not in self.running or seq.num_uncomputed != 1:
                continue
            while not bm.can_append(seq, 1):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                bm.append_slots(seq, 1)
                out.decodes.append(seq)
                budget -= 1

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
