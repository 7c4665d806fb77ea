"""The virtual device (sizewise.sim): the real serving stack on virtual time.

Everything asserted here is behaviour under load on *virtual* time (never wall time): the
Deployment, router, policy, telemetry, the worker's discipline, Scheduler and BlockManager are the
real ones; only the forward is a step-cost model. Each test takes seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sizewise.orchestrator.deployment import DeploymentConfig, StaticRouter
from sizewise.orchestrator.router import AdaptiveRouter
from sizewise.sim.cli import build_spec
from sizewise.sim.driver import Simulation, WorkItem
from sizewise.sim.sweep import Sweep
from sizewise.sim.workload import cycled, load_workload

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
QWEN = ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"]
LOADS = [0.25, 0.5, 1.0, 2.0, 3.0]

@pytest.fixture(scope="module")
def config():
    return DeploymentConfig.from_yaml(DEMO)


@pytest.fixture(scope="module")
def items():
    return load_workload()


def _adaptive(config, slo_ms: float) -> AdaptiveRouter:
    s = config.policy.to_settings()
    s.slo_ms = slo_ms
    return AdaptiveRouter(s)


def test_a_run_is_deterministic_for_a_seed_and_runs_the_real_stack(config, items):
    spec = build_spec(config, "cpu-measured")
    arrivals = [0.02 * i for i in range(48)]
    runs = []
    for _ in range(2):
        sim = Simulation(spec, items[:48], seed=3)
        other = Simulation(spec, items[:48], seed=3)  # a second deployment in the process: its own clock
        recs = sim.run(_adaptive(config, 1000), arrivals, 16)
        assert other.clock.now() == 0.0
        runs.append([(r.tier, r.reason, r.latency, r.ttft, r.output_tokens) for r in recs])
        snap = sim.deployment.telemetry.snapshot()
        assert sum(e.num_steps for e in snap.engines.values()) == sim.device.steps  # every step reached the telemetry
        sim.close()
        other.close()
    assert runs[0] == runs[1]
    assert all(n == 16 for *_, n in runs[0])  # ignore_eos: every request ran to max_tokens
    assert len({t for t, *_ in runs[0]}) >= 2  # the adaptive router moved load across tiers


def _domination(config, items, hardware, shapes=None, requests=48, loads=LOADS):
    spec = build_spec(config, hardware, shapes)
    sw = Sweep(spec, cycled(items, requests), max_tokens=32, seed=0, progress=False)
    cap, _, slo_s = sw.calibrate()
    rows, _, _ = sw.run(loads, ["static-small", "static-medium", "static-large", "sizewise"], cap, slo_s)
    by = {(r["load"], r["policy"]): r for r in rows}
    if hardware != "cpu-measured":  # the sweep must reach the top tier's saturation, or it proves little
        assert min(by[(lo, "static-large")]["slo_attain"] for lo in loads) < 0.5
    dominated = []
    for load in loads:
        auto = by[(load, "sizewise")]
        for tier in ("small", "medium", "large"):
            st = by[(load, f"static-{tier}")]
            if st["slo_attain"] > auto["slo_attain"] and st["loss"] < auto["loss"]:
                dominated.append((load, tier, st["slo_attain"], auto["slo_attain"], st["loss"], auto["loss"]))
    return dominated, rows


@pytest.fixture(scope="module")
def demo_domination(config, items):
    return _domination(config, items, "cpu-measured")[0]


def test_auto_is_never_dominated_by_a_static_tier_on_the_demo_profile_from_half_load(demo_domination):
    """Domination: a static size with both higher SLO attainment and lower quality loss at one load."""
    assert [d for d in demo_domination if d[0] >= 0.5] == []


def test_auto_is_never_dominated_on_the_demo_profile_at_light_load(demo_domination):
    assert [d for d in demo_domination if d[0] < 0.5] == []


def test_auto_is_never_dominated_on_the_910b_qwen25_profile(config, items):
    """384 requests a cell (the workload repeated without shared prefixes), as docs/routing.md's
    sweep: enough for the 7B tier to saturate on a 910B by 1.5x, where routing has something to
    decide."""
    loads = [0.5, 1.0, 1.5, 2.0, 3.0]
    dominated, rows = _domination(config, items, "ascend-910b", QWEN, requests=384, loads=loads)
    assert dominated == []
    by = {(r["load"], r["policy"]): r for r in rows}
    # the quality signal (host-side surprisal) is measured for every `auto` request, at every load
    assert all(r["signal_frac"] == 1.0 for r in rows if r["policy"] == "sizewise"), rows
    # where large alone holds the SLO, auto keeps it (Poisson noise does not move the plan: issue 22)
    for load in (0.5, 1.0):
        if by[(load, "static-large")]["slo_attain"] >= 0.9:
            assert by[(load, "sizewise")]["loss"] == 0.0, (load, by[(load, "sizewise")])
    # overload: auto holds the SLO spending no more quality than the best static tier that holds it
    holding = [by[(3.0, f"static-{t}")]["loss"] for t in ("small", "medium", "large")
               if by[(3.0, f"static-{t}")]["slo_attain"] >= 0.9]
    assert by[(3.0, "sizewise")]["slo_attain"] >= 0.9 and by[(3.0, "sizewise")]["loss"] <= min(holding) + 1e-9
    # between large's capacity and medium's: at some load a two-tier mix holds the SLO at least a quarter
    # of the way from medium's loss towards large's (issue 22's "better than any single size")
    between = [lo for lo in loads if by[(lo, "static-large")]["slo_attain"] < 0.9 <= by[(lo, "static-medium")]["slo_attain"]]
    assert between, rows
    better = [lo for lo in between if by[(lo, "sizewise")]["slo_attain"] >= 0.9
              and by[(lo, "sizewise")]["loss"] <= 0.75 * by[(lo, "static-medium")]["loss"]]
    assert better, [by[(lo, "sizewise")] for lo in between]


def test_a_burst_from_idle_is_served_whole_and_spread_off_the_top_tier(config, items):
    """96 requests at once on an idle Qwen2.5 910B deployment: every one completes, the first
    ones are batched on the top tier, and the backlog (seen before any step ran: the router counts
    what it routed) moves later ones to cheaper tiers."""
    spec = build_spec(config, "ascend-910b", QWEN)
    sim = Simulation(spec, items, seed=0)
    recs = sim.run(_adaptive(config, 1500), [0.0] * len(items), 32)
    assert [r.error for r in recs if r.error] == []
    assert all(r.output_tokens == 32 for r in recs)
    assert recs[0].tier == "large"  # an idle device: quality first
    moved = [r for r in recs if r.tier != "large"]
    assert moved and all(r.reason not in ("pinned", "static") for r in moved)
    sim.close()


def test_a_tier_whose_engine_dies_mid_run_fails_its_requests_cleanly_and_nothing_hangs(config, items):
    spec = build_spec(config, "cpu-measured")
    arrivals = [0.05 * i for i in range(48)]
    clean = Simulation(spec, items[:48], seed=0)  # first without the fault: which tier carries the most
    used = [r.tier for r in clean.run(_adaptive(config, 1000), arrivals, 32)]
    clean.close()
    tier = max(("small", "medium", "large"), key=used.count)
    sim = Simulation(spec, items[:48], seed=0)
    recs = sim.run(_adaptive(config, 1000), arrivals, 32, faults={f"demo-{tier}": 0.6})
    assert all(r.done for r in recs)
    assert not [r for r in recs if r.error and r.error.startswith("hung")]
    failed = [r for r in recs if r.error]
    assert failed, "the fault hit no request: the test would prove nothing"
    for r in failed:  # only the dead tier's requests fail, each with the engine's error
        assert r.tier == tier and "simulated device fault" in r.error
    assert all(r.output_tokens == 32 for r in recs if r.error is None)  # every other request is whole
    assert sim.deployment.alive  # the worker survived: one core failed, the others serve
    sim.close()


def test_kv_exhaustion_under_a_long_prompt_flood_preempts_and_still_answers_everything(config):
    """Long prompts flood a KV cache that holds about three of them: the scheduler preempts and
    recomputes, and every request still ends with exactly its reference continuation's length."""
    cfg = config.model_copy(deep=True)
    spec = build_spec(cfg, "cpu-measured")
    per_block = spec.plan.model("demo-large").kv_bytes_per_block
    cfg.kv_cache_bytes = int(120 * per_block / 0.5)  # all tiers' KV (large's kv_share is 0.5): 120 blocks on large
    spec = build_spec(cfg, "cpu-measured")
    large = spec.plan.model("demo-large")
    assert large.num_blocks == 120 and large.block_size == 16
    # 900-token prompts (57 blocks each): two are admitted, then their growth to 61 blocks each overflows
    flood = [WorkItem(prompt=[(7 * i + j) % 4000 + 10 for j in range(900)], ref=list(range(100, 164)))
             for i in range(12)]
    sim = Simulation(spec, flood, seed=0)
    recs = sim.run(StaticRouter("large"), [0.001 * i for i in range(12)], 64, warmup=0)
    assert [r.error for r in recs if r.error] == []
    assert all(r.output_tokens == 64 for r in recs)
    core = sim.deployment.cores["demo-large"]
    assert core.scheduler.num_preemptions > 0
    assert core.block_manager.num_used_blocks == 0  # every block came back
    sim.close()


@pytest.mark.parametrize("shape", ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3.2-1b", "llama-3.2-3b",
                                   "llama-3.1-8b"])
def test_shipped_shapes_have_the_parameter_count_transformers_builds(shape):
    """The roofline's weight bytes come from config.json alone: the count must be the real model's."""
    import torch
    import transformers

    from sizewise.models import ModelConfig
    from sizewise.sim.driver import shapes_dir

    path = shapes_dir(shape)
    hf = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf)
    assert ModelConfig.from_pretrained(path).num_params == sum(p.numel() for p in model.parameters())


def test_the_measured_fit_recovers_a_known_step_cost():
    """Steps drawn from a known line (with interleaving penalty and prefill cost) fit back to it."""
    import random

    from sizewise.sim.cost import StepShape, TierCost, fit_measured

    truth = {"small": TierCost(0.002, 0.0005, 0.0001, 0.001, prefill_fixed_s=0.003),
             "large": TierCost(0.010, 0.0020, 0.0006, 0.004, prefill_fixed_s=0.006)}
    rng = random.Random(0)
    steps, t, prev = [], 0.0, None
    for _ in range(4000):
        name = rng.choice(["demo-small", "demo-large"])
        rows = rng.choice([1, 2, 4, 8, 16])
        prefill = rng.choice([0, 0, 0, 96, 384])
        dt = truth[name.split("-")[1]].mean(StepShape(rows, prefill, 0, prev not in (None, name)))
        t += dt + 0.0005
        steps.append(["cell", name, t, dt, rows, prefill, 0])
        prev = name
    fit = fit_measured({"steps": steps})
    for tier, want in truth.items():
        got = fit.tiers[tier]
        for f in ("fixed_s", "per_row_s", "per_prefill_token_s", "interleave_s", "prefill_fixed_s"):
            assert getattr(got, f) == pytest.approx(getattr(want, f), rel=0.05, abs=2e-5), (tier, f)
    assert fit.gaps and all(g == pytest.approx(0.0005, abs=1e-6) for g in fit.gaps)


def test_the_simulate_command_writes_the_sweep(tmp_path):
    import json

    from sizewise.cli import main

    out = tmp_path / "s.json"
    assert main(["simulate", "--config", str(DEMO), "--hardware", "h100", "--shapes", ",".join(QWEN),
                 "--requests", "12", "--loads", "1,3", "--policies", "static-large,sizewise,random",
                 "--out", str(out), "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert {(r["load"], r["policy"]) for r in d["rows"]} == {(lo, p) for lo in (1.0, 3.0)
                                                               for p in ("static-large", "sizewise", "random")}
    assert d["shapes"] == {"small": "qwen2.5-0.5b", "medium": "qwen2.5-1.5b", "large": "qwen2.5-7b"}
    assert "qwen2.5-7b" in d["memory_plan"] and d["cost_model"] == "roofline"
    for bad in (["--shapes", "nope"], ["--loads", "1,x"], ["--loads", "0"], ["--requests", "0"], ["--slo-ms", "-5"],
                ["--policies", "static-large,bogus"]):
        assert main(["simulate", "--config", str(DEMO), "--out", str(out), *bad]) == 2  # a clear refusal


def test_deadlines_and_client_aborts_are_events_that_free_the_kv(config, items):
    """Under overload, clients that give up (a deadline) or disconnect (an abort) are aborted at that
    virtual time: their KV blocks come back, and everyone else is answered in full."""
    spec = build_spec(config, "cpu-measured")
    sim = Simulation(spec, items[:40], seed=0)
    recs = sim.run(StaticRouter("large"), [0.0] * 40, 32, timeout_s=2.0, aborts={3: 0.5, 4: 0.5})
    assert recs[3].error == recs[4].error == "aborted by the client"
    assert recs[3].latency == pytest.approx(0.5)  # the client's view: it left at 0.5 s
    late = [r for r in recs if r.error and r.error.startswith("deadline")]
    assert late, "nothing was late: the overload did not happen"
    assert all(r.latency == pytest.approx(2.0) for r in late)
    assert all(r.output_tokens == 32 for r in recs if r.error is None)
    assert all(r.done for r in recs)
    core = sim.deployment.cores["demo-large"]
    assert not core.has_unfinished_requests() and core.block_manager.num_used_blocks == 0
    sim.close()


def test_the_rate_oracle_serves_a_burst_at_one_instant(config, items):
    """The rate-oracle policy is told each cell's mean rate; a burst whose arrivals share one instant
    (zero span) is a batch over a millisecond, not a missing rate (it aborted the sweep)."""
    spec = build_spec(config, "cpu-measured")
    sw = Sweep(spec, items[:8], max_tokens=8, seed=0, progress=False)
    rows, _, _ = sw.run(["burst"], ["static-small", "sizewise", "rate-oracle"], 10.0, 1.0, burst_s=0.0)
    oracle = next(r for r in rows if r["policy"] == "rate-oracle")
    assert oracle["requests"] == 8
    # told 7 arrivals in a millisecond, the plan is far past large's capacity from the first one
    assert oracle["large"] < 1.0, oracle
