"""On the trained demo family (models/demo, configs/demo.yaml with its calibrated policy): the
calibrated predictor expects an easy, copy-like prompt to lose less on a cheaper tier than hard
held-out prose (the small model, the probe, really finds it easier); and under a scripted overload
`auto` moves requests off the top tier while every request gets exactly what the same request gets
served alone on its tier."""

from __future__ import annotations

import asyncio
import functools

import pytest
import torch
import transformers

from sizewise import SamplingParams, demo
from sizewise.orchestrator.router import AdaptiveRouter
from sizewise.orchestrator.types import Prompt, RoutingHints

from conftest import demo_deployment


@pytest.fixture(scope="module")
def dep():
    with demo_deployment(max_num_seqs=8, max_model_len=512) as d:
        yield d


async def test_demo_config_routes_adaptively(dep):
    assert dep.config.policy.router == "adaptive" and isinstance(dep.router, AdaptiveRouter)
    assert set(dep.tier_to_model) == {"small", "medium", "large"}


async def test_copy_like_prompts_are_predicted_to_lose_less_than_hard_prose(dep):
    tok = dep.tokenizer()
    copy = tok.encode("import os\nimport sys\n\n\ndef main():\n    print(os.getcwd())\n" * 4, add_special_tokens=False)
    topics = demo.prose_topics()
    key = next(k for k in demo.split().held_out_prose if len(topics[k]) > 1500)
    prose = tok.encode(topics[key][:800], add_special_tokens=False)
    params = SamplingParams(max_tokens=16)
    probing = AdaptiveRouter(dep.config.policy.to_settings())
    probing.settings.always_probe = True  # measure difficulty though the idle deployment would skip it
    dc = await probing.route(dep, copy, params, "auto", RoutingHints())
    dp = await probing.route(dep, prose, params, "auto", RoutingHints())
    assert dc.probe["difficulty"] < dp.probe["difficulty"]
    assert dc.probe["copyability"] > dp.probe["copyability"]
    # the calibrated predictor expects the copy-like prompt to lose less on every smaller tier
    for t in ("small", "medium"):
        assert dc.explain["tiers"][t]["loss"] < dp.explain["tiers"][t]["loss"], (dc.to_json(), dp.to_json())
    # two arrivals: the plan has the top tier alone, and both are served there
    # (idle or headroom: two arrivals are too few for the rate's confidence band to leave zero)
    assert (dc.tier, dp.tier) == ("large", "large") and dp.reason in ("plan:idle", "plan:headroom")
    assert dp.explain["plan"]["shares"] == {"large": 1.0}


@functools.cache
def _hf_model(path: str):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def _assert_greedy_of(dep, model: str, ids: list[int], out: list[int], what) -> None:
    """`out` is `model`'s greedy continuation of `ids`: at every position the token served has the
    top logit of transformers' copy of that model, teacher-forced (within 1e-3: a batch of another
    shape rounds differently, so a near tie may go either way; another tier's tokens do not pass)."""
    path = {m.name: m.path for m in dep.describe()}[model]
    logits = _hf_model(path)(torch.tensor([ids + out])).logits[0, len(ids) - 1:-1]  # [len(out), V]
    chosen = logits.gather(1, torch.tensor(out)[:, None])[:, 0]
    gap = logits.max(dim=1).values - chosen
    assert len(out) > 0 and float(gap.max()) <= 1e-3, (what, model, gap.tolist())


async def _serve(dep, rid: str, ids: list[int], params: SamplingParams, model: str, strategy: str = "plain"):
    out: list[int] = []
    async for delta in await dep.engine.add_request(rid, ids, params, core=model, strategy=strategy):
        for o in delta.outputs:
            out.extend(o.token_ids)
    return out


def _script_arrivals(router: AdaptiveRouter, rate: float, seconds: float = 2.0) -> None:
    """A scripted arrival rate: `rate` auto requests per second over the controller's window."""
    now = router.clock()
    for k in range(int(rate * seconds)):
        router.control.note_arrival(now - seconds + k / rate, None, 48, 12)


async def _overloaded_router(dep, warm: list[list[int]], params: SamplingParams, tag: str) -> AdaptiveRouter:
    """A fresh adaptive router whose telemetry has cost lines (the `warm` prompts served on large)
    and whose controller has seen a scripted overload, far over what large alone can carry within
    the SLO."""
    router = AdaptiveRouter(dep.config.policy.to_settings())
    router.bind(dep)
    for i, ids in enumerate(warm):
        await _serve(dep, f"{tag}-{i}", ids, params, dep.tier_to_model["large"])
    _script_arrivals(router, 2000.0)
    return router


async def test_scripted_overload_concentrates_auto_on_at_most_two_tiers_and_outputs_are_each_tiers_own(dep):
    assert dep.engine.discipline == "fair"
    tok = dep.tokenizer()
    items = demo_prompts(tok, 24)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    router = await _overloaded_router(dep, items[:3], params, "warm")

    async def one(i: int, ids: list[int]):
        d = await router.route(dep, ids, params, "auto", RoutingHints())
        return d, await _serve(dep, f"load-{i}", ids, params, d.model, d.strategy)

    burst = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(items)))
    tiers = {d.tier for d, _ in burst}
    assert len(tiers) <= 2 and "large" not in tiers, tiers
    for d, _ in burst:
        plan = d.explain["plan"]
        assert d.reason == f"plan:{plan['reason']}" and plan["reason"] in ("mix", "single", "overload")
        assert d.tier in plan["shares"] and len(plan["shares"]) <= 2
        assert d.explain["placement"]["tier"] == d.tier
    assert router.auto_with_signal == router.auto_requests == len(items)  # the signal on every request
    # every request got its tier's own greedy tokens
    for i, (ids, (d, out)) in enumerate(zip(items, burst)):
        assert len(out) == params.max_tokens
        _assert_greedy_of(dep, d.model, ids, out, i)


async def test_auto_with_the_draft_strategy_never_lands_on_the_draft_model(dep):
    """Under an overload the plan sends auto to the cheapest tiers; a client that asked for `draft`
    still gets a tier that runs it (the smallest tier is the draft model and cannot), not a 400."""
    tok = dep.tokenizer()
    items = demo_prompts(tok, 8)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    router = await _overloaded_router(dep, items[:2], params, "dwarm")
    plain = [await router.route(dep, ids, params, "auto", RoutingHints()) for ids in items]
    assert "small" in {d.tier for d in plain}  # the plan does send auto to the draft model's tier
    drafted = [await router.route(dep, ids, params, "auto", RoutingHints(strategy="draft")) for ids in items]
    assert all(d.tier != "small" and d.strategy == "draft" for d in drafted), [(d.tier, d.strategy) for d in drafted]
    for i, (ids, d) in enumerate(zip(items[:2], drafted)):
        assert len(await _serve(dep, f"draft-{i}", ids, params, d.model, d.strategy)) == params.max_tokens


async def test_waiting_auto_requests_move_when_the_plan_leaves_their_tier(dep):
    tok = dep.tokenizer()
    items = demo_prompts(tok, 12)
    long = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    router = AdaptiveRouter(dep.config.policy.to_settings())
    old_router = dep.router
    dep.router = router
    router.bind(dep)
    ctl = router.control
    try:
        ctl.replan_arrivals = 10 ** 9
        ctl.replan_s = float("inf")  # the plan in force (idle: large alone) holds while the burst queues
        subs = []
        for i, ids in enumerate(items):
            subs += await dep.submit(f"mv-{i}", [Prompt(ids)], long)
        assert all(s.decision.tier == "large" for s in subs)
        # large runs max_num_seqs (8) of them; the other 4 wait. Now the load says overload:
        _script_arrivals(router, 2000.0)
        ctl.replan_s = 0.0
        d = await router.route(dep, items[0], long, "auto", RoutingHints())
        assert "large" not in d.explain["plan"]["shares"]
        outs = []
        for s in subs:
            toks = []
            async for delta in s:
                for o in delta.outputs:
                    toks += o.token_ids
            outs.append(toks)
    finally:
        dep.router = old_router
    moved = [s for s in subs if s.decision.tier != "large"]
    assert len(moved) == len(items) - dep.cores[dep.tier_to_model["large"]].config.max_num_seqs
    for s in moved:
        assert s.decision.explain["moved"]["from"] == "large"
        assert s.decision.explain["moved"]["to"] == s.decision.tier == d.explain["plan"]["active"][0]
    assert router.moved == len(moved)
    # each got its final tier's own greedy tokens
    for i, (s, out) in enumerate(zip(subs, outs)):
        _assert_greedy_of(dep, s.decision.model, items[i], out, i)


def demo_prompts(tok, n: int) -> list[list[int]]:
    """Held-out windows of code and prose, 48 tokens each."""
    s = demo.split()
    texts = [demo.read_code(r) for r in s.held_out_code[:6]] + [demo.prose_topics()[k] for k in s.held_out_prose[:6]]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts if t]
    ids = [x for x in ids if len(x) >= 400]
    return [ids[i % len(ids)][48 * (i // len(ids)):48 * (i // len(ids)) + 48] for i in range(n)]


@pytest.mark.parametrize("discipline", ["fair", "round_robin"])
async def test_the_device_turn_follows_the_plan_a_dropped_tier_steps_when_the_plans_are_idle(dep, discipline):
    # Under both disciplines: round-robin turns once stepped every busy engine, the plan's or not (a
    # mix on a CPU runs round-robin, the turn the plan's device model prices).
    tok = dep.tokenizer()
    items = demo_prompts(tok, 8)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    small, large = dep.tier_to_model["small"], dep.tier_to_model["large"]
    eng = dep.engine
    times: dict[str, tuple[str, float, float]] = {}  # request -> (model, first token, finished), engine clock

    async def drain(stream, model: str):
        toks = []
        async for delta in stream:
            for o in delta.outputs:
                toks += o.token_ids
            if delta.finished:
                times[stream.request_id] = (model, delta.metrics["first_token_time"], delta.metrics["finished_time"])
        return toks

    old = (eng.plan_cores, eng.plan_starve_s, eng.discipline)
    eng.plan_cores, eng.plan_starve_s = frozenset({small}), 1e9  # the plan keeps small only; never starve-step
    eng.discipline = discipline
    try:
        # small's requests first (admitted, so small is busy), then large's (a tier the plan left)
        which = [small if i % 2 else large for i in range(len(items))]
        streams = {}
        for i in sorted(range(len(items)), key=lambda i: which[i] != small):
            streams[i] = await eng.add_request(f"turn-{i}", items[i], params, core=which[i])
        outs = await asyncio.gather(*(drain(streams[i], which[i]) for i in range(len(items))))
    finally:
        eng.plan_cores, eng.plan_starve_s, eng.discipline = old
    # large stepped only once small had nothing left: its first token comes after small's last
    assert min(f for m, f, _ in times.values() if m == large) >= max(e for m, _, e in times.values() if m == small)
    # and the outputs are each tier's own
    for i, (ids, out) in enumerate(zip(items, outs)):
        _assert_greedy_of(dep, small if i % 2 else large, ids, out, i)


async def test_running_auto_requests_moved_down_go_on_from_their_tokens_on_the_cheaper_tier(dep):
    """A plan that leaves large on a CPU moves its running requests too: what large wrote becomes
    medium's prompt and medium writes the rest. Each part is its own tier's greedy continuation,
    the total is max_tokens, and the decision says where the seam is. A request asking for
    logprobs (which a continuation could not keep consistent) stays where it is."""
    tok = dep.tokenizer()
    items = demo_prompts(tok, 3)
    long = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    large, medium = dep.tier_to_model["large"], dep.tier_to_model["medium"]
    subs = []
    for i, ids in enumerate(items):
        params = long if i < 2 else SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True, logprobs=1)
        subs += await dep.submit(f"run-mv-{i}", [Prompt(ids)], params)
    assert all(s.decision.tier == "large" for s in subs)  # idle: the top tier alone
    outs: list[list[int]] = [[] for _ in subs]
    iters = [s.__aiter__() for s in subs]
    for it, out in zip(iters, outs):  # every one has begun decoding on large
        delta = await it.__anext__()
        out += [t for o in delta.outputs for t in o.token_ids]
    assert all(outs)
    dep.engine.move_waiting(large, medium, running=True)
    for it, out in zip(iters, outs):
        async for delta in it:
            out += [t for o in delta.outputs for t in o.token_ids]
    for i, (s, out) in enumerate(zip(subs[:2], outs)):
        moved = s.decision.explain["moved"]
        k = moved["after_tokens"]
        assert (s.decision.tier, moved["from"], moved["to"]) == ("medium", "large", "medium")
        assert 0 < k < len(out) == long.max_tokens
        _assert_greedy_of(dep, large, items[i], out[:k], (i, "large's part"))
        _assert_greedy_of(dep, medium, items[i] + out[:k], out[k:], (i, "medium's part"))
    assert subs[2].decision.tier == "large" and "moved" not in subs[2].decision.explain
    assert len(outs[2]) == 120
    _assert_greedy_of(dep, large, items[2], outs[2], "logprobs: stays")
