"""Speculative decoding on the trained demo family (models/demo): on copy-heavy prompts the medium
and large tiers accept most prompt-lookup proposals and a fair share of the small tier's draft proposals,
the counts show in the engine stats and per output, and the text is exactly plain greedy's."""

from __future__ import annotations

import pytest

from sizewise import LLM, SamplingParams, demo
from sizewise.engine.config import EngineConfig
from sizewise.engine.core import EngineCore

ENGINE = dict(device="cpu", dtype="float32", max_model_len=1024, max_num_seqs=4, kv_cache_bytes=64 << 20)


@pytest.fixture(scope="module", params=["medium", "large"])
def llm(request):
    llm = LLM(demo.demo_model_path(request.param), **ENGINE)
    llm.engine.attach_draft(EngineCore(demo.demo_model_path("small"), EngineConfig(**ENGINE), name="small"))
    return llm


def copy_heavy_prompts() -> list[str]:
    """Held-out text (never trained on) followed by a request to repeat it, already begun."""
    samples = demo.held_out_samples(chars_per_doc=700, docs=1)
    code, prose = samples["code"], samples["prose"]
    first = code.split("\n", 1)[0]
    return [
        f"{code}\n\n# The same code again, unchanged:\n{first}\n",
        f"{prose}\n\nQuote the passage above.\n\nQuote: \"{' '.join(prose.split()[:5])}",
    ]


def test_copy_heavy_prompts_are_accepted_and_counted(llm):
    prompts = copy_heavy_prompts()
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    for strategy in ("pld", "draft"):
        before = llm.engine.stats()
        outs = llm.generate(prompts, sp, strategy=strategy)
        after = llm.engine.stats()
        assert [o.outputs[0].token_ids for o in outs] == ref
        drafted = after.spec_draft_tokens[strategy] - before.spec_draft_tokens[strategy]
        accepted = after.spec_accepted_tokens[strategy] - before.spec_accepted_tokens[strategy]
        assert drafted == sum(o.outputs[0].num_draft_tokens for o in outs) > 0
        assert accepted == sum(o.outputs[0].num_accepted_tokens for o in outs)
        # Well above zero, as the issue asks: these toy models drift off the copy after a few dozen
        # tokens (large: ~0.5 of prompt-lookup proposals accepted; the small draft less often).
        assert accepted / drafted > (0.3 if strategy == "pld" else 0.15), (strategy, accepted, drafted)
