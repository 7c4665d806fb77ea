"""Weights in the dtype asked for: a model loaded in bfloat16 / float16 holds every parameter in
that dtype (the rotary position tables stay float32, as transformers keeps them), occupies exactly
the bytes the memory planner counts, runs its activations against a same-dtype KV cache, and its
logits match transformers' model loaded in the same dtype within that dtype's tolerance."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version

from sizewise import LLM, SamplingParams
from sizewise.models import ModelConfig
from sizewise.orchestrator.deployment import DeploymentConfig
from sizewise.orchestrator.planner import plan_memory
from sizewise.platform import CpuPlatform
from test_parity import _fake_result

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_model(path, dtype: torch.dtype):
    """transformers' model in `dtype` on every supported version: the keyword is `dtype` from
    4.56 on (`torch_dtype` before, deprecated after)."""
    kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return transformers.AutoModelForCausalLM.from_pretrained(path, **{kw: dtype}).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "llama_tied_linear"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_low_precision_load_matches_transformers_and_planner(checkpoints, family, dtype_name):
    dtype = DTYPES[dtype_name]
    path = checkpoints[family]
    llm = LLM(path, device="cpu", dtype=dtype_name, kv_cache_bytes=1 << 20, block_size=8)
    core = llm.engine
    model = core.runner.model
    wrong = {n: p.dtype for n, p in model.named_parameters() if p.dtype != dtype}
    assert not wrong, f"parameters not in {dtype}: {wrong}"
    # The one float32 exception: rotary cos/sin tables (positions up to max_model_len need more
    # than bf16's 8-bit mantissa); what a step uses is cast to the activation dtype.
    assert {n: b.dtype for n, b in model.named_buffers()} == {"rotary.cos": torch.float32, "rotary.sin": torch.float32}
    assert all(k.dtype == dtype and v.dtype == dtype for k, v in core.runner.kv_caches)

    # Resident weight bytes == the memory planner's figure for this model and dtype.
    cfg = ModelConfig.from_pretrained(path)
    dep = DeploymentConfig.model_validate(dict(
        memory_fraction=0.5, dtype=dtype_name, models=[dict(name="m", tier="small", path=str(path))],
        engine=dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, block_size=8),
    ))
    planned = plan_memory(dep, CpuPlatform(), {"m": cfg}).model("m").weight_bytes
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    assert resident == planned == core.weight_bytes
    assert resident == sum(p.numel() * p.element_size() for p in hf_model(path, dtype).parameters())

    # Logits: prefill, then decode steps through the paged path, each against transformers in the
    # same dtype over the whole sequence. Tolerance: a few units of the dtype's epsilon at the
    # logits' scale (the two differ by op order: fused q/k/v, rotation, summation order).
    hf = hf_model(path, dtype)
    prompt = [3 + (i * 37) % 300 for i in range(21)]
    core.add_request("p", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    seq = core.requests["p"].seqs[0]
    hidden_dtypes = []
    model.norm.register_forward_hook(lambda m, a, out: hidden_dtypes.append(out.dtype))
    for step in range(4):
        sched = core.scheduler.schedule()
        if step == 0:
            _, logits, _ = core.runner._mixed([], sched.prefills, sched.prefill_chunks)
        else:
            logits = core.runner._decode(sched.decodes)
        with torch.no_grad():
            ref = hf(torch.tensor([seq.token_ids])).logits[0, -1].float()
        atol = 4 * torch.finfo(dtype).eps * ref.abs().max().item()
        torch.testing.assert_close(logits[0], ref, atol=atol, rtol=0, msg=lambda m: f"step {step}: {m}")
        core._postprocess(sched, _fake_result(seq, logits))
    assert hidden_dtypes and set(hidden_dtypes) == {dtype}, "activations must run in the model dtype"


def test_bfloat16_generate_end_to_end_on_cpu(llama_dir):
    llm = LLM(llama_dir, device="cpu", dtype="bfloat16", kv_cache_bytes=1 << 20, block_size=8)
    out = llm.generate(["def add(a, b):", "The quick brown fox"],
                       SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [12, 12]
    assert llm.engine.dtype == torch.bfloat16
    assert {p.dtype for p in llm.engine.runner.model.parameters()} == {torch.bfloat16}
