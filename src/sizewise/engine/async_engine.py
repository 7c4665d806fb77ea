"""Async front of one or more EngineCores, for the server.

One worker thread owns every core it drives and steps them one at a time, one batched step each:
round robin (one step per busy core per turn; the default here) or fair (equal device-time shares;
`discipline`, which a deployment's adaptive router sets from its policy, `fair` by default). Why
one thread for all co-resident models: their steps would contend for the same memory bandwidth
anyway, sequential steps keep each step's time attributable (to the stepped model, and to a draft
model for the proposals it made inside the step: its engine counts them as its own work, and the
telemetry reads achieved bandwidth from both), and it never oversubscribes the host cores.
Requests and aborts reach the worker through a queue; outputs come back to the caller's event
loop with `call_soon_threadsafe`. Nothing here is process-global: two AsyncEngines coexist.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from ..clock import Clock
from ..errors import EngineDeadError, InvalidRequestError
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .core import EngineCore, EngineStats

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Add:
    core: str
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    stream: "RequestStream"
    admitted: asyncio.Future
    loop: asyncio.AbstractEventLoop
    strategy: str = "plain"
    movable: bool = False


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Stop:
    """One sample ended by a stop string the caller found (EngineCore.stop_sample)."""

    request_id: str
    index: int
    stop_reason: str


@dataclass(slots=True)
class _Move:
    """Move the movable requests still waiting (never prefilled) on one core to another."""

    src: str
    dst: str
    running: bool = False  # also requests already prefilled or decoding (continued on dst)


class RequestStream:
    """Deltas of one request, in order; iteration ends after the finished delta.

    With a `sink`, the worker hands each delta (or the exception that failed the request) straight
    to it on the caller's event loop instead, and the stream is only the request's abort handle:
    a caller serving several requests at once reads them from one queue of its own, with no
    task per request to move them across."""

    def __init__(self, engine: "AsyncEngine", request_id: str, core: str,
                 sink: Callable[[RequestOutput | BaseException], None] | None = None, direct: bool = False) -> None:
        self.engine = engine
        self.request_id = request_id
        self.core = core
        self.queue: asyncio.Queue[RequestOutput | BaseException] | None = None
        if sink is None:
            self.queue = asyncio.Queue()
            sink = self.queue.put_nowait
        self.sink = sink
        # The sink is called on the worker thread itself (it must be thread-safe and quick): the
        # engine-core process batches a step's deltas into one message without an event-loop hop.
        self.direct = direct and self.queue is None
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[RequestOutput]:
        if self.queue is None:
            raise TypeError("this request's deltas go to its sink; it cannot be iterated")
        try:
            while not self.finished:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if item.finished:
                    self.finished = True
                yield item
        finally:
            if not self.finished:  # consumer went away (disconnect, timeout): free the KV now
                self.abort()

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


@dataclass(slots=True)
class _Route:
    core: str
    loop: asyncio.AbstractEventLoop
    stream: RequestStream
    movable: bool = False


class FairShare:
    """Start-time fair queueing (SFQ) over device time: the busy core with the least virtual time
    (`used`: device seconds it has been charged) steps next, so every busy core gets an equal share
    of the device and a cheap model's requests advance as often as its own steps allow, not at the
    pace of the dearest model's steps.

    A core that becomes busy again starts at max(its own virtual time, the system's), as SFQ tags a
    flow's first packet after an idle spell: an idle spell banks no credit, and a spell of heavy
    work does not leave a debt either. The system's virtual time is the start tag of the core in
    service, and across an idle device the largest tag reached (the last finish tag)."""

    def __init__(self, names: list[str]) -> None:
        self.used = dict.fromkeys(names, 0.0)  # virtual time (device seconds charged) per core
        self.vtime = 0.0  # the system's virtual time
        self._busy: set[str] = set()

    def idle(self) -> None:
        if self._busy:  # everything was served: the system's clock stands at the last finish tag
            self.vtime = max(self.vtime, *(self.used[n] for n in self._busy))
        self._busy.clear()

    def wake(self, busy: list[str]) -> None:
        if self._busy:
            self.vtime = max(self.vtime, min(self.used[n] for n in self._busy))
        for n in busy:
            if n not in self._busy:
                self.used[n] = max(self.used[n], self.vtime)
        self._busy = set(busy)

    def pick(self, busy: list[str]) -> str:
        name = min(busy, key=lambda n: self.used[n])
        self.vtime = max(self.vtime, self.used[name])
        return name

    def charge(self, name: str, seconds: float) -> None:
        self.used[name] += seconds


class AsyncEngine:
    def __init__(self, cores: dict[str, EngineCore] | EngineCore, clock: Clock | None = None,
                 start: bool = True) -> None:
        """`clock`: what step times are read from (default: the first core's). `start=False`: no
        worker thread; whoever built it runs `_run` itself (the virtual device, `sizewise.sim`,
        drives it on virtual time)."""
        if isinstance(cores, EngineCore):
            cores = {cores.name: cores}
        self.cores = dict(cores)
        self.clock = clock or next(iter(self.cores.values())).clock
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._routes: dict[str, _Route] = {}
        self._stop = False
        self._dead: BaseException | None = None
        # Held while a request is queued and while the worker, on its way out, marks itself closed:
        # a request is either refused here or failed by the worker, never left waiting.
        self._closing = threading.Lock()
        self._closed = False
        self.priority_core: str | None = None  # stepped early when it has queued requests (the probe engine)
        # How busy cores share the device: "round_robin" (one step each per turn) or "fair" (equal
        # device-time shares). The orchestrator sets it from its policy, whose latency model predicts it.
        self.discipline = "round_robin"
        self.step_listeners: list = []  # callables(core_name, core, outputs, seconds): telemetry hooks
        # The cores a capacity plan keeps (None: no plan): other busy cores step only when these are
        # idle or once per `plan_starve_s` (see `_planned`), under either discipline. Set by the
        # orchestrator.
        self.plan_cores: frozenset[str] | None = None
        self.plan_starve_s = 0.5
        self._last_step: dict[str, float] = {}
        # callables(request_id, from_core, to_core), run on the request's event loop after a move
        self.move_listeners: list = []
        self.share: FairShare | None = None  # the fair discipline's accounts, while the worker runs
        self._thread = threading.Thread(target=self._run, name="sizewise-engine", daemon=True)
        if start:
            self._thread.start()

    # ----- caller side (event loop) --------------------------------------------------------
    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        core: str | None = None, prompt: str | None = None, strategy: str = "plain",
        sink: Callable[[RequestOutput | BaseException], None] | None = None, validated: bool = False,
        movable: bool = False, direct: bool = False,
    ) -> RequestStream:
        """Queue a request; raises InvalidRequestError / QueueFullError before anything streams.

        `strategy`: plain | pld | pld_adaptive | draft (see EngineCore.add_request). `sink`: see
        RequestStream. `validated`: the caller already ran the core's `validate` on these arguments
        (the orchestrator does, after routing); otherwise it runs here, on the caller's thread, so
        the error comes back before anything is queued. The worker never validates again.
        `movable`: `move_waiting` may move it to another core until it is first prefilled (the
        cores share one tokenizer; an orchestrator's `auto` requests). `direct`: `sink` runs on the
        worker thread (see RequestStream)."""
        self._check_running()
        name = core or next(iter(self.cores))
        if name not in self.cores:
            raise KeyError(name)
        if not validated:
            self.cores[name].validate(prompt_token_ids, params, strategy)
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id, name, sink, direct)
        admitted = loop.create_future()
        with self._closing:
            self._check_running()
            self._inbox.put(_Add(name, request_id, list(prompt_token_ids), params, prompt, stream, admitted, loop,
                                 strategy, movable))
        self._wake.set()
        try:
            await admitted  # re-raises the core's admission error
        except asyncio.CancelledError:
            # The caller is gone before it got a stream to abort: the worker may admit the request
            # anyway, so queue its abort (after the add: the inbox is FIFO) or it runs to the end.
            self.abort(request_id)
            raise
        return stream

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        core: str | None = None, prompt: str | None = None, strategy: str = "plain",
    ) -> AsyncIterator[RequestOutput]:
        stream = await self.add_request(request_id, prompt_token_ids, params, core, prompt, strategy)
        async for out in stream:
            yield out

    def _check_running(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine worker died: {self._dead!r}")
        if self._closed or self._stop:
            raise EngineDeadError("the engine was shut down")

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))
        self._wake.set()

    def stop_sample(self, request_id: str, index: int, stop_reason: str) -> None:
        """Finish sample `index` of a request on a stop string found outside the engine (the API
        process detokenizes when the engines run in their own process)."""
        self._inbox.put(_Stop(request_id, index, stop_reason))
        self._wake.set()

    def move_waiting(self, src: str, dst: str, running: bool = False) -> None:
        """Move every movable request still waiting on `src` (nothing of it computed or generated) to
        `dst`, in order; its stream carries on from `dst`, and `move_listeners` hear of it
        (request id, src, dst, tokens src wrote). `running`: also those already prefilled or
        decoding, where they can be continued (one sample, no logprobs, no stop strings): their
        tokens so far join the prompt on `dst`, which writes the rest."""
        if src not in self.cores or dst not in self.cores:
            raise KeyError(src if src not in self.cores else dst)
        self._inbox.put(_Move(src, dst, running))
        self._wake.set()

    def stats(self) -> dict[str, EngineStats]:
        return {name: core.stats() for name, core in self.cores.items()}

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.ident is not None:  # started (start=False: whoever runs `_run` stops it)
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    # ----- worker thread ------------------------------------------------------------------------
    def _deliver(self, route: _Route, item) -> None:
        if route.stream.direct:
            try:
                route.stream.sink(item)
            except Exception:  # noqa: BLE001 - a sink's fault must not stop the worker
                log.exception("direct sink of %s failed", route.stream.request_id)
            return
        try:
            route.loop.call_soon_threadsafe(route.stream.sink, item)
        except RuntimeError:  # the caller's event loop is closed: nobody reads this stream; free it
            self._inbox.put(_Abort(route.stream.request_id))

    def _queued(self) -> Iterator[_Add | _Abort | _Move | _Stop]:
        """The commands queued so far, oldest first, taken off the inbox (this thread is its one
        reader: once it is not empty a get succeeds; checked, not raised, as the worker drains it a
        few times per step)."""
        inbox = self._inbox
        while not inbox.empty():
            yield inbox.get_nowait()

    def _drain_inbox(self) -> None:
        for cmd in self._queued():
            if isinstance(cmd, _Add):
                try:
                    if cmd.request_id in self._routes:  # in flight on another core: streams would cross
                        raise InvalidRequestError(f"request id {cmd.request_id!r} is already in use",
                                                  param="request_id")
                    self.cores[cmd.core].add_request(
                        cmd.request_id, cmd.prompt_token_ids, cmd.params, cmd.prompt, strategy=cmd.strategy,
                        validated=True,
                    )
                except Exception as e:  # noqa: BLE001 - reported to the caller, engine carries on
                    cmd.loop.call_soon_threadsafe(_set_exc, cmd.admitted, e)
                    continue
                self._routes[cmd.request_id] = _Route(cmd.core, cmd.loop, cmd.stream, cmd.movable)
                cmd.loop.call_soon_threadsafe(_set_result, cmd.admitted, None)
            elif isinstance(cmd, _Move):
                self._move(cmd.src, cmd.dst, cmd.running)
            elif isinstance(cmd, _Stop):
                route = self._routes.get(cmd.request_id)
                if route is not None:
                    out = self.cores[route.core].stop_sample(cmd.request_id, cmd.index, cmd.stop_reason)
                    if out is not None:
                        del self._routes[cmd.request_id]
                        self._deliver(route, out)
            else:
                route = self._routes.pop(cmd.request_id, None)
                if route is not None:
                    self.cores[route.core].abort_request(cmd.request_id)

    def _move(self, src: str, dst: str, running: bool = False) -> None:
        a, b = self.cores[src], self.cores[dst]
        for rid, route in list(self._routes.items()):
            if route.core != src or not route.movable:
                continue
            req = a.requests.get(rid)
            if req is None:
                continue
            prompt, params, written, text = req.prompt_token_ids, req.params, 0, req.prompt
            if any(seq.num_cached_tokens or seq.num_output_tokens or seq not in a.scheduler.waiting for seq in req.seqs):
                seq = req.seqs[0]
                if not (running and _continuable(req)):
                    continue  # prefilled (or being prefilled): it stays
                # Continued on dst: what src wrote joins the prompt there (the same tokenizer across
                # the family); dst writes the rest of max_tokens.
                written = seq.num_output_tokens
                prompt = prompt + seq.token_ids[seq.num_prompt_tokens:]
                params = dataclasses.replace(
                    params, min_tokens=max(0, params.min_tokens - written),
                    max_tokens=None if params.max_tokens is None else params.max_tokens - written)
                text = None
            strategy = req.strategy
            try:
                b.validate(prompt, params, strategy)
            except Exception:  # noqa: BLE001 - e.g. no speculation there: plain decoding gives the same tokens
                strategy = "plain"
                try:
                    b.validate(prompt, params, strategy)
                except Exception:  # noqa: BLE001 - it cannot run there: it stays
                    continue
            if len(b.scheduler.waiting) + params.n > b.config.max_waiting:
                continue
            # Admitted there first, then freed here: a refusal leaves it where it was, never lost.
            try:
                b.add_request(rid, prompt, params, text, arrival_time=req.metrics.arrival_time,
                              strategy=strategy, validated=True)
            except Exception:  # noqa: BLE001 - it stays on src
                log.warning("moving %s from %s to %s failed; it stays on %s", rid, src, dst, src, exc_info=True)
                continue
            if written:  # the request's own times, not the continuation's
                m, old = b.requests[rid].metrics, req.metrics
                m.first_scheduled_time, m.first_token_time = old.first_scheduled_time, old.first_token_time
            a.abort_request(rid)
            route.core = dst
            for listener in self.move_listeners:
                try:
                    route.loop.call_soon_threadsafe(listener, rid, src, dst, written)
                except RuntimeError:
                    pass

    def _run(self) -> None:
        names = list(self.cores)
        turn = 0
        share = self.share = FairShare(names)
        try:
            while not self._stop:
                self._drain_inbox()
                busy = [n for n in names if self.cores[n].has_unfinished_requests()]
                if not busy:
                    share.idle()
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                if self.discipline == "fair":
                    share.wake(busy)
                    self._step_priority(None, share)
                    name = share.pick(self._planned(busy))
                    self._drain_inbox()
                    self._step_charged(name, share)
                    continue
                # Round-robin: each busy core gets one step per turn. A `priority_core` with
                # newly queued requests (the orchestrator's probe engine) also gets a step after
                # every other core's, so a probe waits at most one step, not a whole turn.
                busy = self._planned(busy)
                for name in busy[turn % len(busy):] + busy[: turn % len(busy)]:
                    self._drain_inbox()
                    self._step_core(name)
                    self._step_priority(name, share)
                turn += 1
        except BaseException as e:  # noqa: BLE001
            self._dead = e
            log.exception("engine worker died")
            raise
        finally:
            self._fail_pending(EngineDeadError(f"engine worker died: {self._dead!r}" if self._dead is not None
                                               else "the engine was shut down"))

    def _planned(self, busy: list[str]) -> list[str]:
        """The busy cores the turn may pick from: with `plan_cores` set, those the plan keeps, plus any
        other busy core (one the plan left, still finishing its running requests) that has not stepped
        for `plan_starve_s`. Each extra core in a turn costs every request its step, and on a CPU the
        eviction of the kept cores' weights from the caches: the few requests left on a dropped tier
        wait, rather than every request of the plan."""
        plan = self.plan_cores
        if plan is None:
            return busy
        kept = [n for n in busy if n in plan]
        if not kept or len(kept) == len(busy):
            return busy
        now = self.clock.now()
        # Waiting is counted from a core's last step, or, for one that never stepped, from when it
        # was first left out (not since the epoch).
        return kept + [n for n in busy if n not in plan and now - self._last_step.setdefault(n, now) >= self.plan_starve_s]

    def _step_priority(self, just_stepped: str | None, share: "FairShare") -> None:
        """Step the priority core now if requests wait on it (its probes are in the very next step)."""
        self._drain_inbox()  # first: a probe that arrived during the last step counts
        prio = self.priority_core
        if prio is not None and prio != just_stepped and self.cores[prio].scheduler.waiting:
            self._step_charged(prio, share)

    def _step_charged(self, name: str, share: FairShare) -> None:
        """One step of `name`, charged to the flows whose device time it spent: the draft model's
        proposals (made inside the target's step) to the draft model's core, the rest to `name`."""
        draft = self.cores[name].draft
        drafted = draft.work_totals()[0] if draft is not None else 0.0
        seconds = self._step_core(name)
        if draft is not None and draft.name in share.used:
            drafted = draft.work_totals()[0] - drafted
            share.charge(draft.name, drafted)
            seconds -= drafted
        share.charge(name, seconds)

    def _fail_pending(self, exc: EngineDeadError) -> None:
        """The worker is leaving (shut down or dead): no stream it owns may wait for ever. Requests
        still queued are refused, those in flight end with `exc`."""
        with self._closing:
            self._closed = True
        for cmd in self._queued():
            if isinstance(cmd, _Add):
                try:
                    cmd.loop.call_soon_threadsafe(_set_exc, cmd.admitted, exc)
                except RuntimeError:  # that event loop is closed: nobody waits
                    pass
        for route in self._routes.values():
            self._deliver(route, exc)
        self._routes.clear()

    def _step_core(self, name: str) -> float:
        """One step of `name`; returns its wall seconds."""
        core = self.cores[name]
        t0 = self.clock.now()
        self._last_step[name] = t0
        try:
            outs = core.step()
        except Exception as e:  # noqa: BLE001 - fail this core's requests, keep serving
            log.exception("step of %s failed; failing its in-flight requests", name)
            self._fail_core(name, e)
            return self.clock.now() - t0
        dt = self.clock.now() - t0
        for out in outs:
            route = self._routes.get(out.request_id)
            if route is None:
                continue
            if out.finished:
                del self._routes[out.request_id]
            self._deliver(route, out)
        for listener in self.step_listeners:
            try:
                listener(name, core, outs, dt)
            except Exception:  # noqa: BLE001 - telemetry must never stop serving
                log.exception("step listener failed")
        return dt

    def _fail_core(self, name: str, exc: Exception) -> None:
        core = self.cores[name]
        for rid, route in list(self._routes.items()):
            if route.core == name:
                core.abort_request(rid)
                del self._routes[rid]
                self._deliver(route, RuntimeError(f"internal error while serving the request: {exc}"))


def _continuable(req) -> bool:
    """Whether a started request can go on from its tokens so far on another engine, with the
    same output as one stream: one sample, everything it wrote delivered, and nothing that
    depends on the engine that wrote it (logprobs; stop strings, which a continuation would miss
    across the seam)."""
    p = req.params
    seq = req.seqs[0]
    return (len(req.seqs) == 1 and not seq.is_finished and seq.emitted_tokens == seq.num_output_tokens
            and p.logprobs is None and p.prompt_logprobs is None and not p.stop
            and (p.max_tokens is None or p.max_tokens > seq.num_output_tokens))


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exc(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
