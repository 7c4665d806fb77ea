"""`sizewise simulate`: the routing load sweep on the virtual device (docs/simulate.md)."""

from __future__ import annotations

import json
import platform as _pyplatform
import sys
import time
from pathlib import Path

HARDWARE = ("cpu-measured", "h100", "h200", "ascend-910b", "cpu")


def add_parser(sub, default_config: str) -> None:
    s = sub.add_parser("simulate", help="plan capacity: the routing load sweep on a virtual device (virtual time, "
                                        "seconds; measured or roofline step costs)")
    s.add_argument("--config", help=f"deployment YAML (default: {default_config})")
    s.add_argument("--hardware", default="cpu-measured", choices=HARDWARE,
                   help="step-cost model: cpu-measured (fitted on a real run on a 2-core VM) or a roofline profile "
                        "(an estimate until measured on the device; default: %(default)s)")
    s.add_argument("--profile", metavar="FILE", help="a measured step-cost profile (JSON), or a routing.py result to fit "
                                                      "one on, instead of the shipped one (with --replay: the replayed run)")
    s.add_argument("--shapes", metavar="A,B,C",
                   help="model shapes per tier, smallest first: shipped names (qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, "
                        "llama-3.2-1b, llama-3.2-3b, llama-3.1-8b) or directories with a config.json "
                        "(default: the config's own models)")
    s.add_argument("--loads", default="0.25,0.5,1,1.5,2,3,burst",
                   help="multiples of static large's capacity; `burst`: every request within --burst-s from idle "
                        "(default: %(default)s)")
    s.add_argument("--burst-s", type=float, default=2.0, help="the burst's span in seconds (default: %(default)s)")
    s.add_argument("--policies", default="static-small,static-medium,static-large,sizewise,random,oracle",
                   help="(default: %(default)s; also load-only, and rate-oracle (sizewise told each cell's arrival rate: what detecting the load costs))")
    s.add_argument("--slo-ms", type=float, help="latency objective (default: --slo-mult x one request alone on large)")
    s.add_argument("--slo-mult", type=float, default=3.0, help="(default: %(default)s)")
    s.add_argument("--requests", type=int, help="requests per cell (default: every workload item; more repeat them)")
    s.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default: %(default)s)")
    s.add_argument("--workload", metavar="FILE",
                   help="requests and per-tier quality (JSON items; a routing.py result works; default: the demo "
                        "family's held-out split)")
    s.add_argument("--replay", metavar="ROUTING_JSON",
                   help="validate: re-run a real benchmarks/routing.py result's cells (its requests, capacity, SLO "
                        "and schedule) and compare attainment and p50/p95 cell by cell")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", metavar="FILE", help="JSON result (default: simulate-HARDWARE.json; a PNG beside it)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--log-level", default="error", choices=["debug", "info", "warning", "error"],
                   help="(default: %(default)s)")


def build_spec(config, hardware: str, shapes: list[str] | None = None, profile: str | None = None, seed: int = 0):
    from ..orchestrator.policy import TIER_ORDER
    from .cost import PROFILE_DIR, MeasuredCost, RooflineCost
    from .driver import SimSpec, shapes_dir
    from .hardware import PROFILES, SimPlatform

    if hardware == "cpu-measured":
        cost = MeasuredCost.load(profile or PROFILE_DIR / "cpu-measured.json", seed)
        hw = PROFILES["cpu"]
    else:
        hw = PROFILES[hardware]
        cost = RooflineCost(hw)
    by_tier = None
    if shapes:
        tiers = sorted((m.tier for m in config.models), key=TIER_ORDER.index)
        if len(shapes) != len(tiers):
            raise ValueError(f"--shapes names {len(shapes)} shapes for {len(tiers)} tiers ({', '.join(tiers)})")
        by_tier = {t: shapes_dir(s) for t, s in zip(tiers, shapes)}
    return SimSpec(config, cost, SimPlatform(hw), by_tier)


def run(args, config_path: str) -> int:
    import logging

    from ..orchestrator.deployment import DeploymentConfig
    from .report import POLICIES, plot, print_table, targets
    from .sweep import Sweep, compare, gains, load_key
    from .workload import DEMO_WORKLOAD, cycled, load_workload

    logging.getLogger("sizewise").setLevel(args.log_level.upper())
    t_start = time.perf_counter()
    if args.requests is not None and args.requests < 1:
        raise ValueError(f"--requests must be at least 1, got {args.requests}")
    if args.slo_ms is not None and not args.slo_ms > 0:
        raise ValueError(f"--slo-ms must be positive, got {args.slo_ms}")
    cfg = DeploymentConfig.from_yaml(config_path)
    cfg.policy.router = "adaptive"
    real = json.loads(Path(args.replay).read_text()) if args.replay else None
    # Replaying a real run: its own steps are the measured profile (the host's load changes run to run).
    profile = args.profile or (args.replay if real and args.hardware == "cpu-measured" else None)
    spec = build_spec(cfg, args.hardware, args.shapes.split(",") if args.shapes else None, profile, args.seed)
    items = load_workload(args.replay or args.workload or DEMO_WORKLOAD)
    if args.requests:  # more than the workload holds: its items repeat (with no shared prefix)
        items = items[: args.requests] if args.requests <= len(items) else cycled(items, args.requests)
    max_tokens = real["args"]["max_tokens"] if real else args.max_tokens
    seed = real["args"]["seed"] if real else args.seed
    sweep = Sweep(spec, items, max_tokens, seed, progress=not args.no_progress)
    if real:
        loads = sorted({r["load"] for r in real["rows"]}, key=load_key)
        policies = [p for p in dict.fromkeys(r["policy"] for r in real["rows"])]
        cap, slo_s = real["static_large_capacity_req_s"], real["slo_s"]
        alone = statistics_median(real.get("alone_large_s") or [slo_s / 3])
    else:
        try:
            loads = [x.strip() if x.strip() == "burst" else float(x) for x in args.loads.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--loads {args.loads!r}: give positive numbers or burst, separated by commas") from None
        if not loads or any(x != "burst" and not x > 0 for x in loads):
            raise ValueError(f"--loads {args.loads!r}: give positive numbers separated by commas")
        policies = args.policies.split(",")
        for p in policies:
            if p not in POLICIES:
                raise ValueError(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}")
        cap, alone, slo_s = sweep.calibrate(args.slo_mult)
        if args.slo_ms:
            slo_s = args.slo_ms / 1e3
    rows, offline, cells = sweep.run(loads, policies, cap, slo_s, burst_s=args.burst_s)
    wall = time.perf_counter() - t_start
    shapes = {m.tier: spec.model_dirs[m.name].name for m in spec.config.models}
    print(f"\nsimulated routing sweep on {args.hardware} ({spec.cost.kind} step costs; shapes "
          f"{', '.join(f'{t}={s}' for t, s in shapes.items())}): {len(items)} requests/cell, {max_tokens} generated; "
          f"static-large capacity {cap:.2f} req/s; one request alone on large {alone:.3f} s; SLO {slo_s:.3f} s; "
          f"{wall:.1f} s of wall time{' (replaying ' + args.replay + ')' if real else ''}")
    cols = ["load", "policy", "slo_attain", "goodput", "p50_s", "p95_s", "p99_s", "ttft_p50_s", "ttft_p95_s",
            "small", "medium", "large", "loss"]
    print_table(rows, cols)
    if offline:
        print("\noffline at sizewise's shares (quality loss vs large):")
        print_table(offline, ["load", "off_top", "sizewise_loss", "random_loss", "oracle_loss", "gap_closed"])
    g = gains(rows)
    if g:
        print("\nauto (sizewise) against the best static size at each load:")
        print_table(g, ["load", "best_static", "best_attain", "auto_attain", "attain_gain", "best_loss", "auto_loss",
                        "loss_saved", "goodput_ratio", "dominated_by"], width=120)
    verdict = targets(rows, offline)
    for line in verdict["lines"]:
        print(line)
    cmp = None
    if real:
        cmp = compare(real["rows"], rows)
        ok = sum(c["ok"] for c in cmp)
        print(f"\nvalidation against {args.replay}: {ok}/{len(cmp)} cells within +-0.1 attainment and +-20% p50/p95")
        print_table(cmp, ["load", "policy", "real_attain", "sim_attain", "d_attain", "real_p50", "sim_p50", "p50_err",
                          "real_p95", "sim_p95", "p95_err", "ok"], width=140)
    out = Path(args.out or f"simulate-{args.hardware}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "simulate", "command": "sizewise " + " ".join(sys.argv[1:]), "hardware": args.hardware,
               "cost_model": spec.cost.kind, "cost_source": getattr(spec.cost, "source", "") or spec.cost.hw.source,
               "shapes": shapes, "memory_plan": spec.plan.table(), "requests": len(items), "max_tokens": max_tokens,
               "seed": seed, "static_large_capacity_req_s": cap, "alone_large_s": alone, "slo_s": slo_s,
               "wall_s": wall, "rows": rows, "offline": offline, "gains": g, "verdict": verdict, "validation": cmp,
               # per request [arrival, ttft, latency, tier]: kept when validating (what to compare cell by cell)
               "cells": {k: [[round(x, 5) if isinstance(x, float) else x for x in r] for r in v]
                         for k, v in cells.items()} if real else None,
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": _pyplatform.node()}
    out.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
    print(f"wrote {out}")
    plot(rows, out.with_suffix(".png"), slo_s,
         title=f"virtual {args.hardware} ({spec.cost.kind}): {'/'.join(shapes.values())}, {len(items)} requests/cell")
    return 0


def statistics_median(xs):
    import statistics

    return statistics.median(xs)
