"""`sizewise serve` as a real subprocess (the installed console script), and the CLI's errors and
`generate` in-process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import httpx
import torch
import transformers

from conftest import sizewise_command
from sizewise.cli import main

PROMPT = "def add(a, b):"


def test_serve_subprocess_two_models_with_api_key(checkpoints):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SIZEWISE_API_KEYS": ""}
    cmd = [*sizewise_command(), "serve", "--model", str(checkpoints["llama"]), "--model",
           str(checkpoints["llama_tied_linear"]), "--port", "0", "--device", "cpu", "--api-key", "sekrit", "--metrics-auth"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    url_seen = threading.Event()
    url: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m and not url:
                url.append(m.group(1))
                url_seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert url_seen.wait(120), "no 'listening on' line:\n" + "".join(lines)
        base = url[0]
        assert not base.endswith(":0")  # the real port, not the requested 0
        with httpx.Client(base_url=base, timeout=30) as h:
            assert h.get("/health").status_code == 200  # served while (or after) the models load
            deadline = time.monotonic() + 120
            while h.get("/ready").status_code != 200:
                assert proc.poll() is None, "server exited:\n" + "".join(lines)
                assert time.monotonic() < deadline, "never ready:\n" + "".join(lines)
                time.sleep(0.1)
            assert h.post("/v1/completions", json={"prompt": PROMPT}).status_code == 401
            r = h.post("/v1/completions", json={"model": "small", "prompt": PROMPT, "max_tokens": 3},
                       headers={"Authorization": "Bearer sekrit"})
            assert r.status_code == 200 and r.json()["sizewise"]["tier"] == "small"
            models = {m["id"] for m in h.get("/v1/models", headers={"Authorization": "Bearer sekrit"}).json()["data"]}
            assert models == {"llama", "llama_tied_linear", "small", "large", "auto"}
            assert h.get("/metrics").status_code == 401  # --metrics-auth
            assert h.get("/metrics", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(10)
    log = "".join(lines)
    # startup log: which models, on which device, how much KV cache, and the URL
    for name in ("llama (small)", "llama_tied_linear (large)"):
        assert re.search(re.escape(name) + r".* on cpu .*KV cache [\d.]+ MiB", log), log
    assert f"{base}/v1" in log


def test_serve_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err

    cfg = tmp_path / "deploy.yaml"
    cfg.write_text("models:\n  - {name: m, tier: large, path: ./no-model-here}\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "no-model-here" in err and "Traceback" not in err

    cfg.write_text("models: []\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    assert "models" in capsys.readouterr().err

    assert main(["serve", "--model", str(tmp_path)]) == 2  # a directory without config.json
    assert str(tmp_path) in capsys.readouterr().err


def test_serve_on_a_busy_port_fails_fast(checkpoints, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(checkpoints["llama"]), "--port", str(port), "--device", "cpu"]) == 2
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


@torch.no_grad()
def test_generate_prints_the_greedy_completion(checkpoints, capsys):
    path = checkpoints["llama"]
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = tok.encode(PROMPT)
    gen = []
    for _ in range(5):
        nxt = int(model(torch.tensor([ids + gen])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        gen.append(nxt)
    assert main(["generate", "--model", str(path), PROMPT, "--max-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == tok.decode(gen) + "\n"
