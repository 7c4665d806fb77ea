"""Prometheus metrics for one server instance (its own CollectorRegistry: no process globals).

Names follow vLLM's with the `sizewise_` prefix; labels are bounded (`model`, `tier`,
`finished_reason`, `reason`, `strategy`, `status`), never request ids. Beside them, the few
`vllm:` families that inference routers read from a backend (see `RouterMetrics`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.metrics_core import Metric

# Buckets per quantity (seconds). Each spans what that quantity takes from a graph-captured small
# model on an accelerator to a large one on a laptop CPU, so histogram_quantile stays inside it.
# Queue time is ~0 on an idle server and grows to minutes under backlog.
_QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                  120.0, 300.0)
# First token: one prefill (ms on a GPU, seconds for a long prompt on CPU) plus the queue.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0)
# One decode step: ~1 ms for a 1B model at the roofline, ~0.1-1 s for a large model on CPU.
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
# A whole request: up to max_model_len decode steps, up to the server's request timeout (600 s default).
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0,
                480.0, 960.0)
# The probe: features alone take ~0.1 ms; a difficulty prefill on the small model a few ms (more on CPU).
_PROBE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, multiprocess_dir: str | None = None) -> None:
        """`multiprocess_dir`: one of several API processes of `serve --api-server-count N`, started
        with PROMETHEUS_MULTIPROC_DIR set to it: every process writes its series there and a scrape
        of any of them renders the sum (counters, histograms) and the most recent value (gauges)."""
        # No `_created` series: a timestamp per counter and histogram child, half the scrape, read by no
        # query. prometheus-client has only a process-wide switch; every sizewise registry wants it off.
        disable_created_metrics()
        self.registry = r = registry or CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir

        def gauge(*args, **kw) -> Gauge:  # (the mode matters only in multiprocess mode)
            return Gauge(*args, multiprocess_mode="mostrecent", **kw)

        mt = ["model", "tier"]
        self.ttft = Histogram("sizewise_time_to_first_token_seconds", "Time to first token.", mt, buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("sizewise_inter_token_latency_seconds", "Time between output tokens.", mt, buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("sizewise_e2e_request_latency_seconds", "End-to-end request latency.", mt, buckets=_E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("sizewise_request_queue_time_seconds", "Time from arrival to first scheduled.", mt, buckets=_QUEUE_BUCKETS, registry=r)
        self.probe = Histogram("sizewise_probe_seconds", "Request probe time.", [], buckets=_PROBE_BUCKETS, registry=r)
        self.requests = Counter("sizewise_requests", "Finished requests by reason.", mt + ["finished_reason"], registry=r)
        self.errors = Counter("sizewise_request_errors", "Rejected or failed requests by HTTP status.", ["status"], registry=r)
        self.prompt_tokens = Counter("sizewise_prompt_tokens", "Prompt tokens processed.", mt, registry=r)
        self.generation_tokens = Counter("sizewise_generation_tokens", "Tokens generated.", mt, registry=r)
        self.route_decisions = Counter("sizewise_route_decisions", "Routing decisions.", ["tier", "reason"], registry=r)
        # The load price of the last `auto` decision (policy.py: 0 while the device has headroom).
        self.route_lambda = gauge("sizewise_route_bandwidth_price", "Price of device bandwidth in the routing "
                                  "objective (nats of predicted quality loss per GB streamed).", [], registry=r)
        # Predicted vs measured: decisions predicted to meet their latency objective, and those that then
        # did not, so that a routing promise (reason "slo" among them) never overpromises unseen.
        self.slo_promised = Counter("sizewise_route_slo_promised", "Finished requests the router predicted to "
                                    "meet their latency objective.", ["tier"], registry=r)
        self.slo_missed = Counter("sizewise_route_slo_missed", "Finished requests predicted to meet their latency "
                                  "objective whose measured end-to-end latency exceeded it.", ["tier"], registry=r)
        # The capacity plan in force (orchestrator/plan.py), as of the last `auto` decision.
        self.plan_share = gauge("sizewise_plan_share", "Share of auto traffic the capacity plan gives a tier.",
                                ["tier"], registry=r)
        self.plan_util_target = gauge("sizewise_plan_utilization_target", "Load utilisation the plan keeps under "
                                      "(the lesser of policy.util_target and what the SLO allows).", [], registry=r)
        self.plan_util = gauge("sizewise_plan_utilization_predicted", "Load utilisation the plan predicts.", [],
                               registry=r)
        self.load_util = gauge("sizewise_device_load_utilization", "Measured share of device time spent on "
                               "per-token work over the last 2 s (the plan's utilisation, measured).", [], registry=r)
        self.busy = gauge("sizewise_device_busy_ratio", "Measured share of the last 2 s the device stepped.", [],
                          registry=r)
        self.replans = Counter("sizewise_plan_replans", "Capacity plans made.", [], registry=r)
        self.plan_moves = Counter("sizewise_plan_moves", "Waiting auto requests moved off a tier the plan left.",
                                  [], registry=r)
        self.spec_draft = Counter("sizewise_spec_decode_draft_tokens", "Speculative tokens proposed.", mt + ["strategy"], registry=r)
        self.spec_accepted = Counter("sizewise_spec_decode_accepted_tokens", "Speculative tokens accepted.", mt + ["strategy"], registry=r)
        # Each model's own work, drafting for another model included; summed over models, at most
        # the wall time (the engines step one at a time).
        self.device_seconds = Counter("sizewise_device_seconds", "Seconds the device spent on this model's "
                                      "forwards (drafting for another model included).", mt, registry=r)
        self.device_bytes = Counter("sizewise_device_bytes", "Bytes this model's forwards read (weights once per "
                                    "forward + KV).", mt, registry=r)
        self.preemptions = Counter("sizewise_num_preemptions", "Sequences preempted.", mt, registry=r)
        self.running = gauge("sizewise_num_requests_running", "Sequences running.", mt, registry=r)
        self.waiting = gauge("sizewise_num_requests_waiting", "Sequences waiting.", mt, registry=r)
        self.kv_usage = gauge("sizewise_kv_cache_usage_ratio", "KV-cache blocks in use / total.", mt, registry=r)
        self.bandwidth = gauge("sizewise_achieved_bandwidth_bytes_per_second", "Bytes read per decode step / step time.", mt, registry=r)
        self.bandwidth_util = gauge("sizewise_bandwidth_utilization_ratio", "Achieved / peak bandwidth.", mt, registry=r)
        self.device_memory = gauge("sizewise_device_memory_used_bytes", "Device memory in use (RAM on CPU).", [], registry=r)
        # The reference the utilization ratio divides by (measured copy bandwidth, or configured).
        self.peak_bandwidth = gauge("sizewise_peak_bandwidth_bytes_per_second", "Device peak memory bandwidth.", [],
                                    registry=r)

        self.router = RouterMetrics()
        r.register(self.router)

    def set_cache_config(self, infos) -> None:
        self.router.cache = [(i.name, i.block_size, i.num_blocks) for i in infos]

    def set_load(self, stats) -> None:
        self.router.stats = stats

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        registry.register(self.router)  # the load routers read: this process's view of the core's stats
        return generate_latest(registry)


class RouterMetrics:
    """vLLM's names for the load of a backend, as the routers that pick a backend read them (the
    Kubernetes Gateway API Inference Extension's endpoint picker, llm-d, vLLM's production-stack
    router). Each family has one series without labels for the whole process first (pickers keep
    the first series of a name), then one per model (`model_name`, as vLLM labels it). The values
    are those of the last scrape's DeploymentStats (a collector: nothing is kept between scrapes
    but the numbers themselves)."""

    def __init__(self) -> None:
        self.stats = None  # DeploymentStats, set at each scrape
        self.cache: list[tuple[str, int, int]] = []  # (model, block_size, num_blocks)

    def collect(self):
        st = self.stats
        if st is not None:
            models = st.models.values()
            yield _family("vllm:num_requests_waiting", "Requests waiting to be processed.",
                          st.num_waiting, {m.name: m.num_waiting for m in models})
            yield _family("vllm:num_requests_running", "Requests in model execution batches.",
                          st.num_running, {m.name: m.num_running for m in models})
            # The process value is the fullest tier's (DeploymentStats.kv_usage says why).
            usage = {m.name: m.kv_usage for m in models}
            yield _family("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                          st.kv_usage, usage)
            yield _family("vllm:gpu_cache_usage_perc",
                          "GPU KV-cache usage. 1 means 100 percent usage (vLLM's older name).", st.kv_usage, usage)
        if self.cache:
            info = Metric("vllm:cache_config_info", "Information of the KV-cache config.", "gauge")
            info.add_sample("vllm:cache_config_info", {
                "block_size": str(self.cache[0][1]), "num_gpu_blocks": str(sum(n for *_, n in self.cache))}, 1.0)
            for name, block_size, num_blocks in self.cache:
                info.add_sample("vllm:cache_config_info", {
                    "model_name": name, "block_size": str(block_size), "num_gpu_blocks": str(num_blocks)}, 1.0)
            yield info


def _family(name: str, doc: str, process: float, per_model: dict[str, float]) -> Metric:
    m = Metric(name, doc, "gauge")
    m.add_sample(name, {}, float(process))
    for model, value in per_model.items():
        m.add_sample(name, {"model_name": model}, float(value))
    return m
