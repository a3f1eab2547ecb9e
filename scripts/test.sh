#!/usr/bin/env bash
# Create (or reuse) the repo's virtual environment, install the pinned requirements, prepare the
# offline test data and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec "$VENV_PYTHON" -m pytest "$@"
