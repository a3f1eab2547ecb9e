#!/usr/bin/env bash
# CIFAR ResNet-20, baseline, Fashion-MNIST; add --device cpu without a GPU (quickstart).
# Usage: NGPU=1 bash scripts/train/fashion_mnist/resnet20_baseline.sh [train.py options ...]
# See scripts/train/launch.sh for the other variables (NNODES, OUT_ROOT, DRY_RUN, ...).
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" configs/fashion_mnist/resnet20.yaml fashion-mnist_resnet20_baseline --model resnet20 --head linear "$@"
