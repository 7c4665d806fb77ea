"""Memory planner: fit every resident model's weights, workspace and KV cache into one budget.

Budget = memory_fraction x the device's total memory (RAM on CPU), capped at what is free
now; or, with an explicit `kv_cache_bytes` (as vLLM's --kv-cache-memory-bytes), the weights and
workspace plus exactly that much KV cache, which must fit in free memory. From it come, per model and before anything is loaded: weight bytes (parameter count
from config.json x the dtype's size), a workspace reserve for the largest step's activations
and logits, and what is left is the KV budget, split by `kv_share` (normalised over the
models), never more than every running sequence at full length can use (the surplus goes to
the others) and never less than one max_model_len sequence. What does not fit is refused
with the model and how many bytes are short.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.graph_runner import capture_blocker, decode_q_values, default_buckets, graph_held_bytes
from ..models import ModelConfig, parse_dtype
from ..platform import Platform

_WORKSPACE_ELT = 4  # activations and logits are computed in float32 in the worst case


class MemoryPlanError(ValueError):
    """The deployment does not fit its memory budget."""

    def __init__(self, message: str, model: str, short_bytes: int) -> None:
        super().__init__(message)
        self.model = model
        self.short_bytes = short_bytes


@dataclass(slots=True, frozen=True)
class ModelPlan:
    name: str
    tier: str
    params: int
    dtype: torch.dtype
    weight_bytes: int
    workspace_bytes: int
    kv_bytes: int  # = num_blocks * kv_bytes_per_block: what the engine gets as kv_cache_bytes
    kv_bytes_per_block: int
    num_blocks: int
    block_size: int
    max_model_len: int
    kv_share: float  # normalised share of the KV budget asked for

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.workspace_bytes + self.kv_bytes

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass(slots=True, frozen=True)
class MemoryPlan:
    device: str
    device_total_bytes: int
    device_free_bytes: int
    memory_fraction: float
    budget_bytes: int
    models: tuple[ModelPlan, ...]
    kv_cache_bytes: int | None = None  # the explicit KV budget that replaced the fraction

    @property
    def planned_bytes(self) -> int:
        return sum(m.total_bytes for m in self.models)

    def model(self, name: str) -> ModelPlan:
        return next(m for m in self.models if m.name == name)

    def table(self) -> str:
        gib = lambda b: f"{b / 2**30:.3f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"  # noqa: E731
        head = ("model", "tier", "params", "dtype", "weights", "workspace", "KV cache", "blocks", "KV tokens", "share")
        rows = [head]
        for m in self.models:
            rows.append((
                m.name, m.tier, f"{m.params / 1e6:.2f}M", str(m.dtype).removeprefix("torch."), gib(m.weight_bytes),
                gib(m.workspace_bytes), gib(m.kv_bytes), f"{m.num_blocks} x {m.block_size}", str(m.kv_tokens),
                f"{m.kv_share:.2f}",
            ))
        rows.append(("total", "", f"{sum(m.params for m in self.models) / 1e6:.2f}M", "",
                     gib(sum(m.weight_bytes for m in self.models)), gib(sum(m.workspace_bytes for m in self.models)),
                     gib(sum(m.kv_bytes for m in self.models)), "", "", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        how = (f"weights + workspace + kv_cache_bytes {gib(self.kv_cache_bytes)}" if self.kv_cache_bytes is not None
               else f"{self.memory_fraction:g} x {gib(self.device_total_bytes)} total")
        lines = [
            f"memory plan on {self.device}: budget {gib(self.budget_bytes)} = {how} "
            f"({gib(self.device_free_bytes)} free), planned {gib(self.planned_bytes)}",
            fmt(rows[0]), fmt(tuple("-" * w for w in widths)), *(fmt(r) for r in rows[1:]),
        ]
        return "\n".join(lines)


def _resolve_dtype(name: str | None, default: str, cfg: ModelConfig, platform: Platform) -> torch.dtype:
    name = name or default
    return platform.default_dtype(cfg.torch_dtype) if name == "auto" else parse_dtype(name)


def plan_memory(config, platform: Platform, model_configs: dict[str, ModelConfig] | None = None) -> MemoryPlan:
    """`config`: a DeploymentConfig. `model_configs` (by model name) skips reading config.json."""
    eng = config.engine
    mem = platform.memory_info()
    kv_explicit = getattr(config, "kv_cache_bytes", None)
    # With an explicit KV budget the weights may take whatever is free; otherwise the fraction bounds all.
    budget = mem.free_bytes if kv_explicit is not None else min(int(config.memory_fraction * mem.total_bytes),
                                                                 mem.free_bytes)
    shares_sum = sum(m.kv_share for m in config.models)
    block_size = eng.block_size or platform.preferred_block_size
    rows = []  # (entry, cfg, dtype, weights, workspace, per_block, min_kv, max_kv, share)
    for m in config.models:
        cfg = (model_configs or {}).get(m.name) or ModelConfig.from_pretrained(Path(m.path))
        dtype = _resolve_dtype(m.dtype, config.dtype, cfg, platform)
        elt = torch.empty((), dtype=dtype).element_size()
        max_len = _max_len(eng, cfg)
        per_block = cfg.kv_bytes_per_token(dtype) * block_size
        blocks_per_seq = -(-max_len // block_size)
        tokens = eng.max_num_batched_tokens
        # Largest step: packed hidden states and MLP activations, plus logits (prompt logprobs
        # compute them for every prompt position of the chunk, then a log-softmax copy).
        workspace = tokens * (4 * cfg.hidden_size + 3 * cfg.intermediate_size + 2 * cfg.vocab_size) * _WORKSPACE_ELT
        q_values = decode_q_values(eng.num_speculative_tokens)
        if platform.supports_graphs and not eng.enforce_eager and capture_blocker(
                platform, dtype, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, block_size, q_values) is None:
            # Captured decode graphs keep their outputs allocated: the body's hidden states only
            # (logits are computed outside the graph; see engine/graph_runner.py). The runner
            # captures under the same condition (ModelRunner: capture_blocker).
            workspace += graph_held_bytes(default_buckets(eng.max_num_seqs), q_values, cfg.hidden_size, elt)
        rows.append((m, cfg, dtype, cfg.num_params * elt, workspace, per_block,
                     blocks_per_seq * per_block, eng.max_num_seqs * blocks_per_seq * per_block,
                     m.kv_share / shares_sum))

    fixed = 0
    for m, _, _, weights, workspace, *_ in rows:
        fixed += weights + workspace
        if fixed > budget:
            total_fixed = sum(r[3] + r[4] for r in rows)
            of = (f"the {mem.free_bytes} free device bytes" if kv_explicit is not None else
                  f"the budget of {budget} bytes ({config.memory_fraction:g} x {mem.total_bytes} device bytes, "
                  f"{mem.free_bytes} free)")
            raise MemoryPlanError(
                f"model {m.name!r} ({m.tier}) does not fit: the weights and workspace of the models up to "
                f"it need {fixed} bytes ({total_fixed} for all), over {of}; short by {total_fixed - budget} "
                f"bytes before any KV cache. "
                f"{'Free device memory' if kv_explicit is not None else 'Raise memory_fraction (--memory-fraction)'}"
                f", use a smaller dtype, or drop a model.",
                model=m.name, short_bytes=total_fixed - budget,
            )
    if kv_explicit is not None:
        if fixed + kv_explicit > budget:
            raise MemoryPlanError(
                f"kv_cache_bytes {kv_explicit} and the weights and workspace ({fixed} bytes) need "
                f"{fixed + kv_explicit} bytes, but {mem.free_bytes} are free; short by "
                f"{fixed + kv_explicit - budget} bytes. Lower kv_cache_bytes (--kv-cache-bytes).",
                model=rows[-1][0].name, short_bytes=fixed + kv_explicit - budget,
            )
        budget = fixed + kv_explicit

    # Water-filling: each model gets its share of the KV budget, capped at what it can use;
    # what a capped model leaves goes to the others by their shares.
    kv_budget = budget - fixed
    alloc = {r[0].name: 0 for r in rows}
    open_rows = list(rows)
    left = kv_budget
    while open_rows and left > 0:
        share_sum = sum(r[8] for r in open_rows)
        capped = [r for r in open_rows if left * r[8] / share_sum >= r[7]]
        if not capped:
            for r in open_rows:
                alloc[r[0].name] = int(left * r[8] / share_sum)
            break
        for r in capped:
            alloc[r[0].name] = r[7]
            left -= r[7]
            open_rows.remove(r)

    plans = []
    for m, cfg, dtype, weights, workspace, per_block, min_kv, max_kv, share in rows:
        kv = alloc[m.name]
        if kv < min_kv:
            raise MemoryPlanError(
                f"model {m.name!r} ({m.tier}) does not fit: its KV share ({share:.2f} of {kv_budget} bytes left "
                f"after all weights and workspace) is {kv} bytes, but one {_max_len(eng, cfg)}-token sequence "
                f"needs {min_kv} bytes; short by {min_kv - kv} bytes. Raise "
                f"{'kv_cache_bytes (--kv-cache-bytes)' if kv_explicit is not None else 'memory_fraction (--memory-fraction)'}"
                f" or its kv_share, or lower engine.max_model_len (--max-model-len).",
                model=m.name, short_bytes=min_kv - kv,
            )
        blocks = kv // per_block
        plans.append(ModelPlan(
            name=m.name, tier=m.tier, params=cfg.num_params, dtype=dtype, weight_bytes=weights,
            workspace_bytes=workspace, kv_bytes=blocks * per_block, kv_bytes_per_block=per_block,
            num_blocks=blocks, block_size=block_size, max_model_len=_max_len(eng, cfg), kv_share=share,
        ))
    return MemoryPlan(
        device=str(platform.device), device_total_bytes=mem.total_bytes, device_free_bytes=mem.free_bytes,
        memory_fraction=config.memory_fraction, budget_bytes=budget, models=tuple(plans), kv_cache_bytes=kv_explicit,
    )


def _max_len(eng, cfg: ModelConfig) -> int:
    n = eng.max_model_len or cfg.max_position_embeddings
    return min(n, cfg.sliding_window) if cfg.sliding_window else n  # as EngineCore caps it
