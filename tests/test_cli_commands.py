"""The `sizewise` command as a vLLM / Ollama user drives it, end to end on the demo family: serve's
engine flags, `models`, `chat` through a pseudo-terminal, `--version` and help that names defaults."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import transformers

from conftest import Serve, sizewise_command
from sizewise.cli import _parser, main
from sizewise.orchestrator.deployment import DeploymentConfig, EngineSection, ServerSection

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")  # readline's terminal control sequences


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"sizewise {importlib.metadata.version('sizewise')}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["serve", "models", "generate", "chat", "calibrate"])
def test_every_option_says_its_default(command):
    for a in _subcommands()[command]._actions:
        if a.option_strings and a.dest != "help" and not a.required:
            assert "default" in (a.help or ""), f"{command} {a.option_strings[0]}: {a.help!r}"


def test_help_defaults_are_the_deployment_defaults(capsys):
    helps = {a.dest: a.help for a in _subcommands()["serve"]._actions}
    fields = DeploymentConfig.model_fields
    assert f"memory_fraction, {fields['memory_fraction'].default})" in helps["memory_fraction"]
    assert f"max_num_seqs, {EngineSection.model_fields['max_num_seqs'].default})" in helps["max_num_seqs"]
    assert f"port, {ServerSection.model_fields['port'].default})" in helps["port"]
    assert f"host, {ServerSection.model_fields['host'].default})" in helps["host"]
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "most tokens to generate (per answer in a chat; default: 64)" in out
    assert "0 = greedy (default: 0.0)" in out


def test_serve_engine_flags_end_to_end():
    server = Serve("--model", str(DEMO / "small"), "--model", str(DEMO / "large"),
                   "--served-model-name", "tiny", "--served-model-name", "big", "--max-model-len", "128",
                   "--max-num-seqs", "2", "--dtype", "float32", "--memory-fraction", "0.3",
                   "--port", "0", "--device", "cpu")
    try:
        url = server.wait_ready()
        with httpx.Client(base_url=url, timeout=60) as h:
            assert {m["id"] for m in h.get("/v1/models").json()["data"]} == {"tiny", "big", "small", "large", "auto"}
            ok = h.post("/v1/completions", json={"model": "big", "prompt": "import os\n", "max_tokens": 4})
            assert ok.status_code == 200 and ok.json()["sizewise"]["model"] == "big"
            long = h.post("/v1/completions", json={"model": "tiny", "prompt": "x = 1\n" * 100, "max_tokens": 4})
            assert long.status_code == 400 and "128" in long.json()["error"]["message"]
    finally:
        server.stop()
    # 2 sequences x ceil(128 / 16) blocks: all the KV cache either model can use
    for name, tier in (("tiny", "small"), ("big", "large")):
        assert re.search(rf"{name} \({tier}\): llama .* \(float32\), KV cache [\d.]+ MiB = 16 blocks x 16 tokens, "
                         rf"max_model_len 128", server.log), server.log
    assert "= 0.3 x" in server.log  # the memory plan's budget


def test_models_lists_what_would_be_served(capsys, monkeypatch):
    monkeypatch.chdir(DEMO.parents[1])
    assert main(["models"]) == 0  # the default deployment: configs/demo.yaml
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:4]]
    assert [(r[0], r[1], r[4]) for r in rows] == [("demo-small", "small", "1024"), ("demo-medium", "medium", "1024"),
                                                  ("demo-large", "large", "1024")]

    assert main(["models", "--model", str(DEMO / "small"), "--served-model-name", "s", "--dtype", "bfloat16",
                 "--max-model-len", "256", "--max-num-seqs", "8", "--kv-cache-bytes", "1MiB"]) == 0
    name, tier, params, dtype, context, kv_tokens, path = capsys.readouterr().out.splitlines()[1].split()
    cfg = transformers.AutoConfig.from_pretrained(DEMO / "small")
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2  # K and V, bfloat16
    assert (name, tier, dtype, context, path) == ("s", "large", "bfloat16", "256", str(DEMO / "small"))
    assert params == f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"
    assert int(kv_tokens) == 2**20 // (per_token * 16) * 16  # whole 16-token blocks in 1 MiB

    assert main(["models", "--model", str(DEMO / "small"), "--kv-cache-bytes", "1KiB"]) == 2
    assert "--kv-cache-bytes" in capsys.readouterr().err


class Pty:
    """A command on a pseudo-terminal, as a person at a terminal runs it."""

    def __init__(self, *args: str) -> None:
        self.fd, child = pty.openpty()
        self.proc = subprocess.Popen(args, stdin=child, stdout=child, stderr=child, close_fds=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        os.close(child)
        self.out = ""

    def read_until(self, text: str, count: int, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while self.out.count(text) < count:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.out
            if select.select([self.fd], [], [], 0.2)[0]:
                self.out += ANSI.sub("", os.read(self.fd, 4096).decode(errors="replace")).replace("\r\n", "\n")
        return self.out

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def __enter__(self) -> "Pty":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.fd)


@torch.no_grad()
def _greedy(model, tok, messages, n: int) -> str:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(ids, add_special_tokens=False)
    gen = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids + gen])).logits[0, -1].argmax())
        if nxt in (1, 4):  # generation_config.json's eos_token_id
            break
        gen.append(nxt)
    return tok.decode(gen, skip_special_tokens=True)


def test_chat_repl_multi_turn_in_a_terminal():
    large = DEMO / "large"
    with Pty(*sizewise_command(), "chat", "--model", str(large), "--temperature", "0", "--max-tokens", "8",
             "--device", "cpu") as chat:
        turns = ["def add(a, b):", "and a list?"]
        chat.read_until(">>> ", 1)
        answers = []
        for i, turn in enumerate(turns):
            chat.send(turn)
            out = chat.read_until(">>> ", i + 2)
            answers.append(out.rsplit(turn + "\n", 1)[1].rsplit("\n>>> ", 1)[0])
        chat.send("/exit")
        assert chat.proc.wait(30) == 0
    assert chat.out.count("sizewise chat:") == 1  # loaded once, for both turns

    tok = transformers.AutoTokenizer.from_pretrained(large)
    model = transformers.AutoModelForCausalLM.from_pretrained(large, dtype=torch.float32).eval()
    history = [{"role": "user", "content": turns[0]}]
    assert answers[0] == _greedy(model, tok, history, 8)
    history += [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": turns[1]}]
    assert answers[1] == _greedy(model, tok, history, 8)  # the second turn sees the first


def test_help_and_chat_client_do_not_import_torch():
    """`sizewise --help` and the `chat --url` client start without torch (it loads in seconds)."""
    code = ("import sys\nfrom sizewise.cli import main\nimport sizewise.remote_chat\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "usage: sizewise" in out and out.rstrip().endswith("NO-TORCH")
    # ... and the package's public names still load on first use
    out = subprocess.run([sys.executable, "-c", "import sizewise; print(sizewise.SamplingParams.__module__)"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "sizewise.sampling_params"


def test_one_model_rule_for_every_command(capsys, tmp_path, monkeypatch):
    """A tier name means the demo family's tier, a directory itself, in `generate`, `models` and
    `serve` alike (positional, as `vllm serve MODEL`, or --model)."""
    monkeypatch.chdir(tmp_path)  # found through the repository root, not the current directory
    argv = ["--max-tokens", "6", "--device", "cpu", "import os\n"]
    assert main(["generate", "--model", "small", *argv]) == 0
    by_tier = capsys.readouterr().out
    assert main(["generate", "--model", str(DEMO / "small"), *argv]) == 0
    assert capsys.readouterr().out == by_tier
    assert main(["generate", *argv]) == 0  # no --model: the demo family's large tier
    default = capsys.readouterr().out
    assert main(["generate", "--model", str(DEMO / "large"), *argv]) == 0
    assert capsys.readouterr().out == default

    assert main(["models", "small", str(DEMO / "large")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:3]]
    assert [(r[0], r[1], r[-1]) for r in rows] == [("small", "small", str(DEMO / "small")),
                                                   ("large", "large", str(DEMO / "large"))]
    assert main(["models", "small", "--model", "large"]) == 2
    assert "either positionally or with --model" in capsys.readouterr().err
    assert main(["generate", "--model", "huge", "x"]) == 2
    assert "'huge' is not a directory" in capsys.readouterr().err


def test_serve_takes_models_positionally():
    server = Serve(str(DEMO / "small"), "large", "--port", "0", "--device", "cpu", "--max-model-len", "128")
    try:
        url = server.wait_ready()
        models = {m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]}
        assert models == {"small", "large", "auto"}
    finally:
        server.stop()


def test_chat_url_routes_each_answer_and_says_why():
    """`sizewise chat --url` against the demo deployment (adaptive router): each answer is followed
    by one line naming the model and tier that answered and the server's one-sentence reason."""
    import openai

    server = Serve("--port", "0", "--device", "cpu")
    try:
        url = server.wait_ready()
        with Pty(*sizewise_command(), "chat", "--url", url, "--temperature", "0", "--max-tokens", "8") as chat:
            chat.read_until(">>> ", 1)
            chat.send("def add(a, b):")
            out = chat.read_until(">>> ", 2)
            chat.send("/exit")
            assert chat.proc.wait(30) == 0
        answer, line = out.rsplit("def add(a, b):\n", 1)[1].rsplit("\n>>> ", 1)[0].rsplit("\n", 1)

        # The line names the model that answered (the router's choice follows the live load): pinned to that
        # model, the official client gets the same greedy answer; the reason is the server's own sentence.
        m = re.fullmatch(r"\[(\S+) \((small|medium|large), (plain|pld|draft)\): \2 tier: (.+)\]", line)
        assert m, line
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        ref = client.chat.completions.create(model=m[1], messages=[{"role": "user", "content": "def add(a, b):"}],
                                             max_tokens=8, temperature=0)
        assert answer == ref.choices[0].message.content
        assert re.search(r"\(predicted \d+ ms against the \d+ ms objective\); (no quality cost \(the top tier\)|"
                         r"quality cost: perplexity \+\d+% against large)\.$", m[4]), line
        auto = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert auto.sizewise["summary"].startswith(f"{auto.sizewise['tier']} tier: ")

        # `draft` on the smallest tier: it is the draft model; the answer says which tiers to ask.
        r = httpx.post(url + "/v1/completions", json={"model": "small", "prompt": "x", "max_tokens": 2,
                                                      "sizewise": {"strategy": "draft"}}, timeout=60)
        assert r.status_code == 400, r.text
        assert "the draft model" in r.json()["error"]["message"] and "medium or large" in r.json()["error"]["message"]

        bad = subprocess.run([*sizewise_command(), "chat", "--url", url, "--model", "nope"], capture_output=True,
                             text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert bad.returncode == 2 and "'nope' is not served" in bad.stderr
    finally:
        server.stop()
    down = subprocess.run([*sizewise_command(), "chat", "--url", url], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert down.returncode == 2 and "cannot reach" in down.stderr
