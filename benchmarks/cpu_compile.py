#!/usr/bin/env python3
"""Does a torch.compile'd decode step pay on CPU? Compile time against the speed gained.

    python benchmarks/cpu_compile.py                         # demo small / medium / large, batch 1 and 8
    python benchmarks/cpu_compile.py --tiers large --batches 1 --threads 1

Per tier and batch size: decode tokens/s of the eager engine and of the same engine with
`Decoder.forward_paged` (the decode / verify step: static shapes per batch) wrapped in
`torch.compile(dynamic=True)` (inductor's C++ backend), both measured in this run on the same
prompts (best of 2 after a warm-up run), the compiled engine's first run (which includes
compiling), and whether greedy outputs are identical. Table on stdout, JSON in
benchmarks/results/cpu-compile.json. Prefill stays eager in both.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import print_table, save_json  # noqa: E402

from sizewise import LLM, SamplingParams, demo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed(llm: LLM, prompts, sp) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    return time.perf_counter() - t0, [o.outputs[0].token_ids for o in outs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiers", default="small,medium,large")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu-compile.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sp = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    rows = []
    for tier in args.tiers.split(","):
        path = demo.demo_model_path(tier)
        eager = LLM(path, device="cpu")
        compiled = LLM(path, device="cpu")
        model = compiled.engine.runner.model
        model.forward_paged = torch.compile(model.forward_paged, dynamic=True)
        for batch in map(int, args.batches.split(",")):
            rng = random.Random(batch)
            prompts = [[rng.randrange(5, 4000) for _ in range(args.prompt_tokens)] for _ in range(batch)]
            print(f"[{tier} batch {batch}] compiling and measuring ...", flush=True)
            first_s, out_c = timed(compiled, prompts, sp)  # compiles the step (per new shape)
            timed(eager, prompts, sp)
            e = min(timed(eager, prompts, sp)[0] for _ in range(2))
            c = min(timed(compiled, prompts, sp)[0] for _ in range(2))
            _, out_e = timed(eager, prompts, sp)
            n = batch * args.new_tokens
            rows.append(dict(tier=tier, batch=batch, eager_tok_s=n / e, compiled_tok_s=n / c, speedup=e / c,
                             compiled_first_run_s=first_s, eager_run_s=e, identical=out_c == out_e))
    print_table(rows, ["tier", "batch", "speedup", "identical", "eager_tok_s", "compiled_tok_s",
                       "compiled_first_run_s", "eager_run_s"])
    save_json(Path(args.out), dict(threads=args.threads, prompt_tokens=args.prompt_tokens,
                                   new_tokens=args.new_tokens, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
