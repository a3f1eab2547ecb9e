"""Bootstrap confidence intervals for the improvement ratios of :mod:`resilience.report`.

A ratio of two mean ΔLoss values has no closed-form interval worth trusting: the per-fault ΔLoss is
heavy-tailed (a flip of an exponent bit can add 1e30 to one fault's loss), so the normal approximation
used for a single layer's mean is poor for a ratio of network-level means. The interval here is a
percentile bootstrap, stratified by layer as the campaign was sampled: every resample redraws each
layer's faults with replacement from that layer's per-fault records (``faults.parquet``), recomputes
each model's layer means (finite faults only, as the campaign does) and the two ratios. Seeded, so the
same campaigns give the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.99
_BLOCK_ELEMENTS = 1 << 22


def _layer_samples(folder: Path) -> dict[str, np.ndarray]:
    """Per layer, the faults' ΔLoss with non-finite outcomes as NaN."""
    table = pq.read_table(folder / "faults.parquet", columns=["layer", "delta_loss", "finite"])
    layers = np.asarray(table.column("layer").to_pylist())
    values = table.column("delta_loss").to_numpy().astype(np.float64)
    values[~table.column("finite").to_numpy()] = np.nan
    order = dict.fromkeys(layers.tolist())  # forward order, as the records are written
    return {name: values[layers == name] for name in order}


def _resampled_means(values: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """``resamples`` bootstrap means of ``values`` over their finite entries (NaN where none is finite)."""
    means = np.empty(resamples)
    block = max(1, _BLOCK_ELEMENTS // max(1, len(values)))  # bounds memory for layers with many faults
    for start in range(0, resamples, block):
        draws = values[rng.integers(0, len(values), size=(min(block, resamples - start), len(values)))]
        finite = np.isfinite(draws)
        counts = finite.sum(axis=1)
        sums = np.where(finite, draws, 0.0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            means[start : start + len(draws)] = np.where(counts > 0, sums / counts, np.nan)
    return means


def has_fault_records(folder: Path, summary: dict) -> bool:
    """Whether a campaign can be bootstrapped: per-fault records of a uniformly sampled campaign."""
    return (Path(folder) / "faults.parquet").is_file() and "stratified" not in summary


def improvement_intervals(
    base_dir: Path, text_dir: Path, base_last: str, text_last: Sequence[tuple[str, int]],
    *, confidence: float = DEFAULT_CONFIDENCE, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of the last-layer and overall improvement (baseline / text-guided ΔLoss).

    ``text_last`` names the text head's layers with their output-neuron counts (their ΔLoss is weighted by
    them, as in the point estimate). Returns ``{"last_layer": (low, high), "overall": (low, high)}``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = {}
    for key, folder in (("base", base_dir), ("text", text_dir)):
        samples = _layer_samples(Path(folder))
        means[key] = {name: _resampled_means(v, rng, resamples) for name, v in samples.items()}
    base_network = np.nanmean(np.stack(list(means["base"].values())), axis=0)
    text_network = np.nanmean(np.stack(list(means["text"].values())), axis=0)
    weights = np.array([n for _, n in text_last], dtype=np.float64)
    text_last_means = np.stack([means["text"][name] for name, _ in text_last])
    text_last_mean = (weights[:, None] * text_last_means).sum(axis=0) / weights.sum()
    alpha = (1 - confidence) / 2
    intervals = {}
    for key, ratio in (("last_layer", means["base"][base_last] / text_last_mean),
                       ("overall", base_network / text_network)):
        finite = ratio[np.isfinite(ratio)]
        intervals[key] = (
            (float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))) if len(finite) else (np.nan, np.nan)
        )
    return intervals
