"""Checkpoint formats and dtypes, and two engines living side by side in one process."""

from __future__ import annotations

import asyncio

import pytest
import torch
import transformers

from sizewise import LLM, SamplingParams
from sizewise.engine.async_engine import AsyncEngine
from sizewise.engine.config import EngineConfig
from sizewise.engine.core import EngineCore

from conftest import build_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPT = [5, 17, 33, 8, 90, 91]


def test_sharded_checkpoint_loads_identically(tmp_path, llama_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="60KB")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (sharded / f).write_bytes((llama_dir / f).read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    a = LLM(llama_dir, device="cpu", kv_cache_bytes=1 << 20).generate([PROMPT], GREEDY)[0]
    b = LLM(sharded, device="cpu", kv_cache_bytes=1 << 20).generate([PROMPT], GREEDY)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_half_precision_dtypes_follow_the_reference(tmp_path):
    path = tmp_path / "bf16"
    build_checkpoint(path, "qwen2", dtype=torch.bfloat16)
    auto = LLM(path, device="cpu", kv_cache_bytes=1 << 20)
    assert auto.engine.dtype == torch.float32  # auto on CPU: float32 whatever the checkpoint says
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        llm = LLM(path, device="cpu", dtype=dtype, kv_cache_bytes=1 << 20)
        assert llm.engine.dtype == torch_dtype
        out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, logprobs=1))[0].outputs[0]
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0, -1], -1)
        tok = out.token_ids[0]
        # Half precision: the chosen token's logprob is close to the float32 reference's.
        assert abs(out.logprobs[0][tok] - ref[tok].item()) < 0.1


def test_two_async_engines_in_one_process_do_not_collide(checkpoints):
    cfg = EngineConfig(device="cpu", kv_cache_bytes=1 << 20)
    a_core = EngineCore(checkpoints["llama"], cfg)
    b_core = EngineCore(checkpoints["qwen2"], cfg)
    want_a = LLM(checkpoints["llama"], device="cpu", kv_cache_bytes=1 << 20).generate([PROMPT], GREEDY)[0].outputs[0].token_ids
    want_b = LLM(checkpoints["qwen2"], device="cpu", kv_cache_bytes=1 << 20).generate([PROMPT], GREEDY)[0].outputs[0].token_ids
    a, b = AsyncEngine(a_core), AsyncEngine(b_core)

    async def collect(engine, rid):
        toks = []
        async for delta in engine.generate(rid, PROMPT, GREEDY):
            for o in delta.outputs:
                toks += o.token_ids
        return toks

    async def main():
        # Same request ids in both engines: nothing is shared between them.
        got = await asyncio.gather(*(collect(e, f"r{i}") for i in range(3) for e in (a, b)))
        stream = await a.add_request("long", PROMPT, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
        async for _ in stream:
            break  # the consumer leaves after the first delta: the request is aborted
        for _ in range(100):
            if a_core.stats().num_running == 0:
                break
            await asyncio.sleep(0.02)
        return got

    try:
        got = asyncio.run(main())
    finally:
        a.shutdown()
        b.shutdown()
    assert got == [want_a, want_b] * 3
    assert a_core.block_manager.num_used_blocks == 0 and not a_core.has_unfinished_requests()


def test_speculative_settings_come_from_the_deployment_yaml(tmp_path, checkpoints):
    import pydantic
    import pytest

    from sizewise.orchestrator.deployment import Deployment, DeploymentConfig

    path = tmp_path / "dep.yaml"
    path.write_text(
        f"device: cpu\nmodels:\n  - {{name: m, tier: large, path: {checkpoints['llama']}}}\n"
        "engine: {num_speculative_tokens: 0, max_model_len: 256}\n"
    )
    dep = Deployment.load(DeploymentConfig.from_yaml(path))
    try:
        assert dep.cores["m"].spec is None  # k = 0: speculation off, `pld` requests are refused
    finally:
        dep.shutdown()
    with pytest.raises(pydantic.ValidationError, match="num_speculative_tokens"):
        DeploymentConfig.model_validate(
            {"models": [{"name": "m", "tier": "large", "path": "x"}], "engine": {"num_speculative_tokens": 16}}
        )


def test_step_weight_bytes_leave_out_an_untied_input_embedding(checkpoints):
    """A decode step gathers B rows of an untied input embedding and streams every other weight
    (a tied embedding is read whole as the LM head): the roofline and telemetry count that."""
    seen = set()
    for name, path in checkpoints.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        total = sum(p.numel() * 4 for p in hf.parameters())  # tied: counted once
        emb = hf.get_input_embeddings().weight.numel() * 4
        core = EngineCore(path, EngineConfig(device="cpu", dtype="float32", kv_cache_bytes=1 << 20))
        tied = hf.config.tie_word_embeddings
        seen.add(tied)
        assert core.weight_bytes == total
        assert core.step_weight_bytes == (total if tied else total - emb), name
    assert seen == {True, False}


def test_a_truncated_safetensors_file_is_a_checkpoint_error_naming_it(tmp_path, llama_dir):
    import shutil

    from sizewise.models import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        EngineCore(bad, EngineConfig(device="cpu", dtype="float32", kv_cache_bytes=1 << 20))
