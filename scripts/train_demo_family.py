#!/usr/bin/env python
"""Train sizewise's built-in demo family: three Llama models of one family on CPU.

    python scripts/train_demo_family.py                 # corpus, tokenizer, all tiers, eval, model card
    python scripts/train_demo_family.py --tiers large   # (re)train one tier only
    python scripts/train_demo_family.py --eval-only     # held-out NLL, agreement, samples, model card
    python scripts/train_demo_family.py --bench         # measure training tokens/s per tier and exit
    python scripts/train_demo_family.py --recipe gpu-copy --device cuda --out DIR   # see RECIPES
    python scripts/train_demo_family.py ... --time-budget-s 330   # shorten each tier to fit a lease
    python scripts/train_demo_family.py ... --prepare-only        # corpus, tokenizer, streams; then
    python scripts/train_demo_family.py ... --tiers large --no-eval   # one tier per process, in parallel

What it does, all deterministic (fixed seeds, fixed data order):

1. corpus: the running interpreter's standard library ``.py`` files (code; no test suites,
   no site-packages, no encodings/ charmap tables) and ``pydoc_data.topics`` (prose), split
   train / held-out by a hash of the file path / topic key (see ``sizewise.demo``). Training
   also sees the module docstrings of the training files as prose, and short chat examples
   built from training data only (a topic's first paragraphs, a function's docstring) in the
   ChatML-like template, so that the models learn to stop with ``<|im_end|>``.
2. tokenizer: byte-level BPE (``tokenizers``), vocabulary 4096, special tokens ``<|bos|>``,
   ``<|eos|>``, ``<|pad|>``, ``<|im_start|>``, ``<|im_end|>``. No normaliser, no added prefix
   space, no BOS added by the tokenizer: ``decode(encode(s)) == s`` for every string. The
   models are trained on documents separated by ``<|eos|>`` and never see ``<|bos|>``.
3. models: three ``LlamaForCausalLM`` (tied embeddings), trained one after the other in
   float32 on the same token stream (each tier sees a prefix of it: its budget, larger for
   larger tiers), AdamW, linear warmup + cosine decay; a main stage at sequence length
   ``SEQ_LEN`` = 256, then a short long-context stage at 1024 (``PHASE2``). Checkpoints under
   ``runs/demo/`` make every stage resumable: rerun the same command after an interruption.
   One torch thread by default, and ``OMP_WAIT_POLICY=PASSIVE``: the cores are shared.
4. output: ``models/demo/{small,medium,large}`` in Hugging Face format (bfloat16 safetensors,
   tokenizer, chat template, generation config stopping at ``<|eos|>`` and ``<|im_end|>``,
   ``training_config.json``), ``models/demo/eval.json`` (held-out NLL per token) and the model
   card ``models/demo/README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import sizewise.demo as demo  # noqa: E402
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))
    import sizewise.demo as demo  # noqa: E402

# The CPU is shared (other processes run tests next to training): OpenMP threads that spin
# while waiting make a 2-thread torch 5-10x slower under contention; sleeping threads do not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

# --------------------------------------------------------------------------------------
# Configuration (recorded into every output directory as training_config.json)
# --------------------------------------------------------------------------------------

SEED = 1234
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]  # ids 0..4
SEQ_LEN = 256
MAX_POSITION_EMBEDDINGS = 1024
PROSE_REPEAT = 3  # the prose corpus is small: show each training topic this many times
MAX_CHAT_EXAMPLES = 6000

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Budgets are in optimizer steps of a fixed batch (so in tokens too), not in time, so that a
# run is reproducible. The larger the tier, the larger its budget: small / medium / large see
# 0.8M / 1.6M / 2.7M tokens: about 2 + 11 + 34 minutes on a 2-core CPU with one torch thread
# (~7.5k / ~2.5k / ~1.3k training tokens/s at batch 4 x 256, measured with other jobs running). (At equal budgets of
# ~1.6M tokens the 1.3M- and 4.5M-parameter models come out nearly tied: at this scale the
# budget, not capacity, limits them.) Small batches: at this budget more optimizer steps pay
# more than less noisy ones. Every tier reads the same token stream from its start (sequence
# j of training is the same window whatever the batch size), so each tier's data is a prefix
# of the next larger one's.
TIERS: dict[str, dict] = {
    "small": dict(
        model=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=352),
        lr=2e-3, batch_size=4, steps=800,
    ),
    "medium": dict(
        model=dict(hidden_size=256, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4,
                   intermediate_size=640),
        lr=1.5e-3, batch_size=4, steps=1600,
    ),
    "large": dict(
        model=dict(hidden_size=384, num_hidden_layers=7, num_attention_heads=6, num_key_value_heads=2,
                   intermediate_size=1024),
        lr=1e-3, batch_size=4, steps=2600,
    ),
}
for _spec in TIERS.values():
    _spec["tokens"] = _spec["steps"] * _spec["batch_size"] * SEQ_LEN
# Second stage, after the main schedule: long context. The main stage trains on windows of
# 256 tokens, and past position 256 the models got worse instead of better (held-out code NLL
# of the small tier by position 0-255 / 256-511 / 512-767 / 768-1023: 5.38 / 5.22 / 5.33 /
# 5.48); a short stage on windows of 1024 tokens (the models' max_position_embeddings) of a
# reshuffled stream of the same training documents fixes that (5.30 / 5.09 / 5.13 / 5.18; the
# large tier: 4.41 / 4.32 / 4.51 / 4.69 before, 4.39 / 4.11 / 4.15 / 4.17 after).
PHASE2 = dict(seq_len=1024, batch_size=1, lr_scale=0.3, stream_tokens=700_000)
for _tier, _steps in (("small", 200), ("medium", 250), ("large", 300)):
    TIERS[_tier]["phase2_steps"] = _steps
    TIERS[_tier]["tokens"] += _steps * PHASE2["batch_size"] * PHASE2["seq_len"]
OPTIM = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, warmup_frac=0.04, min_lr_ratio=0.1, grad_clip=1.0)

# Recipes. "cpu" is the one the committed models/demo family was trained with (the budgets
# above). "gpu-copy" is for a GPU session, and exists because the cpu family cannot copy from
# its prompt (held-out edit-code NLL of the copied text ~ fresh code NLL, see the card's
# `copy_nll`): copying needs induction heads, which form only after a number of training tokens
# that grows with sqrt(batch x context) (~10^5.7 * sqrt(B*C) tokens, Aoyama et al. 2025, "Predicting
# the Formation of Induction Heads") -- ~16M tokens at batch 4 x 256, 4-10x more than the cpu
# budgets, hours for the large tier on a 2-core CPU, a few minutes on a GPU. It mixes copy
# documents (a training-split function shown, then shown again renamed; a prose passage, then
# quoted) into the stream, replaces a share of each stage's rows with repeated random-token
# segments (unlike the copy documents, which the stream repeats every epoch, these cannot be
# memorised: only copying predicts them; a CPU run of the small tier without them memorised its
# training copies and never copied held-out text, 18M tokens in), and trains each tier long
# enough to pass that point.
# Untested at full size: no GPU was lent to the session that wrote it (smoke-tested on CPU with
# --steps-scale; the small tier ran 6K of its 12K steps on CPU, see the card's copy NLL note).
RECIPES: dict[str, dict] = {
    "cpu": dict(copy_docs=0, synthetic_frac=0.0, batch_size=None, steps=None),
    "gpu-copy": dict(copy_docs=15_000, synthetic_frac=0.15, batch_size=8,
                     steps={"small": 12_000, "medium": 12_000, "large": 12_000},
                     phase2_steps={"small": 600, "medium": 600, "large": 600}),
}


def apply_recipe(name: str, steps_scale: float = 1.0) -> dict:
    """Set TIERS' batch sizes and step budgets for a recipe (and scale them, for smoke tests)."""
    recipe = RECIPES[name]
    for tier, spec in TIERS.items():
        if recipe.get("batch_size"):
            spec["batch_size"] = recipe["batch_size"]
        if recipe.get("steps"):
            spec["steps"] = recipe["steps"][tier]
        if recipe.get("phase2_steps"):
            spec["phase2_steps"] = recipe["phase2_steps"][tier]
        spec["steps"] = max(1, round(spec["steps"] * steps_scale))
        spec["phase2_steps"] = max(1, round(spec["phase2_steps"] * steps_scale))
        spec["tokens"] = spec["steps"] * spec["batch_size"] * SEQ_LEN + spec["phase2_steps"] * PHASE2["batch_size"] * PHASE2["seq_len"]
    return dict(recipe, name=name, steps_scale=steps_scale)
CKPT_EVERY_S = 120.0
COPY_EVAL_EVERY = 1000  # steps between held-out copy probes (recipes other than cpu)
BUDGET_WARMUP_STEPS, BUDGET_PROBE_STEPS = 10, 50  # --time-budget-s: untimed, then timed steps
LOG_EVERY_S = 15.0
SAVE_DTYPE = "bfloat16"
EVAL_MAX_TOKENS = 60_000  # per held-out set and tier

# Prompts end inside a line: the byte-level BPE merges a newline with the indentation after
# it, so a prompt that ends with a bare "\n" asks for an unusual token boundary.
SAMPLE_PROMPTS = [
    ("code", 'def is_prime(n):\n    """Return True if n is a prime number."""\n    if'),
    ("code", 'import os\n\n\ndef read_lines(path):\n    """Return the lines of a text file."""\n    with open(path) as f:\n        return'),
    ("code", 'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n        self'),
    ("prose", 'The "with" statement is used to'),
    ("prose", "A list comprehension"),
    ("chat", [{"role": "user", "content": "What does `os.path.join` do?"}]),
]


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def config_record(args) -> dict:
    return dict(
        seed=SEED,
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        seq_len=SEQ_LEN,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        prose_repeat=PROSE_REPEAT,
        max_chat_examples=MAX_CHAT_EXAMPLES,
        optimizer=dict(name="AdamW", **OPTIM, schedule="linear warmup + cosine, per stage"),
        phase2=PHASE2,
        precision="float32 training, saved as " + SAVE_DTYPE,
        torch_threads=args.threads,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        tiers={k: dict(v, model=dict(v["model"])) for k, v in TIERS.items()},
        corpus=dict(
            source="standard library of the training interpreter (.py files; pydoc_data.topics prose)",
            python=platform.python_version(),
            code_held_out_percent=demo.CODE_HELD_OUT_PERCENT,
            prose_held_out_percent=demo.PROSE_HELD_OUT_PERCENT,
        ),
        bos="not added by the tokenizer; documents are separated by <|eos|>; <|bos|> is unused",
    )


# --------------------------------------------------------------------------------------
# Corpus and tokenizer
# --------------------------------------------------------------------------------------


def build_corpus(copy_docs: int = 0) -> dict:
    """Raw training documents and the held-out lists. Takes a few seconds."""
    t0 = time.time()
    s = demo.split()
    topics = demo.prose_topics()
    code_docs, docstring_docs, chat_pairs, code_by_path = [], [], [], []
    for rel in s.train_code:
        text = demo.read_code(rel)
        if not text or not text.strip():
            continue
        code_docs.append(text)
        code_by_path.append((rel, text))
        mod_doc = demo.module_docstring(text)
        if mod_doc and len(mod_doc) >= 80:
            docstring_docs.append(mod_doc)
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        for name, doc in demo.function_docstrings(text):
            chat_pairs.append((f"What does `{module}.{name}` do?", doc))
    prose_docs = [topics[k] for k in s.train_prose]
    for key in s.train_prose:
        answer = _first_paragraphs(topics[key], 700)
        if answer:
            chat_pairs.append((f"Explain \"{key}\" in Python.", answer))
    rng = random.Random(SEED)
    rng.shuffle(chat_pairs)
    chat_pairs = chat_pairs[:MAX_CHAT_EXAMPLES]
    log(f"corpus: {len(code_docs)} code files ({sum(map(len, code_docs)) / 1e6:.1f} MB), "
        f"{len(prose_docs)} prose topics ({sum(map(len, prose_docs)) / 1e6:.2f} MB) x{PROSE_REPEAT}, "
        f"{len(docstring_docs)} module docstrings, {len(chat_pairs)} chat examples "
        f"[{time.time() - t0:.1f}s]")
    copies = copy_documents(code_by_path, prose_docs, copy_docs, SEED + 2) if copy_docs else []
    if copies:
        log(f"corpus: {len(copies)} copy documents ({sum(map(len, copies)) / 1e6:.1f} MB)")
    return dict(split=s, code=code_docs, prose=prose_docs, docstrings=docstring_docs, chat=chat_pairs, copy=copies)


_DEF = re.compile(r"^( *)def ([A-Za-z_][A-Za-z0-9_]*)\(", re.M)
_IDENT = re.compile(r"\b[a-z_][a-z0-9_]{2,}\b")
_EDIT_TEMPLATES = [
    "# {path}\n{a}\n\n# The same code with `{old}` renamed to `{new}`:\n{b}",
    "{a}\n# Rewritten, `{old}` is now called `{new}`:\n{b}",
    "Here is a function from {path}:\n\n{a}\nRename `{old}` to `{new}` and show the result.\n\n{b}",
    "# before\n{a}\n# after (renamed {old} -> {new})\n{b}",
]
_QUOTE_TEMPLATES = [
    "{a}\n\nQuote the passage above, then summarise it.\n\nQuote: \"{a}\"",
    "Passage:\n{a}\n\nRepeat the passage word for word.\n\n{a}",
    "{a}\n\nAs quoted above: \"{a}\"",
]


def rename(text: str, old: str, new: str) -> str:
    """`text` with the identifier `old` (whole words only) renamed to `new`."""
    return re.sub(r"\b%s\b" % re.escape(old), new, text)


def code_chunk_at_def(source: str, chars: int, rng: random.Random) -> tuple[str, str] | None:
    """A chunk of ~chars characters of `source` starting at a random `def` line, and its name."""
    ms = list(_DEF.finditer(source))
    if not ms:
        return None
    m = rng.choice(ms)
    chunk = source[m.start():m.start() + chars]
    chunk = chunk[: chunk.rfind("\n") + 1]
    return (chunk, m.group(2)) if chunk.count("\n") >= 6 else None


def copy_documents(code_texts: list[tuple[str, str]], prose_texts: list[str], n: int, seed: int) -> list[str]:
    """n documents whose second half copies their first: 60% code shown then shown again with
    an identifier renamed (edit-code), 40% a prose passage then quoted. Training split only."""
    rng = random.Random(seed)
    docs: list[str] = []
    while len(docs) < n:
        if rng.random() < 0.6:
            path, src = rng.choice(code_texts)
            got = code_chunk_at_def(src, rng.randint(400, 1400), rng)
            if got is None:
                continue
            a, name = got
            idents = sorted(set(_IDENT.findall(a)) - {"self", "def", "return", "for", "while", "not", "and"})
            old = name if rng.random() < 0.5 or not idents else rng.choice(idents)
            new = old + rng.choice(["_v2", "_new", "2", "_impl", "_fast"])
            b = rename(a, old, new)
            docs.append(rng.choice(_EDIT_TEMPLATES).format(path=path, a=a, b=b, old=old, new=new))
        else:
            t = rng.choice(prose_texts).strip()
            if len(t) < 300:
                continue
            start = rng.randrange(0, max(1, len(t) - 1200))
            a = t[start:start + rng.randint(300, 1200)]
            a = a[: a.rfind(" ")]
            docs.append(rng.choice(_QUOTE_TEMPLATES).format(a=a))
    return docs


def _first_paragraphs(text: str, limit: int) -> str:
    out = ""
    for para in re.split(r"\n\s*\n", text.strip()):
        para = para.strip()
        if not para or para.startswith("*") or set(para) <= set("*=-"):
            continue
        if out and len(out) + len(para) > limit:
            break
        out = (out + "\n\n" + para) if out else para
    return out[: limit * 2]


def train_tokenizer(corpus: dict, out_dir: Path):
    """Byte-level BPE, saved as a transformers fast tokenizer in out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (out_dir / "tokenizer.json").exists():
        return load_tokenizer(out_dir)
    t0 = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = corpus["code"] + corpus["prose"] + corpus["docstrings"]
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(fast, out_dir)
    log(f"tokenizer: vocab {tok.get_vocab_size()} trained in {time.time() - t0:.1f}s -> {out_dir}")
    return load_tokenizer(out_dir)


def save_tokenizer(fast, out_dir: Path) -> None:
    """save_pretrained, with the chat template kept inside tokenizer_config.json."""
    fast.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    cfg["clean_up_tokenization_spaces"] = False
    for key in ("is_local", "local_files_only"):  # load-time state, not configuration
        cfg.pop(key, None)
    # transformers 5 writes a list under "extra_special_tokens", which transformers 4 cannot
    # read (it expects a dict there); "additional_special_tokens" is understood by both.
    extra = cfg.pop("extra_special_tokens", None)
    if extra is not None:
        cfg["additional_special_tokens"] = list(extra.values()) if isinstance(extra, dict) else list(extra)
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    jinja = out_dir / "chat_template.jinja"
    if jinja.exists():  # one source of truth: tokenizer_config.json
        jinja.unlink()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def training_docs(corpus: dict, tokenizer) -> list[str]:
    """The training documents in stream order (seeded shuffle)."""
    chat_docs = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
        )
        for q, a in corpus["chat"]
    ]
    docs = corpus["code"] + corpus["prose"] * PROSE_REPEAT + corpus["docstrings"] + chat_docs + corpus.get("copy", [])
    random.Random(SEED).shuffle(docs)
    return docs


def _encode_join(docs: list[str], tokenizer) -> np.ndarray:
    backend = tokenizer.backend_tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|eos|>")
    ids: list[int] = []
    for start in range(0, len(docs), 256):
        for enc in backend.encode_batch(docs[start:start + 256], add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


def _cache(path: Path, make) -> np.ndarray:
    if path.exists():
        return np.load(path, mmap_mode="r")
    arr = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr


def build_stream(corpus: dict, tokenizer, data_dir: Path) -> np.ndarray:
    """The main training token stream: shuffled documents joined by <|eos|>, cached as .npy."""
    def make():
        t0 = time.time()
        docs = training_docs(corpus, tokenizer)
        arr = _encode_join(docs, tokenizer)
        log(f"stream: {len(arr):,} tokens from {len(docs)} documents "
            f"({sum(map(len, docs)) / len(arr):.2f} chars/token) [{time.time() - t0:.1f}s]")
        return arr
    return _cache(data_dir / f"train_tokens{_recipe_suffix(corpus)}.npy", make)


def build_phase2_stream(corpus: dict, tokenizer, data_dir: Path) -> np.ndarray:
    """Stream of the long-context stage: the training documents reshuffled, ~stream_tokens long."""
    def make():
        t0 = time.time()
        docs = training_docs(corpus, tokenizer)
        random.Random(SEED + 1).shuffle(docs)
        chars = PHASE2["stream_tokens"] * 3.6  # ~chars per token of this tokenizer on this corpus
        picked, n = [], 0
        for d in docs:
            if n >= chars:
                break
            picked.append(d)
            n += len(d)
        arr = _encode_join(picked, tokenizer)
        log(f"stage-2 stream: {len(arr):,} tokens from {len(picked)} documents [{time.time() - t0:.1f}s]")
        return arr
    return _cache(data_dir / f"phase2_tokens{_recipe_suffix(corpus)}.npy", make)


def _recipe_suffix(corpus: dict) -> str:
    """Streams with copy documents are cached apart from the cpu recipe's."""
    return f"-copy{len(corpus['copy'])}" if corpus.get("copy") else ""


def batch_for_step(stream: np.ndarray, step: int, batch_size: int, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Deterministic batch for a step: non-overlapping windows in a seeded order per epoch.

    Sequence j = step * batch_size + i of training is the same window for every batch size."""
    n_windows = len(stream) // seq_len
    idx = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(j, n_windows)
        perm = _perm(n_windows, epoch)
        idx.append(int(perm[pos]))
    rows = [np.asarray(stream[i * seq_len:(i + 1) * seq_len], dtype=np.int64) for i in idx]
    return torch.from_numpy(np.stack(rows))


def autocast(device: torch.device):
    """bf16 autocast on a GPU (fp32 master weights and optimizer state); a no-op on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def with_synthetic_repeats(x: torch.Tensor, step: int, frac: float, vocab: int, salt: int = 0) -> torch.Tensor:
    """Replace about `frac` of the rows of batch x [B, L] with a random-token segment (8 to L/2
    tokens, ids past the special tokens) repeated to fill the row: predictable only by copying.
    The longest period sets how far back the model learns to copy from (measured: trained on
    periods <= 64, a small tier copied a 60-token segment at 0.8 nats and a 250-token one not at
    all). Seeded by the step (and stage salt), so a resumed run sees the same rows."""
    rng = np.random.default_rng(SEED * 1_000_003 + step + salt * 7_919_993)
    x = x.clone()
    B, L = x.shape
    for i in range(B):
        if rng.random() < frac:
            seg = rng.integers(len(SPECIAL_TOKENS), vocab, size=int(rng.integers(8, L // 2 + 1)))
            x[i] = torch.from_numpy(np.resize(seg, L).astype(np.int64))
    return x


_PERM_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _perm(n: int, epoch: int) -> np.ndarray:
    key = (n, epoch)
    if key not in _PERM_CACHE:
        _PERM_CACHE[key] = np.random.default_rng(SEED + epoch).permutation(n)
    return _PERM_CACHE[key]


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


def model_config(tier: str, tokenizer):
    from transformers import LlamaConfig

    spec = TIERS[tier]["model"]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=ids["<|bos|>"],
        eos_token_id=ids["<|eos|>"],
        pad_token_id=ids["<|pad|>"],
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        **spec,
    )


def new_model(tier: str, tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM._from_config(model_config(tier, tokenizer), attn_implementation="sdpa",
                                          dtype=torch.float32)
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def lr_at(step: int, total: int, peak: float) -> float:
    warm = max(1, int(OPTIM["warmup_frac"] * total))
    if step < warm:
        return peak * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    floor = OPTIM["min_lr_ratio"]
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, lr: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=OPTIM["weight_decay"]), dict(params=no_decay, weight_decay=0.0)]
    # fused: one kernel for the whole update on CUDA (an eager AdamW launches several per tensor).
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=OPTIM["betas"], eps=OPTIM["eps"], fused=fused)


def stages(tier: str, stream: np.ndarray, stream2: np.ndarray) -> list[dict]:
    spec = TIERS[tier]
    return [
        dict(name="main", stream=stream, seq_len=SEQ_LEN, batch_size=spec["batch_size"], steps=spec["steps"],
             lr=spec["lr"]),
        dict(name="long", stream=stream2, seq_len=PHASE2["seq_len"], batch_size=PHASE2["batch_size"],
             steps=spec["phase2_steps"], lr=spec["lr"] * PHASE2["lr_scale"]),
    ]


def train_tier(tier: str, stream: np.ndarray, stream2: np.ndarray, tokenizer, args, record: dict) -> None:
    out_dir = Path(args.out) / tier
    run_dir = Path(args.runs) / tier
    done = run_dir / "done.json"
    if done.exists() and (out_dir / "model.safetensors").exists():
        log(f"[{tier}] already trained ({done}); delete it to retrain")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = TIERS[tier]
    plan = stages(tier, stream, stream2)
    total = sum(st["steps"] for st in plan)
    device = torch.device(args.device)
    model = new_model(tier, tokenizer).to(device)
    opt = make_optimizer(model, spec["lr"])
    step, elapsed, losses = 0, 0.0, []
    ckpt = run_dir / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
        if state.get("plan_steps"):  # a time budget shortened this run before the checkpoint
            for st, n in zip(plan, state["plan_steps"]):
                st["steps"] = n
            total = sum(st["steps"] for st in plan)
        log(f"[{tier}] resumed from step {step}/{total} ({elapsed / 60:.1f} min done)")
    budget_checked = step > 0 or not args.time_budget_s
    elapsed_warm = 0.0
    log(f"[{tier}] {n_params(model) / 1e6:.2f}M params, {total} steps, {spec['tokens']:,} tokens: " + ", ".join(
        f"{st['name']}: {st['steps']} x {st['batch_size']} x {st['seq_len']} peak lr {st['lr']:.2g}" for st in plan))
    model.train()
    t_last_log = t_last_ckpt = time.time()
    t_seg = time.time()
    seg_tokens = 0
    ema = losses[-1][1] if losses else None
    first = 0
    # The gpu-copy recipe exists to make the family copy: watch it happen (or not) as it trains.
    copy_pairs = held_out_copy_pairs(8) if args.recipe != "cpu" else []
    copy_curve: list = []
    for stage_index, st in enumerate(plan):
        tokens_per_step = st["batch_size"] * st["seq_len"]
        last = first + st["steps"]
        while first <= step < last:
            t_step = time.time()
            k = step - first
            x = batch_for_step(st["stream"], k, st["batch_size"], st["seq_len"])
            if args.synthetic_frac > 0:  # the long stage too: copying from up to 512 tokens back
                x = with_synthetic_repeats(x, k, args.synthetic_frac, VOCAB_SIZE, salt=stage_index)
            x = x.to(device, non_blocking=True)
            lr = lr_at(k, st["steps"], st["lr"])
            for g in opt.param_groups:
                g["lr"] = lr
            with autocast(device):
                out = model(input_ids=x, labels=x)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["grad_clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = float(out.loss.detach())
            step += 1
            elapsed += time.time() - t_step
            seg_tokens += tokens_per_step
            ema = loss if ema is None or k == 0 else 0.95 * ema + 0.05 * loss
            if step % 10 == 0 or step == last:
                losses.append((step, round(ema, 4)))
            if copy_pairs and (step % COPY_EVAL_EVERY == 0 or step == total):
                model.eval()
                with torch.no_grad(), autocast(device):
                    c_nll, c_top1 = copy_nll(model, tokenizer, copy_pairs)
                model.train()
                copy_curve.append((step, round(c_nll, 4), round(c_top1, 4)))
                log(f"[{tier}] step {step}: held-out copy NLL {c_nll:.3f}, top-1 {c_top1:.2f} "
                    f"(a model that copies: near 0 and 1)")
            now = time.time()
            if now - t_last_log >= LOG_EVERY_S or step == last:
                tps = seg_tokens / max(1e-9, now - t_seg)
                eta = ((last - step) * tokens_per_step + sum(
                    s2["steps"] * s2["batch_size"] * s2["seq_len"] for s2 in plan[stage_index + 1:])) / max(tps, 1e-9)
                log(f"[{tier}] {st['name']} step {step}/{total} ({100 * step / total:.0f}%) loss {ema:.3f} "
                    f"lr {lr:.2e} {tps:,.0f} tok/s elapsed {elapsed / 60:.1f}m eta {eta / 60:.1f}m")
                t_last_log, t_seg, seg_tokens = now, now, 0
            if not budget_checked and stage_index == 0 and step == BUDGET_WARMUP_STEPS:
                elapsed_warm = elapsed
            if not budget_checked and stage_index == 0 and step == BUDGET_WARMUP_STEPS + BUDGET_PROBE_STEPS:
                budget_checked = True
                per_step = (elapsed - elapsed_warm) / BUDGET_PROBE_STEPS
                scale = fit_time_budget(plan, step, elapsed, per_step, args.time_budget_s)
                if scale < 1.0:
                    total = sum(st["steps"] for st in plan)
                    last = first + st["steps"]
                    spec.update(steps=plan[0]["steps"], phase2_steps=plan[1]["steps"],
                                tokens=sum(s2["steps"] * s2["batch_size"] * s2["seq_len"] for s2 in plan))
                    log(f"[{tier}] time budget {args.time_budget_s:.0f} s: every stage cut to {scale:.1%} "
                        f"of its steps ({total} steps, {spec['tokens']:,} tokens)")
            if now - t_last_ckpt >= CKPT_EVERY_S and step < total:
                save_ckpt(ckpt, model, opt, step, elapsed, losses, plan)
                t_last_ckpt = now
        first = last
    save_ckpt(ckpt, model, opt, step, elapsed, losses, plan)
    main_steps = plan[0]["steps"]
    stats = dict(params=n_params(model), steps=step, tokens_seen=spec["tokens"],
                 train_seconds=round(elapsed, 1), final_train_loss=losses[-1][1] if losses else None,
                 main_stage_final_train_loss=next((l for s_, l in reversed(losses) if s_ <= main_steps), None),
                 loss_curve=losses[:: max(1, len(losses) // 50)], copy_curve=copy_curve)
    export(model, tokenizer, out_dir, tier, record, stats)
    atomic_write_text(done, json.dumps(stats, indent=2) + "\n")
    log(f"[{tier}] done: {stats['tokens_seen']:,} tokens in {elapsed / 60:.1f} min, "
        f"train loss {stats['final_train_loss']} -> {out_dir}")


def fit_time_budget(plan: list[dict], step: int, elapsed: float, per_step: float, budget_s: float) -> float:
    """Scale every stage's steps (in place) so that the tier's training fits budget_s.

    Called once, `step` steps into the first stage, `elapsed` seconds in, with that stage's
    measured seconds per step (timed after warm-up: a GPU's first steps pay for context and
    kernel loading). Assumes every stage costs what the first does per token. Returns the
    scale (1.0: it fits). Only step counts shrink; data order, shapes and the LR schedule's
    shape stay."""
    tok0 = plan[0]["batch_size"] * plan[0]["seq_len"]
    per_token = per_step / tok0
    planned = sum(st["steps"] * st["batch_size"] * st["seq_len"] for st in plan)
    if elapsed + per_token * (planned - step * tok0) <= budget_s:
        return 1.0
    scale = max(0.0, (budget_s - elapsed) / per_token + step * tok0) / planned
    for st in plan:
        st["steps"] = max(1, int(st["steps"] * scale))
    plan[0]["steps"] = max(plan[0]["steps"], step + 1)
    return scale


def save_ckpt(path: Path, model, opt, step, elapsed, losses, plan=None) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(dict(model=model.state_dict(), optim=opt.state_dict(), step=step, elapsed=elapsed,
                    losses=losses, plan_steps=[st["steps"] for st in plan] if plan else None), tmp)
    os.replace(tmp, path)


def export(model, tokenizer, out_dir: Path, tier: str, record: dict, stats: dict) -> None:
    from transformers import GenerationConfig

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    dtype = getattr(torch, SAVE_DTYPE)
    model = model.to("cpu", dtype)
    model.config.use_cache = True
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|bos|>"],
        eos_token_id=[ids["<|eos|>"], ids["<|im_end|>"]],
        pad_token_id=ids["<|pad|>"],
        do_sample=False,
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)
    os.chmod(out_dir / "model.safetensors", 0o644)  # safetensors writes 0600
    write_metadata(out_dir, tokenizer)
    tier_record = dict(record, tier=tier, name=f"demo-{tier}", model=TIERS[tier]["model"], lr=TIERS[tier]["lr"],
                       batch_size=TIERS[tier]["batch_size"], steps=TIERS[tier]["steps"],
                       phase2_steps=TIERS[tier]["phase2_steps"],
                       token_budget=TIERS[tier]["tokens"], result=stats,
                       hardware=dict(machine=platform.machine(), cpu_count=os.cpu_count(),
                                     torch=torch.__version__, threads=torch.get_num_threads(),
                                     device=record.get("device", "cpu")))
    atomic_write_text(out_dir / "training_config.json", json.dumps(tier_record, indent=2) + "\n")


def write_metadata(out_dir: Path, tokenizer) -> None:
    """config.json keys for older readers and the tokenizer files. Idempotent."""
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = SAVE_DTYPE
    cfg["torch_dtype"] = SAVE_DTYPE  # older readers
    cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]  # older readers (transformers 4)
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_tokenizer(tokenizer, out_dir)


# --------------------------------------------------------------------------------------
# Evaluation, samples, model card
# --------------------------------------------------------------------------------------


def held_out_texts() -> dict[str, list[str]]:
    s = demo.split()
    topics = demo.prose_topics()
    code = [t for t in (demo.read_code(rel) for rel in s.held_out_code) if t]
    prose = [topics[k] for k in s.held_out_prose]
    return {"code": code, "prose": prose}


@torch.no_grad()
def nll_per_token(model, tokenizer, texts: list[str], max_tokens: int = EVAL_MAX_TOKENS,
                  window: int = SEQ_LEN, return_argmax: bool = False):
    """Mean NLL (nats/token) of documents joined by <|eos|>, in non-overlapping windows.

    Every document follows an <|eos|> so its first token has a context like in training.
    Returns (nll, tokens), plus the greedy prediction at every position if return_argmax."""
    eos = tokenizer.convert_tokens_to_ids("<|eos|>")
    ids: list[int] = []
    for t in texts:
        ids.append(eos)
        ids.extend(tokenizer.backend_tokenizer.encode(t, add_special_tokens=False).ids)
        if len(ids) > max_tokens + 1:
            break
    ids = ids[: max_tokens + 1]
    total, count, preds = 0.0, 0, []
    x_all = torch.tensor(ids, dtype=torch.long)
    for start in range(0, len(ids) - 1, window):
        x = x_all[start:start + window + 1]
        if len(x) < 2:
            break
        logits = model(input_ids=x[None, :-1]).logits.float()[0]
        nll = torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum")
        total += float(nll)
        count += len(x) - 1
        preds.append(logits.argmax(-1))
    if return_argmax:
        return total / count, count, torch.cat(preds), x_all[1:count + 1]
    return total / count, count


def held_out_copy_pairs(n: int = 24) -> list[tuple[str, str]]:
    """(prefix, copy) of held-out edit-code documents: a function, then the instruction to
    rename it; the copy is the renamed function, all predictable from the prefix."""
    rng = random.Random(SEED + 3)
    pairs = []
    for rel in demo.split().held_out_code:
        got = code_chunk_at_def(demo.read_code(rel) or "", 900, rng)
        if got is None:
            continue
        a, name = got
        new = name + "_v2"
        pairs.append((_EDIT_TEMPLATES[0].format(path=rel, a=a, b="", old=name, new=new),
                      rename(a, name, new)))
        if len(pairs) == n:
            break
    return pairs


@torch.no_grad()
def copy_nll(model, tokenizer, pairs: list[tuple[str, str]]) -> tuple[float, float]:
    """Mean NLL and greedy top-1 accuracy on the copied part: ~0 and ~1 for a model that
    copies from its prompt, about its fresh-code NLL for one that does not."""
    backend = tokenizer.backend_tokenizer
    total, hits, count = 0.0, 0, 0
    for prefix, copy in pairs:
        a = backend.encode(prefix, add_special_tokens=False).ids
        b = backend.encode(copy, add_special_tokens=False).ids
        ids = torch.tensor((a + b)[:MAX_POSITION_EMBEDDINGS], device=model.device)
        if len(ids) <= len(a):
            continue
        logits = model(input_ids=ids[None, :-1]).logits.float()[0, len(a) - 1:]
        target = ids[len(a):]
        total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        hits += int((logits.argmax(-1) == target).sum())
        count += len(target)
    return total / max(count, 1), hits / max(count, 1)


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def evaluate(out: Path) -> dict:
    """Held-out NLL per tier, greedy top-1 accuracy, and how often two tiers' greedy
    predictions agree (an upper bound on greedy draft-model acceptance per token)."""
    texts = held_out_texts()
    sample = demo.held_out_samples()
    copy_pairs = held_out_copy_pairs()
    results, argmax = {}, {}
    for tier in demo.TIERS:
        path = out / tier
        if not (path / "model.safetensors").exists():
            continue
        t0 = time.time()
        tok = load_tokenizer(path)
        model = load_model(path)
        r = {"params": n_params(model)}
        for kind in ("code", "prose"):
            nll, n, pred, target = nll_per_token(model, tok, texts[kind], return_argmax=True)
            argmax[tier, kind] = pred
            r[f"{kind}_nll"] = round(nll, 4)
            r[f"{kind}_tokens"] = n
            r[f"{kind}_top1"] = round(float((pred == target).float().mean()), 4)
            r[f"{kind}_sample_nll"] = round(nll_per_token(model, tok, [sample[kind]])[0], 4)
        r["copy_nll"], r["copy_top1"] = (round(v, 4) for v in copy_nll(model, tok, copy_pairs))
        r["samples"] = samples(model, tok)
        results[tier] = r
        log(f"[eval {tier}] code {r['code_nll']:.3f} ({r['code_tokens']} tok) prose {r['prose_nll']:.3f} "
            f"({r['prose_tokens']} tok) copy {r['copy_nll']:.3f} (top-1 {r['copy_top1']:.2f}) [{time.time() - t0:.1f}s]")
    tiers = list(results)
    for i, a in enumerate(tiers):
        for b in tiers[i + 1:]:
            for kind in ("code", "prose"):
                agree = float((argmax[a, kind] == argmax[b, kind]).float().mean())
                results[b][f"{kind}_greedy_agreement_with_{a}"] = round(agree, 4)
    atomic_write_text(out / "eval.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results


@torch.no_grad()
def samples(model, tok, max_new_tokens: int = 48) -> list[dict]:
    out = []
    for kind, prompt in SAMPLE_PROMPTS:
        if kind == "chat":
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        completion = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        out.append(dict(kind=kind, prompt=text, completion=completion))
    return out


DECODE_SPEED_HEADER = "## Decode speed (sizewise engine, CPU)"


def write_card(out: Path, results: dict) -> None:
    card = out / "README.md"
    decode_section = f"{DECODE_SPEED_HEADER}\n\nTODO(lead): fill with the sizewise engine's decode tokens/s per tier on CPU.\n"
    if card.exists():  # keep what the lead wrote in the decode-speed section
        old = card.read_text()
        m = re.search(re.escape(DECODE_SPEED_HEADER) + r".*?(?=\n## |\Z)", old, re.S)
        if m:
            decode_section = m.group(0).rstrip() + "\n"
    rows, total_s, total_tok, tcs = [], 0.0, 0, {}
    for tier, r in results.items():
        tc = tcs[tier] = json.loads((out / tier / "training_config.json").read_text())
        st, m = tc["result"], tc["model"]
        total_s += st["train_seconds"]
        total_tok = max(total_tok, st["tokens_seen"])
        size_mib = (out / tier / "model.safetensors").stat().st_size / 2**20
        rows.append(
            f"| demo-{tier} | {r['params'] / 1e6:.2f}M | {m['hidden_size']} / {m['num_hidden_layers']} / "
            f"{m['num_attention_heads']} / {m['num_key_value_heads']} / {m['intermediate_size']} | "
            f"{size_mib:.1f} | {st['tokens_seen'] / 1e6:.2f}M | {st['train_seconds'] / 60:.1f} | "
            f"{st['final_train_loss']:.3f} | {r['code_nll']:.3f} | {r['prose_nll']:.3f} | "
            f"{r.get('copy_nll', float('nan')):.3f} ({r.get('copy_top1', float('nan')):.2f}) |"
        )
    agreement_md = ""
    if "large" in results and len(results) == 3:
        lg, md = results["large"], results["medium"]
        agreement_md = (
            "Greedy next-token agreement on the same held-out windows (how often the smaller model's\n"
            "argmax equals the larger one's: roughly the per-token acceptance of greedy draft-model\n"
            "speculation) and top-1 accuracy against the text:\n\n"
            "| | code | prose |\n|---|---|---|\n"
            f"| small vs large | {lg['code_greedy_agreement_with_small']:.2f} | {lg['prose_greedy_agreement_with_small']:.2f} |\n"
            f"| medium vs large | {lg['code_greedy_agreement_with_medium']:.2f} | {lg['prose_greedy_agreement_with_medium']:.2f} |\n"
            f"| small vs medium | {md['code_greedy_agreement_with_small']:.2f} | {md['prose_greedy_agreement_with_small']:.2f} |\n"
            + "".join(f"| top-1 accuracy, {t} | {r['code_top1']:.2f} | {r['prose_top1']:.2f} |\n" for t, r in results.items())
        )
    any_tc = json.loads((out / next(iter(results)) / "training_config.json").read_text())
    hw = any_tc["hardware"]
    if hw.get("device", "cpu").startswith("cuda"):
        train_hw = f"bfloat16 autocast on {hw['device']} (torch {hw['torch']})"
    else:
        train_hw = (f"float32 on CPU ({hw['cpu_count']} cores, torch intra-op threads:\n  {hw['threads']}, "
                    f"torch {hw['torch']}, {hw['machine']})")
    n_code = sum(r["code_tokens"] for r in results.values()) // max(1, len(results))
    n_prose = sum(r["prose_tokens"] for r in results.values()) // max(1, len(results))
    samples_md = []
    for tier, r in results.items():
        samples_md.append(f"### demo-{tier}\n")
        for s in r["samples"]:
            samples_md.append(f"Prompt ({s['kind']}):\n\n```\n{s['prompt']}\n```\n\nGreedy completion:\n\n"
                              f"```\n{s['completion']}\n```\n")
    text = f"""# sizewise demo family (demo-small / demo-medium / demo-large)

Three Llama-architecture causal language models of one family, trained from scratch by
`scripts/train_demo_family.py` on the Python {any_tc['corpus']['python']} standard library
(code) and its language-reference prose (`pydoc_data.topics`). They exist so that
`make serve` works on a laptop CPU with nothing downloaded, and so that tests and benchmarks
of routing and speculative decoding see real, size-dependent behaviour: the larger model
predicts held-out text better, the smaller one is faster, and a smaller one predicts the
larger one's next token often enough (below) for draft-model speculation to accept something.
They are toys: they write
plausible-looking Python and reference-manual English, not correct programs or facts.

All three share one tokenizer and one training token stream (each tier trained on a prefix
of the same shuffled stream, in the same order).

## Models

| model | params | d / layers / heads / kv heads / ffn | safetensors MiB ({SAVE_DTYPE}) | tokens seen | train min | final train loss | held-out code NLL | held-out prose NLL | copy NLL (top-1) |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

NLL is the mean negative log-likelihood per token (nats, lower is better) of the saved
{SAVE_DTYPE} weights run in float32, on held-out files the models never saw: code is the
held-out stdlib `.py` files (~{n_code:,} tokens evaluated), prose the held-out
`pydoc_data.topics` entries (~{n_prose:,} tokens), in windows of {SEQ_LEN} tokens.
Recompute with `python scripts/train_demo_family.py --eval-only` (writes `eval.json`).
Copy NLL (and greedy top-1 accuracy) is measured on the copied half of {len(held_out_copy_pairs())}
held-out edit-code documents (a function, "the same code with `f` renamed to `f_v2`:", then the
renamed function): a model that copies from its prompt scores near 0 (top-1 near 1); one that
does not scores about its fresh-code NLL. Prompt-lookup speculation and copy-heavy routing only
pay with a family that copies; the `cpu` recipe's family does not (induction heads form only
past ~16M training tokens at batch 4 x 256). `bash scripts/gpu_train_demo.sh` trains the
`gpu-copy` recipe on a GPU in minutes (written for the next GPU session; not yet run).

{agreement_md}

- Architecture: `LlamaForCausalLM`, tied input/output embeddings, RoPE (theta 10000),
  SwiGLU MLP, RMSNorm, grouped-query attention, `max_position_embeddings` {MAX_POSITION_EMBEDDINGS}.
- Training, recipe `{any_tc.get('recipe', {}).get('name', 'cpu')}`, two stages per tier, {train_hw}, {total_s / 60:.0f} minutes for all three tiers
  (time spent in optimizer steps; it grows when other jobs share the cores). AdamW (betas
  {OPTIM['betas']}, weight decay {OPTIM['weight_decay']}, grad clip {OPTIM['grad_clip']}), each stage
  with linear warmup over {OPTIM['warmup_frac']:.0%} of its steps then cosine decay to
  {OPTIM['min_lr_ratio']:.0%} of its peak LR, seed {SEED}.
  1. main: sequences of {SEQ_LEN} tokens, batch {" / ".join(str(tcs[t]["batch_size"]) for t in results)},
     {" / ".join(str(tcs[t]["steps"]) for t in results)} steps, peak LR
     {" / ".join(str(tcs[t]["lr"]) for t in results)} for {" / ".join(results)};
  2. long context: sequences of {PHASE2['seq_len']} tokens, batch {PHASE2['batch_size']},
     {" / ".join(str(tcs[t]["phase2_steps"]) for t in results)} steps, peak LR {PHASE2['lr_scale']:.0%} of
     the main stage's, on the same documents reshuffled. Positions up to
     `max_position_embeddings` are trained (without it, quality fell past 256 tokens).
- Each model directory has `training_config.json` with the full configuration and results.

## Tokenizer

Byte-level BPE (`tokenizers`), {VOCAB_SIZE} tokens, shared by all tiers, loads as a
`PreTrainedTokenizerFast` with `AutoTokenizer.from_pretrained(dir)`.

- Special tokens (ids 0-4): `<|bos|>`, `<|eos|>`, `<|pad|>`, `<|im_start|>`, `<|im_end|>`.
- **No BOS is prepended** (and no EOS appended) by the tokenizer, and no normalisation is
  applied: `decode(encode(s)) == s` for every string (Python source with tabs and
  indentation, emoji, CJK, ...). The models were trained on documents separated by
  `<|eos|>` and never saw `<|bos|>`; a prompt needs no prefix.
- Chat template (ChatML-like, in `tokenizer_config.json`):
  `<|im_start|>{{role}}\\n{{content}}<|im_end|>\\n` per message, and `<|im_start|>assistant\\n`
  with `add_generation_prompt=True`. `generation_config.json` stops at `<|eos|>` and at
  `<|im_end|>`. The training stream holds a few thousand short chat examples made from
  training data only (a stdlib function's docstring as the answer to "What does `f` do?", a
  reference topic's first paragraphs as the answer to "Explain ..."), so the models follow the
  format and stop; do not expect them to answer questions correctly.
- The pre-tokenizer is GPT-2's: a newline and the indentation after it are one token
  (`"\\n   "` then `" return"`). A prompt ending with a bare `"\\n"` therefore asks for a
  token boundary the models rarely saw after code lines (they tend to start a new top-level
  statement); end code prompts inside a line, as in the samples below.

## Data

- Code: the interpreter's standard library `.py` files, excluding test suites (`test/`,
  `tests/`, `idle_test/`), `site-packages`, the generated charmap tables in `encodings/` and
  `pydoc_data/topics.py` (used as prose). Prose: `pydoc_data.topics.topics` (shown
  {PROSE_REPEAT}x per pass) and the module docstrings of the training files.
- Held out: {demo.CODE_HELD_OUT_PERCENT}% of code files and {demo.PROSE_HELD_OUT_PERCENT}% of prose
  topics, chosen by a salted SHA-1 of the relative path / topic key (`sizewise.demo.is_held_out`);
  the lists are in `held_out.json`. `sizewise.demo.held_out_samples()` gives a small fixed
  sample of them for tests.

## Limitations

- They do not copy from their context. A span of held-out text repeated right after itself
  is predicted no better the second time than the first (no induction heads: these models saw
  1-3M tokens; such heads usually form much later). Prompt-lookup speculation is accepted
  only as far as the model's own prediction happens to match the prompt, and a "repeat the
  text above" prompt is not followed. A second stage mixing in 30% self-repeating documents
  (and synthetic repeated random tokens) for 400 steps did not change this for the small
  tier, so it is not part of the recipe.
- Greedy decoding falls into loops within a few dozen tokens (see the samples).
- Windows of more than 1024 tokens are past `max_position_embeddings`.

{decode_section}
## Sample completions (greedy, transformers, 48 new tokens)

{chr(10).join(samples_md)}
## Retrain

```
make train-demo            # = .venv/bin/python scripts/train_demo_family.py
```

Deterministic (fixed seeds and data order; float32 CPU kernels may still differ in the last
bits across machines). Intermediate state lives in `runs/demo/` (gitignored): the tokenizer,
the token stream, and per-tier checkpoints every {CKPT_EVERY_S:.0f} s, so an interrupted run
resumes where it stopped when started again. Delete `runs/demo/<tier>/` to retrain a tier;
`--tiers`, `--eval-only` and `--bench` (training tokens/s per tier) are the everyday options;
`--help` lists the rest (the `gpu-copy` recipe's `--device`, `--time-budget-s`, `--prepare-only`).
Log: `runs/demo/train.log` when started with `nohup ... > runs/demo/train.log`.
"""
    atomic_write_text(card, text)
    log(f"model card -> {card}")


# --------------------------------------------------------------------------------------


def bench(stream, tokenizer, device: str = "cpu", steps: int = 4) -> None:
    dev = torch.device(device)
    for tier in demo.TIERS:
        model = new_model(tier, tokenizer).to(dev)
        opt = make_optimizer(model, 1e-3)
        times = []
        for step in range(steps + 1):
            x = batch_for_step(stream, step, TIERS[tier]["batch_size"]).to(dev)
            t0 = time.time()
            with autocast(dev):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            float(loss)  # wait for the device
            times.append(time.time() - t0)
        dt = sum(times[1:]) / steps
        tps = TIERS[tier]["batch_size"] * SEQ_LEN / dt
        log(f"[bench {tier}] {n_params(model) / 1e6:.2f}M params: {dt:.2f} s/step, {tps:,.0f} tok/s, "
            f"budget {TIERS[tier]['tokens']:,} tokens -> {TIERS[tier]['tokens'] / tps / 60:.1f} min")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "models" / "demo"))
    ap.add_argument("--runs", default=str(REPO / "runs" / "demo"))
    ap.add_argument("--tiers", default=",".join(demo.TIERS))
    # One intra-op thread by default: on a 2-core machine shared with anything else, OpenMP
    # spin-waits make 2 threads several times slower than 1 (measured here: ~20x for decode).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-only", action="store_true",
                    help="evaluate models/demo/*, rewrite eval.json and the card (and normalise metadata files)")
    ap.add_argument("--bench", action="store_true", help="measure training throughput per tier and exit")
    ap.add_argument("--no-card", action="store_true")
    ap.add_argument("--recipe", default="cpu", choices=sorted(RECIPES),
                    help="cpu: the committed family's budgets; gpu-copy: copy documents + induction-head budgets")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (gpu-copy is meant for a GPU)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="scale every step budget (smoke tests)")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="per tier: after timing its first steps, shorten every stage so the tier's "
                         "training fits this many seconds (a device lease)")
    ap.add_argument("--prepare-only", action="store_true",
                    help="build the corpus, tokenizer and token streams (cached under --runs) and exit")
    ap.add_argument("--no-eval", action="store_true",
                    help="train and export only; evaluate later with --eval-only (parallel tier runs)")
    args = ap.parse_args(argv)
    if args.runs == str(REPO / "runs" / "demo") and args.recipe != "cpu":
        args.runs = str(REPO / "runs" / f"demo-{args.recipe}")  # checkpoints of another recipe never mix
    recipe = apply_recipe(args.recipe, args.steps_scale)
    args.synthetic_frac = recipe.get("synthetic_frac", 0.0)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)

    if args.eval_only:
        for tier in demo.TIERS:  # normalise metadata files of models exported by older versions
            if (out / tier / "config.json").exists():
                write_metadata(out / tier, load_tokenizer(out / tier))
        results = evaluate(out)
        if not args.no_card and results:
            write_card(out, results)
        return 0

    record = config_record(args)
    record.update(recipe=recipe, device=str(args.device))
    corpus = build_corpus(copy_docs=recipe["copy_docs"])
    s = corpus["split"]
    held = dict(code=s.held_out_code, prose=s.held_out_prose)
    atomic_write_text(out / "held_out.json", json.dumps(held, indent=2) + "\n")
    atomic_write_text(runs / "training_config.json", json.dumps(record, indent=2) + "\n")
    tokenizer = train_tokenizer(corpus, runs / "tokenizer")
    stream = build_stream(corpus, tokenizer, runs / "data")
    stream2 = build_phase2_stream(corpus, tokenizer, runs / "data")
    record["corpus"].update(
        train_code_files=len(s.train_code), held_out_code_files=len(s.held_out_code),
        train_prose_topics=len(s.train_prose), held_out_prose_topics=len(s.held_out_prose),
        stream_tokens=int(len(stream)),
        phase2_stream_tokens=int(len(stream2)),
        stream_sha1=hashlib.sha1(np.ascontiguousarray(stream).tobytes()).hexdigest(),
        held_out=held,
    )
    if args.bench:
        bench(stream, tokenizer, args.device)
        return 0
    if args.prepare_only:
        log(f"prepared {runs}: tokenizer and token streams")
        return 0
    for tier in args.tiers.split(","):
        train_tier(tier.strip(), stream, stream2, tokenizer, args, record)
    if args.no_eval:
        return 0
    results = evaluate(out)
    if not args.no_card:
        write_card(out, results)
    log("all done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
