"""Whose work a speculative step is, on the trained demo family (models/demo): the draft model's
proposals are its own engine's device seconds and bytes (they show in /metrics while it drafts,
although it serves no request), every target forward of a split step streams the weights once,
and the models' device seconds together never exceed the wall time they ran in."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_speculative_demo import copy_heavy_prompts

from sizewise import SamplingParams, demo
from sizewise.engine.config import EngineConfig
from sizewise.engine.core import EngineCore
from sizewise.metrics import Metrics
from sizewise.orchestrator.deployment import Deployment
from sizewise.orchestrator.types import Prompt, RoutingHints
from sizewise.recorder import Recorder

from conftest import demo_deployment

ENGINE = dict(device="cpu", dtype="float32", max_model_len=1024, max_num_seqs=4, kv_cache_bytes=64 << 20)


def _count_forwards(core: EngineCore) -> list[int]:
    """Spy on the target's model: one count per forward (mixed/prefill, decode or verify: the paged
    entry points all run `forward` once)."""
    model, calls, fn = core.runner.model, [0], core.runner.model.forward

    def counted(*a, **kw):
        calls[0] += 1
        return fn(*a, **kw)
    model.forward = counted
    return calls


def test_draft_work_is_the_draft_models_and_every_forward_is_counted():
    target = EngineCore(demo.demo_model_path("medium"), EngineConfig(**ENGINE, spec_batching="split"), name="medium")
    draft = EngineCore(demo.demo_model_path("small"), EngineConfig(**ENGINE), name="small")
    target.attach_draft(draft)
    tok = target.tokenizer
    prompts = [tok.encode(p) for p in copy_heavy_prompts()]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for i, (ids, strategy) in enumerate(zip(prompts + prompts[:1], ["draft", "pld", "plain"])):
        target.add_request(f"r{i}", ids, sp, strategy=strategy)
    forwards = _count_forwards(target)
    w, kvpt = target.step_weight_bytes, target.model_config.kv_bytes_per_token(target.dtype)
    two_forward_steps = 0
    t0, own0, draft0 = time.perf_counter(), target.work_totals(), draft.work_totals()
    while target.has_unfinished_requests():
        n0, d_before = forwards[0], draft.work_totals()
        target.step()
        n, st = forwards[0] - n0, target.stats()
        # weights once per forward, plus whole tokens of KV (less than the weights at these lengths)
        assert st.last_step_bytes // w == n and (st.last_step_bytes - n * w) % kvpt == 0, (st.last_step_bytes, n)
        two_forward_steps += n == 2
        assert draft.work_totals()[0] >= d_before[0]
        assert draft.stats().num_steps == 0  # drafting is not a step of the draft's own
    wall = time.perf_counter() - t0
    assert two_forward_steps > 0  # split batching ran plain and verify rows in two forwards
    own = target.work_totals()[0] - own0[0]
    drafted_s, drafted_b = draft.work_totals()[0] - draft0[0], draft.work_totals()[1] - draft0[1]
    assert drafted_s > 0 and drafted_b >= draft.step_weight_bytes * target.stats().spec_verify_steps["draft"] // 4
    assert own > 0 and own + drafted_s <= wall
    assert target.stats().spec_accepted_tokens["draft"] > 0


@pytest.fixture(scope="module")
def dep():
    with demo_deployment(max_num_seqs=4, max_model_len=1024) as d:
        yield d


def _scrape(recorder: Recorder, dep: Deployment) -> dict[tuple[str, str], float]:
    recorder.scrape(dep.stats())
    out = {}
    for fam in text_string_to_metric_families(recorder.metrics.render().decode()):
        for s in fam.samples:
            if s.name in ("sizewise_device_seconds_total", "sizewise_device_bytes_total"):
                out[(s.name, s.labels["model"])] = s.value
    return out


async def test_metrics_show_the_draft_models_device_time_while_it_drafts(dep):
    recorder = Recorder(Metrics())
    recorder.models(dep.describe())
    before = _scrape(recorder, dep)
    small, large = dep.tier_to_model["small"], dep.tier_to_model["large"]
    assert before[("sizewise_device_seconds_total", small)] == 0.0  # series exist from the start
    tok = dep.tokenizer()
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    t0 = time.perf_counter()
    subs = await dep.submit("acct", [Prompt(tok.encode(p)) for p in copy_heavy_prompts()], sp, requested="large",
                            hints=RoutingHints(strategy="draft"))

    async def drain(sub):
        async for _ in sub:
            pass
    await asyncio.gather(*(drain(s) for s in subs))
    wall = time.perf_counter() - t0
    after = _scrape(recorder, dep)
    assert all(s.decision.model == large and s.decision.strategy == "draft" for s in subs)
    grew = {m: after[("sizewise_device_seconds_total", m)] - before[("sizewise_device_seconds_total", m)]
            for m in dep.cores}
    assert grew[small] > 0 and after[("sizewise_device_bytes_total", small)] > before[("sizewise_device_bytes_total", small)]
    assert grew[large] > 0
    assert sum(grew.values()) <= wall
    # the draft's bandwidth is measured although it never stepped for a request of its own
    assert dep.stats().models[small].achieved_bandwidth > 0


def _pld_under_kv_pressure(num_blocks: int) -> tuple[EngineCore, dict[str, int]]:
    """Four copy-heavy requests with prompt lookup on the demo's medium model with `num_blocks` KV
    blocks: too few for all four to grow freely. A spy on the scheduler counts what each step really
    verified: proposals in verify rows, and proposals made but dropped for want of blocks that rode
    in the verify forward as empty (padded) rows."""
    core = EngineCore(demo.demo_model_path("medium"), EngineConfig(
        device="cpu", dtype="float32", max_model_len=1024, max_num_seqs=4, spec_batching="padded",
        kv_cache_bytes=num_blocks * 16 * 5120, block_size=16), name="medium")
    assert core.block_manager.num_blocks == num_blocks  # 16 tokens x 5120 bytes a token per block
    tok = core.tokenizer
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    for i, text in enumerate(f"# {tag}\n{p}" for tag in ("one", "two") for p in copy_heavy_prompts()):
        core.add_request(f"r{i}", tok.encode(text), sp, strategy="pld")
    seen = {"proposed": 0, "verifications": 0, "dropped_in_padded_rows": 0}
    schedule = core.scheduler.schedule

    def spied():
        made = {s: len(s.spec_token_ids) for s in core.scheduler.running}
        out = schedule()
        for s in out.verifies:
            if s.spec_token_ids:
                seen["proposed"] += len(s.spec_token_ids)
                seen["verifications"] += 1
            elif made.get(s):
                seen["dropped_in_padded_rows"] += 1
        return out
    core.scheduler.schedule = spied
    while core.has_unfinished_requests():
        core.step()
    return core, seen


def test_proposals_dropped_for_want_of_blocks_are_not_counted_as_verified():
    """Under KV pressure the scheduler drops proposals that would need blocks kept for decoding; a
    dropped one may still ride in the verify forward as an empty row. The acceptance counters (and
    the acceptance EMA that pld_adaptive and the policy read) count only the proposals verified: a
    dropped proposal counted as made and wholly rejected would drag the acceptance rate down exactly
    when memory is short. Which budgets produce such a row depends on the tokens: several are tried."""
    dropped = 0
    for num_blocks in (47, 50, 44, 53, 41, 56):
        core, seen = _pld_under_kv_pressure(num_blocks)
        st = core.stats()
        assert st.spec_draft_tokens["pld"] == seen["proposed"], (num_blocks, seen, st.spec_draft_tokens)
        assert st.spec_verify_steps["pld"] == seen["verifications"], (num_blocks, seen, st.spec_verify_steps)
        assert 0 < st.spec_accepted_tokens["pld"] <= seen["proposed"]
        dropped += seen["dropped_in_padded_rows"]
        if dropped:
            break
    assert dropped > 0  # the case this is about happened


def test_draft_catch_up_keeps_to_the_draft_engines_token_budget():
    """A new draft shadow catches up with its target's whole prompt: that forward keeps to the draft
    engine's max_num_batched_tokens as a step does (in chunks over several steps; the target decodes
    plainly meanwhile), where it ran every prompt whole in one forward (456 tokens here, budget 64).
    Caught up, the draft proposes as before: its proposals are accepted at a rate only a correct
    cache gives (copy-heavy prompts: about half; proposals over a mis-filled cache are rejected)."""
    budget = 64
    target = EngineCore(demo.demo_model_path("medium"), EngineConfig(**ENGINE), name="medium")
    draft = EngineCore(demo.demo_model_path("small"), EngineConfig(**ENGINE, max_num_batched_tokens=budget),
                       name="small")
    target.attach_draft(draft)
    tok = target.tokenizer
    prompts = [tok.encode(p) for p in copy_heavy_prompts()]
    assert sum(map(len, prompts)) > 2 * budget
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    for i, ids in enumerate(prompts):
        target.add_request(f"r{i}", ids, sp, strategy="draft")
    forwards: list[int] = []  # positions each draft forward computed
    execute = draft.runner.execute

    def counted(step, *a, **kw):
        forwards.append(len(step.decodes) + sum(step.prefill_chunks))
        return execute(step, *a, **kw)
    draft.runner.execute = counted
    while target.has_unfinished_requests():
        target.step()
    assert forwards and max(forwards) <= budget, forwards
    st = target.stats()
    assert st.spec_accepted_tokens["draft"] >= 0.25 * st.spec_draft_tokens["draft"] > 0, st


async def test_the_fair_discipline_charges_drafting_to_the_draft_models_flow():
    """Under `fair`, each core's virtual time is the device time it spent. The draft model's
    proposals run inside its target's step: they are the draft model's device time (as its metrics
    say), so they go to its flow, not the target's (whose share they inflated, slowing its requests
    behind other tiers). Step costs are scripted on a virtual clock: every forward of the target
    takes 10 ms, every one of the draft 3 ms."""
    from sizewise.clock import VirtualClock
    from sizewise.engine.async_engine import AsyncEngine

    clock = VirtualClock()
    target = EngineCore(demo.demo_model_path("medium"), EngineConfig(**ENGINE), name="medium", clock=clock)
    draft = EngineCore(demo.demo_model_path("small"), EngineConfig(**ENGINE), name="small", clock=clock)
    target.attach_draft(draft)
    calls = {"medium": 0, "small": 0}

    def scripted(core, seconds):
        execute = core.runner.execute

        def run(*a, **kw):
            calls[core.name] += 1
            clock.advance(seconds)
            return execute(*a, **kw)
        core.runner.execute = run
    scripted(target, 0.010)
    scripted(draft, 0.003)
    engine = AsyncEngine({"medium": target, "small": draft})
    engine.discipline = "fair"
    try:
        tok = target.tokenizer
        sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        streams = [await engine.add_request(f"d{i}", tok.encode(p), sp, core="medium", strategy="draft")
                   for i, p in enumerate(copy_heavy_prompts())]
        for s in streams:
            async for _ in s:
                pass
    finally:
        engine.shutdown()  # the worker charges a step after delivering its outputs: read the accounts after it
    assert target.stats().spec_draft_tokens["draft"] > 0 and calls["small"] > 0
    used = engine.share.used
    assert used["small"] == pytest.approx(0.003 * calls["small"])
    assert used["medium"] == pytest.approx(0.010 * calls["medium"])
