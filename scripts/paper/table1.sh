#!/usr/bin/env bash
# Paper Table 1: ΔLoss improvement of the text-guided head on the ImageNet backbones, last layer and overall.
# Needs the checkpoints of scripts/train/imagenet/*.sh (runs imagenet_<model>_baseline / _text).
# Usage: [MODELS="resnet50 vgg16_bn"] NGPU=4 bash scripts/paper/table1.sh   (variables: scripts/paper/common.sh)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
MODELS="${MODELS:-alexnet vgg16_bn vgg19_bn resnet18 resnet34 resnet50 resnet101 resnet152 mobilenet_v2 swin_v2_t swin_v2_s maxvit_t focalnet_tiny focalnet_small}"
tables=()
for model in $MODELS; do
    compare_pair "$model" "imagenet_${model}_baseline" "imagenet_${model}_text" "table1/$model"
    tables+=("$OUT_ROOT/table1/$model/table1/table1.csv")
done
run "$PYTHON" report.py collect "${tables[@]}" --out "$OUT_ROOT/table1"
