"""The routing policy under scripted telemetry (inputs to the real policy): one objective (predicted
loss + lam * bytes under the SLO), the load price lam, the quality predictor and its YAML form; and
the probe's model-free signals (copyability replayed against a hand-checked PLD, intent features)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from sizewise.orchestrator.config import PolicyConfig
from sizewise.orchestrator.policy import REASONS, Policy, PolicySettings, QualityPredictor, TierFit
from sizewise.orchestrator.probe import ProbeResult, copyability, intent_features
from sizewise.orchestrator.telemetry import EngineTelemetry, TelemetrySnapshot

TIERS = {"small": "m-s", "medium": "m-m", "large": "m-l"}


def engine(name: str, tier: str, *, fixed_ms: float = 1.0, per_token_ms: float = 0.01, running: int = 0,
           waiting: int = 0, kv_used: int = 0, kv_total: int = 1000, acceptance: dict | None = None,
           weight_bytes: int = 10**6) -> EngineTelemetry:
    return EngineTelemetry(
        name=name, tier=tier, weight_bytes=weight_bytes, kv_bytes_per_token=1024, block_size=16, max_num_seqs=8,
        max_num_batched_tokens=512, max_model_len=1024, num_running=running, num_waiting=waiting,
        kv_blocks_used=kv_used, kv_blocks_total=kv_total, num_steps=10, step_seconds=fixed_ms / 1e3,
        step_fixed_seconds=fixed_ms / 1e3, step_seconds_per_token=per_token_ms / 1e3, bytes_per_step=1e6,
        achieved_bandwidth=1e9, bandwidth_utilization=0.1, avg_prompt_tokens=64.0, avg_output_tokens=32.0,
        spec_acceptance=acceptance or {}, calibrated=True,
    )


def snapshot(**per_tier) -> TelemetrySnapshot:
    """Idle engines (small fastest) unless a tier is given overrides."""
    base = {"small": dict(fixed_ms=1.0, weight_bytes=10**6), "medium": dict(fixed_ms=3.0, weight_bytes=3 * 10**6),
            "large": dict(fixed_ms=9.0, weight_bytes=9 * 10**6)}
    engines = {m: engine(m, t, **{**base[t], **per_tier.get(t, {})}) for t, m in TIERS.items()}
    return TelemetrySnapshot(engines=engines, peak_bandwidth=1e10, achieved_bandwidth=1e9, bandwidth_utilization=0.1)


def probe(difficulty: float | None, intent: str = "chat", copy: float = 0.0, ms: float = 2.0) -> ProbeResult:
    return ProbeResult(intent=intent, intent_confidence=1.0, intent_scores={intent: 1.0}, intent_source="features",
                       copyability=copy, repeat_fraction=copy, prompt_tokens=64, difficulty=difficulty, ms=ms)


def decide(policy: Policy, p, snap, **kw):
    kw.setdefault("prompt_tokens", 64)
    kw.setdefault("max_new_tokens", 32)
    return policy.decide(p, snap, **kw)


# A predictor as calibration would fit it: the gap to large grows with the small model's surprise.
PRED = QualityPredictor({"small": TierFit(-0.4, {"difficulty": 0.3}, 0.5),
                         "medium": TierFit(-0.2, {"difficulty": 0.15}, 0.25)})
EASY, HARD = 2.0, 5.0  # difficulty: small's gap 0.2 vs 1.1, medium's 0.1 vs 0.55


@pytest.fixture
def policy() -> Policy:
    return Policy(PolicySettings(quality=PRED, slo_ms=2000.0), TIERS)


def loaded(queue: int) -> TelemetrySnapshot:
    """Load as traffic brings it: the top tier with `queue` sequences in flight (a full batch
    running, the rest waiting), the cheaper tiers serving a few each."""
    few = min(queue, 4)
    return snapshot(large=dict(running=min(queue, 8), waiting=max(queue - 8, 0)), medium=dict(running=few),
                    small=dict(running=few))


# ----- the objective ---------------------------------------------------------------------
@pytest.mark.parametrize("difficulty", [EASY, HARD, None])
def test_idle_deployment_prices_bandwidth_at_zero_and_serves_the_top_tier(policy, difficulty):
    c = decide(policy, probe(difficulty), snapshot())
    assert (c.tier, c.model, c.reason, c.lam, c.strategy) == ("large", "m-l", "objective:quality", 0.0, "plain")
    assert c.loss["large"] == 0.0 and c.loss["small"] > c.loss["medium"] > 0
    assert c.cost_bytes["small"] < c.cost_bytes["medium"] < c.cost_bytes["large"]
    assert policy.probe_is_moot(snapshot(), 64, 32)  # nothing the probe says could move it


def test_easy_requests_move_down_before_hard_ones_as_load_rises(policy):
    first_move = {}
    lams = []
    for queue in range(0, 80):
        snap = loaded(queue)
        for name, d in (("easy", EASY), ("hard", HARD)):
            c = decide(policy, probe(d), snap)
            if c.tier != "large":
                first_move.setdefault(name, queue)
                if c.latency_ms["large"] <= 2000.0 - 2.0:  # the top tier still met the SLO: the price moved it
                    assert c.reason == "objective:price"
        lams.append(decide(policy, probe(EASY), snap).lam)
    assert lams[0] == 0.0 and all(b >= a for a, b in zip(lams, lams[1:])) and lams[-1] > 0
    assert first_move["easy"] < first_move["hard"]


def test_the_slo_excludes_tiers_that_would_miss_it(policy):
    snap = snapshot(large=dict(fixed_ms=20.0), medium=dict(fixed_ms=5.0), small=dict(fixed_ms=1.0))
    lat = decide(policy, probe(HARD), snap).latency_ms
    assert lat["small"] < lat["medium"] < lat["large"]
    c = decide(policy, probe(HARD), snap, max_latency_ms=(lat["medium"] + lat["large"]) / 2)
    assert (c.tier, c.reason, c.slo_ms) == ("medium", "slo", (lat["medium"] + lat["large"]) / 2)
    # the probe's own time counts against the request's budget
    assert decide(policy, probe(HARD, ms=2.0), snap, max_latency_ms=lat["large"] + 1.0).tier == "medium"
    assert decide(policy, probe(HARD, ms=0.5), snap, max_latency_ms=lat["large"] + 1.0).tier == "large"


def test_an_slo_no_tier_can_meet_picks_the_fastest(policy):
    snap = snapshot(large=dict(fixed_ms=20.0), medium=dict(fixed_ms=5.0), small=dict(fixed_ms=1.0))
    c = decide(policy, probe(HARD), snap, max_latency_ms=0.5)
    assert (c.tier, c.reason) == ("small", "slo:best_effort")
    # fastest is what the latency model says, not the smallest: a deep queue on small
    slow_small = snapshot(small=dict(fixed_ms=1.0, running=8, waiting=200), medium=dict(fixed_ms=5.0))
    c = decide(policy, probe(HARD), slow_small, max_latency_ms=0.5)
    assert c.tier == min(c.latency_ms, key=c.latency_ms.get) != "small"


def test_a_full_kv_cache_excludes_its_tier(policy):
    c = decide(policy, probe(HARD), snapshot(large=dict(kv_used=950)))
    assert (c.tier, c.reason) == ("medium", "kv_pressure")
    assert c.kv_pressure["large"] > 0.9


@pytest.mark.parametrize("snap", [snapshot(), loaded(150), snapshot(large=dict(kv_used=999, fixed_ms=500.0))])
def test_pinned_requests_never_move(policy, snap):
    for model in TIERS.values():
        c = decide(policy, probe(EASY), snap, pinned=model, max_latency_ms=1.0)
        assert (c.model, c.reason) == (model, "pinned")


def test_every_reason_is_in_the_bounded_label_set(policy):
    snaps = [snapshot(), loaded(40), loaded(150), snapshot(large=dict(kv_used=950))]
    seen = {decide(policy, probe(d), s, max_latency_ms=b).reason
            for s in snaps for d in (EASY, HARD, None) for b in (None, 0.5, 50.0)}
    assert seen <= set(REASONS) and {"objective:quality", "objective:price", "slo:best_effort"} <= seen


def test_explanation_carries_every_tier(policy):
    c = decide(policy, probe(EASY), loaded(60))
    j = c.to_json()
    assert set(j["tiers"]) == {"small", "medium", "large"} and j["lambda_nats_per_gb"] == pytest.approx(c.lam, abs=1e-6)
    assert all(set(v) == {"loss", "latency_ms", "cost_mb", "kv"} for v in j["tiers"].values())


# ----- latency under the stepping discipline -----------------------------------------------------
def test_latency_estimate_follows_the_discipline(policy):
    idle = snapshot()
    base = Policy.estimate_ms(idle, "m-s", 64, 32)
    busy_large = snapshot(large=dict(running=8, fixed_ms=9.0))
    rr = Policy.estimate_ms(busy_large, "m-s", 64, 32, discipline="round_robin")
    fair = Policy.estimate_ms(busy_large, "m-s", 64, 32, discipline="fair")
    # round robin: every small step waits a 9 ms large step; fair: large gets as much time as small
    assert rr > 5 * base and fair == pytest.approx(2 * base)
    # a queue beyond max_num_seqs waits for a batch to finish
    deep = Policy.estimate_ms(snapshot(medium=dict(running=8, waiting=8)), "m-m", 64, 32)
    assert deep > Policy.estimate_ms(idle, "m-m", 64, 32) + 30 * 3.0
    # another engine's short backlog delays a request only by that backlog
    short = snapshot(large=dict(running=1))
    assert Policy.estimate_ms(short, "m-s", 64, 32, discipline="round_robin") < rr


def test_an_engine_that_keeps_receiving_takes_its_share_while_it_has_work():
    # Under fair shares an idle engine that keeps receiving requests has work a fraction
    # 1 - exp(-rate x its request's life) of the time, and takes as much device time as this
    # request's engine meanwhile. Before: an idle engine was left out whatever its arrival rate,
    # so requests on the top tier were predicted at a third of what they took under steady load.
    base = Policy.estimate_ms(snapshot(), "m-l", 64, 32)
    for rate in (0.0, 5.0, 50.0):
        snap = snapshot(small=dict(fixed_ms=2.0))
        snap.engines["m-s"] = replace(snap.engines["m-s"], arrival_rate=rate)
        life_s = 32 * snap.engines["m-s"].step_cost(1)  # its average output, one step each
        frac = 1 - math.exp(-rate * life_s)
        assert Policy.estimate_ms(snap, "m-l", 64, 32) == pytest.approx(base * (1 + frac))


# ----- strategy ----------------------------------------------------------------------------------
def test_strategy_auto_is_plain_unless_engine_takes_strategies():
    pol = Policy(PolicySettings(quality=PRED), {"small": "m-s"})
    p = probe(1.0, copy=0.8)
    snap = snapshot()
    assert decide(pol, p, snap).strategy == "plain"
    both = {m: {"plain", "pld", "draft"} for m in TIERS.values()}
    c = decide(pol, p, snap, strategies=both)
    assert (c.strategy, c.strategy_reason) == ("pld", "strategy:pld")
    # measured acceptance too low, or a big batch: speculation does not pay
    assert decide(pol, p, snapshot(small=dict(acceptance={"pld": 0.1})), strategies=both).strategy == "plain"
    assert decide(pol, p, snapshot(small=dict(running=8, waiting=4)), strategies=both).strategy == "plain"
    # the client's explicit strategy is passed through, pinned or not
    assert decide(pol, p, snap, strategy="draft").strategy == "draft"
    drafting = Policy(PolicySettings(quality=PRED, allow_draft=True), TIERS)
    assert decide(drafting, probe(4.0), snapshot(), strategies=both).strategy == "draft"


# ----- the predictor in the YAML -----------------------------------------------------------------
def test_fitted_predictor_round_trips_through_the_deployment_yaml(tmp_path):
    import yaml

    from sizewise.orchestrator.config import QualityConfig
    from sizewise.orchestrator.deployment import DeploymentConfig

    q = QualityConfig.from_predictor(PRED, "test windows")
    cfg = {"models": [{"name": n, "tier": t, "path": "x"} for t, n in TIERS.items()],
           "policy": {"router": "adaptive", "slo_ms": 2000, "quality": q.model_dump(exclude_none=True)}}
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(cfg))
    back = DeploymentConfig.from_yaml(path).policy
    assert back.quality.calibrated_on == "test windows"
    assert back.to_settings().quality == PRED
    c = decide(Policy(back.to_settings(), TIERS), probe(HARD), snapshot())
    assert c.loss == decide(Policy(PolicySettings(quality=PRED, slo_ms=2000.0), TIERS), probe(HARD), snapshot()).loss


@pytest.mark.parametrize("quality,match", [
    ({"tiers": {"small": {"intercept": 0.1, "coef": {"shoe_size": 1.0}, "mean": 0.2}}}, "shoe_size"),
    ({"tiers": {"small": {"intercept": float("nan"), "mean": 0.2}}}, "intercept"),
    ({"tiers": {"small": {"intercept": 0.1, "coef": {"difficulty": float("inf")}, "mean": 0.2}}}, "difficulty"),
    ({"tiers": {"small": {"intercept": 0.1, "mean": -0.2}}}, "mean"),
    ({"tiers": {"small": {"intercept": "high", "mean": 0.2}}}, "intercept"),
    ({"tiers": {"small": {"mean": 0.2}}}, "intercept"),
    ({"tiers": {"tiny": {"intercept": 0.1, "mean": 0.2}}}, "tiny"),
    ({"tiers": {}}, "tiers"),
])
def test_malformed_predictor_values_are_refused_naming_the_field(quality, match):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=match):
        PolicyConfig.model_validate({"router": "adaptive", "quality": quality})


def test_keys_of_the_replaced_threshold_policy_say_what_to_do():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_difficulty.*sizewise calibrate"):
        PolicyConfig.model_validate({"max_difficulty": {"small": 1.0, "medium": 2.0}})
    with pytest.raises(ValidationError, match="kv_high"):
        PolicyConfig.model_validate({"kv_high": 1.5})
    with pytest.raises(ValidationError, match="discipline"):
        PolicyConfig.model_validate({"discipline": "lottery"})


def test_fit_keeps_the_signals_that_predict_the_gap_and_drops_noise():
    import random

    from sizewise.orchestrator.calibrate import fit_quality

    rng = random.Random(1)
    sigs, nll = [], {"small": [], "medium": [], "large": []}
    for _ in range(200):
        d, c = rng.uniform(1, 6), rng.uniform(0, 1)
        sigs.append({"difficulty": d, "copyability": c, "log_prompt_tokens": 4.0})
        base = rng.uniform(2, 5)
        nll["large"].append(base)
        nll["medium"].append(base + 0.1 * d + rng.gauss(0, 0.02))
        nll["small"].append(base + 0.3 * d - 0.2 + rng.gauss(0, 0.02))
    fit = fit_quality(sigs, nll, candidates=("difficulty", "copyability", "log_prompt_tokens"), model_signals=True)
    assert fit.signals == ["difficulty"]
    # by default a signal that needs the probe model's prefill (skipped under load) is reported, not kept
    host = fit_quality(sigs, nll, candidates=("difficulty", "copyability", "log_prompt_tokens"))
    assert host.signals == [] and host.report["single"]["difficulty"] == fit.report["single"]["difficulty"]
    assert fit.predictor.tiers["small"].coef["difficulty"] == pytest.approx(0.3, abs=0.02)
    assert fit.predictor.tiers["medium"].intercept == pytest.approx(0.0, abs=0.05)
    assert fit.report["kept_error"] < fit.report["mean_only"] / 10
    with pytest.raises(ValueError, match="two tiers"):
        fit_quality(sigs, {"large": nll["large"]})
    with pytest.raises(ValueError, match="finite"):
        fit_quality(sigs, {**nll, "small": [float("nan")] * 200})


def test_oracle_routing_is_the_cheapest_within_tolerance_up_to_one_request():
    import itertools
    import random

    from sizewise.orchestrator.calibrate import oracle_routing

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
