#!/usr/bin/env python3
"""Reliability benchmark: a real `sizewise serve` on loopback, pushed from outside, bounded in counts and time.

    .venv/bin/python benchmarks/reliability.py                     # every part, demo family
    .venv/bin/python benchmarks/reliability.py --parts rss --rss-requests 5000

Parts (each prints its progress, then one table row per measure; JSON in
benchmarks/results/reliability.json):
- soak: streams with a share of mid-stream disconnects; lost (neither output nor error), mixed (an
  output unequal to the same prompt's solo greedy replay, measured first in the same run), leaked
  (running/waiting gauges above 0 afterwards).
- overload: a burst of clients at once against a server with `--max-queue-delay`; 5xx other than
  the refusals, refusals that carry Retry-After, and /health latency during the burst beside the
  idle /health latency measured just before (the baseline).
- hostile: oversized and malformed inputs; each refusal's status and time beside a normal request's
  time in the same run, and the server's RSS after it.
- slow: a slow-loris header trickle, a body that never ends, idle sockets; when each was released.
- rss: RSS over a soak of short requests after a warm-up; first, last, max-min as % of the first.

Timings come from a shared, loaded machine (loopback, CPU): they are noisy; read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["def add(a, b):", "import os\nimport sys\n", "The quick brown fox", "for i in range(10):",
           "class Point:", "Return the sum of", "# Read a file", "while True:"]


# ----- the server ----------------------------------------------------------------------------------
class Server:
    def __init__(self, *flags: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SIZEWISE_API_KEYS": "",
               "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with socket.socket() as probe:  # a free port, so that the URL is known whatever the log level
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "sizewise.cli", "serve", "--port", str(port), *flags],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: collections.deque[str] = collections.deque(maxlen=500)
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server never ready:\n" + "".join(self.log))

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    def pids(self) -> list[int]:
        """The server and its descendants (the engine-core process holds the models)."""
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            for kids in Path(f"/proc/{pid}/task").glob("*/children"):
                todo += [int(k) for k in kids.read_text().split()]
        return out

    def rss_mb(self) -> float:
        """Resident memory of the server's processes together (pages shared between them, such as
        loaded libraries, count once per process: a bound above, and steady when they are)."""
        total = 0.0
        for pid in self.pids():
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except FileNotFoundError:
                continue
            total += next((int(x.split()[1]) for x in lines if x.startswith("VmRSS:")), 0) / 1024
        return total

    def gauges(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        out: dict[str, float] = {}
        for name in ("sizewise_num_requests_running", "sizewise_num_requests_waiting"):
            out[name] = sum(float(m.group(1)) for m in re.finditer(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ----- soak with disconnects -------------------------------------------------------------------------
async def soak(srv: Server, n: int, concurrency: int, cut_every: int, max_tokens: int) -> dict:
    body = lambda p: {"model": "auto", "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
        solo = {}
        for p in PROMPTS:  # the reference: each prompt alone, greedy, pinned where `auto` sends it
            r = (await c.post("/v1/completions", json=body(p))).json()
            solo[p] = (r["model"], r["choices"][0]["text"])
        sem = asyncio.Semaphore(concurrency)
        res = {"ok": 0, "error": 0, "cut": 0, "lost": 0, "mixed": 0}

        async def one(i: int) -> None:
            p = PROMPTS[i % len(PROMPTS)]
            model, want = solo[p]
            async with sem:
                text, done, err = "", False, False
                try:
                    async with c.stream("POST", "/v1/completions", json={**body(p), "model": model, "stream": True}) as r:
                        if r.status_code != 200:
                            res["error"] += 1
                            return
                        k = 0
                        async for line in r.aiter_lines():
                            if not line.startswith("data: "):
                                continue
                            if line == "data: [DONE]":
                                done = True
                                break
                            ev = json.loads(line[6:])
                            if "error" in ev:
                                err = True
                                continue
                            k += 1
                            text += "".join(ch["text"] for ch in ev.get("choices", []))
                            if cut_every and i % cut_every == 0 and k == 3:
                                res["cut"] += 1
                                return  # leaving the block closes the connection mid-stream
                except httpx.HTTPError:
                    res["lost"] += 1
                    return
                if err:
                    res["error"] += 1
                elif not done:
                    res["lost"] += 1
                elif text != want:
                    res["mixed"] += 1
                else:
                    res["ok"] += 1
            if (i + 1) % max(1, n // 10) == 0:
                progress(f"soak {i + 1}/{n}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        res["seconds"] = time.perf_counter() - t0
    await asyncio.sleep(1.0)  # aborts are applied at the engines' next steps
    g = srv.gauges()
    res["leaked"] = int(g["sizewise_num_requests_running"] + g["sizewise_num_requests_waiting"])
    res["requests"] = n
    return res


# ----- overload --------------------------------------------------------------------------------------
def _poll_health(url: str, stop, out) -> None:
    """In its own process: /health latencies, measured away from the burst's client event loop."""
    lat = []
    with httpx.Client(base_url=url, timeout=60) as h:
        while not stop.is_set():
            t = time.perf_counter()
            h.get("/health")
            lat.append(time.perf_counter() - t)
            time.sleep(0.05)
    out.put(lat)


async def overload(srv: Server, clients: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=srv.url, timeout=300, limits=httpx.Limits(max_connections=clients + 8)) as c:
        idle = []
        for _ in range(40):
            t = time.perf_counter()
            await c.get("/health")
            idle.append(time.perf_counter() - t)
        statuses: list[int] = []
        retry_after: list[bool] = []
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        stop, out = ctx.Event(), ctx.Queue()
        poller = ctx.Process(target=_poll_health, args=(srv.url, stop, out), daemon=True)
        poller.start()
        await asyncio.sleep(2.0)  # the poller is up (a spawned interpreter) before the burst

        async def one(i: int) -> None:
            try:
                r = await c.post("/v1/completions", json={"model": "auto", "prompt": PROMPTS[i % len(PROMPTS)],
                                                          "max_tokens": max_tokens, "ignore_eos": True})
                statuses.append(r.status_code)
                retry_after.append("retry-after" in r.headers)
            except httpx.HTTPError:
                statuses.append(-1)
                retry_after.append(False)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(clients)))
        seconds = time.perf_counter() - t0
        stop.set()
        health = out.get(timeout=60)
        poller.join(30)
    refused = [s for s in statuses if s in (429, 503)]
    return {
        "clients": clients, "max_tokens": max_tokens, "seconds": seconds,
        "ok": statuses.count(200), "refused": len(refused),
        "refused_with_retry_after": sum(1 for s, ra in zip(statuses, retry_after) if s in (429, 503) and ra),
        "other_5xx": sum(1 for s in statuses if s >= 500 and s != 503), "transport_errors": statuses.count(-1),
        "health_idle_p99_ms": 1e3 * pct(idle, 0.99), "health_burst_p50_ms": 1e3 * pct(health, 0.5),
        "health_burst_p99_ms": 1e3 * pct(health, 0.99), "health_burst_samples": len(health),
    }


# ----- hostile inputs ----------------------------------------------------------------------------------
def hostile(srv: Server) -> list[dict]:
    big = lambda chars: json.dumps({"prompt": "y " * (chars // 2), "max_tokens": 16}).encode()
    cases = [
        ("normal request (baseline)", "/v1/completions", json.dumps({"prompt": "def add(a, b):", "max_tokens": 8}).encode()),
        ("50 MB prompt", "/v1/completions", big(50_000_000)),
        ("4 MiB prompt", "/v1/completions", big(4 << 20)),
        ("10 MB chat message", "/v1/chat/completions",
         json.dumps({"messages": [{"role": "user", "content": "y " * 5_000_000}], "max_tokens": 4}).encode()),
        ("10 MB /tokenize", "/tokenize", json.dumps({"prompt": "y " * 5_000_000}).encode()),
        ("10 MB /generate", "/generate", json.dumps({"prompt": "y " * 5_000_000}).encode()),
        ("2,000 stop strings", "/v1/completions", json.dumps({"prompt": "a", "stop": ["x"] * 2000}).encode()),
        ("n=1000", "/v1/completions", json.dumps({"prompt": "a", "n": 1000}).encode()),
        ("max_tokens=10^9", "/v1/completions", json.dumps({"prompt": "a", "max_tokens": 10**9}).encode()),
        ("malformed JSON", "/v1/completions", b'{"prompt": "a", '),
        ("70 MB body", "/v1/completions", b"{" + b" " * (70 << 20) + b"}"),
    ]
    rows = []
    with httpx.Client(base_url=srv.url, timeout=300) as c:
        for name, path, body in cases:
            t = time.perf_counter()
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            dt = time.perf_counter() - t
            time.sleep(0.5)
            rows.append({"input": name, "status": r.status_code, "seconds": dt, "rss_mb_after": srv.rss_mb(),
                         "message": (r.json().get("error", {}).get("message", "") if r.status_code >= 400 else "")[:120]})
            progress(f"hostile {name}: {r.status_code} in {dt:.3f} s, RSS {rows[-1]['rss_mb_after']:.0f} MB")
        # three concurrent 10 MB prompts
        with httpx.Client(base_url=srv.url, timeout=300) as c2, httpx.Client(base_url=srv.url, timeout=300) as c3:
            import concurrent.futures

            t = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                futs = [pool.submit(x.post, "/v1/completions", content=big(10_000_000),
                                    headers={"content-type": "application/json"}) for x in (c, c2, c3)]
                codes = [f.result().status_code for f in futs]
            dt = time.perf_counter() - t
        time.sleep(0.5)
        rows.append({"input": "3 concurrent 10 MB prompts", "status": codes[0] if len(set(codes)) == 1 else codes,
                     "seconds": dt, "rss_mb_after": srv.rss_mb(), "message": ""})
    return rows


# ----- slow and idle connections -------------------------------------------------------------------
def slow(srv: Server, idle_sockets: int) -> list[dict]:
    host, port = srv.host_port
    rows = []

    def until_closed(s: socket.socket, t0: float, trickle: bytes | None, patience: float = 90.0) -> tuple[float, bytes]:
        s.settimeout(0.5)
        got = b""
        while time.perf_counter() - t0 < patience:
            try:
                if trickle:
                    s.sendall(trickle)
                chunk = s.recv(65536)
                if not chunk:
                    return time.perf_counter() - t0, got
                got += chunk
            except TimeoutError:
                continue
            except OSError:
                return time.perf_counter() - t0, got
        return float("inf"), got

    s = socket.create_connection((host, port))
    t0 = time.perf_counter()
    s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
    dt, got = until_closed(s, t0, b"y")
    rows.append({"case": "header trickle, 1 byte / 0.5 s", "released_after_s": dt, "answer": got[:12].decode(errors="replace")})
    progress(f"slow: header trickle released after {dt:.1f} s")
    s = socket.create_connection((host, port))
    t0 = time.perf_counter()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100000\r\n\r\n{\"prompt\": ")
    dt, got = until_closed(s, t0, None)
    rows.append({"case": "body that never ends", "released_after_s": dt, "answer": got[:12].decode(errors="replace")})
    progress(f"slow: unfinished body released after {dt:.1f} s")
    socks = [socket.create_connection((host, port)) for _ in range(idle_sockets)]
    t0 = time.perf_counter()
    times = []
    for s in socks:
        dt, _ = until_closed(s, t0, None)
        times.append(dt)
        s.close()
    rows.append({"case": f"{idle_sockets} idle sockets (nothing sent)", "released_after_s": max(times), "answer": ""})
    progress(f"slow: {idle_sockets} idle sockets all released after {max(times):.1f} s")
    s = socket.create_connection((host, port))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    t0 = time.perf_counter()
    dt, got = until_closed(s, t0, None)
    rows.append({"case": "kept alive after a response", "released_after_s": dt, "answer": got[:12].decode(errors="replace")})
    return rows


# ----- RSS over a soak -----------------------------------------------------------------------------
async def rss_soak(srv: Server, n: int, warmup: int, concurrency: int) -> dict:
    samples: list[tuple[int, float]] = []
    async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
        sem = asyncio.Semaphore(concurrency)
        done = 0

        async def one(i: int) -> None:
            nonlocal done
            async with sem:
                r = await c.post("/v1/completions", json={"model": "auto", "prompt": PROMPTS[i % len(PROMPTS)] * (1 + i % 5),
                                                          "max_tokens": 4 + i % 13, "stream": i % 2 == 0})
                r.raise_for_status()
            done += 1
            if done % 250 == 0:
                samples.append((done, srv.rss_mb()))
                if done % 1000 == 0:
                    progress(f"rss soak {done}/{warmup + n}: {samples[-1][1]:.0f} MB")

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(warmup + n)))
        seconds = time.perf_counter() - t0
    after = [(k, v) for k, v in samples if k >= warmup]
    first, last = after[0][1], after[-1][1]
    vals = [v for _, v in after]
    return {"warmup": warmup, "requests": n, "seconds": seconds, "rss_first_mb": first, "rss_last_mb": last,
            "rss_change_pct": 100 * (last - first) / first, "rss_spread_pct": 100 * (max(vals) - min(vals)) / first,
            "mb_per_1000_requests": 1000 * (last - first) / max(1, after[-1][0] - after[0][0]), "samples": samples}


# ----- main ------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="soak,overload,hostile,slow,rss")
    ap.add_argument("--soak-requests", type=int, default=400)
    ap.add_argument("--burst", type=int, default=256)
    ap.add_argument("--idle-sockets", type=int, default=200)
    ap.add_argument("--rss-requests", type=int, default=5000)
    ap.add_argument("--rss-warmup", type=int, default=500)
    ap.add_argument("--server-log-level", default="warning", help="the servers' --log-level (info adds the access log)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability.json"))
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    result: dict = {"note": "loopback, shared loaded CPU machine: timings are noisy", "parts": sorted(parts),
                    "server_log_level": args.server_log_level}
    srv = Server("--max-queue-delay", "2", "--log-level", args.server_log_level) if parts & {"soak", "overload", "hostile", "rss"} else None
    try:
        if srv is not None:
            result["rss_ready_mb"] = srv.rss_mb()
        if "soak" in parts:
            progress(f"soak: {args.soak_requests} streams, 1 in 10 cut after 3 chunks")
            result["soak"] = asyncio.run(soak(srv, args.soak_requests, 16, 10, 24))
        if "overload" in parts:
            progress(f"overload: {args.burst} clients at once, --max-queue-delay 2")
            result["overload"] = asyncio.run(overload(srv, args.burst, 128))
        if "hostile" in parts:
            result["hostile"] = hostile(srv)
        if "rss" in parts:
            progress(f"rss: {args.rss_warmup} warm-up + {args.rss_requests} requests")
            result["rss"] = asyncio.run(rss_soak(srv, args.rss_requests, args.rss_warmup, 8))
    finally:
        if srv is not None:
            srv.stop()
    if "slow" in parts:
        slow_srv = Server("--read-timeout", "5", "--keep-alive-timeout", "5", "--log-level", args.server_log_level)
        try:
            result["slow"] = slow(slow_srv, args.idle_sockets)
        finally:
            slow_srv.stop()
    report(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(f"\nJSON: {args.out}")
    return 0


def report(r: dict) -> None:
    print(f"\nreliability ({r['note']})")
    if "soak" in r:
        s = r["soak"]
        print(f"\nsoak: {s['requests']} streams in {s['seconds']:.0f} s: ok {s['ok']}, cut {s['cut']}, errors {s['error']}, "
              f"lost {s['lost']}, mixed {s['mixed']}, leaked {s['leaked']}")
    if "overload" in r:
        o = r["overload"]
        print(f"\noverload: {o['clients']} clients x {o['max_tokens']} tokens in {o['seconds']:.0f} s: ok {o['ok']}, "
              f"refused {o['refused']} ({o['refused_with_retry_after']} with Retry-After), other 5xx {o['other_5xx']}, "
              f"transport errors {o['transport_errors']}")
        print(f"  /health p99: idle {o['health_idle_p99_ms']:.1f} ms, burst {o['health_burst_p99_ms']:.1f} ms "
              f"(p50 {o['health_burst_p50_ms']:.1f} ms, {o['health_burst_samples']} samples; "
              f"ratio {o['health_burst_p99_ms'] / max(1e-9, o['health_idle_p99_ms']):.1f}x)")
    if "hostile" in r:
        base = r["hostile"][0]["seconds"]
        print(f"\n{'hostile input':30s} {'status':>7s} {'seconds':>8s} {'x normal':>9s} {'RSS after MB':>13s}")
        for h in r["hostile"]:
            print(f"{h['input']:30s} {str(h['status']):>7s} {h['seconds']:8.3f} {h['seconds'] / base:9.1f} "
                  f"{h['rss_mb_after']:13.0f}")
    if "slow" in r:
        print(f"\n{'connection':40s} {'released after s':>17s}  answer")
        for s in r["slow"]:
            print(f"{s['case']:40s} {s['released_after_s']:17.1f}  {s['answer']}")
    if "rss" in r:
        m = r["rss"]
        print(f"\nRSS soak: {m['requests']} requests after {m['warmup']} warm-up ({m['seconds']:.0f} s): "
              f"{m['rss_first_mb']:.0f} -> {m['rss_last_mb']:.0f} MB ({m['rss_change_pct']:+.1f}%, spread "
              f"{m['rss_spread_pct']:.1f}%, {m['mb_per_1000_requests']:+.1f} MB per 1000 requests)")


if __name__ == "__main__":
    sys.exit(main())
