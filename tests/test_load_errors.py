"""Load errors a new user meets first, refused at once with what to do, and before the server
says it is listening: a checkpoint without tokenizer files, a hub id instead of a directory, a
context longer than the model was built for."""

from __future__ import annotations

import logging
import shutil

import pytest

from sizewise import LLM
from sizewise.cli import main
from sizewise.models import CheckpointError


@pytest.fixture
def no_tokenizer(tmp_path, checkpoints):
    """Config and weights, no tokenizer files: for a qwen2 config transformers builds an empty
    tokenizer from nothing, so every prompt encoded to no tokens."""
    d = tmp_path / "qwen2-no-tokenizer"
    d.mkdir()
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(checkpoints["qwen2"] / f, d / f)
    return d


def _startup_announced(caplog) -> bool:
    text = caplog.text.lower()
    return "listening on" in text or "startup complete" in text


def test_checkpoint_without_tokenizer_files_is_refused_at_load(no_tokenizer, capsys, caplog):
    with pytest.raises(CheckpointError, match="no tokenizer files.*tokenizer.json"):
        LLM(str(no_tokenizer), device="cpu")

    assert main(["generate", "--model", str(no_tokenizer), "def f():", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and "prompt is empty" not in err

    caplog.set_level(logging.INFO)
    assert main(["serve", "--model", str(no_tokenizer), "--port", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer files" in err and str(no_tokenizer) in err
    assert not _startup_announced(caplog), caplog.text


def test_serve_given_a_hub_id_says_what_generate_says(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no directory of that name here
    assert main(["generate", "--model", "Qwen/Qwen2.5-0.5B", "hello"]) == 2
    generate_err = capsys.readouterr().err
    assert main(["serve", "--model", "Qwen/Qwen2.5-0.5B"]) == 2
    serve_err = capsys.readouterr().err
    hint = "`hf download Qwen/Qwen2.5-0.5B --local-dir Qwen2.5-0.5B`"
    assert hint in generate_err and hint in serve_err
    assert "Traceback" not in serve_err


def test_context_beyond_max_position_embeddings_names_the_key_and_flag(tmp_path, checkpoints, capsys, caplog):
    caplog.set_level(logging.INFO)
    cfg = tmp_path / "long.yaml"
    cfg.write_text(f"models:\n  - {{name: m, tier: large, path: {checkpoints['llama']}}}\n"
                   f"engine:\n  max_model_len: 4096\n")  # the checkpoint has 512 positions
    assert main(["serve", "--config", str(cfg), "--port", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "engine.max_model_len 4096" in err and "--max-model-len" in err and "512" in err
    assert not _startup_announced(caplog), caplog.text

    assert main(["serve", "--model", str(checkpoints["llama"]), "--max-model-len", "4096", "--port", "0",
                 "--device", "cpu"]) == 2
    assert "--max-model-len" in capsys.readouterr().err
    assert not _startup_announced(caplog), caplog.text


def test_memory_too_small_is_refused_before_listening(checkpoints, capsys, caplog):
    caplog.set_level(logging.INFO)
    assert main(["serve", "--model", str(checkpoints["llama"]), "--memory-fraction", "1e-9", "--port", "0",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "--memory-fraction" in err
    assert not _startup_announced(caplog), caplog.text
