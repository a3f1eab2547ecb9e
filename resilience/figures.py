"""Headless matplotlib for the PNG outputs, written atomically like every other output file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resilience.storage import atomic_write


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path, dpi: int = 130) -> Path:
    """Write ``fig`` to ``path`` as PNG via a temporary file, then release the figure."""
    try:
        return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        pyplot().close(fig)
