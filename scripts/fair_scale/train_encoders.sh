#!/usr/bin/env bash
# Issue 18's three encoders (W, e4e, Cycle) on one generator, each trained until its validation loss levels off.
#
#   bash scripts/fair_scale/train_encoders.sh GENERATOR [OUT [RUN ...]]
#       RUN: w, e4e, cycle (default: these three), cycle-zg-none (the Cycle run with --zero-grad none)
#
# Same losses, images, batch, encoder size and validation set for all three; only the schedule differs:
#   w     the W preset (stage 0 throughout), up to 60,000 steps
#   e4e   e4e.yaml: the first three phases of the cycle schedule (W, W -> W+, W+), its W+ phase open to 60,000
#   cycle cycle.yaml: the paper's schedule rescaled to 30,000 steps, its final W phase open to 60,000
# Each stops by `--val-patience 4` (four validations, 2,000 steps, of the schedule's last stage without a 2% gain on
# that stage's best), so e4e's W+ curve also tells whether the cycle's W+ phase (2,080-20,000) was long enough.
# MAX_STEPS=N (environment) trains every run to step N with the plateau rule off (--val-patience 0) instead: the
# same images for all three, where the rule proved too loose (docs/FAIR_SCALE.md: W and Cycle still improved at 48,000).
# Runs resume from their checkpoints when started again; finished ones are skipped. The three run at once, one torch
# thread each (on a 2-core machine more threads per run only slow the others down; a run that ends frees its core).
set -euo pipefail
G=${1:?usage: train_encoders.sh GENERATOR [OUT [RUN ...]]}
OUT=${2:-$HOME/.cache/cycle-encoding/runs/fair}
RUNS=("${@:3}")
[[ ${#RUNS[@]} -gt 0 ]] || RUNS=(w e4e cycle)
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CE=${CE:-$ROOT/.venv/bin/cycle-encoding}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE

common=(--generator "$G" --data fashion-mnist --out "$OUT" --batch-size 16
        --perceptual fmnist-features --identity fmnist-features
        --encoder-widths 32,48,64,128 --encoder-units 1,2,2,1
        --log-every 100 --image-every 2000 --val-every 500 --val-count 256 --checkpoint-every 500
        --val-patience 4 --val-min-improvement 0.02 --precision bf16 --compile --device cpu --progress lines)
if [[ -n ${MAX_STEPS:-} ]]; then
    common+=(--max-steps "$MAX_STEPS" --val-patience 0)
fi

train() {  # NAME ARGS...: start the run, resume it, or skip it when its log has ended
    local name=$1 dir
    shift
    dir=$(find "$OUT" -maxdepth 1 -type d -name "*-$name" | sort | tail -n 1)
    if [[ -n $dir && -f $dir/log.jsonl ]] && grep -q '"kind": "end"' "$dir/log.jsonl"; then
        echo "$name: finished in $dir"
    elif [[ -n $dir && -f $dir/checkpoint.pt ]]; then
        echo "$name: resuming $dir"
        "$CE" train-encoder --resume "$dir" --progress lines
    else
        echo "$name: starting"
        "$CE" train-encoder "${common[@]}" --name "$name" "$@"
    fi
}

declare -A ARGS=([w]="--preset w --w-only --total-steps 60000" [e4e]="--schedule $HERE/e4e.yaml"
                [cycle]="--schedule $HERE/cycle.yaml" [cycle-zg-none]="--schedule $HERE/cycle.yaml --zero-grad none")
for name in "${RUNS[@]}"; do
    [[ -v "ARGS[$name]" ]] || { echo "unknown run '$name' (w, e4e, cycle or cycle-zg-none)" >&2; exit 2; }
done
pids=()
for name in "${RUNS[@]}"; do
    # shellcheck disable=SC2086 # the options are words
    train "$name" ${ARGS[$name]} >>"$OUT/$name.console.txt" 2>&1 &
    pids+=($!)
done
echo "training ${RUNS[*]} in the background: $OUT (consoles: $OUT/NAME.console.txt)"
wait "${pids[@]}"
echo "done: cycle-encoding curves $OUT/*-w $OUT/*-e4e $OUT/*-cycle --patience 4"
