"""The CAM comparison grid: rows = images; columns = image | <model> clean | <model> faulty | ..."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from pytorch_grad_cam.utils.image import show_cam_on_image

from analysis.cam import NO_CLASS
from analysis.cam_compare import STATES, ImageResult, class_name
from resilience.storage import atomic_write

DPI = 100
CELL_PX = 200  # side of one picture
TITLE_PX = 48  # two title lines above each picture


def grid_size_px(rows: int, columns: int) -> tuple[int, int]:
    """(width, height) in pixels of a grid of ``rows`` x ``columns`` panels."""
    return columns * CELL_PX, rows * (CELL_PX + TITLE_PX)


def _prediction(cls: int, confidence: float, class_names: Sequence[str]) -> str:
    name = class_name(cls, class_names)
    return f"{name} {confidence:.1%}" if math.isfinite(confidence) else name


def render_grid(results: Sequence[ImageResult], keys: Sequence[str], labels: Sequence[str],
                class_names: Sequence[str], path: str | Path) -> Path:
    """Draw the grid as a PNG at ``path`` (written atomically); ``labels`` are the models' column names.

    Faulty panels give the CAM cosine in their header and turn red when the top-1 class flipped; a
    non-finite CAM (grad-cam scales an Inf to NaN) is drawn as the greyed image.
    """
    columns = 1 + len(STATES) * len(keys)
    width, height = grid_size_px(len(results), columns)
    # a bare Figure (no pyplot): no GUI backend, no global figure registry to clean up
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    axes = fig.subplots(len(results), columns, squeeze=False)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1 - TITLE_PX / height, wspace=0.02,
                        hspace=TITLE_PX / CELL_PX)
    for row, result in zip(axes, results, strict=True):
        image = result.image
        label = "" if image.label is None else f"label {class_names[image.label]}"
        _draw(row[0], image.picture, f"{Path(image.source).name}\n{label}", "black")
        for k, (key, name) in enumerate(zip(keys, labels, strict=True)):
            for s, state in enumerate(STATES):
                panel = result.panels[key, state]
                header = f"{name} {state}"
                if state == "faulty":
                    header += f" (cos {result.cosine(key):.3f})"
                color = "red" if state == "faulty" and result.flipped(key) else "black"
                title = f"{header}\n{_prediction(panel.cls, panel.confidence, class_names)}"
                if np.isfinite(panel.cam).all():
                    picture = show_cam_on_image(image.picture, panel.cam, use_rgb=True)
                else:
                    picture = 0.25 + 0.5 * image.picture.mean(axis=2)
                    title += "" if panel.cls == NO_CLASS else " (CAM NaN)"
                _draw(row[1 + k * len(STATES) + s], picture, title, color)
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _draw(ax: Axes, picture: np.ndarray, title: str, color: str) -> None:
    ax.imshow(picture, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=8, color=color)
    ax.set_axis_off()
