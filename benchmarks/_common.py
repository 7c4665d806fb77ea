"""Shared benchmark helpers: random-weight checkpoints at real shapes, tables, JSON output."""

from __future__ import annotations

import json
import platform as _pyplatform
import time
from pathlib import Path

import torch

SHAPES = {
    # Real models' shapes, for random-weight runs (nothing is downloaded); also used by
    # scripts/check_device.py.
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096,
                 tie_word_embeddings=False),
    # ~10M parameters: the CPU target shape of the core-engine issue.
    "tiny-10m": dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=4, vocab_size=8192,
                     max_position_embeddings=2048, tie_word_embeddings=True),
    # ~10.4M parameters (tied): the CPU target shape of the engine-integrity issue (#14), where
    # both engines are bound by per-op host overhead, not by bytes.
    "llama-10m": dict(model_type="llama", hidden_size=320, intermediate_size=864, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
                      max_position_embeddings=2048, tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6,
                         rope_theta=1000000.0),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6,
                         rope_theta=1000000.0),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, tie_word_embeddings=False, rms_norm_eps=1e-6,
                       rope_theta=1000000.0),
}


def build_random_checkpoint(shape: str, out_dir: Path, dtype: torch.dtype, device: str = "cpu") -> Path:
    """Random weights at a real model's shape, saved as a HF checkpoint (no download)."""
    import transformers

    kw = dict(SHAPES[shape])
    mt = kw.pop("model_type")
    cfg = transformers.AutoConfig.for_model(mt, **kw, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    _byte_tokenizer(out_dir)
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    return out_dir


def _byte_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=None).save_pretrained(path)


from sizewise.sim.report import TABLE_WIDTH, print_table  # noqa: E402,F401 - the benchmarks' one table format


def save_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": _pyplatform.node(),
               "torch": torch.__version__, **payload}
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
