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

from ..orchestrator.router import AdaptiveRouter
from ..orchestrator.types import Decision

TIERS = ("small", "medium", "large")
POLICIES = ("static-small", "static-medium", "static-large", "random", "load-only", "sizewise", "oracle")


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


def pct(vals: list[float], p: float) -> float:
    v = sorted(vals)
    k = (len(v) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(policy: str, load: float, recs: list[Record], nll: dict[str, list[float]], slo_s: float) -> dict:
    lat = [r.latency for r in recs]
    ttft = [r.ttft for r in recs]
    span = max(r.arrival + r.latency for r in recs) - min(r.arrival for r in recs)
    ok = sum(r.latency <= slo_s for r in recs)
    large = statistics.fmean(nll["large"])
    q = statistics.fmean(nll[r.tier][r.index] for r in recs)
    probes = [r.probe_ms for r in recs if r.probe_ms is not None]
    pred = {}
    for t in TIERS:
        mine = [r for r in recs if r.tier == t and r.predicted_ms is not None]
        if mine:
            pred[t] = {"n": len(mine), "predicted_ms": statistics.fmean(r.predicted_ms for r in mine),
                       "measured_ms": statistics.fmean(r.latency * 1e3 for r in mine)}
    lams = [r.explain.get("lambda_nats_per_gb", 0.0) for r in recs if r.explain]
    return {
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
    """Issue 13's targets, read off the table (reported, not asserted)."""
    by = {(r["load"], r["policy"]): r for r in rows}
    lines, out = ["\ntargets:"], {}

    def get(load, p):
        return by.get((load, p))

    for load in (0.25, 0.5):
        sw, lg = get(load, "sizewise"), get(load, "static-large")
        if sw and lg:
            ok = sw["loss"] <= 0.005 and sw["p95_s"] <= 1.1 * lg["p95_s"]
            out[f"headroom_{load}"] = ok
            lines.append(f"  {load}x headroom: loss {sw['loss']:+.2%} (<= 0.5%), p95 {sw['p95_s']:.2f} vs large "
                         f"{lg['p95_s']:.2f} s = {sw['p95_s'] / lg['p95_s']:.2f}x (<= 1.1x): {'met' if ok else 'NOT met'}")
    sw, lg = get(2.0, "sizewise"), get(2.0, "static-large")
    if sw and lg:
        ok = sw["slo_attain"] >= 0.9 and lg["slo_attain"] < 0.5 and sw["goodput"] >= 2 * lg["goodput"]
        out["overload_2x"] = ok
        lines.append(f"  2x: attainment {sw['slo_attain']:.2f} (>= 0.9) vs large {lg['slo_attain']:.2f} (< 0.5), goodput "
                     f"{sw['goodput']:.1f} vs {lg['goodput']:.1f} = {sw['goodput'] / max(lg['goodput'], 1e-9):.2f}x "
                     f"(>= 2x): {'met' if ok else 'NOT met'}")
    sw = get(3.0, "sizewise")
    if sw:
        out["overload_3x"] = sw["slo_attain"] >= 0.8
        lines.append(f"  3x: attainment {sw['slo_attain']:.2f} (>= 0.8): {'met' if out['overload_3x'] else 'NOT met'}")
    for o in offline:
        if o["off_top"] < 0.1:
            continue
        lo = get(o["load"], "load-only")
        rd = get(o["load"], "random")
        sw = get(o["load"], "sizewise")
        below = (lo is None or sw["loss"] < lo["loss"]) and sw["loss"] < o["random_loss"] and (rd is None or sw["loss"] < rd["loss"])
        closed = o["gap_closed"] is not None and o["gap_closed"] >= 0.5
        out[f"probe_{o['load']}"] = below and closed
        lines.append(f"  {o['load']}x probe ({o['off_top']:.0%} off top): loss {sw['loss']:+.2%} vs load-only "
                     f"{lo['loss'] if lo else float('nan'):+.2%}, random {rd['loss'] if rd else float('nan'):+.2%} "
                     f"(offline {o['random_loss']:+.2%}), oracle at these shares {o['oracle_loss']:+.2%}; gap closed "
                     f"{o['gap_closed'] if o['gap_closed'] is not None else float('nan'):.0%} (>= 50%): "
                     f"{'met' if below and closed else 'NOT met'}")
    dominated = []
    for r in rows:
        if r["policy"].startswith("static-"):
            sw = get(r["load"], "sizewise")
            if sw and r["slo_attain"] > sw["slo_attain"] and r["loss"] < sw["loss"]:
                dominated.append(f"{r['policy']}@{r['load']}x")
    out["never_dominated"] = not dominated
    lines.append(f"  never dominated by a static size: {'met' if not dominated else 'NOT met: ' + ', '.join(dominated)}")
    probe_ok = all((r["probe_p50_ms"] or 0) <= 2 and (r["probe_p95_ms"] or 0) <= 10
                   for r in rows if r["policy"] == "sizewise" and r["load"] <= 1)
    out["probe_time"] = probe_ok
    lines.append("  probe p50 <= 2 ms, p95 <= 10 ms at <= 1x: " + ("met" if probe_ok else "NOT met") + " (" + ", ".join(
        f"{r['load']}x {r['probe_p50_ms'] or 0:.1f}/{r['probe_p95_ms'] or 0:.1f} ms" for r in rows
        if r["policy"] == "sizewise" and r["load"] <= 1) + ")")
    out["lines"] = lines
    return out

def plot(rows: list[dict], path: Path, slo_s: float, title: str = "routing across the load sweep (demo family)") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in POLICIES:
        pts = sorted((r["load"], r["goodput"], r["loss"] * 100) for r in rows if r["policy"] == p)
        if pts:
            ax.plot([g for _, g, _ in pts], [q for _, _, q in pts], marker="o", label=p)
            for load, g, q in pts:
                ax.annotate(f"{load:g}x", (g, q), fontsize=6, alpha=0.6)
    ax.set_xlabel(f"goodput (requests/s within the {slo_s:.2f} s SLO)")
    ax.set_ylabel("quality loss vs static large (% NLL)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
