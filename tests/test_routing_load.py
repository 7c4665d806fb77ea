"""Routing under load, end to end: the fair share of device time between busy engines, and a
scripted overload on the demo family in which `auto` moves requests off the top tier while every
request still gets exactly what the same request gets served alone on its tier."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sizewise import SamplingParams, demo
from sizewise.engine.async_engine import FairShare
from sizewise.orchestrator.deployment import Deployment, DeploymentConfig
from sizewise.orchestrator.types import RoutingHints

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def test_fair_share_gives_busy_engines_equal_device_time():
    share = FairShare(["small", "large"])
    cost = {"small": 0.001, "large": 0.009}  # seconds per step
    steps = {"small": 0, "large": 0}
    share.wake(["small", "large"])
    for _ in range(1000):
        name = share.pick(["small", "large"])
        steps[name] += 1
        share.charge(name, cost[name])
    # equal time: the engine with 9x cheaper steps takes 9x as many (round robin would take 1:1)
    assert steps["small"] == pytest.approx(9 * steps["large"], rel=0.02)
    assert abs(share.used["small"] - share.used["large"]) <= cost["large"]


def test_an_engine_that_wakes_banks_no_credit_for_its_idle_spell():
    share = FairShare(["a", "b"])
    share.wake(["a"])
    for _ in range(100):
        share.charge(share.pick(["a"]), 0.01)
    share.wake(["a", "b"])  # b wakes after a used 1 s alone: it does not get 1 s in a row
    picks = []
    for _ in range(10):
        name = share.pick(["a", "b"])
        picks.append(name)
        share.charge(name, 0.01)
    assert picks.count("a") >= 4


@pytest.fixture(scope="module")
def dep():
    cfg = DeploymentConfig.from_yaml(CONFIG)
    cfg = cfg.model_copy(update={"memory_fraction": 0.05,
                                 "engine": cfg.engine.model_copy(update={"max_num_seqs": 8, "max_model_len": 512})})
    d = Deployment.load(cfg, echo_plan=False)
    yield d
    d.shutdown()


async def _serve(dep, rid: str, ids: list[int], params: SamplingParams, model: str, strategy: str = "plain"):
    out: list[int] = []
    async for delta in await dep.engine.add_request(rid, ids, params, core=model, strategy=strategy):
        for o in delta.outputs:
            out.extend(o.token_ids)
    return out


async def test_overload_moves_auto_off_the_top_tier_and_every_output_is_what_its_tier_gives_alone(dep):
    assert dep.engine.discipline == "fair"
    tok = dep.tokenizer()
    items = demo_prompts(tok, 40)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def one(i: int, ids: list[int], slo: float | None):
        d = await dep.route(ids, params, "auto", RoutingHints(max_latency_ms=slo))
        return d, await _serve(dep, f"load-{slo is None}-{i}", ids, params, d.model, d.strategy)

    # idle, one at a time: the top tier, at no price
    idle = [await one(i, ids, None) for i, ids in enumerate(items[:4])]
    assert all(d.tier == "large" and d.reason == "objective:quality" for d, _ in idle)
    alone_ms = idle[-1][0].explain["tiers"]["large"]["latency_ms"]
    # a burst of every request at once, each asking for 3x what large takes unloaded
    burst = await asyncio.gather(*(one(i, ids, 3 * alone_ms) for i, ids in enumerate(items)))
    tiers = [d.tier for d, _ in burst]
    assert tiers.count("large") < len(tiers) and tiers.count("large") > 0
    assert {d.reason for d, _ in burst} - {"objective:quality", "objective:price", "slo", "slo:best_effort"} == set()
    assert max(d.explain["lambda_nats_per_gb"] for d, _ in burst) > 0
    # every request, served again alone on the tier it got, gives the same greedy tokens
    for i, (ids, (d, out)) in enumerate(zip(items, burst)):
        assert len(out) == params.max_tokens
        assert out == await _serve(dep, f"alone-{i}", ids, params, d.model), (i, d.tier)


def demo_prompts(tok, n: int) -> list[list[int]]:
    """Held-out windows of code and prose, 48 tokens each."""
    s = demo.split()
    texts = [demo.read_code(r) for r in s.held_out_code[:6]] + [demo.prose_topics()[k] for k in s.held_out_prose[:6]]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts if t]
    ids = [x for x in ids if len(x) >= 400]
    return [ids[i % len(ids)][48 * (i // len(ids)):48 * (i // len(ids)) + 48] for i in range(n)]
