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


@pytest.mark.skipif(not (DEMO / "large" / "config.json").is_file(), reason="demo family not built")
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


@pytest.mark.skipif(not (DEMO / "small" / "config.json").is_file(), reason="demo family not built")
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


@pytest.mark.skipif(not (DEMO / "large" / "config.json").is_file(), reason="demo family not built")
def test_chat_repl_multi_turn_in_a_terminal():
    large = DEMO / "large"
    chat = Pty(*sizewise_command(), "chat", "--model", str(large), "--temperature", "0", "--max-tokens", "8",
               "--device", "cpu")
    try:
        turns = ["def add(a, b):", "and a list?"]
        chat.read_until(">>> ", 1)
        answers = []
        for i, turn in enumerate(turns):
            chat.send(turn)
            out = chat.read_until(">>> ", i + 2)
            answers.append(out.rsplit(turn + "\n", 1)[1].rsplit("\n>>> ", 1)[0])
        chat.send("/exit")
        assert chat.proc.wait(30) == 0
    finally:
        if chat.proc.poll() is None:
            chat.proc.kill()
        os.close(chat.fd)
    assert chat.out.count("sizewise chat:") == 1  # loaded once, for both turns

    tok = transformers.AutoTokenizer.from_pretrained(large)
    model = transformers.AutoModelForCausalLM.from_pretrained(large, dtype=torch.float32).eval()
    history = [{"role": "user", "content": turns[0]}]
    assert answers[0] == _greedy(model, tok, history, 8)
    history += [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": turns[1]}]
    assert answers[1] == _greedy(model, tok, history, 8)  # the second turn sees the first
