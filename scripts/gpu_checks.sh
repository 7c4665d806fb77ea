#!/usr/bin/env bash
# Every GPU check of issue 8 in one prepared run, sized for a 15-minute device lease.
#
#   bash scripts/gpu_checks.sh                     # on the lent H100 (device tool: run it as is)
#   DEVICE=cpu SHAPES=tiny PROMPT_LEN=128 NEW_TOKENS=16 bash scripts/gpu_checks.sh   # smoke test here
#
# Per shape (random weights at the real config, nothing downloaded):
#   1. scripts/check_device.py: bf16 logits vs the CPU float32 reference (cut to CHECK_LAYERS
#      layers so the CPU reference stays cheap), greedy eager == graph, and for the shapes in
#      GRAPH_BENCH_SHAPES graph vs eager step time;
#   2. benchmarks/decode.py: sizewise vs transformers generate() vs the bandwidth roofline at
#      PROMPT_LEN-token prompts, batch 1 and 8.
# Order: the 1B checks and table first, then the 7B, all inside TOTAL_LIMIT_S (default 560 s,
# under the device tool's 600 s per command), each step inside STEP_LIMIT_S; a step that would
# not fit is skipped and reported.
# Logs and JSON go to $OUT (the device tool brings that folder back) or ./gpu-results. Needs
# only what the device image has (torch, triton, transformers, safetensors, tokenizers): the
# package is used from src/ and never pip-installed. Each step has its own time limit so one
# slow step cannot eat the whole lease; the script goes on and reports what failed.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-gpu-results}"
mkdir -p "$OUT_DIR"
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bfloat16}"
SHAPES="${SHAPES:-llama-3.2-1b qwen2.5-7b}"
PROMPT_LEN="${PROMPT_LEN:-2048}"
NEW_TOKENS="${NEW_TOKENS:-128}"
CHECK_LAYERS="${CHECK_LAYERS:-2}"
STEP_LIMIT_S="${STEP_LIMIT_S:-240}"
GRAPH_BENCH_SHAPES="${GRAPH_BENCH_SHAPES:-llama-3.2-1b tiny}"  # check_device's graph-vs-eager timing (a second full-depth build)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
failed=()

TOTAL_LIMIT_S="${TOTAL_LIMIT_S:-560}"  # the device tool stops a command at 600 s; leave time to return files

step() {  # step NAME COMMAND...: run with a time limit, log to $OUT_DIR/NAME.log
    local name="$1"; shift
    local left=$((TOTAL_LIMIT_S - SECONDS)) limit=$STEP_LIMIT_S
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 30 ]; then
        echo "=== $name: skipped, ${left} s left of TOTAL_LIMIT_S=$TOTAL_LIMIT_S"
        failed+=("$name(skipped)")
        return
    fi
    echo "=== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed+=("$name(rc=$rc)")
}

{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__,
"transformers", transformers.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$OUT_DIR/env.log"

for shape in $SHAPES; do
    bench=(--skip-bench)
    case " $GRAPH_BENCH_SHAPES " in *" $shape "*) bench=();; esac
    step "check-$shape" "$PY" scripts/check_device.py --device "$DEVICE" --dtype "$DTYPE" --shape "$shape" \
        --check-layers "$CHECK_LAYERS" --batch 1,8 --prompt-len "$PROMPT_LEN" "${bench[@]}" \
        --json "$OUT_DIR/check-$shape.json"
    step "decode-$shape" "$PY" benchmarks/decode.py --device "$DEVICE" --dtype "$DTYPE" --shape "$shape" \
        --prompt-len "$PROMPT_LEN" --new-tokens "$NEW_TOKENS" --batch 1 8 --json "$OUT_DIR/decode-$shape.json"
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed; results in $OUT_DIR"
