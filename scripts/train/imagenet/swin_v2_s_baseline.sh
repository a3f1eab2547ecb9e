#!/usr/bin/env bash
# Swin-V2-S, baseline, ImageNet-1k (paper Table 1).
# Usage: DATA_PATH=/path/to/data NGPU=4 bash scripts/train/imagenet/swin_v2_s_baseline.sh [train.py options ...]
# See scripts/train/launch.sh for the other variables (NNODES, OUT_ROOT, DRY_RUN, ...).
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" configs/imagenet/swin_v2.yaml imagenet_swin_v2_s_baseline --model swin_v2_s --head linear "$@"
