"""The routing policy under scripted telemetry (inputs to the real policy), and the probe's
model-free signals (copyability replayed against a hand-checked PLD, intent features)."""

from __future__ import annotations

import pytest

from sizewise.orchestrator.config import PolicyConfig
from sizewise.orchestrator.policy import Policy, PolicySettings
from sizewise.orchestrator.probe import ProbeResult, copyability, intent_features
from sizewise.orchestrator.telemetry import EngineTelemetry, TelemetrySnapshot

TIERS = {"small": "m-s", "medium": "m-m", "large": "m-l"}


def engine(name: str, tier: str, *, fixed_ms: float = 1.0, per_token_ms: float = 0.01, running: int = 0,
           waiting: int = 0, kv_used: int = 0, kv_total: int = 1000, acceptance: dict | None = None) -> EngineTelemetry:
    return EngineTelemetry(
        name=name, tier=tier, weight_bytes=10**6, kv_bytes_per_token=1024, block_size=16, max_num_seqs=8,
        max_num_batched_tokens=512, max_model_len=1024, num_running=running, num_waiting=waiting,
        kv_blocks_used=kv_used, kv_blocks_total=kv_total, num_steps=10, step_seconds=fixed_ms / 1e3,
        step_fixed_seconds=fixed_ms / 1e3, step_seconds_per_token=per_token_ms / 1e3, bytes_per_step=1e6,
        achieved_bandwidth=1e9, bandwidth_utilization=0.1, avg_prompt_tokens=64.0, avg_output_tokens=32.0,
        spec_acceptance=acceptance or {}, calibrated=True,
    )


def snapshot(**per_tier) -> TelemetrySnapshot:
    """Idle engines (small fastest) unless a tier is given overrides."""
    base = {"small": dict(fixed_ms=1.0), "medium": dict(fixed_ms=3.0), "large": dict(fixed_ms=9.0)}
    engines = {m: engine(m, t, **{**base[t], **per_tier.get(t, {})}) for t, m in TIERS.items()}
    return TelemetrySnapshot(engines=engines, peak_bandwidth=1e10, achieved_bandwidth=1e9, bandwidth_utilization=0.1)


def probe(difficulty: float | None, intent: str = "chat", copy: float = 0.0, ms: float = 2.0) -> ProbeResult:
    return ProbeResult(intent=intent, intent_confidence=1.0, intent_scores={intent: 1.0}, intent_source="features",
                       copyability=copy, repeat_fraction=copy, prompt_tokens=64, difficulty=difficulty, ms=ms)


def decide(policy: Policy, p, snap, **kw):
    kw.setdefault("prompt_tokens", 64)
    kw.setdefault("max_new_tokens", 32)
    return policy.decide(p, snap, **kw)


@pytest.fixture
def policy() -> Policy:
    return Policy(PolicySettings(max_difficulty_small=2.0, max_difficulty_medium=3.0), TIERS)


# ----- tier from the probe ---------------------------------------------------------------
@pytest.mark.parametrize("nll,tier,reason", [(1.5, "small", "probe:easy"), (2.5, "medium", "probe:moderate"),
                                             (4.0, "large", "probe:hard")])
def test_difficulty_picks_cheapest_tier_meeting_the_need(policy, nll, tier, reason):
    c = decide(policy, probe(nll), snapshot())
    assert (c.tier, c.model, c.reason, c.strategy) == (tier, TIERS[tier], reason, "plain")


def test_intent_bias_and_copyability_shift_the_score():
    s = PolicySettings(max_difficulty_small=2.0, max_difficulty_medium=3.0, intent_bias={"math": 1.0}, copy_weight=2.0)
    pol = Policy(s, TIERS)
    assert decide(pol, probe(1.5, intent="math"), snapshot()).tier == "medium"  # 1.5 + 1.0
    assert decide(pol, probe(3.5, copy=0.5), snapshot()).tier == "medium"  # 3.5 - 1.0
    assert decide(pol, probe(3.5, copy=0.9), snapshot()).tier == "small"  # 3.5 - 1.8


def test_missing_tier_rounds_up_and_missing_difficulty_counts_as_moderate():
    pol = Policy(PolicySettings(max_difficulty_small=2.0, max_difficulty_medium=3.0), {"small": "m-s", "large": "m-l"})
    snap = snapshot()
    snap.engines.pop("m-m")
    c = decide(pol, probe(2.5), snap)
    assert (c.tier, c.reason) == ("large", "probe:moderate")
    full = Policy(PolicySettings(max_difficulty_small=2.0, max_difficulty_medium=3.0), TIERS)
    assert decide(full, probe(None), snapshot()).tier == "medium"


# ----- load: KV pressure and queue ----------------------------------------------------------
def test_high_kv_pressure_moves_requests_down(policy):
    c = decide(policy, probe(4.0), snapshot(large=dict(kv_used=950)))
    assert (c.tier, c.reason) == ("medium", "kv_pressure:down")
    assert c.steps == ["probe:hard", "kv_pressure:down"]
    assert c.kv_pressure["large"] > 0.9 > c.kv_pressure["medium"]
    # both larger tiers full: down to small
    c = decide(policy, probe(4.0), snapshot(large=dict(kv_used=950), medium=dict(kv_used=990)))
    assert (c.tier, c.reason) == ("small", "kv_pressure:down")
    # the cheapest tier full and nothing below: up
    c = decide(policy, probe(1.0), snapshot(small=dict(kv_used=999)))
    assert (c.tier, c.reason) == ("medium", "kv_pressure:up")


def test_queue_threshold_moves_up_first_then_down():
    def pol(ms):
        return Policy(PolicySettings(max_difficulty_small=2.0, max_difficulty_medium=3.0, queue_high_ms=ms), TIERS)

    # small is swamped (24 in its queue: 3 batches deep); medium fits even though each of its
    # steps now also waits for one of small's (round-robin) -> up, better quality too
    c = decide(pol(200.0), probe(1.0), snapshot(small=dict(running=8, waiting=16, fixed_ms=2.0)))
    assert (c.tier, c.reason) == ("medium", "queue:up")
    assert c.estimates_ms["small"] > 200.0 >= c.estimates_ms["medium"]
    # large is swamped, nothing above: down
    c = decide(pol(400.0), probe(4.0), snapshot(large=dict(running=8, waiting=30, fixed_ms=4.0)))
    assert (c.tier, c.reason) == ("medium", "queue:down")
    assert c.estimates_ms["large"] > 400.0 >= c.estimates_ms["medium"]
    # under the threshold nothing moves
    assert decide(pol(10_000.0), probe(4.0), snapshot(large=dict(running=8, waiting=30))).tier == "large"


def test_pinned_requests_never_move(policy):
    hot = snapshot(large=dict(kv_used=999, running=8, waiting=100, fixed_ms=500.0))
    c = decide(policy, probe(0.1), hot, pinned="m-l", max_latency_ms=1.0)
    assert (c.model, c.tier, c.reason, c.steps) == ("m-l", "large", "pinned", ["pinned"])


# ----- client latency budget -----------------------------------------------------------------
def test_max_latency_ms_is_honoured_preferring_quality(policy):
    snap = snapshot(large=dict(fixed_ms=20.0), medium=dict(fixed_ms=5.0), small=dict(fixed_ms=1.0))
    est = decide(policy, probe(4.0), snap).estimates_ms
    assert est["small"] < est["medium"] < est["large"]
    # the probe's choice fits: kept
    c = decide(policy, probe(4.0), snap, max_latency_ms=est["large"] + 10)
    assert (c.tier, c.reason) == ("large", "probe:hard")
    # large does not fit, medium does: medium (best quality that fits), not small
    budget = (est["medium"] + est["large"]) / 2
    c = decide(policy, probe(4.0), snap, max_latency_ms=budget)
    assert (c.tier, c.reason) == ("medium", "latency_budget")
    # the probe already spent 2 ms of the budget: large no longer fits 1 ms above its estimate
    assert decide(policy, probe(4.0, ms=2.0), snap, max_latency_ms=est["large"] + 1.0).tier == "medium"
    assert decide(policy, probe(4.0, ms=0.5), snap, max_latency_ms=est["large"] + 1.0).tier == "large"
    # nothing fits: the fastest, flagged best effort
    c = decide(policy, probe(4.0), snap, max_latency_ms=0.5)
    assert (c.tier, c.reason) == ("small", "latency_budget:best_effort")


def test_latency_estimate_counts_queue_and_the_other_engines_turns(policy):
    idle = snapshot()
    base = Policy.estimate_ms(idle, "m-m", 64, 32)
    # others busy: each medium step also waits one small and one large step (round-robin)
    assert Policy.estimate_ms(snapshot(small=dict(running=2), large=dict(running=2)), "m-m", 64, 32) > base
    # a queue beyond max_num_seqs waits for a batch to finish
    deep = Policy.estimate_ms(snapshot(medium=dict(running=8, waiting=8)), "m-m", 64, 32)
    assert deep > base + 30 * 3.0  # at least one more output length of 3 ms steps
    assert Policy.estimate_ms(idle, "m-m", 64, 64) > base


# ----- strategy ----------------------------------------------------------------------------------
def test_strategy_auto_is_plain_unless_engine_takes_strategies(policy):
    p = probe(1.0, copy=0.8)
    assert decide(policy, p, snapshot()).strategy == "plain"
    both = {m: {"plain", "pld", "draft"} for m in TIERS.values()}
    c = decide(policy, p, snapshot(), strategies=both)
    assert (c.strategy, c.reason) == ("pld", "probe:easy")
    # measured acceptance too low, or a big batch: speculation does not pay
    assert decide(policy, p, snapshot(small=dict(acceptance={"pld": 0.1})), strategies=both).strategy == "plain"
    assert decide(policy, p, snapshot(small=dict(running=8, waiting=4)), strategies=both).strategy == "plain"
    # the client's explicit strategy is passed through, pinned or not
    assert decide(policy, p, snapshot(), strategy="draft").strategy == "draft"
    drafting = Policy(PolicySettings(max_difficulty_small=2.0, max_difficulty_medium=3.0, allow_draft=True), TIERS)
    assert decide(drafting, probe(4.0), snapshot(), strategies=both).strategy == "draft"


def test_policy_config_validates_at_the_edge():
    s = PolicyConfig.model_validate({"router": "adaptive", "max_difficulty": {"small": 1.0, "medium": 2.0},
                                     "intent_bias": {"math": 0.5}}).to_settings()
    assert (s.max_difficulty_small, s.intent_bias["math"], s.intent_bias["code"]) == (1.0, 0.5, 0.0)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="kv_high"):
        PolicyConfig.model_validate({"kv_high": 1.5})
    with pytest.raises(ValidationError, match="intent_bias"):
        PolicyConfig.model_validate({"intent_bias": {"poetry": 1.0}})


# ----- probe signals without a model ---------------------------------------------------------------
def _pld_reference(ids, max_n, min_n):
    """Straightforward PLD replay: search backwards for the latest earlier match of the longest
    suffix n-gram, predict the token after it."""
    hits = 0
    for i in range(min_n, len(ids)):
        pred = None
        for n in range(min(max_n, i), min_n - 1, -1):
            suffix = ids[i - n:i]
            for j in range(i - n - 1, -1, -1):
                if ids[j:j + n] == suffix:
                    pred = ids[j + n]
                    break
            if pred is not None:
                break
        hits += pred == ids[i]
    return hits / (len(ids) - min_n)


def test_copyability_matches_a_plain_prompt_lookup_replay():
    import random

    rng = random.Random(0)
    cases = [[1, 2, 3, 4] * 6, [rng.randrange(50) for _ in range(80)], list(range(40)),
             [rng.randrange(4) for _ in range(60)], [5, 6, 7, 5, 6, 8, 5, 6, 7, 5, 6, 7, 9]]
    for ids in cases:
        got, _ = copyability(ids, max_n=3, min_n=2)
        assert got == pytest.approx(_pld_reference(ids, 3, 2))
    assert copyability(list(range(40)))[0] == 0.0
    assert copyability([1, 2, 3, 4] * 6)[0] > 0.8
    assert copyability([7]) == (0.0, 0.0)


@pytest.mark.parametrize("text,intent", [
    ("def parse(self, line):\n    if not line:\n        return None\n    return line.split(',')\n", "code"),
    ("Compute 17 * 23 + 4 = ? and solve 3x + 5 = 20 for x.", "math"),
    ("What is the difference between a tuple and a list in Python? Explain how slicing works.", "knowledge"),
    ("hi! thanks so much, can you help me? i think i'm lost lol", "chat"),
])
def test_intent_features(text, intent):
    scores = intent_features(text)
    assert max(scores, key=scores.get) == intent
    assert sum(scores.values()) == pytest.approx(1.0)


# ----- threshold calibration ---------------------------------------------------------------------------
def test_fitted_thresholds_route_within_tolerance_at_least_cost():
    import itertools
    import random

    from sizewise.orchestrator.calibrate import fit_thresholds

    rng = random.Random(1)
    scores = [rng.uniform(0.0, 6.0) for _ in range(40)]
    # the larger tiers help more the harder the request; noise keeps it from being a clean cut
    nll = {"large": [1.0 + 0.5 * s + rng.uniform(0, 0.1) for s in scores]}
    nll["medium"] = [q + 0.04 * s * s + rng.uniform(0, 0.1) for q, s in zip(nll["large"], scores)]
    nll["small"] = [q + 0.10 * s * s + rng.uniform(0, 0.1) for q, s in zip(nll["large"], scores)]
    cost = {"small": 1.0, "medium": 3.0, "large": 9.0}
    cal = fit_thresholds(scores, nll, cost, tolerance=0.03)

    def routed(ts: float, tm: float) -> tuple[float, float]:
        pol = Policy(PolicySettings(max_difficulty_small=ts, max_difficulty_medium=tm, copy_weight=0.0), TIERS)
        tiers = [pol.base_tier(s)[0] for s in scores]
        q = sum(nll[t][i] for i, t in enumerate(tiers)) / len(scores)
        return q, sum(cost[t] for t in tiers) / len(scores) / cost["large"]

    q, c = routed(cal.max_difficulty_small, cal.max_difficulty_medium)
    assert (q, c) == (pytest.approx(cal.nll), pytest.approx(cal.cost))
    assert q <= cal.nll_large * 1.03
    assert 0 < cal.shares["small"] and 0 < cal.shares["medium"] and c < 0.9
    # no pair of observed scores does better within the tolerance (brute force through the policy)
    grid = sorted(scores)
    for ts, tm in itertools.combinations_with_replacement([-1.0] + grid, 2):
        q2, c2 = routed(ts, tm)
        if q2 <= cal.nll_large * 1.03:
            assert c2 >= c - 1e-9


def test_fit_policy_finds_the_intent_bias_the_data_calls_for():
    import random

    from sizewise.orchestrator.calibrate import fit_policy, fit_thresholds

    rng = random.Random(2)
    probes, nll = [], {"small": [], "medium": [], "large": []}
    for i in range(60):
        prose = i % 2 == 1
        d = rng.uniform(3.0, 5.0)
        probes.append((d, "knowledge" if prose else "code", 0.0))
        nll["large"].append(4.0)
        # at equal difficulty, prose loses far more off the large model than code does
        nll["medium"].append(4.0 + (0.6 if prose else 0.05 * (d - 3.0)))
        nll["small"].append(4.0 + (1.5 if prose else 0.6))
    cost = {"small": 1.0, "medium": 3.0, "large": 9.0}
    fit = fit_policy(probes, nll, cost, tolerance=0.03)
    plain = fit_thresholds([p[0] for p in probes], nll, cost, tolerance=0.03)
    assert fit.intent_bias["knowledge"] > 0 and fit.intent_bias["code"] == 0.0
    assert fit.calibration.cost < plain.cost
    assert fit.calibration.nll <= fit.calibration.nll_large * 1.03


def test_oracle_routing_is_the_cheapest_within_tolerance_up_to_one_request():
    import itertools
    import random

    from sizewise.orchestrator.calibrate import fit_thresholds, oracle_routing

    rng = random.Random(3)
    n = 8
    nll = {"large": [rng.uniform(2.0, 5.0) for _ in range(n)]}
    nll["medium"] = [q + rng.choice([0.0, 0.02, 0.6]) for q in nll["large"]]
    nll["small"] = [q + rng.choice([0.01, 0.3, 1.5]) for q in nll["medium"]]
    cost = {"small": 1.0, "medium": 3.0, "large": 9.0}
    orc = oracle_routing(nll, cost, tolerance=0.03)
    limit = orc.nll_large * 1.03
    mean = lambda a: sum(nll[t][i] for i, t in enumerate(a)) / n  # noqa: E731
    assert mean(orc.tiers) == pytest.approx(orc.nll) and orc.nll <= limit
    assert orc.cost == pytest.approx(sum(cost[t] / 9.0 for t in orc.tiers) / n)
    best = min(sum(cost[t] for t in a) / 9.0 / n for a in itertools.product(cost, repeat=n) if mean(a) <= limit)
    assert best <= orc.cost <= best + (9.0 - 1.0) / 9.0 / n + 1e-9
    # knowing each request's NLL, it is never (by more than that one move) worse than the best
    # pair of probe thresholds, whatever the scores
    for _ in range(20):
        scores = [rng.uniform(0, 1) for _ in range(n)]
        assert orc.cost <= fit_thresholds(scores, nll, cost, tolerance=0.03).cost + (9.0 - 1.0) / 9.0 / n + 1e-9


# ----- consolidation -------------------------------------------------------------------------------------
def test_an_idle_cheap_tier_is_not_woken_while_a_better_busy_one_has_room(policy):
    busy_large = snapshot(large=dict(running=3))  # 3 of 8 slots used; small and medium idle
    c = decide(policy, probe(1.0), busy_large)
    assert (c.tier, c.reason, c.steps) == ("large", "consolidate:up", ["probe:easy", "consolidate:up"])
    assert c.estimates_ms["large"] <= c.estimates_ms["small"]
    assert policy.probe_is_moot(busy_large, 64, 32)
    # the better tier's batch is full: the cheap tier is worth waking
    full = snapshot(large=dict(running=6, waiting=2))
    assert decide(policy, probe(1.0), full).tier == "small" and not policy.probe_is_moot(full, 64, 32)
    # the cheap tier is busy anyway: no cost to avoid
    both = snapshot(large=dict(running=3), small=dict(running=1))
    assert decide(policy, probe(1.0), both).tier == "small" and not policy.probe_is_moot(both, 64, 32)
    # medium busy, large idle: an easy request joins medium, not large
    c = decide(policy, probe(1.0), snapshot(medium=dict(running=2)))
    assert (c.tier, c.reason) == ("medium", "consolidate:up")
    # switched off
    off = Policy(PolicySettings(max_difficulty_small=2.0, max_difficulty_medium=3.0, consolidate=False), TIERS)
    assert decide(off, probe(1.0), busy_large).tier == "small" and not off.probe_is_moot(busy_large, 64, 32)
    # pinned still never moves
    assert decide(policy, probe(1.0), busy_large, pinned="m-s").tier == "small"
