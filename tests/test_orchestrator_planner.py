"""Memory planner: arithmetic against independent counts (transformers' parameter count, the
loaded engine's own tensors), KV split and caps, refusals naming the model and the bytes short.

The arithmetic tests give the planner a CPU platform with a scripted memory size (the planner's
input, so the expected numbers are exact); the load tests use the real platform."""

from __future__ import annotations

import pytest
import torch

from sizewise.models import ModelConfig
from sizewise.orchestrator.deployment import Deployment, DeploymentConfig
from sizewise.orchestrator.planner import MemoryPlanError, plan_memory
from sizewise.platform import CpuPlatform, MemoryInfo
from sizewise.platform.base import AttentionPath

GiB = 2**30


class ScriptedMemory(CpuPlatform):
    def __init__(self, total: int, free: int | None = None) -> None:
        super().__init__()
        self._mem = MemoryInfo(total_bytes=total, free_bytes=total if free is None else free)

    def memory_info(self) -> MemoryInfo:
        return self._mem


def mcfg(hidden: int, layers: int, kv_heads: int, inter: int, vocab: int = 4096) -> ModelConfig:
    return ModelConfig.from_dict(dict(
        model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=True,
    ))


FAMILY = {"s": mcfg(128, 4, 2, 352), "m": mcfg(256, 5, 4, 640), "l": mcfg(384, 7, 2, 1024)}


def config(fraction: float, shares=(0.2, 0.3, 0.5), **kw) -> DeploymentConfig:
    models = [dict(name=n, tier=t, path="/nonexistent", kv_share=sh)
              for n, t, sh in zip(FAMILY, ("small", "medium", "large"), shares)]
    return DeploymentConfig.model_validate(dict(
        memory_fraction=fraction, models=models,
        engine=dict(max_model_len=1024, max_num_seqs=64, max_num_batched_tokens=256, block_size=16), **kw,
    ))


def test_num_params_matches_transformers(checkpoints):
    import transformers

    for fam in ("llama", "llama_tied_linear", "qwen2", "qwen3", "mistral"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoints[fam]))
        assert ModelConfig.from_pretrained(checkpoints[fam]).num_params == sum(p.numel() for p in hf.parameters()), fam


def test_plan_arithmetic_and_shares():
    plat = ScriptedMemory(total=4 * GiB)
    plan = plan_memory(config(0.05), plat, FAMILY)  # 205 MiB: KV is share-limited, not capped
    assert plan.budget_bytes == int(0.05 * 4 * GiB)
    kv_budget = plan.budget_bytes - sum(m.weight_bytes + m.workspace_bytes for m in plan.models)
    for m, share in zip(plan.models, (0.2, 0.3, 0.5)):
        cfg = FAMILY[m.name]
        assert m.dtype == torch.float32  # auto on CPU
        assert m.weight_bytes == cfg.num_params * 4
        per_block = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * 16
        assert m.kv_bytes_per_block == per_block
        assert m.num_blocks == int(kv_budget * share) // per_block
        assert m.kv_bytes == m.num_blocks * per_block
        assert m.kv_share == pytest.approx(share)
    assert plan.planned_bytes <= plan.budget_bytes
    table = plan.table()
    for m in plan.models:
        assert m.name in table and f"{m.num_blocks} x 16" in table
    # shares are normalised: 1, 1.5, 2.5 is the same split as 0.2, 0.3, 0.5
    same = plan_memory(config(0.05, shares=(1.0, 1.0, 1.0)), plat, FAMILY)
    assert [m.kv_share for m in same.models] == pytest.approx([1 / 3] * 3)
    # an explicit dtype halves the weights
    half = plan_memory(config(0.05, dtype="bfloat16"), plat, FAMILY)
    assert [m.weight_bytes for m in half.models] == [FAMILY[n].num_params * 2 for n in FAMILY]


def test_kv_is_capped_at_what_the_engine_can_use_and_the_rest_goes_to_the_others():
    plan = plan_memory(config(0.5), ScriptedMemory(total=4 * GiB), FAMILY)
    usable = {n: 64 * (1024 // 16) for n in FAMILY}  # max_num_seqs x blocks of one full sequence
    # a 2 GiB budget is more than any of them can use: all capped
    assert all(m.num_blocks == usable[m.name] for m in plan.models)
    # a budget where only the small model is capped: the large one gets more than its share
    mid = plan_memory(config(0.5, shares=(0.8, 0.1, 0.1)), ScriptedMemory(total=int(0.8 * GiB)), FAMILY)
    s, m, l = mid.models
    assert s.num_blocks == usable["s"]
    kv_budget = mid.budget_bytes - sum(x.weight_bytes + x.workspace_bytes for x in mid.models)
    assert m.num_blocks < usable["m"] and l.num_blocks < usable["l"]
    assert l.kv_bytes > 0.1 * kv_budget + 2 * l.kv_bytes_per_block
    assert sum(x.kv_bytes for x in mid.models) <= kv_budget


def test_budget_is_capped_at_free_memory():
    plan = plan_memory(config(0.5), ScriptedMemory(total=4 * GiB, free=GiB // 4), FAMILY)
    assert plan.budget_bytes == GiB // 4


def test_refuses_when_weights_do_not_fit_naming_the_model_and_bytes_short():
    ok = plan_memory(config(0.05), ScriptedMemory(total=4 * GiB), FAMILY).models
    need = sum(m.weight_bytes + m.workspace_bytes for m in ok)
    budget = ok[0].weight_bytes + ok[0].workspace_bytes + 2**20  # room for small, not for medium
    with pytest.raises(MemoryPlanError) as ei:
        plan_memory(config(0.5), ScriptedMemory(total=2 * budget), FAMILY)
    e = ei.value
    assert e.model == "m"
    assert e.short_bytes == need - budget
    assert "'m' (medium) does not fit" in str(e) and f"short by {e.short_bytes} bytes" in str(e)


def test_refuses_when_a_kv_share_cannot_hold_one_sequence():
    plat = ScriptedMemory(total=4 * GiB)
    fixed = sum(m.weight_bytes + m.workspace_bytes for m in plan_memory(config(0.05), plat, FAMILY).models)
    one_seq_small = 2 * 4 * 2 * 32 * 4 * 1024  # 2 x layers x kv_heads x head_dim x 4 B x 1024 tokens
    # KV budget of 100 full small sequences; small asks for 0.5% of it
    fraction = (fixed + 100 * one_seq_small) / (4 * GiB)
    with pytest.raises(MemoryPlanError, match=r"'s' \(small\).*one 1024-token sequence needs") as ei:
        plan_memory(config(fraction, shares=(0.005, 0.4975, 0.4975)), plat, FAMILY)
    assert ei.value.model == "s" and ei.value.short_bytes > 0


def test_load_gives_each_engine_its_planned_budget(checkpoints, capsys):
    cfg = DeploymentConfig.model_validate(dict(
        device="cpu", memory_fraction=0.002,
        models=[dict(name="a", tier="small", path=str(checkpoints["llama"]), kv_share=0.25),
                dict(name="b", tier="large", path=str(checkpoints["qwen2"]), kv_share=0.75)],
        engine=dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=128, enforce_eager=True),
        policy=dict(peak_bandwidth_gbps=10.0),
    ))
    dep = Deployment.load(cfg)
    try:
        assert "memory plan on cpu" in capsys.readouterr().err
        for name, core in dep.cores.items():
            p = dep.plan.model(name)
            assert core.weight_bytes == p.weight_bytes  # the planner's count = the loaded tensors
            assert core.block_manager.num_blocks == p.num_blocks
            assert core.runner.kv_cache_bytes == (p.num_blocks + 1) * p.kv_bytes_per_block  # + the sink block
        assert dep.cores["a"].platform is dep.cores["b"].platform  # one device, one platform
    finally:
        dep.shutdown()
    tiny = cfg.model_copy(update={"memory_fraction": 1e-7})
    with pytest.raises(MemoryPlanError, match="'a' \\(small\\) does not fit"):
        Deployment.load(tiny, echo_plan=False)


class ScriptedGraphs(ScriptedMemory):
    """A graph platform whose captured attention reads only each row's context (as CUDA's Triton
    kernel does): the model runner captures there, so the plan must count the graphs' outputs."""

    @property
    def supports_graphs(self) -> bool:
        return True

    def paged_attention_path(self, *args, captured: bool, **kw):
        return AttentionPath("scripted-kernel", fast=True, bounded=True)


def test_no_graph_workspace_where_capture_would_read_the_context_limit():
    """The CPU reference op inside a graph would gather max_model_len keys per row: the model
    runner does not capture there (capture_blocker), so the plan holds no graph outputs."""

    class ReferenceGraphs(ScriptedMemory):
        @property
        def supports_graphs(self) -> bool:
            return True

    eager = plan_memory(config(0.05), ScriptedMemory(total=4 * GiB), FAMILY)
    ref = plan_memory(config(0.05), ReferenceGraphs(total=4 * GiB), FAMILY)
    assert [m.workspace_bytes for m in ref.models] == [m.workspace_bytes for m in eager.models]


def test_workspace_counts_the_outputs_captured_graphs_hold():
    """Where decode graphs are captured, each (Q, bucket) graph keeps its [bucket, Q, hidden] body
    output allocated: buckets 1..64 sum to 199 rows, Q is 1 and k+1 = 5 (the default k = 4)."""
    eager = plan_memory(config(0.05), ScriptedMemory(total=4 * GiB), FAMILY)
    graphs = plan_memory(config(0.05), ScriptedGraphs(total=4 * GiB), FAMILY)
    off = config(0.05)
    off.engine.enforce_eager = True
    forced_eager = plan_memory(off, ScriptedGraphs(total=4 * GiB), FAMILY)
    for e, g, f in zip(eager.models, graphs.models, forced_eager.models):
        assert g.workspace_bytes - e.workspace_bytes == 199 * (1 + 5) * FAMILY[e.name].hidden_size * 4
        assert f.workspace_bytes == e.workspace_bytes
