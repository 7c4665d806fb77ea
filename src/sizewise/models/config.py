"""Model configuration read from a Hugging Face `config.json`, one shape for every family."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# config.json keys with no default: every supported family's config writes them.
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


class CheckpointError(ValueError):
    """The directory is not a loadable checkpoint of a supported family."""


def not_a_directory(path: str) -> str:
    """What to say when a model path is not a directory: often a hub id, which is never downloaded."""
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None
    get = f"hf download {path} --local-dir {path.split('/')[-1]}" if hub_id else "hf download ID --local-dir DIR"
    return (f"model path {path!r} is not a directory (a local Hugging Face model directory; hub ids are not "
            f"downloaded: `{get}` first{', then pass that directory' if hub_id else ''})")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of float32, bfloat16, float16, auto") from None


@dataclass(slots=True, frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    torch_dtype: torch.dtype
    o_bias: bool = False  # attention output projection bias (Llama / Qwen3 `attention_bias`)
    mlp_bias: bool = False  # gate / up / down biases (Llama `mlp_bias`)
    rope_scaling: dict = field(default_factory=dict)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        if self.qkv_bias:
            per_layer += q + 2 * kv
        if self.o_bias:
            per_layer += h
        if self.mlp_bias:
            per_layer += 2 * i + h
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elt = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elt

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir)
        cfg_file = path / "config.json"
        if not path.is_dir():
            raise CheckpointError(not_a_directory(str(model_dir)))
        if not cfg_file.is_file():
            raise CheckpointError(f"{str(path)!r} is not a Hugging Face checkpoint: no config.json")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
        cfg = cls.from_dict(raw)
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            try:
                gen = json.loads(gen_file.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{gen_file}: invalid JSON ({e})") from None
            if gen.get("eos_token_id") is not None:
                cfg = replace(cfg, eos_token_ids=_as_tuple(gen["eos_token_id"]))
        return cfg

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        family = raw.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise CheckpointError(
                f"unsupported model_type {family!r}; supported families: {', '.join(SUPPORTED_FAMILIES)}"
            )
        missing = [k for k in _REQUIRED_KEYS if raw.get(k) is None]
        if missing:  # a clear CheckpointError, not a KeyError from deep inside the constructor below
            raise CheckpointError(f"config.json lacks {', '.join(missing)} (needed for a {family} model)")
        num_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        head_dim = raw.get("head_dim") or hidden // num_heads
        # transformers >= 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`.
        rope_params = dict(raw.get("rope_parameters") or {})
        rope_theta = rope_params.pop("rope_theta", None) or raw.get("rope_theta", 10000.0)
        scaling = dict(raw.get("rope_scaling") or {}) or rope_params
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise CheckpointError(f"unsupported rope scaling {rope_type!r}; supported: default, llama3, linear")
        if rope_type == "default":
            scaling = {}
        else:
            scaling = {**scaling, "rope_type": rope_type}
        use_sw = raw.get("use_sliding_window", family == "mistral")
        dtype_name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        # As transformers: Qwen2 always has q/k/v bias and never an o_proj bias; Llama and Qwen3
        # put `attention_bias` on q/k/v *and* o_proj; Mistral has no bias at all; only Llama
        # reads `mlp_bias`.
        attn_bias = family in ("llama", "qwen3") and bool(raw.get("attention_bias", False))
        return cls(
            family=family,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or attn_bias,
            qk_norm=family == "qwen3",
            torch_dtype=parse_dtype(dtype_name),
            o_bias=attn_bias,
            mlp_bias=family == "llama" and bool(raw.get("mlp_bias", False)),
            rope_scaling=scaling,
            sliding_window=raw.get("sliding_window") if use_sw else None,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_tuple(raw.get("eos_token_id")),
        )

    def rope_inv_freq(self) -> torch.Tensor:  # [head_dim // 2] float32
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        kind = self.rope_scaling.get("rope_type")
        if kind == "linear":
            inv = inv / float(self.rope_scaling["factor"])
        elif kind == "llama3":
            s = self.rope_scaling
            factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
            old_ctx = float(s["original_max_position_embeddings"])
            low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = torch.where(is_medium, smoothed, scaled)
        return inv


def _as_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    if isinstance(x, int):
        return (x,)
    return tuple(int(i) for i in x)
