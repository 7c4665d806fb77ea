"""Sampling semantics: seeds, top-k, logprobs vs a reference log-softmax, stops, penalties."""

from __future__ import annotations

import pytest
import torch
import transformers

from sizewise import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, device="cpu", kv_cache_bytes=4 << 20)


@pytest.fixture(scope="module")
def hf(llama_dir):
    m = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    m.generation_config.eos_token_id = None
    return m


PROMPTS = [[5, 17, 33, 8], [40, 41, 42, 43, 44, 45, 46], [100]]


def test_seeded_sampling_repeats_alone_and_batched(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    alone = [llm.generate([p], sp)[0].outputs[0].token_ids for p in PROMPTS]
    again = [llm.generate([p], sp)[0].outputs[0].token_ids for p in PROMPTS]
    noise = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)] * 3  # unseeded neighbours
    batched = llm.generate(PROMPTS + PROMPTS, [sp] * 3 + noise)
    assert alone == again
    assert [o.outputs[0].token_ids for o in batched[:3]] == alone
    other = llm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, seed=99, max_tokens=24, ignore_eos=True))
    assert other[0].outputs[0].token_ids != alone[0]  # the seed matters


def test_top_k_1_equals_greedy(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    topk1 = llm.generate(PROMPTS, SamplingParams(temperature=0.8, top_k=1, max_tokens=20, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in topk1] == [o.outputs[0].token_ids for o in greedy]


def test_logprobs_match_reference_log_softmax(llm, hf):
    prompt = PROMPTS[1]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logprobs=5, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 6
    ids = prompt + out.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    for step, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + step]
        assert list(lp)[0] == tok  # the sampled token comes first
        top5 = row.topk(5).indices.tolist()
        assert set(lp) == set(top5) | {tok}
        for t, v in lp.items():
            assert v == pytest.approx(row[t].item(), abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(lp[t] for t, lp in zip(out.token_ids, out.logprobs)), abs=1e-4)


def test_prompt_logprobs_match_reference(llm, hf):
    prompt = PROMPTS[1]
    res = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    assert res.prompt_logprobs[0] is None and len(res.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        entry = res.prompt_logprobs[i]
        assert entry[prompt[i]] == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-4)
        assert set(ref[i - 1].topk(2).indices.tolist()) <= set(entry)


def test_repetition_penalty_matches_transformers(llm, hf):
    prompt = PROMPTS[0]
    ours = llm.generate([prompt], SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=30, ignore_eos=True))
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, repetition_penalty=1.3, pad_token_id=2)
    assert ours[0].outputs[0].token_ids == ref[0, len(prompt):].tolist()


def test_stop_token_ids_and_stop_strings(llm):
    base = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    stop_tok = base.token_ids[7]
    first = base.token_ids.index(stop_tok)
    cut = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_tok]))[0].outputs[0]
    assert cut.token_ids == base.token_ids[: first + 1]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop_tok

    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    cut = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop], include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_eos_min_tokens_and_max_tokens(llm):
    eos = llm.engine.eos_token_ids[0]
    base = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    # Make the prompt's continuation hit EOS by declaring a token it emits to be a stop id at min_tokens.
    tok = base.token_ids[2]
    out = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[tok], min_tokens=5))[0].outputs[0]
    assert len(out.token_ids) >= 5 and tok not in out.token_ids[:5]
    assert llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0].finish_reason == "length"
    assert eos in llm.engine.eos_token_ids


def test_seeded_sampling_distribution_follows_temperature(llm):
    """Many seeded one-token samples: empirical frequencies follow softmax(logits / T)."""
    prompt = PROMPTS[0]
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=20))[0].outputs[0].logprobs[0]
    top = max(ref, key=ref.get)
    n = 400
    outs = llm.generate([prompt] * n, [SamplingParams(temperature=1.0, seed=s, max_tokens=1) for s in range(n)])
    freq = sum(o.outputs[0].token_ids[0] == top for o in outs) / n
    p = torch.tensor(ref[top]).exp().item()
    assert abs(freq - p) < 4 * (p * (1 - p) / n) ** 0.5 + 0.01
