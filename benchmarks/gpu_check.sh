#!/usr/bin/env bash
# The GPU proof in one call: the cuda tests, the loss and step benchmarks, the real training
# loop, the authors' formulation, the data path and a torchrun NCCL run, each under its own
# time limit, going on past a failure, all within 9 minutes. Each step's output goes to
# OUT_DIR/NN_name.log, its exit status and seconds to OUT_DIR/steps.tsv, and the markdown
# table (card, torch, date, images/s, MFU, peak memory, ratios) to OUT_DIR/summary.md
# (benchmarks/gpu_summary.py; rerun it on the folder to remake the table).
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#
# Without CUDA it says so in one line and exits 2. Run from anywhere; it works in the repo.
set -u

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "error: no CUDA device visible to $PY (torch.cuda.is_available() is false): run this on a GPU machine" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
cd "$REPO" || exit 2
BUDGET_S=540  # 9 minutes for everything
printf 'step\trc\tseconds\tcommand\n' > "$OUT/steps.tsv"
n=0

# step NAME LIMIT_S COMMAND...: run with its own limit (cut to what is left of the budget).
step() {
    local name="$1" limit="$2"; shift 2
    n=$((n + 1))
    local log; log="$OUT/$(printf '%02d' "$n")_$name.log"
    local left=$((BUDGET_S - SECONDS))
    if [ "$left" -lt 10 ]; then
        echo "skipped: the 9-minute budget is spent" > "$log"
        printf '%s\tskipped\t0\t%s\n' "$name" "$*" >> "$OUT/steps.tsv"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$*" >> "$OUT/steps.tsv"
    echo "   exit $rc after $((SECONDS - start))s -> $log"
}

STEP=(benchmarks/bench_step.py --steps 10 --warmup 3)
step cuda_tests 130 "$PY" -m pytest -q -n 0 -m cuda tests -p no:cacheprovider
step loss_reference 25 "$PY" benchmarks/bench_loss.py --reference
for arch in vit_small vit_base; do
    for precision in bf16 fp16; do
        step "step_${arch}_${precision}_eager" 20 "$PY" "${STEP[@]}" --arch "$arch" --precision "$precision"
    done
done
for arch in vit_small vit_base; do  # the first steps compile (3 graphs), then 10 are timed
    for precision in bf16 fp16; do
        step "step_${arch}_${precision}_compiled" 40 "$PY" "${STEP[@]}" --arch "$arch" --precision "$precision" --compile true
    done
done
step real_loop_vit_small_bf16 35 "$PY" "${STEP[@]}" --arch vit_small --precision bf16 --real_loop
step formulation_vit_small_bf16 25 "$PY" "${STEP[@]}" --arch vit_small --precision bf16 --compare formulation
step data_augment_on 30 "$PY" benchmarks/bench_data.py --compare augment_on --n_images 96 \
    --max_batches 4 --rounds 1
step torchrun_nccl_real_loop 40 env MASSL_FORCE_DDP=1 "$PY" -m torch.distributed.run \
    --standalone --nproc-per-node=1 "${STEP[@]}" --arch vit_small --precision bf16 --real_loop

"$PY" benchmarks/gpu_summary.py "$OUT" > "$OUT/summary.md" 2> "$OUT/summary.err" \
    || echo "gpu_summary.py failed: see $OUT/summary.err" >&2
cat "$OUT/summary.md"
echo "all steps in ${SECONDS}s; outputs in $OUT"
