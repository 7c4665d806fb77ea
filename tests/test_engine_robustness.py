"""Edges of the engine: a KV cache too small for a request, preemption, speculation near the
context limit, aborts in every state. Every request either finishes with exactly the output it
gets alone, or is refused up front with an error naming the limit: never a hang."""

from __future__ import annotations

import asyncio

import pytest

from sizewise import LLM, InvalidRequestError, SamplingParams
from sizewise.engine.async_engine import AsyncEngine
from sizewise.engine.config import EngineConfig
from sizewise.engine.core import EngineCore

# the llama fixture: 2 layers x 2 KV heads x head_dim 16, float32 -> 512 bytes per token
BLOCK_BYTES = 16 * 512  # one block of 16 tokens
ENGINE = dict(device="cpu", dtype="float32", max_model_len=256, block_size=16)


def drive(core: EngineCore, max_steps: int = 2000) -> dict[str, list[int]]:
    """Step until idle; fail (instead of hanging) when the engine stops making progress."""
    got: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            return got
        for d in core.step():
            got.setdefault(d.request_id, []).extend(t for o in d.outputs for t in o.token_ids)
    raise AssertionError(f"engine still busy after {max_steps} steps: waiting={list(core.scheduler.waiting)}")


# ----- a KV cache smaller than the context length ----------------------------------------------
def test_request_that_can_never_fit_the_kv_cache_is_refused_not_hung(llama_dir):
    core = EngineCore(llama_dir, EngineConfig(kv_cache_bytes=4 * BLOCK_BYTES, **ENGINE))  # 64 tokens
    assert core.block_manager.num_blocks == 4
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with pytest.raises(InvalidRequestError, match="KV cache") as e:
        core.add_request("long-prompt", list(range(3, 103)), sp)  # 100 tokens: never admitted
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="KV cache") as e:
        core.add_request("grows-out", list(range(3, 43)), SamplingParams(temperature=0, max_tokens=60))
    assert e.value.param == "max_tokens"
    assert not core.has_unfinished_requests() and not core.requests


def test_unbounded_request_stops_at_the_kv_capacity(llama_dir):
    """max_tokens=None runs to the context length, which a small cache caps: it finishes with
    'length' instead of preempting itself forever."""
    core = EngineCore(llama_dir, EngineConfig(kv_cache_bytes=4 * BLOCK_BYTES, **ENGINE))
    core.add_request("a", list(range(3, 43)), SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    core.add_request("b", list(range(50, 60)), SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    got = drive(core)
    assert 40 + len(got["a"]) == 64 and 10 + len(got["b"]) == 64
    ref = LLM(llama_dir, kv_cache_bytes=1 << 20, **ENGINE)
    alone = ref.generate([list(range(3, 43))], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert got["a"] == alone[0].outputs[0].token_ids
    assert core.block_manager.num_used_blocks == 0


# ----- the async front: a caller that gives up while its request is being admitted ------------
async def test_cancelled_admission_does_not_leave_the_request_running(llama_dir):
    """A client that disconnects (or times out) while `add_request` awaits admission never gets
    a stream to abort: the engine must drop the request itself, not generate it to the end."""
    core = EngineCore(llama_dir, EngineConfig(kv_cache_bytes=1 << 20, **ENGINE), name="m")
    engine = AsyncEngine(core)
    sp = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    try:
        task = asyncio.ensure_future(engine.add_request("gone", [5] * 10, sp))
        await asyncio.sleep(0)  # the task now awaits admission
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # A request queued after it is handled after it (the inbox is FIFO): once it is done, the
        # cancelled one was admitted and dealt with too.
        got = [t async for out in await engine.add_request("next", [5] * 10, sp) for t in out.outputs[0].token_ids]
        assert len(got) == 200 and engine.alive
        assert core.stats().generation_tokens_total < 2 * 200  # "gone" was aborted, not generated to the end
        assert not core.has_unfinished_requests() and not core.requests and core.block_manager.num_used_blocks == 0
    finally:
        engine.shutdown()


# ----- bad input: a clear error up front, never a failed step for everyone ----------------------
@pytest.mark.parametrize("bad", [None, "7", 5.0, True, 320, -1])
def test_bad_prompt_token_is_refused_before_it_reaches_a_step(llama_dir, bad):
    core = EngineCore(llama_dir, EngineConfig(kv_cache_bytes=1 << 20, **ENGINE))
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    core.add_request("ok", [5, 6, 7], sp)
    with pytest.raises(InvalidRequestError, match=r"token id .* (not an integer|outside the vocabulary)") as e:
        core.add_request("bad", [5, bad], sp)
    assert e.value.param == "prompt" and "bad" not in core.requests
    assert len(drive(core)["ok"]) == 4  # the other request never notices


# ----- preemption, speculation and aborts together ----------------------------------------------
def test_aborts_in_every_state_leave_the_others_exact(llama_dir):
    """Plain, pld and draft requests in a cache far too small for them (preemption), with max_tokens
    None up to the capped context: aborting a waiting, a running and a preempted request (twice,
    and an unknown id) leaves every other request's output exactly what it is alone."""
    prompts = [[5 + i, 17, 33, 8] * (2 + i % 4) if i % 2 else [(37 * i + 11 * j) % 300 + 3 for j in range(16 + 5 * i)]
               for i in range(9)]
    strategies = ["plain", "pld", "draft"] * 3
    sp = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    cfg = dict(max_num_seqs=8, max_num_batched_tokens=40, prompt_lookup_min=1, **ENGINE)
    core = EngineCore(llama_dir, EngineConfig(kv_cache_bytes=10 * BLOCK_BYTES, **cfg))  # 160 tokens
    core.attach_draft(EngineCore(llama_dir, EngineConfig(kv_cache_bytes=1 << 20, **cfg), name="draft"))
    assert core.max_model_len == 160
    for i, (p, s) in enumerate(zip(prompts, strategies)):
        core.add_request(f"r{i}", p, sp, strategy=s)
    assert core.abort_request("r8").outputs[0].finish_reason == "abort"  # waiting
    aborted, got = {"r8"}, {}
    for _ in range(3000):
        if not core.has_unfinished_requests():
            break
        running = [s.request.request_id for s in core.scheduler.running if s.spec is not None and s.spec.num_draft_tokens]
        preempted = [s.request.request_id for s in core.scheduler.waiting if s.request.metrics.num_preemptions]
        for victim in (running[:1] if len(aborted) == 1 else []) + (preempted[:1] if len(aborted) == 2 else []):
            assert core.abort_request(victim).finished and core.abort_request(victim) is None
            aborted.add(victim)
        assert core.abort_request("unknown") is None
        for d in core.step():
            got.setdefault(d.request_id, []).extend(t for o in d.outputs for t in o.token_ids)
    assert len(aborted) == 3 and core.stats().num_preemptions > 0
    assert core.stats().spec_accepted_tokens["draft"] > 0 and core.stats().spec_accepted_tokens["pld"] > 0
    ref = LLM(llama_dir, kv_cache_bytes=1 << 20, **ENGINE)
    for i, p in enumerate(prompts):
        rid = f"r{i}"
        alone = ref.generate([p], SamplingParams(temperature=0, max_tokens=160 - len(p), ignore_eos=True))
        want = alone[0].outputs[0].token_ids
        if rid in aborted:
            assert want[:len(got.get(rid, []))] == got.get(rid, []), rid
        else:
            assert got[rid] == want, rid
    assert core.block_manager.num_used_blocks == 0 and core.draft.block_manager.num_used_blocks == 0


# ----- min_tokens, prompt_logprobs, stop_token_ids: vLLM's semantics ---------------------------
@pytest.fixture(scope="module")
def demo_small():
    from sizewise import demo

    return LLM(demo.demo_model_path("small"), device="cpu", dtype="float32", max_model_len=256,
               kv_cache_bytes=8 << 20)


@pytest.mark.parametrize("strategy", ["plain", "pld"])
def test_stop_strings_wait_for_min_tokens_like_vllm(demo_small, strategy):
    """Text of the first min_tokens tokens can neither end a sequence nor start a stop match
    (vLLM skips stop checks until min_tokens); afterwards the first stop string ends it."""
    prompt = "def is_prime(n):\n    \"\"\"Return True if n is a prime number.\"\"\"\n    if"
    full = demo_small.generate([prompt], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))[0].outputs[0]
    tok = demo_small.tokenizer
    stop, m = ".", 8
    first = full.text.find(stop)
    assert 0 <= first < len(tok.decode(full.token_ids[:m]))  # without min_tokens it would stop early
    floor = len(tok.decode(full.token_ids[:m]))
    cut = full.text.find(stop, floor)
    assert cut != -1
    out = demo_small.generate([prompt], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True,
                                                       stop=[stop], min_tokens=m), strategy=strategy)[0].outputs[0]
    assert out.text == full.text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) > m and out.token_ids == full.token_ids[: len(out.token_ids)]
    early = demo_small.generate([prompt], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True,
                                                         stop=[stop]), strategy=strategy)[0].outputs[0]
    assert early.text == full.text[:first]


def test_min_tokens_past_the_context_is_refused(demo_small):
    with pytest.raises(InvalidRequestError, match="min_tokens") as e:
        demo_small.generate([[5] * 200], SamplingParams(max_tokens=None, min_tokens=100))
    assert e.value.param == "min_tokens"


def test_one_token_prompt_has_prompt_logprobs_of_none(demo_small):
    out = demo_small.generate([[5]], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1))[0]
    assert out.prompt_logprobs == [None]
    two = demo_small.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1))[0]
    assert two.prompt_logprobs[0] is None and 6 in two.prompt_logprobs[1]


@pytest.mark.parametrize("ids", [["a"], [1.5], [True]])
def test_stop_token_ids_must_be_integers(demo_small, ids):
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        demo_small.generate([[5, 6]], SamplingParams(max_tokens=2, stop_token_ids=ids))


def test_max_model_len_past_the_checkpoints_positions_is_refused(llama_dir):
    """As vLLM: a context longer than max_position_embeddings (512 here) is a config error."""
    with pytest.raises(ValueError, match="max_position_embeddings"):
        EngineCore(llama_dir, EngineConfig(**{**ENGINE, "max_model_len": 513}))
    assert EngineCore(llama_dir, EngineConfig(**{**ENGINE, "max_model_len": 512})).max_model_len == 512


async def test_a_request_id_in_flight_on_one_core_is_refused_on_another(llama_dir):
    """Outputs are routed by request id: the same id on two cores would cross their streams."""
    a = EngineCore(llama_dir, EngineConfig(kv_cache_bytes=1 << 20, **ENGINE), name="a")
    b = EngineCore(llama_dir, EngineConfig(kv_cache_bytes=1 << 20, **ENGINE), name="b")
    engine = AsyncEngine({"a": a, "b": b})
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    try:
        first = await engine.add_request("same", [5] * 10, sp, core="a")
        with pytest.raises(InvalidRequestError, match="already in use"):
            await engine.add_request("same", [6] * 10, sp, core="b")
        got = [t async for out in first for t in out.outputs[0].token_ids]
        alone = LLM(llama_dir, kv_cache_bytes=1 << 20, **ENGINE).generate([[5] * 10], sp)[0].outputs[0].token_ids
        assert got == alone and not b.requests
        again = await engine.add_request("same", [6] * 10, sp, core="b")  # free again once finished
        assert len([t async for out in again for t in out.outputs[0].token_ids]) == 40
    finally:
        engine.shutdown()


# ----- a stop string found outside the engine ------------------------------------------------------
def test_a_sample_stopped_from_outside_frees_its_kv_at_once_and_its_request_finishes_with_the_last(llama_dir):
    """With detokenize=False (the engine-core process) the API process finds stop strings; the
    sample it stops must end now, as a stop found in the engine would, not run on to max_tokens."""
    core = EngineCore(llama_dir, EngineConfig(kv_cache_bytes=1 << 20, detokenize=False, **ENGINE))
    sp = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=200, ignore_eos=True)
    core.add_request("r", list(range(3, 40)), sp)
    for _ in range(3):
        core.step()
    used = core.block_manager.num_used_blocks
    assert core.stop_sample("r", 0, "\n") is None  # a sibling still runs
    s0, s1 = sorted(core.requests["r"].seqs, key=lambda s: s.index)
    assert (s0.finish_reason, s0.stop_reason, s1.is_finished) == ("stop", "\n", False)
    assert core.block_manager.num_used_blocks < used  # its own blocks are free now (the prompt's are shared)
    assert core.stop_sample("r", 0, "\n") is None and core.stop_sample("nobody", 0, "x") is None
    n1 = s1.num_output_tokens
    final = core.stop_sample("r", 1, "END")
    assert final is not None and final.finished and final.metrics["finished_time"] is not None
    assert all(o.finish_reason == "stop" for o in final.outputs if o.index == 1)
    assert "r" not in core.requests and not core.has_unfinished_requests()
    assert core.block_manager.num_used_blocks == 0
    assert s1.num_output_tokens == n1 < sp.max_tokens
    # the next step hands the final delta to step listeners too (telemetry learns the request ended)
    assert [d.request_id for d in core.step() if d.finished] == ["r"]
