"""Platform selection, device facts and the torch reference ops (CPU).

The Triton kernel test runs Triton's interpreter on CPU tensors; it is skipped when
triton is not installed (it is in the `test` extra).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sizewise.platform import CpuPlatform, get_platform


# ----- selection ------------------------------------------------------------------------
def test_cpu_and_auto_give_cpu_here():
    assert isinstance(get_platform("cpu"), CpuPlatform)
    if not torch.cuda.is_available() and importlib.util.find_spec("torch_npu") is None:
        p = get_platform("auto")
        assert isinstance(p, CpuPlatform)
        assert p.device == torch.device("cpu")
        assert isinstance(get_platform(None), CpuPlatform)


@pytest.mark.parametrize("spec", ["tpu", "gpu:0", "metal", "", "cuda0"])
def test_unknown_device_raises_clear_error(spec):
    with pytest.raises(ValueError, match="unknown device"):
        get_platform(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="machine has CUDA")
def test_cuda_without_cuda_raises():
    with pytest.raises(ValueError, match="CUDA"):
        get_platform("cuda")
    with pytest.raises(ValueError, match="CUDA"):
        get_platform("cuda:1")


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu installed")
def test_npu_without_torch_npu_raises():
    with pytest.raises(ValueError, match="torch_npu"):
        get_platform("npu:0")


def test_importing_platform_does_not_import_torch_npu(tmp_path):
    # A stand-in torch_npu on the path: importing sizewise.platform (and picking the CPU)
    # must not import it; only get_platform("auto"/"npu") may.
    fake = tmp_path / "torch_npu"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    code = textwrap.dedent(
        """
        import sys
        import sizewise.platform as P
        P.get_platform("cpu")
        print("torch_npu" in sys.modules, "sizewise.platform.npu" in sys.modules,
              "sizewise.platform.cuda" in sys.modules, "triton" in sys.modules)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False", "False"]


# ----- device facts ----------------------------------------------------------------------
def test_memory_info_sane():
    info = get_platform("cpu").memory_info()
    assert info.total_bytes > 1 << 26
    assert 0 < info.free_bytes <= info.total_bytes


def test_peak_bandwidth_positive_and_cached():
    p = get_platform("cpu")
    bw = p.peak_bandwidth(nbytes=8 << 20, iters=2)
    assert bw > 0 and math.isfinite(bw)
    assert p.peak_bandwidth() == bw


def test_preferred_block_size():
    assert get_platform("cpu").preferred_block_size == 16


def test_cpu_linear_packs_float32_weights_and_matches_f_linear():
    p = get_platform("cpu")
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 40, generator=g), torch.randn(96, generator=g)
    packed = p.pack_linear(w)
    if torch.backends.mkldnn.is_available():
        assert packed.is_mkldnn
    for rows in (1, 5, 16, 33):
        x = torch.randn(rows, 40, generator=g)
        torch.testing.assert_close(p.linear(x, packed, b), torch.nn.functional.linear(x, w, b))
        torch.testing.assert_close(p.linear(x, packed, None), torch.nn.functional.linear(x, w))
    half = w.to(torch.bfloat16)
    assert p.pack_linear(half) is half  # oneDNN's prepack here is float32 only


def test_loaded_model_runs_packed_linears(llama_dir):
    from sizewise.models import ModelConfig, load_model
    from sizewise.models.decoder import Linear

    model = load_model(llama_dir, ModelConfig.from_pretrained(llama_dir), get_platform("cpu"), torch.float32, 64)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears
    if torch.backends.mkldnn.is_available():
        assert all(m.weight.is_mkldnn for m in linears)


# ----- reference ops ----------------------------------------------------------------------
def _paged_case(seed, B, Q, H, Hkv, D, block_size, max_blocks, dtype=torch.float32):
    """Random per-sequence contexts scattered into a paged cache through a random block
    permutation. Returns the paged inputs and the contiguous per-sequence K/V they hold."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = B * max_blocks + 3  # last block = sink, never used
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    ctx = torch.randint(Q, max_blocks * block_size + 1, (B,), generator=g)
    perm = torch.randperm(num_blocks - 1, generator=g)
    width = max_blocks + 2  # extra -1 columns beyond every sequence's blocks
    tables = torch.full((B, width), -1, dtype=torch.int32)
    keys, values, used = [], [], 0
    for b in range(B):
        n = -(-int(ctx[b]) // block_size)
        blocks = perm[used:used + n]
        used += n
        tables[b, :n] = blocks.to(torch.int32)
        keys.append(k_cache[blocks].reshape(-1, Hkv, D)[: int(ctx[b])])
        values.append(v_cache[blocks].reshape(-1, Hkv, D)[: int(ctx[b])])
    q = torch.randn(B, Q, H, D, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, ctx.to(torch.int32), keys, values


def _dense_causal(q, keys, values, scale):
    """Independent dense reference: explicit softmax(QK^T) V per sequence, GQA by repeat."""
    B, Q, H, D = q.shape
    out = torch.empty(B, Q, H, D, dtype=torch.float64)
    for b in range(B):
        k = keys[b].double()  # [L, Hkv, D]
        v = values[b].double()
        L, Hkv = k.shape[0], k.shape[1]
        k = k.repeat_interleave(H // Hkv, dim=1)  # [L, H, D]
        v = v.repeat_interleave(H // Hkv, dim=1)
        s = torch.einsum("qhd,lhd->hql", q[b].double(), k) * scale  # [H, Q, L]
        pos_q = L - Q + torch.arange(Q)
        s = s.masked_fill(torch.arange(L)[None, :] > pos_q[:, None], float("-inf"))
        out[b] = torch.einsum("hql,lhd->qhd", s.softmax(-1), v)
    return out


@pytest.mark.parametrize("Q", [1, 4])
@pytest.mark.parametrize("H,Hkv", [(8, 2), (4, 4)])
def test_reference_paged_attention_matches_dense(Q, H, Hkv):
    q, kc, vc, tables, ctx, keys, values = _paged_case(Q * 10 + H, B=5, Q=Q, H=H, Hkv=Hkv, D=16,
                                                       block_size=4, max_blocks=6)
    scale = 16**-0.5
    got = get_platform("cpu").paged_attention(q, kc, vc, tables, ctx, scale)
    want = _dense_causal(q, keys, values, scale)
    assert got.shape == q.shape
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_write_kv_padding_slots_touch_only_the_sink():
    p = get_platform("cpu")
    num_blocks, bs, Hkv, D = 6, 4, 2, 8
    k_cache = torch.randn(num_blocks, bs, Hkv, D)
    v_cache = torch.randn(num_blocks, bs, Hkv, D)
    k0, v0 = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([-1, 5, -1, 13, -1])
    k = torch.randn(5, Hkv, D)
    v = torch.randn(5, Hkv, D)
    p.write_kv(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, Hkv, D), v_cache.view(-1, Hkv, D)
    torch.testing.assert_close(flat_k[5], k[1])
    torch.testing.assert_close(flat_v[13], v[3])
    untouched = torch.ones(num_blocks * bs, dtype=torch.bool)
    untouched[[5, 13]] = False
    untouched[(num_blocks - 1) * bs:] = False  # the sink block may hold padding garbage
    assert torch.equal(flat_k[untouched], k0.view(-1, Hkv, D)[untouched])
    assert torch.equal(flat_v[untouched], v0.view(-1, Hkv, D)[untouched])


# ----- Triton kernel under the interpreter -------------------------------------------
# TRITON_INTERPRET must be set before triton itself is first imported (its standard
# library functions are wrapped at import time), so the kernel runs in one subprocess
# per test session that imports this file, runs every case and prints JSON results.
TRITON_CASES = {
    # name: shape + launch knobs (splits None = heuristic from num_sms; block_n None = default)
    "decode_gqa_heuristic_split": dict(Q=1, H=8, Hkv=2, D=32, block_size=16, splits=None, block_n=16, sms=64),
    "decode_mha_single_split": dict(Q=1, H=4, Hkv=4, D=16, block_size=8, splits=1, block_n=None, sms=4),
    "verify_q4_three_splits": dict(Q=4, H=8, Hkv=2, D=32, block_size=16, splits=3, block_n=16, sms=4),
    "verify_q4_many_splits_some_idle": dict(Q=4, H=4, Hkv=2, D=16, block_size=4, splits=20, block_n=16, sms=4),
    "head_dim_24_gqa2": dict(Q=3, H=6, Hkv=3, D=24, block_size=4, splits=1, block_n=None, sms=4),
    "mqa_q5": dict(Q=5, H=4, Hkv=1, D=16, block_size=16, splits=2, block_n=None, sms=4),
    # the real head layouts (REAL_LAYOUTS), launch knobs from the heuristics as on an H100
    "llama_3_2_1b_layout": dict(Q=1, H=32, Hkv=8, D=64, block_size=16, splits=None, block_n=None, sms=132),
    "qwen2_5_7b_layout_verify": dict(Q=5, H=28, Hkv=4, D=128, block_size=16, splits=None, block_n=None, sms=132),
}


def _run_triton_cases() -> dict:
    """Runs inside the interpreter subprocess."""
    from sizewise.platform import triton_paged_attention as tpa

    ref_op = CpuPlatform().paged_attention
    res: dict = {}
    for name, c in TRITON_CASES.items():
        q, kc, vc, tables, ctx, keys, values = _paged_case(
            c["Q"] + c["H"] + c["D"], B=4, Q=c["Q"], H=c["H"], Hkv=c["Hkv"], D=c["D"],
            block_size=c["block_size"], max_blocks=5)
        scale = c["D"] ** -0.5
        got = tpa.paged_attention(q, kc, vc, tables, ctx, scale, num_sms=c["sms"], num_splits=c["splits"],
                                  block_n=c["block_n"])
        res[name] = dict(
            shape_ok=got.shape == q.shape,
            err_ref=(got - ref_op(q, kc, vc, tables, ctx, scale)).abs().max().item(),
            err_dense=(got.double() - _dense_causal(q, keys, values, scale)).abs().max().item(),
        )
    # Padded rows: no blocks (-1) with context_len Q (the graph runner's padding) or 0,
    # while the sink block holds NaN garbage that must never be read.
    for splits in (1, 3):
        Q, D = 2, 16
        q, kc, vc, tables, ctx, _, _ = _paged_case(7, B=4, Q=Q, H=4, Hkv=2, D=D, block_size=8, max_blocks=4)
        kc[-1] = float("nan")
        vc[-1] = float("nan")
        tables[2:] = -1
        ctx[2], ctx[3] = Q, 0
        got = tpa.paged_attention(q, kc, vc, tables, ctx, D**-0.5, num_sms=4, num_splits=splits, block_n=16)
        ref = ref_op(q[:2], kc, vc, tables[:2], ctx[:2], D**-0.5)
        res[f"padding_splits{splits}"] = dict(
            finite=bool(torch.isfinite(got).all()),
            pad_zero=bool(torch.equal(got[2:], torch.zeros_like(got[2:]))),
            err_ref=(got[:2] - ref).abs().max().item(),
        )
    # Reads stop at each row's context: table columns past it name real blocks full of NaN (as a
    # captured step's stale columns could); any read of them would poison the row.
    for splits in (1, 4):
        q, kc, vc, tables, ctx, keys, values = _paged_case(11, B=3, Q=2, H=4, Hkv=2, D=16, block_size=8,
                                                           max_blocks=3)
        used = {int(x) for x in tables.flatten() if x >= 0}
        spare = [b for b in range(kc.shape[0]) if b not in used]
        kc[spare] = float("nan")
        vc[spare] = float("nan")
        wide = torch.tensor(spare[:1] * 12, dtype=torch.int32).repeat(3, 1)  # 12 columns: 96 positions
        for b in range(3):
            n = -(-int(ctx[b]) // 8)
            wide[b, :n] = tables[b, :n]
        got = tpa.paged_attention(q, kc, vc, wide, ctx, 0.25, num_sms=4, num_splits=splits, block_n=16)
        res[f"context_bound_splits{splits}"] = dict(
            finite=bool(torch.isfinite(got).all()),
            err_dense=(got.double() - _dense_causal(q, keys, values, 0.25)).abs().max().item(),
        )
    q, kc, vc, tables, ctx, _, _ = _paged_case(3, B=3, Q=2, H=4, Hkv=2, D=16, block_size=8, max_blocks=4,
                                               dtype=torch.float16)
    got = tpa.paged_attention(q, kc, vc, tables, ctx, 0.25, num_sms=4, num_splits=2)
    ref = ref_op(q.float(), kc.float(), vc.float(), tables, ctx, 0.25)
    res["float16"] = dict(dtype=str(got.dtype), err_ref=(got.float() - ref).abs().max().item())
    return res


@pytest.fixture(scope="module")
def triton_results() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[test]')")
    code = textwrap.dedent(
        f"""
        import json, os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import test_platform
        print("RESULTS" + json.dumps(test_platform._run_triton_cases()))
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        pytest.fail(f"triton interpreter run failed:\n{out.stderr[-4000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULTS"))
    return json.loads(line[len("RESULTS"):])


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_kernel_matches_reference(triton_results, case):
    r = triton_results[case]
    assert r["shape_ok"]
    assert r["err_ref"] < 2e-5, r
    assert r["err_dense"] < 2e-5, r


@pytest.mark.parametrize("splits", [1, 3])
def test_triton_kernel_padded_rows_are_finite_zeros(triton_results, splits):
    r = triton_results[f"padding_splits{splits}"]
    assert r["finite"] and r["pad_zero"], r
    assert r["err_ref"] < 2e-5, r


@pytest.mark.parametrize("splits", [1, 4])
def test_triton_kernel_reads_only_each_rows_context(triton_results, splits):
    r = triton_results[f"context_bound_splits{splits}"]
    assert r["finite"], r
    assert r["err_dense"] < 2e-5, r


def test_triton_kernel_half_precision(triton_results):
    r = triton_results["float16"]
    assert r["dtype"] == "torch.float16"
    assert r["err_ref"] < 2e-2, r


# ----- NPU platform against a stand-in torch_npu ------------------------------------------
# No Ascend device here. The stand-in implements npu_fused_infer_attention_score as its
# documentation describes it (BSND query [B, S, N, D] with per-row query lengths, or TND
# [T, N, D] with cumulative query ends; paged KV [num_blocks, block_size, Hkv*D], bool mask
# True = masked, sparse_mode 0 / 3, per-row host KV lengths), npu_scatter_pa_kv_cache in its
# "Norm" mode as op-plugin's reference test writes it, and rejects calls outside the documented
# constraints. This checks how NpuPlatform builds its calls (mask direction,
# lengths, -1 block clamp, layouts, static vs eager path, prepare_paged), not the real op.
class _FakeTorchNpu:
    def __init__(self):
        self.calls = []

    def npu_fused_infer_attention_score(self, query, key, value, *, num_heads, num_key_value_heads,
                                        input_layout, block_table, block_size, scale,
                                        actual_seq_lengths=None, actual_seq_lengths_kv=None,
                                        atten_mask=None, sparse_mode=0):
        if input_layout == "TND":  # cumulative query ends; every row here has the same length S
            T, N, D = query.shape
            ends = actual_seq_lengths
            assert isinstance(ends, list) and ends[-1] == T and sparse_mode == 3, "TND takes the causal mask"
            S = ends[0]
            assert ends == list(range(S, T + 1, S))
            assert D in (64, 128, 192), f"TND layout takes head_dim 64/128/192, got {D}"
            query = query.view(len(ends), S, N, D)
        else:
            assert input_layout == "BSND"
        B, S, N, D = query.shape
        nb, bs, HD = key.shape
        Hkv = num_key_value_heads
        assert N == num_heads and HD == Hkv * D and bs == block_size
        assert block_size % 128 == 0 and block_table.dtype == torch.int32 and query.is_contiguous()
        assert query.dtype in (torch.float16, torch.bfloat16)
        assert isinstance(actual_seq_lengths_kv, list) and len(actual_seq_lengths_kv) == B
        assert all(isinstance(x, int) for x in actual_seq_lengths_kv)
        assert int(block_table.min()) >= 0 and int(block_table.max()) < nb  # ids are not validated by FIA
        assert sum(-(-n // bs) for n in actual_seq_lengths_kv) <= nb  # documented block-count rule
        if atten_mask is not None and sparse_mode == 0:
            assert atten_mask.dtype == torch.bool and atten_mask.shape[-1] >= block_table.shape[1] * bs
        if sparse_mode == 3:
            assert tuple(atten_mask.shape) == (2048, 2048) and bool(atten_mask[0, 1]) and not bool(atten_mask[1, 0])
        self.calls.append(dict(B=B, S=S, sparse_mode=sparse_mode, masked=atten_mask is not None, layout=input_layout))
        out = torch.empty(B, S, N, D, dtype=torch.float32)
        for b in range(B):
            L = actual_seq_lengths_kv[b]
            nblk = -(-L // bs)
            k = key[block_table[b, :nblk].long()].reshape(-1, Hkv, D)[:L].float().repeat_interleave(N // Hkv, 1)
            v = value[block_table[b, :nblk].long()].reshape(-1, Hkv, D)[:L].float().repeat_interleave(N // Hkv, 1)
            s = torch.einsum("qhd,lhd->hql", query[b].float(), k) * scale  # [N, S, L]
            if sparse_mode == 0 and atten_mask is not None:
                s = s.masked_fill(atten_mask[b, 0, :, :L][None], float("-inf"))
            elif sparse_mode == 3:
                allowed = torch.arange(L)[None, :] <= (L - S + torch.arange(S))[:, None]
                s = s.masked_fill(~allowed[None], float("-inf"))
            out[b] = torch.einsum("hql,lhd->qhd", s.softmax(-1), v)
        if input_layout == "TND":
            out = out.view(B * S, N, D)
        return out.to(query.dtype), torch.zeros(1)

    def npu_scatter_pa_kv_cache(self, key, value, key_cache, value_cache, slot_mapping, *, cache_mode="PA_NZ"):
        # The documented default is "PA_NZ": key [T, Hkv, D] into an NZ cache
        # [num_blocks, Hkv*D // last_dim, block_size, last_dim] (last_dim 16 for 2-byte types).
        # "Norm": into [num_blocks, block_size, Hkv, D] at slot // block_size, slot % block_size.
        # op-plugin's reference skips slots < 0 (we never rely on it).
        assert key.dim() == 3 and key_cache.dim() == 4
        assert key.is_contiguous() and value.is_contiguous() and key.dtype == key_cache.dtype
        T, Hkv, D = key.shape
        if cache_mode == "PA_NZ":
            nb, chunks, bs, last = key_cache.shape
            if chunks * last != Hkv * D:
                raise RuntimeError(f"PA_NZ cache {tuple(key_cache.shape)} does not hold {Hkv}x{D} per token")
            write = lambda cache, x, slot: cache[slot // bs, :, slot % bs].copy_(x.reshape(chunks, last))  # noqa: E731
        elif cache_mode == "Norm":
            nb, bs = key_cache.shape[:2]
            assert key.shape[1:] == key_cache.shape[2:]
            write = lambda cache, x, slot: cache[slot // bs, slot % bs].copy_(x)  # noqa: E731
        else:
            raise RuntimeError(f"unknown cache_mode {cache_mode!r}")
        assert slot_mapping.dtype in (torch.int32, torch.int64) and int(slot_mapping.max()) < nb * bs
        self.calls.append(dict(op="scatter_pa_kv_cache", cache_mode=cache_mode))
        for i, slot in enumerate(slot_mapping.tolist()):
            if slot >= 0:
                write(key_cache, key[i], slot)
                write(value_cache, value[i], slot)

    def _npu_reshape_and_cache(self, key, value, key_cache, value_cache, slots):
        nb, bs = key_cache.shape[:2]
        assert slots.dtype == torch.int32 and int(slots.min()) >= 0 and int(slots.max()) < nb * bs
        key_cache.view(nb * bs, *key_cache.shape[2:])[slots.long()] = key
        value_cache.view(nb * bs, *value_cache.shape[2:])[slots.long()] = value

    def npu_rms_norm(self, x, gamma, epsilon=1e-6):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
        return (xf * rstd * gamma.float()).to(x.dtype), rstd


class _FakeTorchDotNpu:
    class NPUGraph:
        pass

    @staticmethod
    def device_count():
        return 1

    @staticmethod
    def graph_pool_handle():
        return (0, 1)

    @staticmethod
    @contextlib.contextmanager
    def graph(g, pool=None):
        yield


@pytest.fixture
def npu_platform(monkeypatch):
    fake = _FakeTorchNpu()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.setattr(torch, "npu", _FakeTorchDotNpu, raising=False)
    sys.modules.pop("sizewise.platform.npu", None)
    from sizewise.platform.npu import NpuPlatform

    yield NpuPlatform(0), fake
    sys.modules.pop("sizewise.platform.npu", None)


@pytest.mark.parametrize("Q", [1, 4])
def test_npu_paged_attention_calls_follow_fia_docs(npu_platform, Q):
    plat, fake = npu_platform
    assert plat.preferred_block_size == 128 and plat.supports_graphs
    q, kc, vc, tables, ctx, keys, values = _paged_case(40 + Q, B=3, Q=Q, H=4, Hkv=2, D=64, block_size=128,
                                                       max_blocks=2, dtype=torch.bfloat16)
    tables = tables[:, :2]  # B * M = 6 <= num_blocks = 9: the static path's block-count rule holds
    ref = CpuPlatform().paged_attention(q.float(), kc.float(), vc.float(), tables, ctx, 0.25)
    eager = plat.paged_attention(q, kc, vc, tables, ctx, 0.25)
    with plat.make_graph().warmup():  # the shape-static path used for warm-up and capture
        static = plat.paged_attention(q, kc, vc, tables, ctx, 0.25)
        wide = torch.cat([tables, torch.full((3, 2), -1, dtype=torch.int32)], 1)  # B * M = 12 > 9
        fallback = plat.paged_attention(q, kc, vc, wide, ctx, 0.25)
    # Eager: TND with the causal mask (vllm-ascend's decode call); static: BSND with the built mask.
    assert [(c["layout"], c["sparse_mode"]) for c in fake.calls] == [("TND", 3), ("BSND", 0)]  # wide: no FIA
    torch.testing.assert_close(eager.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(static.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fallback.float(), ref, atol=2e-2, rtol=2e-2)
    # Padded rows (all -1, context_len Q) stay finite on the static path.
    tables[1:] = -1
    ctx[1:] = Q
    with plat.make_graph().capture():
        padded = plat.paged_attention(q, kc, vc, tables, ctx, 0.25)
    assert torch.isfinite(padded.float()).all()


def test_npu_fallbacks_and_kv_write(npu_platform):
    plat, fake = npu_platform
    # float32 or block size 16 are outside FIA's documented range: reference op, no FIA call.
    q, kc, vc, tables, ctx, _, _ = _paged_case(5, B=2, Q=1, H=4, Hkv=2, D=16, block_size=16, max_blocks=3)
    torch.testing.assert_close(plat.paged_attention(q, kc, vc, tables, ctx, 0.25),
                               CpuPlatform().paged_attention(q, kc, vc, tables, ctx, 0.25))
    assert fake.calls == []
    k = torch.randn(3, 2, 16).bfloat16()
    for op in ("scatter_pa_kv_cache", "reshape_and_cache"):  # today's op, then torch_npu without it
        kc16 = torch.zeros(4, 128, 2, 16, dtype=torch.bfloat16)
        vc16 = torch.zeros_like(kc16)
        before = len(fake.calls)
        plat.write_kv(k, 2 * k, kc16, vc16, torch.tensor([5, -1, 130]))
        assert [(c.get("op"), c.get("cache_mode")) for c in fake.calls[before:]] == (
            [("scatter_pa_kv_cache", "Norm")] if op == "scatter_pa_kv_cache" else [])
        flat, vflat = kc16.view(-1, 2, 16), vc16.view(-1, 2, 16)
        assert torch.equal(flat[5], k[0]) and torch.equal(flat[130], k[2]) and torch.equal(vflat[130], 2 * k[2])
        assert torch.equal(flat[-1], k[1])  # padding went to the sink's last slot
        assert int((flat != 0).any(-1).any(-1).sum()) == 3, "no other slot written"
        plat._scatter_kv_ok = False  # as NpuPlatform finds a torch_npu that lacks the op
    x = torch.randn(3, 16).bfloat16()
    w = torch.rand(16).bfloat16()
    torch.testing.assert_close(plat.rms_norm(x, w, 1e-6).float(), CpuPlatform().rms_norm(x, w, 1e-6).float(),
                               atol=2e-2, rtol=2e-2)


def test_npu_prepare_paged_shared_across_layers(npu_platform):
    plat, fake = npu_platform
    q, kc, vc, tables, ctx, _, _ = _paged_case(9, B=2, Q=3, H=4, Hkv=2, D=64, block_size=128,
                                               max_blocks=2, dtype=torch.bfloat16)
    tables = tables[:, :2]
    ref = CpuPlatform().paged_attention(q.float(), kc.float(), vc.float(), tables, ctx, 0.25)
    prepared = plat.prepare_paged(tables, ctx, 3, 128, torch.bfloat16)
    for _ in range(2):  # two "layers" reuse one prepared step
        torch.testing.assert_close(plat.paged_attention(q, kc, vc, tables, ctx, 0.25, prepared).float(),
                                   ref, atol=2e-2, rtol=2e-2)
    with plat.make_graph().warmup():
        static = plat.prepare_paged(tables, ctx, 3, 128, torch.bfloat16)
        torch.testing.assert_close(plat.paged_attention(q, kc, vc, tables, ctx, 0.25, static).float(),
                                   ref, atol=2e-2, rtol=2e-2)
    assert [(c["layout"], c["sparse_mode"]) for c in fake.calls] == [("TND", 3), ("TND", 3), ("BSND", 0)]
    # Not FIA-eligible (float32): the reference op's own prepared metadata.
    base = plat.prepare_paged(tables, ctx, 3, 128, torch.float32)
    assert isinstance(base, tuple)
    torch.testing.assert_close(plat.paged_attention(q.float(), kc.float(), vc.float(), tables, ctx, 0.25, base),
                               ref, atol=1e-5, rtol=1e-5)


def test_npu_host_lengths_not_reused_for_a_new_tensor(npu_platform, monkeypatch):
    """The per-forward memo of host context lengths must not match the next step's fresh
    tensor even when it lands at the same address with version 0 and (after the old one is
    freed) the same id(): simulated here with a storage-sharing tensor and a constant id()."""
    plat, _ = npu_platform
    import sizewise.platform.npu as npu_mod

    monkeypatch.setattr(npu_mod, "id", lambda obj: 1, raising=False)  # id() reuse, as after a free
    first = torch.tensor([5, 9], dtype=torch.int32)
    assert plat._host_lens(first) == [5, 9]
    assert plat._host_lens(first) == [5, 9]  # same tensor, same version: read once
    arr = first.numpy()
    nxt = torch.from_numpy(arr)  # a new tensor at the same address, version 0
    arr[:] = [6, 10]  # the next step's lengths (a numpy write bumps no version counter)
    assert nxt.data_ptr() == first.data_ptr() and nxt._version == first._version
    assert plat._host_lens(nxt) == [6, 10]
    first.add_(1)  # in-place update of a memoised tensor (a static buffer): re-read too
    assert plat._host_lens(first) == [7, 11]


def test_cuda_platform_reference_fallback_plumbing(monkeypatch):
    """CudaPlatform with torch.cuda faked: CPU tensors cannot take the Triton kernel, so the
    reference op must run even when prepare_paged returned None (Triton importable)."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name="fake", multi_processor_count=4))
    from sizewise.platform.cuda import CudaPlatform

    plat = CudaPlatform(0)
    assert plat.supports_graphs and plat.preferred_block_size == 16
    q, kc, vc, tables, ctx, keys, values = _paged_case(2, B=3, Q=2, H=4, Hkv=2, D=16, block_size=4, max_blocks=4)
    prepared = plat.prepare_paged(tables, ctx, 2, 4, torch.float32)
    assert (prepared is None) == (importlib.util.find_spec("triton") is not None)
    got = plat.paged_attention(q, kc, vc, tables, ctx, 0.25, prepared)
    torch.testing.assert_close(got.double(), _dense_causal(q, keys, values, 0.25), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cuda:3"):
        CudaPlatform(3)


# ----- dispatch at real head layouts ---------------------------------------------------------
# (name, query heads, KV heads, head_dim) of the checkpoints the device checks use.
REAL_LAYOUTS = [("Llama-3.2-1B", 32, 8, 64), ("Qwen2.5-7B", 28, 4, 128)]


@pytest.mark.parametrize("Q", [1, 5])
@pytest.mark.parametrize("layout", REAL_LAYOUTS, ids=[x[0] for x in REAL_LAYOUTS])
def test_npu_takes_fia_for_bf16_at_real_layouts(npu_platform, layout, Q):
    plat, fake = npu_platform
    _, H, Hkv, D = layout
    path = plat.paged_attention_path(torch.bfloat16, torch.bfloat16, H, Hkv, D, 128, Q, captured=False)
    assert (path.name, path.fast, path.bounded) == ("fia-tnd", True, True)
    q, kc, vc, tables, ctx, keys, values = _paged_case(D + Q, B=2, Q=Q, H=H, Hkv=Hkv, D=D, block_size=128,
                                                       max_blocks=2, dtype=torch.bfloat16)
    got = plat.paged_attention(q, kc, vc, tables, ctx, D**-0.5)
    assert [(c["layout"], c["S"]) for c in fake.calls] == [("TND", Q)] and plat.attention_calls == {"fia-tnd": 1}
    torch.testing.assert_close(got.double(), _dense_causal(q, keys, values, D**-0.5), atol=2e-2, rtol=2e-2)
    # float32 activations against a bf16 cache (what a float32-loaded model produced): not FIA.
    assert plat.paged_attention_path(torch.float32, torch.bfloat16, H, Hkv, D, 128, Q, captured=False).name == "reference"


def test_npu_head_dim_fia_tnd_cannot_take_falls_back_and_says_so_once(npu_platform, caplog):
    plat, fake = npu_platform
    H, Hkv, D = 8, 2, 96  # FIA's TND layout takes head_dim 64, 128, 192 only
    q, kc, vc, tables, ctx, keys, values = _paged_case(96, B=2, Q=1, H=H, Hkv=Hkv, D=D, block_size=128,
                                                       max_blocks=2, dtype=torch.bfloat16)
    with caplog.at_level("WARNING", logger="sizewise.platform"):
        for _ in range(3):  # three "layers"
            got = plat.paged_attention(q, kc, vc, tables, ctx, D**-0.5)
    assert fake.calls == [] and plat.attention_calls == {"reference": 3}
    torch.testing.assert_close(got.double(), _dense_causal(q, keys, values, D**-0.5), atol=2e-2, rtol=2e-2)
    said = [r.getMessage() for r in caplog.records if "head_dim 96" in r.getMessage()]
    assert len(said) == 1 and "reference" in said[0], caplog.text


def test_npu_captured_fia_reads_the_table_width_so_engines_do_not_capture_it(npu_platform):
    """The static (capturable) FIA call takes capacity lengths: it would read max_model_len per
    row. capture_blocker says so, and the model runner decodes eagerly (FIA TND, exact lengths)."""
    from sizewise.engine.graph_runner import capture_blocker

    plat, _ = npu_platform
    path = plat.paged_attention_path(torch.bfloat16, torch.bfloat16, 32, 8, 64, 128, 1, captured=True)
    assert (path.name, path.fast, path.bounded) == ("fia-bsnd-static", True, False)
    why = capture_blocker(plat, torch.bfloat16, 32, 8, 64, 128, (1,))
    assert why is not None and "max_model_len" in why


def _fake_cuda_platform(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name="fake", multi_processor_count=132))
    from sizewise.platform.cuda import CudaPlatform

    return CudaPlatform(0)


@pytest.mark.parametrize("layout", REAL_LAYOUTS, ids=[x[0] for x in REAL_LAYOUTS])
def test_cuda_selects_triton_for_bf16_at_real_layouts_even_in_capture(monkeypatch, layout):
    """The dispatch the CUDA platform runs (dtype / shape rules only, no GPU needed): bf16 at the
    real head layouts takes Triton, eagerly and captured (its loop stops at context_lens, so
    capture is allowed); the float32-activations-on-a-bf16-cache mismatch that a float32-loaded
    model produced does not, and an engine would not capture it."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[test]')")
    from sizewise.engine.graph_runner import capture_blocker

    plat = _fake_cuda_platform(monkeypatch)
    _, H, Hkv, D = layout
    for Q in (1, 5):
        for captured in (False, True):
            path = plat.paged_attention_path(torch.bfloat16, torch.bfloat16, H, Hkv, D, 16, Q, captured=captured)
            assert (path.name, path.fast, path.bounded) == ("triton", True, True)
    assert capture_blocker(plat, torch.bfloat16, H, Hkv, D, 16, (1, 5)) is None
    mixed = plat.paged_attention_path(torch.float32, torch.bfloat16, H, Hkv, D, 16, 1, captured=True)
    assert (mixed.name, mixed.bounded) == ("reference", False) and "KV cache dtype" in mixed.reason
    assert capture_blocker(plat, torch.float32, H, Hkv, D, 16, (1,)) is None  # float32 + float32 cache: Triton
    assert plat.paged_attention_path(torch.bfloat16, torch.bfloat16, H, Hkv, 320, 16, 1, captured=False).name == "reference"
