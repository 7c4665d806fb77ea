"""Keeps the capacity plan current and places `auto` requests in it.

`PlanController` turns the telemetry into `plan.make_plan` inputs and re-plans every
`replan_s` (100 ms) or every `replan_arrivals` (4) `auto` arrivals, whichever comes first.

Which controller, and why. The plan is a *feed-forward* model (measured step-cost lines, measured
arrival rate) corrected by two measured *feedback* terms, never by a per-request prediction:
  * backlog: the arrival rate the plan is made for is the larger of the rate counted over the last
    `rate_window_s` (in the first window after an idle spell, or the rate of the last four or eight
    arrivals if higher) and (requests in the system now) / SLO: by Little's law the system cannot hold N
    requests within the SLO unless it serves N / SLO per second. The first lags a burst by up to
    its window; the second rises with every request that arrives and is not served, so a burst from
    idle moves the plan within a few arrivals (a fraction of the SLO), and falls as the backlog
    drains. It is proportional (no state), so it cannot wind up.
  * latency bias: each tier's measured / modelled latency of recent finished requests (the
    telemetry's EMA in logs, fading with a 10 s half-life), multiplied into the plan's latency model.
    Not the lateness of requests still in flight: their predictions were made at the rate of their
    arrival, so a rising load makes them late without the model being wrong (the backlog term sees
    the load; reading it twice made the plan leave the top tier for good under a ramp). Finished
    requests carry some of the same confusion, so the plan reads the bias within [2/3, 1.5]. This is the integral-like part: it
    learns what the device model leaves out (the host, the HTTP stack, a loaded machine) and
    tightens the SLO constraint where the model is optimistic.
  * hysteresis, asymmetric: a plan of *higher* expected loss (the load rose) is taken at once; one of
    lower loss (the load fell) only if it would still hold at `up_margin` (25%) more load and the
    plan has not changed for `hold_s`. The rate counted over a few seconds of Poisson arrivals is
    noisy by tens of percent, and every change of tiers leaves work running on the old ones (two
    weight streams, on a CPU two working sets, for a while): without it the plan flaps between
    tiers and pays that on every flap.
Requests fill the plan's shares by predicted loss: among recent `auto` requests, those whose
predicted loss on the cheaper of the plan's two tiers (over the dearer) is lowest go to the cheaper
tier, up to its share (a quantile threshold over a window of recent predictions; ties broken by a
seeded draw so that the shares are met even when the predictor cannot tell requests apart).
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, replace

from .plan import Plan, PlanInputs, TierCost, assign, make_plan
from .telemetry import TelemetrySnapshot

_MIN_SPAN_S = 0.25
# The latency bias is read within [1 / this, this]: a request predicted at a lower rate than it then
# met finishes late without the model being wrong, and past this the ratio mostly says that.
_BIAS_LIMIT = 1.5


def plan_bias(measured: float) -> float:
    """The latency bias the plan reads: the measured one within [1 / _BIAS_LIMIT, _BIAS_LIMIT]."""
    return min(max(measured, 1 / _BIAS_LIMIT), _BIAS_LIMIT)


@dataclass(slots=True)
class Placement:
    tier: str
    rank: float | None  # where the request fell among recent ones (0: loses least on a cheaper tier)
    threshold: float | None  # the cheaper tier takes ranks below this (its share)
    score: float | None  # predicted loss on the cheaper tier minus on the dearer (nats/token)

    def to_json(self) -> dict:
        r = lambda x: None if x is None else round(x, 4)  # noqa: E731
        return {"tier": self.tier, "rank": r(self.rank), "threshold": r(self.threshold), "score": r(self.score)}


class PlanController:
    def __init__(self, tiers: list[str], tier_to_model: dict[str, str], losses: dict[str, float], *,
                 slo_s: float | None, util_target: float = 0.85, replan_s: float = 0.1, replan_arrivals: int = 4,
                 rate_window_s: float = 3.0, window: int = 256, seed: int = 0, up_margin: float = 0.25,
                 hold_s: float = 2.0) -> None:
        self.tiers = list(tiers)  # cheapest first
        self.tier_to_model = dict(tier_to_model)
        self.losses = dict(losses)  # calibrated mean loss per tier (the top tier 0)
        self.slo_s = slo_s
        self.util_target = util_target
        self.replan_s = replan_s
        self.replan_arrivals = replan_arrivals
        self.rate_window_s = rate_window_s
        self.up_margin = up_margin
        self.hold_s = hold_s
        self._changed_at = -float("inf")
        self._fresh_since = -float("inf")
        self.plan: Plan | None = None
        self.replans = 0
        self._arrivals: deque[float] = deque()
        self._pinned: dict[str, deque[float]] = {t: deque() for t in tiers}
        self._since = 0
        self._prompt = 0.0
        self._output = 0.0
        self._recent: deque[dict[str, float]] = deque(maxlen=window)
        self._rng = random.Random(seed)

    # ----- what arrives -----------------------------------------------------------------------
    def note_arrival(self, now: float, tier: str | None, prompt_tokens: int, max_new_tokens: int, n: int = 1) -> None:
        """An arrival: `tier` None for `auto`, else the tier it is pinned to."""
        if tier is None:
            if not self._arrivals or self._arrivals[-1] < now - self.rate_window_s:
                self._fresh_since = now  # the first arrival after an idle spell
            for _ in range(n):
                self._arrivals.append(now)
            self._since += n
            a = 0.2
            self._prompt = prompt_tokens if not self._prompt else (1 - a) * self._prompt + a * prompt_tokens
            o = min(max_new_tokens, 512)
            self._output = o if not self._output else (1 - a) * self._output + a * o
        elif tier in self._pinned:
            for _ in range(n):
                self._pinned[tier].append(now)

    def _rate(self, q: deque, now: float, fresh: bool = False) -> float:
        """Arrivals per second over the window. `fresh` (the first window after an idle spell, when
        the window would lag a burst by its length): the larger of that and the rate of the last
        four arrivals, so a burst from idle shows within a few arrivals."""
        while q and q[0] < now - self.rate_window_s:
            q.popleft()
        if not q:
            return 0.0
        rate = len(q) / min(max(now - q[0], self.rate_window_s / 3), self.rate_window_s)
        if fresh:
            # The last 4 and the last 8 arrivals, each over a quarter second at least (arrivals at one
            # instant are a batch, not an infinite rate): a burst shows within a few arrivals, and the
            # longer run lets a fast one read up to 28/s (the window alone reads 1/s per arrival).
            for k in (4, 8):
                if len(q) >= k:
                    rate = max(rate, (k - 1) / max(now - q[-k], _MIN_SPAN_S))
        return rate

    # ----- the plan ---------------------------------------------------------------------------
    def due(self, now: float) -> bool:
        return self.plan is None or now - self.plan.time >= self.replan_s or self._since >= self.replan_arrivals

    def inputs(self, snap: TelemetrySnapshot, now: float) -> PlanInputs:
        engines = {t: snap.engines[m] for t, m in self.tier_to_model.items() if m in snap.engines}
        tiers = {}
        for t in self.tiers:
            e = engines[t]
            per_prompt = e.prefill_seconds_per_token if e.prefill_seconds_per_token is not None else e.step_seconds_per_token
            tiers[t] = TierCost(fixed_s=e.step_fixed_seconds, row_s=e.step_seconds_per_token,
                                prefill_token_s=per_prompt, loss=self.losses.get(t, 0.0), switch_s=e.switch_seconds,
                                max_num_seqs=e.max_num_seqs,
                                bias=plan_bias(e.finished_bias))
        measured_out = max((e.avg_output_tokens for e in engines.values()), default=0.0)
        output = measured_out if measured_out > 0 else (self._output or 16.0)
        pinned = {t: self._rate(q, now) for t, q in self._pinned.items()}
        rate = self._rate(self._arrivals, now, fresh=now - self._fresh_since < self.rate_window_s)
        in_system = sum(e.num_running + e.num_waiting for e in engines.values())
        horizon = self.slo_s if self.slo_s is not None else 1.0
        backlog_rate = in_system / horizon - sum(pinned.values())
        return PlanInputs(tiers=tiers, auto_rate=max(rate, backlog_rate, 0.0), prompt_tokens=self._prompt or 1.0,
                          output_tokens=output, pinned_rate=pinned, slo_s=self.slo_s, util_target=self.util_target)

    def replan(self, snap: TelemetrySnapshot, now: float) -> tuple[Plan, Plan | None]:
        """(the new plan, the one it replaced)."""
        old = self.plan
        inp = self.inputs(snap, now)
        new = make_plan(inp, now)
        if old is not None and new.loss < old.loss - 1e-12:  # the load fell: up only with a margin, after a hold
            cautious = make_plan(replace(inp, auto_rate=inp.auto_rate * (1.0 + self.up_margin)), now)
            if now - self._changed_at >= self.hold_s and cautious.loss < old.loss - 1e-12:
                new = cautious
            else:
                new = replace(old, time=now, auto_rate=inp.auto_rate)
        self.plan = new
        self.replans += 1
        self._since = 0
        if old is None or set(old.shares) != set(new.shares):
            self._changed_at = now
        return self.plan, old

    # ----- placement --------------------------------------------------------------------------
    def place(self, loss: dict[str, float]) -> Placement:
        """The tier for a request whose predicted loss per tier is `loss`, under the plan in force."""
        plan = self.plan
        self._recent.append(dict(loss))
        order = plan.order
        if len(order) == 1:
            return Placement(order[0], None, None, None)
        a, b = order[0], order[-1]
        score = loss.get(a, 0.0) - loss.get(b, 0.0)
        less = equal = 0
        for r in self._recent:
            s = r.get(a, 0.0) - r.get(b, 0.0)
            if math.isclose(s, score, rel_tol=1e-9, abs_tol=1e-12):
                equal += 1
            elif s < score:
                less += 1
        rank = (less + self._rng.random() * equal) / len(self._recent)
        return Placement(assign(plan, rank), rank, plan.shares[a], score)
