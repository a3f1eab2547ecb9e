"""Where the real third-party assets of ``../shared/reference`` live (override with TGR_REFERENCE_DIR)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

REFERENCE_DIR = Path(os.environ.get("TGR_REFERENCE_DIR") or Path(__file__).resolve().parents[2] / "shared" / "reference")
DNN_BENCHMARKS = REFERENCE_DIR / "dnn-benchmarks" / "cifar10"
PAPER_FEATURES = REFERENCE_DIR / "textguided"


def load_script(name: str) -> ModuleType:
    """A module of ``scripts/`` (they are run as files, not installed as a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require_fashion_mnist() -> ModuleType:
    """The project's ``data`` module, skipping the test when the offline Fashion-MNIST test set is absent."""
    import pytest

    data = pytest.importorskip("data")
    try:
        data.build_dataset("fashion-mnist", "test", download=False)
    except data.DatasetUnavailable as exc:
        pytest.skip(f"Fashion-MNIST unavailable: {exc}")
    return data
