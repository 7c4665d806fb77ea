"""Adversarial checks of the orchestrator's edges: deployment configs that would silently lose or
misroute a model, telemetry fed empty steps and multi-sample requests, the oracle's argument checks,
and the policy's explanation when every tier is saturated. Everything runs the real components (config, engine, telemetry, policy,
calibration); references are computed independently in the tests."""

from __future__ import annotations

import math
import random
import time

import pytest
from pydantic import ValidationError

from sizewise import SamplingParams
from sizewise.clock import VirtualClock
from sizewise.engine.config import EngineConfig
from sizewise.engine.core import EngineCore
from sizewise.orchestrator.calibrate import oracle_routing
from sizewise.orchestrator.config import PolicyConfig
from sizewise.orchestrator.deployment import Deployment, DeploymentConfig
from sizewise.orchestrator.policy import Policy, PolicySettings
from sizewise.orchestrator.probe import ProbeResult
from sizewise.orchestrator.router import AdaptiveRouter
from sizewise.orchestrator.telemetry import EngineTelemetry, Telemetry, TelemetrySnapshot
from sizewise.orchestrator.types import RoutingHints


def models(*entries: tuple[str, str]) -> list[dict]:
    return [dict(name=n, tier=t, path="/nonexistent") for n, t in entries]


def invalid(raw: dict) -> str:
    with pytest.raises(ValidationError) as ei:
        DeploymentConfig.model_validate(raw)
    return str(ei.value)


# ----- deployment config -------------------------------------------------------------------------
def test_duplicate_model_names_are_refused_not_collapsed():
    # Before: both loaded into one `cores` dict under "a" (the small model silently lost, both
    # tiers mapped to the large one, which got the small one's planned KV budget).
    msg = invalid(dict(models=models(("a", "small"), ("a", "large"))))
    assert "models" in msg and "'a'" in msg and "more than once" in msg


def test_two_models_in_one_tier_are_refused():
    # Before: tier_to_model kept the last one; the other was loaded but never routed to, and a
    # request pinned to it by name crashed the policy (KeyError).
    msg = invalid(dict(models=models(("a", "small"), ("b", "small"))))
    assert "tier 'small'" in msg and "'a'" in msg and "'b'" in msg


@pytest.mark.parametrize("name", ["auto", "large", ""])
def test_model_names_that_shadow_auto_or_another_tier_are_refused(name):
    # Before: a small model named "large" answered requests pinned to `large` (names resolve first).
    msg = invalid(dict(models=models((name, "small"), ("x", "large"))))
    assert "name" in msg


def test_a_model_may_be_named_after_its_own_tier():
    cfg = DeploymentConfig.model_validate(dict(models=models(("small", "small"), ("large", "large"))))
    assert [m.name for m in cfg.models] == ["small", "large"]


def test_probe_model_and_default_tier_must_be_resident():
    # Before: a bogus probe_model made every `auto` request fail with "model 'nope' does not
    # exist" (a 404 for a client that asked for `auto`); a non-resident default_tier a KeyError.
    two = models(("s", "small"), ("l", "large"))
    msg = invalid(dict(models=two, policy=dict(router="adaptive", probe_model="nope")))
    assert "probe_model" in msg and "'nope'" in msg
    assert "probe_model" in invalid(dict(models=two, policy=dict(router="adaptive", probe_model="medium")))
    assert "default_tier" in invalid(dict(models=two, default_tier="medium"))
    ok = DeploymentConfig.model_validate(dict(models=two, default_tier="small",
                                              policy=dict(router="adaptive", probe_model="large")))
    assert ok.policy.probe_model == "large"
    assert DeploymentConfig.model_validate(dict(models=two, policy=dict(probe_model="l"))).policy.probe_model == "l"


def test_model_dirs_with_the_same_basename_get_distinct_names(tmp_path):
    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    cfg = DeploymentConfig.from_model_dirs([str(a), str(b)])
    assert len({m.name for m in cfg.models}) == 2
    assert [m.path for m in cfg.models] == [str(a.resolve()), str(b.resolve())]


# ----- telemetry ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def core(llama_dir):
    return EngineCore(llama_dir, EngineConfig(device="cpu", max_model_len=128, max_num_seqs=4,
                                              max_num_batched_tokens=64, block_size=16, enforce_eager=True,
                                              num_speculative_tokens=0), name="m")


def drive(core: EngineCore, tel: Telemetry) -> list:
    """Step `core` until it is idle, calling the telemetry hook exactly as AsyncEngine's worker does."""
    outs = []
    while core.has_unfinished_requests():
        t0 = time.perf_counter()
        step = core.step()
        tel.on_step("m", core, step, time.perf_counter() - t0)
        outs.extend(step)
    return outs


def test_empty_steps_do_not_count_as_steps(core):
    # The worker steps every core that had work when its turn began; a core whose last request was
    # aborted meanwhile returns [] from step() in microseconds. Before: telemetry counted that as
    # a step with the previous step's token and byte counts, pulling the step-time EMA towards 0
    # and inflating achieved bandwidth (stale bytes / ~0 s).
    tel = Telemetry({"m": core}, {"m": "small"}, peak_bandwidth=1e12, ema_alpha=0.5)
    core.add_request("e-1", list(range(5, 25)), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    drive(core, tel)
    before = tel.snapshot().engines["m"]
    assert before.num_steps > 0 and before.step_seconds > 0
    for _ in range(5):  # what the worker does when the core it is about to step has emptied
        t0 = time.perf_counter()
        out = core.step()
        assert out == []
        tel.on_step("m", core, out, time.perf_counter() - t0)
    after = tel.snapshot().engines["m"]
    assert after.num_steps == before.num_steps
    assert after.step_seconds == before.step_seconds
    assert after.achieved_bandwidth == before.achieved_bandwidth
    assert (after.step_fixed_seconds, after.step_seconds_per_token) == (
        before.step_fixed_seconds, before.step_seconds_per_token)


def _feed_rounds(core, tel, ks, prompt: int, seconds, tag: str) -> int:
    """Rounds of k requests (`prompt` tokens each, 5 generated), each stepped to the end: the k prompts
    prefill in one step, then k rows decode. The telemetry is told `seconds(k, prefill)` as each
    step's time, as the worker tells it the measured one. Returns the number of decode steps."""
    decodes = 0
    for rnd, k in enumerate(ks):
        for i in range(k):
            core.add_request(f"{tag}-{rnd}-{i}", [5 + i + j for j in range(prompt)],
                             SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        first = True
        while core.has_unfinished_requests():
            out = core.step()
            tel.on_step("m", core, out, seconds(k, first))
            decodes += not first
            first = False
    return decodes


def test_cost_model_separates_decode_rows_from_prefill_tokens(core):
    # Step seconds follow a known law, fixed + per row x decode rows + per prompt token x prefill
    # tokens (on a CPU a decode row costs far more than a prompt token). Before: one line through
    # a decode-like and a prefill-like centroid mixed the two slopes, so a decode step at batch 1
    # was predicted at almost twice its cost and one at batch 32 at half of it.
    fixed, per_row, per_prompt = 2e-3, 5e-4, 1e-5
    tel = Telemetry({"m": core}, {"m": "small"}, peak_bandwidth=1e12, ema_alpha=0.5)
    prompt = 12
    _feed_rounds(core, tel, (1, 4, 2, 3, 1, 4), prompt,
                 lambda k, prefill: fixed + (per_prompt * prompt * k if prefill else per_row * k), "c")
    e = tel.snapshot().engines["m"]
    assert e.step_fixed_seconds == pytest.approx(fixed, rel=1e-6)
    assert e.step_seconds_per_token == pytest.approx(per_row, rel=1e-6)
    assert e.prefill_seconds_per_token == pytest.approx(per_prompt, rel=1e-6)
    assert e.step_cost(32) == pytest.approx(fixed + 32 * per_row) and e.prefill_cost(96) == pytest.approx(
        fixed + 96 * per_prompt)


def test_a_prompt_in_a_batched_prefill_is_priced_at_its_marginal_cost(core):
    # Where one prompt alone is memory-bound (a step costs its weight stream whatever its size) and
    # several are compute-bound (an accelerator), a prefill step costs max(fixed, per token x tokens).
    # Before: each prompt token was priced at what prefill steps cost per token on average, about
    # half what another prompt adds to a loaded step (here 0.53x, 0.4x on the 910B profile), and the
    # plan put too much load on the top tier (the 910B profile at 1.5x its capacity: 0.83 within the
    # SLO).
    fixed, per_token, prompt = 2e-3, 1e-4, 16  # 4 x 16 prompt tokens fit one step (max_num_batched_tokens 64)
    tel = Telemetry({"m": core}, {"m": "small"}, peak_bandwidth=1e12, ema_alpha=0.5)
    _feed_rounds(core, tel, (1, 4, 2, 3, 1, 4, 2, 3), prompt,
                 lambda k, prefill: max(fixed, per_token * prompt * k) if prefill else fixed + 5e-4 * k, "p")
    e = tel.snapshot().engines["m"]
    assert e.prefill_seconds_per_token == pytest.approx(per_token, rel=0.3)


def test_a_cold_first_step_does_not_set_the_cost_line(core):
    # The cost line's averages are slow (about 50 steps): started at their first sample, that one
    # sample kept half their weight after 32 steps, so a cold first step (allocator, first kernels)
    # set the plan's step costs for the whole warm-up. Now the first 1 / alpha samples are averaged
    # plainly. Law: fixed + per row x rows, the first decode step three times slower.
    fixed, per_row = 2e-3, 5e-4
    tel = Telemetry({"m": core}, {"m": "small"}, peak_bandwidth=1e12)  # default averages
    decoded = []

    def law(k: int, prefill: bool) -> float:
        if prefill:
            return fixed + 1e-5 * 12 * k
        decoded.append(k)
        return (fixed + per_row * k) * (3.0 if len(decoded) == 1 else 1.0)

    assert _feed_rounds(core, tel, (1, 4, 2, 3, 1, 4, 2, 3, 4, 1), 12, law, "w") >= 30
    e = tel.snapshot().engines["m"]
    # One outlier in ~40 samples moves a plain mean by a few percent; at half the weight it doubled
    # the fixed cost and flattened the slope.
    assert e.step_fixed_seconds == pytest.approx(fixed, rel=0.5)
    assert e.step_seconds_per_token == pytest.approx(per_row, rel=0.5)
    assert e.step_cost(16) == pytest.approx(fixed + 16 * per_row, rel=0.25)


def test_requests_running_past_their_prediction_raise_the_latency_bias_before_they_finish(core):
    # Before: the bias learned only from finished requests, so a burst routed every request on
    # the unloaded estimate (the first ones finish after the last is routed).
    tel = Telemetry({"m": core}, {"m": "small"}, peak_bandwidth=1e12)
    ids = lambda i: [5 + i, 6, 7, 8]  # noqa: E731
    for i in range(3):  # on time: predicted to take a day
        tel.note_routed("m", 1, ids(i), predicted_ms=86_400e3)
    assert tel.snapshot().engines["m"].latency_bias == 1.0
    for i in range(3, 5):  # two of five already late: the median request is on time
        tel.note_routed("m", 1, ids(i), predicted_ms=1e-3)
    time.sleep(0.002)
    assert tel.snapshot().engines["m"].latency_bias == 1.0
    for i in range(5, 8):  # most are late, by far more than the clamp
        tel.note_routed("m", 1, ids(i), predicted_ms=1e-3)
    time.sleep(0.002)
    assert tel.snapshot().engines["m"].latency_bias == pytest.approx(3.0)
    tel.forget_latency()
    assert tel.snapshot().engines["m"].latency_bias == 1.0


def test_average_output_length_is_per_sequence_when_samples_finish_apart(core):
    # A request's last delta carries only the sequences that produced a token in that step.
    # Before: sequences per request were counted on that last delta only, so a request whose n
    # samples stop at different steps counted its whole output as one sequence's.
    tel = Telemetry({"m": core}, {"m": "small"}, peak_bandwidth=1e12, ema_alpha=1.0)
    vocab = core.vocab_size
    params = SamplingParams(n=3, max_tokens=24, temperature=1.5, seed=7,
                            stop_token_ids=list(range(3, vocab, 9)))  # ~1 in 9 tokens stops a sample
    core.add_request("n-1", list(range(10, 30)), params)
    outs = drive(core, tel)
    lengths: dict[int, int] = {}
    for o in outs:
        for c in o.outputs:
            lengths[c.index] = lengths.get(c.index, 0) + len(c.token_ids)
    last = outs[-1]
    assert last.finished and len(lengths) == 3
    assert len(last.outputs) < 3, "precondition: the samples must finish at different steps"
    assert tel.snapshot().engines["m"].avg_output_tokens == pytest.approx(sum(lengths.values()) / 3)


def test_busy_fraction_is_the_step_time_of_the_last_two_seconds(core):
    # The window's sums are kept as steps enter and leave it (a snapshot is read per routed request
    # and used to add up every step of the last 2 s): checked against the sums over the steps
    # themselves, as time passes and steps leave the window.
    tel = Telemetry({"m": core}, {"m": "small"}, peak_bandwidth=1e12, ema_alpha=0.5)
    clock = tel.clock = VirtualClock()
    rng = random.Random(3)
    ends: list[tuple[float, float]] = []  # (end of the step, its seconds), as the test saw them

    def busy_expected() -> float:
        return min(sum(s for t, s in ends if t >= clock.now() - 2.0) / 2.0, 1.0)

    core.add_request("w-1", list(range(5, 25)), SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
    while core.has_unfinished_requests():
        seconds = rng.uniform(0.005, 0.08)
        clock.advance(seconds + rng.choice((0.0, 0.0, 0.3)))  # now and then a gap between steps
        tel.on_step("m", core, core.step(), seconds)
        ends.append((clock.now(), seconds))
        snap = tel.snapshot()
        assert snap.busy_fraction == pytest.approx(busy_expected(), abs=1e-12)
        assert 0.0 <= snap.load_utilization <= snap.busy_fraction
    for idle in (0.5, 1.0, 1.0, 1.0):  # the steps leave the window one by one, then all are gone
        clock.advance(idle)
        assert tel.snapshot().busy_fraction == pytest.approx(busy_expected(), abs=1e-12)
    assert tel.snapshot().busy_fraction == 0.0 and tel.snapshot().load_utilization == 0.0


def test_averages_read_after_every_step_equal_those_folded_at_the_end(core, llama_dir):
    # The worker only records each step; the averages are folded when a snapshot is read or every
    # few dozen steps. A reader must see the same whenever it reads: a listener read after every
    # step (folding one at a time) against one read once at the end, over two interleaved engines
    # (drafting attribution, the switch residuals) and more steps than one fold holds.
    other = EngineCore(llama_dir, EngineConfig(device="cpu", max_model_len=128, max_num_seqs=4,
                                               max_num_batched_tokens=64, block_size=16, enforce_eager=True,
                                               num_speculative_tokens=0), name="o")
    cores = {"m": core, "o": other}
    clock = VirtualClock()
    each, once = (Telemetry(cores, {"m": "small", "o": "large"}, peak_bandwidth=1e12, ema_alpha=0.3)
                  for _ in range(2))
    each.clock = once.clock = clock
    rng = random.Random(5)
    for i in range(3):
        core.add_request(f"f-m-{i}", list(range(5 + i, 25 + i)), SamplingParams(max_tokens=20 + 7 * i, temperature=0.0,
                                                                                ignore_eos=True))
        other.add_request(f"f-o-{i}", list(range(9 + i, 21 + i)), SamplingParams(max_tokens=25, temperature=0.0,
                                                                                  ignore_eos=True))
    steps = 0
    while core.has_unfinished_requests() or other.has_unfinished_requests():
        for name, c in cores.items():
            if not c.has_unfinished_requests():
                continue
            seconds = rng.uniform(0.001, 0.01)
            clock.advance(seconds + rng.choice((0.0, 0.0, 0.01)))
            out = c.step()
            each.on_step(name, c, out, seconds)
            once.on_step(name, c, out, seconds)
            each.snapshot()
            steps += 1
    assert clock.now() < 2.0 and steps > 40  # no step left the 2 s window; more than one fold's worth
    a, b = each.snapshot(), once.snapshot()
    assert a.engines["m"].num_steps + a.engines["o"].num_steps == steps
    assert a.engines["m"].calibrated and a.engines["m"].avg_output_tokens > 0
    assert a == b


# ----- policy: saturation is explained --------------------------------------------------------------
TIERS = {"small": "m-s", "medium": "m-m", "large": "m-l"}


def _engine(name: str, tier: str, **kw) -> EngineTelemetry:
    base = dict(
        name=name, tier=tier, weight_bytes=10**6, kv_bytes_per_token=1024, block_size=16, max_num_seqs=8,
        max_num_batched_tokens=512, max_model_len=1024, num_running=0, num_waiting=0, kv_blocks_used=0,
        kv_blocks_total=1000, num_steps=10, step_seconds=1e-3, step_fixed_seconds=1e-3,
        step_seconds_per_token=1e-5, bytes_per_step=1e6, achieved_bandwidth=1e9, bandwidth_utilization=0.1,
        avg_prompt_tokens=64.0, avg_output_tokens=32.0, spec_acceptance={}, calibrated=True,
    )
    return EngineTelemetry(**{**base, **kw})


def _probe(difficulty: float) -> ProbeResult:
    return ProbeResult(intent="chat", intent_confidence=1.0, intent_scores={"chat": 1.0}, intent_source="features",
                       copyability=0.0, repeat_fraction=0.0, prompt_tokens=64, difficulty=difficulty, ms=1.0)


def test_when_every_tier_is_saturated_the_reason_says_so():
    pol = Policy(PolicySettings(), TIERS)
    kv_full = TelemetrySnapshot(engines={m: _engine(m, t, kv_blocks_used=990 + i) for i, (t, m) in enumerate(TIERS.items())},
                                peak_bandwidth=1e10, achieved_bandwidth=0.0, bandwidth_utilization=0.0)
    c = pol.decide(_probe(1.0), kv_full, prompt_tokens=64, max_new_tokens=32)
    assert all(v >= 0.9 for v in c.kv_pressure.values())
    # no tier has room: the one with the most, and the reason says the KV cache decided
    assert (c.tier, c.reason) == ("small", "kv_pressure")
    deep = TelemetrySnapshot(engines={m: _engine(m, t, num_running=8, num_waiting=40) for t, m in TIERS.items()},
                             peak_bandwidth=1e10, achieved_bandwidth=0.0, bandwidth_utilization=0.0)
    c = pol.decide(_probe(4.0), deep, prompt_tokens=64, max_new_tokens=32, max_latency_ms=1.0)
    assert all(v > 1.0 for v in c.latency_ms.values()) and all(v < 0.9 for v in c.kv_pressure.values())
    assert c.reason == "slo:best_effort" and c.latency_ms[c.tier] == min(c.latency_ms.values())


# ----- the oracle's arguments --------------------------------------------------------------------
def test_oracle_rejects_bad_arguments_with_a_clear_error():
    nll = {"small": [1.0, 2.0], "large": [0.5, 1.0]}
    with pytest.raises(ValueError, match="tolerance"):
        oracle_routing(nll, {"small": 1.0, "large": 2.0}, tolerance=-0.1)
    with pytest.raises(ValueError, match="cost.*small"):
        oracle_routing(nll, {"large": 2.0})
    with pytest.raises(ValueError, match="cost.*large"):
        oracle_routing(nll, {"small": 1.0, "large": 0.0})


def _tiny_deployment(*models: dict) -> DeploymentConfig:
    return DeploymentConfig.model_validate(dict(
        device="cpu", memory_fraction=0.01, models=list(models),
        engine=dict(max_model_len=128, max_num_seqs=2, max_num_batched_tokens=64, enforce_eager=True),
        policy=dict(peak_bandwidth_gbps=10.0),
    ))


# ----- a router is bound to one deployment ----------------------------------------------------------
async def test_a_bad_probe_model_fails_at_load_not_per_request(checkpoints):
    # A router built in code (not from YAML) with a probe model the deployment does not have.
    cfg = _tiny_deployment(dict(name="s", tier="small", path=str(checkpoints["llama"])),
                           dict(name="l", tier="large", path=str(checkpoints["qwen2"])))
    with pytest.raises(ValueError, match="probe_model 'medium'"):
        Deployment.load(cfg, router=AdaptiveRouter(PolicySettings(probe_model="medium")), echo_plan=False)
    dep = Deployment.load(cfg, router=AdaptiveRouter(PolicySettings(probe_model="l", always_probe=True)),
                          echo_plan=False)
    try:
        d = await dep.route([5, 6, 7, 8], SamplingParams(max_tokens=2), "auto", RoutingHints())
        assert d.probe["probe_model"] == "l"
    finally:
        dep.shutdown()


@pytest.fixture(scope="module")
def two_tiers(checkpoints):
    """medium and small, listed in that order; static router (no default_tier)."""
    cfg = _tiny_deployment(dict(name="m", tier="medium", path=str(checkpoints["llama"])),
                           dict(name="s", tier="small", path=str(checkpoints["llama_tied_linear"])))
    dep = Deployment.load(cfg, echo_plan=False)
    yield dep
    dep.shutdown()


async def test_static_default_is_the_largest_resident_tier_whatever_the_listing_order(two_tiers):
    # Before: without a large tier the default was the last model listed (here: small).
    d = await two_tiers.route([5, 6, 7], SamplingParams(max_tokens=2), "auto", RoutingHints())
    assert (d.model, d.tier, d.reason) == ("m", "medium", "static")


async def test_a_one_token_prompt_says_why_it_has_no_difficulty(two_tiers):
    r = AdaptiveRouter(PolicySettings(always_probe=True))
    d = await r.route(two_tiers, [7], SamplingParams(max_tokens=2), "auto", RoutingHints())
    assert d.probe["difficulty"] is None and "1-token" in d.probe["skipped"]
    assert d.tier == "medium" and d.reason in ("plan:idle", "plan:headroom")  # one arrival: the top tier alone
    d = await r.route(two_tiers, [7, 8, 9], SamplingParams(max_tokens=2), "auto", RoutingHints())
    assert d.probe["difficulty"] is not None and "skipped" not in d.probe


def test_two_metrics_instances_in_one_process_share_nothing():
    from prometheus_client.parser import text_string_to_metric_families

    from sizewise.metrics import Metrics

    a, b = Metrics(), Metrics()  # two servers in one process: no duplicate-registration error
    a.route_decisions.labels(tier="small", reason="probe:easy").inc(3)

    def value(m: Metrics) -> float:
        fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
        return sum(s.value for s in fams["sizewise_route_decisions"].samples if s.name.endswith("_total"))

    assert (value(a), value(b)) == (3.0, 0.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_oracle_refuses_nll_that_is_not_a_number(bad):
    """A NaN compares false with the tolerance limit: it would pass as 'good enough'."""
    nll = {"small": [3.0, bad, 3.0], "medium": [2.5, 2.5, 2.5], "large": [2.0, 2.0, 2.0]}
    with pytest.raises(ValueError, match="finite"):
        oracle_routing(nll, {"small": 1.0, "medium": 2.0, "large": 4.0}, tolerance=0.05)


def test_models_with_different_tokenizers_are_refused(checkpoints, tmp_path):
    """A prompt is tokenized once, before routing: tiers that read ids differently would answer
    garbage without an error."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    other = tmp_path / "other"
    shutil.copytree(checkpoints["llama"], other)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=312, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["zzz yyy xxx www " * 30, "SELECT * FROM t WHERE a = 1;\n" * 30], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                            pad_token="<|pad|>").save_pretrained(other)
    cfg = _tiny_deployment(dict(name="s", tier="small", path=str(checkpoints["llama"])),
                           dict(name="l", tier="large", path=str(other)))
    with pytest.raises(ValueError, match="different tokenizers"):
        Deployment.load(cfg, echo_plan=False)
    same = _tiny_deployment(dict(name="s", tier="small", path=str(checkpoints["llama"])),
                            dict(name="l", tier="large", path=str(checkpoints["qwen2"])))
    Deployment.load(same, echo_plan=False).shutdown()  # same tokenizer files, another family: fine
