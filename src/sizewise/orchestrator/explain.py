"""A routing decision in one sentence a person reads without the docs: which tier, the constraint
that decided, the predicted against the objective latency, and the quality cost against the top tier.

Reads only what a decision already carries (its tier and reason, the policy's `explain` fields:
`slo_ms`, per tier `latency_ms` and `loss`, and the probe's `ms`), so any policy that fills those
fields is explained the same way. The quality cost is shown as perplexity: a loss of L nats/token
against the top tier is a perplexity exp(L) times the top tier's, i.e. +(exp(L) - 1) x 100 %.
"""

from __future__ import annotations

import math

_WHY = {
    "objective:quality": "the best predicted quality{slo_clause}",
    "objective:price": "the device is busy (load {pressure}), so a cheaper tier was worth its quality cost",
    "slo": "a better tier would miss the latency objective",
    "slo:best_effort": "no tier is predicted to meet the latency objective, so the fastest one",
    "kv_pressure": "a better tier's KV cache has no room for this request",
    "pinned": "the request named this model",
    "single_model": "the only model served",
    "static": "the static router sends auto to the largest tier",
    # The capacity plan (orchestrator/plan.py): the suffix is the plan's reason.
    "plan:idle": "the device is idle, so the top tier",
    "plan:headroom": "the device has headroom for the top tier alone",
    "plan:mix": "the load is more than the top tier can carry within the objective, so the plan mixes two tiers "
                "and this request loses least on the cheaper one or gains most on the dearer",
    "plan:single": "the load needs a smaller tier for every auto request to meet the objective",
    "plan:overload": "the load is more than any tier can carry within the objective, so the cheapest carries it",
    "plan:unattainable": "no tier meets the latency objective even on an idle device, so quality decides",
}


def summary(tier: str, reason: str, explain: dict | None, probe: dict | None = None) -> str:
    """e.g. 'small tier: a better tier would miss the latency objective (predicted 180 ms against
    the 250 ms objective); quality cost: perplexity +31% against large.'"""
    tiers = (explain or {}).get("tiers") or {}
    slo = (explain or {}).get("slo_ms")
    why = _WHY.get(reason, reason).format(
        slo_clause=" that meets the latency objective" if slo is not None else "",
        pressure=f"{(explain or {}).get('pressure', 0.0):.0%}")
    if tier not in tiers:
        return f"{tier} tier: {why}."
    # The client waits for the probe too: the policy compares latency + probe time with the objective.
    predicted = tiers[tier].get("latency_ms", 0.0) + float((probe or {}).get("ms") or 0.0)
    latency = (f"predicted {predicted:.0f} ms against the {slo:.0f} ms objective" if slo is not None
               else f"predicted {predicted:.0f} ms, no latency objective")
    top = list(tiers)[-1]  # the policy lists tiers cheapest first
    loss = tiers[tier].get("loss", 0.0)
    quality = ("no quality cost (the top tier)" if tier == top
               else f"quality cost: perplexity +{math.expm1(max(loss, 0.0)) * 100:.0f}% against {top}")
    return f"{tier} tier: {why} ({latency}); {quality}."


def json_safe(value):
    """`value` with every non-finite float as None: JSON has no infinity or NaN (a saturated
    device's predicted latency is unbounded), and a strict client's parser rejects them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
