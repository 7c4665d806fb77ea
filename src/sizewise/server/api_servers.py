"""`sizewise serve --api-server-count N`: N API processes on one listening socket, one engine core.

The process `sizewise serve` started supervises: it binds the listening socket, starts the engine
core (orchestrator/core_process.py, with N reply sockets) and N API processes (this module run as
`python -m sizewise.server.api_servers SPEC`), each a whole uvicorn server on the inherited
socket (the kernel hands each new connection to one of them) with its own `RemoteDeployment`.

Metrics: the API processes share a prometheus multiprocess directory, so a scrape of any of them
renders every process's per-request series (summed); API process 0 alone sets the engine series,
from the core's snapshots as they arrive (Serving's `engine_series`).

Lifecycle: SIGTERM / Ctrl-C to the supervisor goes on to the API processes (each ends its streams
with `server_shutdown`), then the core is told to stop; all exit 0. The core dies: each API
process fails its requests with 503 `engine_dead` and exits 1, and so does the supervisor. The
supervisor dies (even `kill -9`): its children get their parent-death signals (the API processes
SIGTERM, the core its own) and go too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from ..metrics import Metrics
from ..orchestrator import ipc
from ..orchestrator.core_process import set_parent_death_signal, socket_path
from ..orchestrator.deployment import DeploymentConfig, ServerSection

log = logging.getLogger(__name__)

# With --engine-process, how long a server whose engine core died keeps answering (/health 503, every
# request 503 engine_dead) before it exits with status 1 (one API process or several).
ENGINE_DEAD_EXIT_S = 2.0


def supervise(cfg: DeploymentConfig, server_cfg: ServerSection, sock: socket.socket, count: int,
              log_level: str) -> int:
    """Run the core and `count` API processes on `sock` until a signal or a death; the exit status."""
    ipc_dir = tempfile.mkdtemp(prefix="sizewise-core-")
    (Path(ipc_dir) / "config.json").write_text(cfg.model_dump_json())
    prom = Path(ipc_dir) / "prometheus"
    prom.mkdir()
    stop = []
    previous = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    core = subprocess.Popen([sys.executable, "-m", "sizewise.orchestrator.core_process", "--ipc-dir", ipc_dir,
                             "--parent", str(os.getpid()), "--apis", str(count), "--log-level", log_level],
                            stdin=subprocess.DEVNULL)
    log.info("engine-core process started (pid %d)", core.pid)
    workers = []
    code = 0
    try:
        for i in range(count):
            spec = Path(ipc_dir) / f"api-{i}.json"
            spec.write_text(json.dumps({"index": i, "count": count, "core_pid": core.pid, "ipc_dir": ipc_dir,
                                        "fd": sock.fileno(),
                                        "log_level": log_level, "server": server_cfg.model_dump()}))
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "sizewise.server.api_servers", str(spec)], stdin=subprocess.DEVNULL,
                pass_fds=[sock.fileno()], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom)}))
        log.info("API processes started (pids %s)", ", ".join(str(w.pid) for w in workers))
        while not stop:
            if core.poll() is not None:
                log.error("the engine-core process exited (status %s): the API processes exit", core.returncode)
                code = 1
                _wait_all(workers, ENGINE_DEAD_EXIT_S + 10)
                break
            if any(w.poll() is not None for w in workers):
                log.error("an API process exited (statuses %s): stopping the server",
                          [w.returncode for w in workers])
                code = 1
                break
            time.sleep(0.1)
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        _wait_all(workers, 15)
        # (asked to stop: one still starting, before its own handler, dies of the SIGTERM passed on)
        clean = (0, None, -signal.SIGTERM) if stop else (0, None)
        if any(w.returncode not in clean for w in workers):
            code = 1
        _stop_core(core, ipc_dir)
        shutil.rmtree(ipc_dir, ignore_errors=True)
        for s, h in previous.items():
            signal.signal(s, h)
    return code


def _wait_all(procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("process %d did not stop within %g s: killing it", p.pid, timeout_s)
            p.kill()
            p.wait()


def _stop_core(core: subprocess.Popen, ipc_dir: str) -> None:
    if core.poll() is not None:
        return
    if not (Path(ipc_dir) / "core").exists():
        # Still starting (its socket is bound after the imports): a Shutdown sent now would be dropped
        # when this socket's linger ran out, and it has loaded nothing to give back.
        core.kill()
        core.wait()
        return
    ctx = zmq.Context()
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 5000)
    out.connect(socket_path(ipc_dir, "core"))
    out.send(ipc.encoder().encode(ipc.Shutdown()))
    out.close()
    ctx.term()
    try:
        core.wait(15)
    except subprocess.TimeoutExpired:
        log.error("the engine-core process did not stop within 15 s: killing it")
        core.kill()
        core.wait()


def worker(spec_path: str) -> int:
    """One API process: a uvicorn server on the inherited socket, serving the shared core."""
    spec = json.loads(Path(spec_path).read_text())
    parent = os.getppid()
    set_parent_death_signal(signal.SIGTERM)  # the supervisor gone: shut down as for a SIGTERM
    if os.getppid() != parent:
        return 1
    index = spec["index"]
    logging.basicConfig(level=spec["log_level"].upper(),
                        format=f"%(asctime)s %(levelname)s [api-{index}] %(name)s: %(message)s")
    from ..orchestrator.remote import RemoteDeployment
    from .app import create_app
    from .runner import Server, run_loop, shutdown_hook, uvicorn_config

    cfg = DeploymentConfig.model_validate_json((Path(spec["ipc_dir"]) / "config.json").read_text())
    server_cfg = ServerSection.model_validate(spec["server"])
    sock = socket.socket(fileno=spec["fd"])
    exit_code = 0
    server: Server | None = None

    def on_dead(exc) -> None:
        nonlocal exit_code
        exit_code = 1
        asyncio.get_running_loop().call_later(ENGINE_DEAD_EXIT_S, lambda: setattr(server, "should_exit", True))

    remote = RemoteDeployment(cfg, log_level=spec["log_level"], on_dead=on_dead).connect(
        spec["ipc_dir"], index, spec["core_pid"])

    def load():
        remote.wait_ready()
        # /ready must not say 200 from one process while another still loads (a probe reaches either):
        # each marks itself loaded, and is ready once all are.
        ipc_dir = Path(spec["ipc_dir"])
        (ipc_dir / f"loaded-{index}").touch()
        while sum(1 for _ in ipc_dir.glob("loaded-*")) < spec["count"]:
            time.sleep(0.05)
        if index == 0:  # the engine series: set here as the core's snapshots arrive
            remote.on_stats.append(app.state.sizewise.serving.recorder.scrape)
        return remote

    def on_load_error(exc: BaseException) -> None:
        nonlocal exit_code
        exit_code = 1
        if server is not None:
            server.should_exit = True

    app = create_app(config=server_cfg, loader=load, on_load_error=on_load_error,
                     metrics=Metrics(multiprocess_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR")))
    app.state.sizewise.serving.options.engine_series = "pushed" if index == 0 else "none"
    server = Server(uvicorn_config(app, log_level=spec["log_level"]), on_shutdown=shutdown_hook(app))
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_loop(server.serve(sockets=[sock]))
    except KeyboardInterrupt:
        pass
    finally:
        remote.shutdown()
        sock.close()
    return exit_code


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
