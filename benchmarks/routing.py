#!/usr/bin/env python3
"""Routing benchmark: sizewise's adaptive routing vs static sizes and random routing, end to end.

    python benchmarks/routing.py                          # demo family, through the HTTP server
    python benchmarks/routing.py --requests 24 --rates 0.5,1.0   # quicker
    python benchmarks/routing.py --no-server              # drive the Deployment directly

Workload: a mixed stream of held-out code and prose (the demo family's held-out split,
`sizewise.demo`): each request is a window of P prompt tokens from a held-out document, and the
next R tokens of the document are its reference continuation. Every policy sees the same
requests in the same order with the same Poisson arrival times (open loop), generates greedily
with ignore_eos, so every request does the same amount of work whatever tier serves it.

Policies, one deployment (all three tiers co-resident; the router is swapped between runs and
the prefix caches are emptied so no run reuses another's prefill):
  static-small / static-medium / static-large: every request to one tier;
  sizewise: the adaptive router (probe + telemetry + policy; strategy `auto`);
  random: tiers drawn at random with sizewise's tier shares at the same rate (equal large share);
  oracle: each request on the tier an all-knowing router would choose (it knows every tier's NLL
    on the reference): the cheapest routing within the quality tolerance, cost = each static
    tier's measured burst seconds per request. The headroom any probe could reach.

Rates: a burst (all requests at t=0: capacity) then Poisson arrivals at the given multiples of
static-large's measured capacity (requests/s).

Per run: output tokens/s and requests/s (output tokens / makespan from first arrival to last
completion), p50 / p95 end-to-end latency (from the scheduled arrival to the response, so it
includes HTTP, the probe, queueing and decode), share per tier, and quality: the mean NLL
(nats/token) of each request's reference continuation under the tier that served it (computed
once per tier and request with prompt logprobs through the same engines).

Targets (reported, not asserted): sizewise's quality within 3% of static large's, at least 1.5x
its throughput at the same p95 latency, and better quality than random routing at equal large
share. Results: a table on stdout and benchmarks/results/routing.json.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json  # noqa: E402

from sizewise import SamplingParams  # noqa: E402
from sizewise.orchestrator.deployment import Deployment, DeploymentConfig, StaticRouter  # noqa: E402
from sizewise.orchestrator.router import AdaptiveRouter  # noqa: E402
from sizewise.orchestrator.types import Decision, RoutingHints  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIERS = ("small", "medium", "large")


@dataclass(slots=True)
class Item:
    kind: str  # code | prose
    source: str  # held-out file or topic
    prompt: list[int]
    ref: list[int]


@dataclass(slots=True)
class Record:
    index: int
    arrival: float  # scheduled, seconds from the run's start
    done: float
    tier: str
    model: str
    strategy: str
    reason: str
    output_tokens: int
    probe_ms: float | None


# ----- workload ------------------------------------------------------------------------------
def held_out_docs() -> list[tuple[str, str, str]]:
    """(kind, source, text) of the demo family's held-out split; stdlib files if it is absent."""
    try:
        from sizewise import demo
    except ImportError:
        demo = None
    docs = []
    if demo is not None:
        s = demo.split()
        for rel in s.held_out_code:
            text = demo.read_code(rel)
            if text:
                docs.append(("code", rel, text))
        topics = demo.prose_topics()
        docs += [("prose", k, topics[k]) for k in s.held_out_prose]
    else:  # pragma: no cover - the module ships with the package
        import sysconfig

        root = Path(sysconfig.get_paths()["stdlib"])
        docs = [("code", p.name, p.read_text(errors="replace")) for p in sorted(root.glob("*.py"))[:40]]
    return docs


def build_workload(tokenizer, n: int, prompt_tokens: int, ref_tokens: int, code_frac: float, seed: int) -> list[Item]:
    rng = random.Random(seed)
    need = prompt_tokens + ref_tokens
    pools: dict[str, list[tuple[str, list[int]]]] = {"code": [], "prose": []}
    for kind, src, text in held_out_docs():
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= need:
            pools[kind].append((src, ids))
    for kind, pool in pools.items():
        if not pool:
            raise SystemExit(f"no held-out {kind} document has {need} tokens; lower --prompt-tokens / --ref-tokens")
    items = []
    for i in range(n):
        kind = "code" if rng.random() < code_frac else "prose"
        src, ids = rng.choice(pools[kind])
        start = rng.randrange(0, len(ids) - need + 1)
        items.append(Item(kind, src, ids[start:start + prompt_tokens], ids[start + prompt_tokens:start + need]))
    return items


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# ----- quality: NLL of each reference continuation under each tier -------------------------------
async def quality_matrix(dep: Deployment, items: list[Item]) -> dict[str, list[float]]:
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)

    async def one(model: str, i: int, it: Item) -> float:
        ids = it.prompt + it.ref
        plp = None
        async for out in await dep.engine.add_request(f"quality-{model}-{i}", ids, params, core=model):
            if out.prompt_logprobs is not None:
                plp = out.prompt_logprobs
        p = len(it.prompt)
        return -statistics.fmean(plp[p + j][ids[p + j]] for j in range(len(it.ref)))

    out = {}
    for model in dep.cores:
        out[model] = list(await asyncio.gather(*(one(model, i, it) for i, it in enumerate(items))))
    return out


# ----- routers that only the benchmark needs ------------------------------------------------------
class RandomRouter:
    """The equal-share baseline: exactly the sizewise run's number of requests per tier, dealt
    to the requests in a seeded random order (a shuffled deck, not independent draws)."""

    def __init__(self, shares: dict[str, float], n: int, seed: int) -> None:
        deck = [t for t in TIERS for _ in range(round(shares.get(t, 0.0) * n))]
        deck += [max(shares, key=shares.get)] * (n - len(deck))  # rounding
        random.Random(seed).shuffle(deck)
        self.deck = deck[:n]
        self.decisions: dict = {}

    async def route(self, deployment, prompt_token_ids, params, requested, hints) -> Decision:
        tier = self.deck.pop()
        model = deployment.tier_to_model[tier]
        strategy = "plain" if hints.strategy == "auto" else hints.strategy
        return Decision(model=model, tier=tier, strategy=strategy, reason="random")


class OracleRouter:
    """The bound no probe can beat: each request goes to the tier an all-knowing router would
    pick, knowing every tier's NLL on its reference continuation (`oracle_routing`: cheapest
    routing within the quality tolerance, cost = each tier's measured burst time per request)."""

    def __init__(self, tiers_by_prompt: dict[tuple[int, ...], str]) -> None:
        self.tiers_by_prompt = tiers_by_prompt
        self.decisions: dict = {}

    async def route(self, deployment, prompt_token_ids, params, requested, hints) -> Decision:
        tier = self.tiers_by_prompt[tuple(prompt_token_ids)]
        strategy = "plain" if hints.strategy == "auto" else hints.strategy
        return Decision(model=deployment.tier_to_model[tier], tier=tier, strategy=strategy, reason="oracle")


async def calibrate(dep: Deployment, router: AdaptiveRouter, items: list[Item], tolerance: float) -> dict:
    """Fit the difficulty thresholds on these (calibration) items: probe scores from the real
    probe, each tier's quality from its engine, cost = weight bytes per tier."""
    from sizewise.orchestrator.calibrate import fit_policy

    probe_model = dep.tier_to_model[next(t for t in TIERS if t in dep.tier_to_model)]
    core = dep.cores[probe_model]
    probes = []
    for it in items:
        res = await router.probe.run(dep.engine, core, probe_model, it.prompt)
        diff = res.difficulty if res.difficulty is not None else router.settings.max_difficulty_medium
        probes.append((diff, res.intent, res.copyability))
    quality = await quality_matrix(dep, items)
    nll = {dep.model_to_tier[m]: q for m, q in quality.items()}
    cost = {dep.model_to_tier[m]: float(c.weight_bytes) for m, c in dep.cores.items()}
    fit = fit_policy(probes, nll, cost, tolerance)
    cal = fit.calibration
    return {"max_difficulty": {"small": cal.max_difficulty_small, "medium": cal.max_difficulty_medium},
            "intent_bias": fit.intent_bias, "copy_weight": fit.copy_weight,
            "nll": cal.nll, "nll_large": cal.nll_large, "cost": cal.cost, "shares": cal.shares,
            "requests": len(items), "tolerance": tolerance}


def reset_prefix_caches(dep: Deployment) -> None:
    """Forget every cached prefix (engines idle): no run may reuse an earlier run's prefill."""
    for core in dep.cores.values():
        bm = core.block_manager
        if core.has_unfinished_requests():
            raise RuntimeError(f"{core.name} is still busy; cannot reset its prefix cache")
        bm.hash_to_block.clear()
        for blk in bm.blocks:
            if blk.ref_count == 0:
                blk.hash, blk.token_ids = -1, ()


# ----- one run ---------------------------------------------------------------------------------------
async def run_policy(target, items: list[Item], times: list[float], max_tokens: int, strategy: str) -> list[Record]:
    """`target`: a base URL (through the server) or a Deployment (direct)."""
    body_params = dict(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    records: list[Record | None] = [None] * len(items)
    t0 = time.perf_counter() + 0.05

    if isinstance(target, str):
        import httpx

        client = httpx.AsyncClient(base_url=target, timeout=600.0,
                                   limits=httpx.Limits(max_connections=len(items) + 4, max_keepalive_connections=len(items) + 4))
    else:
        client = None

    async def one(i: int, it: Item, at: float) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        if client is not None:
            r = await client.post("/generate", json={
                "input_ids": it.prompt, "params": body_params, "model": "auto", "sizewise": {"strategy": strategy},
            })
            r.raise_for_status()
            body = r.json()
            sw = body["sizewise"]
            ntok = body["usage"]["completion_tokens"]
        else:
            dep: Deployment = target
            params = SamplingParams(**body_params)
            d = await dep.route(it.prompt, params, "auto", RoutingHints(strategy=strategy))
            ntok = 0
            async for out in await dep.engine.add_request(f"bench-{i}-{id(items)}", it.prompt, params,
                                                          core=d.model, strategy=d.strategy):
                ntok += sum(len(o.token_ids) for o in out.outputs)
            sw = d.to_json()
        done = time.perf_counter() - t0
        probe = sw.get("probe") or {}
        records[i] = Record(i, at, done, sw["tier"], sw["model"], sw["strategy"], sw["reason"], ntok, probe.get("ms"))

    try:
        await asyncio.gather(*(one(i, it, at) for i, (it, at) in enumerate(zip(items, times))))
    finally:
        if client is not None:
            await client.aclose()
    return records  # type: ignore[return-value]


def summarize(policy: str, rate_label: str, recs: list[Record], quality: dict[str, list[float]],
              large_quality: float) -> dict:
    lat = sorted(r.done - r.arrival for r in recs)
    span = max(r.done for r in recs) - min(r.arrival for r in recs)
    toks = sum(r.output_tokens for r in recs)
    q = statistics.fmean(quality[r.model][r.index] for r in recs)
    share = {t: sum(r.tier == t for r in recs) / len(recs) for t in TIERS}
    probes = [r.probe_ms for r in recs if r.probe_ms is not None]
    strategies = {s: sum(r.strategy == s for r in recs) for s in sorted({r.strategy for r in recs})}
    return {
        "policy": policy, "rate": rate_label, "requests": len(recs),
        "tok_s": toks / span, "req_s": len(recs) / span,
        "p50_s": _pct(lat, 50), "p95_s": _pct(lat, 95),
        "small": share["small"], "medium": share["medium"], "large": share["large"],
        "nll": q, "nll_vs_large": q / large_quality - 1.0,
        "probe_ms": statistics.fmean(probes) if probes else None,
        "strategies": strategies,
        "reasons": {k: sum(r.reason == k for r in recs) for k in sorted({r.reason for r in recs})},
    }


def _pct(sorted_vals: list[float], p: float) -> float:
    k = (len(sorted_vals) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


# ----- main ------------------------------------------------------------------------------------------
def warmup(dep: Deployment, target, adaptive, items: list[Item], max_tokens: int, strategy: str) -> None:
    """First requests pay one-time costs (allocator, HTTP stack, first kernels): one untimed
    burst per router through the same path as the measured runs. It also gives the telemetry
    its first measurements of each engine."""
    for router in [StaticRouter(t) for t in TIERS if t in dep.tier_to_model] + [adaptive]:
        dep.router = router
        asyncio.run(run_policy(target, items[:8], [0.0] * min(8, len(items)), max_tokens, strategy))
    adaptive.decisions.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--ref-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--code-frac", type=float, default=0.5)
    ap.add_argument("--rates", default="0.5,1.0,1.5", help="Poisson rates as multiples of static-large's capacity")
    ap.add_argument("--policies", default="static-small,static-medium,static-large,sizewise,random,oracle")
    ap.add_argument("--strategy", default="auto", choices=["auto", "plain"],
                    help="the `sizewise.strategy` every request sends (static/random routers map auto to plain)")
    ap.add_argument("--no-server", action="store_true", help="drive the Deployment directly, no HTTP")
    ap.add_argument("--calibrate", type=int, default=0, metavar="N",
                    help="first fit the difficulty thresholds on N other held-out windows (0: the config's)")
    ap.add_argument("--tolerance", type=float, default=0.03, help="calibration: allowed NLL gap to large")
    ap.add_argument("--calibrate-only", action="store_true", help="fit, print the policy values, stop")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: steadier on a shared 2-core CPU; 0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "routing.json"))
    args = ap.parse_args()
    policies = args.policies.split(",")
    if "random" in policies and "sizewise" not in policies:
        raise SystemExit("random routing copies sizewise's tier shares: include sizewise in --policies")
    if "oracle" in policies and not all(f"static-{t}" in policies for t in TIERS):
        raise SystemExit("the oracle's costs are the static tiers' burst times: include all three static policies")
    if "static-large" not in policies:
        raise SystemExit("rates are multiples of static-large's capacity: include static-large in --policies")

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = DeploymentConfig.from_yaml(args.config)
    cfg.policy.router = "adaptive"
    t_load = time.perf_counter()
    dep = Deployment.load(cfg)
    load_s = time.perf_counter() - t_load
    adaptive = AdaptiveRouter(cfg.policy.to_settings())
    server = None
    target: object = dep
    if not args.no_server:
        from sizewise.server import ServerThread, create_app

        server = ServerThread(create_app(dep))
        target = server.start()
        print(f"server at {target}", file=sys.stderr)
    tok = dep.tokenizer()
    items = build_workload(tok, args.requests, args.prompt_tokens, args.ref_tokens, args.code_frac, args.seed)
    t_bench = time.perf_counter()
    cap = float("nan")
    try:
        warmup(dep, target, adaptive, items, args.max_tokens, args.strategy)
        calibration = None
        if args.calibrate:
            cal_items = build_workload(tok, args.calibrate, args.prompt_tokens, args.ref_tokens, args.code_frac,
                                       args.seed + 1000)
            calibration = asyncio.run(calibrate(dep, adaptive, cal_items, args.tolerance))
            th = calibration["max_difficulty"]
            # -inf (no request is easy enough) does not survive YAML/JSON: a score no prompt reaches
            th = {k: max(v, -1e6) for k, v in th.items()}
            calibration["max_difficulty"] = th
            adaptive.settings.max_difficulty_small = th["small"]
            adaptive.settings.max_difficulty_medium = th["medium"]
            adaptive.settings.intent_bias = dict(calibration["intent_bias"])
            adaptive.settings.copy_weight = calibration["copy_weight"]
            print(f"calibrated on {args.calibrate} windows: policy: max_difficulty: "
                  f"{{small: {th['small']:.3f}, medium: {th['medium']:.3f}}}, intent_bias: "
                  f"{calibration['intent_bias']}, copy_weight: {calibration['copy_weight']} "
                  f"(shares {calibration['shares']}, NLL {calibration['nll']:.3f} vs large "
                  f"{calibration['nll_large']:.3f})", file=sys.stderr)
            if args.calibrate_only:
                return
        quality = asyncio.run(quality_matrix(dep, items))
        large = dep.tier_to_model["large"]
        large_q = statistics.fmean(quality[large])
        per_kind = {
            m: {k: statistics.fmean(q[i] for i, it in enumerate(items) if it.kind == k) for k in ("code", "prose")}
            for m, q in quality.items()
        }
        rows: list[dict] = []
        telemetry: list[dict] = []

        oracle = None

        def run(policy: str, rate: float, label: str, shares: dict | None = None) -> dict:
            if policy.startswith("static-"):
                dep.router = StaticRouter(policy.removeprefix("static-"))
            elif policy == "sizewise":
                dep.router = adaptive
            elif policy == "oracle":
                dep.router = OracleRouter({tuple(it.prompt): t for it, t in zip(items, oracle.tiers)})
            else:
                dep.router = RandomRouter(shares, len(items), args.seed + 7)
            reset_prefix_caches(dep)
            times = arrivals(len(items), rate, args.seed + 1)
            recs = asyncio.run(run_policy(target, items, times, args.max_tokens, args.strategy))
            row = summarize(policy, label, recs, quality, large_q)
            rows.append(row)
            snap = dep.telemetry.snapshot(device=True)
            telemetry.append({"policy": policy, "rate": label, **snap.to_json()})
            print(f"  {policy:14s} rate={label:8s} {row['tok_s']:8.1f} tok/s  p95 {row['p95_s']:6.2f} s  "
                  f"nll {row['nll']:.3f}  large {row['large']:.2f}", file=sys.stderr, flush=True)
            return row

        # Burst first: static-large's capacity sets the Poisson rates.
        order = [p for p in policies if p not in ("random", "oracle")] + [p for p in ("random", "oracle") if p in policies]
        order.remove("static-large")
        order.insert(0, "static-large")
        results_by_rate: dict[str, dict[str, dict]] = {}

        def sweep(label: str, rate: float) -> None:
            nonlocal oracle
            got = {}
            for p in order:
                shares = None
                if p == "random":
                    sw = got["sizewise"]
                    shares = {t: sw[t] for t in TIERS}
                if p == "oracle" and oracle is None:  # in the burst sweep, after the static runs
                    from sizewise.orchestrator.calibrate import oracle_routing

                    cost = {t: 1.0 / got[f"static-{t}"]["req_s"] for t in TIERS}
                    nll = {t: quality[dep.tier_to_model[t]] for t in TIERS}
                    oracle = oracle_routing(nll, cost, args.tolerance)
                got[p] = run(p, rate, label, shares)
            results_by_rate[label] = got

        sweep("burst", math.inf)
        cap = results_by_rate["burst"]["static-large"]["req_s"]
        for mult in [float(x) for x in args.rates.split(",") if x]:
            sweep(f"{mult:g}x", mult * cap)
    finally:
        if server is not None:
            server.stop()
        dep.shutdown()
    bench_s = time.perf_counter() - t_bench

    cols = ["policy", "rate", "tok_s", "req_s", "p50_s", "p95_s", "small", "medium", "large", "nll", "nll_vs_large",
            "probe_ms"]
    print()
    print(f"routing benchmark: {args.requests} requests ({args.code_frac:.0%} code), prompt {args.prompt_tokens} "
          f"tokens, {args.max_tokens} generated\n(greedy, ignore_eos), reference {args.ref_tokens}; static-large "
          f"capacity {cap:.2f} req/s; {'HTTP server' if server else 'Deployment direct'}; strategy {args.strategy}")
    print_table(rows, cols)
    print("\nquality per tier (mean NLL of the reference continuation, nats/token):")
    for m, d in per_kind.items():
        print(f"  {m:14s} all {statistics.fmean(quality[m]):.3f}  code {d['code']:.3f}  prose {d['prose']:.3f}")
    verdict = _verdict(results_by_rate)
    for line in verdict["lines"]:
        print(line)
    save_json(Path(args.out), {
        "benchmark": "routing", "args": vars(args), "load_s": load_s, "bench_s": bench_s,
        "plan": dep.plan.table() if dep.plan else None, "static_large_capacity_req_s": cap,
        "calibration": calibration, "policy": {
            "max_difficulty_small": adaptive.settings.max_difficulty_small,
            "max_difficulty_medium": adaptive.settings.max_difficulty_medium,
            "copy_weight": adaptive.settings.copy_weight, "intent_bias": adaptive.settings.intent_bias},
        "rows": rows, "quality_per_tier": {m: statistics.fmean(q) for m, q in quality.items()},
        "quality_per_kind": per_kind, "telemetry": telemetry, "verdict": verdict,
        "workload": [{"kind": it.kind, "source": it.source} for it in items],
    })


def _verdict(by_rate: dict[str, dict[str, dict]]) -> dict:
    """The targets, read off the table: quality gap to static large; throughput ratio at the burst
    (same workload, all at once) and at each Poisson rate; the highest rate at which each policy's
    p95 stays within static-large's p95 at the lightest rate; sizewise vs random quality."""
    lines = ["\ntargets (reported, not asserted):"]
    out: dict = {}
    burst = by_rate.get("burst", {})
    if "sizewise" in burst and "static-large" in burst:
        sw, lg = burst["sizewise"], burst["static-large"]
        out["quality_gap_vs_large"] = sw["nll_vs_large"]
        out["burst_throughput_ratio"] = sw["tok_s"] / lg["tok_s"]
        lines.append(f"  quality: sizewise NLL {sw['nll']:.3f} vs static-large {lg['nll']:.3f} "
                     f"({sw['nll_vs_large']:+.1%}; target within +3%)")
        lines.append(f"  burst throughput: sizewise {sw['tok_s']:.1f} vs static-large {lg['tok_s']:.1f} tok/s "
                     f"= {out['burst_throughput_ratio']:.2f}x (target >= 1.5x); p95 {sw['p95_s']:.2f} vs {lg['p95_s']:.2f} s")
    if "random" in burst and "sizewise" in burst:
        rd = burst["random"]
        out["nll_sizewise_minus_random"] = burst["sizewise"]["nll"] - rd["nll"]
        lines.append(f"  vs random at equal tier shares: NLL {burst['sizewise']['nll']:.3f} vs {rd['nll']:.3f} "
                     f"(large share {rd['large']:.2f}); throughput {burst['sizewise']['tok_s']:.1f} vs {rd['tok_s']:.1f}")
    if "oracle" in burst and "static-large" in burst:
        orc, lg = burst["oracle"], burst["static-large"]
        out["oracle_burst_throughput_ratio"] = orc["tok_s"] / lg["tok_s"]
        lines.append(f"  oracle (knows every tier's NLL; the bound for any probe): NLL {orc['nll_vs_large']:+.1%}, "
                     f"burst {out['oracle_burst_throughput_ratio']:.2f}x static-large, shares small/medium/large "
                     f"{orc['small']:.2f}/{orc['medium']:.2f}/{orc['large']:.2f}")
    poisson = [k for k in by_rate if k != "burst"]
    if poisson and "static-large" in by_rate[poisson[0]]:
        slo = by_rate[poisson[0]]["static-large"]["p95_s"]
        out["p95_slo_s"] = slo
        best = {}
        for label in poisson:
            for p, row in by_rate[label].items():
                if row["p95_s"] <= slo and row["req_s"] > best.get(p, {"req_s": 0})["req_s"]:
                    best[p] = row
        out["max_rate_within_slo"] = {p: {"rate": r["rate"], "tok_s": r["tok_s"], "p95_s": r["p95_s"]}
                                      for p, r in best.items()}
        lines.append(f"  throughput with p95 <= {slo:.2f} s (static-large's p95 at {poisson[0]}):")
        for p, r in best.items():
            lines.append(f"    {p:14s} {r['tok_s']:8.1f} tok/s at {r['rate']} (p95 {r['p95_s']:.2f} s)")
        if "sizewise" in best and "static-large" in best:
            out["slo_throughput_ratio"] = best["sizewise"]["tok_s"] / best["static-large"]["tok_s"]
            lines.append(f"    sizewise / static-large = {out['slo_throughput_ratio']:.2f}x (target >= 1.5x)")
    out["lines"] = lines
    return out


if __name__ == "__main__":
    main()
