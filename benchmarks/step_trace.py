#!/usr/bin/env python3
"""Summarise an engine-core step trace (`SIZEWISE_TRACE_STEPS=FILE`, src/sizewise/orchestrator/step_trace.py).

    python benchmarks/step_trace.py FILE [T0 T1]     # the whole file, or a window of perf_counter times

`benchmarks/serving.py --trace-steps` records one per engine-process cell and prints this summary
for each. Where the core's wall time went in the window, in ms and as a share of it:

- step: inside `EngineCore.step`, split into CPU, run-queue wait (runnable, another thread or
  process had the CPU) and sleep (waiting for the GIL: the core's event loop or ZMQ held it);
- listeners: after a step, the telemetry and the `Steps` encode/send (plus delivering to the sinks);
- idle: the worker waited for work (no request running or waiting);
- other: between steps, neither idle nor listening: draining the inbox, picking the next core,
  GIL waits on the way;
- before the first step / after the last: the window's edges (requests still arriving; the last
  tokens on their way to the client).

And per step: rows (requests with output), against running+waiting after it; the submissions'
arrival spread and admission latency (read by the loop -> `Admitted` sent); the loop's CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics


def load(path: str) -> list[list]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(events: list[list], t0: float | None = None, t1: float | None = None) -> dict:
    steps = [e for e in events if e[0] == "step"]
    if t0 is None:
        t0 = min(e[2] for e in steps) if steps else 0.0
    if t1 is None:
        t1 = max(e[11] for e in steps) if steps else 0.0
    inside = lambda a, b: a >= t0 and b <= t1  # noqa: E731
    steps = [e for e in steps if inside(e[2], e[11])]
    idle = [e for e in events if e[0] == "idle" and e[2] > t0 and e[1] < t1]
    drains = [e for e in events if e[0] == "drain" and inside(e[1], e[2])]
    submits = [e for e in events if e[0] == "submit" and inside(e[1], e[2])]
    stats = [e for e in events if e[0] == "stats" and inside(e[1], e[2])]
    wall = t1 - t0
    ms = lambda s: 1e3 * s  # noqa: E731
    step_wall = sum(e[3] - e[2] for e in steps)
    step_cpu = sum(e[5] - e[4] for e in steps) / 1e9
    step_rq = sum(e[7] - e[6] for e in steps) / 1e9
    listen_wall = sum(e[11] - e[3] for e in steps)
    listen_cpu = sum(e[12] - e[5] for e in steps) / 1e9
    idle_wall = sum(min(e[2], t1) - max(e[1], t0) for e in idle)
    first = steps[0][2] - t0 if steps else wall
    last = t1 - steps[-1][11] if steps else 0.0
    # idle waits at the edges are in `first`/`last` already
    idle_mid = sum(min(e[2], steps[-1][11]) - max(e[1], steps[0][2]) for e in idle
                   if steps and e[2] > steps[0][2] and e[1] < steps[-1][11])
    other = wall - step_wall - listen_wall - idle_mid - first - last
    rows = [e[8] for e in steps]
    most_rows = max(rows, default=0)
    live = [e[9] + e[10] for e in steps]
    out = {
        "wall_ms": ms(wall), "steps": len(steps),
        "step_ms": ms(step_wall), "step_cpu_ms": ms(step_cpu), "step_runq_ms": ms(step_rq),
        "step_sleep_ms": ms(step_wall - step_cpu - step_rq),
        "listeners_ms": ms(listen_wall), "listeners_cpu_ms": ms(listen_cpu),
        "idle_ms": ms(idle_mid), "other_ms": ms(other), "before_first_step_ms": ms(first),
        "after_last_step_ms": ms(last), "idle_waits_total_ms": ms(idle_wall),
        "rows_per_step": statistics.mean(rows) if rows else 0.0, "rows_total": sum(rows),
        "steps_below_max_rows": sum(1 for r in rows if r < most_rows),
        "running_waiting_mean": statistics.mean(live) if live else 0.0,
        "loop_cpu_ms": ms(sum(e[4] - e[3] for e in drains) / 1e9), "loop_drains": len(drains),
        "stats_ms": ms(sum(e[2] - e[1] for e in stats)),
        "submits": len(submits),
    }
    per: dict[str, list[float]] = {}
    for e in events:
        if e[0] == "listener" and inside(e[2], e[3]):
            acc = per.setdefault(e[1], [0.0, 0.0])
            acc[0] += e[3] - e[2]
            acc[1] += (e[5] - e[4]) / 1e9
    out["listener_ms"] = {k: [ms(v[0]), ms(v[1])] for k, v in per.items()}
    if submits:
        lat = sorted(e[2] - e[1] for e in submits)
        out["submit_spread_ms"] = ms(max(e[1] for e in submits) - min(e[1] for e in submits))
        out["first_submit_after_ms"] = ms(min(e[1] for e in submits) - t0)
        out["admit_p50_ms"] = ms(lat[len(lat) // 2])
        out["admit_max_ms"] = ms(lat[-1])
    if steps:
        durs = sorted(e[3] - e[2] for e in steps)
        out["step_p50_ms"] = ms(durs[len(durs) // 2])
        gaps = sorted(b[2] - a[11] for a, b in zip(steps, steps[1:]))
        if gaps:
            out["gap_p50_ms"] = ms(gaps[len(gaps) // 2])
            out["gap_max_ms"] = ms(gaps[-1])
    return out


def format_summary(s: dict) -> str:
    w = s["wall_ms"] or 1.0
    pct = lambda k: f"{s[k]:8.1f} ms {100 * s[k] / w:5.1f}%"  # noqa: E731
    lines = [
        f"  window {s['wall_ms']:.1f} ms, {s['steps']} steps (p50 {s.get('step_p50_ms', 0):.2f} ms), "
        f"{s['rows_total']} rows, {s['rows_per_step']:.1f} rows/step (running+waiting {s['running_waiting_mean']:.1f}),"
        f" {s['steps_below_max_rows']} steps below the most rows",
        f"  step      {pct('step_ms')}  (cpu {s['step_cpu_ms']:.1f}, run queue {s['step_runq_ms']:.1f}, "
        f"sleep/GIL {s['step_sleep_ms']:.1f})",
        f"  listeners {pct('listeners_ms')}  (cpu {s['listeners_cpu_ms']:.1f})",
        *(f"    {k}: {v[0]:.1f} ms (cpu {v[1]:.1f})" for k, v in s.get("listener_ms", {}).items()),
        f"  idle      {pct('idle_ms')}",
        f"  other     {pct('other_ms')}  (gap between steps p50 {s.get('gap_p50_ms', 0):.3f} ms, max "
        f"{s.get('gap_max_ms', 0):.2f})",
        f"  before the first step {pct('before_first_step_ms')}",
        f"  after the last step   {pct('after_last_step_ms')}",
        f"  submits {s['submits']}: first {s.get('first_submit_after_ms', 0):.1f} ms into the window, spread "
        f"{s.get('submit_spread_ms', 0):.1f} ms, admission p50 {s.get('admit_p50_ms', 0):.2f} max "
        f"{s.get('admit_max_ms', 0):.2f} ms; loop cpu {s['loop_cpu_ms']:.1f} ms in {s['loop_drains']} reads; "
        f"stats {s['stats_ms']:.1f} ms",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help="a trace written by the engine core (SIZEWISE_TRACE_STEPS=FILE)")
    ap.add_argument("t0", type=float, nargs="?", help="window start (time.perf_counter; default: the first step)")
    ap.add_argument("t1", type=float, nargs="?", help="window end (default: the last step)")
    args = ap.parse_args()
    print(format_summary(summarize(load(args.file), args.t0, args.t1)))


if __name__ == "__main__":
    main()
