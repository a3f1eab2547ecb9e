#!/usr/bin/env bash
# FocalNet-T, text-guided head, Food-101 (paper Table 2).
# Usage: DATA_PATH=/path/to/data NGPU=4 bash scripts/train/food101/focalnet_tiny_text.sh [train.py options ...]
# TEXT_FEATURES: Food-101 [C, E]; build one with python -m text_features.build --dataset food101
# See scripts/train/launch.sh for the other variables (NNODES, OUT_ROOT, DRY_RUN, ...).
set -euo pipefail
features="${TEXT_FEATURES:?set TEXT_FEATURES to the class text features file (Food-101 [C, E]; build one with python -m text_features.build --dataset food101)}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" configs/food101/focalnet_tiny.yaml food101_focalnet_tiny_text --model focalnet_tiny --head text --text-features "$features" "$@"
