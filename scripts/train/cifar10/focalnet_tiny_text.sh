#!/usr/bin/env bash
# FocalNet-T, text-guided head, CIFAR-10 (paper Table 2).
# Usage: DATA_PATH=/path/to/data NGPU=4 bash scripts/train/cifar10/focalnet_tiny_text.sh [train.py options ...]
# TEXT_FEATURES: CIFAR-10 [C, E]; build one with python -m text_features.build --dataset cifar10
# See scripts/train/launch.sh for the other variables (NNODES, OUT_ROOT, DRY_RUN, ...).
set -euo pipefail
features="${TEXT_FEATURES:?set TEXT_FEATURES to the class text features file (CIFAR-10 [C, E]; build one with python -m text_features.build --dataset cifar10)}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" configs/cifar10/focalnet_tiny.yaml cifar10_focalnet_tiny_text --model focalnet_tiny --head text --text-features "$features" "$@"
