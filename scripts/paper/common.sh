# Sourced by the scripts of scripts/paper/: where checkpoints are, how to run a campaign.
#
# Environment (all optional):
#   CKPT_ROOT   folder holding the training runs of scripts/train/ (default runs): CKPT_ROOT/<run>/checkpoint.pth
#   OUT_ROOT    where campaigns and tables go (default runs/paper)
#   DATA_PATH   dataset root (default: $TGR_DATA_ROOT or ~/.cache/text-guided-resilience/data)
#   NGPU        GPUs per campaign (torchrun ranks, one shard each; default 1)
#   INJECTIONS  faults per layer (default 4096, as in the paper)
#   ENGINE      injection engine (default fast)
#   PYTHON      interpreter (default .venv/bin/python when present, else python3)
#   DRY_RUN=1   print the commands instead of running them
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
CKPT_ROOT="${CKPT_ROOT:-runs}"
OUT_ROOT="${OUT_ROOT:-runs/paper}"
NGPU="${NGPU:-1}"
INJECTIONS="${INJECTIONS:-4096}"
ENGINE="${ENGINE:-fast}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
data_args=()
if [ -n "${DATA_PATH:-}" ]; then data_args=(--data-path "$DATA_PATH"); fi

run() {  # print, then run unless DRY_RUN=1
    printf '+'; printf ' %q' "$@"; printf '\n'
    if [ "${DRY_RUN:-0}" != 1 ]; then "$@"; fi
}

checkpoint() {  # checkpoint RUN_NAME -> path, or a clear error when it is missing
    local path="$CKPT_ROOT/$1/checkpoint.pth"
    if [ "${DRY_RUN:-0}" != 1 ] && [ ! -f "$path" ]; then
        echo "error: checkpoint not found: $path (train it with scripts/train/, or set CKPT_ROOT)" >&2
        exit 2
    fi
    printf '%s' "$path"
}

campaign() {  # campaign CHECKPOINT OUT_DIR [inject.py options...]: one shard per GPU, resumable
    local ckpt="$1" out="$2"
    shift 2
    local launcher=("$PYTHON")
    if [ "$NGPU" -gt 1 ]; then launcher=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NGPU"); fi
    run "${launcher[@]}" inject.py neurons --checkpoint "$ckpt" --injections "$INJECTIONS" --engine "$ENGINE" \
        --seed 0 --out "$out" "${data_args[@]}" "$@"
}

classifier_layer() {  # classifier_layer MODEL -> name of the B->C layer (models.classifier_name)
    case "$1" in
        resnet20|resnet32|resnet44|resnet56) echo linear ;;
        resnet*) echo fc ;;
        vgg*|alexnet) echo 'classifier\.6' ;;
        mobilenet_v2) echo 'classifier\.1' ;;
        maxvit*) echo 'classifier\.5' ;;
        swin*) echo head ;;
        focalnet*) echo 'head\.fc' ;;
        *) echo "error: no classifier layer known for $1" >&2; exit 2 ;;
    esac
}

compare_pair() {  # compare_pair MODEL BASE_RUN TEXT_RUN NAME: baseline, text-guided, fused campaigns + Table 1 row
    local base text out="$OUT_ROOT/$4" layer
    base="$(checkpoint "$2")"
    text="$(checkpoint "$3")"
    layer="$(classifier_layer "$1")"
    campaign "$base" "$out/fi_baseline"
    campaign "$text" "$out/fi_text"
    campaign "$text" "$out/fi_fused" --fuse-text-head --layers "^$layer\$"
    run "$PYTHON" report.py compare "$out/fi_baseline" "$out/fi_text" --fused "$out/fi_fused" --out "$out/table1"
}
