"""The load sweep on the virtual device: `benchmarks/routing.py`'s experiment on virtual time.

Same protocol: one Poisson schedule (seeded) scaled to multiples of static large's capacity (its
burst throughput, simulated first), an SLO of `slo_mult` x one request alone on large (or given),
every policy on the same arrivals: static-small / -medium / -large, sizewise (`auto`: the
deployment's adaptive router), random (tiers dealt at sizewise's shares), oracle (the objective
knowing every tier's true loss), optionally load-only. Same per-cell summary, offline analysis and
targets (`report.py`). Every cell runs on a fresh deployment, so a cell does not depend on the
ones before it, and the whole sweep is deterministic for a seed.

`replay` re-runs a real routing.py JSON's cells (its requests, capacity, SLO and schedule) on the
virtual device and compares attainment and latency cell by cell: the simulator's validation.
"""

from __future__ import annotations

import math
import random
import statistics
import sys

from ..orchestrator.deployment import StaticRouter
from .driver import SimRecord, SimSpec, Simulation, WorkItem
from .report import TIERS, Record, oracle_at_shares, policy_router, summarize

DEFAULT_POLICIES = ("static-small", "static-medium", "static-large", "sizewise", "random", "oracle")


def _records(recs: list[SimRecord]) -> list[Record]:
    out = []
    for r in recs:
        lat = r.latency if r.error is None else math.inf  # a failed request never meets the SLO
        out.append(Record(r.index, r.arrival, r.ttft if r.ttft is not None and r.error is None else lat, lat,
                          r.tier or "large", r.reason or "error", r.output_tokens, r.probe_ms, r.predicted_ms,
                          r.explain, r.signal))
    return out


class Sweep:
    def __init__(self, spec: SimSpec, items: list[WorkItem], max_tokens: int = 32, seed: int = 0,
                 progress: bool = True) -> None:
        missing = [i for i, it in enumerate(items) if not all(t in it.nll for t in spec.plan_tiers())]
        if missing:
            raise ValueError(f"workload items {missing[:5]} have no NLL for every tier: no quality loss to report")
        self.spec = spec
        self.items = items
        self.max_tokens = max_tokens
        self.seed = seed
        self.progress = progress
        tiers = spec.plan_tiers()
        self.top = tiers[-1]
        self.nll = {t: [it.nll[t] for it in items] for t in tiers}
        self.gaps = {t: [a - b for a, b in zip(self.nll[t], self.nll[self.top])] for t in tiers}

    def cell(self, router, arrivals: list[float], **kw) -> list[SimRecord]:
        sim = Simulation(self.spec, self.items, self.seed)
        try:
            return sim.run(router, arrivals, self.max_tokens, **kw)
        finally:
            sim.close()

    def router_for(self, policy: str, slo_ms: float, counts: dict | None = None, rate: float | None = None):
        s = self.spec.config.policy.to_settings()
        s.slo_ms = slo_ms
        return policy_router(policy, s, self.gaps, [it.prompt for it in self.items], self.seed, counts, rate)

    def calibrate(self, slo_mult: float = 3.0) -> tuple[float, float, float]:
        """(static large's burst capacity req/s, one request alone on large s, SLO s) on the virtual device."""
        burst = self.cell(StaticRouter(self.top), [0.0] * len(self.items))
        cap = len(self.items) / max(r.arrival + r.latency for r in burst)
        alone = self.cell(StaticRouter(self.top), [0.0])[0].latency
        return cap, alone, slo_mult * alone

    def run(self, loads: list, policies: list[str], cap: float, slo_s: float,
            unit: list[float] | None = None, burst_s: float = 2.0) -> tuple[list[dict], list[dict], dict]:
        """Every policy at every load (a multiple of `cap`, or "burst": every request within `burst_s`
        from idle, as benchmarks/routing.py draws it); returns (rows, offline, per-cell records as
        [arrival, ttft, latency, tier])."""
        if "random" in policies and "sizewise" not in policies:
            raise ValueError("random copies sizewise's tier shares: include sizewise")
        if unit is None:
            rng = random.Random(self.seed + 1)
            unit, t = [], 0.0
            for _ in self.items:  # one Poisson schedule at rate 1, scaled per load
                unit.append(t)
                t += rng.expovariate(1.0)
        order = [p for p in policies if p != "random"] + (["random"] if "random" in policies else [])
        rows, offline, cells = [], [], {}
        bar = _bar(len(loads) * len(order), self.progress)
        burst_rng = random.Random(self.seed + 2)
        burst = sorted(burst_rng.uniform(0.0, burst_s) for _ in self.items)
        for load in loads:
            times = burst if load == "burst" else [x / (load * cap) for x in unit]
            got = {}
            for p in order:
                counts = None
                if p == "random":
                    counts = {t: sum(r.tier == t for r in got["sizewise"]) for t in TIERS}
                recs = _records(self.cell(self.router_for(p, slo_s * 1e3, counts, cell_rate(times)), times))
                got[p] = recs
                rows.append(summarize(p, load, recs, self.nll, slo_s))
                cells[f"{load if load == 'burst' else format(load, 'g')}/{p}"] = [[r.arrival, r.ttft, r.latency, r.tier] for r in recs]
                bar.update(1)
            if "sizewise" in got:
                offline.append(self._offline(load, got["sizewise"]))
        bar.close()
        return rows, offline, cells

    def _offline(self, load: float, sw: list[Record]) -> dict:
        counts = {t: sum(r.tier == t for r in sw) for t in TIERS}
        gaps = {t: self.gaps.get(t, [0.0] * len(self.items)) for t in TIERS}
        large = statistics.fmean(self.nll[self.top])
        rnd = sum(counts[t] * statistics.fmean(gaps[t]) for t in TIERS) / len(sw)
        orc = oracle_at_shares(gaps, counts)
        mine = statistics.fmean(gaps[r.tier][r.index] for r in sw)
        closed = (rnd - mine) / (rnd - orc) if rnd - orc > 1e-9 else None
        return {"load": load, "shares": {t: counts[t] / len(sw) for t in TIERS}, "off_top": 1 - counts["large"] / len(sw),
                "sizewise_loss": mine / large, "random_loss": rnd / large, "oracle_loss": orc / large,
                "gap_closed": closed}


def cell_rate(times: list[float]) -> float:
    """A cell's mean arrival rate (the rate-oracle's): arrivals after the first over their span, a
    span of at least a millisecond (arrivals at one instant are a batch, as the controller counts)."""
    if len(times) < 2:
        return 0.0
    return (len(times) - 1) / max(times[-1] - times[0], 1e-3)


def gains(rows: list[dict]) -> list[dict]:
    """Per load: what auto (sizewise) gains over the best static size (by SLO attainment, then loss)."""
    out = []
    for load in sorted({r["load"] for r in rows}, key=load_key):
        at = {r["policy"]: r for r in rows if r["load"] == load}
        sw = at.get("sizewise")
        statics = [r for p, r in at.items() if p.startswith("static-")]
        if sw is None or not statics:
            continue
        best = max(statics, key=lambda r: (r["slo_attain"], -r["loss"]))
        dominated = [r["policy"] for r in statics if r["slo_attain"] > sw["slo_attain"] and r["loss"] < sw["loss"]]
        out.append({"load": load, "best_static": best["policy"], "best_attain": best["slo_attain"],
                    "best_loss": best["loss"], "auto_attain": sw["slo_attain"], "auto_loss": sw["loss"],
                    "attain_gain": sw["slo_attain"] - best["slo_attain"],
                    "loss_saved": best["loss"] - sw["loss"],  # > 0: auto's answers are closer to large's
                    "goodput_ratio": sw["goodput"] / best["goodput"] if best["goodput"] > 0 else None,
                    "dominated_by": ",".join(dominated)})
    return out


def load_key(load) -> tuple:
    """Loads in order, "burst" last."""
    return (1, 0.0) if load == "burst" else (0, float(load))


def compare(real_rows: list[dict], sim_rows: list[dict]) -> list[dict]:
    """Cell by cell: attainment (within +-0.1?) and p50 / p95 latency (within +-20%?)."""
    sim = {(r["load"], r["policy"]): r for r in sim_rows}
    out = []
    for r in real_rows:
        s = sim.get((r["load"], r["policy"]))
        if s is None:
            continue
        d_att = s["slo_attain"] - r["slo_attain"]
        e50 = s["p50_s"] / r["p50_s"] - 1 if r["p50_s"] > 0 else None
        e95 = s["p95_s"] / r["p95_s"] - 1 if r["p95_s"] > 0 else None
        out.append({"load": r["load"], "policy": r["policy"], "real_attain": r["slo_attain"], "sim_attain": s["slo_attain"],
                    "d_attain": d_att, "real_p50": r["p50_s"], "sim_p50": s["p50_s"], "p50_err": e50,
                    "real_p95": r["p95_s"], "sim_p95": s["p95_s"], "p95_err": e95,
                    "ok": abs(d_att) <= 0.1 and e50 is not None and abs(e50) <= 0.2 and e95 is not None and abs(e95) <= 0.2})
    return out


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, on: bool):
    if not on:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="simulating", unit="cell", file=sys.stderr, leave=False)
