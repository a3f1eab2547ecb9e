#!/usr/bin/env bash
# MobileNet-V2, baseline, ImageNet-1k (paper Table 1).
# Usage: DATA_PATH=/path/to/data NGPU=4 bash scripts/train/imagenet/mobilenet_v2_baseline.sh [train.py options ...]
# See scripts/train/launch.sh for the other variables (NNODES, OUT_ROOT, DRY_RUN, ...).
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" configs/imagenet/mobilenet_v2.yaml imagenet_mobilenet_v2_baseline --model mobilenet_v2 --head linear "$@"
