"""Skewness-corrected intervals for the layer and network-level ΔLoss and the improvement ratios of
:mod:`resilience.report`, from the per-fault records of uniform campaigns (``faults.parquet``).

Per-fault ΔLoss is heavy-tailed (a flip of an exponent bit can add 1e30 to one fault's loss), so a normal
interval ``mean ± z·s/√n`` undercovers. Each layer's mean over its finite faults, post-stratified by
flipped bit, is taken with its variance and third cumulant (:class:`resilience.intervals.Moments`); the network level, the mean over
layers, and the text head's neuron-weighted last layer are weighted sums of independent layer means, so
their variances and third cumulants add up. Means get Hall's skewness-corrected interval; the two
improvement ratios get the corrected Fieller interval of :func:`resilience.intervals.ratio_interval`.
Their coverage on heavy-tailed populations is measured by ``scripts/bench_coverage.py``
(docs/stratified.md). Deterministic: the same campaigns give the same intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from resilience.bitflip import FORMATS, get_format
from resilience.image_pool import ImagePool, LayerSet, uniform_layer_set
from resilience.intervals import Moments, ratio_interval
from resilience.storage import read_json

DEFAULT_CONFIDENCE = 0.99


def layer_set(folder: Path) -> LayerSet:
    """Every layer's mean ΔLoss over finite faults with its moments (in the order the records were written),
    post-stratified by flipped bit when the records name the bit (:func:`resilience.intervals.uniform_layer_moments`);
    for a campaign with an image pool, also each layer's image effect (:mod:`resilience.image_pool`)."""
    folder = Path(folder)
    names = pq.read_schema(folder / "faults.parquet").names
    if "bit" not in names:
        table = pq.read_table(folder / "faults.parquet", columns=["layer", "delta_loss", "finite"])
        layers = np.asarray(table.column("layer").to_pylist())
        values = table.column("delta_loss").to_numpy().astype(np.float64)
        finite = table.column("finite").to_numpy()
        return LayerSet({name: Moments.of_mean(values[(layers == name) & finite])
                         for name in dict.fromkeys(layers.tolist())})
    record = folder / "campaign.json"
    pool = ImagePool.from_record(read_json(record)) if record.is_file() else None
    columns = ["layer", "delta_loss", "finite", "bit"] + (["image"] if pool is not None else [])
    return uniform_layer_set(pq.read_table(folder / "faults.parquet", columns=columns), _format_bits(folder), pool)


def layer_moments(folder: Path) -> dict[str, Moments]:
    """Per layer, the mean ΔLoss with its moments (:func:`layer_set`; with an image pool, its between-image
    variance included)."""
    layers = layer_set(folder)
    return {name: layers.layer(name) for name in layers.within}


def _format_bits(folder: Path) -> int:
    """Bits of the number format the campaign ran in (its summary.json; fp32 when there is none)."""
    summary = folder / "summary.json"
    return get_format(read_json(summary).get("format", "fp32")).bits if summary.is_file() else FORMATS["fp32"].bits


def layer_intervals(folder: Path, confidence: float = DEFAULT_CONFIDENCE) -> dict[str, tuple[float, float]]:
    """Hall's interval of every layer's mean ΔLoss."""
    return {name: m.interval(confidence) for name, m in layer_moments(folder).items()}


def has_fault_records(folder: Path, summary: dict) -> bool:
    """Whether a campaign has per-fault records of a uniformly sampled campaign (what the intervals need)."""
    return (Path(folder) / "faults.parquet").is_file() and "stratified" not in summary


def improvement_intervals(
    base_dir: Path, text_dir: Path, base_last: str, text_last: Sequence[tuple[str, int]],
    *, confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, tuple[float, float]]:
    """Intervals of the network-level ΔLoss of both models and of the last-layer and overall improvement.

    ``text_last`` names the text head's layers with their output-neuron counts (their ΔLoss is weighted by
    them, as in the point estimate). Returns ``{"last_layer", "overall", "baseline_network",
    "text_network"}`` → (low, high).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    base, text = layer_set(base_dir), layer_set(text_dir)
    base_network, text_network = base.mean(), text.mean()
    text_last_mean = text.mean([name for name, _ in text_last], [n for _, n in text_last])
    return {
        "last_layer": ratio_interval(base.layer(base_last), text_last_mean, confidence),
        "overall": ratio_interval(base_network, text_network, confidence),
        "baseline_network": base_network.interval(confidence),
        "text_network": text_network.interval(confidence),
    }
