#!/usr/bin/env bash
# The whole idea on Fashion-MNIST on a laptop CPU: text features, a baseline and a text-guided ResNet-20,
# a fault-injection campaign on each, and the comparison table with its figures. Rerun to resume.
# Options go to scripts/quickstart.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec "$VENV_PYTHON" scripts/quickstart.py "$@"
