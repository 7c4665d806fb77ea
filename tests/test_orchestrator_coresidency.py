"""All three tiers resident in one process, served concurrently under load (queueing, chunked
prefill, pinned and routed requests, greedy and seeded sampling) without cross-talk: every
output equals the same request served alone (transformers' greedy decode for greedy requests,
a lone engine for seeded sampling)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from sizewise import LLM, SamplingParams
from sizewise.orchestrator.deployment import Deployment, DeploymentConfig
from sizewise.orchestrator.types import RoutingHints

TIERS = {"small": "llama", "medium": "qwen2", "large": "mistral"}
ENGINE = dict(max_model_len=192, max_num_seqs=4, max_num_batched_tokens=48, block_size=16, enforce_eager=True)


@pytest.fixture(scope="module")
def dep(checkpoints):
    cfg = DeploymentConfig.model_validate(dict(
        device="cpu", memory_fraction=0.01,
        models=[dict(name=f"m-{t}", tier=t, path=str(checkpoints[f])) for t, f in TIERS.items()],
        engine=ENGINE, policy=dict(router="adaptive"),
    ))
    d = Deployment.load(cfg, echo_plan=False)
    yield d
    d.shutdown()


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = []
    for _ in range(n):
        nxt = int(model(x).logits[0, -1].argmax())
        out.append(nxt)
        x = torch.cat([x, torch.tensor([[nxt]])], 1)
    return out


async def test_three_tiers_concurrently_without_cross_talk(dep, checkpoints):
    import transformers

    rng = random.Random(0)
    vocab = dep.cores["m-small"].vocab_size
    words = ["def", "return", "the", "fox", "import", "for", "print", "(", ")", ":", "\n    "]
    jobs = []  # (request id, prompt ids, params, requested model or "auto")
    for i in range(21):
        kind = i % 7
        if kind < 5:  # random text of 3..90 tokens: queueing and chunked prefill (48-token budget)
            text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 40)))
            ids = dep.tokenizer().encode(text)[:90] or [5]
        else:  # random token ids, including rare ones
            ids = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 60))]
        seeded = kind == 6
        params = SamplingParams(max_tokens=rng.randint(4, 10), ignore_eos=True,
                                temperature=0.9 if seeded else 0.0, seed=1000 + i if seeded else None)
        requested = ["small", "medium", "large", "auto"][i % 4]
        jobs.append((f"co-{i}", ids, params, requested))

    async def one(rid, ids, params, requested):
        d = await dep.route(ids, params, requested, RoutingHints())
        out: list[int] = []
        async for delta in await dep.engine.add_request(rid, ids, params, core=d.model, strategy=d.strategy):
            for o in delta.outputs:
                out.extend(o.token_ids)
        return d, out

    results = await asyncio.gather(*(one(*j) for j in jobs))
    served = {d.tier for d, _ in results}
    assert served == {"small", "medium", "large"}
    assert any(j[3] == "auto" for j in jobs)

    by_name = {f"m-{t}": f for t, f in TIERS.items()}
    hf = {m: transformers.AutoModelForCausalLM.from_pretrained(str(checkpoints[f])).eval() for m, f in by_name.items()}
    alone = {}
    for (rid, ids, params, requested), (d, out) in zip(jobs, results):
        assert len(out) == params.max_tokens
        if params.seed is None:
            assert out == hf_greedy(hf[d.model], ids, params.max_tokens), (rid, d.model, d.strategy)
        else:
            if d.model not in alone:
                alone[d.model] = LLM(checkpoints[by_name[d.model]], device="cpu", **ENGINE)
            ref = alone[d.model].generate([ids], params)[0].outputs[0].token_ids
            assert out == ref, (rid, d.model, d.strategy)
    # the engines were really loaded at once: every step of every core went through one worker
    snap = dep.telemetry.snapshot()
    assert all(snap.engines[m].num_steps > 0 for m in dep.cores)
