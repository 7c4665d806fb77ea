"""From HTTP requests to engine requests and back, with the metrics recorded on the way.

A `Run` is one HTTP request: one engine request (a `Job`) per prompt, each with `n` samples,
routed by the deployment. Each job's RequestStream is drained by a small pump task into one
queue, so several prompts are served concurrently and every delta is timestamped when it
arrives (the inter-token latency histogram comes from those timestamps). Closing a Run aborts
whatever is unfinished, which frees its KV blocks at the engine's next step; every exit path
(client disconnect, timeout, error, normal end) goes through `close`.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import re
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager
from dataclasses import dataclass

from ..engine.async_engine import RequestStream
from ..engine.outputs import CompletionOutput, RequestOutput
from ..chat import render_chat
from ..metrics import Metrics
from ..orchestrator.deployment import Deployment
from ..orchestrator.types import Decision, RoutingHints
from ..sampling_params import InvalidRequestError, SamplingParams
from .errors import ApiError, not_ready, request_timeout, shutting_down

log = logging.getLogger(__name__)

_PROBE_TIME_KEYS = ("time_ms", "ms", "probe_ms")  # where a router's probe dict may report its time


def _probe_ms(probe: dict | None) -> float:
    return next((probe[k] for k in _PROBE_TIME_KEYS if isinstance(probe.get(k), (int, float))), 0.0) if probe else 0.0


# Texts longer than this are tokenized in a worker thread: a
# megabyte prompt takes ~100 ms to tokenize, and on the event loop that would stall every
# stream in flight. Shorter ones stay on the loop, where a thread hop would cost more than it saves.
OFFLOAD_CHARS = 16_384


@dataclass(slots=True)
class Prompt:
    ids: list[int]
    text: str | None = None  # as the client sent it, when it was text (echo returns it)


@dataclass(slots=True)
class Job:
    """One engine request: one prompt, `params.n` samples."""

    index: int  # prompt index within the HTTP request
    request_id: str
    prompt: Prompt
    params: SamplingParams
    decision: Decision
    drop_output: bool = False  # echo with max_tokens=0: one token is generated for the prompt logprobs, then dropped
    stream: RequestStream | None = None
    output: RequestOutput | None = None  # everything received so far
    pending: RequestOutput | None = None  # deltas held until the prompt logprobs arrive
    prompt_logprobs: list | None = None
    started: float = 0.0  # perf_counter at submission
    last_delta: float | None = None
    first_delta: float | None = None
    finished: bool = False
    recorded: bool = False

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.output.outputs) if self.output else 0


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_json(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass(slots=True)
class _Item:
    job: Job
    delta: RequestOutput | BaseException | None  # None: the stream ended
    at: float


@dataclass(slots=True)
class ServingOptions:
    request_timeout_s: float = 600.0
    trust_request_chat_template: bool = False
    chat_template_timeout_s: float = 5.0


class Serving:
    """What the routes share: the deployment (once loaded), the app's metrics, the options."""

    def __init__(self, metrics: Metrics, options: ServingOptions) -> None:
        self.metrics = metrics
        self.options = options
        self.deployment: Deployment | None = None
        self.load_error: BaseException | None = None
        self._ids = itertools.count()
        self._instance = uuid.uuid4().hex[:8]  # request ids stay unique across apps sharing an engine
        self._engine_totals: dict[tuple[str, ...], int] = {}  # engine counters at the last scrape
        self._runs: weakref.WeakSet[Run] = weakref.WeakSet()  # in flight, for a graceful shutdown
        self.stopping = False

    # ----- state ---------------------------------------------------------------------------
    def set_deployment(self, deployment: Deployment) -> None:
        self.deployment = deployment

    @property
    def ready(self) -> bool:
        return not self.stopping and self.deployment is not None and self.deployment.engine.alive

    def require(self) -> Deployment:
        if self.stopping:
            raise shutting_down()
        if self.deployment is None:
            if self.load_error is not None:
                raise ApiError(503, f"model loading failed: {self.load_error}", type="service_unavailable_error",
                               code="load_failed")
            raise not_ready()
        return self.deployment

    def begin_shutdown(self, grace_s: float) -> None:
        """The server stops (SIGTERM, Ctrl-C): refuse new requests; those in flight get `grace_s`
        seconds to finish, then end with a 503 their client can read (an SSE error event and
        [DONE], or a JSON error), inside uvicorn's graceful window instead of a connection cut
        mid-response. Runs on the event loop."""
        self.stopping = True
        runs = list(self._runs)
        if runs:
            log.info("shutting down: %d request(s) in flight get %g s to finish", len(runs), grace_s)
        at = asyncio.get_running_loop().time() + grace_s
        for run in runs:
            run.fail_at(at, shutting_down)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{self._instance}{next(self._ids):x}"

    # ----- tokenization --------------------------------------------------------------------
    def tokenizer(self, model: str | None):
        return self.require().tokenizer(model)

    def encode(self, model: str | None, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """`param` names the field the text came from, should it not be Unicode."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate escape ("\\ud800") is valid JSON
            raise InvalidRequestError(
                f"{param} is not valid Unicode: it has a lone surrogate (U+{ord(text[e.start]):04X}) at "
                f"character {e.start}", param=param) from None
        return self.tokenizer(model).encode(text, add_special_tokens=add_special_tokens)

    async def encode_async(self, model: str | None, text: str, add_special_tokens: bool = True,
                           param: str = "prompt") -> list[int]:
        """`encode`, off the event loop for long texts (the Rust tokenizer releases the GIL)."""
        if len(text) <= OFFLOAD_CHARS:
            return self.encode(model, text, add_special_tokens, param)
        return await asyncio.to_thread(self.encode, model, text, add_special_tokens, param)

    async def render_chat_async(self, model: str | None, messages: list[dict], add_generation_prompt: bool = True,
                                template_kwargs: dict | None = None) -> str:
        """`render_chat` in a worker thread, bounded by `chat_template_timeout_s`: a template is a
        program whose running time the text does not tell, and on the event loop it would stall
        every stream and /health."""
        tok = self.tokenizer(model)
        if not getattr(tok, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
        o = self.options
        return await asyncio.to_thread(render_chat, tok, messages, add_generation_prompt, template_kwargs,
                                       trust_template_kwarg=o.trust_request_chat_template,
                                       timeout_s=o.chat_template_timeout_s)

    def max_model_len(self, model: str | None) -> int:
        dep = self.require()
        if model and model != "auto":
            return dep.cores[dep.resolve(model)].max_model_len
        # `auto` may go to any tier: promise only what every tier accepts.
        return min(c.max_model_len for c in dep.cores.values())

    # ----- submission ----------------------------------------------------------------------
    async def submit(
        self, prompts: list[Prompt], params: SamplingParams, requested: str, hints: RoutingHints,
        request_id: str, deadline: float, drop_output: bool = False,
    ) -> "Run":
        """Route, validate and queue every prompt; nothing is queued unless all are valid."""
        dep = self.require()
        if not prompts:
            raise InvalidRequestError("prompt is empty", param="prompt")
        longest = max(c.max_model_len for c in dep.cores.values())
        for p in prompts:
            # Checked before routing so an oversized prompt never reaches a probe.
            if not p.ids:
                raise InvalidRequestError("prompt is empty", param="prompt")
            if len(p.ids) >= longest:
                raise InvalidRequestError(
                    f"prompt has {len(p.ids)} tokens but the longest context length served here is {longest} "
                    f"tokens (the prompt must leave room for at least one generated token)", param="prompt")
        jobs: list[Job] = []
        # The engine names the routing hint `strategy`; the client sent it as `sizewise.strategy`.
        with param_names(lambda name: "sizewise.strategy" if name == "strategy" else name):
            for i, p in enumerate(prompts):
                decision = await dep.route(p.ids, params, requested, hints)
                core = dep.cores[decision.model]
                core.validate(p.ids, params)
                if params.n > core.config.max_waiting:  # never admissible: a 429 would mean "retry forever"
                    raise InvalidRequestError(
                        f"n ({params.n}) is larger than {decision.model}'s waiting queue "
                        f"({core.config.max_waiting} sequences)", param="n")
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                jobs.append(Job(i, rid, p, copy.copy(params), decision, drop_output=drop_output))
            if self.stopping:  # the server began to stop while this request was routed
                raise shutting_down()
            run = Run(self, jobs, deadline)
            self._runs.add(run)
            await run.start()
        for job in jobs:
            d = job.decision
            self.metrics.route_decisions.labels(tier=d.tier, reason=d.reason).inc()
            if d.probe is not None and d.reason != "pinned":  # what routing `auto` cost, model probe or not
                self.metrics.probe.observe(_probe_ms(d.probe) / 1000.0)
            lam = (d.explain or {}).get("lambda_nats_per_gb")
            if lam is not None:
                self.metrics.route_lambda.set(lam)
        return run

    def record_error(self, status: int) -> None:
        self.metrics.errors.labels(status=str(status)).inc()

    # ----- gauges at scrape time -----------------------------------------------------------
    def refresh_gauges(self) -> None:
        """Gauges from the engines' live stats (and the orchestrator's telemetry, when it has one)."""
        dep = self.deployment
        if dep is None:
            return
        m = self.metrics
        telemetry = getattr(dep, "telemetry", None)
        snap = None
        if telemetry is not None:
            try:
                snap = telemetry.snapshot(device=True)
            except Exception:  # noqa: BLE001 - telemetry is a nicety; the scrape must still answer
                log.warning("telemetry snapshot failed", exc_info=True)
        for name, st in dep.engine.stats().items():
            labels = {"model": name, "tier": dep.model_to_tier.get(name, "")}
            m.running.labels(**labels).set(st.num_running)
            m.waiting.labels(**labels).set(st.num_waiting)
            m.kv_usage.labels(**labels).set(st.kv_usage)
            self._follow(m.preemptions.labels(**labels), ("preempt", name), st.num_preemptions)
            for strat, n in st.spec_draft_tokens.items():
                self._follow(m.spec_draft.labels(strategy=strat, **labels), ("draft", name, strat), n)
            for strat, n in st.spec_accepted_tokens.items():
                self._follow(m.spec_accepted.labels(strategy=strat, **labels), ("accepted", name, strat), n)
            eng = snap.engines.get(name) if snap is not None else None
            if eng is not None:
                m.bandwidth.labels(**labels).set(eng.achieved_bandwidth)
                if snap.peak_bandwidth:
                    m.bandwidth_util.labels(**labels).set(eng.bandwidth_utilization)
                    m.peak_bandwidth.set(snap.peak_bandwidth)
            elif st.last_step_seconds > 0:  # no telemetry: the last step alone
                m.bandwidth.labels(**labels).set(st.last_step_bytes / st.last_step_seconds)
        if snap is not None and snap.device_memory_used_bytes is not None:
            m.device_memory.set(snap.device_memory_used_bytes)
            return
        try:
            mem = next(iter(dep.cores.values())).platform.memory_info()
            m.device_memory.set(mem.total_bytes - mem.free_bytes)
        except Exception:  # noqa: BLE001 - a missing device counter must not break the scrape
            log.debug("device memory info unavailable", exc_info=True)

    def _follow(self, counter, key: tuple[str, ...], total: int) -> None:
        """Make `counter` follow a running total the engine keeps: add the growth since the last
        scrape (a total that went down means the engine restarted its count). The child is created
        even at 0, so the series exists (and rate() has a start) before the first event."""
        last = self._engine_totals.get(key, 0)
        grown = total - last if total >= last else total
        counter.inc(grown)
        self._engine_totals[key] = total


class Run:
    """The engine requests of one HTTP request."""

    def __init__(self, serving: Serving, jobs: list[Job], deadline: float) -> None:
        self.serving = serving
        self.jobs = jobs
        self.deadline = deadline  # loop.time() by which everything must have finished
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._open = 0
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._fail_time = float("inf")

    @property
    def decision(self) -> Decision:
        return self.jobs[0].decision

    def decision_json(self) -> dict:
        d = self.jobs[0].decision.to_json()
        if len(self.jobs) > 1:
            d["prompts"] = [j.decision.to_json() for j in self.jobs]
        return d

    @property
    def tiers(self) -> str:
        return ",".join(dict.fromkeys(j.decision.tier for j in self.jobs))

    def usage(self) -> Usage:
        u = Usage()
        for j in self.jobs:
            u.prompt_tokens += len(j.prompt.ids)
            u.completion_tokens += j.completion_tokens()
        return u

    async def start(self) -> None:
        engine = self.serving.deployment.engine
        for job in self.jobs:
            try:
                job.stream = await engine.add_request(
                    job.request_id, job.prompt.ids, job.params, core=job.decision.model, prompt=job.prompt.text,
                    strategy=job.decision.strategy)
            except BaseException:
                self.close(record=False)  # a 429 on the third prompt takes back the first two
                raise
            job.started = time.perf_counter()
            job.output = RequestOutput(job.request_id, job.prompt.text, job.prompt.ids, [])
            self._open += 1
            self._pumps.append(asyncio.ensure_future(self._pump(job)))
        # The deadline is a timer, not a check made while the consumer reads: a client that stops
        # reading blocks the writes, and with them the consumer, but not the abort at the deadline.
        self.fail_at(self.deadline, lambda: request_timeout(self.serving.options.request_timeout_s))

    def fail_at(self, when: float, error: Callable[[], ApiError]) -> None:
        """At loop time `when` (unless an earlier failure is already set), abort what is unfinished
        (its KV blocks are freed at the next engine step) and end the run with `error`: the
        consumer gets the deltas that arrived before it, then the error."""
        if self._closed or when >= self._fail_time:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._fail_time = when
        self._timer = asyncio.get_running_loop().call_at(when, self._fail, error)

    def _fail(self, error: Callable[[], ApiError]) -> None:
        self._timer = None
        if self._closed or not self._open:
            return
        for job in self.jobs:
            if job.stream is not None:
                job.stream.abort()  # no-op for a stream that already ended
        self._queue.put_nowait(_Item(self.jobs[0], error(), time.perf_counter()))

    async def _pump(self, job: Job) -> None:
        q = self._queue
        try:
            async for delta in job.stream:
                q.put_nowait(_Item(job, delta, time.perf_counter()))
            q.put_nowait(_Item(job, None, time.perf_counter()))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - an engine fault reaches the consumer as an error
            q.put_nowait(_Item(job, e, time.perf_counter()))

    async def events(self) -> AsyncIterator[tuple[Job, RequestOutput]]:
        """Deltas of every job as they arrive; raises on timeout, shutdown or an engine fault."""
        try:
            while self._open:
                item = await self._queue.get()
                if isinstance(item.delta, BaseException):
                    raise item.delta
                job = item.job
                if item.delta is None:  # ended without a finished delta: aborted under us
                    if not job.finished:
                        job.finished = True
                        self._open -= 1
                    continue
                out = self._receive(job, item.delta, item.at)
                if out is not None:
                    yield job, out
        finally:
            if self._open:
                self.close()

    async def collect(self) -> None:
        async for _ in self.events():
            pass

    def _receive(self, job: Job, delta: RequestOutput, at: float) -> RequestOutput | None:
        m = self.serving.metrics
        d = job.decision
        labels = {"model": d.model, "tier": d.tier}
        if job.drop_output:
            for o in delta.outputs:
                o.text, o.token_ids = "", []
                o.logprobs = [] if o.logprobs is not None else None
                o.cumulative_logprob = None
                if o.finish_reason is not None:
                    o.finish_reason, o.stop_reason = "length", None
        steps = max((len(o.token_ids) for o in delta.outputs), default=0)
        if steps:
            if job.last_delta is not None:
                # One observation per token; a speculative step delivering k tokens gives k equal gaps.
                gap = (at - job.last_delta) / steps
                for _ in range(steps):
                    m.itl.labels(**labels).observe(gap)
            else:
                job.first_delta = at
            job.last_delta = at
        job.output.merge(delta)
        if delta.prompt_logprobs is not None:
            job.prompt_logprobs = delta.prompt_logprobs
        if delta.finished:
            job.finished = True
            self._open -= 1
            self._record(job, delta.metrics)
        # Hold the first deltas back until the prompt logprobs are known (echo needs them first).
        if job.wants_prompt_logprobs and job.prompt_logprobs is None and not delta.finished:
            if job.pending is None:
                job.pending = RequestOutput(job.request_id, job.prompt.text, job.prompt.ids, [])
            job.pending.merge(delta)
            return None
        if job.pending is not None:
            job.pending.merge(delta)
            delta, job.pending = job.pending, None
            delta.prompt_logprobs = job.prompt_logprobs
        return delta

    def _record(self, job: Job, engine_times: dict | None) -> None:
        """Per finished (or aborted) job: requests by reason, tokens, latency histograms."""
        if job.recorded:
            return
        job.recorded = True
        m = self.serving.metrics
        d = job.decision
        labels = {"model": d.model, "tier": d.tier}
        by_index = {o.index: o for o in job.output.outputs} if job.output else {}
        for i in range(job.params.n):
            o = by_index.get(i)
            reason = o.finish_reason if o is not None and o.finish_reason else "abort"
            m.requests.labels(finished_reason=reason, **labels).inc()
        m.prompt_tokens.labels(**labels).inc(len(job.prompt.ids))
        m.generation_tokens.labels(**labels).inc(job.completion_tokens())
        t = engine_times or {}
        # The engine's clock starts when the routed request reaches it; the probe ran before that
        # and is part of what the client waited for.
        probe_s = _probe_ms(d.probe) / 1000.0
        arrival = t.get("arrival_time")
        if arrival is not None and t.get("first_scheduled_time") is not None:
            m.queue_time.labels(**labels).observe(max(0.0, t["first_scheduled_time"] - arrival))
        if arrival is not None and t.get("first_token_time") is not None:
            m.ttft.labels(**labels).observe(max(0.0, t["first_token_time"] - arrival) + probe_s)
        elif job.first_delta is not None:
            m.ttft.labels(**labels).observe(job.first_delta - job.started)
        if arrival is not None and t.get("finished_time") is not None:
            m.e2e.labels(**labels).observe(max(0.0, t["finished_time"] - arrival) + probe_s)
        else:
            m.e2e.labels(**labels).observe(time.perf_counter() - job.started)

    def close(self, record: bool = True) -> None:
        """Abort whatever has not finished (frees its KV blocks at the next engine step)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.serving._runs.discard(self)
        for job in self.jobs:
            if job.stream is not None and not job.finished:
                job.stream.abort()
                job.finished = True
                if record and job.output is not None:
                    self._record(job, None)
        self._open = 0
        for p in self._pumps:
            p.cancel()


async def wait_for_disconnect(receive) -> None:
    """Returns when the client has gone away (ASGI `http.disconnect`)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    pass


async def collect_unless_disconnected(run: Run, receive) -> None:
    """Collect a run, aborting it if the client disconnects first (non-streaming requests)."""
    work = asyncio.ensure_future(run.collect())
    watch = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            work.result()  # re-raises a timeout or an engine fault
            return
        raise ClientGone()
    finally:
        for t in (work, watch):
            if not t.done():
                t.cancel()
        run.close()


def finished_outputs(run: Run) -> list[tuple[Job, CompletionOutput]]:
    """Every sample of every prompt, prompt-major (OpenAI / vLLM choice order)."""
    res = []
    for job in run.jobs:
        by_index = {o.index: o for o in job.output.outputs}
        for i in range(job.params.n):
            res.append((job, by_index.get(i) or CompletionOutput(index=i, finish_reason="abort")))
    return res


@contextmanager
def param_names(rename: Callable[[str], str]):
    """Report an InvalidRequestError under the name the client used (e.g. `params.top_p`)."""
    try:
        yield
    except InvalidRequestError as e:
        if e.param is None or rename(e.param) == e.param:
            raise
        new = rename(e.param)
        msg = re.sub(rf"\b{re.escape(e.param)}\b", new, str(e))
        raise InvalidRequestError(msg, param=new) from None


def routing_hints(hints) -> RoutingHints:
    """The request's validated `sizewise` object (or None) -> RoutingHints."""
    if hints is None:
        return RoutingHints()
    return RoutingHints(strategy=hints.strategy, max_latency_ms=hints.max_latency_ms)
