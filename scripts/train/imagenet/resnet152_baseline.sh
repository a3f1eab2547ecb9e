#!/usr/bin/env bash
# ResNet-152, baseline, ImageNet-1k (paper Table 1).
# Usage: DATA_PATH=/path/to/data NGPU=4 bash scripts/train/imagenet/resnet152_baseline.sh [train.py options ...]
# See scripts/train/launch.sh for the other variables (NNODES, OUT_ROOT, DRY_RUN, ...).
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" configs/imagenet/resnet.yaml imagenet_resnet152_baseline --model resnet152 --head linear "$@"
