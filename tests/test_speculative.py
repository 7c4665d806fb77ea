"""Speculative decoding (engine/spec/): prompt lookup and draft-model proposals are
lossless. Greedy output equals transformers' greedy `generate` for every family, alone and in
mixed batches; sampled output follows the target distribution (chi-square against the analytic
distribution and against plain decoding); stops cut accepted runs exactly; a model that copies
(an explicit induction-head Llama, built here) is accepted almost always on copy-heavy prompts."""

from __future__ import annotations

import asyncio
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from conftest import FAMILY_CONFIGS, _byte_tokenizer, build_checkpoint

from sizewise import LLM, InvalidRequestError, SamplingParams
from sizewise.engine.async_engine import AsyncEngine
from sizewise.engine.config import EngineConfig
from sizewise.engine.core import EngineCore
from sizewise.engine.sampler import Sampler
from sizewise.engine.spec.ngram import NgramIndex, prompt_lookup
from sizewise.engine.spec.rejection import rejection_sample

FAMILIES = list(FAMILY_CONFIGS)
ENGINE = dict(device="cpu", dtype="float32", max_model_len=256, max_num_seqs=8, kv_cache_bytes=8 << 20)


# ----- checkpoints ------------------------------------------------------------------------------
def perturbed_copy(src: Path, dst: Path, rel_noise: float, seed: int = 7) -> Path:
    """The same model with every matrix jittered: a draft that agrees often but not always."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name, w in sd.items():
        if w.dim() >= 2:
            sd[name] = w + rel_noise * w.std() * torch.randn(w.shape, generator=g, dtype=w.dtype)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def build_copy_checkpoint(path: Path, vocab_size: int = 320, max_position: int = 512) -> Path:
    """A two-layer Llama that continues any text by copying: an explicit induction head.

    Residual stream = [E: one-hot current token | P: one-hot previous token | N: one-hot predicted
    next token | C: constant]. Layer 0 is a previous-token head: q, k read the constant dims in
    high-frequency rotary pairs, k rotated one step ahead, so the score peaks at distance 1; it
    copies E of the previous position into P. Layer 1 is the induction head: q = E (current token),
    k = P, in rotary pairs of ~zero frequency (rope_theta 1e12) so RoPE leaves the match intact; it
    copies E of the position after the previous occurrence of the current token into N, which the
    LM head reads. MLPs are zero.
    """
    V, C, D = vocab_size, 64, 512
    H = 3 * V + C
    E, P, N, K = 0, V, 2 * V, 3 * V
    cfg = transformers.LlamaConfig(
        hidden_size=H, intermediate_size=8, num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
        head_dim=D, vocab_size=V, max_position_embeddings=max_position, rope_theta=1e12,
        tie_word_embeddings=False, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    model = transformers.LlamaForCausalLM(cfg)
    half = D // 2
    inv_freq = 1.0 / (1e12 ** (torch.arange(0, D, 2).float() / D))  # the rope_theta above
    content = ([i for i in range(96, half)] + [i + half for i in range(96, half)])[:V]  # slow pairs
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    emb = torch.zeros(V, H)
    emb[torch.arange(V), E + torch.arange(V)] = 1.0
    emb[:, K:K + C] = 1.0 / math.sqrt(C)
    sd["model.embed_tokens.weight"] = emb
    for name in sd:
        if name.endswith("norm.weight"):
            sd[name] = torch.ones(H)
    wq, wk, wv, wo = torch.zeros(D, H), torch.zeros(D, H), torch.zeros(D, H), torch.zeros(H, D)
    for i in range(32):  # previous-token head over the 32 fastest rotary pairs
        th = inv_freq[i].item()
        wq[i, K + i] = 40.0
        wk[i, K + i], wk[i + half, K + i] = 40.0 * math.cos(th), 40.0 * math.sin(th)
    for t in range(V):
        wv[content[t], E + t] = 1.0
        wo[P + t, content[t]] = 1.0
    for n_, w in zip(("q", "k", "v", "o"), (wq, wk, wv, wo)):
        sd[f"model.layers.0.self_attn.{n_}_proj.weight"] = w
    wq, wk, wv, wo = torch.zeros(D, H), torch.zeros(D, H), torch.zeros(D, H), torch.zeros(H, D)
    for t in range(V):
        wq[content[t], E + t] = 60.0
        wk[content[t], P + t] = 60.0
        wv[content[t], E + t] = 1.0
        wo[N + t, content[t]] = 1.0
    for n_, w in zip(("q", "k", "v", "o"), (wq, wk, wv, wo)):
        sd[f"model.layers.1.self_attn.{n_}_proj.weight"] = w
    lm = torch.zeros(V, H)
    lm[torch.arange(V), N + torch.arange(V)] = 30.0
    sd["lm_head.weight"] = lm
    model.load_state_dict(sd)
    model.save_pretrained(path)
    _byte_tokenizer(path, V)
    return path


@pytest.fixture(scope="module")
def drafts(checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drafts")
    return {f: perturbed_copy(checkpoints[f], root / f, rel_noise=0.6) for f in FAMILIES}


@pytest.fixture(scope="module")
def copy_dir(tmp_path_factory) -> Path:
    return build_copy_checkpoint(tmp_path_factory.mktemp("copy") / "copy")


@pytest.fixture(scope="module")
def other_seed_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("seed1") / "llama"
    build_checkpoint(path, "llama", seed=1)
    return path


def spec_llm(target: Path, draft: Path | None = None, **kw) -> LLM:
    llm = LLM(target, **{**ENGINE, **kw})
    if draft is not None:
        llm.engine.attach_draft(EngineCore(draft, EngineConfig(**{**ENGINE, **kw}), name="draft"))
    return llm


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


# Repetition in the prompt so prompt lookup proposes from the first step on.
PROMPTS = [
    [5, 17, 33, 8, 40, 5, 17, 33, 8, 40, 5, 17],
    [100, 101, 102, 103, 104, 105, 106, 100, 101, 102],
    [7, 9, 7, 9, 7, 9, 11, 7, 9],
]


# ----- proposer ---------------------------------------------------------------------------------
def _lookup_reference(seq: list[int], k: int, lo: int, hi: int) -> list[int]:
    L = len(seq)
    for n in range(min(hi, L - 1), lo - 1, -1):
        suffix = seq[L - n:]
        for i in range(L - n - 1, -1, -1):  # latest occurrence that ends before the last token
            if seq[i:i + n] == suffix:
                copied = list(seq)
                for j in range(k):  # copy on from the match, reading what was copied so far
                    copied.append(copied[i + n + j])
                return copied[L:]
    return []


def test_prompt_lookup_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(300):
        L = int(rng.integers(1, 40))
        seq = rng.integers(0, 4 if trial % 2 else 12, size=L).tolist()
        k, lo = int(rng.integers(1, 6)), int(rng.integers(1, 3))
        hi = lo + int(rng.integers(0, 3))
        got = prompt_lookup(seq, k, lo, hi)
        assert got == _lookup_reference(seq, k, lo, hi), (seq, k, lo, hi)
    # the longest suffix wins over a later shorter match; a loop is continued, not cut short
    assert prompt_lookup([1, 2, 3, 9, 8, 3, 7, 2, 3], 2, 1, 3) == [9, 8]
    assert prompt_lookup([4, 5, 6, 5, 6, 5], 4, 2, 3) == [6, 5, 6, 5]


def test_incremental_index_proposes_what_a_fresh_lookup_does():
    """A sequence's index is grown token by token (and in runs, as verification appends them):
    at every length it must propose what the from-scratch lookup proposes."""
    rng = np.random.default_rng(1)
    for trial in range(40):
        seq = rng.integers(0, 5, size=60).tolist()
        index = NgramIndex(2, 3)
        n = 1
        while n <= len(seq):
            index.sync(seq[:n])
            assert index.propose(4) == _lookup_reference(seq[:n], 4, 2, 3)
            n += int(rng.integers(1, 4))


# ----- greedy exactness -------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_identical_for_every_strategy_and_mixed_batches(checkpoints, drafts, family):
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    ref = [
        hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, pad_token_id=2)[0, len(p):].tolist()
        for p in PROMPTS
    ]
    llm = spec_llm(checkpoints[family], drafts[family])
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for strategy in ("plain", "pld", "draft", "pld_adaptive"):
        assert tokens(llm.generate(PROMPTS, sp, strategy=strategy)) == ref, strategy
    mixed = llm.generate(PROMPTS * 3, sp, strategy=["plain", "pld", "draft"] * 2 + ["draft", "pld_adaptive", "pld"])
    assert tokens(mixed) == ref * 3
    st = llm.engine.stats()
    assert st.spec_accepted_tokens["pld"] > 0
    assert 0 < st.spec_accepted_tokens["draft"] < st.spec_draft_tokens["draft"]  # accepts and rejects
    assert llm.engine.block_manager.num_used_blocks == 0
    assert llm.engine.draft.block_manager.num_used_blocks == 0  # shadows freed at finish


def test_draft_cache_follows_the_accepted_tokens(llama_dir):
    """With the target itself as draft every greedy proposal must be accepted: a stale or
    misaligned draft KV cache (rollback, catch-up after a fully accepted run) would show here."""
    llm = spec_llm(llama_dir, llama_dir)
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    out = llm.generate(PROMPTS + [[9] * 20], sp, strategy="draft")
    st = llm.engine.stats()
    assert st.spec_draft_tokens["draft"] > 0
    assert st.spec_accepted_tokens["draft"] == st.spec_draft_tokens["draft"]
    assert all(o.outputs[0].num_accepted_tokens == o.outputs[0].num_draft_tokens for o in out)


@pytest.mark.parametrize("batching", ["split", "padded"])
def test_batching_modes_and_independent_draft_are_exact(llama_dir, other_seed_llama, batching):
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = tokens(LLM(llama_dir, **ENGINE).generate(PROMPTS, sp))
    llm = spec_llm(llama_dir, other_seed_llama, spec_batching=batching, prompt_lookup_min=1)
    out = llm.generate(PROMPTS * 2, sp, strategy=["pld", "plain", "draft", "plain", "pld_adaptive", "draft"])
    assert tokens(out) == ref * 2
    assert llm.engine.stats().spec_draft_tokens["draft"] > 0


def test_penalties_min_tokens_logprobs_and_stops_match_plain(llama_dir, drafts):
    llm = spec_llm(llama_dir, drafts["llama"], prompt_lookup_min=1)
    prompts = PROMPTS + [[20 + i, 21, 22, 20 + i, 21, 22] for i in range(5)]
    # mild penalties: proposals still get accepted, and each verify row must see the tokens before it
    cases = [
        SamplingParams(temperature=0, max_tokens=40, frequency_penalty=0.05, presence_penalty=0.05, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, repetition_penalty=1.1, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, min_tokens=12, stop_token_ids=[7, 9, 17, 33]),
    ]
    for sp in cases:
        ref = llm.generate(prompts, sp)
        for strategy in ("pld", "draft"):
            out = llm.generate(prompts, sp, strategy=strategy)
            for a, b in zip(out, ref):
                a, b = a.outputs[0], b.outputs[0]
                assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == (
                    b.token_ids, b.text, b.finish_reason, b.stop_reason)
                if sp.logprobs:
                    assert [list(d) for d in a.logprobs] == [list(d) for d in b.logprobs]
                    for da, db in zip(a.logprobs, b.logprobs):
                        assert all(abs(da[t] - db[t]) < 1e-4 for t in da)
    assert llm.engine.stats().spec_accepted_tokens["pld"] > 0


def test_preemption_under_a_small_cache_keeps_results(llama_dir):
    prompts = [[5 + i, 17, 33, 8, 5 + i, 17, 33, 8] * 3 for i in range(8)]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = tokens(LLM(llama_dir, **ENGINE).generate(prompts, sp))
    small = spec_llm(llama_dir, kv_cache_bytes=14 * 16 * 512, prompt_lookup_min=1)  # 14 blocks of 16
    assert tokens(small.generate(prompts, sp, strategy="pld")) == ref
    assert small.engine.stats().num_preemptions > 0


def test_verify_rows_are_scheduled_inside_the_token_budget(llama_dir):
    """A verify row computes k+1 positions: the scheduler counts them against
    max_num_batched_tokens (rows that do not fit decode plainly), and lists them in its output."""
    prompts = [[5 + i, 17, 33, 8, 5 + i, 17, 33, 8] * 2 for i in range(4)]
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ref = tokens(LLM(llama_dir, **ENGINE).generate(prompts, sp))
    llm = spec_llm(llama_dir, max_num_batched_tokens=9, spec_batching="split", prompt_lookup_min=1)
    sched = llm.engine.scheduler
    seen, schedule = [], sched.schedule

    def spy():
        out = schedule()
        seen.append((out.num_tokens, len(out.verifies), len(out.decodes), out.verify_q))
        return out
    sched.schedule = spy
    assert tokens(llm.generate(prompts, sp, strategy="pld")) == ref
    assert all(n <= 9 for n, *_ in seen)
    # four decoding rows leave room for one verify row (4 + 4 more positions), never two
    assert max(v for _, v, _, _ in seen) == 1 and any(v == 1 and d == 3 for _, v, d, _ in seen)
    assert all(q == 5 for *_, q in seen)


# ----- copying: acceptance and exact stops inside accepted runs ---------------------------------
def _perm(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(300, generator=g) + 10)[:n].tolist()  # distinct ids, no specials


def test_copy_heavy_prompt_is_accepted_and_counted(copy_dir):
    doc = _perm(150)
    llm = spec_llm(copy_dir, max_model_len=512, kv_cache_bytes=32 << 20)
    sp = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    prompts = [doc + doc[:3], doc[:40] + doc[:2]]
    expect = [doc[3:63], doc[2:40] + doc[:22]]
    assert tokens(llm.generate(prompts, sp)) == expect  # the model copies (plain decode)
    before = llm.engine.stats()
    out = llm.generate(prompts, sp, strategy="pld")
    assert tokens(out) == expect
    st = llm.engine.stats()
    drafted = st.spec_draft_tokens["pld"] - before.spec_draft_tokens["pld"]
    accepted = st.spec_accepted_tokens["pld"] - before.spec_accepted_tokens["pld"]
    assert drafted == sum(o.outputs[0].num_draft_tokens for o in out) > 0
    assert accepted == sum(o.outputs[0].num_accepted_tokens for o in out)
    assert accepted / drafted > 0.9 and st.spec_acceptance_ema["pld"] > 0.9
    # about k+1 = 5 tokens per verify step instead of 1
    assert st.spec_verify_steps["pld"] - before.spec_verify_steps["pld"] < 120 / 4


@pytest.mark.parametrize("strategy", ["pld", "draft"])
def test_stops_cut_accepted_runs_exactly(copy_dir, strategy):
    llm = spec_llm(copy_dir, copy_dir if strategy == "draft" else None, max_model_len=512, kv_cache_bytes=32 << 20)
    tok = llm.tokenizer
    # distinct tokens that decode to printable ASCII, so a stop string is plain text
    ascii_ids = [t for t in range(10, 320) if (s := tok.decode([t])).isascii() and s.isprintable() and s.strip()]
    doc = [ascii_ids[i] for i in torch.randperm(len(ascii_ids), generator=torch.Generator().manual_seed(1))[:80]]
    doc[30] = 1  # EOS inside the text that is being copied
    prompt = doc + doc[:3]
    text = tok.decode(doc[3 + 11:3 + 13])
    cases = [
        (SamplingParams(temperature=0, max_tokens=13), doc[3:3 + 13]),
        (SamplingParams(temperature=0, max_tokens=60, stop_token_ids=[doc[3 + 8]]), doc[3:3 + 9]),
        # min_tokens ends inside a verify step (outputs 6..10): the stop is allowed from output 7 on
        (SamplingParams(temperature=0, max_tokens=60, min_tokens=7, stop_token_ids=[doc[3 + 8]]), doc[3:3 + 9]),
        (SamplingParams(temperature=0, max_tokens=60), doc[3:31]),  # EOS is emitted, then stop
        (SamplingParams(temperature=0, max_tokens=60, stop=[text]), doc[3:3 + 13]),
        (SamplingParams(temperature=0, max_tokens=60, stop=[text], include_stop_str_in_output=True), doc[3:3 + 13]),
    ]
    for sp, expect in cases:
        ref = llm.generate([prompt], sp)[0].outputs[0]
        got = llm.generate([prompt], sp, strategy=strategy)[0].outputs[0]
        if expect is not None:
            assert ref.token_ids == expect
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
            ref.token_ids, ref.text, ref.finish_reason, ref.stop_reason)
        assert got.num_accepted_tokens > 0
    assert llm.engine.block_manager.num_used_blocks == 0


# ----- sampling: the target distribution, exactly -------------------------------------------------
def _chisquare_ok(counts: np.ndarray, probs: np.ndarray) -> float:
    assert counts[probs == 0].sum() == 0  # impossible tokens never appear
    keep = probs > 0
    expected = probs[keep].astype(np.float64)
    expected *= counts.sum() / expected.sum()
    return scipy.stats.chisquare(counts[keep], expected).pvalue


def test_rejection_sampler_preserves_the_target_distribution():
    V, k, B = 6, 3, 24000
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([  # target distribution per verify position (k+1), one a top-p style zero
        [0.30, 0.25, 0.20, 0.15, 0.10, 0.00],
        [0.05, 0.10, 0.15, 0.20, 0.25, 0.25],
        [0.40, 0.05, 0.05, 0.20, 0.20, 0.10],
        [0.10, 0.30, 0.10, 0.30, 0.10, 0.10],
    ])
    q = torch.tensor([  # a draft that disagrees: rejection must happen
        [0.05, 0.05, 0.30, 0.30, 0.10, 0.20],
        [0.40, 0.30, 0.10, 0.10, 0.05, 0.05],
        [0.10, 0.40, 0.30, 0.05, 0.05, 0.10],
    ])
    half = B // 2
    draft_tok = torch.empty(B, k, dtype=torch.long)
    draft_tok[:half] = torch.multinomial(q, half, replacement=True, generator=g).T  # sampled from q
    draft_tok[half:] = torch.tensor([2, 5, 0])  # prompt lookup: fixed tokens (a point mass)
    draft_tok[B - 2000:B - 1000, 0] = 5  # ... and an impossible one (p = 0): always rejected
    draft_probs = q.expand(half, k, V).contiguous()  # rows [:half] sampled; the rest are point masses
    num_proposed = [k] * (B - 2000) + [1] * 1000 + [0] * 1000  # short proposals are padded
    probs = p.expand(B, k + 1, V).contiguous()
    num_acc, nxt = rejection_sample(
        draft_tok, num_proposed, probs.argmax(-1), probs, draft_probs, torch.arange(half), [False] * B,
        [[None] * (k + 1)] * B, Sampler(torch.device("cpu"), seed=1),
    )
    m = torch.tensor(num_proposed)
    assert (num_acc <= m).all() and 0 < num_acc.float().mean() < k
    assert (num_acc[B - 2000:B - 1000] == 0).all()
    emitted = torch.cat([draft_tok, torch.zeros(B, 1, dtype=torch.long)], 1)
    emitted.scatter_(1, num_acc[:, None], nxt[:, None])  # position a holds the resampled/bonus token
    for j in range(k + 1):
        rows = num_acc >= j  # rows that emitted a token at position j (accepted or the next one)
        counts = torch.bincount(emitted[rows, j], minlength=V).numpy()
        assert _chisquare_ok(counts, p[j].numpy()) > 1e-3, (j, counts)
    # greedy rows in the same call: longest prefix equal to the argmax, then the argmax
    ga, gn = rejection_sample(
        torch.tensor([[0, 5, 0], [0, 0, 3]]), [3, 3], torch.tensor([[0, 5, 0, 1], [0, 4, 3, 2]]),
        probs[:2], None, None, [True, True], [[None] * (k + 1)] * 2, Sampler(torch.device("cpu")),
    )
    assert ga.tolist() == [3, 1] and gn.tolist() == [1, 4]


def _position_counts(outs, pos: int) -> dict[int, int]:
    c: dict[int, int] = {}
    for o in outs:
        for s in o.outputs:
            c[s.token_ids[pos]] = c.get(s.token_ids[pos], 0) + 1
    return c


def test_sampled_speculative_decoding_matches_plain_distribution(llama_dir, other_seed_llama):
    llm = spec_llm(llama_dir, other_seed_llama, max_num_seqs=128, kv_cache_bytes=32 << 20, prompt_lookup_min=1)
    prompt = [[7, 9, 11, 7, 9, 11, 7, 9, 11, 7]]
    runs = {}
    for strategy in ("plain", "pld", "draft"):
        runs[strategy] = [
            llm.generate(prompt, SamplingParams(n=128, temperature=1.0, seed=1000 * r, max_tokens=4, ignore_eos=True),
                         strategy=strategy)[0]
            for r in range(3)
        ]
    st = llm.engine.stats()
    # Seeded prompt lookup draws the races plain decoding draws: the very same samples.
    assert [tokens([o]) for o in runs["pld"]] == [tokens([o]) for o in runs["plain"]]
    # A sampled draft is verified by the general rule: proposals rejected as well as accepted.
    assert 0 < st.spec_accepted_tokens["draft"] < st.spec_draft_tokens["draft"]
    for strategy in ("draft",):
        for pos in (1, 2, 3):  # position 0 comes from the prefill; 1.. from verification
            a, b = _position_counts(runs["plain"], pos), _position_counts(runs[strategy], pos)
            keys = sorted(set(a) | set(b), key=lambda t: -(a.get(t, 0) + b.get(t, 0)))
            big = [t for t in keys if a.get(t, 0) + b.get(t, 0) >= 10]
            table = [[a.get(t, 0) for t in big], [b.get(t, 0) for t in big]]
            rest = [384 - sum(table[0]), 384 - sum(table[1])]
            if sum(rest) >= 10:
                table = [row + [r] for row, r in zip(table, rest)]
            assert len(table[0]) >= 2
            pval = scipy.stats.chi2_contingency(np.array(table)).pvalue
            assert pval > 1e-3, (strategy, pos, table)


def test_seeded_prompt_lookup_sampling_emits_plain_decodings_tokens(copy_dir):
    """Point-mass proposals are accepted iff plain decoding's own keyed race picks them, so a
    seeded request samples exactly plain's tokens, alone or batched, with acceptance and
    rejection both happening (temperature 10 flattens the copying model's distribution)."""
    doc = _perm(150)
    llm = spec_llm(copy_dir, max_model_len=512, kv_cache_bytes=32 << 20, max_num_seqs=64)
    sp = SamplingParams(temperature=10.0, seed=3, n=16, max_tokens=40, ignore_eos=True)
    prompts = [doc + doc[:3]]
    plain = [o.token_ids for o in llm.generate(prompts, sp)[0].outputs]
    before = llm.engine.stats()
    pld = [o.token_ids for o in llm.generate(prompts, sp, strategy="pld")[0].outputs]
    st = llm.engine.stats()
    assert pld == plain
    accepted = st.spec_accepted_tokens["pld"] - before.spec_accepted_tokens["pld"]
    assert 0 < accepted < st.spec_draft_tokens["pld"] - before.spec_draft_tokens["pld"]
    noise = SamplingParams(temperature=1.0, n=4, max_tokens=30, ignore_eos=True)
    batched = llm.generate(prompts + [doc[:50] + doc[:2]], [sp, noise], strategy=["pld", "pld"])
    assert [o.token_ids for o in batched[0].outputs] == plain
    # A cache of 30 blocks for 16 sequences: preempted and recomputed, they redraw the same races.
    small = spec_llm(copy_dir, max_model_len=512, kv_cache_bytes=30 * 16 * 8192, max_num_seqs=64)
    assert small.engine.block_manager.num_blocks == 30
    for strategy in ("plain", "pld"):
        assert [o.token_ids for o in small.generate(prompts, sp, strategy=strategy)[0].outputs] == plain
    assert small.engine.stats().num_preemptions > 0


def test_seeded_speculative_sampling_is_reproducible(llama_dir, other_seed_llama):
    llm = spec_llm(llama_dir, other_seed_llama, prompt_lookup_min=1)
    sp = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=5, max_tokens=16, ignore_eos=True)
    for strategy in ("pld", "draft"):
        alone = tokens(llm.generate(PROMPTS[:1], sp, strategy=strategy))
        noise = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
        batched = tokens(llm.generate(PROMPTS, [sp, noise, noise], strategy=[strategy, "pld", "draft"]))
        assert batched[0] == alone[0]


# ----- requests and errors ----------------------------------------------------------------------
def test_bad_strategy_is_rejected_clearly(llama_dir, tmp_path):
    llm = spec_llm(llama_dir)
    sp = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(InvalidRequestError, match="strategy must be one of") as e:
        llm.generate(PROMPTS[:1], sp, strategy="medusa")
    assert e.value.param == "strategy"
    with pytest.raises(InvalidRequestError, match="needs a draft model"):
        llm.generate(PROMPTS[:1], sp, strategy="draft")
    # the router's `auto` is not an engine strategy: the error names the engine's adaptive one
    with pytest.raises(InvalidRequestError, match="pld_adaptive"):
        llm.generate(PROMPTS[:1], sp, strategy="auto")
    off = LLM(llama_dir, num_speculative_tokens=0, **ENGINE)
    with pytest.raises(InvalidRequestError, match="num_speculative_tokens=0"):
        off.generate(PROMPTS[:1], sp, strategy="pld")
    with pytest.raises(ValueError, match=r"num_speculative_tokens must be in \[1, 15\]"):
        LLM(llama_dir, num_speculative_tokens=16, **ENGINE)
    _byte_tokenizer(tmp_path / "tok", 310)
    other_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match="do not share one tokenizer"):
        llm.engine.attach_draft(EngineCore(llama_dir, EngineConfig(**ENGINE), tokenizer=other_tok))
    assert tokens(llm.generate(PROMPTS[:1], sp, strategy="pld"))[0]  # still serving
    assert llm.engine.block_manager.num_used_blocks == 0


def test_abort_frees_target_and_draft_blocks(llama_dir, drafts):
    llm = spec_llm(llama_dir, drafts["llama"])
    core, draft = llm.engine, llm.engine.draft
    sp = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        core.add_request(f"r{i}", p, sp, strategy="draft")
    for _ in range(4):
        core.step()
    assert draft.block_manager.num_used_blocks > 0 and core.stats().spec_draft_tokens["draft"] > 0
    for i in range(len(PROMPTS)):
        assert core.abort_request(f"r{i}").finished
    assert core.block_manager.num_used_blocks == 0 and draft.block_manager.num_used_blocks == 0


async def test_async_engine_passes_the_strategy_through(llama_dir):
    core = EngineCore(llama_dir, EngineConfig(**ENGINE), name="m")
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref = tokens(LLM(llama_dir, **ENGINE).generate(PROMPTS[:1], sp))[0]
    engine = AsyncEngine(core)
    try:
        with pytest.raises(InvalidRequestError, match="strategy"):
            await engine.add_request("bad", PROMPTS[0], sp, strategy="draft")
        got: list[int] = []
        async for out in await engine.add_request("a", PROMPTS[0], sp, strategy="pld"):
            got += out.outputs[0].token_ids if out.outputs else []
            last = out
        assert got == ref and last.finished
        assert last.outputs[0].num_draft_tokens > 0
        assert engine.stats()["m"].spec_draft_tokens["pld"] == last.outputs[0].num_draft_tokens
    finally:
        engine.shutdown()


async def test_draft_core_serves_its_own_requests_while_drafting(llama_dir, drafts):
    """The orchestrator lets the small tier draft for the large one while it serves requests of
    its own: both cores in one AsyncEngine, results exact on both."""
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ref_target = tokens(LLM(llama_dir, **ENGINE).generate(PROMPTS, sp))
    ref_draft = tokens(LLM(drafts["llama"], **ENGINE).generate(PROMPTS, sp))
    target = EngineCore(llama_dir, EngineConfig(**ENGINE), name="target")
    draft = EngineCore(drafts["llama"], EngineConfig(**ENGINE), name="draft")
    target.attach_draft(draft)
    engine = AsyncEngine({"target": target, "draft": draft})

    async def run(rid: str, prompt: list[int], core: str, strategy: str) -> list[int]:
        got: list[int] = []
        async for out in await engine.add_request(rid, prompt, sp, core=core, strategy=strategy):
            got += out.outputs[0].token_ids if out.outputs else []
        return got

    try:
        jobs = [run(f"t{i}", p, "target", "draft") for i, p in enumerate(PROMPTS)]
        jobs += [run(f"d{i}", p, "draft", s) for i, (p, s) in enumerate(zip(PROMPTS, ["plain", "pld", "plain"]))]
        results = await asyncio.gather(*jobs)
    finally:
        engine.shutdown()
    assert results[:3] == ref_target and results[3:] == ref_draft
    assert target.stats().spec_accepted_tokens["draft"] > 0
    assert target.block_manager.num_used_blocks == 0 and draft.block_manager.num_used_blocks == 0
