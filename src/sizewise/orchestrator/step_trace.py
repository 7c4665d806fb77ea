"""A per-step timeline of the engine-core process, for finding where it waits (debug; off by default).

`SIZEWISE_TRACE_STEPS=FILE sizewise serve ...`: the core records, in memory, every engine step
(start and end, the step's output rows against the requests running and waiting, the listeners'
time: telemetry and the `Steps` encode/send), every idle wait of the worker (nothing to step),
and on its event loop every message read and every submission's admission. It writes them as
JSON lines to FILE when it exits. `benchmarks/step_trace.py` summarises a file.

Each record carries wall time (`time.perf_counter`, CLOCK_MONOTONIC: comparable across the
processes of one host) and, for the thread that records it, its CPU time and its run-queue delay
(schedstat) (runnable, waiting for a CPU). So a span's wall time splits into CPU, run-queue
wait (another process or thread had the CPU) and the rest, sleeping: in a step or between steps
without an idle wait, that is a wait for the GIL (held by the core's event loop or ZMQ's
callbacks) or for a lock.

Records (lists, first field the kind):
  ["step", core, t0, t1, cpu0, cpu1, rq0, rq1, rows, running, waiting, t_done, cpu_done, rq_done]
  ["listener", name, t0, t1, cpu0, cpu1]  one step listener's call
  ["idle", t0, t1]                 the worker waited for work (AsyncEngine._wake)
  ["drain", t0, t1, cpu0, cpu1]   the loop read the core's socket
  ["msg", t, kind]                 ... and found this message
  ["submit", t_read, t_admitted]   a Submit's way through routing and the worker's inbox
  ["stats", t0, t1]                the loop built and sent a stats snapshot
"""

from __future__ import annotations

import json
import logging
import os
import threading

from ..clock import WALL, thread_cpu_ns

ENV = "SIZEWISE_TRACE_STEPS"
log = logging.getLogger(__name__)


class _SchedStat:
    """This thread's CPU nanoseconds (CLOCK_THREAD_CPUTIME_ID: schedstat's own CPU field is stale by
    up to a tick for the running thread) and run-queue nanoseconds (/proc/thread-self/schedstat,
    one fd per thread; its run delay is complete whenever the thread runs)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def read(self) -> tuple[int, int]:
        """(CPU ns, run-queue ns); the run queue reads 0 where the kernel has no schedstat (macOS,
        sandboxes): a debugging aid must never fail the step it wraps."""
        fd = getattr(self._local, "fd", None)
        if fd is None:
            try:
                fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
            except OSError:
                fd = -1
            self._local.fd = fd
        rq = 0
        if fd >= 0:
            try:
                rq = int(os.pread(fd, 128, 0).split()[1])
            except (OSError, IndexError, ValueError):
                rq = 0
        return thread_cpu_ns(), rq


class StepTrace:
    def __init__(self, path: str) -> None:
        self.path = path
        self.events: list[list] = []  # list.append is atomic under the GIL: both threads append
        self._sched = _SchedStat()
        self._pending: dict[str, tuple] = {}  # core -> the step in progress (worker thread only)

    def attach(self, engine) -> None:
        """Wrap each core's `step` and the worker's idle wait; listen to steps (after the others)."""
        for name, core in engine.cores.items():
            core.step = self._wrap_step(name, core.step)
        wake = engine._wake
        wait = wake.wait

        def traced_wait(timeout=None):
            t0 = WALL.now()
            try:
                return wait(timeout)
            finally:
                self.events.append(["idle", t0, WALL.now()])

        wake.wait = traced_wait
        engine.step_listeners[:] = [self._wrap_listener(f) for f in engine.step_listeners]
        engine.step_listeners.append(self._done)

    def _wrap_listener(self, listener):
        name = getattr(listener, "__qualname__", repr(listener))

        def traced_listener(*args):
            c0, t0 = thread_cpu_ns(), WALL.now()
            try:
                return listener(*args)
            finally:
                self.events.append(["listener", name, t0, WALL.now(), c0, thread_cpu_ns()])

        return traced_listener

    def _wrap_step(self, name: str, step):
        def traced_step():
            cpu0, rq0 = self._sched.read()
            t0 = WALL.now()
            outs = step()
            t1 = WALL.now()
            cpu1, rq1 = self._sched.read()
            self._pending[name] = (t0, t1, cpu0, cpu1, rq0, rq1, len(outs))
            return outs

        return traced_step

    def _done(self, name, core, outs, seconds) -> None:
        """The last step listener: what the step's listeners (telemetry, the flush) cost ends here."""
        p = self._pending.pop(name, None)
        if p is None:
            return
        cpu, rq = self._sched.read()
        s = core.scheduler
        self.events.append(["step", name, p[0], p[1], p[2], p[3], p[4], p[5], p[6], len(s.running), len(s.waiting),
                            WALL.now(), cpu, rq])

    def drain(self, fn, *args) -> None:
        """Run the loop's socket reader `fn(*args)`, recording its time."""
        cpu0, _ = self._sched.read()
        t0 = WALL.now()
        fn(*args)
        cpu1, _ = self._sched.read()
        self.events.append(["drain", t0, WALL.now(), cpu0, cpu1])

    def write(self) -> None:
        """Write the events as JSON lines (at the core's exit; they are kept in memory until then, so
        trace a benchmark, not a long-running server). A failure is logged, never raised: the core
        still closes its sockets."""
        try:
            with open(self.path, "w") as f:
                for e in self.events:
                    f.write(json.dumps(e) + "\n")
        except OSError as e:
            log.error("could not write the step trace to %s: %s", self.path, e)


def from_env() -> StepTrace | None:
    path = os.environ.get(ENV)
    return StepTrace(path) if path else None
