#!/usr/bin/env python
"""Check sizewise on whatever accelerator is here: correctness first, then decode speed.

    python scripts/check_device.py                                # auto device, tiny shape
    python scripts/check_device.py --shape llama-3.2-1b           # real shape, random weights
    python scripts/check_device.py --shape qwen2.5-7b --check-layers 2 --batch 1,8
    python scripts/check_device.py --device cpu --shape tiny --skip-bench

Nothing is downloaded: the model is a random-weight checkpoint at a real HF config shape
(configs below, written as transformers config objects), saved to a temp dir with a word-level
tokenizer. Linear weights are drawn with std = gain / sqrt(fan_in) (lm_head gain 4) so the
logits are peaked and greedy decoding is not dominated by near-ties.

Steps:
 1. platform: device, memory, measured copy bandwidth (the roofline's peak);
 2. logits: engine (eager, and graph-captured where the platform supports graphs) greedy
    decode with per-token logprobs vs a CPU float32 transformers reference, teacher-forced on
    the engine's own tokens. Checks the logprob error and that every chosen token is the
    reference argmax up to a tie tolerance. The check model can be cut to --check-layers
    layers (same per-layer shapes) to keep the CPU reference cheap;
 3. graphs: greedy outputs equal between enforce_eager=True and False, where a divergence
    is only accepted at a step whose reference top-2 gap is below the tie tolerance;
 4. decode benchmark (full depth): step time of graph vs eager engine (and HF generate with
    --hf-baseline) at each batch size, from two runs of different lengths (prefill cancels),
    against the roofline (weight bytes + KV bytes read per step) / measured copy bandwidth.
Prints tables, writes --json, exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _common import SHAPES  # noqa: E402  (one list of model shapes for all device/benchmark scripts)


def log(msg: str) -> None:
    print(msg, flush=True)


# ----- checkpoint ------------------------------------------------------------------------
def dtype_kw(dtype: torch.dtype) -> dict:
    """transformers >= 4.56 takes `dtype=`, older releases `torch_dtype=`."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def hf_config(shape: str, num_layers: int | None):
    import transformers

    kw = dict(SHAPES[shape])
    model_type = kw.pop("model_type")
    if num_layers is not None:
        kw["num_hidden_layers"] = num_layers
    cls = transformers.AutoConfig.for_model(model_type).__class__
    return cls(**kw, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def build_checkpoint(path: Path, shape: str, num_layers: int | None, dtype: torch.dtype,
                     init_device: torch.device, seed: int) -> None:
    """Random weights (seeded, so every depth shares its first layers' weights) + tokenizer."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = hf_config(shape, num_layers)
    torch.manual_seed(seed)
    with torch.device(init_device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, **dtype_kw(dtype))
    gen = torch.Generator(device=init_device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                gain = 4.0 if "lm_head" in name else 1.0
                fan_in = p.shape[1]
                p.copy_(torch.randn(p.shape, generator=gen, device=init_device, dtype=torch.float32)
                        .mul_(gain / math.sqrt(fan_in)))
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen, device=init_device).mul_(0.4).add_(0.8))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=init_device).mul_(0.02))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    del model
    vocab = {f"w{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="w0", eos_token="w1", pad_token="w2", unk_token="w3"
    )
    fast.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    npu = getattr(torch, "npu", None)
    if npu is not None and hasattr(npu, "empty_cache"):
        npu.empty_cache()


def make_prompts(n: int, lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


# ----- engine runs -------------------------------------------------------------------------
def engine_generate(model_dir: Path, args, prompts, max_tokens: int, enforce_eager: bool,
                    logprobs: int | None = None, max_num_seqs: int | None = None):
    from sizewise import LLM, SamplingParams

    llm = LLM(
        str(model_dir), dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=max_num_seqs or args.max_num_seqs, enforce_eager=enforce_eager,
        enable_prefix_caching=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return llm, [(list(o.outputs[0].token_ids), o.outputs[0].logprobs) for o in outs]


def reference_logprobs(model_dir: Path, prompts, completions) -> list[torch.Tensor]:
    """CPU float32 transformers log-softmax at every generated position: [N, V] per prompt."""
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), **dtype_kw(torch.float32)).eval()
    out = []
    with torch.inference_mode():
        for prompt, toks in zip(prompts, completions):
            ids = torch.tensor([prompt + toks])
            logits = ref(ids).logits[0, len(prompt) - 1: len(prompt) - 1 + len(toks)]
            out.append(torch.log_softmax(logits.float(), -1))
    del ref
    return out


def check_against_reference(name, results, ref_lps, tol_lp, tol_tie) -> dict:
    """Per-token logprob error on the engine's top-N tokens; chosen token must be argmax
    of the reference up to tol_tie."""
    max_err, bad_choice, steps = 0.0, [], 0
    for i, ((toks, lps), ref) in enumerate(zip(results, ref_lps)):
        for t, tok in enumerate(toks):
            steps += 1
            if lps is not None:
                for cand, lp in lps[t].items():
                    max_err = max(max_err, abs(float(lp) - float(ref[t, cand])))
            gap = float(ref[t].max() - ref[t, tok])
            if gap > tol_tie:
                bad_choice.append((i, t, round(gap, 4)))
    ok = max_err <= tol_lp and not bad_choice
    log(f"  {name:<22} steps {steps:4d}  max |logprob err| {max_err:.2e} (tol {tol_lp:.2g})  "
        f"non-argmax choices {len(bad_choice)}  {'PASS' if ok else 'FAIL'}")
    if bad_choice:
        log(f"    first bad choices (prompt, step, ref gap): {bad_choice[:5]}")
    return dict(ok=ok, max_logprob_err=max_err, non_argmax=bad_choice[:20], steps=steps)


def check_eager_vs_graph(eager, graph, ref_lps, tol_tie) -> dict:
    identical, tie_div, bad = 0, [], []
    for i, ((a, _), (b, _), ref) in enumerate(zip(eager, graph, ref_lps)):
        if a == b:
            identical += 1
            continue
        t = next(j for j in range(min(len(a), len(b))) if a[j] != b[j])
        gap = abs(float(ref[t, a[t]] - ref[t, b[t]]))
        (tie_div if gap <= tol_tie else bad).append((i, t, round(gap, 4)))
    ok = not bad
    log(f"  eager vs graph greedy: identical {identical}/{len(eager)}, diverged at a near-tie {len(tie_div)}, "
        f"diverged otherwise {len(bad)}  {'PASS' if ok else 'FAIL'}")
    if tie_div or bad:
        log(f"    divergences (prompt, step, ref gap): near-tie {tie_div[:5]} other {bad[:5]}")
    return dict(ok=ok, identical=identical, total=len(eager), near_tie=tie_div, other=bad)


# ----- benchmark --------------------------------------------------------------------------
def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_seconds(run, n1: int, n2: int, repeats: int) -> float:
    """(min t(n2) - min t(n1)) / (n2 - n1): the prefill and fixed costs cancel."""
    t1 = t2 = float("inf")
    for _ in range(repeats):
        t1 = min(t1, timed(lambda: run(n1)))
        t2 = min(t2, timed(lambda: run(n2)))
    return max(t2 - t1, 1e-9) / (n2 - n1)


def bench_engine(model_dir, args, batch, enforce_eager, platform) -> tuple[float, dict]:
    """Decode step seconds of the engine (see step_seconds)."""
    from sizewise import LLM, SamplingParams

    llm = LLM(
        str(model_dir), dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=max(batch, 1), enforce_eager=enforce_eager, enable_prefix_caching=False,
    )
    n1, n2 = args.bench_short, args.bench_short + args.decode_tokens
    prompts = make_prompts(batch, [args.prompt_len], llm.engine.vocab_size, seed=11)

    def run(n):
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        platform.synchronize()

    run(n1)  # warm-up
    best = step_seconds(run, n1, n2, args.repeats)
    stats = dict(weight_bytes=llm.engine.weight_bytes, step_weight_bytes=llm.engine.step_weight_bytes,
                 kv_bytes_per_token=llm.engine.model_config.kv_bytes_per_token(llm.engine.dtype))
    del llm
    release()
    return best, stats


def bench_hf(model_dir, args, batch, platform, dtype) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), **dtype_kw(dtype))
    model = model.to(platform.device).eval()
    ids = torch.tensor(make_prompts(batch, [args.prompt_len], model.config.vocab_size, seed=11), device=platform.device)
    n1, n2 = args.bench_short, args.bench_short + args.decode_tokens

    def run(n):
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=2)
        platform.synchronize()

    run(n1)
    best = step_seconds(run, n1, n2, args.repeats)
    del model
    release()
    return best


# ----- main -------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | npu[:N]")
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on an accelerator, fp32 on CPU) | float32 | bfloat16 | float16")
    ap.add_argument("--check-layers", type=int, default=None,
                    help="layers of the logits/graph check model (default: all for tiny, 2 otherwise)")
    ap.add_argument("--check-prompts", type=int, default=5, help="prompts in the check batch (padded to a bucket)")
    ap.add_argument("--check-tokens", type=int, default=24)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--batch", default="1,8", help="decode benchmark batch sizes")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64, help="extra tokens of the long timing run")
    ap.add_argument("--bench-short", type=int, default=8, help="tokens of the short timing run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--hf-baseline", action="store_true", help="also time transformers generate() on the device")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None, help="where to write checkpoints (default: a temp dir)")
    args = ap.parse_args(argv)

    from sizewise.platform import get_platform

    platform = get_platform(args.device)
    args.device = str(platform.device) if platform.device.type != "cpu" else "cpu"
    on_cpu = platform.device.type == "cpu"
    if args.dtype == "auto":
        args.dtype = "float32" if on_cpu else "bfloat16"
    dtype = getattr(torch, args.dtype)
    if args.max_model_len is None:
        args.max_model_len = max(args.prompt_len + args.bench_short + args.decode_tokens, 256) + 64
    check_layers = args.check_layers
    if check_layers is None:
        check_layers = SHAPES[args.shape]["num_hidden_layers"] if args.shape == "tiny" else 2
    # Tolerances: logprob error and the tie width within which two tokens count as equal.
    tol_lp, tol_tie = (2e-3, 2e-3) if dtype == torch.float32 else (0.25, 0.1)

    report: dict = dict(device=str(platform.device), platform=platform.name, shape=args.shape, dtype=args.dtype,
                        torch=torch.__version__, checks={}, bench=[])
    mem = platform.memory_info()
    bw = platform.peak_bandwidth()
    name = getattr(platform, "device_name", platform.name)
    log(f"platform {platform.name} ({name}) device {platform.device}: {mem.total_bytes / 2**30:.1f} GiB total, "
        f"{mem.free_bytes / 2**30:.1f} GiB free, copy bandwidth {bw / 1e9:.0f} GB/s, "
        f"graphs {'yes' if platform.supports_graphs else 'no'}, block size {platform.preferred_block_size}")
    report.update(peak_bandwidth=bw, supports_graphs=platform.supports_graphs)
    init_device = platform.device if not on_cpu else torch.device("cpu")
    all_ok = True

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        if not args.skip_check:
            ckpt = tmp / "check"
            log(f"\n[check] {args.shape} cut to {check_layers} layer(s), {args.dtype}, random weights -> {ckpt}")
            build_checkpoint(ckpt, args.shape, check_layers, dtype, init_device, args.seed)
            release()
            vocab = SHAPES[args.shape]["vocab_size"]
            bs = platform.preferred_block_size
            # Lengths straddle block boundaries; the count is not a bucket size, so rows are padded.
            lengths = [3, bs + 1, 2 * bs - 1, 5 * bs + 3, 17]
            prompts = make_prompts(args.check_prompts, lengths, vocab, seed=args.seed + 1)
            llm, eager = engine_generate(ckpt, args, prompts, args.check_tokens, enforce_eager=True, logprobs=5)
            del llm
            release()
            modes = [("engine eager", eager)]
            graph = None
            llm, graph = engine_generate(ckpt, args, prompts, args.check_tokens, enforce_eager=False, logprobs=5)
            runner = getattr(getattr(llm, "engine", None), "runner", None)
            gr = getattr(runner, "graph_runner", None)
            graph_mode = gr.mode if gr is not None else "none (platform has no graphs)"
            log(f"  enforce_eager=False runs with decode graph runner: {graph_mode}"
                + (f", buckets {gr.buckets}" if gr is not None else ""))
            report["graph_runner_mode"] = graph_mode
            del llm
            release()
            modes.append(("engine enforce_eager=False", graph))
            ref_lps = reference_logprobs(ckpt, prompts, [t for t, _ in eager])
            # A diverged graph run needs its own teacher-forced reference.
            ref_graph = ref_lps if [t for t, _ in graph] == [t for t, _ in eager] else \
                reference_logprobs(ckpt, prompts, [t for t, _ in graph])
            log(f"  logits vs CPU float32 transformers ({args.check_prompts} prompts x {args.check_tokens} tokens)")
            for (label, res), ref in zip(modes, (ref_lps, ref_graph)):
                r = check_against_reference(label, res, ref, tol_lp, tol_tie)
                report["checks"][label] = r
                all_ok &= r["ok"]
            r = check_eager_vs_graph(eager, graph, ref_lps, tol_tie)
            report["checks"]["eager_vs_graph"] = r
            all_ok &= r["ok"]
            # Single sequence: bucket 1 path.
            llm, one_e = engine_generate(ckpt, args, prompts[:1], args.check_tokens, enforce_eager=True)
            del llm
            llm, one_g = engine_generate(ckpt, args, prompts[:1], args.check_tokens, enforce_eager=False)
            del llm
            release()
            r = check_eager_vs_graph(one_e, one_g, ref_lps[:1], tol_tie)
            report["checks"]["eager_vs_graph_batch1"] = r
            all_ok &= r["ok"]

        if not args.skip_bench:
            ckpt = tmp / "bench"
            log(f"\n[bench] {args.shape} full depth, {args.dtype}, prompt {args.prompt_len}, "
                f"decode {args.bench_short}->{args.bench_short + args.decode_tokens} tokens")
            build_checkpoint(ckpt, args.shape, None, dtype, init_device, args.seed)
            release()
            batches = [int(b) for b in args.batch.split(",") if b]
            log(f"  {'batch':>5} {'mode':<12} {'step ms':>9} {'tok/s/seq':>10} {'roofline ms':>12} {'of roofline':>12}")
            for batch in batches:
                rows = [("graph", False), ("eager", True)] if platform.supports_graphs else [("eager", True)]
                for label, eager_flag in rows:
                    step, stats = bench_engine(ckpt, args, batch, eager_flag, platform)
                    ctx = args.prompt_len + args.bench_short + args.decode_tokens / 2
                    roof = (stats["step_weight_bytes"] + batch * ctx * stats["kv_bytes_per_token"]) / bw
                    log(f"  {batch:5d} {label:<12} {step * 1e3:9.2f} {1 / step:10.1f} {roof * 1e3:12.3f} {roof / step:12.2f}")
                    report["bench"].append(dict(batch=batch, mode=label, step_s=step, roofline_s=roof,
                                                fraction_of_roofline=roof / step, **stats))
                if args.hf_baseline:
                    step = bench_hf(ckpt, args, batch, platform, dtype)
                    log(f"  {batch:5d} {'hf generate':<12} {step * 1e3:9.2f} {1 / step:10.1f} {roof * 1e3:12.3f} {roof / step:12.2f}")
                    report["bench"].append(dict(batch=batch, mode="hf_generate", step_s=step, roofline_s=roof,
                                                fraction_of_roofline=roof / step))

    report["ok"] = all_ok
    log(f"\n{'ALL CHECKS PASSED' if all_ok else 'SOME CHECKS FAILED'}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        log(f"wrote {args.json}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
