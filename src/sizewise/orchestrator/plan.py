"""The capacity plan: which tiers serve `auto` traffic, and what share each takes.

A pure function (`make_plan`) of what the telemetry measures: each tier's step-cost line (fixed
seconds per step, i.e. its weight stream, + seconds per decode row + seconds per prefilled prompt
token), the extra a step costs when the device interleaves it with another tier's (measured, never
assumed: an accelerator pays about nothing beyond the extra stream, a CPU whose caches hold one
tier's weights pays much more), the arrival rate and mean prompt/output lengths of `auto` traffic,
the pinned traffic every tier must carry anyway, each tier's calibrated mean loss, a utilisation
target and the SLO. No clock, no engine: tests script every input.

The device model (one worker steps every active tier once per turn; batches of each tier grow
until a turn's per-token work balances what arrives during it). With `active` the tiers that
step, F = sum of their fixed step costs (+ their interleaving extras when there are several), and
rho = sum over tiers of rate_t x w_t, where w_t = output x per-row + prompt x per-prompt-token is a
request's per-token device seconds on tier t (the load utilisation: the share of device time the
per-token work takes; the rest is weight streams, which batching amortises):

    turn T = F / (1 - rho)          latency on t ~ bias_t x (output + 1) x T

So every active tier costs its weight stream in every turn (F), and the SLO caps rho at
1 - (output + 1) F bias / SLO: a second tier lowers the load the device can carry within the SLO.
For a fixed active set the best shares are a linear programme in the shares with two constraints
(they sum to 1; rho under its cap), so an optimum uses at most two tiers: the plan tries each tier
alone and each pair, keeps the feasible option of least expected loss (ties: fewer tiers), and
when nothing is feasible (overload) sends everything to the smallest tier. Each engine's batch is a
third constraint (rate x latency within max_num_seqs, Little): a pair's dearer share is lowered from
the utilisation cap's until both batches fit, so where the top tier alone fails only by its batch a
mix keeps most of the load on it. Hence:
the top tier alone at headroom, two tiers at intermediate loads where a second stream is cheap
enough, the cheapest under overload, shares monotone in load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_SHARE_STEP = 0.01  # how finely a mix's share is lowered to fit the engines' batches

REASONS = ("idle", "headroom", "mix", "single", "overload", "unattainable")


@dataclass(slots=True, frozen=True)
class TierCost:
    """One tier as the plan sees it."""

    fixed_s: float  # seconds per step regardless of its size (weight stream, launches)
    row_s: float  # seconds per decode row
    prefill_token_s: float  # seconds per prefilled prompt token
    loss: float = 0.0  # calibrated mean loss vs the top tier (nats/token; the top tier 0)
    switch_s: float = 0.0  # extra seconds per step when interleaved with another tier (measured)
    max_num_seqs: int = 256
    bias: float = 1.0  # measured / modelled latency of recent requests there (the feedback)

    def work(self, prompt_tokens: float, output_tokens: float) -> float:
        """Per-token device seconds of one request on this tier."""
        return output_tokens * self.row_s + prompt_tokens * self.prefill_token_s


@dataclass(slots=True, frozen=True)
class PlanInputs:
    tiers: dict[str, TierCost]  # cheapest first (small, medium, large)
    auto_rate: float  # `auto` requests per second (the controller's estimate)
    prompt_tokens: float  # mean prompt tokens of `auto` requests
    output_tokens: float  # mean output tokens of `auto` requests
    pinned_rate: dict[str, float] = field(default_factory=dict)  # tier -> pinned requests/s
    slo_s: float | None = None
    util_target: float = 0.85
    min_share: float = 0.05  # a mix gives each of its tiers at least this (a stream for less does not pay)


@dataclass(slots=True, frozen=True)
class Plan:
    shares: dict[str, float]  # tier -> share of `auto` traffic (only tiers with a share > 0)
    active: tuple[str, ...]  # every tier the device steps (auto's and the pinned traffic's), cheapest first
    reason: str  # one of REASONS
    utilization: float  # predicted load utilisation rho
    util_cap: float  # the most rho the SLO and the target allow with this active set
    turn_s: float  # predicted device turn
    latency_s: dict[str, float]  # predicted latency per active tier
    loss: float  # expected loss of an `auto` request (nats/token vs the top tier)
    auto_rate: float
    time: float = 0.0  # when it was made (the caller's clock)

    @property
    def order(self) -> list[str]:
        """Tiers with a share, cheapest first."""
        return [t for t in self.active if self.shares.get(t, 0.0) > 0]

    def to_json(self) -> dict:
        # JSON has no infinity: a saturated device's turn and latencies are null ("unbounded").
        return {"shares": {t: round(s, 4) for t, s in self.shares.items()}, "active": list(self.active),
                "reason": self.reason, "utilization": round(self.utilization, 4), "util_cap": round(self.util_cap, 4),
                "turn_ms": _ms(self.turn_s, 3),
                "latency_ms": {t: _ms(v, 2) for t, v in self.latency_s.items()},
                "loss": round(self.loss, 5), "auto_rate": round(self.auto_rate, 3)}


def _ms(seconds: float, digits: int) -> float | None:
    return round(seconds * 1e3, digits) if math.isfinite(seconds) else None


def _evaluate(inp: PlanInputs, shares: dict[str, float]) -> tuple[bool, float, float, float, dict[str, float], tuple]:
    """(feasible, rho, cap, turn, latency per active tier, active) of given shares."""
    order = list(inp.tiers)
    pinned = {t for t, r in inp.pinned_rate.items() if r > 0 and t in inp.tiers}
    active = tuple(t for t in order if shares.get(t, 0.0) > 0 or t in pinned)
    P, O = inp.prompt_tokens, inp.output_tokens
    many = len(active) > 1
    F = sum(inp.tiers[t].fixed_s + (inp.tiers[t].switch_s if many else 0.0) for t in active)
    rho = sum(inp.auto_rate * s * inp.tiers[t].work(P, O) for t, s in shares.items())
    rho += sum(r * inp.tiers[t].work(P, O) for t, r in inp.pinned_rate.items() if t in inp.tiers)
    bias = max((inp.tiers[t].bias for t in active), default=1.0)
    cap = inp.util_target
    if inp.slo_s is not None:
        cap = min(cap, 1.0 - (O + 1) * F * bias / inp.slo_s)
    turn = F / (1.0 - rho) if rho < 1.0 else math.inf
    lat = {t: inp.tiers[t].bias * (O + 1) * turn for t in active}
    ok = rho <= cap + 1e-12
    for t in active:  # each tier's batch (Little: rate x time in the system) must fit its engine
        rate = inp.auto_rate * shares.get(t, 0.0) + inp.pinned_rate.get(t, 0.0)
        if rate * lat[t] > inp.tiers[t].max_num_seqs:
            ok = False
    return ok, rho, cap, turn, lat, active


def make_plan(inp: PlanInputs, now: float = 0.0) -> Plan:
    """The plan for these inputs (see the module docstring)."""
    order = list(inp.tiers)
    if not order:
        raise ValueError("the plan needs at least one tier")
    if inp.auto_rate < 0 or not math.isfinite(inp.auto_rate):
        raise ValueError(f"auto_rate must be a finite number >= 0, got {inp.auto_rate}")
    top = order[-1]
    loss = {t: inp.tiers[t].loss for t in order}

    def plan_of(shares: dict[str, float], reason: str) -> Plan:
        ok, rho, cap, turn, lat, active = _evaluate(inp, shares)
        return Plan({t: s for t, s in shares.items() if s > 0}, active, reason, rho, max(cap, 0.0), turn, lat,
                    sum(s * loss[t] for t, s in shares.items()), inp.auto_rate, now)

    if inp.auto_rate == 0.0:
        return plan_of({top: 1.0}, "idle")
    options: list[tuple[float, int, float, dict[str, float], str]] = []  # (loss, tiers, rho, shares, reason)
    single = {t: _evaluate(inp, {t: 1.0}) for t in order}  # (feasible, rho, cap, ...) of each tier alone
    for t in order:
        ok, rho, *_ = single[t]
        if ok:
            options.append((loss[t], 1, rho, {t: 1.0}, "headroom" if t == top else "single"))
    P, O = inp.prompt_tokens, inp.output_tokens
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            wa, wb = inp.tiers[a].work(P, O), inp.tiers[b].work(P, O)
            if not (loss[a] > loss[b] and wb > wa):
                continue  # a pair is worth mixing only if the dearer tier is the better one
            # The cap depends on the active set (not on the shares within it): read it once.
            _, rho_a, cap, *_ = _evaluate(inp, {a: 0.5, b: 0.5})
            rest = rho_a - inp.auto_rate * (wa + wb) / 2  # pinned load
            budget = (cap - rest) / inp.auto_rate  # per-request work auto may average
            sb = min((budget - wa) / (wb - wa), 1.0 - inp.min_share)
            if sb < inp.min_share:
                continue  # the cheaper tier alone (or neither) is the answer
            # The utilisation cap gives the most of b (b alone, when it allows all: then b alone is an
            # option of its own, and the mix matters only where b's batch does not fit); each engine's
            # batch (Little) may allow less: the dearer tier's batch grows with its share, so step its
            # share down until both fit.
            while sb >= inp.min_share:
                shares = {a: 1.0 - sb, b: sb}
                ok, rho, *_ = _evaluate(inp, shares)
                if ok:
                    options.append(((1.0 - sb) * loss[a] + sb * loss[b], 2, rho, shares, "mix"))
                    break
                sb -= _SHARE_STEP
    if not options and inp.slo_s is not None and all(single[t][2] <= 0.0 for t in order):
        # No tier meets the SLO even on an idle device (its fixed step cost alone, times the output
        # length, exceeds it): moving down cannot buy what load did not take, so quality decides,
        # among the tiers the utilisation target still lets carry the load.
        for t in reversed(order):
            if single[t][1] <= inp.util_target:
                return plan_of({t: 1.0}, "unattainable")
    if not options:  # overload: the smallest tier carries the most. By size, not by the fitted lines:
        # under overload they are fitted on steps of every batch shape and host noise, and a noisy line
        # once made large look cheapest on the CPU profile (the whole load went to large)
        return plan_of({order[0]: 1.0}, "overload")
    best = min(options, key=lambda o: (round(o[0], 12), o[1], o[2]))
    return plan_of(best[3], best[4])


def assign(plan: Plan, rank: float) -> str:
    """The tier an `auto` request takes given where it falls among recent requests: `rank` in [0, 1)
    orders requests by how little the cheaper tiers lose on them (0: loses least). The cheapest tier
    with a share takes the lowest ranks, up to its share; the next the following ones."""
    order = plan.order
    acc = 0.0
    for t in order:
        acc += plan.shares[t]
        if rank < acc:
            return t
    return order[-1]
