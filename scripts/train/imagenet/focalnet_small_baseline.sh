#!/usr/bin/env bash
# FocalNet-S, baseline, ImageNet-1k (paper Table 1).
# Usage: DATA_PATH=/path/to/data NGPU=4 bash scripts/train/imagenet/focalnet_small_baseline.sh [train.py options ...]
# See scripts/train/launch.sh for the other variables (NNODES, OUT_ROOT, DRY_RUN, ...).
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" configs/imagenet/focalnet.yaml imagenet_focalnet_small_baseline --model focalnet_small --head linear "$@"
