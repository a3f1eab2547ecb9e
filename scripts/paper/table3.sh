#!/usr/bin/env bash
# Paper Table 3: random / CLIP class-name / CLIP+LLM description initialisation of ResNet-50 on ImageNet.
# Trains the three text-guided models (4 GPUs each, the ResNet recipe) and compares each with the Table 1
# baseline campaign (run table1.sh with MODELS=resnet50 first). Every step resumes.
# Usage: NGPU=4 DESCRIPTIONS=CuPL_image_prompts.json bash scripts/paper/table3.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
base="$OUT_ROOT/table1/resnet50/fi_baseline"
if [ "${DRY_RUN:-0}" != 1 ] && [ ! -f "$base/summary.json" ]; then
    echo "error: baseline campaign $base not finished: run MODELS=resnet50 bash scripts/paper/table1.sh first" >&2
    exit 2
fi
desc=()
if [ -n "${DESCRIPTIONS:-}" ]; then desc=(--descriptions "$DESCRIPTIONS" ); fi
train_args="--model resnet50 ${data_args[*]}"
if [ "$NGPU" -gt 1 ]; then
    echo "note: analyze.py ablation trains with one process; for $NGPU GPUs run scripts/train/imagenet/resnet50_text.sh" \
         "with TEXT_FEATURES=$OUT_ROOT/table3/features/<variant>.pth and OUT_ROOT=$OUT_ROOT/table3/train first" >&2
fi
run "$PYTHON" analyze.py ablation -c configs/imagenet/resnet.yaml --dataset imagenet --out "$OUT_ROOT/table3" \
    --encoder "${ENCODER:-openclip:ViT-B-32:openai}" "${desc[@]}" --baseline-campaign "$base" \
    --train-args "$train_args" --inject-args "--injections $INJECTIONS --engine $ENGINE ${data_args[*]}"
