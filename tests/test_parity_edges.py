"""Parity with transformers at the edges: config variants, checkpoint layouts, and the engine
paths a single prefill + decode does not reach (chunked prefill over prefix-cache hits, a prompt
that is a prefix of a cached one, preemption by recompute, half precision on long contexts)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from sizewise import LLM, SamplingParams
from sizewise.models import CheckpointError, ModelConfig
from sizewise.sampling_params import InvalidRequestError

from conftest import FAMILY_CONFIGS, peaked_init

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=320, max_position_embeddings=512)
PROMPT = [3 + (i * 37) % 300 for i in range(30)]


def _build(path: Path, tokenizer_dir: Path, seed: int = 0, **kw) -> Path:
    """A tiny random checkpoint of an arbitrary config (the tokenizer is copied, not trained)."""
    kw = {**SMALL, **kw}
    cfg = transformers.AutoConfig.for_model(kw.pop("model_type"), **kw, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    peaked_init(model, bias_std=0.3)  # biases large enough that dropping one changes the greedy path
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tokenizer_dir / f, path / f)
    return path


def _hf(path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return hf


def _hf_greedy(hf, prompt, n):
    return hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=2)[0, len(prompt):].tolist()


def _recording(llm: LLM) -> list[tuple[list[int], torch.Tensor]]:
    """(tokens so far, logits the engine sampled from) for every sample of every step."""
    runner, recs = llm.engine.runner, []
    mixed, decode = runner._mixed, runner._decode

    def _mixed(d, p, c):
        sampled, logits, plp = mixed(d, p, c)
        recs.extend((list(s.token_ids), logits[i].clone()) for i, s in enumerate(sampled))
        return sampled, logits, plp

    def _decode(seqs):
        logits = decode(seqs)
        recs.extend((list(s.token_ids), logits[i].clone()) for i, s in enumerate(seqs))
        return logits

    runner._mixed, runner._decode = _mixed, _decode
    return recs


def _max_logprob_error(hf, recs) -> float:
    worst = 0.0
    with torch.no_grad():
        for toks, logits in recs:
            ref = hf(torch.tensor([toks])).logits[0, -1].float()
            worst = max(worst, (logits.float().log_softmax(-1) - ref.log_softmax(-1)).abs().max().item())
    return worst


def _greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def tok_dir(checkpoints) -> Path:
    return checkpoints["llama"]


# ----- weights the reference has and the decoder must not drop ---------------------------------
def _assert_matches_transformers(path: Path, **engine) -> None:
    """Greedy 8 tokens of PROMPT: the engine's log-softmax within 1e-4 of transformers', same tokens."""
    hf = _hf(path)
    llm = LLM(path, device="cpu", dtype="float32", kv_cache_bytes=2 << 20, **engine)
    recs = _recording(llm)
    out = llm.generate([PROMPT], _greedy(8))[0].outputs[0].token_ids
    assert _max_logprob_error(hf, recs) < 1e-4
    assert out == _hf_greedy(hf, PROMPT, 8)


@pytest.mark.parametrize("kw", [
    dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, attention_bias=True),  # q,k,v AND o bias
    dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, mlp_bias=True),
    dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=32, attention_bias=True),
], ids=["llama-attention_bias", "llama-mlp_bias", "qwen3-attention_bias"])
def test_bias_variants_match_transformers(tmp_path, tok_dir, kw):
    path = _build(tmp_path / "m", tok_dir, **kw)
    _assert_matches_transformers(path, block_size=8)


def test_tied_checkpoint_with_a_distinct_lm_head_uses_it_as_transformers_does(tmp_path, checkpoints):
    # transformers >= 5 does not tie when both tensors are saved with different values.
    path = tmp_path / "m"
    shutil.copytree(checkpoints["qwen2"], path)
    sd = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    sd["lm_head.weight"] = 0.08 * torch.randn(sd["model.embed_tokens.weight"].shape, generator=g)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    _assert_matches_transformers(path)


def test_tied_checkpoint_with_an_equal_lm_head_and_one_without_model_prefix(tmp_path, checkpoints):
    path = tmp_path / "m"
    shutil.copytree(checkpoints["qwen2"], path)
    sd = load_file(path / "model.safetensors")
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    sd["lm_head.weight"] = sd["embed_tokens.weight"].clone()
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    hf = _hf(checkpoints["qwen2"])
    llm = LLM(path, device="cpu", dtype="float32", kv_cache_bytes=2 << 20)
    assert llm.engine.runner.model.lm_head is None  # still tied: one matrix read per step
    assert llm.generate([PROMPT], _greedy(8))[0].outputs[0].token_ids == _hf_greedy(hf, PROMPT, 8)


def test_tied_checkpoint_that_saved_only_lm_head_weight(tmp_path, checkpoints):
    path = tmp_path / "m"
    shutil.copytree(checkpoints["qwen2"], path)
    sd = load_file(path / "model.safetensors")
    sd["lm_head.weight"] = sd.pop("model.embed_tokens.weight")
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    hf = _hf(checkpoints["qwen2"])
    llm = LLM(path, device="cpu", dtype="float32", kv_cache_bytes=2 << 20)
    assert llm.generate([PROMPT], _greedy(8))[0].outputs[0].token_ids == _hf_greedy(hf, PROMPT, 8)


# ----- config fields ---------------------------------------------------------------------------
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("scaling", [None, LLAMA3, {"rope_type": "linear", "factor": 2.0}], ids=["default", "llama3", "linear"])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_rope_frequencies_match_transformers_in_v5_and_v4_config_layouts(scaling, head_dim):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_cfg = transformers.LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, rope_theta=500000.0,
                                      rope_scaling=scaling, max_position_embeddings=8192)
    rot = LlamaRotaryEmbedding(hf_cfg)
    assert rot.attention_scaling == 1.0
    v5 = hf_cfg.to_dict()  # transformers 5 writes `rope_parameters` (theta inside), head_dim explicit
    assert "rope_parameters" in v5
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}  # older: rope_theta + rope_scaling {"type"}
    v4.update(rope_theta=500000.0, head_dim=None,
              rope_scaling={("type" if k == "rope_type" else k): v for k, v in scaling.items()} if scaling else None)
    for raw in (v5, v4):
        cfg = ModelConfig.from_dict(raw)
        assert cfg.head_dim == head_dim
        torch.testing.assert_close(cfg.rope_inv_freq(), rot.inv_freq, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 1e4}},
    {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
], ids=["yarn", "dynamic", "longrope"])
def test_unsupported_rope_scaling_is_refused_by_name(rope):
    raw = dict(model_type="llama", **SMALL, num_attention_heads=4, **rope)
    with pytest.raises(CheckpointError, match="unsupported rope scaling"):
        ModelConfig.from_dict(raw)


def test_mistral_sliding_window_caps_the_context_and_matches_transformers_under_it(tmp_path, tok_dir):
    path = _build(tmp_path / "m", tok_dir, model_type="mistral", num_attention_heads=4, num_key_value_heads=1,
                  sliding_window=32)
    llm = LLM(path, device="cpu", dtype="float32", kv_cache_bytes=2 << 20, block_size=8)
    assert llm.engine.max_model_len == 32  # no window kernel: the window never applies
    with pytest.raises(InvalidRequestError, match="32 tokens .capped at the model's sliding window"):
        llm.generate([PROMPT + PROMPT[:2]], _greedy(1))
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        llm.generate([PROMPT[:20]], _greedy(13))
    hf = _hf(path)
    assert llm.generate([PROMPT[:20]], _greedy(12))[0].outputs[0].token_ids == _hf_greedy(hf, PROMPT[:20], 12)


# ----- engine paths ------------------------------------------------------------------------------
def test_chunked_prefill_over_prefix_cache_hits_and_preemption_match_transformers(checkpoints):
    """block_size 8, 12-token steps: every prompt is chunked (25 = 12 + 12 + a last token run as a
    decode); later prompts hit the cache at a block boundary (24), mid-block (20), one past it
    (17, 25: admitted straight to decode), are a prefix of a cached prompt or extend one; a 6-block
    cache preempts and recomputes."""
    path = checkpoints["llama"]  # GQA 2, llama3 rope, untied
    hf = _hf(path)
    a = [3 + (i * 37) % 300 for i in range(40)]
    llm = LLM(path, device="cpu", dtype="float32", kv_cache_bytes=2 << 20, block_size=8, max_num_batched_tokens=12)
    recs = _recording(llm)
    for prompts in ([a[15:40]], [a], [a[:24], a[:20]], [a[:17]], [a[:25], a + [7, 8, 9], a[:5]]):
        outs = llm.generate(prompts, _greedy(6))
        assert [o.outputs[0].token_ids for o in outs] == [_hf_greedy(hf, p, 6) for p in prompts]
    # full blocks short of each prompt's last token: 24, 20, 17 -> 2; 25 -> 3; 43 -> 5; 5 -> 0
    assert llm.engine.stats().prefix_cache_hit_tokens == 8 * (2 + 2 + 2 + 3 + 5)
    per_token = ModelConfig.from_pretrained(path).kv_bytes_per_token(torch.float32)
    small = LLM(path, device="cpu", dtype="float32", kv_cache_bytes=6 * 8 * per_token, block_size=8,
                max_num_batched_tokens=12)
    recs += _recording(small)
    prompts = [a[:9], a[10:22], a[3:11], a[:17]]
    outs = small.generate(prompts, _greedy(12))
    assert small.engine.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [_hf_greedy(hf, p, 12) for p in prompts]
    assert _max_logprob_error(hf, recs) < 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_long_context_stays_near_the_float32_reference(checkpoints, dtype):
    """Near max_position_embeddings (512) with llama3 rope, chunked: within half-precision noise
    (transformers' own bf16 forward is ~0.04 off its float32 one here)."""
    path = checkpoints["llama"]
    hf = _hf(path)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 320, (496,), generator=g).tolist()
    llm = LLM(path, device="cpu", dtype=dtype, kv_cache_bytes=4 << 20, block_size=16, max_num_batched_tokens=128)
    recs = _recording(llm)
    llm.generate([prompt], _greedy(15))
    assert len(recs) == 15 and len(recs[-1][0]) == 510
    assert _max_logprob_error(hf, recs) < 0.1
