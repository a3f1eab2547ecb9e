"""Skewness-corrected intervals for the layer and network-level ΔLoss and the improvement ratios of
:mod:`resilience.report`, from the per-fault records of uniform and stratified campaigns (``faults.parquet``).

Per-fault ΔLoss is heavy-tailed (a flip of an exponent bit can add 1e30 to one fault's loss), so a normal
interval ``mean ± z·s/√n`` undercovers. Each layer's mean over its finite faults, post-stratified by
flipped bit, is taken with its variance and third cumulant (:class:`resilience.intervals.Moments`); a
stratified campaign's layer estimate is its combined ratio estimator over the estimation rounds, rebuilt
from the records' ``round``, ``stratum`` and ``weight`` columns exactly as the run computed it
(:func:`resilience.intervals.ratio_moments`, each stratum's spread from all its draws). The network level, the mean over
layers, and the text head's neuron-weighted last layer are weighted sums of independent layer means, so
their variances and third cumulants add up. Means get Hall's skewness-corrected interval; the two
improvement ratios get the corrected Fieller interval of :func:`resilience.intervals.ratio_interval`.
Their coverage on heavy-tailed populations is measured by ``scripts/bench_coverage.py``
(docs/stratified.md). Deterministic: the same campaigns give the same intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resilience.bitflip import FORMATS, get_format
from resilience.intervals import Moments, ratio_interval, ratio_moments, uniform_layer_moments
from resilience.storage import read_json

DEFAULT_CONFIDENCE = 0.99
STRATIFIED_COLUMNS = ("round", "stratum", "weight")  # what a stratified campaign's records add


def layer_moments(folder: Path) -> dict[str, Moments]:
    """Per layer (in the order the records were written), the mean ΔLoss over finite faults with its moments:
    :func:`records_moments` of the campaign's ``faults.parquet``."""
    folder = Path(folder)
    names = set(pq.read_schema(folder / "faults.parquet").names)
    wanted = ["layer", "delta_loss", "finite", "bit", *STRATIFIED_COLUMNS]
    table = pq.read_table(folder / "faults.parquet", columns=[c for c in wanted if c in names])
    return records_moments(table, _format_bits(folder))


def records_moments(table: pa.Table, bits: int) -> dict[str, Moments]:
    """Per layer (in record order), the mean ΔLoss over finite faults with its moments: the stratified
    estimator when the records carry :data:`STRATIFIED_COLUMNS`, else the uniform mean post-stratified by
    flipped bit when they name the bit (:func:`resilience.intervals.uniform_layer_moments`) and the plain
    mean when they do not."""
    names = set(table.column_names)
    layers = np.asarray(table.column("layer").to_pylist())
    values = table.column("delta_loss").to_numpy().astype(np.float64)
    finite = table.column("finite").to_numpy(zero_copy_only=False).astype(bool)
    order = dict.fromkeys(layers.tolist())
    if names.issuperset(STRATIFIED_COLUMNS):
        rounds = table.column("round").to_numpy()
        strata = np.asarray(table.column("stratum").to_pylist())
        weight = table.column("weight").to_numpy()
        return {name: _stratified_moments(values[chosen], finite[chosen], rounds[chosen], strata[chosen], weight[chosen])
                for name in order for chosen in [layers == name]}
    if "bit" not in names:
        return {name: Moments.of_mean(values[(layers == name) & finite]) for name in order}
    bit = table.column("bit").to_numpy()
    return {name: uniform_layer_moments(values[chosen], finite[chosen], bit[chosen], bits)
            for name in order for chosen in [layers == name]}


def _stratified_moments(
    values: np.ndarray, finite: np.ndarray, rounds: np.ndarray, strata: np.ndarray, weight: np.ndarray
) -> Moments:
    """One stratified layer: cells (round, stratum) of weight λ_r·W_b = record weight · n_rb / n (the pilot's
    is 0), each stratum's spread from all its draws (what :func:`resilience.stratified.loss_estimate` does)."""
    numerator = np.where(finite, values, 0.0)
    denominator = finite.astype(np.float64)
    names = list(dict.fromkeys(strata.tolist()))
    pooled = [strata == name for name in names]
    cells = [(r, b) for r in dict.fromkeys(rounds.tolist()) for b in range(len(names))]
    members = [(rounds == r) & pooled[b] for r, b in cells]
    cell_weights = np.array([weight[m][0] * m.sum() / len(values) if m.any() else 0.0 for m in members])
    spread = (np.array([b for _, b in cells]), [numerator[m] for m in pooled], [denominator[m] for m in pooled])
    return ratio_moments(cell_weights, [numerator[m] for m in members], [denominator[m] for m in members], spread)[0]


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


def _mean_of(parts: Sequence[Moments], weights: Sequence[float] | None = None) -> Moments:
    w = np.ones(len(parts)) if weights is None else np.asarray(weights, dtype=np.float64)
    return Moments.weighted_sum(w / w.sum(), parts)


def network_moments(layers: Sequence[Moments]) -> Moments:
    """The network-level ΔLoss, the mean over layers of the layer estimates (layers without a finite fault
    left out, as in the point estimate), with its moments: the one place that turns per-layer moments
    into the network level."""
    return _mean_of([m for m in layers if not math.isnan(m.value)])


def network_interval(layers: Sequence[Moments], confidence: float = DEFAULT_CONFIDENCE) -> dict[str, float]:
    """``{"ci_low", "ci_high"}``: Hall's interval of :func:`network_moments` (NaN when no layer has an estimate)."""
    if not any(not math.isnan(m.value) for m in layers):
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
    base, text = layer_moments(base_dir), layer_moments(text_dir)
    base_network, text_network = network_moments(list(base.values())), network_moments(list(text.values()))
    text_last_mean = _mean_of([text[name] for name, _ in text_last], [n for _, n in text_last])
    return {
        "last_layer": ratio_interval(base[base_last], text_last_mean, confidence),
        "overall": ratio_interval(base_network, text_network, confidence),
        "baseline_network": base_network.interval(confidence),
        "text_network": text_network.interval(confidence),
    }
