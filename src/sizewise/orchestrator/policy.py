"""The routing policy: probe + telemetry + client hints -> (tier, decode strategy, reason).

A pure function of its inputs (no engine access, no clock), so every decision can be replayed
and explained, and tests can script the telemetry it reads. In order:

1. pinned: a client `model` (tier alias or model name) is never overridden.
2. probe: score = difficulty + intent_bias[intent] - copy_weight * copyability, where
   difficulty is the probe model's mean NLL over the prompt (nats/token). The cheapest tier
   whose threshold the score stays under is the one whose expected quality meets the need:
   score <= max_difficulty_small -> small ("probe:easy"), <= max_difficulty_medium -> medium
   ("probe:moderate"), else large ("probe:hard"); a tier that is not resident rounds up.
3. client latency budget (`max_latency_ms`, minus the probe's own time): keep the tier if its
   queue-estimated latency fits, else the highest-quality tier that fits ("latency_budget"),
   else the fastest one ("latency_budget:best_effort").
4. KV pressure: if the projected KV use of the chosen engine (blocks in use + the queue's and
   this request's blocks) crosses kv_high, move to the nearest tier below that has room
   ("kv_pressure:down"), else above ("kv_pressure:up"), else stay ("kv_pressure:saturated").
5. queue: if queue_high_ms is set and the chosen engine's estimate crosses it, move up to a
   tier that fits (better quality and faster: "queue:up"), else down ("queue:down"), else
   stay ("queue:saturated").
   consolidate: if the chosen engine is idle while a better tier is busy with free batch slots
   and would finish the request no later, join that batch ("consolidate:up"): one more
   sequence costs a busy engine little, waking an idle one adds its step to every turn of the
   worker. When every cheaper tier would consolidate anyway, the router skips the model probe.
6. strategy for `auto`: prompt lookup when the prompt is copyable enough, the engine's batch is
   small enough for speculation to pay, and the measured acceptance (if any) is high enough;
   a draft model likewise for medium/large when allowed; otherwise plain. Strategies are only
   chosen among those the engine accepts.

Queue-estimated latency of engine e for a request of P prompt and M new tokens: the worker
steps busy engines round-robin, so each of e's steps also waits for one step of every other
busy engine:  prefill_steps * (prefill_step + others) + (wait_steps + M) * (decode_step + others),
with step costs from the telemetry's per-engine cost model (fixed + per_token * tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .telemetry import EngineTelemetry, TelemetrySnapshot

INTENTS = ("code", "math", "knowledge", "chat")
TIER_ORDER = ("small", "medium", "large")
LEVELS = {"small": "probe:easy", "medium": "probe:moderate", "large": "probe:hard"}


@dataclass(slots=True)
class PolicySettings:
    intent_mode: str = "features"  # features | zero_shot
    difficulty: bool = True
    probe_model: str | None = None
    probe_max_tokens: int = 512
    copy_ngram: int = 3
    max_difficulty_small: float = 2.5
    max_difficulty_medium: float = 3.5
    intent_bias: dict[str, float] = field(default_factory=lambda: {i: 0.0 for i in INTENTS})
    copy_weight: float = 1.0
    kv_high: float = 0.9
    queue_high_ms: float | None = None
    consolidate: bool = True
    pld_min_copyability: float = 0.3
    spec_max_batch: int = 8
    spec_min_acceptance: float = 0.4
    allow_draft: bool = False


@dataclass(slots=True)
class Choice:
    model: str
    tier: str
    strategy: str
    reason: str  # the last rule that decided (a bounded label: metrics use it)
    steps: list[str] = field(default_factory=list)  # every rule that fired, in order
    score: float | None = None
    estimates_ms: dict[str, float] = field(default_factory=dict)  # per tier
    kv_pressure: dict[str, float] = field(default_factory=dict)  # per tier, projected


class Policy:
    def __init__(self, settings: PolicySettings, tier_to_model: dict[str, str]) -> None:
        self.s = settings
        self.tiers = [t for t in TIER_ORDER if t in tier_to_model]  # cheapest first
        if not self.tiers:
            raise ValueError("the policy needs at least one resident tier")
        self.tier_to_model = dict(tier_to_model)

    # ----- the pieces -------------------------------------------------------------------
    def score(self, probe) -> float | None:
        if probe is None:
            return None
        # Without a difficulty measurement the request counts as moderate; intent and
        # copyability still move it.
        base = probe.difficulty if probe.difficulty is not None else self.s.max_difficulty_medium
        return base + self.s.intent_bias.get(probe.intent, 0.0) - self.s.copy_weight * probe.copyability

    def base_tier(self, score: float | None) -> tuple[str, str]:
        if score is None:
            return self.tiers[-1], "probe:unavailable"
        want = "small" if score <= self.s.max_difficulty_small else (
            "medium" if score <= self.s.max_difficulty_medium else "large")
        # A tier that is not resident rounds up (quality first), the largest if none is above.
        for t in TIER_ORDER[TIER_ORDER.index(want):]:
            if t in self.tier_to_model:
                return t, LEVELS[want]
        return self.tiers[-1], LEVELS[want]

    @staticmethod
    def estimate_ms(snap: TelemetrySnapshot, model: str, prompt_tokens: int, new_tokens: int, n: int = 1) -> float:
        e = snap.engines[model]
        others = sum(
            f.step_cost(min(f.num_running + f.num_waiting, f.max_num_seqs))
            for name, f in snap.engines.items() if name != model and f.busy
        )
        in_queue = e.num_running + e.num_waiting + n
        batch = min(in_queue, e.max_num_seqs)
        out_len = e.avg_output_tokens if e.avg_output_tokens > 0 else new_tokens
        # Sequences beyond max_num_seqs wait for running ones to finish: about one average
        # output length of decode steps per full batch ahead.
        wait_steps = math.ceil(max(in_queue - e.max_num_seqs, 0) / e.max_num_seqs) * out_len
        prefill_tokens = e.num_waiting * e.avg_prompt_tokens + prompt_tokens * n
        prefill_steps = max(math.ceil(prefill_tokens / e.max_num_batched_tokens), 1)
        prefill_step = e.step_cost(min(prefill_tokens, e.max_num_batched_tokens))
        decode_steps = wait_steps + max(new_tokens - 1, 0)  # the prefill step samples the first token
        total = prefill_steps * (prefill_step + others) + decode_steps * (e.step_cost(batch) + others)
        return total * 1e3

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

    # ----- the decision -------------------------------------------------------------------
    def decide(
        self, probe, snap: TelemetrySnapshot, *, pinned: str | None = None, strategy: str = "auto",
        max_latency_ms: float | None = None, prompt_tokens: int, max_new_tokens: int, n: int = 1,
        strategies: dict[str, set[str]] | None = None,
    ) -> Choice:
        model_to_tier = {m: t for t, m in self.tier_to_model.items()}
        est = {t: self.estimate_ms(snap, m, prompt_tokens, max_new_tokens, n)
               for t, m in self.tier_to_model.items() if m in snap.engines}
        kv = {t: self.kv_pressure(snap.engines[m], prompt_tokens, max_new_tokens, n)
              for t, m in self.tier_to_model.items() if m in snap.engines}
        score = self.score(probe)
        steps: list[str] = []

        if pinned is not None:
            tier = model_to_tier[pinned]
            steps.append("pinned")
        else:
            tier, why = self.base_tier(score)
            steps.append(why)
            engines = {t: snap.engines[m] for t, m in self.tier_to_model.items() if m in snap.engines}
            tier = self._adjust(tier, est, kv, engines, max_latency_ms, probe, steps)
        model = self.tier_to_model[tier] if pinned is None else pinned
        strat, why = self._strategy(strategy, tier, snap.engines.get(model), probe, n,
                                    (strategies or {}).get(model, {"plain"}))
        if why:
            steps.append(why)
        reason = next(s for s in reversed(steps) if not s.startswith("strategy:"))
        return Choice(model=model, tier=tier, strategy=strat, reason=reason, steps=steps, score=score,
                      estimates_ms=est, kv_pressure=kv)

    def _adjust(self, tier: str, est: dict, kv: dict, engines: dict, max_latency_ms, probe, steps: list[str]) -> str:
        s = self.s
        ok = lambda t: kv.get(t, 1.0) < s.kv_high  # noqa: E731 - room in the KV cache
        order = self.tiers
        if max_latency_ms is not None:
            budget = max_latency_ms - (probe.ms if probe is not None else 0.0)
            if not (ok(tier) and est[tier] <= budget):
                fits = [t for t in order if ok(t) and est[t] <= budget]
                if fits:
                    tier = fits[-1]  # highest quality that fits
                    steps.append("latency_budget")
                else:
                    pool = [t for t in order if ok(t)] or order
                    tier = min(pool, key=lambda t: est[t])
                    steps.append("latency_budget:best_effort")
            return tier  # the client's budget decided; load rules below would only break it
        if not ok(tier):
            i = order.index(tier)
            down = [t for t in reversed(order[:i]) if ok(t)]
            up = [t for t in order[i + 1:] if ok(t)]
            if down:
                tier = down[0]
                steps.append("kv_pressure:down")
            elif up:
                tier = up[0]
                steps.append("kv_pressure:up")
            else:  # no tier has room: stay, and say why the KV rule did not move it
                steps.append("kv_pressure:saturated")
        if s.queue_high_ms is not None and est[tier] > s.queue_high_ms:
            i = order.index(tier)
            up = [t for t in order[i + 1:] if ok(t) and est[t] <= s.queue_high_ms]
            down = [t for t in reversed(order[:i]) if ok(t) and est[t] <= s.queue_high_ms]
            if up:
                tier = up[0]
                steps.append("queue:up")
            elif down:
                tier = down[0]
                steps.append("queue:down")
            else:
                steps.append("queue:saturated")
        if s.consolidate:
            up = self._consolidation_targets(tier, est, kv, engines)
            if up:
                tier = up[-1]  # the best quality among them
                steps.append("consolidate:up")
        return tier

    def _consolidation_targets(self, tier: str, est: dict, kv: dict, engines: dict) -> list[str]:
        """Higher tiers worth joining instead of waking `tier`: `tier`'s engine is idle, theirs
        is busy with free batch slots, and the estimate says the request finishes no later
        there. Under continuous batching one more sequence costs a busy engine little (decode
        streams the weights once per step for the whole batch), while waking an idle engine
        adds a whole step of it to every turn of the worker, delaying everyone in flight."""
        e = engines.get(tier)
        if e is None or e.busy:
            return []
        i = self.tiers.index(tier)
        return [
            t for t in self.tiers[i + 1:]
            if t in engines and engines[t].busy and engines[t].num_running + engines[t].num_waiting < engines[t].max_num_seqs
            and kv.get(t, 1.0) < self.s.kv_high and est[t] <= est[tier]
        ]

    def probe_is_moot(self, snap: TelemetrySnapshot, prompt_tokens: int, new_tokens: int, n: int = 1) -> bool:
        """True when every cheaper tier would consolidate into the top tier whatever the probe
        says: then the model probe (a prefill on the probe engine) is skipped."""
        if not self.s.consolidate or len(self.tiers) < 2:
            return False
        engines = {t: snap.engines[m] for t, m in self.tier_to_model.items() if m in snap.engines}
        if len(engines) != len(self.tiers):
            return False
        est = {t: self.estimate_ms(snap, self.tier_to_model[t], prompt_tokens, new_tokens, n) for t in self.tiers}
        kv = {t: self.kv_pressure(engines[t], prompt_tokens, new_tokens, n) for t in self.tiers}
        top = self.tiers[-1]
        return all(top in self._consolidation_targets(t, est, kv, engines) for t in self.tiers[:-1])

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
