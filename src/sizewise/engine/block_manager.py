"""Paged KV-cache bookkeeping: block allocation, reference counts and prefix caching. No torch.

Full blocks are content-addressed by a chained hash of their tokens once their K/V have been
computed, so a later sequence with the same prefix (another sample of the same prompt, the
orchestrator's probe followed by the real request, a shared system prompt) reuses them.
A freed block keeps its hash until it is handed out again, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids: tuple[int, ...] = ()


def chain_hash(token_ids: list[int] | tuple[int, ...], prefix: int) -> int:
    return hash((prefix, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_hits = 0  # tokens served from the prefix cache, for stats

    # ----- queries -----------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        return self.blocks_needed(seq.num_tokens) + reserve <= self.num_free_blocks

    def can_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool:
        return self.blocks_to_append(seq, num_new_tokens) <= self.num_free_blocks

    def blocks_to_append(self, seq: Sequence, num_new_tokens: int = 1) -> int:
        """Free blocks `append_slots(seq, num_new_tokens)` would take (speculation reserves with it)."""
        need = self.blocks_needed(seq.num_cached_tokens + num_new_tokens)
        return max(0, need - len(seq.block_table))

    # ----- mutation ----------------------------------------------------------------
    def allocate(self, seq: Sequence, use_prefix_cache: bool = True) -> None:
        """Give a waiting sequence blocks for all its tokens; reuse cached full blocks."""
        if seq.block_table:
            raise RuntimeError(f"{seq} already holds blocks")
        bs = self.block_size
        n = self.blocks_needed(seq.num_tokens)
        h, miss = -1, not (self.enable_prefix_caching and use_prefix_cache)
        cached = 0
        for i in range(n):
            tokens = seq.block_tokens(i, bs)
            full = len(tokens) == bs
            h = chain_hash(tokens, h) if full else -1
            # The last token must always be computed (its logits give the next token).
            if not miss and full and (i + 1) * bs < seq.num_tokens:
                bid = self.hash_to_block.get(h)
                if bid is not None and self.blocks[bid].token_ids == tuple(tokens):
                    blk = self.blocks[bid]
                    if blk.ref_count == 0:
                        del self.free[bid]
                    blk.ref_count += 1
                    seq.block_table.append(bid)
                    seq.block_hashes.append(h)
                    cached += bs
                    continue
            miss = True
            seq.block_table.append(self._take_free().block_id)
        seq.num_cached_tokens = cached
        self.prefix_hits += cached

    def append_slots(self, seq: Sequence, num_new_tokens: int = 1) -> None:
        """Make room for the K/V of `num_new_tokens` tokens past `num_cached_tokens`."""
        for _ in range(self.blocks_to_append(seq, num_new_tokens)):
            seq.block_table.append(self._take_free().block_id)

    def commit(self, seq: Sequence) -> None:
        """Register hashes of the full blocks whose K/V are now computed (only the new ones)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        h = seq.block_hashes[-1] if seq.block_hashes else -1
        for i in range(len(seq.block_hashes), seq.num_cached_tokens // bs):
            tokens = seq.block_tokens(i, bs)
            h = chain_hash(tokens, h)
            seq.block_hashes.append(h)
            blk = self.blocks[seq.block_table[i]]
            if blk.hash != h:
                if blk.hash != -1 and self.hash_to_block.get(blk.hash) == blk.block_id:
                    del self.hash_to_block[blk.hash]
                blk.hash, blk.token_ids = h, tuple(tokens)
                self.hash_to_block[h] = blk.block_id

    def free_seq(self, seq: Sequence) -> None:
        # Reverse order: a prefix's tail is the least useful part to keep cached.
        for bid in reversed(seq.block_table):
            blk = self.blocks[bid]
            blk.ref_count -= 1
            if blk.ref_count == 0:
                self.free[bid] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_cached_tokens = 0

    # ----- internals ---------------------------------------------------------------
    def _take_free(self) -> Block:
        if not self.free:
            raise RuntimeError("out of KV blocks (the scheduler should have preempted)")
        bid, _ = self.free.popitem(last=False)
        blk = self.blocks[bid]
        if blk.hash != -1 and self.hash_to_block.get(blk.hash) == bid:
            del self.hash_to_block[blk.hash]
        blk.hash, blk.token_ids, blk.ref_count = -1, (), 1
        return blk
