"""The routing explanation a person reads (`summary`) and the predicted-vs-measured SLO counters,
on Decisions as the router builds them, read back through prometheus-client's own parser."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from sizewise.metrics import Metrics
from sizewise.orchestrator.types import Decision
from sizewise.recorder import Recorder


def _decision(tier: str, reason: str, slo_ms: float | None, probe_ms: float = 5.0) -> Decision:
    explain = {"lambda_nats_per_gb": 0.0, "pressure": 0.8, "slo_ms": slo_ms,
               "tiers": {"small": {"loss": 0.27, "latency_ms": 180.0, "cost_mb": 2.0, "kv": 0.1},
                         "medium": {"loss": 0.1, "latency_ms": 300.0, "cost_mb": 5.0, "kv": 0.1},
                         "large": {"loss": 0.0, "latency_ms": 400.0, "cost_mb": 9.0, "kv": 0.1}}}
    return Decision(model=f"m-{tier}", tier=tier, strategy="plain", reason=reason, probe={"ms": probe_ms},
                    explain=explain)


def test_summary_names_tier_constraint_latency_and_quality_cost():
    s = _decision("small", "slo", 250.0).to_json()["summary"]
    percent = round(math.expm1(0.27) * 100)  # perplexity ratio to the top tier, as a percentage
    assert s == ("small tier: a better tier would miss the latency objective (predicted 185 ms against the "
                 f"250 ms objective); quality cost: perplexity +{percent}% against large.")
    top = _decision("large", "objective:quality", None).to_json()["summary"]
    assert top == "large tier: the best predicted quality (predicted 405 ms, no latency objective); " \
                  "no quality cost (the top tier)."
    assert "busy (load 80%)" in _decision("medium", "objective:price", 500.0).to_json()["summary"]
    # A static router's decision has no predictions: the sentence says why, nothing more.
    static = Decision(model="big", tier="large", strategy="plain", reason="static").to_json()
    assert static["summary"] == "large tier: the static router sends auto to the largest tier."
    assert "summary" not in _decision("small", "slo", 250.0).to_json(brief=True)


def _counts(m: Metrics) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels["tier"]): s.value for f in text_string_to_metric_families(m.render().decode())
            for s in f.samples if s.name.startswith("sizewise_route_slo_")}


def test_promised_slo_misses_are_counted():
    m = Metrics()
    rec = Recorder(m)
    small = _decision("small", "slo", 250.0)  # predicted 180 + 5 ms <= 250: a promise
    rec.finished(small, ["stop"], 3, 4, None, 0.05, 0.2)  # measured 200 ms: kept
    rec.finished(small, ["length"], 3, 4, None, 0.05, 0.3)  # measured 300 ms: missed
    rec.finished(small, ["abort"], 3, 4, None, 0.05, 0.9)  # the client left: no measurement of the promise
    rec.finished(_decision("large", "slo:best_effort", 250.0), ["stop"], 3, 4, None, 0.05, 0.9)  # never promised
    rec.finished(_decision("large", "objective:quality", None), ["stop"], 3, 4, None, 0.05, 0.9)  # no objective
    assert _counts(m) == {("sizewise_route_slo_promised_total", "small"): 2.0,
                          ("sizewise_route_slo_missed_total", "small"): 1.0}


def test_metrics_have_no_created_series():
    m = Metrics()
    Recorder(m).finished(_decision("small", "slo", 250.0), ["stop"], 3, 4, None, 0.05, 0.2)
    text = m.render().decode()
    assert "sizewise_requests_total" in text and "_created" not in text
