"""Numerical parity with transformers (the reference), for every supported family."""

from __future__ import annotations

import pytest
import torch
import transformers

from sizewise import LLM, SamplingParams

FAMILIES = ["llama", "llama_tied_linear", "qwen2", "qwen3", "mistral"]


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_logits_match_transformers(checkpoints, family):
    path = checkpoints[family]
    hf = _hf(path)
    llm = LLM(path, device="cpu", dtype="float32", kv_cache_bytes=4 << 20, block_size=8)
    core = llm.engine
    prompt = [3 + (i * 37) % 300 for i in range(21)]  # spans several 8-token blocks
    core.add_request("p", prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    seq = core.requests["p"].seqs[0]
    sched = core.scheduler.schedule()
    assert sched.prefills == [seq]

    # Prefill: the engine's logits at the last prompt position vs HF's full forward.
    _, logits, _ = core.runner._mixed([], sched.prefills, sched.prefill_chunks)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(logits[0], ref[-1], atol=1e-4, rtol=0)
    core._postprocess(sched, _fake_result(seq, logits))

    # 32 decode steps through the paged decode path, each vs HF over the whole sequence.
    for _ in range(32):
        sched = core.scheduler.schedule()
        assert sched.decodes == [seq] and not sched.prefills
        logits = core.runner._decode(sched.decodes)
        with torch.no_grad():
            ref = hf(torch.tensor([seq.token_ids])).logits[0, -1]
        torch.testing.assert_close(logits[0], ref, atol=1e-4, rtol=0)
        core._postprocess(sched, _fake_result(seq, logits))


def _fake_result(seq, logits):
    """Feed the greedy token back through the engine's own post-processing."""
    from sizewise.engine.model_runner import StepResult
    from sizewise.engine.sampler import SamplerOutput

    return StepResult(sampled=[seq], samples=SamplerOutput([int(logits[0].argmax())], None, [None]), prompt_logprobs={})


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_matches_transformers_generate(checkpoints, family):
    path = checkpoints[family]
    hf = _hf(path)
    hf.generation_config.eos_token_id = None  # ignore_eos: EOS is an ordinary token, as ours
    prompts = [[5 + (i * 13 + j * 7) % 300 for j in range(n)] for i, n in enumerate([3, 17, 40, 9, 64])]
    llm = LLM(path, device="cpu", dtype="float32", kv_cache_bytes=4 << 20)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ref = hf.generate(
            torch.tensor([p]), max_new_tokens=64, do_sample=False, pad_token_id=2,
        )[0, len(p):].tolist()
        assert o.outputs[0].token_ids == ref
        assert o.prompt_token_ids == p
        assert o.outputs[0].finish_reason == "length"
