"""The adaptive router: probe the request, keep the capacity plan current, place the request in it.

Implements the `Router` protocol of `deployment.py`. Per `auto` request: the probe's host-side
signals (surprisal under the family's token statistics, intent features, copyability, prompt
length: microseconds, present at any load), the probe model's prefill (difficulty) only when the
fitted predictor reads it, the plan has two tiers for it to choose between and it would not be
late; then (`policy.placement: plan`, the default) the `PlanController` re-plans when due and
places the request in the plan's shares by its predicted loss (control.py), or (`objective`, the
per-request design the plan replaced) the policy's per-request choice. When a re-plan drops a tier,
its `auto` requests not yet prefilled move to a tier the plan keeps (`AsyncEngine.move_waiting`).
A pinned request (`model` names a tier or a model) skips the model probe and is never moved; it
counts as load the plan must carry. Every decision is counted in `decisions[(tier, reason)]` for
`sizewise_route_decisions_total`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

from ..sampling_params import SamplingParams
from .control import PlanController, plan_bias
from .explain import json_safe
from .policy import TIER_ORDER, Choice, Policy, PolicySettings, signals_of
from .probe import Probe
from .types import Decision, RoutingHints


class AdaptiveRouter:
    def __init__(self, settings: PolicySettings | None = None, clock: Callable[[], float] | None = None) -> None:
        self.settings = settings or PolicySettings()
        self.probe = Probe(self.settings)
        self.clock = clock  # the plan's time; None: the deployment's engine clock (virtual on the simulated device)
        self.decisions: Counter[tuple[str, str]] = Counter()
        self.lam = 0.0  # the price of the last `auto` decision (nats/GB), for the gauge
        self.control: PlanController | None = None  # built at bind (placement: plan)
        self.moved = 0  # waiting requests moved off a tier the plan left
        self.auto_requests = 0
        self.auto_with_signal = 0  # `auto` requests whose predictor inputs were all measured
        self._bound: tuple[object, Policy, str, dict[str, set[str]]] | None = None
        self._cpu = False  # the deployment's device is a CPU (see _route_plan)

    def bind(self, deployment) -> tuple[Policy, str, dict[str, set[str]]]:
        """Per-deployment facts, computed once: the policy, the probe model, the strategies
        each engine accepts. `Deployment` binds its router when it is built, so a probe model it
        does not have fails there (ValueError naming it), not on every `auto` request."""
        if self._bound is None or self._bound[0] is not deployment:  # identity: an id() can be reused
            if self.clock is None:  # the deployment's engine clock: wall, or the virtual device's
                self.clock = deployment.engine.clock.now
            policy = Policy(self.settings, deployment.tier_to_model)
            if self.settings.probe_model is not None:
                try:
                    probe_model = deployment.resolve(self.settings.probe_model)
                except LookupError:
                    raise ValueError(
                        f"policy.probe_model {self.settings.probe_model!r} is not a resident model or tier; "
                        f"resident: {', '.join([*deployment.tier_to_model, *deployment.cores])}") from None
            else:  # the cheapest resident tier: its prefill is the cheapest difficulty estimate
                probe_model = deployment.tier_to_model[next(t for t in TIER_ORDER if t in deployment.tier_to_model)]
            strategies = {name: _accepted_strategies(core) for name, core in deployment.cores.items()}
            deployment.engine.priority_core = probe_model  # probes wait one step, not a turn
            deployment.engine.discipline = self.settings.discipline  # what the latency model predicts
            # a CPU, real or simulated (a simulated accelerator's platform is named after its profile)
            self._cpu = next(iter(deployment.cores.values())).platform.name.removeprefix("sim:") == "cpu"
            if self.settings.placement == "plan":
                losses = {t: (policy.quality.tiers[t].mean if t in policy.quality.tiers else 0.0) for t in policy.tiers}
                slo = self.settings.slo_ms / 1e3 if self.settings.slo_ms is not None else None
                self.control = PlanController(policy.tiers, deployment.tier_to_model, losses, slo_s=slo,
                                              util_target=self.settings.util_target)
            self._bound = (deployment, policy, probe_model, strategies)
        return self._bound[1:]

    async def route(
        self, deployment, prompt_token_ids: list[int], params: SamplingParams, requested: str, hints: RoutingHints,
    ) -> Decision:
        policy, probe_model, strategies = self.bind(deployment)
        pinned = None if requested == "auto" else deployment.resolve(requested)
        single = len(deployment.cores) == 1
        if single:
            pinned = next(iter(deployment.cores))
        probe_core = deployment.cores[probe_model]
        n_prompt = len(prompt_token_ids)
        max_new = params.max_tokens if params.max_tokens is not None else max(probe_core.max_model_len - n_prompt, 1)
        ctl = self.control
        if ctl is not None and not single:
            return await self._route_plan(deployment, policy, probe_model, strategies, ctl, prompt_token_ids, params,
                                          pinned, hints, n_prompt, max_new)
        skip = None if pinned is None else "pinned"
        if skip is None:
            skip = self._skip_model_probe(policy, deployment.telemetry.snapshot(), probe_model, n_prompt, max_new,
                                          params.n, hints.max_latency_ms)
        probe = await self.probe.run(
            deployment.engine, probe_core, probe_model, prompt_token_ids, full=skip is None,
        )
        if skip is not None and pinned is None:
            probe.skipped = skip
        snap = deployment.telemetry.snapshot()
        choice: Choice = policy.decide(
            probe, snap, pinned=pinned, strategy=hints.strategy, max_latency_ms=hints.max_latency_ms,
            prompt_tokens=n_prompt, max_new_tokens=max_new, n=params.n, strategies=strategies,
            known_loss=self.known_loss(prompt_token_ids),
        )
        if single and requested == "auto":
            choice.reason = "single_model"
        deployment.telemetry.note_routed(choice.model, params.n, prompt_token_ids,
                                         choice.latency_ms.get(choice.tier) if pinned is None else None)
        return self._decision(choice, probe, pinned)

    def _decision(self, choice: Choice, probe, pinned) -> Decision:
        self.decisions[(choice.tier, choice.reason)] += 1
        if pinned is None:
            self.lam = choice.lam
        explain = json_safe(choice.to_json())
        if choice.strategy_reason:
            explain["strategy_reason"] = choice.strategy_reason
        return Decision(model=choice.model, tier=choice.tier, strategy=choice.strategy, reason=choice.reason,
                        probe=probe.to_json(), explain=explain)

    async def _route_plan(self, deployment, policy: Policy, probe_model: str, strategies, ctl: PlanController,
                          prompt_token_ids: list[int], params: SamplingParams, pinned: str | None, hints: RoutingHints,
                          n_prompt: int, max_new: int) -> Decision:
        """Placement by the capacity plan (see the module docstring and control.py)."""
        now = self.clock()
        ctl.note_arrival(now, None if pinned is None else deployment.model_to_tier[pinned], n_prompt, max_new,
                         params.n)
        snap = deployment.telemetry.snapshot()
        if ctl.due(now):
            # The backlog the plan must carry: on the tiers the device steps in its turns (the plan in
            # force's, where its turn follows the plan; every tier otherwise).
            turn = deployment.engine.plan_cores
            backlog = (None if turn is None or ctl.plan is None else
                       {t for t, m in deployment.tier_to_model.items() if m in turn})
            plan, old = ctl.replan(snap, now, backlog)
            # The device's turn follows the plan where interleaving is dear: tiers it left step only
            # when its own are idle. Dear: measured (a step after another engine's costs more than
            # half the kept tiers' own fixed step), or a CPU, where the per-step residual reads ~0 on
            # the demo family while whole-run splits of two tiers lose most of their attainment
            # (issue 22's static splits): the cost is in the shared caches and host, not in one step.
            # Where a second stream is cheap (an accelerator) the requests left there keep their share.
            kept = [snap.engines[deployment.tier_to_model[t]] for t in plan.active]
            dear = self._cpu or any(e.switch_seconds > 0.5 * e.step_fixed_seconds for e in kept)
            if old is not None and set(old.shares) - set(plan.shares):
                # Where the tiers it left would then wait, their running requests move down too.
                self._move_off(deployment, old, plan, running=dear and self.settings.move_running)
            deployment.engine.plan_cores = (frozenset(deployment.tier_to_model[t] for t in plan.active) if dear
                                            else None)
            # A mix: one step of each active tier per turn, the turn the plan's device model prices.
            # Under `fair` the dearer tier got half the device, not the share of its step, and missed
            # the SLO the plan had predicted it would meet (910B); on a CPU a few requests on medium
            # took half the device from small's many (a real 3x cell at a 95/5 small/medium plan ran
            # small at p50 1.1 s, static small at 0.49 s in the same run).
            deployment.engine.discipline = "round_robin" if len(plan.active) > 1 else self.settings.discipline
        plan = ctl.plan
        probe_core = deployment.cores[probe_model]
        skip = "pinned" if pinned is not None else self._skip_model_probe(policy, snap, probe_model, n_prompt, plan=plan)
        probe = await self.probe.run(deployment.engine, probe_core, probe_model, prompt_token_ids, full=skip is None)
        if skip is not None and pinned is None:
            probe.skipped = skip
        known = self.known_loss(prompt_token_ids)
        sig = signals_of(probe)
        loss = {t: known[t] if known is not None else policy.quality.loss(t, sig) for t in policy.tiers}
        # The plan's latency where it has one; the per-request model for the tiers it leaves out.
        lat = {t: plan.latency_s[t] * 1e3 if plan.latency_s.get(t, math.inf) < math.inf else
               Policy.estimate_ms(snap, deployment.tier_to_model[t], n_prompt, max_new, params.n,
                                  self.settings.discipline) for t in policy.tiers}
        slo = hints.max_latency_ms if hints.max_latency_ms is not None else self.settings.slo_ms
        if pinned is not None:
            tier, placement, reason = deployment.model_to_tier[pinned], None, "pinned"
        else:
            self.auto_requests += 1
            if known is not None or all(c in sig for c in policy.quality.signals):
                self.auto_with_signal += 1
            placement = ctl.place(loss)
            tier, reason = placement.tier, f"plan:{plan.reason}"
            tier = _tier_running(deployment, tier, hints.strategy, strategies)
        model = pinned if pinned is not None else deployment.tier_to_model[tier]
        strat, why = policy._strategy(hints.strategy, tier, snap.engines.get(model), probe, params.n,
                                      strategies.get(model, {"plain"}))
        choice = Choice(model=model, tier=tier, strategy=strat, reason=reason, slo_ms=slo, loss=loss, latency_ms=lat,
                        strategy_reason=why, plan=plan.to_json() | {"replans": ctl.replans, "moves": self.moved},
                        placement=placement.to_json() if placement is not None else None)
        # The plan's latency without the measured bias is what the telemetry scores (bias = measured /
        # modelled): scoring a prediction that already holds the bias would make the bias oscillate.
        # Only in a steady plan: within an SLO of a change of tiers, or while a tier the plan left still
        # steps, a request shares the device with work the plan does not model (the old tier's
        # backlog); scored, it taught the bias a transient and the plan left a tier that would hold.
        modelled = plan.latency_s.get(tier, 0.0) / plan_bias(snap.engines[model].finished_bias) * 1e3
        steady = (now - ctl.changed_at >= (ctl.slo_s or 0.0)
                  and not any(e.busy for e in snap.engines.values() if e.tier not in plan.active))
        deployment.telemetry.note_routed(model, params.n, prompt_token_ids,
                                         modelled if pinned is None and steady and modelled < float("inf") else None)
        return self._decision(choice, probe, pinned)

    def _move_off(self, deployment, old, plan, running: bool = False) -> None:
        """The plan left tiers: their waiting `auto` requests go to the kept tier nearest in size
        (the next cheaper one, else the cheapest), before they are prefilled. `running`: those
        already decoding too, where the kept tier is cheaper (their tokens so far become its
        prompt: a request a cold start put on large need not finish there)."""
        kept = plan.order
        for t in set(old.shares) - set(plan.shares):
            below = [k for k in kept if TIER_ORDER.index(k) < TIER_ORDER.index(t)]
            to = below[-1] if below else kept[0]
            move = getattr(deployment.engine, "move_waiting", None)
            if move is not None:
                move(deployment.tier_to_model[t], deployment.tier_to_model[to], running=running and bool(below))

    def known_loss(self, prompt_token_ids: list[int]) -> dict[str, float] | None:
        """Each tier's true loss on this prompt, where a subclass knows it (a benchmark's oracle)."""
        return None

    def _skip_model_probe(self, policy: Policy, snap, probe_model: str, n_prompt: int, max_new: int = 0, n: int = 1,
                          max_latency_ms: float | None = None, plan=None) -> str | None:
        """Why the probe model's prefill should not run for this request (None: run it). It runs
        only when a signal it measures could change the decision (under a capacity `plan`: the plan
        has two tiers to choose between), and only when it would be served within the probe budget:
        under the worker's priority it waits for the step in progress (at most the dearest busy
        engine's step) and then takes one step of its own (per-request placement: with its engine's
        running rows)."""
        s = self.settings
        if s.always_probe:
            return None
        if not (s.difficulty and "difficulty" in policy.quality.signals) and s.intent_mode != "zero_shot":
            return "no signal the policy keeps needs the probe model"
        if plan is not None and len(plan.order) < 2:
            return "the plan has one tier for auto: no signal could move the request"
        if plan is None and policy.probe_is_moot(snap, n_prompt, max_new, n, max_latency_ms):
            return "lambda is 0 and the top tier meets the SLO: no signal could move the request"
        e = snap.engines[probe_model]
        n_probe = min(n_prompt, s.probe_max_tokens)
        in_progress = max((f.step_cost(min(f.num_running + f.num_waiting, f.max_num_seqs))
                           for f in snap.engines.values() if f.busy), default=0.0)
        own_rows = 0 if plan is not None else e.step_seconds_per_token * min(e.num_running, e.max_num_seqs)
        late_ms = (in_progress + e.prefill_cost(n_probe) + own_rows) * 1e3
        if late_ms > s.probe_max_ms:
            return f"its step would take ~{late_ms:.0f} ms, over probe_max_ms ({s.probe_max_ms:g})"
        return None


def _tier_running(deployment, tier: str, strategy: str, strategies: dict[str, set[str]]) -> str:
    """The placed tier, or, where it cannot run the strategy the client asked for (`draft` on the
    smallest tier, which is the draft model), the nearest tier that can, larger ones first."""
    if strategy == "auto" or strategy in strategies.get(deployment.tier_to_model[tier], {"plain"}):
        return tier
    order = [t for t in TIER_ORDER if t in deployment.tier_to_model]
    i = order.index(tier)
    for t in order[i + 1:] + order[:i][::-1]:
        if strategy in strategies.get(deployment.tier_to_model[t], {"plain"}):
            return t
    return tier  # no tier runs it: the engine's validation names the strategy


def _accepted_strategies(core) -> set[str]:
    """What `auto` may pick on this engine: `plain` always; `pld` where speculation is on
    (num_speculative_tokens > 0); `draft` where, in addition, a draft model is attached."""
    if core.spec is None:
        return {"plain"}
    return {"plain", "pld"} | ({"draft"} if core.spec.draft is not None else set())
