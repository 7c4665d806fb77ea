"""Shared fixtures: tiny random-initialised checkpoints of every supported family, built with
transformers in a temp dir (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and OpenMP spin-waits collapse when the
# test process shares 2 cores with a server thread (or anything else): one thread is faster.
torch.set_num_threads(1)

FAMILY_CONFIGS = {
    "llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=320, max_position_embeddings=512,
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "llama_tied_linear": dict(
        model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=320, max_position_embeddings=512,
        tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=320, max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=320,
        max_position_embeddings=512, tie_word_embeddings=False,
    ),
    "mistral": dict(
        model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, vocab_size=320, max_position_embeddings=512,
        sliding_window=4096, tie_word_embeddings=False,
    ),
}


_TOKENIZERS: dict[int, object] = {}  # vocab size -> the one tokenizer every tiny checkpoint shares


def _byte_tokenizer(path: Path, vocab_size: int) -> None:
    """A tiny byte-level BPE tokenizer (trained on a few lines) saved with the checkpoint. Trained
    once per vocabulary size: BPE training breaks ties in no fixed order, and the checkpoints of
    one deployment must share one tokenizer (the deployment refuses mixed ones)."""
    if vocab_size in _TOKENIZERS:
        _TOKENIZERS[vocab_size].save_pretrained(path)
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 8, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    text = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. " * 4,
            "for i in range(10):\n    print(i)\n", "import os\nimport sys\n"]
    tok.train_from_iterator(text * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    fast.chat_template = (
        "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>{% endfor %}"
        "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
    )
    _TOKENIZERS[vocab_size] = fast
    fast.save_pretrained(path)


@torch.no_grad()
def peaked_init(model, bias_std: float = 0.02) -> None:
    """Random init is near-uniform; scale weights up so logits are peaked and greedy is stable."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.08)
        elif "norm" in name:
            p.uniform_(0.8, 1.2)
        else:
            p.normal_(0.0, bias_std)


def build_checkpoint(path: Path, family: str, seed: int = 0, dtype=torch.float32):
    import transformers

    kw = dict(FAMILY_CONFIGS[family])
    model_type = kw.pop("model_type")
    cfg_cls = transformers.AutoConfig.for_model(model_type).__class__
    cfg = cfg_cls(**kw, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    peaked_init(model)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    _byte_tokenizer(path, kw["vocab_size"])
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "bos_token_id": 0}))
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for fam in FAMILY_CONFIGS:
        build_checkpoint(root / fam, fam)
        out[fam] = root / fam
    return out


@pytest.fixture(scope="session")
def llama_dir(checkpoints) -> Path:
    return checkpoints["llama"]


# Clients of a module's `server` fixture (the URL of a running sizewise server).
@pytest.fixture(scope="module")
def http(server):
    import httpx

    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def one_thread():
    # On a small shared box torch's intra-op pool spins against the other processes: a decode
    # step of these tiny models is ~20x faster with one thread. Restored after the module.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def sizewise_command() -> list[str]:
    """The installed `sizewise` console script (or the module, where it is not installed)."""
    exe = Path(sys.executable).with_name("sizewise")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "sizewise.cli"]


class Serve:
    """`sizewise serve ...` as a subprocess; its log is collected, its URL read from the log."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SIZEWISE_API_KEYS": ""}
        self.proc = subprocess.Popen([*sizewise_command(), "serve", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._url: list[str] = []
        self._seen = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m and not self._url:
                self._url.append(m.group(1))
                self._seen.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120) -> str:
        assert self._seen.wait(timeout), "no 'listening on' line:\n" + self.log
        url = self._url[0]
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, "server exited:\n" + self.log
            assert time.monotonic() < deadline, "never ready:\n" + self.log
            try:
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)


# ----- tests that could not run: said loudly at the end of the run ---------------------------------
# Only a missing system binary that a non-root run cannot install may skip a test; the summary names
# those tests and the one command that makes them run.
NEEDS_PROMETHEUS = "needs Prometheus"
NOT_RUN_FIXES = {NEEDS_PROMETHEUS: "sudo sh scripts/ensure_prometheus.sh   (Debian's prometheus package; or put "
                                   "Prometheus 2.x's prometheus and promtool on PATH), then make test"}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    config._sizewise_not_run = []
    for tag, fix in NOT_RUN_FIXES.items():
        ids = [r.nodeid for r in terminalreporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple) and tag in str(r.longrepr[2])]
        if not ids:
            continue
        terminalreporter.section(f"NOT RUN: {len(ids)} test(s) {tag}", sep="!", red=True, bold=True)
        for nodeid in ids:
            terminalreporter.write_line(f"  {nodeid}")
        terminalreporter.write_line(f"To run them: {fix}", red=True, bold=True)
        config._sizewise_not_run.append(f"{len(ids)} test(s) NOT RUN ({tag}): {fix}")


def pytest_unconfigure(config):
    """Repeated after pytest's last line ("N passed, M skipped"), where a reader looks."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    for line in getattr(config, "_sizewise_not_run", []):
        if reporter is not None:
            reporter.write_line(line, red=True, bold=True)


@contextmanager
def demo_deployment(max_num_seqs: int = 8, max_model_len: int = 256):
    """The demo family (configs/demo.yaml) on a 5% memory budget with one torch thread: the
    deployment behind a test module's server."""
    from sizewise.orchestrator.deployment import Deployment, DeploymentConfig

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = DeploymentConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    cfg = cfg.model_copy(update={"memory_fraction": 0.05, "engine": cfg.engine.model_copy(
        update={"max_num_seqs": max_num_seqs, "max_model_len": max_model_len})})
    dep = Deployment.load(cfg, echo_plan=False)
    try:
        yield dep
    finally:
        dep.shutdown()
        torch.set_num_threads(prev)
