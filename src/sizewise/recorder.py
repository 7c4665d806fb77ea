"""What the server records into its Metrics, one call per event.

The server calls this at the few points where something happened (a request was routed, tokens
arrived, a request finished, a request failed, a scrape came) and never touches a metric
object itself. Engine running totals (preemptions, speculative tokens) are followed here: each
scrape adds what the total grew by since the last one.
"""

from __future__ import annotations

from .metrics import Metrics

_PROBE_TIME_KEYS = ("time_ms", "ms", "probe_ms")  # where a router's probe dict may report its time


def probe_ms(probe: dict | None) -> float:
    return next((probe[k] for k in _PROBE_TIME_KEYS if isinstance(probe.get(k), (int, float))), 0.0) if probe else 0.0

def promised_slo_ms(decision) -> float | None:
    """The latency objective (ms) the decision was predicted to meet, or None (no objective, no
    prediction, or predicted to miss it). As the policy compares: the tier's predicted latency plus
    the probe's time against the objective."""
    explain = decision.explain or {}
    slo, tier = explain.get("slo_ms"), (explain.get("tiers") or {}).get(decision.tier)
    if slo is None or tier is None or "latency_ms" not in tier:
        return None
    return slo if tier["latency_ms"] + probe_ms(decision.probe) <= slo else None


FINISH_REASONS = ("stop", "length", "abort")
# The statuses a model request ends with, pre-created so rate() sees the first of each.
ERROR_STATUSES = ("400", "401", "404", "413", "429", "500", "503", "504")


class Recorder:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._totals: dict[tuple[str, ...], float] = {}  # engine running totals at the last scrape
        self._tiers: set[str] = set()
        for status in ERROR_STATUSES:
            metrics.errors.labels(status=status)
        self._itl: dict[tuple[str, str], object] = {}  # (model, tier) -> its ITL histogram child (labels() per token showed)

    def models(self, infos) -> None:
        """Pre-create every labelled series at zero once the models are known: a counter that
        appears at its first event (an abort, a preemption) at 1 gives rate() no start. Speculative
        series exist only for the proposers a model can run (a small tier never has a draft)."""
        m = self.metrics
        self._tiers = {info.tier for info in infos}
        for info in infos:
            labels = {"model": info.name, "tier": info.tier}
            for reason in FINISH_REASONS:
                m.requests.labels(finished_reason=reason, **labels)
            for c in (m.prompt_tokens, m.generation_tokens, m.preemptions, m.device_seconds, m.device_bytes):
                c.labels(**labels)
            m.slo_promised.labels(tier=info.tier)
            m.slo_missed.labels(tier=info.tier)
            for h in (m.ttft, m.itl, m.e2e, m.queue_time):
                h.labels(**labels)
            for strategy in info.strategies:
                if strategy != "plain":
                    m.spec_draft.labels(strategy=strategy, **labels)
                    m.spec_accepted.labels(strategy=strategy, **labels)
        m.set_cache_config(infos)

    def routed(self, decision) -> None:
        m = self.metrics
        m.route_decisions.labels(tier=decision.tier, reason=decision.reason).inc()
        if decision.probe is not None and decision.reason != "pinned":  # what routing `auto` cost, model probe or not
            m.probe.observe(probe_ms(decision.probe) / 1000.0)
        lam = (decision.explain or {}).get("lambda_nats_per_gb")
        if lam is not None:
            m.route_lambda.set(lam)
        plan = (decision.explain or {}).get("plan")
        if plan is not None:
            for tier in self._tiers | set(plan["shares"]):
                m.plan_share.labels(tier=tier).set(plan["shares"].get(tier, 0.0))
            m.plan_util_target.set(plan["util_cap"])
            m.plan_util.set(plan["utilization"])
            self._follow(m.replans, ("replans",), plan.get("replans", 0))
            self._follow(m.plan_moves, ("moves",), plan.get("moves", 0))

    def tokens(self, decision, gap_s: float, count: int) -> None:
        """`count` tokens arrived `gap_s` after the previous ones: one inter-token observation per
        token (a speculative step delivering k tokens gives k equal gaps)."""
        h = self._itl.get((decision.model, decision.tier))
        if h is None:
            h = self._itl[decision.model, decision.tier] = self.metrics.itl.labels(model=decision.model,
                                                                                  tier=decision.tier)
        for _ in range(count):
            h.observe(gap_s / count)

    def finished(self, decision, finish_reasons: list[str], prompt_tokens: int, completion_tokens: int,
                 times: dict | None, first_token_s: float | None, elapsed_s: float) -> None:
        """One engine request ended (finished or aborted): one count per sample by reason, its
        tokens and latencies. `times` are the engine's (arrival / first_scheduled / first_token /
        finished, wall clock); without them the server's own `first_token_s` and `elapsed_s`."""
        m = self.metrics
        labels = {"model": decision.model, "tier": decision.tier}
        for reason in finish_reasons:
            m.requests.labels(finished_reason=reason, **labels).inc()
        m.prompt_tokens.labels(**labels).inc(prompt_tokens)
        m.generation_tokens.labels(**labels).inc(completion_tokens)
        t = times or {}
        # The engine's clock starts when the routed request reaches it; the probe ran before that
        # and is part of what the client waited for.
        probe_s = probe_ms(decision.probe) / 1000.0
        arrival = t.get("arrival_time")
        if arrival is not None and t.get("first_scheduled_time") is not None:
            m.queue_time.labels(**labels).observe(max(0.0, t["first_scheduled_time"] - arrival))
        if arrival is not None and t.get("first_token_time") is not None:
            m.ttft.labels(**labels).observe(max(0.0, t["first_token_time"] - arrival) + probe_s)
        elif first_token_s is not None:
            m.ttft.labels(**labels).observe(first_token_s)
        if arrival is not None and t.get("finished_time") is not None:
            e2e_s = max(0.0, t["finished_time"] - arrival) + probe_s
        else:
            e2e_s = elapsed_s
        m.e2e.labels(**labels).observe(e2e_s)
        slo_ms = promised_slo_ms(decision)
        if slo_ms is not None and "abort" not in finish_reasons:  # an aborted request's latency says nothing
            m.slo_promised.labels(tier=decision.tier).inc()
            if e2e_s * 1e3 > slo_ms:
                m.slo_missed.labels(tier=decision.tier).inc()

    def error(self, status: int) -> None:
        self.metrics.errors.labels(status=str(status)).inc()

    def scrape(self, stats) -> None:
        """Gauges and followed counters from a DeploymentStats."""
        m = self.metrics
        for name, st in stats.models.items():
            labels = {"model": name, "tier": st.tier}
            m.running.labels(**labels).set(st.num_running)
            m.waiting.labels(**labels).set(st.num_waiting)
            m.kv_usage.labels(**labels).set(st.kv_usage)
            m.bandwidth.labels(**labels).set(st.achieved_bandwidth)
            if st.bandwidth_utilization is not None:
                m.bandwidth_util.labels(**labels).set(st.bandwidth_utilization)
            self._follow(m.preemptions.labels(**labels), ("preempt", name), st.num_preemptions)
            self._follow(m.device_seconds.labels(**labels), ("device_s", name), st.device_seconds_total)
            self._follow(m.device_bytes.labels(**labels), ("device_b", name), st.device_bytes_total)
            for strategy, n in st.spec_draft_tokens.items():
                self._follow(m.spec_draft.labels(strategy=strategy, **labels), ("draft", name, strategy), n)
            for strategy, n in st.spec_accepted_tokens.items():
                self._follow(m.spec_accepted.labels(strategy=strategy, **labels), ("accepted", name, strategy), n)
        if stats.peak_bandwidth:
            m.peak_bandwidth.set(stats.peak_bandwidth)
        if stats.device_memory_used_bytes is not None:
            m.device_memory.set(stats.device_memory_used_bytes)
        if stats.load_utilization is not None:
            m.load_util.set(stats.load_utilization)
            m.busy.set(stats.busy_fraction)
        m.set_load(stats)

    def _follow(self, counter, key: tuple[str, ...], total: float) -> None:
        """Make `counter` follow a running total the engine keeps: add the growth since the last
        scrape (a total that went down means the engine restarted its count)."""
        last = self._totals.get(key, 0)
        counter.inc(total - last if total >= last else total)
        self._totals[key] = total
