#!/usr/bin/env bash
# Train the demo family with the gpu-copy recipe on a lent GPU and bring it back through $OUT,
# inside one device command (the device tool stops a command at 600 s).
#
#   bash scripts/gpu_train_demo.sh            # on the device (device tool: run it as is)
#   DEVICE=cpu STEPS_SCALE=0.002 TIME_BUDGET_S=60 bash scripts/gpu_train_demo.sh   # smoke test here
#
# Why: the committed (cpu-recipe) family cannot copy from its prompt (copy NLL ~ fresh-code NLL,
# models/demo/README.md), so prompt-lookup speculation and copy-aware routing have nothing to
# work with; the gpu-copy recipe (scripts/train_demo_family.py, RECIPES) trains past the point
# where induction heads form, which takes hours on the 2-core CPU and minutes on a GPU.
# How it fits the lease: the corpus, tokenizer and token streams are built once (~20 s), then
# the three tiers train at the same time on the one GPU (tiny models leave it mostly idle, so
# they overlap), each shortened to TIME_BUDGET_S seconds of training if its first 60 steps say
# the full recipe would not fit (the card then shows the steps it really took), then all are
# evaluated (held-out NLL, copy NLL, agreement) and packed.
# Output: models/demo-copy/{small,medium,large} + eval.json + README.md, packed as one tar
# split into 15 MiB parts under $OUT (the device tool returns files of at most 16 MiB). Here:
#   cat <files_at>/demo-copy.tar.part-* | tar xf - -C models/
# then compare models/demo-copy/README.md with models/demo/README.md before adopting it (adopting =
# replacing models/demo with it and rerunning the routing and speculative benchmarks).
# models/demo-copy/ is git-ignored so a smoke run never lands by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-gpu-results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
RUNS=runs/demo-gpu-copy
common=(scripts/train_demo_family.py --recipe gpu-copy --device "${DEVICE:-cuda}"
        --steps-scale "${STEPS_SCALE:-1.0}" --out models/demo-copy --runs "$RUNS")
"$PY" "${common[@]}" --prepare-only 2>&1 | tee "$OUT_DIR/train-demo-copy.log"
pids=()
for tier in small medium large; do
    "$PY" "${common[@]}" --tiers "$tier" --no-eval --no-card --threads 2 \
        --time-budget-s "${TIME_BUDGET_S:-330}" > "$OUT_DIR/train-$tier.log" 2>&1 &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
cat "$OUT_DIR"/train-{small,medium,large}.log >> "$OUT_DIR/train-demo-copy.log"
[ "$rc" -eq 0 ] || { echo "a tier failed to train: see $OUT_DIR/train-*.log"; exit 1; }
"$PY" scripts/train_demo_family.py --eval-only --out models/demo-copy --threads "${THREADS:-8}" 2>&1 \
    | tee -a "$OUT_DIR/train-demo-copy.log"
tar cf - -C models demo-copy | split -b 15m - "$OUT_DIR/demo-copy.tar.part-"
ls -l "$OUT_DIR"
