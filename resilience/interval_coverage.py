"""Bias and interval coverage of the campaign estimators on populations whose true mean ΔLoss is known.

A population is one layer's faults split by flipped bit (ΔLoss per fault, NaN where the faulty loss is
not finite). The uniform campaign draws bit and fault uniformly; the stratified one runs
:func:`resilience.stratified.run_adaptive` with the population as its engine. Over many seeds the
simulation reports each estimator's relative bias (with its standard error) and how often its 99%
interval holds the true value, for one layer, for the network level (mean over layers) and for the
improvement ratio of two models. Populations: :func:`synthetic_population` (shaped like real ΔLoss:
tiny mantissa effects, rare huge exponent effects) or :func:`campaign_population` (the faults of a
finished uniform campaign, resampled with replacement and taken as the ground truth).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from cli_shell import UserError
from resilience import stratified as st
from resilience.bitflip import FORMATS
from resilience.engines.base import FaultSites
from resilience.intervals import Moments, ratio_interval, uniform_layer_moments
from resilience.metrics import mean_ci
from resilience.sampling import stable_seed

FP32 = FORMATS["fp32"]


@dataclass(frozen=True, eq=False)  # compared (and hashed) by identity: the simulated campaigns are cached by population
class Population:
    """One layer's fault population by bit: ``per_bit[b]`` holds the ΔLoss of the faults flipping bit b."""

    name: str
    per_bit: tuple[np.ndarray, ...]

    @property
    def truth(self) -> float:
        """The uniform campaign's target: mean ΔLoss over finite faults, bit uniform, fault uniform within."""
        z = np.mean([np.nan_to_num(v, nan=0.0).mean() for v in self.per_bit])
        p = np.mean([np.isfinite(v).mean() for v in self.per_bit])
        return float(z / p)

    def scaled(self, factor: float, name: str) -> Population:
        """The same population with every ΔLoss multiplied by ``factor``."""
        return Population(name, tuple(v * factor for v in self.per_bit))

    @cached_property
    def sizes(self) -> np.ndarray:
        """Number of faults of each bit."""
        return np.array([len(v) for v in self.per_bit])

    @cached_property
    def _flat(self) -> np.ndarray:
        return np.concatenate(self.per_bit).astype(np.float64)

    def values(self, bits: np.ndarray, index: np.ndarray) -> np.ndarray:
        """ΔLoss of the faults (bit, index within the bit's list); NaN where non-finite."""
        return self._flat[np.cumsum(self.sizes)[bits] - self.sizes[bits] + index]

    def outcomes(self, bits: np.ndarray, index: np.ndarray) -> st.Outcomes:
        """Outcomes of the faults (bit, index within the bit's list)."""
        values = self.values(bits, index)
        finite = np.isfinite(values)
        return st.Outcomes(np.where(finite, values, 0.0), finite, np.zeros(len(values), dtype=bool))


def synthetic_population(seed: int = 0, per_bit: int = 20_000, name: str = "synthetic") -> Population:
    """32 bit strata shaped like real ΔLoss: tiny values in mantissa bits 0–22, rare large values (≈ 10) in
    exponent bits 23–29 (probability 0.002 rising to 0.05), bit 30 large (≈ 100) half the time, bit 31
    (sign, ≈ 5) a fifth. Bit 30 carries most of the mean, the rare exponent values a few percent of it.

    Large values are log-normal (σ = 0.5) so that the large ones vary too; the rest are exponential.
    """
    rng = np.random.default_rng(seed)
    chance = dict(zip(range(23, 30), np.geomspace(0.002, 0.05, 7), strict=True)) | {30: 0.5, 31: 0.2}
    scale = {b: 10.0 for b in range(23, 30)} | {30: 100.0, 31: 5.0}
    bits = []
    for b in range(32):
        small = rng.exponential(1e-4 * 2.0 ** (min(b, 23) - 12), per_bit)
        if b in chance:
            large = rng.random(per_bit) < chance[b]
            small[large] = scale[b] * rng.lognormal(0.0, 0.5, int(large.sum()))
        bits.append(small)
    return Population(name, tuple(bits))


def campaign_population(folder: Path, layer: str) -> Population:
    """The faults of ``layer`` in a finished uniform campaign folder, by bit (the ground-truth population)."""
    table = pq.read_table(Path(folder) / "faults.parquet", columns=["layer", "bit", "delta_loss", "finite"])
    mask = np.asarray(table.column("layer").to_pylist()) == layer
    if not mask.any():
        raise UserError(f"{folder}: no faults of layer {layer!r}")
    bits = table.column("bit").to_numpy()[mask]
    values = np.where(table.column("finite").to_numpy()[mask], table.column("delta_loss").to_numpy()[mask], np.nan)
    missing = sorted(set(range(FP32.bits)) - set(bits.tolist()))
    if missing:
        raise UserError(f"{folder}: layer {layer!r} has no faults of bits {missing}; it cannot stand for the population")
    return Population(f"{Path(folder).name}:{layer}", tuple(values[bits == b] for b in range(FP32.bits)))


def campaign_layers(folder: Path) -> list[str]:
    """Layer names of a campaign's fault records, in the order they were written."""
    layers = pq.read_table(Path(folder) / "faults.parquet", columns=["layer"]).column("layer").to_pylist()
    return list(dict.fromkeys(layers))


# ----------------------------------------------------------------------------------------- one run per seed


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(stable_seed(seed, stream))


def uniform_draw(population: Population, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uniform faults as a uniform campaign of ``n`` injections would see them: (bit, ΔLoss; NaN: non-finite)."""
    rng = _rng(seed, f"{population.name}|uniform")
    bits = rng.integers(0, len(population.per_bit), n)
    index = (rng.random(n) * population.sizes[bits]).astype(np.int64)
    return bits, population.values(bits, index)


def uniform_moments(bits: np.ndarray, values: np.ndarray) -> Moments:
    """The uniform campaign's mean over finite faults, post-stratified by bit, with its variance and third
    cumulant (what :func:`resilience.intervals.uniform_layer_interval` reports)."""
    return uniform_layer_moments(values, np.isfinite(values), bits, FP32.bits)


@cache
def post_stratified(population: Population, n: int, seed: int) -> Moments:
    """:func:`uniform_moments` of the uniform campaign (``population``, ``n``, ``seed``); cached, as the layer
    rows and the network rows simulate the same campaigns."""
    return uniform_moments(*uniform_draw(population, n, seed))


def stratified_run(population: Population, seed: int, config: st.AdaptiveConfig) -> st.StratifiedResult:
    """``run_adaptive`` on ``population`` (bit strata), draws seeded by (seed, stratum, round)."""
    strata = st.make_strata(FP32, "bit")

    def draw(stratum: st.Stratum, round_index: int, count: int) -> FaultSites:
        b = stratum.bits[0]
        rng = _rng(seed, f"{population.name}|{stratum.name}|{round_index}")
        index = torch.from_numpy(rng.integers(0, len(population.per_bit[b]), count))
        return FaultSites(population.name, torch.zeros(count, dtype=torch.int64), index, torch.full((count,), b))

    def evaluate(sites: FaultSites) -> st.Outcomes:
        return population.outcomes(sites.bit.numpy(), sites.index.numpy())

    return st.run_adaptive(population.name, strata, st.stratum_weights(strata, FP32), draw, evaluate, config)


# ----------------------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class Coverage:
    """Relative bias and interval coverage of one estimator over many seeds."""

    label: str
    runs: int
    mean_n: float
    bias: float  # mean of (estimate − truth)/truth
    bias_se: float
    coverage: float  # share of runs whose interval holds the truth
    rel_half_width: float  # median half-width / truth

    @property
    def rel_sd(self) -> float:
        """Standard deviation of the relative estimates over the runs (the estimator's own precision)."""
        return self.bias_se * math.sqrt(self.runs)

    def row(self) -> str:
        """A Markdown table row."""
        return (f"| {self.label} | {self.runs} | {self.mean_n:,.0f} | {100 * self.bias:+.2f}% ({100 * self.bias_se:.2f}%) "
                f"| {100 * self.coverage:.1f}% | {100 * self.rel_half_width:.1f}% |")


HEADER = ("| estimate and interval | seeds | mean injections | relative bias (SE) | 99% coverage | median ± |\n"
          "|---|---:|---:|---:|---:|---:|")


def coverage(label: str, truth: float, values: Sequence[float], intervals: Sequence[tuple[float, float]],
             injections: Sequence[float]) -> Coverage:
    """Summarise runs: estimates, their intervals and the injections each spent."""
    rel = (np.asarray(values, dtype=np.float64) - truth) / truth
    low, high = np.asarray(intervals, dtype=np.float64).T
    return Coverage(label, len(rel), float(np.mean(injections)), float(rel.mean()),
                    float(rel.std(ddof=1) / math.sqrt(len(rel))), float(np.mean((low <= truth) & (truth <= high))),
                    float(np.median((high - low) / 2 / truth)))


def simulate_uniform(population: Population, n: int, seeds: Sequence[int], confidence: float = 0.99) -> list[Coverage]:
    """The uniform campaign of ``n`` injections: the plain mean with its normal interval (as in layers.csv) and
    Hall's, and the bit-post-stratified mean with Hall's interval (:func:`uniform_layer_interval`)."""
    draws = [uniform_draw(population, n, seed) for seed in seeds]
    finite = [v[np.isfinite(v)] for _, v in draws]
    plain = [Moments.of_mean(v) for v in finite]
    post = [post_stratified(population, n, seed) for seed in seeds]
    values = [m.value for m in plain]
    label, truth, spent = f"{population.name} uniform n={n}", population.truth, [n] * len(draws)
    return [
        coverage(f"{label}, normal", truth, values, [mean_ci(v, confidence)[2:] for v in finite], spent),
        coverage(f"{label}, Hall", truth, values, [m.interval(confidence) for m in plain], spent),
        coverage(f"{label}, post-stratified Hall", truth, [m.value for m in post],
                 [m.interval(confidence) for m in post], spent),
    ]


def simulate_stratified(population: Population, config: st.AdaptiveConfig, seeds: Sequence[int], label: str) -> Coverage:
    """The stratified estimator (its skewness-corrected interval) under ``config``."""
    runs = [stratified_run(population, seed, config) for seed in seeds]
    return coverage(f"{population.name} stratified {label}", population.truth, [r.loss.value for r in runs],
                    [(r.loss.low, r.loss.high) for r in runs], [r.n for r in runs])


def simulate_network(base: Sequence[Population], text: Sequence[Population], n: int, seeds: Sequence[int],
                     confidence: float = 0.99) -> list[Coverage]:
    """Uniform campaigns of ``n`` injections per layer on two models: the network level (mean over layers)
    of each and the improvement ratio (baseline / text), from the post-stratified layer means with the
    skewness-corrected intervals (as ``report.py compare`` computes them)."""
    truth = {"base": np.mean([p.truth for p in base]), "text": np.mean([p.truth for p in text])}
    nets: dict[str, list[Moments]] = {"base": [], "text": []}
    for seed in seeds:
        for key, layers in (("base", base), ("text", text)):
            parts = [post_stratified(p, n, seed) for p in layers]
            nets[key].append(Moments.weighted_sum(np.full(len(parts), 1 / len(parts)), parts))
    rows = [
        coverage(f"network level ({key}, {len(layers)} layers) uniform n={n}, post-stratified Hall", truth[key],
                 [m.value for m in nets[key]], [m.interval(confidence) for m in nets[key]], [n * len(layers)] * len(seeds))
        for key, layers in (("base", base), ("text", text))
    ]
    pairs = list(zip(nets["base"], nets["text"], strict=True))
    ratios = [a.value / b.value for a, b in pairs]
    rows.append(coverage(f"improvement ratio uniform n={n}, post-stratified Fieller on Hall arms", truth["base"] / truth["text"],
                         ratios, [ratio_interval(a, b, confidence) for a, b in pairs], [n * (len(base) + len(text))] * len(seeds)))
    return rows


def report(populations: Sequence[Population], seeds: Sequence[int], uniform_n: Sequence[int],
           budgets: Sequence[int], target: float, cap: int, pilot: int = 16,
           echo: Callable[[str], None] = print,
           stratify: Callable[[Population], bool] = lambda _: True) -> dict[str, list[Coverage]]:
    """Every single-layer row for every population (uniform at ``uniform_n``; for the populations ``stratify``
    picks, stratified at fixed ``budgets`` and adaptive to ``target``), echoed as they finish; returns them
    by population name."""
    rows = {}
    for population in populations:
        echo(f"# {population.name}: true mean ΔLoss {population.truth:.6g}")
        found = [*(r for n in uniform_n for r in simulate_uniform(population, n, seeds))]
        if stratify(population):
            found += [simulate_stratified(population, st.AdaptiveConfig(target_rel=None, max_injections=b, pilot=pilot),
                                          seeds, f"fixed {b}") for b in budgets]
            found.append(simulate_stratified(population, st.AdaptiveConfig(target_rel=target, max_injections=cap,
                                                                            pilot=pilot), seeds, f"to ±{target:g} (cap {cap})"))
        for row in found:
            echo(row.row())
        rows[population.name] = found
    return rows


ACROSS_HEADER = ("| layers, estimate and interval | layers | seeds | mean injections per layer | 99% coverage: lowest (layer) "
                 "| median | layers < 98% | largest \\|bias\\| / SE | median ± / truth (median over layers) |\n"
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def across_layers(title: str, rows: dict[str, list[Coverage]]) -> list[str]:
    """One Markdown row per estimator over many layers (``rows``: a population's rows by its name): the lowest
    coverage and its layer, the median, how many layers fall below 98%, the largest |bias| in SE."""
    kinds: dict[str, list[tuple[str, Coverage]]] = {}
    for name, found in rows.items():
        for row in found:
            kinds.setdefault(row.label.removeprefix(f"{name} "), []).append((name, row))
    lines = []
    for kind, found in kinds.items():
        cov = np.array([r.coverage for _, r in found])
        worst = found[int(np.argmin(cov))][0].rsplit(":", 1)[-1]
        ratio = max(abs(r.bias) / r.bias_se if r.bias_se > 0 else 0.0 for _, r in found)
        lines.append(f"| {title}: {kind} | {len(found)} | {found[0][1].runs} | {np.mean([r.mean_n for _, r in found]):,.0f} "
                     f"| {100 * cov.min():.1f}% (`{worst}`) | {100 * np.median(cov):.1f}% | {int(np.sum(cov < 0.98))} "
                     f"| {ratio:.1f} | {100 * np.median([r.rel_half_width for _, r in found]):.1f}% |")
    return lines


def equal_precision_injections(uniform: Coverage, n: int, stratified: Coverage) -> float:
    """Injections a uniform campaign needs for the precision of ``stratified``, from the spread of its estimates
    at ``n`` injections (standard errors shrink as 1/√n): n·(sd_U / sd_S)².

    The spreads, not the interval widths: at the injections a uniform campaign would need the interval is
    z standard errors wide, while at ``n`` Student's quantile for its few large values still widens it.
    """
    return n * (uniform.rel_sd / stratified.rel_sd) ** 2
