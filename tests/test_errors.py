"""Bad input: a clear exception naming the problem, and the engine keeps serving."""

from __future__ import annotations

import json

import pytest

from sizewise import LLM, InvalidRequestError, SamplingParams
from sizewise.models import CheckpointError


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, device="cpu", kv_cache_bytes=4 << 20, max_model_len=128)


def _still_serves(llm):
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3
    assert llm.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], SamplingParams(), "prompt is empty"),
        ("", SamplingParams(), "prompt is empty"),
        ([5] * 200, SamplingParams(), r"200 tokens .* context length is 128"),
        ([5] * 100, SamplingParams(max_tokens=50), r"max_tokens \(50\) exceeds .* 128"),
        ([5, 320], SamplingParams(), r"token id 320 .* vocabulary \[0, 320\)"),
        ([5, -1], SamplingParams(), r"token id -1"),
        ([5], SamplingParams(stop_token_ids=[999]), "stop_token_ids"),
    ],
)
def test_bad_request_is_rejected_clearly(llm, prompt, params, match):
    with pytest.raises(InvalidRequestError, match=match):
        llm.generate([prompt], params)
    _still_serves(llm)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_k=-5), "top_k"),
        (dict(n=0), "n"),
        (dict(logprobs=99), "logprobs"),
        (dict(min_p=2), "min_p"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(min_tokens=9, max_tokens=4), "min_tokens"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_sampling_params_out_of_range(kwargs, param):
    with pytest.raises(InvalidRequestError, match=param) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        LLM(tmp_path, device="cpu")
    with pytest.raises(CheckpointError, match="not a directory"):
        LLM(tmp_path / "missing", device="cpu")


def test_unsupported_family_names_supported_ones(tmp_path, llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unsupported model_type 'gpt2'.*llama, mistral, qwen2, qwen3"):
        LLM(tmp_path, device="cpu")


def test_checkpoint_without_weights(tmp_path, llama_dir):
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        LLM(tmp_path, device="cpu")


def test_unknown_device_and_dtype(llama_dir):
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        LLM(llama_dir, device="tpu")
    with pytest.raises(ValueError, match="unsupported dtype 'int3'"):
        LLM(llama_dir, device="cpu", dtype="int3")
