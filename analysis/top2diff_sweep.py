"""Accuracy against a Top2Diff threshold (the paper's Figure 4).

A correctly classified image whose top-1 and top-2 softmax probabilities are within δ percentage points
is one small perturbation away from a wrong answer. Counting such images as wrong gives a curve
acc(δ) = #{correct and Top2Diff ≥ δ} / N. The text-guided head starts a little lower at δ = 0 when its
accuracy is lower, but its predictions are more confident, so its curve falls more slowly and crosses
the baseline's: the crossing δ is the number the paper quotes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from resilience.figures import pyplot, save_png

DEFAULT_DELTAS = tuple(float(d) for d in range(1, 41))


def accuracy_above(correct: np.ndarray, top2diff: np.ndarray, deltas: Sequence[float]) -> np.ndarray:
    """Fraction of all images that are correct with Top2Diff ≥ δ, for each δ of ``deltas`` (percent)."""
    correct = np.asarray(correct, dtype=bool)
    top2diff = np.asarray(top2diff, dtype=np.float64)
    if correct.shape != top2diff.shape or correct.ndim != 1 or not len(correct):
        raise ValueError("correct and top2diff must be equal-length non-empty 1-D arrays")
    margins = np.sort(top2diff[correct])
    # images with Top2Diff ≥ δ: everything from the first margin not below δ
    kept = len(margins) - np.searchsorted(margins, np.asarray(deltas, dtype=np.float64), side="left")
    return kept / len(correct)


def crossing_point(deltas: Sequence[float], baseline: np.ndarray, text: np.ndarray) -> float:
    """First δ where the text-guided curve reaches the baseline's from below (linear interpolation).

    NaN when it never does in the range; ``deltas[0]`` when it is not below to begin with.
    """
    gap = np.asarray(text, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    if gap[0] >= 0:
        return float(deltas[0])
    for i in range(1, len(gap)):
        if gap[i] >= 0:
            d0, d1 = deltas[i - 1], deltas[i]
            return float(d0 + (d1 - d0) * (-gap[i - 1]) / (gap[i] - gap[i - 1]))
    return math.nan


def plot_sweep(deltas: Sequence[float], curves: Mapping[str, np.ndarray], crossing: float, path: Path,
               title: str) -> Path:
    """Accuracy (%) against δ, one line per model, the crossing marked."""
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2), constrained_layout=True)
    for label, curve in curves.items():
        ax.plot(deltas, 100 * np.asarray(curve), marker=".", label=label)
    if math.isfinite(crossing):
        ax.axvline(crossing, color="0.4", linestyle="--", linewidth=1, label=f"crossing δ = {crossing:.1f}")
    ax.set_xlabel("Top2Diff threshold δ (%)")
    ax.set_ylabel("accuracy counting Top2Diff < δ as wrong (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_png(fig, path)
