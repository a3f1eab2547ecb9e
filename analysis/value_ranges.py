"""Per-layer activation magnitudes of a baseline and a text-guided model (the paper's Figure 3).

The text-guided head normalises the feature and scales it by exp(logit_scale), so its layers should
show smaller values than the baseline's last layer: that is the mechanism the paper credits for the
lower ΔLoss. This module tabulates max and mean |activation| of every conv/linear layer, in forward
order, for each model, and draws them side by side.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from resilience.figures import pyplot, save_png
from resilience.layers import LayerInfo
from resilience.profile import ActivationRange
from resilience.storage import write_text

RANGE_COLUMNS = ("model", "order", "layer", "kind", "neurons", "max_abs", "mean_abs")


def range_rows(label: str, layers: Sequence[LayerInfo], ranges: Mapping[str, ActivationRange]) -> list[dict[str, Any]]:
    """One row per layer of one model, in forward order."""
    return [
        {"model": label, "order": layer.order, "layer": layer.name, "kind": layer.kind, "neurons": layer.neurons,
         "max_abs": ranges[layer.name].max_abs, "mean_abs": ranges[layer.name].mean_abs}
        for layer in layers
    ]


def write_range_csv(rows: Iterable[dict[str, Any]], path: Path) -> Path:
    """value_ranges.csv: ``RANGE_COLUMNS``, floats at full precision."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RANGE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return write_text(path, buf.getvalue())


def plot_ranges(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Two panels (max and mean |activation|) against layer position, one line per model, log scale."""
    labels = list(dict.fromkeys(row["model"] for row in rows))
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    for ax, key, name in zip(axes, ("max_abs", "mean_abs"), ("max |activation|", "mean |activation|"), strict=True):
        for label in labels:
            mine = [row for row in rows if row["model"] == label]
            ax.plot(range(1, len(mine) + 1), [max(row[key], 1e-12) for row in mine], marker=".", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("conv/linear layer (forward order)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return save_png(fig, path)
