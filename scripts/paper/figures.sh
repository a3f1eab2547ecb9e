#!/usr/bin/env bash
# Paper Figures 3 and 4 for one model: per-layer activation ranges, and accuracy against the Top2Diff threshold.
# Usage: [MODEL=resnet50] [DATASET=imagenet] bash scripts/paper/figures.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
MODEL="${MODEL:-resnet50}"
DATASET="${DATASET:-imagenet}"
base="$(checkpoint "${DATASET}_${MODEL}_baseline")"
text="$(checkpoint "${DATASET}_${MODEL}_text")"
out="$OUT_ROOT/figures/${DATASET}_$MODEL"
run "$PYTHON" analyze.py value-ranges --baseline "$base" --text "$text" --dataset "$DATASET" --max-images "${MAX_IMAGES:-10000}" \
    "${data_args[@]}" --out "$out"
run "$PYTHON" analyze.py top2diff-sweep --baseline "$base" --text "$text" --dataset "$DATASET" "${data_args[@]}" --out "$out"
