"""The engine core's step trace (SIZEWISE_TRACE_STEPS; orchestrator/step_trace.py) and its summary
(benchmarks/step_trace.py): what it records agrees with what the engine returned."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from pathlib import Path

from sizewise import SamplingParams
from sizewise.engine.async_engine import AsyncEngine
from sizewise.engine.config import EngineConfig
from sizewise.engine.core import EngineCore
from sizewise.orchestrator.step_trace import StepTrace

REPO = Path(__file__).resolve().parents[1]


def _summary_module():
    spec = importlib.util.spec_from_file_location("bench_step_trace", REPO / "benchmarks" / "step_trace.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trace_records_every_step_its_rows_and_the_idle_waits(llama_dir, tmp_path):
    core = EngineCore(llama_dir, EngineConfig(device="cpu", kv_cache_bytes=1 << 20, num_speculative_tokens=0),
                      name="a")
    engine = AsyncEngine(core, start=False)  # the trace wraps the worker's wait before it runs
    seen: list[tuple[int, int]] = []  # per step: outputs, tokens (from the engine, not the trace)
    engine.step_listeners.append(lambda name, c, outs, dt: seen.append(
        (len(outs), sum(len(o.token_ids) for r in outs for o in r.outputs))))
    trace = StepTrace(str(tmp_path / "steps.jsonl"))
    trace.attach(engine)
    engine._thread.start()

    async def serve() -> int:
        await asyncio.sleep(0.1)  # idle: the worker waits for work
        streams = [await engine.add_request(f"r{i}", [5, 17, 33, 8 + i],
                                            SamplingParams(temperature=0, max_tokens=5 + i, ignore_eos=True))
                   for i in range(3)]
        tokens = 0
        for stream in streams:
            async for delta in stream:
                tokens += sum(len(o.token_ids) for o in delta.outputs)
        return tokens

    try:
        assert asyncio.run(serve()) == 5 + 6 + 7
        time.sleep(0.1)  # the last step's listeners have run
    finally:
        engine.shutdown()
    trace.write()

    events = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    steps = [e for e in events if e[0] == "step"]
    assert [e[8] for e in steps] == [n for n, _ in seen]  # rows per step: the engine's outputs
    assert sum(t for _, t in seen) == 5 + 6 + 7
    for e in steps:
        _, name, t0, t1, cpu0, cpu1, rq0, rq1, rows, running, waiting, done, cpu_done, rq_done = e
        assert name == "a" and t0 <= t1 <= done and cpu0 <= cpu1 <= cpu_done and rq0 <= rq1 <= rq_done
        # one thread's CPU time never exceeds the wall time it spans (schedstat's own CPU field,
        # stale by up to a tick for a running thread, broke this)
        assert (cpu1 - cpu0) / 1e9 <= (t1 - t0) + 1e-4 and (cpu_done - cpu1) / 1e9 <= (done - t1) + 1e-4
    assert steps[-1][9] + steps[-1][10] == 0  # after the last step nothing runs or waits
    idle = [e for e in events if e[0] == "idle"]
    assert idle and idle[0][2] - idle[0][1] > 0.01  # the worker's first wait, before any request
    listeners = {e[1] for e in events if e[0] == "listener"}
    assert any("test_trace_records" in name for name in listeners)  # this test's listener, timed

    s = _summary_module().summarize(events)
    assert s["steps"] == len(steps) and s["rows_total"] == sum(n for n, _ in seen)
    assert 0 < s["step_cpu_ms"] <= s["step_ms"] + 0.1 * len(steps)


def test_the_trace_reads_a_run_queue_of_zero_where_the_kernel_has_no_schedstat(monkeypatch):
    """macOS and sandboxes have no /proc/thread-self/schedstat: the trace must not fail the step it wraps."""
    import os
    import threading

    from sizewise.orchestrator.step_trace import _SchedStat

    real_open = os.open

    def no_schedstat(path, *a, **k):
        if str(path).endswith("schedstat"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", no_schedstat)
    got = []
    t = threading.Thread(target=lambda: got.append(_SchedStat().read()))  # a fresh thread: no fd opened yet
    t.start()
    t.join()
    assert got and got[0][1] == 0 and got[0][0] > 0
