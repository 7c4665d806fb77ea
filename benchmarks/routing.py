#!/usr/bin/env python3
"""Routing benchmark: a load sweep through the HTTP server, judged by SLO attainment, goodput and quality.

    .venv/bin/python benchmarks/routing.py                      # demo family, 96 requests, 6 loads
    .venv/bin/python benchmarks/routing.py --requests 48 --loads 0.5,2   # quicker

Workload: held-out code and prose windows of the demo family (`sizewise.orchestrator.measure`,
windows other than calibration's): P prompt tokens, the next R tokens of the document are the
reference. Every request generates M tokens greedily with ignore_eos (the same work whatever tier
serves it), streamed, so TTFT is measured at the client.

One Poisson schedule (fixed seed) is shared by every policy, scaled to each load: multiples of
static large's capacity (its burst throughput, measured first in the same run). SLO: `--slo-mult`
times one request's unloaded latency on large (measured in the run; stated in the output); the
adaptive policies get it as `policy.slo_ms`.

Policies: static-small / static-medium / static-large; random (tiers dealt at sizewise's shares
at the same load); load-only (the same capacity plan with no quality signal: each tier's loss is
its mean gap, so who moves down is a seeded draw); sizewise (the deployment's policy: the plan,
requests filling its shares by predicted loss); oracle (the same plan, knowing every tier's true
loss on every request). `--loads` takes multiples of static large's capacity and `burst` (every
request within --burst-s of an idle start).

Per cell: SLO attainment, goodput (requests within the SLO per second of the run), p50/p95/p99
latency and TTFT, tier shares, mean quality loss vs static large (mean NLL of the reference under
the serving tier, relative), probe time p50/p95, predicted vs measured latency per tier. Offline
from the per-request quality: the loss of random and of an oracle at sizewise's own shares, and
the fraction of the random-to-oracle gap sizewise closes; the share of requests the quality signal
was measured for, requests moved after placement, the plan's tier sets. Table on stdout, details in
benchmarks/results/routing.json, a quality-vs-goodput plot in benchmarks/results/routing.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json  # noqa: E402

from sizewise.orchestrator.deployment import Deployment, DeploymentConfig, StaticRouter  # noqa: E402
from sizewise.orchestrator.measure import _nll, held_out_items  # noqa: E402
from sizewise.orchestrator.policy import QualityPredictor, TierFit  # noqa: E402
from sizewise.orchestrator.router import AdaptiveRouter  # noqa: E402
from sizewise.orchestrator.types import Decision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
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


# ----- one run ------------------------------------------------------------------------------------
async def run_cell(base: str, items, times: list[float], max_tokens: int) -> list[Record]:
    import httpx

    body_params = dict(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    records: list[Record | None] = [None] * len(items)
    limits = httpx.Limits(max_connections=len(items) + 4, max_keepalive_connections=len(items) + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600.0, limits=limits) as client:
        t0 = time.perf_counter() + 0.05

        async def one(i: int, it, at: float) -> None:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            start = t0 + at
            ttft, ntok, sw = None, 0, {}
            body = {"input_ids": it.prompt, "params": body_params, "model": "auto", "stream": True,
                    "sizewise": {"strategy": "plain"}}
            async with client.stream("POST", "/generate", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if ev.get("token_ids"):
                        if ttft is None:
                            ttft = time.perf_counter() - start
                        ntok += len(ev["token_ids"])
                    sw = ev.get("sizewise") or sw
            latency = time.perf_counter() - start
            probe = sw.get("probe") or {}
            ex = sw.get("explain") or {}
            pred = ex.get("tiers", {}).get(sw["tier"], {}).get("latency_ms")
            records[i] = Record(i, at, ttft if ttft is not None else latency, latency, sw["tier"], sw["reason"],
                                ntok, probe.get("ms"), pred, ex, probe.get("surprisal") is not None)

        await asyncio.gather(*(one(i, it, at) for i, (it, at) in enumerate(zip(items, times))))
    return records  # type: ignore[return-value]


def reset_prefix_caches(dep: Deployment) -> None:
    """Forget every cached prefix (engines idle): no run may reuse an earlier run's prefill."""
    for core in dep.cores.values():
        if core.has_unfinished_requests():
            raise RuntimeError(f"{core.name} is still busy; cannot reset its prefix cache")
        bm = core.block_manager
        bm.hash_to_block.clear()
        for blk in bm.blocks:
            if blk.ref_count == 0:
                blk.hash, blk.token_ids = -1, ()


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
    plans = [r.explain["plan"] for r in recs if r.explain and "plan" in r.explain]
    return {
        "signal_frac": sum(r.signal for r in recs) / len(recs),
        "moved": sum(1 for r in recs if r.explain and "moved" in r.explain),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--requests", type=int, default=96, help="requests per cell (default: 96)")
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=32, help="generated and reference tokens per request")
    ap.add_argument("--code-frac", type=float, default=0.5)
    ap.add_argument("--loads", default="0.25,0.5,1,1.5,2,3,burst",
                    help="multiples of static large's capacity; `burst`: every request within --burst-s from idle")
    ap.add_argument("--burst-s", type=float, default=2.0, help="the burst's span in seconds (default: 2)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--slo-mult", type=float, default=3.0, help="SLO = this x one unloaded request on large")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "routing.json"))
    args = ap.parse_args()
    policies = args.policies.split(",")
    for p in policies:
        if p not in POLICIES:
            raise SystemExit(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}")
    if "random" in policies and "sizewise" not in policies:
        raise SystemExit("random copies sizewise's tier shares: include sizewise")
    loads = [x if x == "burst" else float(x) for x in args.loads.split(",") if x]

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from sizewise.server import ServerThread, create_app

    cfg = DeploymentConfig.from_yaml(args.config)
    cfg.policy.router = "adaptive"
    dep = Deployment.load(cfg)
    server = ServerThread(create_app(dep))
    base = server.start()
    tok = dep.tokenizer()
    items = held_out_items(tok, args.requests, args.prompt_tokens, args.max_tokens, args.code_frac, args.seed)
    t_bench = time.perf_counter()
    rows: list[dict] = []
    try:
        # quality: each tier's NLL of every reference continuation
        async def quality() -> dict[str, list[float]]:
            out = {}
            for t in TIERS:
                m = dep.tier_to_model[t]
                out[t] = list(await asyncio.gather(*(
                    _nll(dep.engine, m, it.prompt + it.ref, len(it.prompt), f"q-{m}-{i}") for i, it in enumerate(items))))
            return out

        nll = asyncio.run(quality())
        gaps = {t: [a - b for a, b in zip(nll[t], nll["large"])] for t in TIERS}
        settings = cfg.policy.to_settings()

        def router_for(policy: str, counts: dict | None = None):
            if policy.startswith("static-"):
                return StaticRouter(policy.removeprefix("static-"))
            if policy == "random":
                return RandomRouter(counts, args.seed + 7)
            s = cfg.policy.to_settings()
            s.slo_ms = slo_ms
            if policy == "load-only":
                s.quality = QualityPredictor({t: TierFit(statistics.fmean(gaps[t]), {}, max(statistics.fmean(gaps[t]), 0))
                                              for t in ("small", "medium")})
                s.difficulty = False
                return AdaptiveRouter(s)
            if policy == "oracle":
                s.difficulty = False
                return OracleRouter(s, {tuple(it.prompt): {t: gaps[t][i] for t in TIERS} for i, it in enumerate(items)})
            return AdaptiveRouter(s)

        def cell(policy: str, times: list[float], counts=None) -> list[Record]:
            dep.router = router_for(policy, counts)
            reset_prefix_caches(dep)
            dep.telemetry.forget_latency()  # every run learns its latency bias from the same start
            return asyncio.run(run_cell(base, items, times, args.max_tokens))

        # warm-up (allocator, HTTP stack, first kernels; gives the telemetry its first steps)
        slo_ms = None
        for p in ("static-small", "static-medium", "static-large"):
            cell(p, [0.0] * min(8, len(items)))
        # and the tiers interleaved: the telemetry measures what a step costs after another tier's
        # (the plan reads it; on this CPU it is far more than a second weight stream)
        k = min(4, len(items) // 3)
        cell("random", [0.0] * (3 * k), {t: k for t in TIERS})
        # one request alone on large, three times: the SLO's unit
        dep.router = StaticRouter("large")
        alone = [asyncio.run(run_cell(base, items[i:i + 1], [0.0], args.max_tokens))[0].latency for i in range(3)]
        slo_s = args.slo_mult * statistics.median(alone)
        slo_ms = slo_s * 1e3
        burst = cell("static-large", [0.0] * len(items))
        cap = len(items) / max(r.arrival + r.latency for r in burst)
        print(f"static-large capacity {cap:.2f} req/s; one request alone on large {statistics.median(alone):.3f} s; "
              f"SLO {slo_s:.3f} s", file=sys.stderr, flush=True)
        rng = random.Random(args.seed + 1)
        unit, t = [], 0.0
        for _ in items:  # one Poisson schedule at rate 1, scaled per load
            unit.append(t)
            t += rng.expovariate(1.0)
        offline = []
        order = [p for p in policies if p != "random"] + (["random"] if "random" in policies else [])
        burst_rng = random.Random(args.seed + 2)
        burst_times = sorted(burst_rng.uniform(0.0, args.burst_s) for _ in items)
        for load in loads:
            times = burst_times if load == "burst" else [x / (load * cap) for x in unit]
            got = {}
            for p in order:
                counts = None
                if p == "random":
                    counts = {t: sum(r.tier == t for r in got["sizewise"][1]) for t in TIERS}
                recs = cell(p, times, counts)
                row = summarize(p, load, recs, nll, slo_s)
                got[p] = (row, recs)
                rows.append(row)
                print(f"  {load!s:>5}x {p:13s} attain {row['slo_attain']:.2f} goodput {row['goodput']:6.1f}/s "
                      f"p95 {row['p95_s']:.2f}s loss {row['loss']:+.2%} large {row['large']:.2f}",
                      file=sys.stderr, flush=True)
            if "sizewise" in got:
                sw = got["sizewise"][1]
                counts = {t: sum(r.tier == t for r in sw) for t in TIERS}
                large = statistics.fmean(nll["large"])
                rnd = sum(counts[t] * statistics.fmean(gaps[t]) for t in TIERS) / len(sw)
                orc = oracle_at_shares(gaps, counts)
                mine = statistics.fmean(gaps[r.tier][r.index] for r in sw)
                closed = (rnd - mine) / (rnd - orc) if rnd - orc > 1e-9 else None
                offline.append({"load": load, "shares": {t: counts[t] / len(sw) for t in TIERS},
                                "off_top": 1 - counts["large"] / len(sw),
                                "sizewise_loss": mine / large, "random_loss": rnd / large, "oracle_loss": orc / large,
                                "gap_closed": closed})
    finally:
        server.stop()
        dep.shutdown()
    bench_s = time.perf_counter() - t_bench

    print(f"\nrouting: {args.requests} requests/cell ({args.code_frac:.0%} code), prompt {args.prompt_tokens}, "
          f"{args.max_tokens} generated (greedy, ignore_eos, streamed over HTTP); static-large capacity "
          f"{cap:.2f} req/s; SLO {slo_s:.3f} s ({args.slo_mult:g}x one request alone on large); {bench_s:.0f} s")
    cols = ["load", "policy", "slo_attain", "goodput", "p50_s", "p95_s", "ttft_p50_s", "ttft_p95_s",
            "small", "medium", "large", "loss", "probe_p50_ms", "moved", "signal_frac"]
    print_table(rows, cols)
    print("\noffline at sizewise's shares (quality loss vs large):")
    print_table(offline, ["load", "off_top", "sizewise_loss", "random_loss", "oracle_loss", "gap_closed"])
    print("\nlatency model (sizewise): predicted vs measured mean ms per tier")
    lm = [{"load": r["load"], "tier": t, **v} for r in rows if r["policy"] == "sizewise" for t, v in r["latency_model"].items()]
    print_table(lm, ["load", "tier", "n", "predicted_ms", "measured_ms"])
    verdict = targets(rows, offline)
    for line in verdict["lines"]:
        print(line)
    out = Path(args.out)
    save_json(out, {"benchmark": "routing", "command": " ".join(sys.argv), "args": vars(args), "bench_s": bench_s,
                    "static_large_capacity_req_s": cap, "slo_s": slo_s, "alone_large_s": alone,
                    "rows": rows, "offline": offline, "verdict": verdict,
                    "quality_per_tier": {t: statistics.fmean(nll[t]) for t in TIERS},
                    "policy": cfg.policy.model_dump(mode="json")})
    plot(rows, out.with_suffix(".png"), slo_s)


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


def plot(rows: list[dict], path: Path, slo_s: float) -> None:
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
              "random": "-.", "load-only": "-."}
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
    fig.suptitle("routing sweep, demo family on a shared 2-core CPU (timings noisy)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
