#!/usr/bin/env python3
"""Decode throughput: sizewise vs transformers.generate on the same weights, and vs the roofline.

Usage:
  python benchmarks/decode.py                       # llama-10m random weights on CPU, prompt 128
  python benchmarks/decode.py --make-model /tmp/l10m  # only save that checkpoint (then --model /tmp/l10m)
  python benchmarks/decode.py --model models/demo/large
  python benchmarks/decode.py --shape llama-3.2-1b --device cuda --dtype bfloat16 --prompt-len 2048 --batch 1 8

Decode time is isolated as time(generate N tokens) - time(generate 1 token), so prefill is
excluded for both engines. Roofline per step: (weight bytes + KV bytes read) / copy bandwidth
measured in the same run (bytes read + written by a large device copy).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHAPES, build_random_checkpoint, print_table, save_json  # noqa: E402

from sizewise import LLM, SamplingParams  # noqa: E402
from sizewise.models import ModelConfig, parse_dtype  # noqa: E402
from sizewise.platform import get_platform  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_hf(model, prompts: torch.Tensor, new_tokens: int, device: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def time_sizewise(llm: LLM, prompts: list[list[int]], new_tokens: int, device: str, repeats: int) -> float:
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF checkpoint directory (default: random weights at --shape)")
    ap.add_argument("--shape", default="llama-10m", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--skip-hf", action="store_true", help="only sizewise (no baseline: no ratio)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--make-model", metavar="DIR", help="save the random --shape checkpoint to DIR and exit")
    args = ap.parse_args()
    import transformers

    dtype = parse_dtype(args.dtype)
    if args.make_model:
        path = build_random_checkpoint(args.shape, Path(args.make_model), dtype, device=args.device)
        print(f"[decode] wrote random {args.shape} checkpoint ({args.dtype}) to {path}")
        return
    platform = get_platform(args.device)
    tmp = None
    if args.model:
        path = Path(args.model)
        label = path.name
    else:
        tmp = tempfile.TemporaryDirectory()
        print(f"[decode] building random {args.shape} checkpoint ({args.dtype}) ...", flush=True)
        # On an accelerator the random init runs there: minutes faster for a 7B shape.
        path = build_random_checkpoint(args.shape, Path(tmp.name) / args.shape, dtype, device=str(platform.device))
        label = args.shape
    cfg = ModelConfig.from_pretrained(path)
    bw = platform.peak_bandwidth()
    print(f"[decode] {label}: {cfg.num_params / 1e6:.1f}M params on {platform.device}, copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)

    max_len = args.prompt_len + args.new_tokens + 8
    max_b = max(args.batch)
    print("[decode] loading sizewise engine ...", flush=True)
    llm = LLM(path, device=args.device, dtype=args.dtype, max_model_len=max_len, max_num_seqs=max(max_b, 1),
              max_num_batched_tokens=max(2048, args.prompt_len * max_b), enforce_eager=args.enforce_eager,
              kv_cache_bytes=cfg.kv_bytes_per_token(dtype) * (max_len + 32) * max_b + (1 << 20))
    hf = None
    if not args.skip_hf:
        print("[decode] loading transformers reference ...", flush=True)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()

    weight_bytes = llm.engine.weight_bytes
    # A decode step reads every weight but an untied input embedding (Qwen2.5-7B's: 1.09 of 15.2 GB).
    step_weight_bytes = llm.engine.step_weight_bytes
    kv_per_tok = cfg.kv_bytes_per_token(dtype)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for b in args.batch:
        prompts = torch.randint(3, cfg.vocab_size, (b, args.prompt_len), generator=gen)
        plist = prompts.tolist()
        n = args.new_tokens
        print(f"[decode] batch {b}: sizewise ...", flush=True)
        time_sizewise(llm, plist, 2, args.device, 1)  # warm-up
        sw = (time_sizewise(llm, plist, n, args.device, args.repeats) - time_sizewise(llm, plist, 1, args.device, args.repeats)) / (n - 1)
        row = {"model": label, "device": str(platform.device), "dtype": args.dtype, "batch": b,
               "prompt": args.prompt_len, "new": n}
        avg_ctx = args.prompt_len + n / 2
        roofline_s = (step_weight_bytes + kv_per_tok * avg_ctx * b) / bw
        row.update(sizewise_step_ms=sw * 1e3, sizewise_tok_s=b / sw, roofline_ms=roofline_s * 1e3,
                   sizewise_roofline_frac=roofline_s / sw)
        if hf is not None:
            print(f"[decode] batch {b}: transformers.generate ...", flush=True)
            hp = prompts.to(args.device)
            time_hf(hf, hp, 2, args.device, 1)
            hs = (time_hf(hf, hp, n, args.device, args.repeats) - time_hf(hf, hp, 1, args.device, args.repeats)) / (n - 1)
            row.update(hf_step_ms=hs * 1e3, hf_tok_s=b / hs, hf_roofline_frac=roofline_s / hs,
                       speedup_vs_hf=hs / sw)
        rows.append(row)
    print()
    print_table(rows, ["model", "batch", "speedup_vs_hf", "sizewise_roofline_frac", "hf_roofline_frac",
                       "sizewise_step_ms", "hf_step_ms", "roofline_ms", "sizewise_tok_s", "hf_tok_s", "device"])
    out = Path(args.json or Path(__file__).parent / "results" / f"decode-{label}-{platform.name}.json")
    save_json(out, {"bandwidth_bytes_per_s": bw, "weight_bytes": weight_bytes,
                    "step_weight_bytes": step_weight_bytes, "rows": rows})
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
