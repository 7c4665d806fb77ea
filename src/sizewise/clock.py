"""The one source of time for the engine and the orchestrator.

Everything that reads the time below the server (step durations, request timestamps, the
telemetry's rate windows and latency bias, the probe's own time) asks a `Clock` it was handed,
never the `time` module: in production that is `WallClock`, on the virtual device
(`sizewise.sim`) a `VirtualClock` that only moves when the simulator advances it, so a load sweep
runs in virtual time and is reproducible. Passed explicitly (no process-wide clock): two
deployments in one process may run on different clocks. `tests/test_clock.py` checks that no
`time.` call in engine/ or orchestrator/ goes around it.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds (durations, windows): `time.perf_counter` on the wall clock."""
        ...

    def time(self) -> float:
        """Seconds since the epoch (timestamps others read: request metrics)."""
        ...


class WallClock:
    """Real time. Stateless: one instance may be shared freely."""

    __slots__ = ()

    def now(self) -> float:
        return time.perf_counter()

    def time(self) -> float:
        return time.time()


WALL = WallClock()  # a constant (it holds no state), the default wherever no clock is handed in


def thread_cpu_ns() -> int:
    """CPU nanoseconds of the calling thread (CLOCK_THREAD_CPUTIME_ID). Real only: for tools that
    measure the host itself (the engine core's step trace), never for what a simulation runs on."""
    return time.thread_time_ns()


class VirtualClock:
    """Time that moves only when told to (a discrete-event simulation's clock)."""

    __slots__ = ("t", "epoch")

    def __init__(self, start: float = 0.0, epoch: float = 1.7e9) -> None:
        self.t = float(start)
        self.epoch = epoch  # what time() reads at t = 0: a fixed, plausible epoch (reproducible)

    def now(self) -> float:
        return self.t

    def time(self) -> float:
        return self.epoch + self.t

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds} s)")
        self.t += seconds

    def advance_to(self, t: float) -> None:
        """Move to `t` if it is later (an event in the past happens now)."""
        if t > self.t:
            self.t = t
