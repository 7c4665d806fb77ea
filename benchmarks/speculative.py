#!/usr/bin/env python3
"""Speculative decoding: tokens/s per strategy against plain decode in the same run.

Usage:
  python benchmarks/speculative.py                        # models/demo/large, draft models/demo/small
  python benchmarks/speculative.py --model DIR [--draft DIR] --max-tokens 128 --repeats 3

Workloads (greedy, so every strategy must produce the same tokens; checked):
  edit-code  a held-out standard-library source chunk, asked back with a function renamed;
  quote      a held-out prose passage, quoted back (then free text);
  free       short code / prose openings, free generation;
  free-sampled  the same, sampled at temperature 1 (outputs differ per strategy; same length).
Each prompt runs alone (batch 1); strategies are interleaved in every repeat and the best time
per (prompt, strategy) is kept (the host is shared: best-of is the least noisy estimate).
Reported per workload and strategy: decode tokens/s (first token to last, so the prefill, the
same for every strategy, is excluded), end-to-end tokens/s, speedup vs plain, acceptance rate
(accepted / proposed), mean tokens per verify step (1 + accepted per verification), decode steps
and step_bound = plain's decode steps / this strategy's: the speedup if a verify step cost no more
than a plain one, i.e. the most these proposals could give (steps with no proposal decode plainly).

A second section runs mixed batches: plain free-generation rows plus edit-code rows that speculate
(prompt lookup under each spec_batching mode, and the draft model), against the same batch decoded
all plain in the same run ("speedup"). spec_batching: "split" (verify rows in a Q=k+1 forward, plain
rows in a Q=1 forward) vs "padded" (one Q=k+1 forward, plain rows padded with m=0) vs "auto".
Writes benchmarks/results/speculative.json.

The script runs against any checkout (PYTHONPATH=<checkout>/src), so a change is measured before and
after with the same workloads. On a shared host timings are noisy: run it twice and read ratios.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json  # noqa: E402

from sizewise import LLM, SamplingParams, demo  # noqa: E402
from sizewise.engine.config import EngineConfig  # noqa: E402
from sizewise.engine.core import EngineCore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
try:  # the engine's adaptive prompt lookup; checkouts before engine/spec/ called it "auto"
    from sizewise.engine.spec.strategy import Strategy  # noqa: E402

    ADAPTIVE = Strategy.PLD_ADAPTIVE.value
except ImportError:
    ADAPTIVE = "auto"


# ----- workloads --------------------------------------------------------------------------------
def _chunk_at_def(source: str, chars: int) -> tuple[str, str] | None:
    """A chunk of ~chars characters starting at a top-level or method `def`, and its name."""
    m = re.search(r"^( *)def ([A-Za-z_][A-Za-z0-9_]*)\(", source, re.M)
    while m is not None:
        start = m.start()
        chunk = source[start:start + chars]
        chunk = chunk[: chunk.rfind("\n") + 1]
        if chunk.count("\n") >= 12:
            return chunk, m.group(2)
        m = re.compile(r"^( *)def ([A-Za-z_][A-Za-z0-9_]*)\(", re.M).search(source, m.end())
    return None


def workloads(n_prompts: int, chars: int) -> dict[str, list[str]]:
    split = demo.split()
    edit: list[str] = []
    for rel in split.held_out_code:
        src = demo.read_code(rel)
        got = _chunk_at_def(src or "", chars)
        if got is None:
            continue
        chunk, name = got
        new = name + "_v2"
        first, rest = chunk.split("\n", 1)
        edit.append(
            f"# {rel}\n{chunk}\n\n# The same code with `{name}` renamed to `{new}`:\n"
            f"{first.replace(name, new, 1)}\n"
        )
        if len(edit) == n_prompts:
            break
    topics = demo.prose_topics()
    quote: list[str] = []
    for key in split.held_out_prose:
        text = topics[key].strip()
        if len(text) < chars:
            continue
        text = text[:chars]
        text = text[: text.rfind("\n") + 1] or text
        opening = " ".join(text.split()[:6])
        quote.append(f"{text}\n\nQuote the passage above, then summarise it.\n\nQuote: \"{opening}")
        if len(quote) == n_prompts:
            break
    free = ["def is_prime(n):\n", "class Stack:\n    def __init__(self):\n", "A list comprehension"][:n_prompts]
    return {"edit-code": edit, "quote": quote, "free": free}


# ----- measurement ------------------------------------------------------------------------------
def _spec_totals(core: EngineCore) -> tuple[int, int, int]:
    st = core.stats()
    return (sum(st.spec_draft_tokens.values()), sum(st.spec_accepted_tokens.values()),
            sum(st.spec_verify_steps.values()))


def run_single(llm: LLM, prompt: list[int], sp: SamplingParams, strategy: str):
    before = _spec_totals(llm.engine)
    t0 = time.perf_counter()
    out = llm.generate([prompt], sp, strategy=strategy, use_tqdm=False)[0]
    wall = time.perf_counter() - t0
    after = _spec_totals(llm.engine)
    m = out.metrics
    decode = (m["last_token_time"] - m["first_token_time"]) if m else wall
    return out.outputs[0].token_ids, wall, decode, tuple(a - b for a, b in zip(after, before))


def bench_workloads(llm: LLM, prompts: dict[str, list[list[int]]], strategies: list[str], max_tokens: int,
                    repeats: int) -> list[dict]:
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    # Sampled free text: proposals are rarely accepted, so speculation can only cost here.
    sampled = SamplingParams(temperature=1.0, top_p=0.95, seed=0, max_tokens=max_tokens, ignore_eos=True)
    rows = []
    for wl, plist in {**prompts, "free-sampled": prompts["free"]}.items():
        sp = sampled if wl == "free-sampled" else greedy
        best: dict[tuple[int, str], tuple[float, float]] = {}
        counts: dict[str, list[int]] = {s: [0, 0, 0] for s in strategies}
        ntok = {s: 0 for s in strategies}
        identical = {s: True for s in strategies}
        for i, p in enumerate(plist):
            ref = None
            for r in range(repeats):
                order = strategies[r % len(strategies):] + strategies[: r % len(strategies)]
                for s in order:
                    toks, wall, dec, spec = run_single(llm, p, sp, s)
                    if s == "plain":
                        ref = toks if ref is None else ref
                    key = (i, s)
                    w, d = best.get(key, (float("inf"), float("inf")))
                    best[key] = (min(w, wall), min(d, dec))
                    if r == 0:
                        ntok[s] += len(toks)
                        counts[s] = [c + x for c, x in zip(counts[s], spec)]
                    if s != "plain" and ref is not None and sp.greedy:  # plain runs first in repeat 0
                        identical[s] &= toks == ref
        base = None
        for s in strategies:
            wall = sum(best[(i, s)][0] for i in range(len(plist)))
            dec = sum(best[(i, s)][1] for i in range(len(plist)))
            drafted, accepted, steps = counts[s]
            # Decode steps (the first token comes from the prefill): every decoded token took one
            # step except the accepted proposals, which rode along in a verification. step_bound
            # is the speedup if a verify step cost what a plain step costs: the proposals' ceiling.
            decoded = ntok[s] - len(plist)
            decode_steps = decoded - accepted
            row = {
                "workload": wl, "strategy": s, "tokens": ntok[s],
                "decode_tok_s": decoded / dec if dec > 0 else None,
                "e2e_tok_s": ntok[s] / wall,
                "acceptance": accepted / drafted if drafted else None,
                "mean_accepted": accepted / steps if steps else None,  # accepted proposals per verification
                "mean_tokens_per_verify": (accepted + steps) / steps if steps else None,
                "verify_steps": steps,
                "decode_steps": decode_steps,
                "step_bound": decoded / decode_steps if decode_steps else None,
                "identical": identical[s] if sp.greedy else None,
            }
            if s == "plain":
                base = row
            row["speedup"] = row["decode_tok_s"] / base["decode_tok_s"] if base and base["decode_tok_s"] else None
            rows.append(row)
    return rows


def bench_mixed(model: Path, cfg: dict, prompts: dict[str, list[list[int]]], max_tokens: int, repeats: int,
                batches: list[int], draft: Path | None) -> list[dict]:
    """Batches of plain free-generation rows plus speculating edit-code rows, against the same batch
    all plain: pld under split / padded / auto batching, and draft (auto batching)."""
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    free, edit = prompts["free"], prompts["edit-code"]
    engines = {mode: LLM(model, **{**cfg, "spec_batching": mode}) for mode in ("split", "padded", "auto")}
    # (engine, strategy of the speculating rows) per variant; "plain" decodes the whole batch plainly
    variants = {"plain": ("auto", "plain"), "pld-split": ("split", "pld"), "pld-padded": ("padded", "pld"),
                "pld-auto": ("auto", "pld")}
    if draft is not None:
        ecfg = {k: v for k, v in cfg.items() if k not in ("prompt_lookup_min", "prompt_lookup_max")}
        engines["auto"].engine.attach_draft(EngineCore(draft, EngineConfig(**ecfg), name="draft"))
        variants["draft-auto"] = ("auto", "draft")
    for llm in engines.values():
        llm.generate(free[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    rows = []
    for batch, n_spec in [(b, n) for b in batches for n in sorted({1, b // 2})]:
        plist = [free[i % len(free)] for i in range(batch - n_spec)] + [edit[i % len(edit)] for i in range(n_spec)]
        best = {v: float("inf") for v in variants}
        ntok, outs_by = {}, {}
        names = list(variants)
        for r in range(repeats):
            for v in names[r % len(names):] + names[: r % len(names)]:
                mode, strat = variants[v]
                strategies = ["plain"] * (batch - n_spec) + [strat] * n_spec
                t0 = time.perf_counter()
                outs = engines[mode].generate(plist, sp, strategy=strategies, use_tqdm=False)
                best[v] = min(best[v], time.perf_counter() - t0)
                ntok[v] = sum(len(o.outputs[0].token_ids) for o in outs)
                outs_by[v] = [o.outputs[0].token_ids for o in outs]
        for v in variants:
            rows.append({"batch": batch, "spec_rows": n_spec, "variant": v, "tokens": ntok[v],
                         "tok_s": ntok[v] / best[v], "speedup": best["plain"] / best[v],
                         "identical": outs_by[v] == outs_by["plain"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models/demo/large")
    ap.add_argument("--draft", type=Path, default=REPO / "models/demo/small", help="draft model (skipped if absent)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=3, help="prompts per workload")
    ap.add_argument("--chars", type=int, default=1200, help="characters of source / prose per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup-min", type=int, default=2)
    ap.add_argument("--lookup-max", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--mixed-batch", type=int, nargs="*", default=[4, 8, 16],
                    help="batch sizes of the split / padded comparison (none: skip)")
    ap.add_argument("--mixed-repeats", type=int, default=None, help="repeats there (default: --repeats)")
    ap.add_argument("--skip-workloads", action="store_true", help="only the split / padded comparison")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/speculative.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.model / "config.json").is_file():
        sys.exit(f"no model at {args.model} (train the demo family or pass --model DIR)")

    cfg = dict(device=args.device, max_model_len=1024, max_num_seqs=16, kv_cache_bytes=256 << 20,
               num_speculative_tokens=args.k, prompt_lookup_min=args.lookup_min, prompt_lookup_max=args.lookup_max)
    llm = LLM(args.model, **cfg)
    strategies = ["plain", "pld", ADAPTIVE]
    draft_name = None
    if args.draft and (args.draft / "config.json").is_file() and args.draft.resolve() != args.model.resolve():
        ecfg = {k: v for k, v in cfg.items() if k not in ("prompt_lookup_min", "prompt_lookup_max")}
        llm.engine.attach_draft(EngineCore(args.draft, EngineConfig(**ecfg), name="draft"))
        strategies.insert(2, "draft")
        draft_name = str(args.draft)
    tok = llm.tokenizer
    texts = workloads(args.prompts, args.chars)
    prompts = {wl: [tok.encode(t) for t in ts] for wl, ts in texts.items()}
    llm.generate([prompts["free"][0]], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up

    print(f"model {args.model} (draft {draft_name}), k={args.k}, lookup n={args.lookup_min}..{args.lookup_max}, "
          f"{torch.get_num_threads()} threads, {args.max_tokens} tokens/prompt, best of {args.repeats}")
    print("prompt tokens:", {wl: [len(p) for p in ps] for wl, ps in prompts.items()})
    rows = []
    if not args.skip_workloads:
        rows = bench_workloads(llm, prompts, strategies, args.max_tokens, args.repeats)
        print_table(rows, ["workload", "strategy", "speedup", "step_bound", "acceptance", "identical",
                           "decode_tok_s", "e2e_tok_s", "tokens", "mean_accepted", "mean_tokens_per_verify",
                           "verify_steps", "decode_steps"])
        print("step_bound: plain decode steps / this strategy's decode steps = the speedup if a verify step\n"
              "cost what a plain step costs (the ceiling the proposals allow)")
    mixed = []
    if args.mixed_batch:
        mixed = bench_mixed(args.model, cfg, prompts, args.max_tokens // 2, args.mixed_repeats or args.repeats,
                            args.mixed_batch, args.draft if draft_name else None)
        print()
        print_table(mixed, ["batch", "spec_rows", "variant", "speedup", "identical", "tokens", "tok_s"])
    save_json(args.out, {
        "model": str(args.model), "draft": draft_name, "device": args.device, "threads": torch.get_num_threads(),
        "k": args.k, "prompt_lookup": [args.lookup_min, args.lookup_max], "max_tokens": args.max_tokens,
        "repeats": args.repeats, "workloads": rows, "mixed_batching": mixed,
    })


if __name__ == "__main__":
    main()
