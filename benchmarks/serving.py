#!/usr/bin/env python3
"""Serving benchmark: what serving a token over HTTP costs next to the engine in process (issue 28).

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serving.py            # small+large, batch 1/16/64
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serving.py --quick    # small, batch 1/16

Per demo tier and batch size B (B concurrent requests, each a fixed random prompt of token ids,
`--max-tokens` tokens generated greedily with ignore_eos, so every path does the same work):

- in process: one `EngineCore` (what `LLM.generate` drives) fed the B prompts and stepped to
  the end in this process; its deltas are timestamped as each step returns them.
- HTTP: `sizewise serve <tier> --no-engine-process` in its own process on a random loopback port,
  B concurrent `/v1/completions` requests, streamed (every SSE chunk timestamped) and not, from a
  lean asyncio HTTP/1.1 client (`_Completion`: it shares the cores with the server, so it parses
  as little as a fair client can; under SCHED_BATCH, as if it were on another host).
- engine process (ep-http, ep-http-stream): the same requests to `sizewise serve <tier>
  --engine-process`: the API process does HTTP/SSE, its engine-core child steps the model
  (docs/engine-core.md). CPU is read per process: the API process (its event loop thread and the
  rest) and the core (its event loop and its engine worker thread).

The paths take turns, `--repeats` rounds per batch size (the in-process engine and the
server are both loaded; the idle one costs nothing), and each quantity is the median over the
rounds. Reported per cell: output tokens/s and its ratio to in process, CPU
seconds per output token of the serving process (from /proc: the server process as a whole, its
main thread = the event loop doing HTTP/JSON/SSE, and its other threads = mostly the engine worker
stepping the model and handing deltas over; per thread from /proc/PID/task/*/schedstat), and
of this process (time.process_time) for the in-process engine,
inter-token latency p50/p99 (streamed and in process). Table on stdout, JSON in
benchmarks/results/serving[-quick].json.

Timings here are noisy: the machine is shared and the client runs on the same cores as the
server. Wall-clock tokens/s moves with the load; CPU seconds per token (what the serving path
costs, whatever else runs) is the steadier number. Run it twice and compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json  # noqa: E402

from sizewise.sim.report import pct  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ----- CPU accounting (Linux /proc) -------------------------------------------------------------
@dataclass(slots=True)
class CpuSample:
    main: float  # CPU seconds of the thread whose id is the process id (the server's event loop)
    other: float  # every other live thread's, summed

    @property
    def total(self) -> float:
        return self.main + self.other

    def __sub__(self, o: "CpuSample") -> "CpuSample":
        return CpuSample(self.main - o.main, self.other - o.other)


def _thread_cpu(pid: int, tid: str) -> float:
    # schedstat's first field: nanoseconds on a CPU (/proc/*/stat's utime+stime tick at 10 ms,
    # too coarse for a cell of a second).
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def cpu_of(pid: int) -> CpuSample:
    """Per-thread CPU of a live process; a thread that exits between two samples is lost (the
    server's threads live as long as it does)."""
    main, other = 0.0, 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            t = _thread_cpu(pid, tid)
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            continue
        if int(tid) == pid:
            main = t
        else:
            other += t
    return CpuSample(main, other)


def itls(stamps: list[list[float]]) -> list[float]:
    """Inter-token gaps in seconds: per request, between consecutive token arrivals (the first token,
    TTFT, is not one)."""
    out = []
    for s in stamps:
        for a, b in zip(s, s[1:]):
            out.append(b - a)
    return out


# ----- in process -------------------------------------------------------------------------------
def run_in_process(engine, prompts: list[list[int]], max_tokens: int) -> dict:
    from sizewise.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    rids = [f"b{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    stamps: dict[str, list[float]] = {r: [] for r in rids}
    tokens = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for rid, ids in zip(rids, prompts):
        engine.add_request(rid, ids, params)
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for d in outs:
            n = sum(len(o.token_ids) for o in d.outputs)
            if n:
                tokens += n
                stamps[d.request_id].extend([now] * n)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tokens": tokens, "wall_s": wall, "cpu_s": cpu, "itl": itls(list(stamps.values()))}


# ----- over HTTP --------------------------------------------------------------------------------
def pin(pid: int, engine_cpu: int, serving_cpu: int, engine_process: bool | None) -> None:
    """`--pin`: the engine's work on one CPU and everything else on another, in every path alike.
    engine_process None: this process (the in-process engine, or the client); False: a one-process
    server (its main thread, the event loop, to serving; its engine worker to the engine's CPU);
    True: an engine-core process (all of it to the engine's CPU)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        main = int(tid) == pid
        cpu = engine_cpu if engine_process or (engine_process is False and not main) else serving_cpu
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except (ProcessLookupError, OSError):  # a thread that ended meanwhile
            pass


def client_yields(on: bool) -> None:
    """During the HTTP cells the client runs under SCHED_BATCH (Linux), as a client on another host
    would not compete: under the normal policy its wake-up at each SSE chunk preempted the API
    process mid-step (7.5 times a step at batch 16, 32 at 64, against 0.3 and 1.5) and the engine
    core too (docs/engine-core.md). The in-process baseline runs under the normal policy."""
    if hasattr(os, "SCHED_BATCH"):
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH if on else os.SCHED_OTHER, os.sched_param(0))
        except OSError as e:  # e.g. a sandbox that forbids it: measure anyway, and say so
            print(f"the client's scheduling policy stays as it is: {e}", file=sys.stderr)


def child_of(pid: int) -> int:
    """The one child process of `pid` (the engine core of an --engine-process server)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid:
                return int(entry)
    raise RuntimeError(f"process {pid} has no child: no engine core")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`sizewise serve MODEL` in its own process on a random loopback port; stopped with SIGTERM."""

    def __init__(self, model_dir: Path, max_num_seqs: int, max_model_len: int, log_path: Path,
                 engine_process: bool = False, trace: Path | None = None) -> None:
        self.trace = trace  # SIZEWISE_TRACE_STEPS for the engine core: written when it stops
        self.cmd = [sys.executable, "-m", "sizewise.cli", "serve", str(model_dir), "--host", "127.0.0.1",
                    "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len),
                    "--log-level", "warning", "--engine-process" if engine_process else "--no-engine-process"]
        self.engine_process = engine_process
        self.core_pid: int | None = None
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout_s: float) -> str:
        import httpx

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        src = str(REPO / "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if self.trace is not None:
            env["SIZEWISE_TRACE_STEPS"] = str(self.trace)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd + ["--port", str(port)], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=REPO)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                if httpx.get(self.url + "/ready", timeout=2.0).status_code == 200:
                    self.core_pid = child_of(self.proc.pid) if self.engine_process else None
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"the server was not ready within {timeout_s:.0f} s; log: {self.log_path}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()
        self.proc = None


class _Completion(asyncio.Protocol):
    """One `POST /v1/completions` on its own connection, read by a lean HTTP/1.1 client.

    The client shares the host's cores with the server, and the in-process baseline has none, so it
    does as little as a fair client can: the response is parsed in `data_received` (no await per
    event); a streamed body is de-chunked (Transfer-Encoding: chunked) and each SSE event is
    timestamped by substring tests, with JSON parsed only for the final usage chunk; a
    non-streamed body is one JSON document. `done` gets the completion tokens (the usage)."""

    def __init__(self, request: bytes, stream: bool, stamps: list[float], done: asyncio.Future) -> None:
        self.request = request
        self.stream = stream
        self.stamps = stamps
        self.done = done
        self.buf = bytearray()
        self.status: int | None = None
        self.length: int | None = None  # Content-Length, when not chunked
        self.transport: asyncio.Transport | None = None
        self.body = b""  # a chunked body that is not an event stream (an error)
        self.tokens = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.buf
        buf += data
        if self.status is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).decode("latin-1").split("\r\n")
            del buf[:end + 4]
            self.status = int(head[0].split(" ", 2)[1])
            for line in head[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    self.length = int(v)
        if self.length is not None:  # a whole JSON body (not streamed, or an error)
            if len(buf) >= self.length:
                self._finish(bytes(buf[:self.length]), None)
            return
        while True:  # chunked: "<hex size>\r\n<data>\r\n", ended by a zero-size chunk
            eol = buf.find(b"\r\n")
            if eol < 0:
                return
            size = int(buf[:eol], 16)
            if len(buf) < eol + 4 + size:
                return
            chunk = bytes(buf[eol + 2:eol + 2 + size])
            del buf[:eol + 4 + size]
            if size == 0:
                self._finish(None, None)
                return
            if self.status != 200 or not self.stream:
                self.body += chunk
                continue
            for ev in chunk.split(b"\n\n"):
                if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                    continue
                if b'"usage":{' in ev:
                    obj = json.loads(ev[6:])
                    self.tokens = obj["usage"]["completion_tokens"]
                    if not (obj.get("choices") and obj["choices"][0].get("text")):
                        continue
                elif b'"text":""' in ev:
                    continue
                self.stamps.append(now)

    def _finish(self, body: bytes | None, exc: BaseException | None) -> None:
        if self.done.done():
            return
        body = body if body is not None else self.body
        if exc is None and self.status != 200:
            exc = RuntimeError(f"HTTP {self.status}: {body[:500]!r}")
        if exc is None and not self.stream:
            self.tokens = json.loads(body)["usage"]["completion_tokens"]
        if exc is None:
            self.done.set_result(self.tokens)
        else:
            self.done.set_exception(exc)
        self.transport.close()

    def connection_lost(self, exc) -> None:
        self._finish(None, exc or ConnectionError("the server closed the connection before the response ended"))


async def post_completion(host: str, port: int, body: dict, stamps: list[float]) -> int:
    """`body` to /v1/completions; returns the completion tokens; timestamps streamed token chunks."""
    payload = json.dumps(body).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    transport, _ = await loop.create_connection(lambda: _Completion(request, bool(body.get("stream")), stamps, done),
                                                host, port)
    try:
        return await done
    finally:
        transport.close()


async def run_http(url: str, pid: int, prompts: list[list[int]], max_tokens: int, stream: bool,
                   timeout_s: float, core_pid: int | None = None) -> dict:
    """`core_pid`: the engine-core process of an --engine-process server (its CPU is read too)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body_base = {"model": "auto", "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                 "stream": stream}
    if stream:
        body_base["stream_options"] = {"include_usage": True}
    stamps: list[list[float]] = [[] for _ in prompts]
    counts = [0] * len(prompts)

    async def one(i: int, ids: list[int]) -> None:
        counts[i] = await post_completion(host, int(port), {**body_base, "prompt": ids}, stamps[i])

    k0 = cpu_of(core_pid) if core_pid else None
    s0, c0, t0 = cpu_of(pid), time.process_time(), time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))), timeout_s)
    wall, client_cpu, server = time.perf_counter() - t0, time.process_time() - c0, cpu_of(pid) - s0
    core = cpu_of(core_pid) - k0 if core_pid else None
    # A chunk carries one step's text; the demo tokenizer is byte-level, so a chunk is one token
    # unless the client fell behind and events were read back to back (then gaps are ~0, kept).
    out = {"tokens": sum(counts), "wall_s": wall, "t0": t0, "t1": t0 + wall, "cpu_s": server.total,
           "cpu_main_s": server.main, "cpu_other_s": server.other, "client_cpu_s": client_cpu,
           "itl": itls(stamps) if stream else []}
    if core is not None:
        out.update(api_cpu_s=server.total, cpu_s=server.total + core.total, core_cpu_s=core.total,
                   core_main_s=core.main, core_other_s=core.other)
        del out["cpu_other_s"]  # the engine side is the core process
    return out


# ----- the sweep --------------------------------------------------------------------------------
def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def row_of(tier: str, batch: int, path: str, m: dict, base: dict | None) -> dict:
    """`base`: the in-process row at the same tier and batch (None for that row itself)."""
    tps = m["tokens"] / m["wall_s"] if m["wall_s"] > 0 else None
    us = lambda s: 1e6 * s / m["tokens"] if m["tokens"] else None  # noqa: E731
    itl = m.get("itl") or []
    # the engine side: the in-process server's other threads (its engine worker), or the whole core
    eng = us(m["cpu_other_s"]) if "cpu_other_s" in m else us(m["core_cpu_s"]) if "core_cpu_s" in m else None
    p50 = 1e3 * pct(itl, 50) if itl else None
    return {
        "tier": tier, "batch": batch, "path": path, "tokens": m["tokens"], "tok_s": tps,
        "x_inproc": (tps / base["tok_s"]) if tps and base and base["tok_s"] else None,
        "cpu_us_tok": us(m["cpu_s"]),
        "loop_us_tok": us(m["cpu_main_s"]) if "cpu_main_s" in m else None,
        "api_us_tok": us(m["api_cpu_s"]) if "api_cpu_s" in m else None,
        "core_loop_us_tok": us(m["core_main_s"]) if "core_main_s" in m else None,
        "core_worker_us_tok": us(m["core_other_s"]) if "core_other_s" in m else None,
        "eng_us_tok": eng,
        # The engine side's host CPU per token beyond the engine's own (issue 28's <= 30 us target).
        "eng_extra_us_tok": eng - base["cpu_us_tok"] if eng is not None and base else None,
        "itl_p50_ms": p50, "itl_p99_ms": 1e3 * pct(itl, 99) if itl else None,
        "itl_p50_vs_inproc_ms": (p50 - base["itl_p50_ms"]
                                 if p50 is not None and base and base["itl_p50_ms"] is not None else None),
        "client_us_tok": us(m["client_cpu_s"]) if "client_cpu_s" in m else None,
        "wall_s": m["wall_s"],
    }


PATHS = ("in-process", "http", "http-stream", "ep-http", "ep-http-stream")


def median_of(ms: list[dict]) -> dict:
    """Per quantity, the median over a cell's repeats; inter-token gaps pooled."""
    out = {k: statistics.median(m[k] for m in ms) for k in ms[0] if k not in ("itl", "t0", "t1")}
    out["itl"] = [g for m in ms for g in m["itl"]]
    return out


def print_targets(rows: list[dict]) -> None:
    """Issue 28's targets, read off the table (reported, not asserted)."""
    by = {(r["tier"], r["batch"], r["path"]): r for r in rows}
    print("\nissue 28 targets (this run; on a shared machine, judge them over several runs):")
    for b in (16, 64):
        for path in ("http-stream", "ep-http-stream"):
            r = by.get(("small", b, path))
            if r and r["x_inproc"] is not None:
                print(f"  small batch {b}: {path} {r['x_inproc']:.2f}x in-process tokens/s (>= 0.9): "
                      f"{'met' if r['x_inproc'] >= 0.9 else 'NOT met'}")
    for r in rows:
        if r["path"] in ("http-stream", "ep-http-stream") and r["eng_extra_us_tok"] is not None:
            print(f"  {r['tier']} batch {r['batch']} {r['path']}: engine side {r['eng_extra_us_tok']:.0f} us/token beyond the "
                  f"engine's own (<= 30): {'met' if r['eng_extra_us_tok'] <= 30 else 'NOT met'}")
    for r in rows:
        if r.get("core_outside_step_us_tok") is not None and r["path"] == "ep-http-stream":
            v = r["core_outside_step_us_tok"]
            print(f"  {r['tier']} batch {r['batch']} {r['path']}: engine-core CPU outside EngineCore.step {v:.0f} us/token, "
                  f"read directly (--trace-steps; the trace's own ~10 us a step included) (<= 30): "
                  f"{'met' if v <= 30 else 'NOT met'}")
    for r in rows:
        if r["path"] in ("http-stream", "ep-http-stream") and r["batch"] == 1 and r["itl_p50_vs_inproc_ms"] is not None:
            print(f"  {r['tier']} batch 1 {r['path']}: ITL p50 {r['itl_p50_vs_inproc_ms']:+.2f} ms vs in process (<= 0.1): "
                  f"{'met' if r['itl_p50_vs_inproc_ms'] <= 0.1 else 'NOT met'}")


def print_trace(path: Path, windows: list[tuple]) -> dict[tuple, list[float]]:
    """Where the engine core's time went in each engine-process cell (--trace-steps). Returns, per
    (tier, batch, path), the core's CPU outside EngineCore.step per token of each round."""
    import step_trace

    outside: dict[tuple, list[float]] = {}
    if not path.exists():
        print(f"no step trace at {path} (did the core exit cleanly?)", file=sys.stderr)
        return outside
    events = step_trace.load(str(path))
    print(f"\nengine-core step trace ({path}):")
    for tier, b, rep, p, t0, t1, m in windows:
        s = step_trace.summarize(events, t0, t1)
        print(f"{tier} batch {b} round {rep + 1} {p}:")
        print(step_trace.format_summary(s))
        # The engine core's host CPU beyond the engine's own, measured directly: the whole process's
        # CPU in the cell less its worker's CPU inside EngineCore.step (the trace adds ~10 us a step).
        if m["tokens"]:
            beyond = 1e6 * (m["core_cpu_s"] - s["step_cpu_ms"] / 1e3) / m["tokens"]
            outside.setdefault((tier, b, p), []).append(beyond)
            print(f"  core CPU outside EngineCore.step: {beyond:.1f} us per token")
    return outside


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiers", default="small,large", help="demo tiers (default: %(default)s)")
    ap.add_argument("--batches", default="1,16,64", help="concurrent requests per cell (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default: %(default)s)")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt tokens per request (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds per batch size, the paths taking turns; medians reported (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="small tier, batch 1 and 16 only")
    ap.add_argument("--paths", default=",".join(PATHS), help="which paths (default: %(default)s)")
    ap.add_argument("--pin", action="store_true",
                    help="engine work on CPU 0, serving and this client on CPU 1, in every path (a 2-core host: "
                         "otherwise the client, the API process and the engine compete for both)")
    ap.add_argument("--trace-steps", metavar="DIR",
                    help="record the engine core's per-step timeline (SIZEWISE_TRACE_STEPS) into DIR and print "
                         "where its time went in each engine-process cell (benchmarks/step_trace.py)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per cell and for the server to start")
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/serving[-quick].json)")
    args = ap.parse_args()
    if args.quick:
        args.tiers, args.batches, args.max_tokens = "small", "1,16", 128
    tiers = [t for t in args.tiers.split(",") if t]
    paths = ["in-process", *(p for p in PATHS[1:] if p in args.paths.split(","))]
    batches = [int(b) for b in args.batches.split(",") if b]
    max_batch = max(batches)
    max_model_len = 1024
    if args.prompt_tokens + args.max_tokens > max_model_len:
        ap.error(f"--prompt-tokens + --max-tokens must be at most {max_model_len}")

    import torch

    from sizewise.engine.config import EngineConfig
    from sizewise.engine.core import EngineCore

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows, started = [], time.perf_counter()
    log_dir = REPO / "benchmarks" / "results"
    log_dir.mkdir(parents=True, exist_ok=True)

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    windows: list[tuple] = []  # ep-* cells: tier, batch, round, path, t0, t1, measurements
    for tier in tiers:
        model_dir = REPO / "models" / "demo" / tier
        progress(f"{tier}: loading in process, starting the server")
        engine = EngineCore(model_dir, EngineConfig(max_num_seqs=max(64, max_batch), max_model_len=max_model_len))
        vocab = engine.tokenizer.vocab_size if hasattr(engine.tokenizer, "vocab_size") else 256
        warm = make_prompts(2, args.prompt_tokens, vocab, seed=1)
        run_in_process(engine, warm, 8)
        servers = {}
        if {"http", "http-stream"} & set(paths):
            servers["http"] = ServerProcess(model_dir, max(64, max_batch), max_model_len, Path(tempfile.gettempdir())
                                            / f"sizewise-serving-{tier}-{os.getpid()}.log")
        if {"ep-http", "ep-http-stream"} & set(paths):
            trace = Path(args.trace_steps).resolve() / f"steps-{tier}.jsonl" if args.trace_steps else None
            if trace is not None:
                trace.parent.mkdir(parents=True, exist_ok=True)
            servers["ep"] = ServerProcess(model_dir, max(64, max_batch), max_model_len, Path(tempfile.gettempdir())
                                          / f"sizewise-serving-ep-{tier}-{os.getpid()}.log", engine_process=True,
                                          trace=trace)
        try:
            for server in servers.values():
                url = server.start(args.timeout)
                if args.pin:
                    # an engine-process server's API process is serving only (None: all of it to CPU 1)
                    pin(server.proc.pid, 0, 1, None if server.engine_process else False)
                    if server.core_pid is not None:
                        pin(server.core_pid, 0, 1, True)
                asyncio.run(run_http(url, server.proc.pid, warm, 8, True, args.timeout, server.core_pid))
            for b in batches:
                runs: dict[str, list[dict]] = {p: [] for p in paths}
                # The paths take turns, so a change in the machine's load falls on all of them.
                for rep in range(args.repeats):
                    # Fresh prompts per round: no path finds a round's prefill in its prefix cache.
                    prompts = make_prompts(b, args.prompt_tokens, vocab, seed=1000 * b + rep)
                    if args.pin:
                        os.sched_setaffinity(0, {0})  # this process is the engine now
                    runs["in-process"].append(run_in_process(engine, prompts, args.max_tokens))
                    if args.pin:
                        os.sched_setaffinity(0, {1})  # and the client from here on
                    client_yields(True)
                    for path in paths[1:]:
                        server = servers["ep" if path.startswith("ep-") else "http"]
                        runs[path].append(asyncio.run(run_http(server.url, server.proc.pid, prompts, args.max_tokens,
                                                               path.endswith("stream"), args.timeout, server.core_pid)))
                        if path.startswith("ep-"):
                            m = runs[path][-1]
                            windows.append((tier, b, rep, path, m["t0"], m["t1"], m))
                    client_yields(False)
                    progress(f"{tier} batch {b} round {rep + 1}/{args.repeats}: " + ", ".join(
                        f"{p} {runs[p][-1]['tokens'] / runs[p][-1]['wall_s']:.0f} tok/s" for p in paths))
                base = row_of(tier, b, "in-process", median_of(runs["in-process"]), None)
                rows.append(base)
                for path in paths[1:]:
                    rows.append(row_of(tier, b, path, median_of(runs[path]), base))
        finally:
            for server in servers.values():
                server.stop()
            del engine
        ep = servers.get("ep")
        if ep is not None and ep.trace is not None:
            for key, values in print_trace(ep.trace, [w for w in windows if w[0] == tier]).items():
                for r in rows:
                    if (r["tier"], r["batch"], r["path"]) == key:
                        r["core_outside_step_us_tok"] = statistics.median(values)

    cols = ["tier", "batch", "path", "tok_s", "x_inproc", "cpu_us_tok", "loop_us_tok", "eng_us_tok",
            "eng_extra_us_tok", "api_us_tok", "core_loop_us_tok", "core_worker_us_tok", "itl_p50_ms", "itl_p99_ms", "itl_p50_vs_inproc_ms", "client_us_tok", "tokens",
            "wall_s"]
    print()
    print_table(rows, cols, width=140)
    print("\ncpu_us_tok: CPU us per output token of the serving process(es) (in-process: this process);"
          "\nloop_us_tok: the (API) process's main thread (event loop: HTTP, JSON, SSE); eng_us_tok: the engine"
          "\nside: the in-process server's other threads (its engine worker), or the whole engine-core process"
          "\n(ep-*); eng_extra_us_tok: eng_us_tok minus in-process cpu_us_tok at the same batch; api_us_tok: the"
          "\nAPI process of ep-*; core_loop/core_worker_us_tok: the core's event loop and its other threads."
          "\nTimings are noisy on a shared machine: CPU per token is the steadier number.")
    print_targets(rows)
    out = Path(args.out) if args.out else log_dir / ("serving-quick.json" if args.quick else "serving.json")
    save_json(out, {"args": vars(args), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "note": "timings are noisy on a shared machine; CPU seconds per token is the steadier number",
                    "rows": rows})


if __name__ == "__main__":
    main()
