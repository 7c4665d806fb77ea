"""The routing policy: one objective, priced by the device's load, explained.

A pure function of its inputs (probe signals, a telemetry snapshot, client hints; no engine
access, no clock), so every decision can be replayed and tests can script the telemetry.

For every resident tier t the policy predicts, for this request:
  * loss[t]: the expected quality loss if t serves it, in nats/token of the answer against the top
    tier (the calibration-fitted `QualityPredictor` over the probe's signals; the top tier is 0);
  * latency[t]: end-to-end milliseconds from the telemetry's step cost model (fixed + per token)
    and the queues, under the worker's stepping discipline (`estimate_ms`);
  * cost[t]: bytes the device streams for it on t: per decode step its share of the weights
    (weights / batch once it joins: waking an idle engine pays the whole stream, joining a busy
    batch little) plus its KV reads (`cost_bytes`).
Then it picks, among tiers whose latency meets the SLO (the request's `max_latency_ms`, else
`policy.slo_ms`, less the probe's own time) and whose KV cache has room,

    argmin_t  loss[t] + lam * cost[t]

and when no tier meets the SLO, the fastest one. A pinned `model` is never moved.

lam, the price of device bandwidth (nats per GB), is a proportional controller with a dead band
over the device's pressure (`price`): pressure = the largest of achieved bandwidth / peak, the
device's backlog against the SLO (seconds of work queued on all engines / SLO) and the top tier's
projected KV use / kv_high. Below `price_deadband` lam is 0, so an idle deployment serves every request on the best
tier; above it lam rises linearly. Why proportional and stateless rather than an integrator: its
inputs are already EMA-smoothed by the telemetry and respond to routing within one output length,
so a static map of them cannot wind up during a burst or oscillate around a set point, and every
decision is reproducible from its snapshot. lam is scaled by (the cheapest tier's mean loss) / (the
request's cost on the top tier), so one gain works for any family: at gain 1 an average request's
loss on the cheapest tier is worth its whole top-tier stream. Easy requests move first, because
their predicted loss is smallest.

`Choice.reason` names the constraint that decided (a bounded label set, used by metrics):
  objective:quality  the lowest-loss tier that meets the SLO (lam did not move it)
  objective:price    lam * cost moved it below the lowest-loss tier that meets the SLO
  slo                a lower-loss tier would miss the SLO
  slo:best_effort    no tier meets the SLO: the fastest one
  kv_pressure        a lower-loss tier has no KV room for it
  pinned             the client named a model or tier
Strategy for `auto`: prompt lookup when the prompt is copyable enough, the batch small enough for
speculation to pay and the measured acceptance high enough; a draft model likewise when allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .telemetry import EngineTelemetry, TelemetrySnapshot
from .tiers import TIER_ORDER

INTENTS = ("code", "math", "knowledge", "chat")
# Signals the quality predictor may read: the probe's (difficulty only when its model prefill ran),
# the intent class probabilities, and prompt_gap (small minus top tier prompt NLL: needs a prefill
# through the top tier, measured at calibration to see whether it would pay).
SIGNALS = ("difficulty", "surprisal", "copyability", "repeat_fraction", "log_prompt_tokens", *INTENTS, "prompt_gap")
REASONS = ("objective:quality", "objective:price", "slo", "slo:best_effort", "kv_pressure", "pinned",
           "single_model", "static", "plan:idle", "plan:headroom", "plan:mix", "plan:single", "plan:overload",
           "plan:unattainable")
PLACEMENTS = ("plan", "objective")
DISCIPLINES = ("fair", "round_robin")
# Until a deployment is calibrated: the gap of each smaller tier to the top tier (nats/token), a
# prior that keeps quality first; `sizewise calibrate` replaces it with a fitted predictor.
_PRIOR_GAP = {"small": 0.6, "medium": 0.3}


def signals_of(probe) -> dict[str, float]:
    """The predictor's inputs from a ProbeResult (difficulty only when it was measured)."""
    s = {"copyability": probe.copyability, "repeat_fraction": probe.repeat_fraction,
         "log_prompt_tokens": math.log1p(probe.prompt_tokens)}
    s.update({i: float(probe.intent_scores.get(i, 0.0)) for i in INTENTS})
    if probe.difficulty is not None:
        s["difficulty"] = probe.difficulty
    if getattr(probe, "surprisal", None) is not None:
        s["surprisal"] = probe.surprisal
    return s


@dataclass(slots=True, frozen=True)
class TierFit:
    """Predicted NLL gap of one tier to the top tier: max(0, intercept + sum coef[s] * x[s]).
    `mean` (the tier's mean gap on the calibration set) stands in when a signal it reads is
    missing (the probe was skipped)."""

    intercept: float
    coef: dict[str, float]
    mean: float

    def predict(self, signals: dict[str, float]) -> float:
        if any(s not in signals for s in self.coef):
            return max(self.mean, 0.0)
        return max(self.intercept + sum(c * signals[s] for s, c in self.coef.items()), 0.0)


@dataclass(slots=True, frozen=True)
class QualityPredictor:
    tiers: dict[str, TierFit]  # every tier below the top one

    @classmethod
    def prior(cls, tiers: list[str]) -> "QualityPredictor":
        return cls({t: TierFit(g, {}, g) for t, g in _PRIOR_GAP.items() if t in tiers[:-1]})

    @property
    def signals(self) -> set[str]:
        return {s for f in self.tiers.values() for s in f.coef}

    def loss(self, tier: str, signals: dict[str, float]) -> float:
        f = self.tiers.get(tier)
        return 0.0 if f is None else f.predict(signals)


@dataclass(slots=True)
class PolicySettings:
    intent_mode: str = "features"  # features | zero_shot
    difficulty: bool = True
    probe_model: str | None = None
    probe_max_tokens: int = 512
    probe_max_ms: float = 10.0  # the model probe is skipped when its step would take longer
    always_probe: bool = False  # run the model probe even when it could not change the decision
    copy_ngram: int = 3
    quality: QualityPredictor | None = None  # None: the prior (quality first)
    slo_ms: float | None = None  # end-to-end latency objective; a request's max_latency_ms overrides
    price_gain: float = 1.0
    price_deadband: float = 0.7
    kv_high: float = 0.9
    discipline: str = "fair"  # how the worker shares the device (the latency model predicts it)
    pld_min_copyability: float = 0.3
    spec_max_batch: int = 8
    spec_min_acceptance: float = 0.4
    allow_draft: bool = False
    # plan: a capacity plan sets the tiers and shares, requests fill them by predicted loss (control.py);
    # objective: each request placed alone by loss + lam x bytes under predicted latency (the old design)
    placement: str = "plan"
    util_target: float = 0.85  # the plan keeps predicted load utilisation under this
    move_running: bool = False  # a plan that leaves a tier where it would wait moves its running requests down
    token_stats: object | None = None  # probe.TokenStats: the surprisal signal's unigram table


@dataclass(slots=True)
class Choice:
    model: str
    tier: str
    strategy: str
    reason: str  # the constraint that decided (one of REASONS)
    lam: float = 0.0  # nats per GB
    pressure: float = 0.0
    slo_ms: float | None = None
    loss: dict[str, float] = field(default_factory=dict)  # per tier, nats/token vs the top tier
    latency_ms: dict[str, float] = field(default_factory=dict)  # per tier, predicted
    cost_bytes: dict[str, float] = field(default_factory=dict)  # per tier
    kv_pressure: dict[str, float] = field(default_factory=dict)  # per tier, projected
    strategy_reason: str | None = None
    plan: dict | None = None  # the capacity plan in force (placement: plan)
    placement: dict | None = None  # where this request fell in it

    def to_json(self) -> dict:
        tiers = {}
        for t in self.latency_ms:
            row = {"loss": round(self.loss.get(t, 0.0), 4), "latency_ms": round(self.latency_ms[t], 2)}
            if t in self.cost_bytes:
                row["cost_mb"] = round(self.cost_bytes[t] / 1e6, 3)
            if t in self.kv_pressure:
                row["kv"] = round(self.kv_pressure[t], 4)
            tiers[t] = row
        d = {"lambda_nats_per_gb": round(self.lam, 6), "pressure": round(self.pressure, 4), "slo_ms": self.slo_ms,
             "tiers": tiers}
        if self.plan is not None:
            d["plan"] = self.plan
        if self.placement is not None:
            d["placement"] = self.placement
        return d


class Policy:
    def __init__(self, settings: PolicySettings, tier_to_model: dict[str, str]) -> None:
        self.s = settings
        self.tiers = [t for t in TIER_ORDER if t in tier_to_model]  # cheapest first
        if not self.tiers:
            raise ValueError("the policy needs at least one resident tier")
        if settings.discipline not in DISCIPLINES:
            raise ValueError(f"discipline must be one of {', '.join(DISCIPLINES)}, got {settings.discipline!r}")
        self.tier_to_model = dict(tier_to_model)
        # Only the tiers below the top one have a loss; one the fit lacks keeps the prior.
        prior = QualityPredictor.prior(self.tiers).tiers
        given = settings.quality.tiers if settings.quality is not None else {}
        self.quality = QualityPredictor({t: given.get(t, prior.get(t, TierFit(_PRIOR_GAP["small"], {}, _PRIOR_GAP["small"])))
                                         for t in self.tiers[:-1]})

    # ----- predictions ---------------------------------------------------------------------
    @staticmethod
    def _own(e: EngineTelemetry, prompt_tokens: int, new_tokens: int, n: int) -> tuple[int, float]:
        """(steps, seconds) engine e needs for the request once stepping: its prefill (queued
        prompts first), the sequences ahead beyond a full batch, then its own decode steps in a
        batch that also grows by what keeps arriving meanwhile (the engine's arrival rate)."""
        in_queue = e.num_running + e.num_waiting + n
        out_len = e.avg_output_tokens if e.avg_output_tokens > 0 else new_tokens
        wait_steps = math.ceil(max(in_queue - e.max_num_seqs, 0) / e.max_num_seqs) * out_len
        prefill_tokens = e.num_waiting * e.avg_prompt_tokens + prompt_tokens * n
        prefill_steps = max(math.ceil(prefill_tokens / e.max_num_batched_tokens), 1)
        prefill_step = e.prefill_cost(min(prefill_tokens, e.max_num_batched_tokens))
        decode_steps = wait_steps + max(new_tokens - 1, 0)  # the prefill step samples the first token
        batch = min(in_queue, e.max_num_seqs)
        seconds = prefill_steps * prefill_step + decode_steps * e.step_cost(batch)
        if e.arrival_rate > 0:  # one fixed-point pass: arrivals over half the request's life join its batch
            batch = min(in_queue + e.arrival_rate * seconds / 2, e.max_num_seqs)
            seconds = prefill_steps * prefill_step + decode_steps * e.step_cost(batch)
        return prefill_steps + decode_steps, seconds

    @staticmethod
    def _backlog(f: EngineTelemetry) -> tuple[float, float]:
        """(steps, seconds) of work engine f has queued now: its batches to the end of an average
        output, plus its waiting prompts' prefill."""
        seqs = f.num_running + f.num_waiting
        batch = min(seqs, f.max_num_seqs)
        out_len = f.avg_output_tokens if f.avg_output_tokens > 0 else 16.0
        steps = math.ceil(seqs / f.max_num_seqs) * out_len
        prefill = f.num_waiting * f.avg_prompt_tokens
        pf_steps = math.ceil(prefill / f.max_num_batched_tokens) if prefill else 0
        return steps + pf_steps, steps * f.step_cost(batch) + pf_steps * f.prefill_cost(
            min(prefill, f.max_num_batched_tokens))

    @classmethod
    def estimate_ms(cls, snap: TelemetrySnapshot, model: str, prompt_tokens: int, new_tokens: int, n: int = 1,
                    discipline: str = "fair") -> float:
        """Predicted end-to-end ms of the request on `model`: its own steps plus what every other
        busy engine runs in between, up to that engine's backlog. Round robin: one step of each
        other engine per own step. Fair (equal device-time shares): each other engine gets as
        much device time as this one, so a cheap tier's requests are not paced by a dear tier's
        steps. Scaled by the engine's measured / predicted latency on recent requests (telemetry)."""
        e = snap.engines[model]
        steps, own = cls._own(e, prompt_tokens, new_tokens, n)
        others = 0.0
        for name, f in snap.engines.items():
            if name == model or not (f.busy or f.arrival_rate > 0):
                continue
            f_steps, f_s = cls._backlog(f)
            batch_f = max(min(f.num_running + f.num_waiting, f.max_num_seqs), 1)
            per_step = f_s / max(f_steps, 1) if f_steps else f.step_cost(batch_f)
            mine = steps * per_step if discipline == "round_robin" else own
            # An engine that keeps receiving has work for a fraction 1 - exp(-rate x life) of the
            # time (Poisson arrivals, each busy for its own steps there): that share of my steps
            # it takes its turn too, beyond the backlog it already has.
            out_f = f.avg_output_tokens if f.avg_output_tokens > 0 else 16.0
            busy_frac = 1.0 - math.exp(-f.arrival_rate * out_f * f.step_cost(batch_f))
            others += max(min(mine, f_s), mine * busy_frac)
        return (own + others) * e.latency_bias * 1e3

    @staticmethod
    def cost_bytes(e: EngineTelemetry, prompt_tokens: int, new_tokens: int, n: int = 1, peak_bandwidth: float = 0.0
                   ) -> float:
        """Bytes of device bandwidth the request takes on e. Per decode step: its share of the
        weight stream (the batch it joins shares one: waking an idle engine pays it whole) plus
        its KV reads. Where the measured cost model says a step costs more than its bytes at the
        device's peak (a CPU, where the per-token part dominates), the request's share of the step
        time at peak bandwidth is charged instead: the bytes the device could have moved meanwhile."""
        batch = min(e.num_running + e.num_waiting + n, e.max_num_seqs)
        steps = max(new_tokens, 1)
        streamed = steps * (e.weight_bytes * n / batch + e.kv_bytes_per_token * n * (prompt_tokens + new_tokens / 2))
        if not peak_bandwidth:
            return streamed
        seconds = steps * (e.step_fixed_seconds * n / batch + e.step_seconds_per_token * n) + (
            (e.prefill_cost(prompt_tokens * n) - e.step_fixed_seconds))
        return max(streamed, seconds * peak_bandwidth)

    @staticmethod
    def kv_pressure(e: EngineTelemetry, prompt_tokens: int, new_tokens: int, n: int = 1) -> float:
        """Projected fraction of the engine's KV blocks in use once its queue and this request
        are admitted."""
        if not e.kv_blocks_total:
            return 1.0

        def blocks(tokens: float) -> int:
            return math.ceil(tokens / e.block_size)

        queued = e.num_waiting * blocks(e.avg_prompt_tokens) if e.avg_prompt_tokens else e.num_waiting
        mine = n * blocks(prompt_tokens + new_tokens)
        return (e.kv_blocks_used + queued + mine) / e.kv_blocks_total

    def price(self, snap: TelemetrySnapshot, latency_ms: dict, kv: dict, cost: dict, slo_ms: float | None,
              prompt_tokens: int, new_tokens: int, n: int = 1) -> tuple[float, float]:
        """(lam in nats/GB, pressure): see the module docstring."""
        top = self.tiers[-1]
        pressure = max(snap.bandwidth_utilization, kv[top] / self.s.kv_high)
        # The device's backlog against the SLO: seconds of work queued on every engine (each
        # engine's batches to the end of an average output, scaled by its measured/predicted
        # ratio) over the SLO. Read device-wide, not on one tier: moving traffic between tiers
        # barely changes it, so the price cannot oscillate as requests move away from the top tier.
        # Without an SLO: over three times an average request's latency alone on the top tier (the
        # backlog counts average outputs too, so one queued request is not pressure by itself).
        backlog = sum(self._backlog(e)[1] * e.latency_bias for e in snap.engines.values() if e.busy)
        if slo_ms is not None:
            horizon = slo_ms / 1e3
        else:
            e = snap.engines[self.tier_to_model[top]]
            out_len = round(e.avg_output_tokens) if e.avg_output_tokens > 0 else new_tokens
            horizon = 3 * self._own(replace(e, num_running=0, num_waiting=0, arrival_rate=0.0), prompt_tokens,
                                    max(out_len, 1), n)[1] * e.latency_bias
        pressure = max(pressure, backlog / max(horizon, 1e-9))
        excess = max(pressure - self.s.price_deadband, 0.0) / max(1.0 - self.s.price_deadband, 1e-9)
        if excess == 0.0 or len(self.tiers) < 2:
            return 0.0, pressure
        loss_scale = self.quality.tiers[self.tiers[0]].mean if self.tiers[0] in self.quality.tiers else 1.0
        lam = self.s.price_gain * excess * max(loss_scale, 1e-3) / (cost[top] / 1e9)
        return lam, pressure

    # ----- the decision -------------------------------------------------------------------
    def decide(
        self, probe, snap: TelemetrySnapshot, *, pinned: str | None = None, strategy: str = "auto",
        max_latency_ms: float | None = None, prompt_tokens: int, max_new_tokens: int, n: int = 1,
        strategies: dict[str, set[str]] | None = None, known_loss: dict[str, float] | None = None,
    ) -> Choice:
        """`known_loss` replaces the predicted loss per tier (an oracle that knows each tier's quality)."""
        model_to_tier = {m: t for t, m in self.tier_to_model.items()}
        tiers = [t for t in self.tiers if self.tier_to_model[t] in snap.engines]
        eng = {t: snap.engines[self.tier_to_model[t]] for t in tiers}
        lat = {t: self.estimate_ms(snap, self.tier_to_model[t], prompt_tokens, max_new_tokens, n, self.s.discipline)
               for t in tiers}
        kv = {t: self.kv_pressure(eng[t], prompt_tokens, max_new_tokens, n) for t in tiers}
        cost = {t: self.cost_bytes(eng[t], prompt_tokens, max_new_tokens, n, snap.peak_bandwidth) for t in tiers}
        sig = signals_of(probe) if probe is not None else {}
        loss = {t: known_loss[t] if known_loss is not None else self.quality.loss(t, sig) for t in tiers}
        slo = max_latency_ms if max_latency_ms is not None else self.s.slo_ms
        budget = None if slo is None else slo - (probe.ms if probe is not None else 0.0)
        lam, pressure = self.price(snap, lat, kv, cost, budget, prompt_tokens, max_new_tokens, n)

        if pinned is not None:
            tier, reason = model_to_tier[pinned], "pinned"
        else:
            tier, reason = self._choose(tiers, loss, lat, kv, cost, lam, budget)
        model = self.tier_to_model[tier] if pinned is None else pinned
        strat, why = self._strategy(strategy, tier, snap.engines.get(model), probe, n,
                                    (strategies or {}).get(model, {"plain"}))
        return Choice(model=model, tier=tier, strategy=strat, reason=reason, lam=lam, pressure=pressure,
                      slo_ms=slo, loss=loss, latency_ms=lat, cost_bytes=cost, kv_pressure=kv, strategy_reason=why)

    def _choose(self, tiers, loss, lat, kv, cost, lam, budget) -> tuple[str, str]:
        best_first = sorted(tiers, key=lambda t: (loss[t], cost[t]))  # quality order
        room = [t for t in tiers if kv[t] < self.s.kv_high]
        if not room:  # every cache is over kv_high: the one with the most room
            return min(tiers, key=lambda t: (kv[t], -tiers.index(t))), "kv_pressure"
        fits = [t for t in room if budget is None or lat[t] <= budget]
        if not fits:
            return min(room, key=lambda t: (lat[t], -tiers.index(t))), "slo:best_effort"
        obj = {t: loss[t] + lam * cost[t] / 1e9 for t in fits}
        # Equal objective: the cheaper tier (the same predicted quality for fewer bytes).
        tier = min(fits, key=lambda t: (obj[t], cost[t]))
        quality_pick = min(fits, key=lambda t: (loss[t], cost[t]))
        if tier != quality_pick:
            return tier, "objective:price"
        first = best_first[0]
        if tier == first:
            return tier, "objective:quality"
        # A lower-loss tier was left out: by the KV cache or by the SLO.
        better = best_first[:best_first.index(tier)]
        return tier, "kv_pressure" if all(t not in room for t in better) else "slo"

    def probe_is_moot(self, snap: TelemetrySnapshot, prompt_tokens: int, new_tokens: int, n: int = 1,
                      max_latency_ms: float | None = None) -> bool:
        """True when no signal could change the decision: the top tier wins with no loss anywhere
        (lam = 0 and it meets the SLO), or only one tier is feasible. Then the model probe (a
        prefill on the probe engine) is skipped."""
        if len(self.tiers) < 2:
            return True
        c = self.decide(None, snap, prompt_tokens=prompt_tokens, max_new_tokens=new_tokens, n=n,
                        max_latency_ms=max_latency_ms)
        return c.lam == 0.0 and c.tier == self.tiers[-1] and c.reason == "objective:quality"

    def _strategy(self, requested: str, tier: str, e: EngineTelemetry | None, probe, n: int,
                  supported: set[str]) -> tuple[str, str | None]:
        if requested != "auto":
            return requested, None  # the client's choice; the engine validates it
        s = self.s
        batch = (e.num_running + e.num_waiting + n) if e is not None else n
        acc = e.spec_acceptance if e is not None else {}
        pays = lambda name: batch <= s.spec_max_batch and acc.get(name, 1.0) >= s.spec_min_acceptance  # noqa: E731
        if "pld" in supported and probe is not None and probe.copyability >= s.pld_min_copyability and pays("pld"):
            return "pld", "strategy:pld"
        if "draft" in supported and s.allow_draft and tier != self.tiers[0] and pays("draft"):
            return "draft", "strategy:draft"
        return "plain", None
