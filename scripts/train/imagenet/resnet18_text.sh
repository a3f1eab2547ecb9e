#!/usr/bin/env bash
# ResNet-18, text-guided head, ImageNet-1k (paper Table 1).
# Usage: DATA_PATH=/path/to/data NGPU=4 bash scripts/train/imagenet/resnet18_text.sh [train.py options ...]
# TEXT_FEATURES: ImageNet [1000, E], e.g. the CLIP+GPT-3 gpt3.pth of the paper, or build one with python -m text_features.build --dataset imagenet
# See scripts/train/launch.sh for the other variables (NNODES, OUT_ROOT, DRY_RUN, ...).
set -euo pipefail
features="${TEXT_FEATURES:?set TEXT_FEATURES to the class text features file (ImageNet [1000, E], e.g. the CLIP+GPT-3 gpt3.pth of the paper, or build one with python -m text_features.build --dataset imagenet)}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" configs/imagenet/resnet.yaml imagenet_resnet18_text --model resnet18 --head text --text-features "$features" "$@"
