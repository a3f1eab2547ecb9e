#!/usr/bin/env bash
# CIFAR ResNet-20, text-guided head, Fashion-MNIST; add --device cpu without a GPU (quickstart).
# Usage: NGPU=1 bash scripts/train/fashion_mnist/resnet20_text.sh [train.py options ...]
# TEXT_FEATURES: default: the shipped 384-d MiniLM features
# See scripts/train/launch.sh for the other variables (NNODES, OUT_ROOT, DRY_RUN, ...).
set -euo pipefail
export NGPU="${NGPU:-1}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
features="${TEXT_FEATURES:-$repo/text_features/assets/fashion-mnist_minilm.pth}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" configs/fashion_mnist/resnet20.yaml fashion-mnist_resnet20_text --model resnet20 --head text --text-features "$features" "$@"
