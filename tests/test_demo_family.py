"""The built-in demo family (models/demo): loads in plain transformers, quality grows with
size on held-out stdlib text, and the shared tokenizer round-trips any string exactly."""

from __future__ import annotations

import json
import math
import platform
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest
import torch

try:
    from sizewise import demo
except ImportError:  # checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from sizewise import demo

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

TIERS = demo.TIERS
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


@lru_cache(maxsize=None)
def tokenizer(tier: str = "small"):
    return AutoTokenizer.from_pretrained(str(demo.demo_model_path(tier)))


@lru_cache(maxsize=None)
def model(tier: str):
    return AutoModelForCausalLM.from_pretrained(str(demo.demo_model_path(tier)), dtype=torch.float32).eval()


@torch.no_grad()
def nll_per_token(tier: str, text: str, window: int = 256) -> tuple[float, int]:
    """Mean NLL per token of `text` after an <|eos|> separator (as documents start in training),
    in consecutive windows of the training sequence length."""
    tok = tokenizer(tier)
    ids = torch.tensor([tok.convert_tokens_to_ids("<|eos|>")] + tok.encode(text, add_special_tokens=False))
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        x = ids[start:start + window + 1]
        logits = model(tier)(input_ids=x[None, :-1]).logits[0].float()
        total += float(torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum"))
        count += len(x) - 1
    return total / count, count


# --------------------------------------------------------------------------------------
# files and loading
# --------------------------------------------------------------------------------------


def test_family_files_are_small_and_complete():
    total = 0
    for tier in TIERS:
        d = demo.demo_model_path(tier)
        for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "training_config.json"):
            assert (d / name).is_file(), f"{d / name} missing"
        total += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["model_type"] == "llama"
        assert cfg["architectures"] == ["LlamaForCausalLM"]
        assert cfg["tie_word_embeddings"] is True
        assert cfg["max_position_embeddings"] == 1024
        assert cfg.get("dtype", cfg.get("torch_dtype")) in ("bfloat16", "float16")
    assert total <= 40 * 2**20, f"demo family is {total / 2**20:.1f} MiB"
    # one tokenizer for the whole family
    blobs = {(demo.demo_model_path(t) / "tokenizer.json").read_bytes() for t in TIERS}
    assert len(blobs) == 1


def test_sizes_grow_with_tier():
    params = [sum(p.numel() for p in model(t).parameters()) for t in TIERS]
    assert params[0] < params[1] < params[2]
    assert 0.5e6 < params[0] < 2e6 and 2.5e6 < params[1] < 7e6 and 8e6 < params[2] < 16e6, params
    for t in TIERS:  # weights are stored in half precision
        from safetensors import safe_open

        with safe_open(str(demo.demo_model_path(t) / "model.safetensors"), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes <= {"BF16", "F16"}, dtypes


@pytest.mark.parametrize("tier", TIERS)
def test_tier_greedy_completes_code_and_prose(tier):
    tok = tokenizer(tier)
    m = model(tier)
    eos, im_end = tok.convert_tokens_to_ids("<|eos|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert set(m.generation_config.eos_token_id) == {eos, im_end}
    for prompt in ("def add(a, b):\n    return", "The for statement is used to"):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = m.generate(ids, max_new_tokens=16, do_sample=False)
        new = out[0, ids.shape[1]:].tolist()
        assert len(new) > 0
        assert not set(new) & {tok.convert_tokens_to_ids(s) for s in ("<|bos|>", "<|pad|>", "<|im_start|>")}
        text = tok.decode(new, skip_special_tokens=True)
        assert isinstance(text, str) and text.strip(), (tier, prompt, text)
        # greedy is deterministic
        with torch.no_grad():
            again = m.generate(ids, max_new_tokens=16, do_sample=False)
        assert again.tolist() == out.tolist()


@pytest.mark.parametrize("tier", TIERS)
def test_tier_greedy_in_sizewise_engine_matches_transformers(tier):
    from sizewise import LLM, SamplingParams

    tok = tokenizer(tier)
    llm = LLM(demo.demo_model_path(tier), device="cpu", dtype="float32", kv_cache_bytes=8 << 20)
    prompts = ["def add(a, b):\n    return", "The for statement is used to"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        got = out.outputs[0].token_ids
        assert len(got) == 8 and out.outputs[0].text.strip()
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = model(tier).generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
        assert got == ref[0, ids.shape[1]:].tolist(), (tier, prompt)


def test_chat_template_and_stop_tokens():
    tok = tokenizer()
    msgs = [{"role": "user", "content": "What is a generator?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is a generator?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, tokenize=False) == "<|im_start|>user\nWhat is a generator?<|im_end|>\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 1


# --------------------------------------------------------------------------------------
# quality grows with size
# --------------------------------------------------------------------------------------


def test_held_out_split_is_the_recorded_one():
    recorded = json.loads((demo.DEMO_DIR / "held_out.json").read_text())
    trained_on = json.loads((demo.demo_model_path("small") / "training_config.json").read_text())
    s = demo.split()
    assert s.held_out_code and s.held_out_prose
    # the split is a pure function of the path / key: what was held out in training is held out here
    present = set(s.train_code) | set(s.held_out_code)
    assert {f for f in recorded["code"] if f in present} == set(s.held_out_code) & set(recorded["code"])
    assert not set(s.train_code) & set(recorded["code"])
    assert not set(s.train_prose) & set(recorded["prose"])
    if trained_on["corpus"]["python"] == platform.python_version():
        assert recorded == {"code": s.held_out_code, "prose": s.held_out_prose}


def test_held_out_nll_decreases_with_size():
    samples = demo.held_out_samples()
    assert samples == demo.held_out_samples()  # deterministic
    for kind in ("code", "prose"):
        results = {t: nll_per_token(t, samples[kind]) for t in TIERS}
        n_tokens = results["small"][1]
        assert n_tokens >= 200, (kind, n_tokens)
        nll = [results[t][0] for t in TIERS]
        # trained: well below a uniform guess over the vocabulary (ln 4096 = 8.3 nats)
        assert nll[0] < math.log(len(tokenizer())) - 1.5, (kind, nll)
        assert nll[0] > nll[1] > nll[2], f"{kind}: NLL small/medium/large = {nll}"
        # and clearly so: at least 0.1 nats/token per step up in size
        assert nll[0] - nll[1] > 0.1 and nll[1] - nll[2] > 0.1, f"{kind}: NLL small/medium/large = {nll}"


# --------------------------------------------------------------------------------------
# tokenizer round trip
# --------------------------------------------------------------------------------------


def roundtrip(s: str) -> None:
    tok = tokenizer()
    ids = tok.encode(s, add_special_tokens=False)
    assert tok.decode(ids) == s
    assert tok.decode(ids, skip_special_tokens=True) == s
    assert tok.encode(s) == ids  # the tokenizer adds no BOS/EOS by itself


def test_tokenizer_is_a_fast_tokenizer_with_special_tokens():
    tok = tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert [tok.convert_tokens_to_ids(s) for s in SPECIALS] == [0, 1, 2, 3, 4]
    assert 3000 <= len(tok) <= 5000
    for s in SPECIALS:  # each special is a single token
        assert tok.encode(s, add_special_tokens=False) == [tok.convert_tokens_to_ids(s)]


@pytest.mark.parametrize(
    "s",
    [
        "",
        " ",
        "  leading spaces",
        "trailing spaces   ",
        "\ttab\tseparated\t",
        "\n\nnewlines\n\n\n",
        "windows\r\nline\r\nends\r",
        "def f(x):\n\tif x:\n\t\treturn x  # tab indent\n    return None\n",
        "class A:\n    def __init__(self):\n        self.x = {'a': [1, 2.5e-3, 0x1F]}\n",
        "emoji 😀🚀👩‍💻👍🏽 flags 🇫🇷🇯🇵",
        "中文字符 日本語のテキスト 한국어 텍스트",
        "Ünïcödé çåfé naïve résumé — “quotes” ‘single’ …",
        "e\u0301 combining, \u200b zero width, \u00a0 nbsp, \ufeff bom",
        "مرحبا بالعالم עברית Ελληνικά кириллица",
        "math ∀x∈ℝ: x² ≥ 0 ∑ ∫ √",
        "control \x00\x01\x07\x1b[31m\x7f chars",
        "private use \ue000 and astral \U0001f600 \U00010348 \U000e0001",
        "not special <|eos or |> or <|foo|>",
        "a" * 3000,
        "    " * 50 + "x",
    ],
)
def test_tokenizer_roundtrip_strings(s):
    roundtrip(s)


def test_tokenizer_roundtrip_every_char_class():
    # a few characters of every Unicode general category (lone surrogates are not valid text)
    by_cat: dict[str, list[str]] = {}
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if len(by_cat.setdefault(cat, [])) < 40:
            by_cat[cat].append(ch)
    assert len(by_cat) == 29, sorted(by_cat)  # all 30 general categories but Cs
    for cat, chars in sorted(by_cat.items()):
        roundtrip("".join(chars))
        roundtrip(" ".join(chars))
    roundtrip("".join(chr(c) for c in range(256)))  # every Latin-1 char


def test_tokenizer_roundtrip_stdlib_source():
    s = demo.split()
    rel = s.held_out_code[0]
    text = demo.read_code(rel)
    assert text and len(text) > 1000
    roundtrip(text[:20000])
    roundtrip(demo.read_code("textwrap.py") or text[::-1])
