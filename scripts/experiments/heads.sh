#!/usr/bin/env bash
# Which part of the text head carries the resilience: five heads x training seeds, Ranger-style range
# restriction of the baseline and of the text model, one campaign per model, then the report
# (heads.md, heads.csv, heads_seeds.csv, heads.png). Every step resumes: rerun the same command after an
# interruption. Extra arguments go to `analyze.py heads` (see its --help).
#
# Environment (all optional):
#   OUT         output folder (default runs/heads)
#   SEEDS       training seeds 0 ... SEEDS-1 (default 3)
#   EPOCHS      training epochs per model (default 1)
#   INJECTIONS  faults per layer and model (default 4096)
#   ENGINE      injection engine (default fast)
#   DATA_PATH   dataset root (default: $TGR_DATA_ROOT or ~/.cache/text-guided-resilience/data)
#   PYTHON      interpreter (default .venv/bin/python when present, else python3)
#   DRY_RUN=1   list the steps without running them
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
options=(--out "${OUT:-runs/heads}" --seeds "${SEEDS:-3}" --epochs "${EPOCHS:-1}"
         --inject-args "--injections ${INJECTIONS:-4096} --engine ${ENGINE:-fast} --clamp profile")
if [ -n "${DATA_PATH:-}" ]; then options+=(--data-path "$DATA_PATH"); fi
if [ "${DRY_RUN:-0}" = 1 ]; then options+=(--dry-run); fi
exec "$PYTHON" analyze.py heads "${options[@]}" "$@"
