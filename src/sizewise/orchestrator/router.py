"""The adaptive router: probe the request, read the live telemetry, ask the policy.

Implements the `Router` protocol of `deployment.py`. Per `auto` request: the probe (intent,
difficulty on the probe model's engine, copyability), a telemetry snapshot, then the policy's
choice. A pinned request (`model` names a tier or a model) skips the model probe (only the
model-free copyability and intent features run, for the strategy) and is never moved.
Every decision is counted in `decisions[(tier, reason)]` for `sizewise_route_decisions_total`.
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
        skip = None
        if pinned is None:
            snap = deployment.telemetry.snapshot()
            before = snap.engines[probe_model]
            if before.num_waiting > before.max_num_seqs:
                # The probe would queue FIFO behind more than a batch of waiting requests.
                skip = f"{before.num_waiting} requests wait on {probe_model}"
            elif hints.max_latency_ms is None and policy.probe_is_moot(snap, n_prompt, max_new, params.n):
                skip = "every cheaper tier would join the busy top tier's batch"
        probe = await self.probe.run(
            deployment.engine, probe_core, probe_model, prompt_token_ids, full=pinned is None and skip is None,
        )
        if skip is not None:
            probe.skipped = skip
        snap = deployment.telemetry.snapshot()
        choice: Choice = policy.decide(
            probe, snap, pinned=pinned, strategy=hints.strategy, max_latency_ms=hints.max_latency_ms,
            prompt_tokens=n_prompt, max_new_tokens=max_new, n=params.n, strategies=strategies,
        )
        if single and requested == "auto":
            choice.reason = "single_model"
        deployment.telemetry.note_routed(choice.model, params.n)
        self.decisions[(choice.tier, choice.reason)] += 1
        return Decision(
            model=choice.model, tier=choice.tier, strategy=choice.strategy, reason=choice.reason,
            probe=probe.to_json(),
            extra={
                "steps": choice.steps,
                "score": None if choice.score is None else round(choice.score, 4),
                "estimated_latency_ms": {t: round(v, 2) for t, v in choice.estimates_ms.items()},
                "kv_pressure": {t: round(v, 4) for t, v in choice.kv_pressure.items()},
            },
        )


def _accepted_strategies(core) -> set[str]:
    """What `auto` may pick on this engine: `plain` always; `pld` where speculation is on
    (num_speculative_tokens > 0); `draft` where, in addition, a draft model is attached."""
    if core.spec is None:
        return {"plain"}
    return {"plain", "pld"} | ({"draft"} if core.spec.draft is not None else set())
