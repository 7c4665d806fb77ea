"""One HTTP request in flight: a `Run` of one engine request (a `Job`) per prompt.

The engine's worker hands every delta of every job straight to the run's one queue (the
deployment's sink, on the event loop), timestamped as it arrives: several prompts are served
concurrently and the inter-token latencies come from those timestamps. The queue's bound is a
setting (unbounded by default); a client that falls that far behind has its run aborted. A
deadline, a shutdown or an overflow ends the run with an error after the deltas that came
before it. Closing a run aborts whatever is unfinished, which frees its KV blocks at the
engine's next step; every exit path (client disconnect, timeout, error, normal end) goes
through `close`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..orchestrator.types import Decision, Prompt, Submission
from ..outputs import CompletionOutput, RequestOutput
from ..recorder import Recorder
from ..sampling_params import SamplingParams
from .errors import ApiError


@dataclass(slots=True)
class Job:
    """One engine request: one prompt, `params.n` samples."""

    index: int  # prompt index within the HTTP request
    prompt: Prompt
    params: SamplingParams
    drop_output: bool = False  # echo with max_tokens=0: one token is generated for the prompt logprobs, then dropped
    sub: Submission | None = None  # once admitted
    output: RequestOutput | None = None  # everything received so far
    pending: RequestOutput | None = None  # deltas held until the prompt logprobs arrive
    prompt_logprobs: list | None = None
    started: float = 0.0  # perf_counter at submission
    last_delta: float | None = None
    first_delta: float | None = None
    finished: bool = False
    recorded: bool = False
    begun: bool = False  # its first delta arrived: the engine has started it
    queued_on: str | None = None  # the model whose queue counted it as waiting (a move does not change it)

    @property
    def decision(self) -> Decision:
        return self.sub.decision

    @property
    def request_id(self) -> str:
        return self.sub.request_id

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
    job: Job | None  # None: a wake-up, the run has ended with an error
    delta: RequestOutput | BaseException | None
    at: float


_WAKE = _Item(None, None, 0.0)


def slow_client(bound: int) -> ApiError:
    return ApiError(503, f"the client read the response more slowly than it was generated: more than {bound} "
                         "deltas waited to be sent, and the request was aborted", type="service_unavailable_error",
                    code="slow_client")


class Run:
    """The engine requests of one HTTP request."""

    def __init__(self, recorder: Recorder, jobs: list[Job], deadline: float, max_queued: int = 0,
                 on_close: Callable[["Run"], None] | None = None,
                 on_begin: Callable[[Job], None] | None = None) -> None:
        self.recorder = recorder
        self.jobs = jobs
        self.deadline = deadline  # loop.time() by which everything must have finished
        self.max_queued = max_queued
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(max_queued)
        self._on_close = on_close
        self._on_begin = on_begin
        self._start_timer: asyncio.TimerHandle | None = None
        self._open = 0
        self._closed = False
        self._error: ApiError | None = None  # the run ended: raised once the queue is drained
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

    # ----- delivery (the deployment's sink, on the event loop) ------------------------------
    def deliver(self, index: int, delta: RequestOutput | BaseException) -> None:
        if self._closed or self._error is not None:
            return
        job = self.jobs[index]
        if not job.begun:  # on arrival, not when the client reads it: a slow reader does not look queued
            job.begun = True
            if self._on_begin is not None:
                self._on_begin(job)
        try:
            self._queue.put_nowait(_Item(job, delta, time.perf_counter()))
        except asyncio.QueueFull:
            self._end(slow_client(self.max_queued))

    def admitted(self, subs: list[Submission], on_timeout: Callable[[], ApiError]) -> None:
        """Every job is queued on its engine: the clock starts, and the deadline is armed."""
        now = time.perf_counter()
        for job, sub in zip(self.jobs, subs):
            job.sub = sub
            job.started = now
            job.output = RequestOutput(sub.request_id, job.prompt.text, job.prompt.ids, [])
        self._open = len(self.jobs)
        if self._error is not None:  # failed (a shutdown's grace ran out) while it was being queued
            self._end(self._error)
        # The deadline is a timer, not a check made while the consumer reads: a client that stops
        # reading blocks the writes, and with them the consumer, but not the abort at the deadline.
        self.fail_at(self.deadline, on_timeout)

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

    def start_by(self, when: float, error: Callable[[], ApiError], scheduled: Callable[[str], bool]) -> None:
        """At loop time `when`, a run with a job the engine has not started yet ends with `error`
        (what is queued is aborted): a request that cannot start in time is refused, not left to
        time out. `scheduled(request_id)`: the engine has begun its prefill (a long prefill is
        service, not queueing)."""
        def check() -> None:
            self._start_timer = None
            if not self._closed and self._error is None and any(
                    j.sub is not None and not j.begun and not j.finished and not scheduled(j.sub.request_id)
                    for j in self.jobs):
                self._end(error())

        self._start_timer = asyncio.get_running_loop().call_at(when, check)

    def _fail(self, error: Callable[[], ApiError]) -> None:
        self._timer = None
        if self._closed:
            return
        if any(job.sub is None for job in self.jobs):  # still being queued: `admitted` ends it
            self._error = error()
        elif self._open:
            self._end(error())

    def _end(self, error: ApiError) -> None:
        self._error = error
        for job in self.jobs:
            if job.sub is not None and not job.finished:
                job.sub.abort()
        if self._queue.empty():  # a consumer waiting on an empty queue would never look again
            self._queue.put_nowait(_WAKE)

    # ----- consumption -----------------------------------------------------------------------
    async def events(self) -> AsyncIterator[tuple[Job, RequestOutput]]:
        """Deltas of every job as they arrive; raises on timeout, shutdown, overflow or an engine fault."""
        try:
            while self._open:
                if self._error is not None and self._queue.empty():
                    raise self._error
                item = await self._queue.get()
                if item.job is None:
                    continue
                if isinstance(item.delta, BaseException):
                    raise item.delta
                out = self._receive(item.job, item.delta, item.at)
                if out is not None:
                    yield item.job, out
        finally:
            if self._open:
                self.close()

    async def collect(self) -> None:
        async for _ in self.events():
            pass

    def _receive(self, job: Job, delta: RequestOutput, at: float) -> RequestOutput | None:
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
                self.recorder.tokens(job.decision, at - job.last_delta, steps)
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
        """Per finished (or aborted) job, once."""
        if job.recorded:
            return
        job.recorded = True
        by_index = {o.index: o for o in job.output.outputs}
        reasons = [(o.finish_reason if o is not None and o.finish_reason else "abort")
                   for o in (by_index.get(i) for i in range(job.params.n))]
        self.recorder.finished(
            job.decision, reasons, len(job.prompt.ids), job.completion_tokens(), engine_times,
            first_token_s=job.first_delta - job.started if job.first_delta is not None else None,
            elapsed_s=time.perf_counter() - job.started)

    def close(self, record: bool = True) -> None:
        """Abort whatever has not finished (frees its KV blocks at the next engine step)."""
        if self._closed:
            return
        self._closed = True
        for timer in (self._timer, self._start_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._start_timer = None
        if self._on_close is not None:
            self._on_close(self)
        for job in self.jobs:
            if job.sub is not None and not job.finished:
                job.sub.abort()
                job.finished = True
                if record:
                    self._record(job, None)
        self._open = 0


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
