"""Continuous batching must not change results: batched == alone, with and without preemption."""

from __future__ import annotations

import random

import pytest

from sizewise import LLM, SamplingParams


def _requests(n=32, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 320) for _ in range(rng.randrange(1, 60))] for _ in range(n)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randrange(1, 40), ignore_eos=True) for _ in range(n)]
    return prompts, params


@pytest.fixture(scope="module")
def alone(llama_dir):
    prompts, params = _requests()
    llm = LLM(llama_dir, device="cpu", kv_cache_bytes=4 << 20, max_num_seqs=1)
    return [llm.generate([p], sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]


def test_32_concurrent_requests_equal_alone(llama_dir, alone):
    prompts, params = _requests()
    llm = LLM(llama_dir, device="cpu", kv_cache_bytes=4 << 20, max_num_seqs=32, max_num_batched_tokens=256)
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert llm.engine.stats().num_preemptions == 0
    assert llm.engine.block_manager.num_used_blocks == 0


def test_preemption_under_small_kv_budget_keeps_results(llama_dir, alone):
    prompts, params = _requests()
    # 24 blocks of 16 tokens: far less than 32 running sequences need, so the newest get preempted.
    llm = LLM(llama_dir, device="cpu", max_num_seqs=32, max_num_batched_tokens=128, block_size=16,
              kv_cache_bytes=24 * 16 * 2 * 2 * 2 * 16 * 4)
    assert llm.engine.block_manager.num_blocks == 24
    outs = llm.generate(prompts, params)
    assert llm.engine.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert llm.engine.block_manager.num_used_blocks == 0


def test_chunked_prefill_equals_whole_prefill(llama_dir):
    prompt = [(i * 7) % 300 + 3 for i in range(200)]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    whole = LLM(llama_dir, device="cpu", kv_cache_bytes=4 << 20).generate([prompt], sp)[0]
    chunked = LLM(llama_dir, device="cpu", kv_cache_bytes=4 << 20, max_num_batched_tokens=48).generate([prompt], sp)[0]
    assert chunked.outputs[0].token_ids == whole.outputs[0].token_ids


def test_prefix_cache_hit_gives_same_output(llama_dir):
    llm = LLM(llama_dir, device="cpu", kv_cache_bytes=4 << 20, block_size=8)
    prompt = [(i * 11) % 300 + 3 for i in range(50)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = llm.generate([prompt], sp)[0].outputs[0].token_ids
    hits_before = llm.engine.stats().prefix_cache_hit_tokens
    second = llm.generate([prompt], sp)[0].outputs[0].token_ids
    assert llm.engine.stats().prefix_cache_hit_tokens - hits_before == 48  # 6 full blocks of 8
    assert second == first


def test_abort_frees_every_block(llama_dir):
    llm = LLM(llama_dir, device="cpu", kv_cache_bytes=4 << 20)
    core = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    for i in range(6):
        core.add_request(f"r{i}", [5 + i] * (10 + 7 * i), sp)
    for _ in range(3):
        core.step()
    assert core.block_manager.num_used_blocks > 0
    core.add_request("late", [9] * 30, sp)  # still waiting when aborted
    for i in range(6):
        out = core.abort_request(f"r{i}")
        assert out.finished and out.outputs[0].finish_reason == "abort"
    core.abort_request("late")
    assert core.block_manager.num_used_blocks == 0
    assert not core.has_unfinished_requests()
    # The engine keeps serving after aborts.
    assert llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids


def test_step_bytes_count_the_kv_each_step_read(llama_dir):
    # A step streams the weights once plus the K/V of every context position it attends to:
    # a prefill its whole prompt, a decode the prompt plus the outputs before the one it samples.
    import json

    from sizewise.engine.config import EngineConfig
    from sizewise.engine.core import EngineCore

    hf = json.loads((llama_dir / "config.json").read_text())
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    kv_per_token = 2 * hf["num_hidden_layers"] * hf["num_key_value_heads"] * head_dim * 4  # K and V, float32
    core = EngineCore(llama_dir, EngineConfig(device="cpu", dtype="float32", kv_cache_bytes=1 << 20,
                                              num_speculative_tokens=0))
    core.add_request("short", [7] * 10, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    core.add_request("long", [9] * 17, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    read = []
    while core.has_unfinished_requests():
        core.step()
        read.append((core.stats().last_step_bytes - core.step_weight_bytes) / kv_per_token)
    # both prompts (the short one finishes on its first token), then "long"'s two decodes
    assert read == [10 + 17, 17 + 1, 17 + 2]
