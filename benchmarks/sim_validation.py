#!/usr/bin/env python3
"""The virtual device against real routing sweeps on this machine.

    .venv/bin/python benchmarks/sim_validation.py RUN1.json [RUN2.json ...]

Each RUN is a `benchmarks/routing.py` result (it records its steps and requests). For each run:
the simulator replays its cells (its requests, capacity, SLO and Poisson schedule, with step costs
fitted on that run's own steps) and is compared cell by cell: SLO attainment within +-0.1, p50 and
p95 latency within +-20%. With two or more runs, the runs are also compared with each other by the
same rule: the noise floor, on a shared host, that no simulator can beat. Table on stdout, details in
benchmarks/results/sim-validation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json  # noqa: E402

from sizewise.orchestrator.deployment import DeploymentConfig  # noqa: E402
from sizewise.sim.cli import build_spec  # noqa: E402
from sizewise.sim.sweep import Sweep, compare  # noqa: E402
from sizewise.sim.workload import load_workload  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def replay(path: str, config: str) -> list[dict]:
    real = json.loads(Path(path).read_text())
    cfg = DeploymentConfig.from_yaml(config)
    cfg.policy.router = "adaptive"
    spec = build_spec(cfg, "cpu-measured", profile=path)
    sw = Sweep(spec, load_workload(path), real["args"]["max_tokens"], real["args"]["seed"], progress=False)
    loads = sorted({r["load"] for r in real["rows"]})
    policies = list(dict.fromkeys(r["policy"] for r in real["rows"]))
    rows, _, _ = sw.run(loads, policies, real["static_large_capacity_req_s"], real["slo_s"])
    return compare(real["rows"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="benchmarks/routing.py result JSONs")
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sim-validation.json"))
    args = ap.parse_args()
    cols = ["load", "policy", "real_attain", "sim_attain", "d_attain", "real_p50", "sim_p50", "p50_err", "real_p95",
            "sim_p95", "p95_err", "ok"]
    out = {"runs": args.runs, "sim_vs_real": {}, "real_vs_real": {}}
    for path in args.runs:
        cmp = replay(path, args.config)
        out["sim_vs_real"][path] = cmp
        print(f"\nsimulator vs {path}: {sum(c['ok'] for c in cmp)}/{len(cmp)} cells within +-0.1 attainment, +-20% p50/p95")
        print_table(cmp, cols, width=140)
    for a, b in combinations(args.runs, 2):
        ra, rb = (json.loads(Path(p).read_text())["rows"] for p in (a, b))
        cmp = compare(ra, rb)  # the second run in the "sim" columns
        out["real_vs_real"][f"{a} vs {b}"] = cmp
        print(f"\nreal {b} vs real {a} (the noise floor): {sum(c['ok'] for c in cmp)}/{len(cmp)} cells within the same "
              f"tolerances")
        print_table(cmp, cols, width=140)
    print("\n(timings on a shared, loaded host are noisy: read the real-vs-real rows first)")
    save_json(Path(args.out), {"benchmark": "sim_validation", "command": " ".join(sys.argv), **out})


if __name__ == "__main__":
    main()
