"""Where the real third-party assets of ``../shared/reference`` live (override with TGR_REFERENCE_DIR)."""

from __future__ import annotations

import os
from pathlib import Path

REFERENCE_DIR = Path(os.environ.get("TGR_REFERENCE_DIR") or Path(__file__).resolve().parents[2] / "shared" / "reference")
DNN_BENCHMARKS = REFERENCE_DIR / "dnn-benchmarks" / "cifar10"
PAPER_FEATURES = REFERENCE_DIR / "textguided"
