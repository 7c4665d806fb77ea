"""The adaptive router: probe the request, read the live telemetry, ask the policy.

Implements the `Router` protocol of `deployment.py`. Per `auto` request: the probe's model-free
signals (intent features, copyability, prompt length), the probe model's prefill (difficulty)
only when the fitted predictor reads it, its answer could change the decision and it would not
be late; a telemetry snapshot; then the policy's choice and its explanation. A pinned request
(`model` names a tier or a model) skips the model probe and is never moved. Every decision is
counted in `decisions[(tier, reason)]` for `sizewise_route_decisions_total`.
"""

from __future__ import annotations

from collections import Counter

from ..sampling_params import SamplingParams
from .policy import TIER_ORDER, Choice, Policy, PolicySettings
from .probe import Probe
from .types import Decision, RoutingHints


class AdaptiveRouter:
    def __init__(self, settings: PolicySettings | None = None) -> None:
        self.settings = settings or PolicySettings()
        self.probe = Probe(self.settings)
        self.decisions: Counter[tuple[str, str]] = Counter()
        self.lam = 0.0  # the price of the last `auto` decision (nats/GB), for the gauge
        self._bound: tuple[object, Policy, str, dict[str, set[str]]] | None = None

    def bind(self, deployment) -> tuple[Policy, str, dict[str, set[str]]]:
        """Per-deployment facts, computed once: the policy, the probe model, the strategies
        each engine accepts. `Deployment` binds its router when it is built, so a probe model it
        does not have fails there (ValueError naming it), not on every `auto` request."""
        if self._bound is None or self._bound[0] is not deployment:  # identity: an id() can be reused
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
        self.decisions[(choice.tier, choice.reason)] += 1
        if pinned is None:
            self.lam = choice.lam
        explain = choice.to_json()
        if choice.strategy_reason:
            explain["strategy_reason"] = choice.strategy_reason
        return Decision(model=choice.model, tier=choice.tier, strategy=choice.strategy, reason=choice.reason,
                        probe=probe.to_json(), explain=explain)

    def known_loss(self, prompt_token_ids: list[int]) -> dict[str, float] | None:
        """Each tier's true loss on this prompt, where a subclass knows it (a benchmark's oracle)."""
        return None

    def _skip_model_probe(self, policy: Policy, snap, probe_model: str, n_prompt: int, max_new: int, n: int,
                          max_latency_ms: float | None) -> str | None:
        """Why the probe model's prefill should not run for this request (None: run it). It runs
        only when a signal it measures could change the decision, and only when it would be
        served within the probe budget: under the worker's priority it waits for the step in
        progress (at most the dearest busy engine's step) and then takes one step of its own."""
        s = self.settings
        if s.always_probe:
            return None
        if not (s.difficulty and "difficulty" in policy.quality.signals) and s.intent_mode != "zero_shot":
            return "no signal the policy keeps needs the probe model"
        if policy.probe_is_moot(snap, n_prompt, max_new, n, max_latency_ms):
            return "lambda is 0 and the top tier meets the SLO: no signal could move the request"
        e = snap.engines[probe_model]
        n_probe = min(n_prompt, s.probe_max_tokens)
        in_progress = max((f.step_cost(min(f.num_running + f.num_waiting, f.max_num_seqs))
                           for f in snap.engines.values() if f.busy), default=0.0)
        late_ms = (in_progress + e.prefill_cost(n_probe) + e.step_seconds_per_token * min(e.num_running, e.max_num_seqs)
                   ) * 1e3
        if late_ms > s.probe_max_ms:
            return f"its step would take ~{late_ms:.0f} ms, over probe_max_ms ({s.probe_max_ms:g})"
        return None


def _accepted_strategies(core) -> set[str]:
    """What `auto` may pick on this engine: `plain` always; `pld` where speculation is on
    (num_speculative_tokens > 0); `draft` where, in addition, a draft model is attached."""
    if core.spec is None:
        return {"plain"}
    return {"plain", "pld"} | ({"draft"} if core.spec.draft is not None else set())
