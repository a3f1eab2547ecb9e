#!/usr/bin/env bash
# ResNet-50, baseline, CIFAR-100 (paper Table 2).
# Usage: DATA_PATH=/path/to/data NGPU=4 bash scripts/train/cifar100/resnet50_baseline.sh [train.py options ...]
# See scripts/train/launch.sh for the other variables (NNODES, OUT_ROOT, DRY_RUN, ...).
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" configs/cifar100/resnet50.yaml cifar100_resnet50_baseline --model resnet50 --head linear "$@"
