#!/usr/bin/env bash
# Launch train.py under torchrun with a recipe. The per-model scripts next to this file call it.
#
#   launch.sh CONFIG RUN_NAME [train.py options ...]
#
# Environment:
#   DATA_PATH    dataset root (default: train.py's, i.e. $TGR_DATA_ROOT or ~/.cache/text-guided-resilience/data)
#   NGPU         processes (GPUs) per node, default 4 as in the paper
#   NNODES       nodes, default 1; with more, also NODE_RANK, MASTER_ADDR and MASTER_PORT
#   OUT_ROOT     parent folder of the run folder, default runs
#   PYTHON       interpreter, default .venv/bin/python when present, else python3
#   DRY_RUN=1    print the command instead of running it
# Extra options go to train.py and override the recipe (e.g. --epochs 1 --train-subset 1000).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG RUN_NAME [train.py options ...]" >&2
    exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
config="$1"
name="$2"
shift 2
case "$config" in /*) ;; *) config="$repo/$config" ;; esac

python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
ngpu="${NGPU:-4}"
nnodes="${NNODES:-1}"
out="${OUT_ROOT:-runs}/$name"

cmd=("$python" -m torch.distributed.run --nproc_per_node "$ngpu")
if [ "$nnodes" -gt 1 ]; then
    cmd+=(--nnodes "$nnodes" --node_rank "${NODE_RANK:?set NODE_RANK for multi-node runs}"
          --master_addr "${MASTER_ADDR:?set MASTER_ADDR for multi-node runs}" --master_port "${MASTER_PORT:-29500}")
else
    cmd+=(--standalone --nnodes 1)
fi
cmd+=("$repo/train.py" -c "$config" --output-dir "$out")
if [ -n "${DATA_PATH:-}" ]; then
    cmd+=(--data-path "$DATA_PATH")
fi
cmd+=("$@")

if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
mkdir -p "$out"
"${cmd[@]}" 2>&1 | tee "$out/train-$(date +%Y%m%d_%H%M%S).log"
