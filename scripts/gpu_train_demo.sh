#!/usr/bin/env bash
# Train the demo family with the gpu-copy recipe on a lent GPU and bring it back through $OUT.
#
#   bash scripts/gpu_train_demo.sh            # on the device (device tool: run it as is)
#   DEVICE=cpu STEPS_SCALE=0.002 bash scripts/gpu_train_demo.sh   # smoke test here
#
# Why: the committed (cpu-recipe) family cannot copy from its prompt (copy NLL ~ fresh-code NLL,
# models/demo/README.md), so prompt-lookup speculation and copy-aware routing have nothing to
# work with; the gpu-copy recipe (scripts/train_demo_family.py, RECIPES) trains past the point
# where induction heads form, which takes hours on the 2-core CPU and minutes on a GPU.
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
"$PY" scripts/train_demo_family.py --recipe gpu-copy --device "${DEVICE:-cuda}" \
    --steps-scale "${STEPS_SCALE:-1.0}" --threads "${THREADS:-8}" \
    --out models/demo-copy --runs runs/demo-gpu-copy 2>&1 | tee "$OUT_DIR/train-demo-copy.log"
tar cf - -C models demo-copy | split -b 15m - "$OUT_DIR/demo-copy.tar.part-"
ls -l "$OUT_DIR"
