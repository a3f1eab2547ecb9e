#!/usr/bin/env bash
# ResNet-50, text-guided head, Food-101 (paper Table 2).
# Usage: DATA_PATH=/path/to/data NGPU=4 bash scripts/train/food101/resnet50_text.sh [train.py options ...]
# TEXT_FEATURES: Food-101 [C, E]; build one with python -m text_features.build --dataset food101
# See scripts/train/launch.sh for the other variables (NNODES, OUT_ROOT, DRY_RUN, ...).
set -euo pipefail
features="${TEXT_FEATURES:?set TEXT_FEATURES to the class text features file (Food-101 [C, E]; build one with python -m text_features.build --dataset food101)}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" configs/food101/resnet50.yaml food101_resnet50_text --model resnet50 --head text --text-features "$features" "$@"
