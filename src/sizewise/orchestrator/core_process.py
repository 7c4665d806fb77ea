"""The engine-core process (`sizewise serve --engine-process`; docs/engine-core.md).

It holds the `Deployment` (the co-resident engines, the worker thread that steps them, the router,
telemetry and capacity plan); the API process does HTTP, tokenization and SSE. Started by
`RemoteDeployment` (remote.py) as `python -m sizewise.orchestrator.core_process`, a fresh
interpreter (never a fork of a process that may have initialised torch or a device runtime).

Hot path: every request's deltas reach a sink on the worker thread itself (no event-loop hop per
request); after each engine step one `Steps` message per API process carries the step's rows.
The main thread runs an asyncio loop for what is per request (routing, with its probes, and
admission) and for stats snapshots: computed when a scrape asks (`StatsRequest`), never on a timer
while one API process is served (a snapshot holds the GIL the worker steps with); with several,
pushed to all every `STATS_EVERY_S` (process 0 exports the engine series for every process).

Lifecycle: SIGINT and SIGTERM are ignored (a terminal's Ctrl-C or a supervisor's SIGTERM to the
group reaches the API process, which decides); the core exits on `Shutdown`, and when its parent
dies (PR_SET_PDEATHSIG, and a check of the parent pid each `STATS_EVERY_S`), removing the socket
directory, so a killed API process never leaves a core holding the device.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import logging
import os
import shutil
import signal
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import zmq

from ..clock import WALL
from ..errors import EngineDeadError, InvalidRequestError, QueueFullError, UnknownModelError
from . import ipc, step_trace
from .deployment import Deployment, DeploymentConfig, prompt_request_ids
from .types import Decision, Prompt

log = logging.getLogger(__name__)

STATS_EVERY_S = 0.25  # with several API processes: how stale /metrics' engine series may be
_TRACKED_MOVABLE = 4096
_PR_SET_PDEATHSIG = 1
_PARENT_GONE = signal.SIGUSR1


def socket_path(ipc_dir: str | Path, name: str) -> str:
    return f"ipc://{Path(ipc_dir) / name}"


def set_parent_death_signal(sig: int) -> None:
    """Linux: `sig` reaches this process the moment its parent dies (elsewhere the pid check)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the periodic parent check remains
        pass


class CoreServer:
    """Serves one Deployment to `len(outs)` API processes."""

    def __init__(self, deployment: Deployment, inbound: zmq.Socket, outs: list[zmq.Socket], ipc_dir: str,
                 parent: int, trace: step_trace.StepTrace | None = None) -> None:
        self.dep = deployment
        self.trace = trace
        self.inbound = inbound
        self.outs = outs
        self.ipc_dir = ipc_dir
        self.parent = parent
        self._enc = ipc.encoder()
        self._dec = ipc.decoder(ipc.ToCore)
        self._send_lock = threading.Lock()  # the worker thread and the loop share the sockets
        # Rows of the step in progress, per API process: appended and sent on the worker thread only.
        self._rows: list[list[ipc.Row]] = [[] for _ in outs]
        # movable requests (the plan may move them while they wait): id -> (api, handle, decision)
        self._movable: OrderedDict[str, tuple[int, int, Decision]] = OrderedDict()
        # admitted requests not scheduled yet: id -> (api, handle); the API's `has_started` (a long
        # chunked prefill is service, not queueing) hears of them in the next Steps
        self._unstarted: dict[str, tuple[int, int]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._stop: asyncio.Event | None = None
        engine = deployment.engine
        engine.step_listeners.append(self._flush)
        engine.move_listeners.append(self._moved)  # after the deployment's own, which rewrites the decision
        if trace is not None:
            trace.attach(engine)

    # ----- sending ----------------------------------------------------------------------------------
    # Copied sends: a step's message is a few hundred bytes, and the zero-copy path's Frame costs
    # more than the copy (~6 us of the worker's CPU after each step, measured with cold caches).
    def send(self, api: int, msg) -> None:
        data = self._enc.encode(msg)
        with self._send_lock:
            self.outs[api].send(data)

    def broadcast(self, msg) -> None:
        data = self._enc.encode(msg)
        with self._send_lock:
            for sock in self.outs:
                sock.send(data)

    def _flush(self, name, core, outs, seconds) -> None:
        """A step listener (worker thread): the step's rows, one message per API process."""
        started: list[list[int]] | None = None
        if self._unstarted:  # (scheduled sequences are running: at most max_num_seqs to look at)
            for seq in core.scheduler.running:
                where = self._unstarted.pop(seq.request.request_id, None)
                if where is not None:
                    started = started or [[] for _ in self.outs]
                    started[where[0]].append(where[1])
        for api, rows in enumerate(self._rows):
            if rows or (started and started[api]):
                self._rows[api] = []
                self.send(api, ipc.Steps(rows, started[api] if started else []))

    def _sink(self, api: int, handles: list[int], rids: list[str]):
        rows = self._rows

        def sink(index: int, item) -> None:  # worker thread
            if isinstance(item, BaseException):
                kind = "dead" if isinstance(item, EngineDeadError) else "internal"
                self._unstarted.pop(rids[index], None)
                self.send(api, ipc.Failed([handles[index]], kind, str(item)))
                return
            if item.finished:  # (finished within the step that scheduled it)
                self._unstarted.pop(item.request_id, None)
            rows[api].append(ipc.Row(handles[index], item.outputs, item.finished, item.prompt_logprobs,
                                     item.metrics))

        return sink

    # ----- requests --------------------------------------------------------------------------------
    def _on_message(self, msg) -> None:
        if self.trace is not None:
            self.trace.events.append(["msg", WALL.now(), type(msg).__name__])
        if isinstance(msg, ipc.Submit):
            task = asyncio.get_running_loop().create_task(self._submit(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(msg, ipc.Abort):
            for rid in msg.request_ids:
                self._movable.pop(rid, None)
                self._unstarted.pop(rid, None)
                self.dep.engine.abort(rid)
        elif isinstance(msg, ipc.Stop):
            self.dep.engine.stop_sample(msg.request_id, msg.index, msg.stop_reason)
        elif isinstance(msg, ipc.StatsRequest):
            self._send_stats(msg.api, msg.request)
        elif isinstance(msg, ipc.Shutdown):
            self._stop.set()

    def _send_stats(self, api: int | None, request: int = -1) -> None:
        """A stats snapshot to API process `api` (None: to all)."""
        t0 = WALL.now()
        try:
            msg = ipc.Stats(self.dep.stats(), request)
        except Exception:  # noqa: BLE001 - metrics must never stop serving (the scrape shows the last one)
            log.exception("stats snapshot failed")
            return
        if api is None:
            self.broadcast(msg)
        else:
            self.send(api, msg)
        if self.trace is not None:
            self.trace.events.append(["stats", t0, WALL.now()])

    async def _submit(self, msg: ipc.Submit) -> None:
        t_read = WALL.now()
        prompts = [Prompt(ids, text) for ids, text in zip(msg.prompt_ids, msg.prompt_texts)]
        rids = prompt_request_ids(msg.request_id, len(prompts))

        def unstarted() -> None:  # routed and valid; before the worker can see them (Deployment.submit)
            self._unstarted.update((rid, (msg.api, h)) for rid, h in zip(rids, msg.handles))

        refused = None
        try:
            subs = await self.dep.submit(msg.request_id, prompts, msg.params, msg.requested, msg.hints,
                                         sink=self._sink(msg.api, msg.handles, rids), before_queue=unstarted,
                                         direct_sink=True)
        except InvalidRequestError as e:
            refused = ipc.Refused(msg.submit_id, "invalid", str(e), e.param)
        except UnknownModelError as e:
            refused = ipc.Refused(msg.submit_id, "unknown_model", str(e), e.name,
                                  ["auto", *self.dep.tier_to_model, *self.dep.cores])
        except QueueFullError as e:
            refused = ipc.Refused(msg.submit_id, "queue_full", str(e))
        except EngineDeadError as e:
            refused = ipc.Refused(msg.submit_id, "dead", str(e))
        except Exception as e:  # noqa: BLE001 - the API process answers 500 and logs it
            log.exception("submission %s failed", msg.request_id)
            refused = ipc.Refused(msg.submit_id, "internal", f"{type(e).__name__}: {e}")
        if refused is not None:
            for rid in rids:
                self._unstarted.pop(rid, None)
            self.send(msg.api, refused)
            return
        for sub, handle in zip(subs, msg.handles):
            if sub.decision.reason.startswith("plan:") and msg.requested == "auto":
                self._movable[sub.request_id] = (msg.api, handle, sub.decision)
                while len(self._movable) > _TRACKED_MOVABLE:
                    self._movable.popitem(last=False)
        self.send(msg.api, ipc.Admitted(msg.submit_id, [s.decision for s in subs]))
        if self.trace is not None:
            self.trace.events.append(["submit", t_read, WALL.now()])

    def _moved(self, request_id: str, src: str, dst: str, written: int = 0) -> None:
        where = self._movable.get(request_id)
        if where is not None:
            api, handle, decision = where
            self.send(api, ipc.Moved(handle, decision))

    # ----- the loop ---------------------------------------------------------------------------------
    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        loop.add_signal_handler(_PARENT_GONE, self._parent_gone)
        fd = self.inbound.getsockopt(zmq.FD)
        if self.trace is None:
            loop.add_reader(fd, ipc.drain, self.inbound, self._dec, self._on_message)
        else:
            loop.add_reader(fd, self.trace.drain, ipc.drain, self.inbound, self._dec, self._on_message)
        self.broadcast(ipc.Ready(self.dep.describe(), dict(self.dep.tier_to_model)))
        ipc.drain(self.inbound, self._dec, self._on_message)  # anything that came before the reader
        status = 0
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), STATS_EVERY_S)
            except asyncio.TimeoutError:
                pass
            if os.getppid() != self.parent:
                self._parent_gone()
            if not self.dep.alive:
                log.error("the engine worker died: the engine-core process exits")
                self.broadcast(ipc.Dead("the engine worker died"))
                status = 1
                break
            if len(self.outs) > 1:
                self._send_stats(None)
        loop.remove_reader(fd)
        self.dep.shutdown()
        return status

    def _parent_gone(self) -> None:
        _orphaned(self.ipc_dir)


def _orphaned(ipc_dir: str) -> None:
    log.error("the API process is gone: the engine-core process exits")
    shutil.rmtree(ipc_dir, ignore_errors=True)
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sizewise-engine-core")
    p.add_argument("--ipc-dir", required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--apis", type=int, default=1)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Until the serving loop takes it over: an orphan removes its socket directory and exits.
    signal.signal(_PARENT_GONE, lambda *_: _orphaned(args.ipc_dir))
    set_parent_death_signal(_PARENT_GONE)
    if os.getppid() != args.parent:  # the parent died before the signal was armed
        return 1
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s [engine-core] %(name)s: %(message)s")
    cfg = DeploymentConfig.model_validate_json((Path(args.ipc_dir) / "config.json").read_text())
    ctx = zmq.Context()
    outs = []
    for i in range(args.apis):
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.SNDHWM, 0)  # never drop or block a step's rows; the API's own bound applies
        s.setsockopt(zmq.LINGER, 2000)
        s.connect(socket_path(args.ipc_dir, f"api-{i}"))
        outs.append(s)
    inbound = ctx.socket(zmq.PULL)
    inbound.setsockopt(zmq.RCVHWM, 0)
    inbound.bind(socket_path(args.ipc_dir, "core"))
    try:
        deployment = Deployment.load(cfg, echo_plan=False, detokenize=False)  # the API process detokenizes
    except BaseException as e:  # noqa: BLE001 - the API process reports it (load_error) and exits 1
        log.error("loading the deployment failed: %s", e, exc_info=not isinstance(e, (ValueError, OSError)))
        data = ipc.encoder().encode(ipc.Dead(" ".join(str(e).split()) or type(e).__name__))
        for s in outs:
            s.send(data)
        for s in (*outs, inbound):
            s.close()
        ctx.term()
        return 1
    # This process is the core's alone: move the loaded models' millions of objects out of the
    # collector's reach, or a full collection holds the GIL for 0.1-0.6 s in the middle of steps.
    gc.collect()
    gc.freeze()
    trace = step_trace.from_env()
    server = CoreServer(deployment, inbound, outs, args.ipc_dir, args.parent, trace)
    try:
        return asyncio.run(server.serve())
    finally:
        if trace is not None:
            trace.write()
        for s in (*outs, inbound):  # a stopped API process reads no more: do not wait to deliver
            s.close(linger=100)
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
