"""`RemoteDeployment`: the API process's side of a deployment whose engines run in the engine-core
process (core_process.py; docs/engine-core.md).

It has `Deployment`'s serving interface (`submit` with a sink, `describe`, `stats`, `tokenizer`,
`max_model_len`, `alive`, `has_started`, `shutdown`), so the server's `Serving`, `Run` and routes
are the same for both. What the API can check with what it holds (an empty or oversized prompt,
an unknown model) it refuses itself, with the in-process words; the rest (routing, the engine's
validation, a full queue) the core answers with `Refused`, raised here as the same exception.

One reader on the event loop drains the core's socket: one wake-up per engine step, however many
requests it carries, fanned out to the runs' sinks. The core process's exit is seen at once
through a pidfd on the same loop: every request in flight fails with EngineDeadError (a 503
`engine_dead`), `alive` turns false (/health 503) and `on_dead` callbacks run (the CLI exits 1).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from ..clock import WALL
from ..engine.detokenizer import Detokenizer, TextState
from ..errors import EngineDeadError, InvalidRequestError, QueueFullError, UnknownModelError
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from . import ipc
from .core_process import socket_path
from .deployment import DeploymentConfig, Sink, check_prompts, prompt_request_ids
from .types import Decision, DeploymentStats, ModelInfo, ModelStats, Prompt, RoutingHints, Submission

log = logging.getLogger(__name__)
STATS_TIMEOUT_S = 1.0  # how long a scrape waits for the core's snapshot before it shows the last one


@dataclass(slots=True)
class _Route:
    sink: Sink
    index: int
    request_id: str
    prompt: Prompt
    params: SamplingParams
    decision: Decision | None = None
    moved: Decision | None = None  # a move that arrived before the admission
    begun: bool = False  # a row has arrived, or the core said its prefill began
    texts: dict[int, TextState] = field(default_factory=dict)  # per sample index, made at its first token


class _Handle:
    """A submission's abort handle."""

    __slots__ = ("remote", "handle", "request_id")

    def __init__(self, remote: "RemoteDeployment", handle: int, request_id: str) -> None:
        self.remote = remote
        self.handle = handle
        self.request_id = request_id

    def abort(self) -> None:
        self.remote._abort(self.handle, self.request_id)

    def __aiter__(self):
        raise TypeError("an engine-process submission's deltas go to its sink; it cannot be iterated")


class RemoteDeployment:
    """Starts the engine-core process (`start`, from the main thread: the core's parent-death
    signal follows the thread that spawned it), waits for it (`wait_ready`, blocking), then serves
    on an event loop (`attach`)."""

    def __init__(self, config: DeploymentConfig, log_level: str = "info",
                 on_dead: Callable[[EngineDeadError], None] | None = None) -> None:
        self.config = config
        self.log_level = log_level
        self.on_dead: list[Callable[[EngineDeadError], None]] = [on_dead] if on_dead is not None else []
        self.on_stats: list[Callable[[DeploymentStats], None]] = []  # called with each snapshot the core sends
        self.proc: subprocess.Popen | None = None
        self.index = 0  # this API process's index among the core's (its reply socket)
        self._core_pid: int | None = None  # the core's pid when another process owns it (`connect`)
        self._dir: str | None = None
        self._ctx: zmq.Context | None = None
        self._in: zmq.Socket | None = None
        self._out: zmq.Socket | None = None
        self._enc = ipc.encoder()
        self._dec = ipc.decoder(ipc.ToApi)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pidfd: int | None = None
        self._models: list[ModelInfo] = []
        self.tier_to_model: dict[str, str] = {}
        self._stats: DeploymentStats | None = None
        self._stats_asked: dict[int, asyncio.Future] = {}  # StatsRequest id -> its scrape, waiting
        self._stats_ids = itertools.count()
        self._tokenizer = None
        self._detokenizer: Detokenizer | None = None
        self._handles = itertools.count()
        self._submits = itertools.count()
        self._routes: dict[int, _Route] = {}
        self._by_id: dict[str, _Route] = {}
        # submissions the core has not answered: id -> (future, handles, request ids); the future is
        # None once its submitter went away (an admission is then aborted at once)
        self._pending: dict[int, tuple[asyncio.Future | None, list[int], list[str]]] = {}
        self._dead: EngineDeadError | None = None
        self._closing = False
        self._closed = False
        self._waiting = False  # wait_ready polls the socket (the loader's thread)
        self._shutdown_lock = threading.Lock()

    # ----- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "RemoteDeployment":
        """Create the private socket directory, bind this process's socket, spawn the core."""
        self._dir = tempfile.mkdtemp(prefix="sizewise-core-")  # mode 0700: only this user connects
        # (without the API keys: the core serves no HTTP)
        (Path(self._dir) / "config.json").write_text(self.config.model_dump_json(exclude={"server": {"api_keys"}}))
        self._open_sockets(self._dir, 0)
        cmd = [sys.executable, "-m", "sizewise.orchestrator.core_process", "--ipc-dir", self._dir,
               "--parent", str(os.getpid()), "--log-level", self.log_level]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self._core_pid = self.proc.pid
        log.info("engine-core process started (pid %d)", self.proc.pid)
        return self

    def connect(self, ipc_dir: str, index: int, core_pid: int) -> "RemoteDeployment":
        """Serve as API process `index` of a core another process started (`serve --api-server-count`):
        bind this process's reply socket in its directory; the core and the directory stay theirs."""
        self._core_pid = core_pid
        self._open_sockets(ipc_dir, index)
        return self

    def _open_sockets(self, ipc_dir: str, index: int) -> None:
        """Bind this API process's reply socket (`api-{index}`) and connect to the core's."""
        self.index = index
        self._ctx = zmq.Context()
        self._in = self._ctx.socket(zmq.PULL)
        self._in.setsockopt(zmq.RCVHWM, 0)
        self._in.bind(socket_path(ipc_dir, f"api-{index}"))
        self._out = self._ctx.socket(zmq.PUSH)
        self._out.setsockopt(zmq.SNDHWM, 0)
        self._out.setsockopt(zmq.LINGER, 1000)
        self._out.connect(socket_path(ipc_dir, "core"))

    def _core_alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            os.kill(self._core_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the core has loaded the models; raises ValueError with the core's words if
        loading failed, RuntimeError if the process died."""
        deadline = None if timeout_s is None else WALL.now() + timeout_s
        self._waiting = True
        try:
            self._wait_ready(deadline, timeout_s)
        finally:
            self._waiting = False

    def _wait_ready(self, deadline: float | None, timeout_s: float | None) -> None:
        while True:
            if self._closing:
                raise RuntimeError("the server was stopped while the engine core loaded the models")
            if self._in.poll(200):
                msg = self._dec.decode(self._in.recv())
                if isinstance(msg, ipc.Ready):
                    self._models = msg.models
                    self.tier_to_model = msg.tier_to_model
                    self._stats = _idle_stats(msg.models)
                    self._tokenizer = _load_tokenizer(msg.models[0].path)
                    self._detokenizer = Detokenizer(self._tokenizer)
                    return
                if isinstance(msg, ipc.Dead):
                    raise ValueError(msg.error)
                continue
            if self._closing:
                raise RuntimeError("the server was stopped while the engine core loaded the models")
            if not self._core_alive():
                rc = self.proc.returncode if self.proc is not None else "?"
                raise RuntimeError(f"the engine-core process exited with status {rc} while loading the models")
            if deadline is not None and WALL.now() > deadline:
                raise TimeoutError(f"the engine core was not ready within {timeout_s} s")

    async def attach(self) -> None:
        """Serve on the running loop: the core's socket and its exit are watched there."""
        loop = self._loop = asyncio.get_running_loop()
        loop.add_reader(self._in.getsockopt(zmq.FD), self._readable)
        self._pidfd = os.pidfd_open(self._core_pid)
        loop.add_reader(self._pidfd, self._core_exited)
        self._readable()  # what arrived before the reader (the FD is edge-triggered)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Ask the core to stop, wait for it (bounded; then kill it), release everything. Idempotent."""
        with self._shutdown_lock:
            self._shutdown(timeout_s)

    def _shutdown(self, timeout_s: float) -> None:
        if self._closed:
            return
        self._closing = True
        if self._waiting:
            # A stop while loading, from another thread than the one polling the socket (ZMQ sockets
            # are not thread-safe): the core reads no Shutdown before it has loaded, so kill it, and
            # close nothing until wait_ready has seen `_closing` and let go of the socket.
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
            let_go = threading.Event()
            for _ in range(50):
                if not self._waiting:
                    break
                let_go.wait(0.05)
        self._detach()
        proc = self.proc
        if proc is not None and proc.poll() is None:  # (a core this process started: it stops it)
            try:
                self._out.send(self._enc.encode(ipc.Shutdown()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.error("the engine-core process did not stop within %g s: killing it", timeout_s)
                proc.kill()
                proc.wait()
        self._closed = True
        for s in (self._in, self._out):
            if s is not None:
                s.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _detach(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self._in.getsockopt(zmq.FD))
                if self._pidfd is not None:
                    self._loop.remove_reader(self._pidfd)
            except (RuntimeError, zmq.ZMQError):
                pass
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _core_exited(self) -> None:
        rc = self.proc.wait() if self.proc is not None else None
        self._readable()  # its last rows and its `Dead` (the cause) may still be queued
        self._detach()
        if self._closing:
            return
        how = "not this process's child" if rc is None else f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        self._died(EngineDeadError(f"the engine-core process exited ({how})"))

    def _died(self, exc: EngineDeadError) -> None:
        if self._dead is not None:
            return
        self._dead = exc
        log.error("%s: failing %d request(s) in flight", exc, len(self._routes) + len(self._pending))
        self._fail_all(exc)
        for cb in self.on_dead:
            try:
                cb(exc)
            except Exception:  # noqa: BLE001
                log.exception("on_dead callback failed")

    def _fail_all(self, exc: EngineDeadError) -> None:
        for fut, _, _ in self._pending.values():
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        for fut in self._stats_asked.values():  # a scrape waiting on the core: the last snapshot
            if not fut.done():
                fut.set_result(None)
        routes = list(self._routes.values())
        self._routes.clear()
        self._by_id.clear()
        for r in routes:
            r.sink(r.index, exc)

    @property
    def alive(self) -> bool:
        return self._dead is None and not self._closed and self._core_pid is not None and self._core_alive()

    # ----- what the server reads -------------------------------------------------------------------
    def describe(self) -> list[ModelInfo]:
        return list(self._models)

    def stats(self, device: bool = True) -> DeploymentStats:
        """The core's latest snapshot (`refresh_stats`; with several API processes also pushed every
        core_process.STATS_EVERY_S)."""
        return self._stats or DeploymentStats(models={})

    async def refresh_stats(self, timeout_s: float = STATS_TIMEOUT_S) -> None:
        """Ask the core for a snapshot and wait for it (a scrape): the core computes one only when
        asked, not on a timer that would hold its GIL between steps. A core that does not answer in
        `timeout_s` (dead, or stuck) leaves the last snapshot in place."""
        if self._out is None or self._closing or not self.alive:
            return
        request = next(self._stats_ids)
        fut = asyncio.get_running_loop().create_future()
        self._stats_asked[request] = fut
        try:
            self._out.send(self._enc.encode(ipc.StatsRequest(self.index, request)))
            await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            log.warning("the engine core sent no stats in %.1f s: /metrics shows the last snapshot", timeout_s)
        except zmq.ZMQError as e:
            log.warning("cannot ask the engine core for stats (%s): /metrics shows the last snapshot", e)
        finally:
            self._stats_asked.pop(request, None)

    @property
    def cores(self) -> dict[str, ModelInfo]:
        return {m.name: m for m in self._models}

    def resolve(self, requested: str) -> str:
        names = [m.name for m in self._models]
        if requested in names:
            return requested
        if requested in self.tier_to_model:
            return self.tier_to_model[requested]
        raise UnknownModelError(requested, ["auto", *self.tier_to_model, *names])

    def _info(self, model: str | None) -> ModelInfo:
        name = self.resolve(model) if model and model != "auto" else self._models[0].name
        return next(m for m in self._models if m.name == name)

    def tokenizer(self, model: str | None = None):
        self._info(model)  # an unknown name raises as in process
        return self._tokenizer  # one tokenizer for the whole family (the deployment checks it)

    def vocab_size(self, model: str | None = None) -> int:
        return self._info(model).vocab_size

    def max_model_len(self, requested: str | None = None) -> int:
        if requested and requested != "auto":
            return self._info(requested).max_model_len
        return min(m.max_model_len for m in self._models)

    def has_started(self, request_id: str) -> bool:
        """Whether the core has scheduled the request (its prefill began): said by the first row,
        or by the `started` of a step that scheduled it without output (a chunked prefill)."""
        r = self._by_id.get(request_id)
        return r is not None and r.begun

    # ----- submission ------------------------------------------------------------------------------
    async def submit(
        self, request_id: str, prompts: list[Prompt], params: SamplingParams, requested: str = "auto",
        hints: RoutingHints | None = None, sink: Sink | None = None, before_queue: Callable[[], None] | None = None,
    ) -> list[Submission]:
        """As `Deployment.submit` (the sink is required). Raises InvalidRequestError,
        UnknownModelError, QueueFullError, EngineDeadError."""
        if sink is None:
            raise TypeError("an engine-process deployment delivers to a sink")
        self._check_alive()
        hints = hints or RoutingHints()
        check_prompts(prompts, max(m.max_model_len for m in self._models))
        if requested != "auto":
            self.resolve(requested)
        self._check_wire(prompts, params, requested)
        if before_queue is not None:
            before_queue()
        handles = [next(self._handles) for _ in prompts]
        rids = prompt_request_ids(request_id, len(prompts))
        for i, (h, rid, p) in enumerate(zip(handles, rids, prompts)):
            r = self._routes[h] = _Route(sink, i, rid, p, params)
            self._by_id[rid] = r
        sid = next(self._submits)
        fut = self._loop.create_future()
        self._pending[sid] = (fut, handles, rids)
        try:
            self._out.send(self._enc.encode(ipc.Submit(
                self.index, sid, request_id, [p.ids for p in prompts], [p.text for p in prompts], handles, params, requested,
                hints)), copy=False)
            decisions: list[Decision] = await fut
        except BaseException:
            if self._pending.pop(sid, None) is not None:  # cancelled while the core routes it: abort it then
                self._pending[sid] = (None, handles, rids)
            self._forget(handles)
            raise
        subs = []
        for i, (h, rid, d) in enumerate(zip(handles, rids, decisions)):
            r = self._routes.get(h)
            if r is not None:
                r.decision = d
                if r.moved is not None:
                    _apply_move(d, r.moved)
            subs.append(Submission(i, rid, d, _Handle(self, h, rid)))
        return subs

    def _text(self, r: _Route, row: ipc.Row) -> bool:
        """Detokenize a row's new tokens and look for stop strings in them, as the engine does in
        process (EngineCore._check_finish / _make_delta): a sample that matches is cut after the
        token that completed the stop string and finishes with reason `stop`; samples finished
        before are dropped from the row. Returns whether every sample of the request is done."""
        detok = self._detokenizer
        kept = []
        for o in row.outputs:
            st = r.texts.get(o.index)
            if st is None:
                st = r.texts[o.index] = TextState(r.params)
            elif st.done:
                continue  # stopped here already; the core went on until it heard so
            stop = None
            for j, token in enumerate(o.token_ids):
                st.output_token_ids.append(token)
                stop = detok.update(st, 1)
                if stop is not None:
                    cut = o.token_ids[j + 1:]
                    del o.token_ids[j + 1:]
                    if o.logprobs is not None:
                        if o.cumulative_logprob is not None:
                            o.cumulative_logprob -= sum(lp[t] for t, lp in zip(cut, o.logprobs[j + 1:]))
                        del o.logprobs[j + 1:]
                    o.finish_reason, o.stop_reason = "stop", stop
                    if not row.finished:  # the core cannot see it: finish the sample there now
                        self._out.send(self._enc.encode(ipc.Stop(r.request_id, o.index, stop)))
                    break
            if stop is None and o.finish_reason is not None:
                detok.flush(st)
            st.done = o.finish_reason is not None
            o.text = detok.emittable(st, st.done)
            kept.append(o)
        row.outputs = kept
        return row.finished or (len(r.texts) == r.params.n and all(st.done for st in r.texts.values()))

    def _check_wire(self, prompts: list[Prompt], params: SamplingParams, requested: str) -> None:
        """Ids msgpack cannot carry (past 64 bits) are outside every vocabulary: refused here, in the
        engine's words (EngineCore.validate, SamplingParams.validate), before the core sees them."""
        vocab = self.vocab_size(requested)
        for p in prompts:
            for t in p.ids:
                if not _WIRE_MIN <= t <= _WIRE_MAX:
                    raise InvalidRequestError(
                        f"token id {t} in the prompt is outside the vocabulary [0, {vocab})", param="prompt")
        for t in params.stop_token_ids:
            if not _WIRE_MIN <= t <= _WIRE_MAX:
                raise InvalidRequestError(f"stop_token_ids token id {t} is outside the vocabulary [0, {vocab})",
                                          param="stop_token_ids")

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise self._dead
        if self._closing or self._loop is None:
            raise EngineDeadError("the engine was shut down")

    def _forget(self, handles: list[int]) -> None:
        for h in handles:
            r = self._routes.pop(h, None)
            if r is not None:
                self._by_id.pop(r.request_id, None)

    def _abort(self, handle: int, request_id: str) -> None:
        r = self._routes.pop(handle, None)
        if r is None:
            return  # finished (or failed) already
        self._by_id.pop(request_id, None)
        if not self._closing and self._dead is None:
            self._out.send(self._enc.encode(ipc.Abort([request_id])))

    # ----- what the core sends -----------------------------------------------------------------------
    def _readable(self) -> None:
        if not self._closed:
            ipc.drain(self._in, self._dec, self._on_message)

    def _on_message(self, msg) -> None:
        if isinstance(msg, ipc.Steps):
            routes = self._routes
            for h in msg.started:
                r = routes.get(h)
                if r is not None:
                    r.begun = True
            for row in msg.rows:
                r = routes.get(row.handle)
                if r is None:
                    continue  # aborted here: late rows
                r.begun = True
                finished = self._text(r, row)
                if finished:  # (samples ended by a stop string here were finished in the core by `Stop`)
                    del routes[row.handle]
                    self._by_id.pop(r.request_id, None)
                r.sink(r.index, RequestOutput(r.request_id, r.prompt.text, r.prompt.ids, row.outputs, finished,
                                              row.prompt_logprobs, row.metrics))
        elif isinstance(msg, ipc.Stats):
            self._stats = msg.stats
            for cb in self.on_stats:
                cb(msg.stats)
            fut = self._stats_asked.pop(msg.request, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif isinstance(msg, ipc.Admitted):
            entry = self._pending.pop(msg.submit_id, None)
            if entry is None:
                return
            fut, _, rids = entry
            if fut is None:  # its submitter went away while the core routed it
                self._out.send(self._enc.encode(ipc.Abort(rids)))
            elif not fut.done():
                fut.set_result(msg.decisions)
        elif isinstance(msg, ipc.Refused):
            fut, handles, _ = self._pending.pop(msg.submit_id, (None, [], []))
            self._forget(handles)
            if fut is not None and not fut.done():
                fut.set_exception(_refusal(msg))
        elif isinstance(msg, ipc.Failed):
            for h in msg.handles:
                r = self._routes.pop(h, None)
                if r is not None:
                    self._by_id.pop(r.request_id, None)
                    r.sink(r.index, EngineDeadError(msg.message) if msg.kind == "dead" else
                           RuntimeError(f"internal error while serving the request: {msg.message}"))
        elif isinstance(msg, ipc.Moved):
            r = self._routes.get(msg.handle)
            if r is not None:
                if r.decision is not None:
                    _apply_move(r.decision, msg.decision)
                else:
                    r.moved = msg.decision
        elif isinstance(msg, ipc.Dead):
            self._died(EngineDeadError(f"the engine core failed: {msg.error}"))


_WIRE_MIN, _WIRE_MAX = -(2**63), 2**64 - 1  # the integers msgpack encodes


def _apply_move(decision: Decision, moved: Decision) -> None:
    decision.model, decision.tier, decision.explain = moved.model, moved.tier, moved.explain


def _refusal(msg: ipc.Refused) -> BaseException:
    if msg.kind == "invalid":
        return InvalidRequestError(msg.message, param=msg.param)
    if msg.kind == "unknown_model":
        return UnknownModelError(msg.param or "", msg.known)
    if msg.kind == "queue_full":
        return QueueFullError(msg.message)
    if msg.kind == "dead":
        return EngineDeadError(msg.message)
    return RuntimeError(msg.message)


def _idle_stats(models: list[ModelInfo]) -> DeploymentStats:
    return DeploymentStats(models={m.name: ModelStats(
        name=m.name, tier=m.tier, num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=m.num_blocks,
        num_preemptions=0, spec_draft_tokens={}, spec_accepted_tokens={}, achieved_bandwidth=0.0,
        bandwidth_utilization=None) for m in models})


def _load_tokenizer(path: str):
    from ..engine.core import load_tokenizer

    return load_tokenizer(path)
