"""Fit the policy's quality predictor to a model family, from measured data; and the oracle.

Given, for a calibration set of requests, the probe's signals and each tier's quality on the
request (mean NLL of a reference continuation), `fit_quality` fits per tier the NLL gap to the top
tier as a linear function of the signals (ridge least squares), keeping only the signals that
lower the gap's error on held-out folds: a signal that does not predict the gap better than its
mean is left out, so the probe does not pay for it. Pure: a few hundred requests take
milliseconds. `sizewise calibrate` measures the data (`measure.py`) and writes the result into
the deployment's `policy.quality`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .policy import SIGNALS, QualityPredictor, TierFit
from .tiers import TIER_ORDER

# Signals the live probe cannot produce: measured and reported at calibration, never kept.
OFFLINE_SIGNALS = ("prompt_gap",)
# Signals that need the probe model's prefill, which is skipped when it would be late (under load,
# exactly where placement matters): reported, kept only with `model_signals=True`.
MODEL_SIGNALS = ("difficulty",)
_MIN_GAIN = 0.02  # a signal is kept if it lowers the held-out squared error by at least 2%


@dataclass(slots=True, frozen=True)
class QualityFit:
    predictor: QualityPredictor
    signals: list[str]  # kept, in the order forward selection added them
    report: dict  # held-out mean squared error (nats^2) per signal set, per tier summed


def _design(signals: list[dict[str, float]], names: list[str]) -> np.ndarray:
    # x: [N, 1 + len(names)] (a constant column first)
    return np.array([[1.0] + [s[n] for n in names] for s in signals], dtype=np.float64)


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float = 1e-3) -> np.ndarray:
    # x: [N, F], y: [N] -> w: [F]; features are standardised so one alpha fits any scale
    mu, sd = x[:, 1:].mean(0), x[:, 1:].std(0) + 1e-9
    z = np.concatenate([x[:, :1], (x[:, 1:] - mu) / sd], 1)
    reg = alpha * len(y) * np.eye(z.shape[1])
    reg[0, 0] = 0.0
    wz = np.linalg.solve(z.T @ z + reg, z.T @ y)
    w = np.empty_like(wz)
    w[1:] = wz[1:] / sd
    w[0] = wz[0] - (wz[1:] * mu / sd).sum()
    return w


def _cv_error(x: np.ndarray, gaps: dict[str, np.ndarray], folds: int) -> float:
    """Held-out mean squared error of the gap, summed over tiers (k folds, fixed split)."""
    n = x.shape[0]
    idx = np.arange(n) % folds
    err = 0.0
    for y in gaps.values():
        for k in range(folds):
            tr, te = idx != k, idx == k
            w = _ridge(x[tr], y[tr])
            err += float(((x[te] @ w - y[te]) ** 2).sum())
    return err / n


def fit_quality(signals: list[dict[str, float]], nll: dict[str, list[float]], folds: int = 5,
                candidates: tuple[str, ...] = SIGNALS, model_signals: bool = False) -> QualityFit:
    """`signals[i]`: what the probe measured on request i; `nll[tier][i]`: the tier's reference NLL.
    The top tier is the last of small / medium / large present; every other tier gets a fit."""
    tiers = [t for t in TIER_ORDER if t in nll]
    if len(tiers) < 2:
        raise ValueError("calibration needs at least two tiers (one to predict against the top one)")
    n = len(signals)
    if any(len(v) != n for v in nll.values()):
        raise ValueError("every tier needs one NLL per request")
    if n < 2 * folds:
        raise ValueError(f"calibration needs at least {2 * folds} requests, got {n}")
    for t in tiers:
        bad = next((x for x in nll[t] if not math.isfinite(x)), None)
        if bad is not None:
            raise ValueError(f"nll[{t!r}] holds {bad}: every NLL must be a finite number")
    top = tiers[-1]
    gaps = {t: np.array(nll[t]) - np.array(nll[top]) for t in tiers[:-1]}
    present = [c for c in candidates if all(c in s and math.isfinite(s[c]) for s in signals)]
    base = _cv_error(_design(signals, []), gaps, folds)
    report: dict = {"requests": n, "folds": folds, "mean_only": base, "single": {}, "steps": []}
    for c in present:
        report["single"][c] = _cv_error(_design(signals, [c]), gaps, folds)
    kept: list[str] = []
    best = base
    live = [c for c in present if c not in OFFLINE_SIGNALS and (model_signals or c not in MODEL_SIGNALS)]
    while True:
        trial = {c: _cv_error(_design(signals, kept + [c]), gaps, folds) for c in live if c not in kept}
        if not trial:
            break
        c = min(trial, key=trial.get)
        if trial[c] > best * (1 - _MIN_GAIN):
            break
        kept.append(c)
        best = trial[c]
        report["steps"].append({"added": c, "error": best})
    report["kept_error"] = best
    x = _design(signals, kept)
    fits = {}
    for t, y in gaps.items():
        w = _ridge(x, y)
        fits[t] = TierFit(float(w[0]), {c: float(v) for c, v in zip(kept, w[1:])}, float(max(y.mean(), 0.0)))
    return QualityFit(QualityPredictor(fits), kept, report)


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
    tiers = [t for t in TIER_ORDER if t in nll]
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
