"""Step-cost models: what one engine step costs on the virtual device, and the host time between steps.

Two kinds, per tier:
  * `MeasuredCost`, fitted on a real `benchmarks/routing.py` run (`fit_measured` reads the steps it
    records): per decode step fixed + per row, per prefill token beyond that line, an interleaving
    penalty (the extra a step costs right after another model's step: on a CPU the other model
    evicted this one's weights from cache), the measured spread of steps around the line (drawn,
    seeded, as a multiplicative factor) and the host's time between steps (the event loop's
    streaming and the GIL, drawn from the measured gaps).
  * `RooflineCost`, for a named accelerator and model shapes read from config.json:
    floor + max((weight bytes + KV bytes read) / (bandwidth x efficiency),
                2 x params x tokens / (FLOP/s x efficiency)).
    An estimate until measured on the device (hardware.py states the figures).
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .hardware import HardwareProfile

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(slots=True)
class StepShape:
    rows: int  # decode rows (one new token each)
    prefill_tokens: int  # prompt tokens computed this step
    kv_tokens: int  # context positions attended to
    after_other: bool  # the device's previous step was another model's


@dataclass(slots=True)
class TierCost:
    fixed_s: float
    per_row_s: float
    per_prefill_token_s: float
    interleave_s: float = 0.0
    noise: list[float] = field(default_factory=list)  # quantiles of measured / fitted (empty: none)
    prefill_fixed_s: float = 0.0  # what a step with a prefill costs beyond the decode line and its tokens

    def mean(self, s: StepShape) -> float:
        pre = self.prefill_fixed_s + self.per_prefill_token_s * s.prefill_tokens if s.prefill_tokens else 0.0
        return self.fixed_s + self.per_row_s * s.rows + pre + (self.interleave_s if s.after_other else 0.0)


class MeasuredCost:
    """Per-tier lines fitted on a real run; seeded noise and host gaps drawn from what was measured."""

    kind = "measured"

    def __init__(self, tiers: dict[str, TierCost], gaps: list[float], source: str = "", peak_bandwidth: float = 0.0,
                 seed: int = 0) -> None:
        self.tiers = tiers
        self.gaps = gaps  # quantiles of the host time between two steps of a busy worker, seconds
        self.source = source
        self.peak_bandwidth = peak_bandwidth
        self.rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def step(self, tier: str, core, s: StepShape) -> float:
        t = self.tiers[tier]
        x = t.mean(s)
        if t.noise:
            x *= t.noise[self.rng.randrange(len(t.noise))]
        return max(x, 0.0)

    def gap(self) -> float:
        return self.gaps[self.rng.randrange(len(self.gaps))] if self.gaps else 0.0

    def to_json(self) -> dict:
        return {"kind": "measured", "source": self.source, "peak_bandwidth": self.peak_bandwidth, "gaps": self.gaps,
                "tiers": {k: {"fixed_s": v.fixed_s, "per_row_s": v.per_row_s,
                              "per_prefill_token_s": v.per_prefill_token_s, "prefill_fixed_s": v.prefill_fixed_s,
                              "interleave_s": v.interleave_s, "noise": v.noise} for k, v in self.tiers.items()}}

    @classmethod
    def from_json(cls, d: dict, seed: int = 0) -> "MeasuredCost":
        return cls({k: TierCost(**v) for k, v in d["tiers"].items()}, d.get("gaps", []), d.get("source", ""),
                   d.get("peak_bandwidth", 0.0), seed)

    @classmethod
    def load(cls, path: str | Path, seed: int = 0) -> "MeasuredCost":
        """A fitted profile, or a routing.py result (fitted on its recorded steps now)."""
        raw = json.loads(Path(path).read_text())
        if "steps" in raw:
            m = fit_measured(raw)
            m.reseed(seed)
            return m
        return cls.from_json(raw, seed)


class RooflineCost:
    """Bytes over bandwidth, FLOPs over compute, plus a floor: a named accelerator's estimate."""

    kind = "roofline"

    def __init__(self, hw: HardwareProfile) -> None:
        self.hw = hw
        self.peak_bandwidth = hw.bandwidth

    def reseed(self, seed: int) -> None:  # deterministic: nothing to draw
        pass

    def step(self, tier: str, core, s: StepShape) -> float:
        hw = self.hw
        kv_bytes = s.kv_tokens * core.model_config.kv_bytes_per_token(core.dtype)
        mem = (core.step_weight_bytes + kv_bytes) / (hw.bandwidth * hw.bandwidth_efficiency)
        flops = 2.0 * core.model_config.num_params * (s.rows + s.prefill_tokens)
        compute = flops / (hw.flops * hw.flops_efficiency)
        return hw.step_floor_s + max(mem, compute) + (hw.interleave_s if s.after_other else 0.0)

    def gap(self) -> float:
        return 0.0


def _quantiles(xs: list[float], n: int = 40) -> list[float]:
    xs = sorted(xs)
    if not xs:
        return []
    return [xs[min(int((i + 0.5) / n * len(xs)), len(xs) - 1)] for i in range(n)]


def fit_measured(run: dict, tier_of: dict[str, str] | None = None) -> MeasuredCost:
    """Fit per-tier step costs on a routing benchmark's JSON (`steps`: [cell, core, end, seconds,
    decode rows, prefill tokens, KV tokens]). Robust to a loaded host: the decode line is fitted on
    the median step time per batch size (weighted by count), not on every noisy step."""
    steps = run["steps"]
    tier_of = tier_of or {name: name.rsplit("-", 1)[-1] for name in {s[1] for s in steps}}
    rows = []
    prev_name, prev_end, prev_cell = None, None, None
    gaps = []
    for cell, name, end, dt, r, pf, kv in steps:
        start = end - dt
        same_cell = cell == prev_cell
        if same_cell and prev_end is not None and 0 <= start - prev_end < 0.05:  # a busy worker (not idle)
            gaps.append(start - prev_end)
        rows.append((name, dt, r, pf, same_cell and prev_name not in (None, name)))
        prev_name, prev_end, prev_cell = name, end, cell
    tiers = {}
    for name in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == name]
        dec = [r for r in mine if r[3] == 0 and r[2] > 0]
        own = [r for r in dec if not r[4]] or dec
        by_rows: dict[int, list[float]] = {}
        for r in own:
            by_rows.setdefault(r[2], []).append(r[1])
        # batch sizes seen fewer than 3 times are left out: one stalled step at a rare size would tilt the line
        pts = [(b, statistics.median(v), len(v)) for b, v in by_rows.items() if len(v) >= 3] or [
            (b, statistics.median(v), len(v)) for b, v in by_rows.items()]
        wsum = sum(w for *_, w in pts)
        mx = sum(b * w for b, _, w in pts) / wsum
        my = sum(y * w for _, y, w in pts) / wsum
        var = sum(w * (b - mx) ** 2 for b, _, w in pts)
        slope = max(sum(w * (b - mx) * (y - my) for b, y, w in pts) / var, 0.0) if var > 0 else 0.0
        fixed = max(my - slope * mx, 0.0)
        line = TierCost(fixed, slope, 0.0)
        # the interleaving penalty: small decode batches right after another model vs after its own step
        small = [r for r in dec if r[2] <= 4]
        after = [r[1] - line.mean(_shape(r[2], 0, False)) for r in small if r[4]]
        alone = [r[1] - line.mean(_shape(r[2], 0, False)) for r in small if not r[4]]
        inter = max(statistics.median(after) - statistics.median(alone), 0.0) if len(after) >= 5 and alone else 0.0
        # prefill steps: what they cost beyond the decode line, a least-squares line over their tokens
        pre = [(r[3], r[1] - line.mean(_shape(r[2], 0, False)) - (inter if r[4] else 0.0)) for r in mine if r[3] > 0]
        pre_fixed, per_tok = 0.0, 0.0
        if pre:
            px = statistics.fmean(x for x, _ in pre)
            py = statistics.fmean(y for _, y in pre)
            pvar = sum((x - px) ** 2 for x, _ in pre)
            per_tok = max(sum((x - px) * (y - py) for x, y in pre) / pvar, 0.0) if pvar > 0 else py / px
            pre_fixed = max(py - per_tok * px, 0.0)
        t = TierCost(fixed, slope, per_tok, inter, prefill_fixed_s=pre_fixed)
        ratios = [r[1] / m for r in mine if (m := t.mean(_shape(r[2], r[3], r[4]))) > 0]
        t.noise = [round(x, 4) for x in _quantiles(ratios)]
        tiers[tier_of[name]] = t
    src = f"fitted on {len(steps)} steps of `{run.get('command', 'benchmarks/routing.py')}` ({run.get('timestamp', '')})"
    return MeasuredCost(tiers, [round(g, 6) for g in _quantiles(gaps)], src, run.get("peak_bandwidth") or 0.0)


def _shape(rows: int, prefill: int, after_other: bool) -> StepShape:
    return StepShape(rows, prefill, 0, after_other)
