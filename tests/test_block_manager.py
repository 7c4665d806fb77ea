"""KV bookkeeping and scheduling policy, tested without torch tensors."""

from __future__ import annotations

from sizewise import SamplingParams
from sizewise.engine.block_manager import BlockManager
from sizewise.engine.scheduler import Scheduler, SchedulerConfig
from sizewise.engine.sequence import Request, Sequence


def _seq(tokens, sid=0, **kw):
    req = Request(f"r{sid}", list(tokens), SamplingParams(**kw))
    s = Sequence(sid, req, 0, tokens)
    req.seqs.append(s)
    return s


def test_allocate_append_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = _seq(range(10))
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5 and s.num_cached_tokens == 0
    s.num_cached_tokens = 10
    s.token_ids += [1, 2]  # two new tokens need slots 10, 11: still block 3
    assert bm.blocks_to_append(s, 2) == 0 and bm.blocks_to_append(s, 3) == 1 and bm.blocks_to_append(s, 7) == 2
    bm.append_slots(s, 2)
    assert len(s.block_table) == 3
    bm.append_slots(s, 3)  # 13 tokens -> 4 blocks
    assert len(s.block_table) == 4 and bm.num_free_blocks == 4
    assert bm.can_append(s, 22) and not bm.can_append(s, 23)  # 10 cached + 22 = 32 slots = 4 + 4 free blocks
    bm.free_seq(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_prefix_cache_shares_full_blocks_with_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(list(range(10)), sid=0)
    bm.allocate(a)
    a.num_cached_tokens = 10
    bm.commit(a)
    b = _seq(list(range(10)) + [77], sid=1)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]  # two full blocks shared
    assert b.num_cached_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.free_seq(a)
    assert bm.blocks[b.block_table[0]].ref_count == 1
    bm.free_seq(b)
    assert bm.num_free_blocks == 8
    # Freed blocks keep their hash: a third sequence still hits.
    c = _seq(list(range(9)), sid=2)
    bm.allocate(c)
    assert c.num_cached_tokens == 8


def test_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(list(range(8)))
    bm.allocate(a)
    a.num_cached_tokens = 8
    bm.commit(a)
    b = _seq(list(range(8)), sid=1)
    bm.allocate(b)
    assert b.num_cached_tokens == 4  # the block holding the last token is recomputed


def test_scheduler_preempts_newest_when_blocks_run_out():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64), bm)
    s1, s2 = _seq([1, 2, 3, 4], sid=1), _seq([5, 6, 7, 8], sid=2)
    sched.add(s1)
    sched.add(s2)
    out = sched.schedule()
    assert out.prefills == [s1, s2] and out.prefill_chunks == [4, 4]
    for s in (s1, s2):
        s.num_cached_tokens = 4
        s.token_ids.append(9)
    # Each needs a second block for its 5th token: 2 free blocks, fine.
    out = sched.schedule()
    assert out.decodes == [s1, s2]
    for s in (s1, s2):
        s.num_cached_tokens += 1
        s.token_ids.append(9)
    for _ in range(4):
        out = sched.schedule()
        for s in out.decodes:
            s.num_cached_tokens += 1
            s.token_ids.append(9)
    # At 9 tokens each would need a third block; only 4 exist, so the newest is preempted.
    assert sched.num_preemptions >= 1
    assert s2.num_cached_tokens == 0 and s2 in sched.waiting and s2.block_table == []


def test_token_budget_chunks_long_prompts():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=256), bm)
    long, short = _seq(list(range(40)), sid=1), _seq([1, 2, 3], sid=2)
    sched.add(long)
    sched.add(short)
    out = sched.schedule()
    assert out.prefills == [long] and out.prefill_chunks == [16]
    long.num_cached_tokens += 16
    out = sched.schedule()
    # The long prompt's next chunk takes the whole budget; the short one waits for room.
    assert out.prefills == [long] and out.prefill_chunks == [16]
    long.num_cached_tokens += 16
    out = sched.schedule()
    assert out.prefills == [long, short] and out.prefill_chunks == [8, 3]


def test_max_num_seqs_bounds_admission():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=256, max_model_len=256), bm)
    seqs = [_seq([1, 2, 3], sid=i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert out.prefills == seqs[:2] and len(sched.waiting) == 2
