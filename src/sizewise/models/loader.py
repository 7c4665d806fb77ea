"""Load Hugging Face safetensors checkpoints (single file or sharded) into the native decoder."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..platform import Platform
from .config import CheckpointError, ModelConfig
from .decoder import Decoder, Linear, Rotary

log = logging.getLogger(__name__)

_QKV = ("q_proj", "k_proj", "v_proj")
_GATE_UP = ("gate_proj", "up_proj")


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(f"{str(model_dir)!r} has no safetensors weights (model.safetensors or an index)")


# What a tokenizer is built from; transformers builds an *empty* tokenizer (every prompt encodes
# to nothing) for some model types when none of these is present, instead of failing.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def tokenizer_files(model_dir: Path) -> list[Path]:
    """The tokenizer vocabulary files in `model_dir`; CheckpointError naming what is missing."""
    found = [model_dir / f for f in _TOKENIZER_FILES if (model_dir / f).is_file()]
    found += sorted(model_dir.glob("*.tiktoken"))
    if not found:
        raise CheckpointError(
            f"{str(model_dir)!r} has no tokenizer files: none of tokenizer.json, tokenizer.model or "
            f"vocab.json + merges.txt (copy them, with tokenizer_config.json, from the checkpoint the "
            f"weights came from)")
    if found == [model_dir / "vocab.json"] and not (model_dir / "merges.txt").is_file():
        raise CheckpointError(f"{str(model_dir)!r} has vocab.json but no merges.txt (a BPE tokenizer needs both)")
    return found


def load_model(
    model_dir: str | Path, cfg: ModelConfig, platform: Platform, dtype: torch.dtype, max_position: int
) -> Decoder:
    model_dir = Path(model_dir)
    files = checkpoint_files(model_dir)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Decoder(cfg, platform, max_position)
    # Every parameter (linears, embeddings, norm weights) is stored in `dtype`, as transformers
    # stores a model loaded in that dtype: the resident bytes are what the memory planner counts
    # (num_params x element size) and activations run in `dtype` against a same-dtype KV cache.
    # Casting on meta allocates nothing; to_empty then allocates each tensor once, in `dtype`.
    model = model.to(dtype=dtype).to_empty(device=platform.device)
    # Buffers (rotary tables) were built on meta: rebuild them on the device, in float32. They
    # are position tables (cos/sin of position x frequency up to max_position): in bf16 their
    # 8-bit mantissa would misplace positions beyond a few hundred; transformers also builds
    # them in float32 and casts the looked-up rows to the activation dtype (Rotary.tables).
    model.rotary = Rotary(cfg, max_position).to(platform.device)

    params = dict(model.named_parameters())
    loaded: set[str] = set()
    pending: dict[str, dict[str, torch.Tensor]] = {}  # fused target -> parts seen so far
    unused: list[str] = []  # checkpoint tensors the decoder has no place for
    tied_head: torch.Tensor | None = None  # an `lm_head.weight` saved alongside tied embeddings

    def put(name: str, tensor: torch.Tensor) -> None:
        if name not in params:
            unused.append(name)
            return
        p = params[name]
        if p.shape != tensor.shape:
            raise CheckpointError(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(tensor)  # copy_ converts to p's dtype (`dtype`) in the one pass
        loaded.add(name)

    for i, f in enumerate(files):
        for name, tensor in _tensors(f):
            parts = name.split(".")
            # layers.N.self_attn.q_proj.weight -> fused qkv_proj; mlp.gate_proj -> gate_up_proj
            if len(parts) >= 4 and parts[-2] in _QKV + _GATE_UP:
                group = _QKV if parts[-2] in _QKV else _GATE_UP
                fused = "qkv_proj" if group is _QKV else "gate_up_proj"
                target = ".".join(parts[:-2] + [fused, parts[-1]])
                slot = pending.setdefault(target, {})
                slot[parts[-2]] = tensor
                if all(g in slot for g in group):
                    put(target, torch.cat([slot[g] for g in group], 0))
                    del pending[target]
            elif name == "lm_head.weight" and model.lm_head is None:
                tied_head = tensor
            else:
                put(name, tensor)
        log.info("loaded shard %d/%d of %s", i + 1, len(files), model_dir.name)

    if tied_head is not None:
        _resolve_tied_head(model, tied_head, dtype, loaded, put)
    unused += sorted(pending)  # a fused group with parts missing (e.g. q_proj.bias alone)
    if unused:
        # transformers drops them too (with a warning), so this is not an error; but a weight that
        # is silently ignored is usually a feature of the checkpoint the decoder does not model.
        log.warning("%s: ignoring %d checkpoint tensors the decoder has no place for: %s",
                    model_dir.name, len(unused), ", ".join(unused[:5]))
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{str(model_dir)!r} is missing weights: {', '.join(missing[:5])}")
    model.eval().requires_grad_(False)
    model.pack_weights()
    log.info("loaded %s (%.1fM params, %s) in %.2fs", model_dir.name, cfg.num_params / 1e6, dtype, time.perf_counter() - t0)
    return model


def _tensors(f: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name without the `model.` prefix, tensor) for each tensor of one safetensors file, rotary
    tables skipped; a truncated or corrupt file is a CheckpointError naming it (not a Rust error)."""
    try:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for hf_name in st.keys():
                if "rotary_emb" not in hf_name:
                    yield hf_name.removeprefix("model."), st.get_tensor(hf_name)
    except SafetensorError as e:
        raise CheckpointError(f"cannot read {str(f)!r}: {e}") from None


def _resolve_tied_head(model: Decoder, head: torch.Tensor, dtype: torch.dtype, loaded: set[str], put) -> None:
    """A tied-embedding checkpoint that also saved `lm_head.weight`, as transformers >= 5 reads it:
    the head alone stands in for the embeddings; a head equal to them is the tie itself; a head
    that differs is a separate output matrix (transformers then does not tie either)."""
    if "embed_tokens.weight" not in loaded:
        put("embed_tokens.weight", head)
        return
    embed = model.embed_tokens.weight
    if head.shape != embed.shape:
        raise CheckpointError(f"lm_head.weight: checkpoint shape {tuple(head.shape)} != expected {tuple(embed.shape)}")
    if torch.equal(embed, head.to(dtype)):
        return
    log.warning("tie_word_embeddings is set but the checkpoint's lm_head.weight differs from the "
                "embeddings: using it as a separate output matrix, as transformers does")
    model.lm_head = Linear(embed.shape[1], embed.shape[0], False, model.platform).to(
        device=embed.device, dtype=dtype)
    model.lm_head.requires_grad_(False)
    with torch.no_grad():
        model.lm_head.weight.copy_(head.to(dtype))
