"""The routing sweep's shared pieces: per-request records, the benchmark's own routers (random at
given shares, an oracle), the per-cell summary, the offline loss at given shares, the targets, the
table and the plot. Used by `benchmarks/routing.py` (real server, wall time) and by the virtual
device's sweep (`sizewise simulate`, virtual time), so both report the same numbers the same way.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from ..orchestrator.policy import TIER_ORDER
from ..orchestrator.router import AdaptiveRouter
from ..orchestrator.types import Decision

TIERS = TIER_ORDER
POLICIES = ("static-small", "static-medium", "static-large", "random", "load-only", "sizewise", "oracle",
            "rate-oracle")


@dataclass(slots=True)
class Record:
    index: int
    arrival: float  # scheduled, seconds from the run's start
    ttft: float
    latency: float
    tier: str
    reason: str
    output_tokens: int
    probe_ms: float | None
    predicted_ms: float | None
    explain: dict = field(default_factory=dict)
    signal: bool = False  # the host-side quality signal (surprisal) was measured for it

# ----- routers only the benchmark needs ---------------------------------------------------------
class RandomRouter:
    """Exactly the sizewise run's count per tier, dealt in a seeded random order."""

    def __init__(self, counts: dict[str, int], seed: int) -> None:
        deck = [t for t in TIERS for _ in range(counts.get(t, 0))]
        random.Random(seed).shuffle(deck)
        self.deck = deck
        self.decisions: dict = {}

    async def route(self, deployment, prompt_token_ids, params, requested, hints) -> Decision:
        tier = self.deck.pop()
        return Decision(model=deployment.tier_to_model[tier], tier=tier, strategy="plain", reason="random")


class OracleRouter(AdaptiveRouter):
    """The objective with every tier's true loss on the request (no probe needed)."""

    def __init__(self, settings, gaps: dict[tuple[int, ...], dict[str, float]]) -> None:
        super().__init__(settings)
        self.gaps = gaps

    def known_loss(self, prompt_token_ids):
        return self.gaps[tuple(prompt_token_ids)]


class KnownRateRouter(AdaptiveRouter):
    """sizewise, its plan told the cell's mean arrival rate instead of measuring it: what the load's
    detection costs (the rest of the gap to the best static size is the device model's)."""

    def __init__(self, settings, rate: float) -> None:
        super().__init__(settings)
        self.rate = rate

    def bind(self, deployment):
        out = super().bind(deployment)
        if self.control is None:
            raise ValueError("the rate-oracle policy needs policy.placement: plan (it tells the plan the rate)")
        self.control.known_rate = self.rate
        return out


def policy_router(policy: str, settings, gaps: dict[str, list[float]], prompts: list, seed: int,
                  counts: dict | None = None, rate: float | None = None):
    """The router one sweep cell runs (the real benchmark's and the virtual device's alike).
    `settings`: the deployment's PolicySettings with the cell's SLO; `gaps`: tier -> each item's loss
    against the top tier (the top tier's own row included); `prompts`: each item's prompt ids; `rate`:
    the cell's mean arrival rate (rate-oracle only)."""
    from ..orchestrator.deployment import StaticRouter
    from ..orchestrator.policy import QualityPredictor, TierFit

    if policy.startswith("static-"):
        return StaticRouter(policy.removeprefix("static-"))
    if policy == "random":
        return RandomRouter(counts, seed + 7)
    top = list(gaps)[-1]
    if policy == "load-only":  # the plan with no signal: each tier's mean gap, who moves is a seeded draw
        settings.quality = QualityPredictor({t: TierFit(statistics.fmean(g), {}, max(statistics.fmean(g), 0))
                                             for t, g in gaps.items() if t != top})
        settings.difficulty = False
        return AdaptiveRouter(settings)
    if policy == "oracle":
        settings.difficulty = False
        return OracleRouter(settings, {tuple(p): {t: g[i] for t, g in gaps.items()} for i, p in enumerate(prompts)})
    if policy == "sizewise":
        return AdaptiveRouter(settings)
    if policy == "rate-oracle":
        if rate is None:
            raise ValueError("the rate-oracle policy needs the cell's arrival rate")
        return KnownRateRouter(settings, rate)
    raise ValueError(f"unknown policy {policy!r}")


def pct(vals: list[float], p: float) -> float:
    v = sorted(vals)
    k = (len(v) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def request_nll(r: Record, nll: dict[str, list[float]]) -> float:
    """The request's quality: its tier's, or, for one moved mid-generation, each tier's weighted by
    the tokens it wrote (an approximation: a tier's per-request NLL is over the whole reference)."""
    moved = r.explain.get("moved") if r.explain else None
    k = moved.get("after_tokens", 0) if moved else 0
    if not k or not r.output_tokens:
        return nll[r.tier][r.index]
    k = min(k, r.output_tokens)
    return (k * nll[moved["from"]][r.index] + (r.output_tokens - k) * nll[r.tier][r.index]) / r.output_tokens


def summarize(policy: str, load: float, recs: list[Record], nll: dict[str, list[float]], slo_s: float) -> dict:
    lat = [r.latency for r in recs]
    ttft = [r.ttft for r in recs]
    span = max(r.arrival + r.latency for r in recs) - min(r.arrival for r in recs)
    ok = sum(r.latency <= slo_s for r in recs)
    large = statistics.fmean(nll["large"])
    q = statistics.fmean(request_nll(r, nll) for r in recs)
    probes = [r.probe_ms for r in recs if r.probe_ms is not None]
    pred = {}
    for t in TIERS:
        mine = [r for r in recs if r.tier == t and r.predicted_ms is not None]
        if mine:
            pred[t] = {"n": len(mine), "predicted_ms": statistics.fmean(r.predicted_ms for r in mine),
                       "measured_ms": statistics.fmean(r.latency * 1e3 for r in mine)}
    lams = [r.explain.get("lambda_nats_per_gb", 0.0) for r in recs if r.explain]
    plans = [r.explain["plan"] for r in recs if r.explain and "plan" in r.explain]
    return {
        "signal_frac": sum(r.signal for r in recs) / len(recs),
        "moved": sum(1 for r in recs if r.explain and "moved" in r.explain),
        "moved_running": sum(1 for r in recs if r.explain and r.explain.get("moved", {}).get("after_tokens")),
        "plan_tier_sets": sorted({",".join(sorted(p["shares"], key=TIERS.index)) for p in plans}),
        "replans": max((p.get("replans", 0) for p in plans), default=0),
        "policy": policy, "load": load, "requests": len(recs),
        "slo_attain": ok / len(recs), "goodput": ok / span, "req_s": len(recs) / span,
        "p50_s": pct(lat, 50), "p95_s": pct(lat, 95), "p99_s": pct(lat, 99),
        "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95), "ttft_p99_s": pct(ttft, 99),
        **{t: sum(r.tier == t for r in recs) / len(recs) for t in TIERS},
        "loss": q / large - 1.0,
        "probe_p50_ms": pct(probes, 50) if probes else None, "probe_p95_ms": pct(probes, 95) if probes else None,
        "lambda_mean": statistics.fmean(lams) if lams else None,
        "reasons": {k: sum(r.reason == k for r in recs) for k in sorted({r.reason for r in recs})},
        "latency_model": pred,
    }


# ----- offline: the loss at given shares ----------------------------------------------------------
def oracle_at_shares(gaps: dict[str, list[float]], counts: dict[str, int]) -> float:
    """Least total gap with exactly counts[t] requests on each tier (exact DP over small/medium use)."""
    import numpy as np

    n = len(gaps["large"])
    ns, nm = counts.get("small", 0), counts.get("medium", 0)
    inf = float("inf")
    table = np.full((ns + 1, nm + 1), inf)
    table[0, 0] = 0.0
    for i in range(n):
        new = table + gaps["large"][i]
        new[1:, :] = np.minimum(new[1:, :], table[:-1, :] + gaps["small"][i])
        new[:, 1:] = np.minimum(new[:, 1:], table[:, :-1] + gaps["medium"][i])
        table = new
    return float(table[ns, nm]) / n

def targets(rows: list[dict], offline: list[dict]) -> dict:
    """Issue 22's targets, read off the table (reported, not asserted)."""
    by = {(r["load"], r["policy"]): r for r in rows}
    lines, out = ["\ntargets:"], {}
    loads = sorted({r["load"] for r in rows}, key=lambda x: (isinstance(x, str), x if not isinstance(x, str) else 0))
    statics = [p for p in POLICIES if p.startswith("static-")]
    dominated, held = [], []
    for load in loads:
        sw = by.get((load, "sizewise"))
        if sw is None:
            continue
        st = [by[(load, p)] for p in statics if (load, p) in by]
        for r in st:  # >= 5 points more requests within the SLO at no more loss
            if r["slo_attain"] >= sw["slo_attain"] + 0.05 and r["loss"] <= sw["loss"] + 1e-9:
                dominated.append(f"{r['policy']}@{load}x ({r['slo_attain']:.2f}/{r['loss']:+.1%} vs "
                                 f"{sw['slo_attain']:.2f}/{sw['loss']:+.1%})")
        good = [r for r in st if r["slo_attain"] >= 0.9]
        if good:
            best = min(r["loss"] for r in good)
            ok = sw["slo_attain"] >= 0.9 and sw["loss"] <= best + 1e-9
            held.append(ok)
            lines.append(f"  {load}x SLO held: sizewise {sw['slo_attain']:.2f} / {sw['loss']:+.2%}; best static holding "
                         f"0.9: {min(good, key=lambda r: r['loss'])['policy']} {best:+.2%}: {'met' if ok else 'NOT met'}")
    out["never_dominated"] = not dominated
    out["slo_held"] = all(held) if held else None
    lines.append("  never dominated (no static tier >= 5 points more attainment at no more loss): "
                 + ("met" if not dominated else "NOT met: " + "; ".join(dominated)))
    for load in (0.25, 0.5):
        sw, lg = by.get((load, "sizewise")), by.get((load, "static-large"))
        if sw and lg:
            ok = sw["loss"] <= 0.005 and sw["p95_s"] <= 1.1 * lg["p95_s"]
            out[f"headroom_{load}"] = ok
            lines.append(f"  {load}x headroom: loss {sw['loss']:+.2%} (<= 0.5%), p95 {sw['p95_s']:.2f} vs large "
                         f"{lg['p95_s']:.2f} s = {sw['p95_s'] / lg['p95_s']:.2f}x (<= 1.1x): {'met' if ok else 'NOT met'}")
    for o in offline:
        mixed = sum(v > 0 for v in o["shares"].values()) >= 2
        if not mixed or o["off_top"] < 0.1:
            continue
        ok = o["gap_closed"] is not None and o["gap_closed"] >= 0.3
        out[f"signal_{o['load']}"] = ok
        lines.append(f"  {o['load']}x signal ({o['off_top']:.0%} off top): sizewise {o['sizewise_loss']:+.2%}, random at "
                     f"these shares {o['random_loss']:+.2%}, oracle {o['oracle_loss']:+.2%}; gap closed "
                     f"{o['gap_closed'] if o['gap_closed'] is not None else float('nan'):.0%} (>= 30%): "
                     f"{'met' if ok else 'NOT met'}")
    sig = [r["signal_frac"] for r in rows if r["policy"] == "sizewise"]
    if sig:
        lines.append(f"  quality signal measured on {min(sig):.0%} (least cell) of sizewise's auto requests")
    out["lines"] = lines
    return out


def plot(rows: list[dict], path: Path, slo_s: float,
         title: str = "routing sweep, demo family on a shared 2-core CPU (timings noisy)") -> None:
    """SLO attainment and quality loss against load per policy, and sizewise's tier shares."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    loads = sorted({r["load"] for r in rows if r["load"] != "burst"})
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    styles = {"static-small": ":", "static-medium": ":", "static-large": ":", "sizewise": "-", "oracle": "--",
              "random": "-.", "load-only": "-.", "rate-oracle": "--"}
    for p in POLICIES:
        pts = sorted((r["load"], r["slo_attain"], r["loss"] * 100) for r in rows if r["policy"] == p and r["load"] != "burst")
        if not pts:
            continue
        lw = 2.5 if p == "sizewise" else 1.2
        axes[0].plot([x for x, _, _ in pts], [a for _, a, _ in pts], styles.get(p, "-"), marker="o", lw=lw, label=p)
        axes[1].plot([x for x, _, _ in pts], [q for _, _, q in pts], styles.get(p, "-"), marker="o", lw=lw, label=p)
    axes[0].set_ylabel(f"SLO attainment ({slo_s:.2f} s)")
    axes[1].set_ylabel("quality loss vs static large (% NLL)")
    sw = {r["load"]: r for r in rows if r["policy"] == "sizewise" and r["load"] != "burst"}
    bottom = [0.0] * len(loads)
    for t in TIERS:
        vals = [sw[x][t] if x in sw else 0.0 for x in loads]
        axes[2].bar([str(x) for x in loads], vals, bottom=bottom, label=t)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[2].set_ylabel("sizewise: share of requests per tier")
    for ax in axes[:2]:
        ax.set_xlabel("load (x static large's capacity)")
    axes[2].set_xlabel("load (x static large's capacity)")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


TABLE_WIDTH = 100  # a terminal; columns past it are named under the table and kept in the JSON


def print_table(rows: list[dict], cols: list[str], width: int = TABLE_WIDTH, file=None) -> None:
    """Columns in the order given (most telling first), as many as fit `width` characters."""
    out = file or sys.stdout
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    shown, used = [], -2
    for c in cols:
        if used + 2 + widths[c] > width and shown:
            break
        shown.append(c)
        used += 2 + widths[c]
    print("  ".join(c.ljust(widths[c]) for c in shown).rstrip(), file=out)
    print("  ".join("-" * widths[c] for c in shown), file=out)
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in shown).rstrip(), file=out)
    if len(shown) < len(cols):
        print(textwrap.fill(f"(also in the JSON: {', '.join(cols[len(shown):])})", width), file=out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
