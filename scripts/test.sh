#!/usr/bin/env bash
# Create (or reuse) the repo's virtual environment, install the pinned requirements,
# prepare the offline test data and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[test.sh] creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "[test.sh] installing requirements (torch comes from local disk where available)"
    "$VENV/bin/pip" install --disable-pip-version-check -q -r requirements.txt
    echo "$want" > "$stamp"
fi

# Fashion-MNIST: Debian ships it; the data package unpacks it on first use.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[test.sh] installing Debian package dataset-fashion-mnist"
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
        || echo "[test.sh] warning: could not install dataset-fashion-mnist; tests that need it will skip"
fi

export PYTHONHASHSEED=0
exec "$VENV/bin/python" -m pytest "$@"
