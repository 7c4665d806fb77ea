"""From HTTP requests to the deployment and back: tokenization, submission, what the routes share.

The server talks to the orchestrator's `Deployment` only (submit, describe, stats, tokenizer);
a submitted request is a `Run` (run.py), and what happens to it is recorded by the `Recorder`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import uuid
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

from ..chat import render_chat
from ..errors import InvalidRequestError
from ..metrics import Metrics
from ..orchestrator.deployment import Deployment
from ..orchestrator.types import Prompt, RoutingHints
from ..recorder import Recorder
from ..sampling_params import SamplingParams
from .errors import ApiError, not_ready, overloaded, queue_timeout, request_timeout, shutting_down
from .run import Job, Run

log = logging.getLogger(__name__)

# Texts longer than this are tokenized in a worker thread: a
# megabyte prompt takes ~100 ms to tokenize, and on the event loop that would stall every
# stream in flight. Shorter ones stay on the loop, where a thread hop would cost more than it saves.
OFFLOAD_CHARS = 16_384


def chars_per_token(tok) -> int:
    """The most characters one token of `tok` can stand for: its vocabulary's longest entry.

    Why this bounds the text a token covers: a vocabulary entry is the token's text in the
    tokenizer's own alphabet, never shorter than what it decodes to: byte-level BPE writes one
    character per byte (a decoded character is 1-4 bytes), SentencePiece writes a space as one
    `▁`, WordPiece adds `##`, byte fallback writes `<0x41>` for one byte, and added (special)
    tokens are listed as they are written. So a text of C characters needs at least C / L tokens,
    L = this length (45 for the demo family's byte-level BPE, ~16 for typical 32K-150K BPE
    vocabularies, whose longest entries are runs of spaces or `=`). A normalizer that deletes
    characters (none of the supported families has one) would void the argument; a vocabulary
    without a usable entry gets a generous 64."""
    try:
        vocab = tok.get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without a listable vocabulary: the fallback
        vocab = {}
    return max((len(t) for t in vocab if isinstance(t, str)), default=0) or 64


def text_chars(value) -> int:
    """Characters of every string in a JSON-like value (a chat message's fields)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(text_chars(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(text_chars(v) for v in value)
    return 0


@dataclass(slots=True)
class ServingOptions:
    request_timeout_s: float = 600.0
    trust_request_chat_template: bool = False
    chat_template_timeout_s: float = 5.0
    # Deltas one request may have waiting for its client (0: unbounded); a client that falls
    # further behind has its request aborted with a 503 (code slow_client).
    max_queued_deltas: int = 0
    # A request that cannot start within this many seconds (or its own sizewise.max_latency_ms, if
    # shorter) is refused with a 503 and Retry-After (0: no server-wide limit).
    max_queue_delay_s: float = 0.0
    # Where the engine series (KV use, running/waiting, device seconds) are set: "scrape" (read from
    # the deployment at each scrape), "pushed" (set by whoever feeds the recorder the core's stats as
    # they arrive: API process 0 of `serve --api-server-count N`), "none" (the other API processes).
    engine_series: str = "scrape"


class Serving:
    """What the routes share: the deployment (once loaded), the app's metrics, the options."""

    def __init__(self, metrics: Metrics, options: ServingOptions) -> None:
        self.metrics = metrics
        self.recorder = Recorder(metrics)
        self.options = options
        self.deployment: Deployment | None = None
        self.load_error: BaseException | None = None
        self._ids = itertools.count()
        self._instance = uuid.uuid4().hex[:8]  # request ids stay unique across apps sharing an engine
        self._runs: weakref.WeakSet[Run] = weakref.WeakSet()  # in flight, for a graceful shutdown
        self.stopping = False
        self._char_limit: tuple[int, int, int] | None = None  # (limit, context tokens, chars per token)
        # Jobs queued on each model that the engine has not started yet: request id -> loop time of
        # submission, oldest first (the head of that model's FIFO queue).
        self._unstarted: dict[str, dict[str, float]] = {}

    # ----- state ---------------------------------------------------------------------------
    def set_deployment(self, deployment: Deployment) -> None:
        self.recorder.models(deployment.describe())
        self.deployment = deployment
        self._char_limit = None

    @property
    def ready(self) -> bool:
        return not self.stopping and self.deployment is not None and self.deployment.alive

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

    def char_limit(self) -> tuple[int, int, int]:
        """(the most characters a prompt can have, the longest context served here in tokens, the
        tokenizer's most characters per token): a longer text cannot fit in any context, and is
        refused before it is tokenized (a 50 MB prompt took 90 s and 7 GB to tokenize)."""
        if self._char_limit is None:
            dep = self.require()
            context = max(m.max_model_len for m in dep.describe())
            per_token = chars_per_token(dep.tokenizer(None))  # one tokenizer for the whole family
            self._char_limit = (context * per_token, context, per_token)
        return self._char_limit

    def check_chars(self, chars: int, param: str = "prompt", what: str = "text") -> None:
        """Refuse `chars` characters of prompt text that cannot fit in the longest context (400)."""
        limit, context, per_token = self.char_limit()
        if chars > limit:
            raise InvalidRequestError(
                f"{param}: {what} has {chars} characters, more than the limit of {limit} characters (the longest "
                f"context served here, {context} tokens, times at most {per_token} characters per token of this "
                f"tokenizer): it cannot fit in the context", param=param)

    def encode(self, model: str | None, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """`param` names the field the text came from (in the errors: too long, not Unicode)."""
        self.check_chars(len(text), param)
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
        self.check_chars(len(text), param)  # before a thread is taken for it
        return await asyncio.to_thread(self.encode, model, text, add_special_tokens, param)

    async def render_chat_async(self, model: str | None, messages: list[dict], add_generation_prompt: bool = True,
                                template_kwargs: dict | None = None) -> str:
        """`render_chat` in a worker thread, bounded by `chat_template_timeout_s`: a template is a
        program whose running time the text does not tell, and on the event loop it would stall
        every stream and /health."""
        tok = self.tokenizer(model)
        # Templates write every message's fields into the prompt: text too long to fit is refused
        # before it is rendered (and the rendered prompt is checked again before it is tokenized).
        self.check_chars(text_chars(messages), "messages", "the messages' text")
        if not getattr(tok, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
        o = self.options
        return await asyncio.to_thread(render_chat, tok, messages, add_generation_prompt, template_kwargs,
                                       trust_template_kwarg=o.trust_request_chat_template,
                                       timeout_s=o.chat_template_timeout_s)

    def max_model_len(self, model: str | None) -> int:
        return self.require().max_model_len(model)

    # ----- submission ----------------------------------------------------------------------
    async def submit(
        self, prompts: list[Prompt], params: SamplingParams, requested: str, hints: RoutingHints,
        request_id: str, deadline: float, drop_output: bool = False,
    ) -> Run:
        """Route, validate and queue every prompt; nothing is queued unless all are valid."""
        dep = self.require()
        jobs = [Job(i, p, params, drop_output=drop_output) for i, p in enumerate(prompts)]
        run = Run(self.recorder, jobs, deadline, self.options.max_queued_deltas, on_close=self._closed,
                  on_begin=self._begun)
        def still_serving() -> None:  # the server may have begun to stop while this request was routed
            if self.stopping:
                raise shutting_down()

        self._runs.add(run)  # from here a shutdown gives it the grace period
        try:
            # The engine names the routing hint `strategy`; the client sent it as `sizewise.strategy`.
            with param_names(lambda name: "sizewise.strategy" if name == "strategy" else name):
                subs = await dep.submit(request_id, prompts, params, requested, hints, sink=run.deliver,
                                        before_queue=still_serving)
        except BaseException:
            self._runs.discard(run)
            raise
        limit = self._start_limit(hints)
        if limit is not None:
            limit_s, name = limit
            now = asyncio.get_running_loop().time()
            waited = max(self.queue_delay(sub.decision.model, now) for sub in subs)
            if waited > limit_s:  # the queue ahead has waited longer than this request may: refuse it now
                for sub in subs:
                    sub.abort()
                self._runs.discard(run)
                raise overloaded(waited, limit_s, name)
            for job, sub in zip(jobs, subs):
                if not job.begun:  # (a multi-prompt request's first prompts may have started already)
                    job.queued_on = sub.decision.model  # a move rewrites the decision, not this key
                    self._unstarted.setdefault(job.queued_on, {})[sub.request_id] = now
        run.admitted(subs, lambda: request_timeout(self.options.request_timeout_s))
        if limit is not None:
            run.start_by(now + limit_s, lambda: queue_timeout(limit_s, name), dep.has_started)
        for sub in subs:
            self.recorder.routed(sub.decision)
        return run

    # ----- the overload floor ----------------------------------------------------------------
    def _start_limit(self, hints: RoutingHints) -> tuple[float, str] | None:
        """(seconds within which the request must start, the setting that says so), or None."""
        limits = []
        if self.options.max_queue_delay_s > 0:
            limits.append((self.options.max_queue_delay_s, "the server's max_queue_delay"))
        if hints.max_latency_ms is not None:
            limits.append((hints.max_latency_ms / 1000, "sizewise.max_latency_ms"))
        return min(limits) if limits else None

    def queue_delay(self, model: str, now: float) -> float:
        """How long the oldest request queued on `model` and not started yet has waited: in a FIFO
        queue, about what a request joining it now will wait (CoDel's sojourn time). Counts only
        requests admitted with a start limit (all, when the server has one)."""
        waiting = self._unstarted.get(model)
        if not waiting:
            return 0.0
        dep = self.deployment
        # Requests whose prefill began are served, not queued (their first token may be far off).
        for rid in [r for r in waiting if dep is not None and dep.has_started(r)]:
            del waiting[rid]
        return now - next(iter(waiting.values())) if waiting else 0.0

    def _begun(self, job: Job) -> None:
        if job.sub is None or job.queued_on is None:  # never counted as waiting
            return
        waiting = self._unstarted.get(job.queued_on)
        if waiting is not None:
            waiting.pop(job.request_id, None)

    def _closed(self, run: Run) -> None:
        self._runs.discard(run)
        for job in run.jobs:
            self._begun(job)

    def record_error(self, status: int) -> None:
        self.recorder.error(status)

    async def refresh_stats(self) -> None:
        """Before a scrape: a deployment in another process (the engine core's) computes its stats
        snapshot only when asked."""
        refresh = getattr(self.deployment, "refresh_stats", None)
        if refresh is not None:
            await refresh()

    def scrape(self) -> bytes:
        """The metrics, with the gauges read from the deployment now."""
        if self.deployment is not None:
            stats = self.deployment.stats()
            if self.options.engine_series == "scrape":
                self.recorder.scrape(stats)
            else:
                self.metrics.set_load(stats)  # (vLLM's load names: rendered by the scraped process itself)
        return self.metrics.render()


def serving_of(request) -> Serving:
    """The Serving of the app a route's request came to."""
    return request.app.state.sizewise.serving


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
