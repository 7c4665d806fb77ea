"""Regression tests for the bugs found in the house-style review: clear errors, not bare
KeyError / TypeError / JSONDecodeError escaping from inside the code."""

from __future__ import annotations

import json

import pytest

from sizewise import InvalidRequestError, SamplingParams
from sizewise.models import CheckpointError, ModelConfig

_LLAMA = {
    "model_type": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
}


def test_complete_config_still_parses():
    cfg = ModelConfig.from_dict(dict(_LLAMA))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.head_dim) == (320, 64, 2, 16)


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads"])
def test_config_without_a_required_key_is_a_checkpoint_error(key):
    raw = {k: v for k, v in _LLAMA.items() if k != key}
    with pytest.raises(CheckpointError, match=key):
        ModelConfig.from_dict(raw)


def test_invalid_generation_config_is_a_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_LLAMA))
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="generation_config.json: invalid JSON"):
        ModelConfig.from_pretrained(tmp_path)


def test_generation_config_eos_still_applies(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**_LLAMA, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == (2, 7)


@pytest.mark.parametrize("kwargs, param", [(dict(stop=5), "stop"), (dict(stop_token_ids=5), "stop_token_ids")])
def test_non_list_stop_fields_are_invalid_request_errors(kwargs, param):
    with pytest.raises(InvalidRequestError, match=param) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_stop_fields_still_accept_none_strings_and_tuples():
    p = SamplingParams(stop=None, stop_token_ids=None)
    assert (p.stop, p.stop_token_ids) == ([], [])
    p = SamplingParams(stop="x", stop_token_ids=(3, 4))
    assert (p.stop, p.stop_token_ids) == (["x"], [3, 4])
