"""The capacity plan as a pure function: scripted step-cost lines and arrival rates in, tiers and
shares out. The expected answers follow from the device model's closed form (turn = F / (1 - rho)),
computed here independently for the cases that pin a number."""

import math

import pytest

from sizewise.orchestrator.plan import PlanInputs, TierCost, assign, make_plan

# An accelerator-like family: steps dominated by the weight stream (fixed), little per row.
ACCEL = {
    "small": TierCost(fixed_s=0.002, row_s=0.00005, prefill_token_s=0.000002, loss=0.30),
    "medium": TierCost(fixed_s=0.004, row_s=0.00010, prefill_token_s=0.000004, loss=0.12),
    "large": TierCost(fixed_s=0.010, row_s=0.00025, prefill_token_s=0.000010, loss=0.0),
}
SLO = 1.0


def plan_at(rate, tiers=ACCEL, **kw):
    return make_plan(PlanInputs(tiers=tiers, auto_rate=rate, prompt_tokens=96, output_tokens=32, slo_s=SLO, **kw))


def large_capacity(tiers=ACCEL):
    # the auto rate at which large alone reaches its cap: min(target, 1 - 33 F / SLO) / w
    t = tiers["large"]
    cap = min(0.85, 1 - 33 * t.fixed_s / SLO)
    return cap / t.work(96, 32)


def test_idle_and_headroom_take_the_top_tier_alone():
    assert plan_at(0.0).shares == {"large": 1.0} and plan_at(0.0).reason == "idle"
    p = plan_at(0.5 * large_capacity())
    assert p.shares == {"large": 1.0} and p.reason == "headroom" and p.active == ("large",)
    # the predicted turn is the closed form F / (1 - rho)
    w = ACCEL["large"].work(96, 32)
    rho = 0.5 * large_capacity() * w
    assert p.utilization == pytest.approx(rho)
    assert p.turn_s == pytest.approx(0.010 / (1 - rho))


def test_intermediate_load_mixes_two_adjacent_tiers_at_the_cap():
    p = plan_at(1.3 * large_capacity())
    assert set(p.shares) == {"medium", "large"}, p
    assert sum(p.shares.values()) == pytest.approx(1.0)
    # the mix fills the cap exactly: the most of large the SLO allows with two streams per turn
    assert p.utilization == pytest.approx(p.util_cap)
    assert p.util_cap == pytest.approx(min(0.85, 1 - 33 * (0.004 + 0.010) / SLO))
    assert p.latency_s["large"] <= SLO + 1e-9
    assert p.loss == pytest.approx(p.shares["medium"] * 0.12)


def test_overload_takes_the_cheapest_tier_alone():
    p = plan_at(100 * large_capacity())
    assert p.shares == {"small": 1.0} and p.reason == "overload"


def test_shares_are_monotone_in_load():
    prev = None
    seen = set()
    for k in range(1, 400):
        p = plan_at(k * large_capacity() / 40)
        seen.add(tuple(p.order))
        assert len(p.order) <= 2
        cum = [sum(p.shares.get(t, 0.0) for t in ("small", "medium", "large")[:i + 1]) for i in range(3)]
        if prev is not None:  # the share of cheaper tiers never falls as load rises
            assert all(c >= q - 1e-9 for c, q in zip(cum, prev)), (k, p.shares)
        prev = cum
    # every regime appears along the way, mixes only between adjacent tiers
    assert {("large",), ("medium", "large"), ("medium",), ("small", "medium"), ("small",)} <= seen
    assert ("small", "large") not in seen


def test_a_measured_interleaving_cost_keeps_the_plan_to_one_tier():
    # a CPU whose caches hold one tier's weights: a step after another tier's costs far more
    cpu = {t: TierCost(c.fixed_s, c.row_s, c.prefill_token_s, c.loss, switch_s=0.02) for t, c in ACCEL.items()}
    for k in range(1, 200):
        p = plan_at(k * large_capacity(cpu) / 40, tiers=cpu)
        assert len(p.order) == 1, p


def test_pinned_traffic_is_load_the_plan_counts():
    rate = 0.8 * large_capacity()
    assert plan_at(rate).shares == {"large": 1.0}
    # pinned requests on large at half its capacity: auto at 0.8x no longer fits on large alone
    p = plan_at(rate, pinned_rate={"large": 0.5 * large_capacity()})
    assert p.shares.get("large", 0.0) < 1.0
    assert "large" in p.active  # the device steps large for the pinned traffic anyway
    # pinned small traffic makes small active: its stream is paid, so the turn includes it
    q = plan_at(0.1, pinned_rate={"small": 0.1})
    assert q.active == ("small", "large") and q.shares == {"large": 1.0}
    assert q.turn_s > plan_at(0.1).turn_s


def test_measured_latency_bias_tightens_the_plan():
    rate = 0.8 * large_capacity()
    slow = dict(ACCEL, large=TierCost(0.010, 0.00025, 0.000010, 0.0, bias=3.0))
    assert plan_at(rate).shares == {"large": 1.0}
    assert plan_at(rate, tiers=slow).shares.get("large", 0.0) < 1.0


def test_requests_fill_the_shares_by_rank():
    p = plan_at(1.3 * large_capacity())
    sm = p.shares["medium"]
    assert assign(p, 0.0) == "medium"
    assert assign(p, sm - 1e-6) == "medium"
    assert assign(p, sm + 1e-6) == "large"
    assert assign(p, 0.999999) == "large"


def test_bad_rate_is_refused():
    with pytest.raises(ValueError, match="auto_rate"):
        plan_at(math.nan)
