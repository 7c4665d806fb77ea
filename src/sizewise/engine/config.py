"""Engine configuration (typed, slotted; pydantic lives only at the edges)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineConfig:
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto
    device: str = "auto"  # auto | cpu | cuda[:N] | npu[:N]
    max_model_len: int | None = None  # default: the checkpoint's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int | None = None  # default: the platform's preferred size
    kv_cache_bytes: int | None = None  # explicit KV budget; overrides the fraction
    kv_cache_memory_fraction: float = 0.25  # of free device memory (RAM on CPU)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # no graph capture even where the platform supports it
    seed: int = 0
    max_waiting: int = 1024  # bounded waiting queue; beyond it add_request raises QueueFullError
    # Speculative decoding (engine/spec/), chosen per request ("pld" / "pld_adaptive" / "draft").
    num_speculative_tokens: int = 4  # k, fixed per step (static verify shape Q = k+1); 0 disables
    prompt_lookup_max: int = 3  # longest suffix n-gram looked up in prompt + output
    prompt_lookup_min: int = 2  # shortest
    # how plain rows share a step with verify rows: split (Q=1 and Q=k+1 forwards), padded (plain rows
    # join the Q=k+1 forward as empty proposals), auto (padded while few positions are wasted)
    spec_batching: str = "auto"
    # Text and stop strings made here (False: token ids only; whoever reads the deltas detokenizes and
    # checks stop strings: the API process of `serve --engine-process`, orchestrator/remote.py)
    detokenize: bool = True
