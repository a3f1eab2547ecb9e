#!/usr/bin/env bash
# Paper Table 2: the same comparison on CIFAR-10, CIFAR-100, Food-101 and STL-10 (ResNet-50 and FocalNet-T).
# Needs the checkpoints of scripts/train/<dataset>/*.sh (runs <dataset>_<model>_baseline / _text).
# Usage: [DATASETS="cifar10"] [MODELS="resnet50"] NGPU=4 bash scripts/paper/table2.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DATASETS="${DATASETS:-cifar10 cifar100 food101 stl10}"
MODELS="${MODELS:-resnet50 focalnet_tiny}"
tables=()
for dataset in $DATASETS; do
    for model in $MODELS; do
        compare_pair "$model" "${dataset}_${model}_baseline" "${dataset}_${model}_text" "table2/${dataset}_$model"
        tables+=("$OUT_ROOT/table2/${dataset}_$model/table1/table1.csv")
    done
done
run "$PYTHON" report.py collect "${tables[@]}" --out "$OUT_ROOT/table2"
