# Sourced by test.sh and quickstart.sh: create (or reuse) the repository's virtual environment, install
# the pinned requirements when they changed, and get Fashion-MNIST from Debian when we may.
# Leaves VENV_PYTHON pointing at the environment's interpreter.

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "[setup] installing requirements (a few minutes; torch comes from local disk where available)"
    "$VENV/bin/pip" install --disable-pip-version-check -q -r requirements.txt
    echo "$want" > "$stamp"
fi

# Fashion-MNIST: Debian ships it (offline machines); elsewhere the data package downloads it on first use.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian package dataset-fashion-mnist"
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
        || echo "[setup] warning: could not install dataset-fashion-mnist (it will be downloaded instead, or tests skip)"
fi

VENV_PYTHON="$VENV/bin/python"
export PYTHONHASHSEED=0
