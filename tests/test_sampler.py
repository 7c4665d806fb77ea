"""The sampler's distribution against transformers' logits warpers (the reference)."""

from __future__ import annotations

import itertools

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sizewise import SamplingParams
from sizewise.engine.sampler import Sampler, SamplingRow


def _rows(params: list[SamplingParams]) -> list[SamplingRow]:
    return [SamplingRow(params=p, race_key=None, output_token_ids=[], prompt_token_ids=[], block_eos=None) for p in params]


def _distribution(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    # logits: [N, V] -> probs: [N, V]
    _, probs = Sampler(torch.device("cpu")).distribution(logits.clone(), _rows(params))
    return probs


def _reference(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    # logits: [V] -> probs: [V], built the way transformers' generate() orders its warpers
    warpers = LogitsProcessorList()
    if p.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        warpers.append(MinPLogitsWarper(p.min_p))
    return warpers(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0].softmax(-1)


def _assert_matches(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    kept, ref_kept = ours > 0, ref > 0
    assert torch.equal(kept, ref_kept), f"{what}: kept {kept.nonzero().flatten().tolist()}, transformers {ref_kept.nonzero().flatten().tolist()}"
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7, msg=what)


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # [0.5, 0.3, 0.2], top_k=2 -> [0.625, 0.375]; top_p=0.6 is reached by the first token alone.
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    p = SamplingParams(top_k=2, top_p=0.6)
    ours, ref = _distribution(logits, [p])[0], _reference(logits[0], p)
    assert (ref > 0).tolist() == [True, False, False]
    _assert_matches(ours, ref, "k=2 p=0.6")


def test_every_warper_combination_matches_transformers_in_one_batch():
    # One row per combination, all in one batch: each row gets its own parameters.
    combos = list(itertools.product([1.0, 0.7, 1.6], [0, 1, 2, 7, 40], [1.0, 0.95, 0.6, 0.25], [0.0, 0.05, 0.3]))
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in combos]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(combos), 64, generator=g) * 3  # peaked enough for every warper to bite
    ours = _distribution(logits, params)
    for i, (t, k, p, m) in enumerate(combos):
        _assert_matches(ours[i], _reference(logits[i], params[i]), f"temperature={t} top_k={k} top_p={p} min_p={m}")


def test_top_k_keeps_ties_with_the_kth_logit_like_transformers():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    p = SamplingParams(top_k=2)
    _assert_matches(_distribution(logits, [p])[0], _reference(logits[0], p), "tie at k")


def test_top_k_beyond_the_vocabulary_keeps_everything():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    torch.testing.assert_close(_distribution(logits, [SamplingParams(top_k=10, top_p=0.99)])[0],
                               _reference(logits[0], SamplingParams(top_p=0.99)))
