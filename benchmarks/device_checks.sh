#!/bin/bash
# The speed issue's device checks in one call, for the start of a GPU window (at most 12 minutes with
# the defaults: seven checks of at most 100 s): each benchmark under its own time limit, its table and its
# errors into $OUT, a line per check in $OUT/summary.txt. Order: the compile precision check first (the trainer may compile only if it passes),
# then what the README's speed section still lacks GPU figures for.
#
#   PYTHONPATH=/tmp/site:$PWD OUT=$OUT DATA_DIR=bundle/data bash benchmarks/device_checks.sh
#                                      # on the GPU box, after installing the bundle's wheels into /tmp/site
#   DEVICE=cpu LIMIT=60 OUT=/tmp/checks bash benchmarks/device_checks.sh     # the same calls on a CPU
set -u
OUT=${OUT:-device-checks}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-100}
PYTHON=${PYTHON:-python3}
DATA=()
if [ -n "${DATA_DIR:-}" ]; then DATA=(--data-dir "$DATA_DIR"); fi
mkdir -p "$OUT"

check() {
    local name=$1
    shift
    local start=$SECONDS
    timeout "$LIMIT" "$PYTHON" "$@" > "$OUT/$name.md" 2> "$OUT/$name.err"
    echo "$name: exit $? in $((SECONDS - start)) s" >> "$OUT/summary.txt"
}

check compile-precision-test-resnet-mb8 benchmarks/compile_precision.py --device "$DEVICE" --imagenet-stem \
    --micro-batch 8 --mode reduce-overhead "${DATA[@]}"
check compile-precision-resnet18-mb2 benchmarks/compile_precision.py --device "$DEVICE" --backbone resnet18 \
    --micro-batch 2 --mode reduce-overhead --channels-last "${DATA[@]}"
check throughput benchmarks/train_throughput.py --device "$DEVICE" --steps 50 --compile reduce-overhead
check step-operations benchmarks/step_operations.py --device "$DEVICE" --steps 20 --rounds 2
check cbn-step benchmarks/cbn_step.py --device "$DEVICE" --backbone resnet18 --batch 32 --micro-batch 8 --rounds 20
check corruptions benchmarks/corruptions.py --device "$DEVICE" --no-reference --batch 64
check tta-eval benchmarks/tta_eval.py --device "$DEVICE" --images 2000 --views 8
cat "$OUT/summary.txt"
