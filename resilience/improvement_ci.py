"""Skewness-corrected intervals for the layer and network-level ΔLoss and the improvement ratios of
:mod:`resilience.report`, from the per-fault records of uniform and stratified campaigns (``faults.parquet``).

Per-fault ΔLoss is heavy-tailed (a flip of an exponent bit can add 1e30 to one fault's loss), so a normal
interval ``mean ± z·s/√n`` undercovers. Each layer's mean over its finite faults, post-stratified by
flipped bit, is taken with its variance and third cumulant (:class:`resilience.intervals.Moments`); a
stratified campaign's layer estimate is its combined ratio estimator over the estimation rounds, rebuilt
from the records' ``round``, ``stratum`` and ``weight`` columns exactly as the run computed it
(:func:`resilience.image_pool.stratified_layer`). The network level, the mean over layers, and the text
head's neuron-weighted last layer are weighted sums of layer means that are independent given the image
pool, so their variances and third cumulants add up; with an image pool (``--image-pool``) the layers'
joint between-image variance is added (:class:`resilience.image_pool.LayerSet`). Means get Hall's
skewness-corrected interval; the two improvement ratios the Fieller interval of
:func:`resilience.intervals.ratio_interval`. Their coverage on heavy-tailed populations is measured by
``scripts/bench_coverage.py`` (docs/stratified.md). Deterministic: the same campaigns give the same intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resilience.bitflip import FORMATS, get_format
from resilience.image_pool import ImagePool, LayerSet, stratified_layer_set, uniform_layer_set
from resilience.intervals import Moments, ratio_interval
from resilience.storage import read_json

DEFAULT_CONFIDENCE = 0.99
STRATIFIED_COLUMNS = ("round", "stratum", "weight")  # what a stratified campaign's records add


def layer_set(folder: Path) -> LayerSet:
    """Every layer of a campaign folder (:func:`records_layer_set` of its ``faults.parquet``, with the image
    pool its ``campaign.json`` records)."""
    folder = Path(folder)
    record = folder / "campaign.json"
    pool = ImagePool.from_record(read_json(record)) if record.is_file() else None
    return records_layer_set(pq.read_table(folder / "faults.parquet"), _format_bits(folder), pool)


def records_layer_set(table: pa.Table, bits: int, pool: ImagePool | None = None) -> LayerSet:
    """Per layer (in record order), the mean ΔLoss over finite faults with its moments: the stratified
    estimator when the records carry :data:`STRATIFIED_COLUMNS`, else the uniform mean post-stratified by
    flipped bit (:func:`resilience.intervals.uniform_layer_moments`), or the plain mean when the records do
    not name the bit; with ``pool``, each layer's image effect too."""
    names = set(table.column_names)
    layers = np.asarray(table.column("layer").to_pylist())
    order = list(dict.fromkeys(layers.tolist()))
    if names.issuperset(STRATIFIED_COLUMNS):
        strata = list(dict.fromkeys(table.column("stratum").to_pylist()))
        return stratified_layer_set(pool, {name: table.filter(pa.array(layers == name)) for name in order}, strata)
    if "bit" in names:
        return uniform_layer_set(table, bits, pool)
    values = table.column("delta_loss").to_numpy().astype(np.float64)
    finite = table.column("finite").to_numpy(zero_copy_only=False).astype(bool)
    return LayerSet({name: Moments.of_mean(values[(layers == name) & finite]) for name in order})


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


def has_fault_records(folder: Path) -> bool:
    """Whether a campaign has per-fault records (uniform or stratified: what the intervals need)."""
    return (Path(folder) / "faults.parquet").is_file()


def network_moments(layers: LayerSet) -> Moments:
    """The network-level ΔLoss, the mean over layers of the layer estimates (layers without a finite fault
    left out, as in the point estimate), with its moments: the one place that turns per-layer moments
    into the network level."""
    return layers.mean([name for name, m in layers.within.items() if not math.isnan(m.value)])


def network_interval(layers: LayerSet, confidence: float = DEFAULT_CONFIDENCE) -> dict[str, float]:
    """``{"ci_low", "ci_high"}``: Hall's interval of :func:`network_moments` (NaN when no layer has an estimate)."""
    if all(math.isnan(m.value) for m in layers.within.values()):
        return {"ci_low": math.nan, "ci_high": math.nan}
    low, high = network_moments(layers).interval(confidence)
    return {"ci_low": low, "ci_high": high}


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
    base_network, text_network = network_moments(base), network_moments(text)
    text_last_mean = text.mean([name for name, _ in text_last], [n for _, n in text_last])
    return {
        "last_layer": ratio_interval(base.layer(base_last), text_last_mean, confidence),
        "overall": ratio_interval(base_network, text_network, confidence),
        "baseline_network": base_network.interval(confidence),
        "text_network": text_network.interval(confidence),
    }
