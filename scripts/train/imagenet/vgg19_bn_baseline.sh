#!/usr/bin/env bash
# VGG-19-BN, baseline, ImageNet-1k (paper Table 1).
# Usage: DATA_PATH=/path/to/data NGPU=4 bash scripts/train/imagenet/vgg19_bn_baseline.sh [train.py options ...]
# See scripts/train/launch.sh for the other variables (NNODES, OUT_ROOT, DRY_RUN, ...).
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" configs/imagenet/vgg.yaml imagenet_vgg19_bn_baseline --model vgg19_bn --head linear "$@"
