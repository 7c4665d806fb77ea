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
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json  # noqa: E402

from sizewise.orchestrator.deployment import Deployment, DeploymentConfig, StaticRouter  # noqa: E402
from sizewise.orchestrator.measure import _nll, held_out_items  # noqa: E402
from sizewise.sim.driver import reset_prefix_caches  # noqa: E402
from sizewise.sim.report import (  # noqa: E402
    POLICIES, TIERS, Record, oracle_at_shares, plot, policy_router, summarize, targets,
)
from sizewise.sim.sweep import cell_rate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class StepTrace:
    """A step listener: (cell, core, end, seconds, decode rows, prefill tokens, KV tokens) per step."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.steps: list[list] = []

    def on_step(self, name, core, outs, seconds) -> None:
        if self.key is None:
            return
        st = core.stats()
        prefill = st.last_step_prefill_tokens
        kv = (st.last_step_bytes - core.step_weight_bytes) // max(core.model_config.kv_bytes_per_token(core.dtype), 1)
        self.steps.append([self.key, name, round(time.perf_counter(), 6), round(seconds, 6),
                           st.last_step_num_tokens - prefill, prefill, int(kv)])


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
            out = {"difficulty": list(await asyncio.gather(*(  # the probe's difficulty: small's prompt NLL
                _nll(dep.engine, dep.tier_to_model["small"], it.prompt, 1, f"d-{i}") for i, it in enumerate(items))))}
            for t in TIERS:
                m = dep.tier_to_model[t]
                out[t] = list(await asyncio.gather(*(
                    _nll(dep.engine, m, it.prompt + it.ref, len(it.prompt), f"q-{m}-{i}") for i, it in enumerate(items))))
            return out

        nll = asyncio.run(quality())
        difficulty = nll.pop("difficulty")
        gaps = {t: [a - b for a, b in zip(nll[t], nll["large"])] for t in TIERS}
        settings = cfg.policy.to_settings()

        def router_for(policy: str, counts: dict | None = None, rate: float | None = None):
            s = cfg.policy.to_settings()
            s.slo_ms = slo_ms
            return policy_router(policy, s, gaps, [it.prompt for it in items], args.seed, counts, rate)

        def cell(policy: str, times: list[float], counts=None, key: str | None = None) -> list[Record]:
            dep.router = router_for(policy, counts, cell_rate(times))
            reset_prefix_caches(dep)
            dep.telemetry.forget_latency()  # every run learns its latency bias from the same start
            trace.key = key
            recs = asyncio.run(run_cell(base, items, times, args.max_tokens))
            if key is not None:
                cells[key] = [[r.arrival, r.ttft, r.latency, r.tier] + (
                    [{k: r.explain["plan"].get(k) for k in ("reason", "shares", "auto_rate", "utilization", "util_cap",
                                                          "latency_ms")}] if "plan" in r.explain else [])
                    for r in recs]
            return recs

        # Every step's shape and wall time, and every request's times: what the virtual device
        # (sizewise.sim) fits its measured step-cost model on and is validated against.
        trace = StepTrace()
        cells: dict[str, list] = {}
        dep.engine.step_listeners.append(trace.on_step)

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
        burst = cell("static-large", [0.0] * len(items), key="burst/static-large")
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
                recs = cell(p, times, counts, key=f"{load if load == 'burst' else format(load, 'g')}/{p}")
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
                    "policy": cfg.policy.model_dump(mode="json"),
                    "items": [{"prompt": it.prompt, "ref": it.ref, "difficulty": difficulty[i],
                               "nll": {t: nll[t][i] for t in TIERS}} for i, it in enumerate(items)],
                    "peak_bandwidth": dep.telemetry.peak_bandwidth, "cells": cells, "steps": trace.steps})
    plot(rows, out.with_suffix(".png"), slo_s)



if __name__ == "__main__":
    main()
