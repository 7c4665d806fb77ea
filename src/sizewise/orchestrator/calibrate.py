"""Fit the policy's difficulty thresholds to a model family, from measured data.

Given, for a calibration set of requests, the probe's score (what the policy thresholds) and each
tier's quality on the request (mean NLL of a reference continuation), pick the two thresholds
that make routing cheapest while the routed quality stays within `tolerance` (relative) of
serving everything on the largest tier. Cost is per-request bytes a tier streams per decode
step (its weight bytes), so a cheaper tier is worth more the smaller it is.

Pure and exhaustive (every pair of observed scores as thresholds, O(n^2) for n requests): a
few hundred calibration requests take milliseconds. `benchmarks/routing.py --calibrate` runs it
on windows of the held-out split other than the benchmark's and prints the `policy:` values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Calibration:
    max_difficulty_small: float
    max_difficulty_medium: float
    nll: float  # mean quality of the routed mix on the calibration set
    nll_large: float  # everything on the largest tier
    cost: float  # mean relative cost per request (largest tier = 1)
    shares: dict[str, float]


def fit_thresholds(
    scores: list[float], nll: dict[str, list[float]], cost: dict[str, float], tolerance: float = 0.03,
) -> Calibration:
    """`nll[tier][i]`, `cost[tier]` for tiers among small / medium / large (at least the largest)."""
    tiers = [t for t in ("small", "medium", "large") if t in nll]
    if not tiers or not scores:
        raise ValueError("need at least one tier and one request to calibrate")
    n = len(scores)
    if any(len(v) != n for v in nll.values()):
        raise ValueError("every tier needs one NLL per request")
    _check(tolerance, cost, tiers, nll)
    top = tiers[-1]
    rel = {t: cost[t] / cost[top] for t in tiers}
    order = sorted(range(n), key=lambda i: scores[i])
    cands = [-math.inf] + [scores[i] for i in order]  # threshold = a score: that request and below
    # Prefix sums over requests in score order, per tier: routing = small up to a, medium up to b.
    pre = {t: [0.0] for t in tiers}
    for i in order:
        for t in tiers:
            pre[t].append(pre[t][-1] + nll[t][i])
    # The baseline from the same sums as every candidate: summed in another order it can differ in
    # the last bit, and at tolerance 0 even the all-top routing would then miss its own limit.
    base = pre[top][n] / n
    limit = base * (1 + tolerance)
    lo, mid = tiers[0], tiers[1] if len(tiers) == 3 else tiers[0]
    best = None
    for a in range(n + 1):  # the a easiest requests go to the cheapest tier
        for b in range(a, n + 1):  # the next b - a to the middle tier, the rest to the top
            if len(tiers) < 3 and b != a:
                break
            q = (pre[lo][a] + pre[mid][b] - pre[mid][a] + pre[top][n] - pre[top][b]) / n
            if q > limit:
                continue
            c = (a * rel[lo] + (b - a) * rel[mid] + (n - b) * rel[top]) / n
            if best is None or c < best[0] - 1e-12 or (abs(c - best[0]) <= 1e-12 and q < best[1]):
                best = (c, q, a, b)
    c, q, a, b = best  # a = b = 0 (all on the top tier) always meets the limit
    t_small = cands[a] if a else -math.inf
    t_med = cands[b] if len(tiers) == 3 and b > a else t_small
    shares = {lo: a / n, top: (n - b) / n}
    if len(tiers) == 3:
        shares[mid] = (b - a) / n
    return Calibration(t_small, t_med, q, base, c, shares)


def _check(tolerance: float, cost: dict[str, float], tiers: list[str], nll: dict[str, list[float]]) -> None:
    for t in tiers:  # a NaN compares false with every limit: it would pass any tolerance
        bad = next((x for x in nll[t] if not math.isfinite(x)), None)
        if bad is not None:
            raise ValueError(f"nll[{t!r}] holds {bad}: every NLL must be a finite number")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite number >= 0 (relative NLL over the largest tier), got {tolerance}")
    for t in tiers:
        c = cost.get(t)
        if c is None or not (c > 0 and math.isfinite(c)):
            raise ValueError(f"cost[{t!r}] must be a positive number (the tier's bytes per decode step), got {c}")


@dataclass(slots=True, frozen=True)
class PolicyFit:
    calibration: Calibration
    intent_bias: dict[str, float]
    copy_weight: float


def fit_policy(
    probes: list[tuple[float, str, float]], nll: dict[str, list[float]], cost: dict[str, float],
    tolerance: float = 0.03, biases: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0),
    copy_weights: tuple[float, ...] = (0.0, 1.0, 2.0),
) -> PolicyFit:
    """Thresholds plus the score's other two knobs: a bias for prose-like intents (knowledge,
    chat, math; code stays at 0) and the copy discount, by exhaustive search over the given
    values. `probes[i]` = (difficulty, intent, copyability) of request i, as the probe measured."""
    best: PolicyFit | None = None
    for b in biases:
        bias = {"code": 0.0, "knowledge": b, "chat": b, "math": b}
        for w in copy_weights:
            scores = [d + bias.get(i, 0.0) - w * c for d, i, c in probes]
            cal = fit_thresholds(scores, nll, cost, tolerance)
            if best is None or cal.cost < best.calibration.cost - 1e-12 or (
                abs(cal.cost - best.calibration.cost) <= 1e-12 and cal.nll < best.calibration.nll
            ):
                best = PolicyFit(cal, bias, w)
    return best


@dataclass(slots=True, frozen=True)
class OracleRouting:
    tiers: list[str]  # per request
    nll: float
    nll_large: float
    cost: float  # mean relative cost per request (largest tier = 1)
    shares: dict[str, float]


def oracle_routing(nll: dict[str, list[float]], cost: dict[str, float], tolerance: float = 0.03) -> OracleRouting:
    """The cheapest per-request routing whose mean NLL stays within `tolerance` of the largest
    tier's, knowing every tier's NLL on every request: the bound no probe can beat.

    Lagrangian relaxation: for a price `lam` on NLL each request independently takes the tier
    minimising cost + lam * nll; bisect on lam for the cheapest price that meets the limit. Each
    such routing is optimal for its own quality (nothing cheaper is as good), so the answer is
    within one request's move of the exact optimum; a greedy pass then spends the slack left
    under the limit on the moves that save the most."""
    tiers = [t for t in ("small", "medium", "large") if t in nll]
    if not tiers:
        raise ValueError("need at least one tier")
    n = len(nll[tiers[0]])
    if n == 0 or any(len(v) != n for v in nll.values()):
        raise ValueError("every tier needs one NLL per request, and at least one request")
    _check(tolerance, cost, tiers, nll)
    top = tiers[-1]
    base = sum(nll[top]) / n
    limit = base * (1 + tolerance)
    rel = {t: cost[t] / cost[top] for t in tiers}

    def assign(lam: float) -> list[str]:
        return [min(tiers, key=lambda t: (rel[t] + lam * nll[t][i], -tiers.index(t))) for i in range(n)]

    def mean_nll(a: list[str]) -> float:
        return sum(nll[t][i] for i, t in enumerate(a)) / n

    lo, hi = 0.0, 1.0
    while mean_nll(assign(hi)) > limit:  # every request on its best tier meets the limit: terminates
        hi *= 2
        if hi > 1e12:
            break
    if mean_nll(assign(lo)) <= limit:
        hi = lo
    for _ in range(100):
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
        mid = (lo + hi) / 2
        if mean_nll(assign(mid)) <= limit:
            hi = mid
        else:
            lo = mid
    a = assign(hi)
    total = sum(nll[t][i] for i, t in enumerate(a))
    while True:
        moves = [(rel[a[i]] - rel[t], i, t) for i in range(n) for t in tiers
                 if rel[t] < rel[a[i]] and total + nll[t][i] - nll[a[i]][i] <= limit * n]
        if not moves:
            break
        _, i, t = max(moves)
        total += nll[t][i] - nll[a[i]][i]
        a[i] = t
    shares = {t: sum(x == t for x in a) / n for t in tiers}
    return OracleRouting(a, mean_nll(a), base, sum(rel[t] for t in a) / n, shares)
