#!/usr/bin/env python3
"""The engine core's host work between two steps, beside the step itself (issue 28).

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/core_step_work.py              # batch 1/16/64
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/core_step_work.py --batches 1

At batch 1 the engine-core process's inter-token time is its step period: the model's step plus
what its worker does before the next one. This steps the demo family's small engine itself (no
worker thread) and, after every real step (so with the caches as the model left them, which is
what the worker sees), calls what the worker calls between two steps in the engine-core process:
the requests' sinks, which build the step's rows, then the step listeners in the worker's order:
`Telemetry.on_step`, and `CoreServer._flush`, which encodes the rows and sends them over ZMQ to
a reader in another process. Each is timed in
thread CPU time; the table gives medians per step, and the host work as a share of the step's
own CPU (the baseline, measured in the same run).

Timings are noisy on a shared machine; to compare two versions, run them alternately.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LISTENERS = {"Telemetry.on_step": "on_step", "CoreServer._flush": "flush"}
READER = "import sys, zmq\ns = zmq.Context().socket(zmq.PULL)\ns.bind(sys.argv[1])\nwhile True:\n    s.recv()\n"


def measure(dep, server, batch: int, steps: int, tag: str) -> dict:
    from sizewise.sampling_params import SamplingParams

    name = dep.tier_to_model["small"]
    core = dep.cores[name]
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    sinks = {}
    for i in range(batch):
        rid = f"{tag}-{i}"
        core.add_request(rid, [1 + (j * 7 + i) % 200 for j in range(32)], params)
        sinks[rid] = server._sink(0, [i], [rid])
    cpu = time.thread_time_ns
    # the step listeners in the worker's order (the deployment's telemetry, the core's flush)
    listeners = [(LISTENERS.get(getattr(fn, "__qualname__", ""), "other"), fn) for fn in dep.engine.step_listeners]
    cols: dict[str, list[float]] = {"step": [], "sinks": [], "on_step": [], "flush": []}
    for k in range(steps):
        t0 = time.perf_counter()
        c0 = cpu()
        outs = core.step()
        c1 = cpu()
        dt = time.perf_counter() - t0
        for o in outs:
            sinks[o.request_id](0, o)
        c2 = cpu()
        spans = [("step", c0, c1), ("sinks", c1, c2)]
        for key, fn in listeners:
            a = cpu()
            fn(name, core, outs, dt)
            spans.append((key, a, cpu()))
        if k >= 2 and len(outs) == batch:  # decode steps at the full batch (the prefill is another cost)
            for key, a, b in spans:
                if key in cols:
                    cols[key].append((b - a) / 1e3)
    for rid in sinks:
        core.abort_request(rid)
    med = {k: statistics.median(v) for k, v in cols.items()}
    host = med["sinks"] + med["on_step"] + med["flush"]
    return {"batch": batch, "steps": len(cols["step"]), "step_us": med["step"], "sinks_us": med["sinks"],
            "on_step_us": med["on_step"], "flush_us": med["flush"], "host_us": host,
            "host_x_step": host / med["step"], "on_step_p90_us": sorted(cols["on_step"])[int(0.9 * len(cols["on_step"]))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64", help="running requests per step (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=128, help="decode steps timed per batch (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the batches (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "core-step-work.json")
    args = ap.parse_args()

    import torch
    import zmq

    from sizewise.orchestrator.core_process import CoreServer, socket_path
    from sizewise.orchestrator.deployment import Deployment, DeploymentConfig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = DeploymentConfig.from_yaml(REPO / "configs" / "demo.yaml")
    cfg = cfg.model_copy(update={"memory_fraction": 0.05, "engine": cfg.engine.model_copy(
        update={"max_num_seqs": 64, "max_model_len": 256})})
    ipc_dir = tempfile.mkdtemp(prefix="sizewise-bench-")
    addr = socket_path(ipc_dir, "api-0")
    reader = subprocess.Popen([sys.executable, "-c", READER, addr])
    ctx = zmq.Context()
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, 0)  # as the engine-core process sets its sockets
    out.connect(addr)
    inbound = ctx.socket(zmq.PULL)
    inbound.bind(socket_path(ipc_dir, "core"))
    rows = []
    try:
        dep = Deployment.load(cfg, echo_plan=False, detokenize=False)  # as the engine-core process loads it
        try:
            dep.engine.shutdown()  # this script steps the engine itself
            server = CoreServer(dep, inbound, [out], ipc_dir, os.getppid())
            for rep in range(args.repeats):
                for b in (int(x) for x in args.batches.split(",")):
                    r = measure(dep, server, b, args.steps, f"r{rep}-b{b}")
                    print(f"round {rep + 1} batch {b}: step {r['step_us']:.0f} us, host work {r['host_us']:.1f} us "
                          f"(sinks {r['sinks_us']:.1f}, on_step {r['on_step_us']:.1f}, flush {r['flush_us']:.1f})",
                          flush=True)
                    rows.append({"round": rep + 1, **r})
        finally:
            dep.shutdown()
    finally:
        reader.kill()
        out.close(linger=0)
        inbound.close(linger=0)
        ctx.term()
    print()
    print_table(rows, ["round", "batch", "step_us", "sinks_us", "on_step_us", "flush_us", "host_us", "host_x_step",
                       "on_step_p90_us", "steps"])
    print("\nCPU us per step, medians over decode steps at the full batch; host_x_step: (sinks + on_step + flush)"
          "\n/ the step's own CPU. On a shared machine these are noisy: compare versions in alternate runs.")
    save_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})


if __name__ == "__main__":
    main()
