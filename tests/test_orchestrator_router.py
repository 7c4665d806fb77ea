"""The adaptive router end to end on co-resident tiny checkpoints: the probe runs on the small
engine and its prefill is reused, decisions are explained and counted, telemetry agrees with
the engines' own counters, bad input gets a clear error while others keep being served."""

from __future__ import annotations

import asyncio

import pytest

from sizewise import InvalidRequestError, SamplingParams
from sizewise.orchestrator.deployment import Deployment, DeploymentConfig, UnknownModelError
from sizewise.orchestrator.policy import PolicySettings, QualityPredictor, TierFit
from sizewise.orchestrator.router import AdaptiveRouter
from sizewise.orchestrator.types import Prompt, RoutingHints

TIERS = {"small": "llama", "medium": "qwen2", "large": "mistral"}
CODE = "def add(a, b):\n    return a + b\n"
PROSE = "The quick brown fox jumps over the lazy dog. "


@pytest.fixture(scope="module")
def dep(checkpoints):
    cfg = DeploymentConfig.model_validate(dict(
        device="cpu", memory_fraction=0.01,
        models=[dict(name=f"m-{t}", tier=t, path=str(checkpoints[f])) for t, f in TIERS.items()],
        engine=dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256, block_size=16, enforce_eager=True),
        policy=dict(router="adaptive"),
    ))
    d = Deployment.load(cfg, echo_plan=False)
    yield d
    d.shutdown()


def router(**kw) -> AdaptiveRouter:
    kw.setdefault("always_probe", True)  # measure difficulty whatever the load (tested on its own below)
    # the per-request objective (the probe's mechanics, tested here); the plan is tested in
    # test_orchestrator_plan.py and, through the deployment's own router, below
    kw.setdefault("placement", "objective")
    return AdaptiveRouter(PolicySettings(**kw))





async def serve(dep, rid: str, ids: list[int], params: SamplingParams, model: str) -> list[int]:
    out: list[int] = []
    async for delta in await dep.engine.add_request(rid, ids, params, core=model):
        for o in delta.outputs:
            out.extend(o.token_ids)
    return out


async def test_config_selects_the_adaptive_router_and_decisions_are_explained(dep):
    assert isinstance(dep.router, AdaptiveRouter)
    ids = dep.tokenizer().encode(PROSE * 3)
    d = await dep.route(ids, SamplingParams(max_tokens=4), "auto", RoutingHints())
    assert d.model in dep.cores and dep.model_to_tier[d.model] == d.tier
    assert d.probe["copyability"] > 0.5 and d.strategy == "pld"  # repeated text, idle engine: lookup pays
    # idle: the capacity plan has the top tier alone, and the probe model's prefill is skipped
    assert (d.tier, d.reason) == ("large", "plan:headroom") or (d.tier, d.reason) == ("large", "plan:idle")
    plan = d.explain["plan"]
    assert plan["shares"] == {"large": 1.0} and plan["active"] == ["large"] and plan["replans"] >= 1
    assert d.explain["placement"]["tier"] == "large"
    p = d.probe
    assert p["skipped"] and p["difficulty"] is None and p["prompt_tokens"] == len(ids)
    assert p["intent"] in ("code", "math", "knowledge", "chat") and p["ms"] > 0
    assert set(d.explain["tiers"]) == set(TIERS)
    assert all(v["latency_ms"] > 0 for v in d.explain["tiers"].values())
    assert dep.router.decisions[(d.tier, d.reason)] >= 1
    assert d.to_json()["probe"] == p


async def test_probe_difficulty_equals_the_small_models_prompt_nll(dep, checkpoints):
    import torch
    import transformers

    ids = dep.tokenizer().encode(CODE + PROSE)
    d = await router().route(dep, ids, SamplingParams(max_tokens=1), "auto", RoutingHints())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoints["llama"])).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1].float()
    ref = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
    assert d.probe["difficulty"] == pytest.approx(ref, abs=1e-3)


async def test_probe_prefill_is_reused_when_the_probe_model_serves(dep, checkpoints):
    # The probe model is the one the idle policy picks (the top tier), so the prefill is reused.
    large = dep.cores["m-large"]
    ids = dep.tokenizer().encode((PROSE + CODE) * 3)[:70]  # 4 full blocks of 16 + 6
    assert len(ids) == 70
    r = router(probe_model="large")
    before = large.stats().prefix_cache_hit_tokens
    d = await r.route(dep, ids, SamplingParams(max_tokens=6, temperature=0.0), "auto", RoutingHints())
    assert (d.tier, d.reason) == ("large", "objective:quality")
    assert d.probe["probe_model"] == "m-large" and d.probe["difficulty_tokens"] == len(ids) - 1
    # the probe itself (prompt_logprobs) looked nothing up...
    assert large.stats().prefix_cache_hit_tokens == before
    got = await serve(dep, "reuse-1", ids, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), d.model)
    # ...but registered its blocks: the request's prefill hits every full block but the last token's
    assert large.stats().prefix_cache_hit_tokens - before == 64
    # and the reused KV gives the same tokens as the model alone
    from sizewise import LLM

    alone = LLM(checkpoints["mistral"], device="cpu", max_model_len=256, enforce_eager=True, enable_prefix_caching=False)
    ref = alone.generate([ids], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0].outputs[0].token_ids
    assert got == ref


async def test_prompt_logprob_requests_skip_lookups_but_register_blocks(dep):
    core = dep.cores["m-medium"]
    ids = dep.tokenizer().encode(CODE * 3)[:40]  # 2 full blocks + 8
    plp = SamplingParams(max_tokens=1, prompt_logprobs=0)
    h0 = core.stats().prefix_cache_hit_tokens
    await serve(dep, "plp-1", ids, plp, "m-medium")
    await serve(dep, "plp-2", ids, plp, "m-medium")
    assert core.stats().prefix_cache_hit_tokens == h0
    await serve(dep, "plp-3", ids, SamplingParams(max_tokens=1), "m-medium")
    assert core.stats().prefix_cache_hit_tokens - h0 == 32


async def test_copy_like_and_prose_prompts_get_different_tiers(dep):
    # Random-weight models find every prompt equally hard, so here a predictor over copyability is
    # what separates them (the demo-family test checks real difficulty).
    pred = QualityPredictor({"small": TierFit(2.0, {"copyability": -3.0}, 1.0), "medium": TierFit(5.0, {}, 5.0)})
    r = router(quality=pred)
    tok = dep.tokenizer()
    copy = tok.encode("x = [1, 2, 3]\n" * 12)
    prose = tok.encode("Jackdaws love my big sphinx of quartz; waltz, nymph, for quick jigs vex Bud.")
    dc = await r.route(dep, copy, SamplingParams(max_tokens=8), "auto", RoutingHints())
    dp = await r.route(dep, prose, SamplingParams(max_tokens=8), "auto", RoutingHints())
    assert dc.probe["copyability"] > 0.7 > 0.2 > dp.probe["copyability"]
    assert dc.explain["tiers"]["small"]["loss"] == 0.0 < dp.explain["tiers"]["small"]["loss"]
    # predicted as good as large: the cheaper of the two serves; the prose stays on large
    cheaper = min(("small", "large"), key=lambda t: dc.explain["tiers"][t]["cost_mb"])
    assert (dc.tier, dp.tier) == (cheaper, "large")


async def test_pinned_requests_skip_the_model_probe_and_are_served_where_pinned(dep):
    small = dep.cores["m-small"]
    steps = small.stats().num_steps
    ids = dep.tokenizer().encode(PROSE)
    for requested, model in (("large", "m-large"), ("m-medium", "m-medium"), ("small", "m-small")):
        d = await dep.route(ids, SamplingParams(max_tokens=2), requested, RoutingHints(max_latency_ms=0.001))
        assert (d.model, d.reason) == (model, "pinned")
        assert d.probe["probe_model"] is None and d.probe["difficulty"] is None
    assert small.stats().num_steps == steps  # no probe prefill ran


async def test_bad_input_gets_a_clear_error_and_others_are_still_served(dep):
    tok = dep.tokenizer()
    with pytest.raises(UnknownModelError, match="'huge' does not exist"):
        await dep.route([1, 2, 3], SamplingParams(), "huge", RoutingHints())
    bad = tok.encode(PROSE) + [10**6]
    d = await router().route(dep, bad, SamplingParams(max_tokens=2), "auto", RoutingHints())  # the probe fails softly
    assert any("outside the vocabulary" in e for e in d.probe["errors"])
    with pytest.raises(InvalidRequestError, match="outside the vocabulary") as ei:
        await dep.engine.add_request("bad-1", bad, SamplingParams(max_tokens=2), core=d.model)
    assert ei.value.param == "prompt"
    too_long = tok.encode(PROSE * 40)[:300]  # over every model's 256-token context
    d = await router().route(dep, too_long, SamplingParams(max_tokens=2), "auto", RoutingHints())
    assert d.probe["difficulty_tokens"] == 254  # the probe reads what fits
    with pytest.raises(InvalidRequestError, match="context length is 256"):
        await dep.engine.add_request("long-1", too_long, SamplingParams(max_tokens=2), core=d.model)
    ids = tok.encode(CODE)
    d = await dep.route(ids, SamplingParams(max_tokens=3), "auto", RoutingHints())
    assert len(await serve(dep, "after-bad", ids, SamplingParams(max_tokens=3, ignore_eos=True), d.model)) == 3


async def test_telemetry_agrees_with_the_engines(dep):
    from sizewise.orchestrator.telemetry import Telemetry

    async def settle(tel, base):
        # Finished deltas are delivered before the worker calls the step listeners: wait for them.
        for _ in range(500):
            snap = tel.snapshot()
            if all(snap.engines[n].num_steps == c.stats().num_steps - base[n] for n, c in dep.cores.items()):
                return
            await asyncio.sleep(0.01)

    await settle(dep.telemetry, {n: 0 for n in dep.cores})  # the deployment's own listener saw all
    fresh = Telemetry(dep.cores, dep.model_to_tier)  # a second listener, from an empty history
    fresh.attach(dep.engine)
    steps0 = {n: c.stats().num_steps for n, c in dep.cores.items()}
    tok = dep.tokenizer()
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    try:
        await asyncio.gather(*(serve(dep, f"tel-{m}-{i}", tok.encode(PROSE * (i + 1)), params, m)
                               for m in dep.cores for i in range(2)))
        await settle(fresh, steps0)
    finally:
        dep.engine.step_listeners.remove(fresh.on_step)
    snap = fresh.snapshot(device=True)
    assert snap.peak_bandwidth == dep.telemetry.peak_bandwidth > 1e8  # measured once per platform
    assert dep.telemetry.snapshot().engines["m-small"].num_steps >= snap.engines["m-small"].num_steps
    for name, core in dep.cores.items():
        e, st = snap.engines[name], core.stats()
        assert e.num_steps == st.num_steps - steps0[name]  # the listener saw every step
        assert (e.kv_blocks_total, e.kv_blocks_used, e.num_running) == (dep.plan.model(name).num_blocks, 0, 0)
        assert e.bytes_per_step >= core.step_weight_bytes  # weights stream once per step, plus KV
        # bandwidth over the model's own seconds of a step (no draft model drafts here: all of it)
        assert 0 < e.own_step_seconds <= e.step_seconds
        assert e.achieved_bandwidth == pytest.approx(e.bytes_per_step / e.own_step_seconds)
        assert e.bandwidth_utilization == pytest.approx(e.achieved_bandwidth / snap.peak_bandwidth)
        assert e.avg_output_tokens == pytest.approx(5.0)
        assert e.calibrated and e.step_fixed_seconds >= 0 and e.step_seconds_per_token >= 0
    assert 0 < snap.device_memory_used_bytes < snap.device_memory_total_bytes
    assert snap.achieved_bandwidth > 0


async def test_auto_strategies_are_servable_and_lossless(dep):
    """What `auto` picks (pld for copyable prompts; draft, when allowed, for larger tiers with the
    small model attached as draft) is accepted by the engine and gives plain greedy's tokens."""
    tok = dep.tokenizer()
    r = router(allow_draft=True, pld_min_copyability=0.5)
    cases = [tok.encode("x = [1, 2, 3]\n" * 8), tok.encode("Jackdaws love my big sphinx of quartz.")]
    want = []
    for i, ids in enumerate(cases):
        d = await r.route(dep, ids, SamplingParams(max_tokens=8), "auto", RoutingHints())
        want.append(d.strategy)
        greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        plain = await serve(dep, f"strat-plain-{i}", ids, greedy, d.model)
        got = []
        async for delta in await dep.engine.add_request(f"strat-{i}", ids, greedy, core=d.model, strategy=d.strategy):
            for o in delta.outputs:
                got.extend(o.token_ids)
        assert got == plain
        # the telemetry reads the engine's speculative counters: a measured acceptance per proposer
        proposer = d.strategy
        if dep.cores[d.model].stats().spec_draft_tokens[proposer] > 0:
            for _ in range(500):  # the step listener runs just after the last delta is delivered
                acc = dep.telemetry.snapshot().engines[d.model].spec_acceptance
                if proposer in acc:
                    break
                await asyncio.sleep(0.01)
            assert 0.0 <= acc[proposer] <= 1.0
    assert want == ["pld", "draft"]


async def test_zero_shot_intent_equals_label_likelihoods_under_transformers(dep, checkpoints):
    import math

    import torch
    import transformers

    from sizewise.orchestrator.probe import _ZERO_SHOT_LABELS, _ZERO_SHOT_TEMPLATE

    tok = dep.tokenizer()
    text = "for i in range(10):\n    print(i)\n"
    ids = tok.encode(text)
    d = await router(intent_mode="zero_shot").route(dep, ids, SamplingParams(max_tokens=2), "auto", RoutingHints())
    p = d.probe
    assert p["intent_source"] == "zero_shot", p.get("errors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoints["llama"])).eval()
    body = tok.decode(tok.encode(tok.decode(ids, skip_special_tokens=True), add_special_tokens=False))  # < 96 tokens
    head = tok.encode(_ZERO_SHOT_TEMPLATE.format(text=body), add_special_tokens=False)
    lps = {}
    with torch.no_grad():
        for k, w in _ZERO_SHOT_LABELS.items():
            lab = tok.encode(w, add_special_tokens=False)
            x = torch.tensor([head + lab])
            lp = torch.log_softmax(hf(x).logits[0].float(), -1)
            lps[k] = sum(lp[len(head) - 1 + j, t].item() for j, t in enumerate(lab))
    z = sum(math.exp(v) for v in lps.values())
    for k in lps:
        assert p["intent_scores"][k] == pytest.approx(math.exp(lps[k]) / z, abs=1e-3)
    assert p["intent"] == max(lps, key=lps.get)


async def test_the_model_probe_runs_only_when_it_could_change_the_decision(dep):
    tok = dep.tokenizer()
    small = dep.cores["m-small"]
    pred = QualityPredictor({"small": TierFit(0.1, {"difficulty": 0.01}, 0.2), "medium": TierFit(0.05, {}, 0.05)})
    steps = small.stats().num_steps
    idle = router(quality=pred, always_probe=False)
    d = await idle.route(dep, tok.encode(CODE), SamplingParams(max_tokens=4), "auto", RoutingHints())
    assert d.tier == "large" and "lambda is 0" in d.probe["skipped"] and d.probe["difficulty"] is None
    assert small.stats().num_steps == steps  # no probe prefill ran
    # a predictor that reads no model signal never needs the prefill
    blind = router(quality=QualityPredictor({"small": TierFit(0.2, {}, 0.2), "medium": TierFit(0.1, {}, 0.1)}),
                   always_probe=False)
    d = await blind.route(dep, tok.encode(CODE), SamplingParams(max_tokens=4), "auto", RoutingHints(max_latency_ms=1.0))
    assert "no signal" in d.probe["skipped"]
    # an SLO the top tier misses: the difficulty could decide between the others, so it is measured
    d = await router(quality=pred, always_probe=False, probe_max_ms=1e6).route(
        dep, tok.encode(CODE), SamplingParams(max_tokens=4), "auto", RoutingHints(max_latency_ms=1e-3))
    assert d.probe["difficulty"] is not None and "skipped" not in d.probe


# ----- Deployment.submit: the server's one way in -----------------------------------------------
class _InFlight:
    """Delegates to a real router and records how many routes were in flight at once."""

    def __init__(self, inner) -> None:
        self.inner, self.now, self.peak = inner, 0, 0

    async def route(self, *args):
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            return await self.inner.route(*args)
        finally:
            self.now -= 1


async def test_submit_probes_a_batch_concurrently_validates_once_and_keeps_order(dep, monkeypatch):
    from sizewise.engine.core import EngineCore

    tok = dep.tokenizer()
    texts = [CODE, PROSE * 2, "import os\n", PROSE + CODE]
    prompts = [Prompt(tok.encode(t), t) for t in texts]
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    alone = [await router().route(dep, p.ids, params, "auto", RoutingHints()) for p in prompts]
    calls = []
    real_validate = EngineCore.validate

    def validate(self, ids, p, *a, **k):
        if p is params:  # this request's, not a probe's own
            calls.append(self.name)
        return real_validate(self, ids, p, *a, **k)

    monkeypatch.setattr(EngineCore, "validate", validate)
    spy = _InFlight(router())
    monkeypatch.setattr(dep, "router", spy)
    subs = await dep.submit("batch", prompts, params)
    assert spy.peak == len(prompts)  # every prompt's probe was in flight at once, not one after another
    assert [s.request_id for s in subs] == [f"batch-{i}" for i in range(len(prompts))]
    assert [s.index for s in subs] == list(range(len(prompts)))
    # in prompt order: each prompt's decision is the one it gets alone (the probe reads the same text)
    assert [s.decision.probe["difficulty"] for s in subs] == pytest.approx([d.probe["difficulty"] for d in alone])
    assert sorted(calls) == sorted(s.decision.model for s in subs)  # validated once each, where it was routed
    for s in subs:
        got = [t async for delta in s for o in delta.outputs for t in o.token_ids]
        assert len(got) == 3


async def test_submit_queues_all_prompts_or_none(dep):
    tok = dep.tokenizer()
    good = Prompt(tok.encode(CODE), CODE)
    bad = Prompt(tok.encode(PROSE) + [10**6])
    before = {n: c.stats().generation_tokens_total for n, c in dep.cores.items()}
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        await dep.submit("mixed", [good, good, bad], SamplingParams(max_tokens=2))
    st = dep.stats()
    assert (st.num_running, st.num_waiting) == (0, 0)  # the two valid prompts were never queued
    assert {n: c.stats().generation_tokens_total for n, c in dep.cores.items()} == before
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        await dep.submit("none", [], SamplingParams())
    # the same id is free again: nothing of the refused request is left in the engine
    subs = await dep.submit("mixed", [good], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len([t async for d in subs[0] for o in d.outputs for t in o.token_ids]) == 2
