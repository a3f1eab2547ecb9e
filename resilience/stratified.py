"""Stratified-by-bit adaptive sampling of neuron faults (see docs/stratified.md for the formulas).

A uniform campaign draws the flipped bit uniformly, although nearly all of the ΔLoss variance sits in
the sign and high exponent bits. Here each bit position (or a group of bits) is a stratum; a planning
pilot per stratum is followed by estimation rounds allocated in proportion to W_b·S_b (Neyman) until
the 99% confidence interval of the layer's mean ΔLoss is as narrow as asked. The estimate targets what
the uniform campaign estimates, the mean ΔLoss over finite outcomes, μ = E[ΔL·1{finite}] / P(finite),
and stays unbiased under the adaptive allocation and stopping: every round's allocation and weight
are fixed from earlier rounds only, and the weights sum to 1 whenever the run stops.

This module knows nothing about models or engines: it draws :class:`FaultSites` through a
``SiteDrawer`` and scores them through an ``Evaluator`` (per-fault ΔLoss, finite flag, mismatch flag).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from resilience.bitflip import NumberFormat
from resilience.engines.base import FaultSites
from resilience.intervals import Spread, ratio_moments
from resilience.metrics import LayerStats, summarize
from resilience.sampling import sample_sites, z_value

GROUPINGS = ("bit", "field")


@dataclass(frozen=True)
class Stratum:
    """A set of bit positions sampled together; sites inside are uniform over image × element × bit."""

    name: str
    bits: tuple[int, ...]


def format_fields(fmt: NumberFormat) -> tuple[int, int]:
    """(exponent bits, mantissa bits) of ``fmt``; the sign is the remaining top bit."""
    mantissa = round(-math.log2(torch.finfo(fmt.dtype).eps))
    return fmt.bits - 1 - mantissa, mantissa


def make_strata(fmt: NumberFormat, grouping: str = "bit") -> list[Stratum]:
    """Strata for ``fmt``: one per bit ("bit") or sign / exponent / high / low mantissa ("field")."""
    if grouping == "bit":
        return [Stratum(f"bit{b}", (b,)) for b in range(fmt.bits)]
    if grouping == "field":
        exponent, mantissa = format_fields(fmt)
        low = mantissa // 2
        return [
            Stratum("sign", (fmt.bits - 1,)),
            Stratum("exponent", tuple(range(mantissa, mantissa + exponent))),
            Stratum("mantissa_high", tuple(range(low, mantissa))),
            Stratum("mantissa_low", tuple(range(low))),
        ]
    raise ValueError(f"unknown stratum grouping {grouping!r}; choose one of {', '.join(GROUPINGS)}")


def stratum_weights(strata: Sequence[Stratum], fmt: NumberFormat) -> np.ndarray:
    """W_b = share of the format's bits in stratum b (a uniform bit draw lands there with this chance)."""
    covered = sorted(b for s in strata for b in s.bits)
    if covered != list(range(fmt.bits)):
        raise ValueError(f"strata must cover every bit of {fmt.name} exactly once")
    return np.array([len(s.bits) / fmt.bits for s in strata], dtype=np.float64)


@dataclass(frozen=True)
class Outcomes:
    """What the evaluator measured per fault, in fault order."""

    delta_loss: np.ndarray  # float64; its value is ignored where ``finite`` is False
    finite: np.ndarray  # bool: the faulty loss is finite
    mismatch: np.ndarray  # bool: faulty top-1 differs from golden top-1

    def __post_init__(self) -> None:
        if not len(self.delta_loss) == len(self.finite) == len(self.mismatch):
            raise ValueError("outcome arrays must have equal length")

    def __len__(self) -> int:
        return len(self.delta_loss)

    def take(self, index: np.ndarray) -> Outcomes:
        """The outcomes selected by a boolean mask or index array."""
        return Outcomes(self.delta_loss[index], self.finite[index], self.mismatch[index])

    @staticmethod
    def concat(parts: Sequence[Outcomes]) -> Outcomes:
        """Outcomes of ``parts`` one after the other."""
        return Outcomes(
            np.concatenate([p.delta_loss for p in parts]).astype(np.float64),
            np.concatenate([p.finite for p in parts]).astype(bool),
            np.concatenate([p.mismatch for p in parts]).astype(bool),
        )


Evaluator = Callable[[FaultSites], Outcomes]
SiteDrawer = Callable[[Stratum, int, int], FaultSites]  # (stratum, round, count) -> sites


def stratum_stream(layer: str, stratum: Stratum, round_index: int) -> str:
    """Name of the random stream of one (layer, stratum, round), independent of every other draw."""
    return f"{layer}|stratified|{stratum.name}|{round_index}"


def stratum_drawer(seed: int, layer: str, images: torch.Tensor, neurons: int) -> SiteDrawer:
    """Draws sites of one stratum: image uniform over ``images``, element over ``neurons``, bit in stratum.

    The uniform campaign's sampler is reused with a stream per (layer, stratum, round) in place of the
    layer name, so its seeding (sha256 of seed and stream) and its image/element draws apply unchanged.
    """

    def draw(stratum: Stratum, round_index: int, count: int) -> FaultSites:
        stream = stratum_stream(layer, stratum, round_index)
        sites = sample_sites(seed, stream, neurons, images, count, len(stratum.bits))
        bits = torch.tensor(stratum.bits, dtype=torch.int64)[sites.bit]
        return FaultSites(layer, sites.image, sites.index, bits)

    return draw


# ----------------------------------------------------------------------------------------- estimators


@dataclass(frozen=True)
class Estimate:
    """A point estimate, the variance of its estimator and its confidence interval (possibly asymmetric)."""

    value: float
    variance: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        """Half the interval's width (what the stopping targets compare)."""
        return (self.high - self.low) / 2

    def covers(self, truth: float) -> bool:
        """Whether the interval contains ``truth``."""
        return self.low <= truth <= self.high


def stratified_ratio(
    weights: np.ndarray,
    numerators: Sequence[np.ndarray],
    denominators: Sequence[np.ndarray],
    confidence: float = 0.99,
    spread: Spread | None = None,
) -> tuple[Estimate, np.ndarray]:
    """Combined ratio estimator R = Σ W_c ȳ_c / Σ W_c x̄_c over independently sampled cells c.

    A cell is a stratum, or a stratum within one round (``spread``: see
    :func:`resilience.intervals.ratio_moments`). Returns the estimate with its delta-method variance and
    Hall's skewness-corrected interval, and the standard deviations S of the linearised variable, which
    is what Neyman allocation needs.
    """
    moments, sds = ratio_moments(weights, numerators, denominators, spread)
    low, high = moments.interval(confidence)
    return Estimate(moments.value, moments.variance, low, high), sds


def loss_estimate(
    weights: np.ndarray, per_stratum: Sequence[Outcomes], confidence: float = 0.99, pooled: Sequence[Outcomes] | None = None
) -> tuple[Estimate, np.ndarray]:
    """Mean ΔLoss over finite outcomes (ratio of Σ W_b mean(ΔL·finite) to Σ W_b mean(finite)).

    ``pooled`` (every draw of each stratum) supplies the cells' spread when ``per_stratum`` lists the
    cells of several rounds, stratum after stratum in each round (see :func:`stratified_ratio`).
    """
    return stratified_ratio(weights, *_loss_variables(per_stratum), confidence, _spread(per_stratum, pooled, _loss_variables))


def mismatch_estimate(
    weights: np.ndarray, per_stratum: Sequence[Outcomes], confidence: float = 0.99, pooled: Sequence[Outcomes] | None = None
) -> Estimate:
    """Stratified proportion of faults whose top-1 differs from the golden one (over all injections)."""
    return stratified_ratio(weights, *_mismatch_variables(per_stratum), confidence,
                            _spread(per_stratum, pooled, _mismatch_variables))[0]


def _loss_variables(outcomes: Sequence[Outcomes]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return [np.where(o.finite, o.delta_loss, 0.0) for o in outcomes], [o.finite.astype(np.float64) for o in outcomes]


def _mismatch_variables(outcomes: Sequence[Outcomes]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return [o.mismatch.astype(np.float64) for o in outcomes], [np.ones(len(o)) for o in outcomes]


def _spread(
    cells: Sequence[Outcomes],
    pooled: Sequence[Outcomes] | None,
    variables: Callable[[Sequence[Outcomes]], tuple[list[np.ndarray], list[np.ndarray]]],
) -> Spread | None:
    if pooled is None:
        return None
    if len(cells) % len(pooled):
        raise ValueError("cells must list every stratum in every round")
    return (np.tile(np.arange(len(pooled)), len(cells) // len(pooled)), *variables(pooled))


def finite_fraction(weights: np.ndarray, per_stratum: Sequence[Outcomes]) -> float:
    """Estimated share of faults whose loss stays finite, Σ W_b p̂_b."""
    return float(weights @ np.array([o.finite.mean() if len(o) else math.nan for o in per_stratum]))


def uniform_equivalent(weights: np.ndarray, per_stratum: Sequence[Outcomes], variance: float) -> float:
    """Injections a uniform campaign would need for an estimator of the same ``variance``.

    Under uniform sampling the linearised variable d = (ΔL·f − μ f) / P has variance
    Σ W_b (S_b² + d̄_b²) (within plus between strata), so n = S_U² / V.
    """
    estimate, sds = loss_estimate(weights, per_stratum)
    if not variance > 0 or math.isnan(estimate.value):
        return math.nan
    total_den = finite_fraction(weights, per_stratum)
    means = np.array(
        [np.mean((np.where(o.finite, o.delta_loss, 0.0) - estimate.value * o.finite) / total_den) for o in per_stratum]
    )
    return float(weights @ (sds**2 + means**2)) / variance


# ----------------------------------------------------------------------------------------- allocation

PLAN_MARGIN = 4.0  # intermediate rounds are weighted as if the plan were this many times longer
MIN_PER_ROUND = 2  # draws of every stratum in every estimation round: each round estimates its own variance


def allocation_shares(weights: np.ndarray, sds: np.ndarray, defensive: float) -> np.ndarray:
    """Target share of injections per stratum: (1 − α)·Neyman + α·proportional.

    The proportional part (α = ``defensive``) keeps sampling strata whose earlier draws looked constant,
    so a rare large ΔLoss there is still found, at a variance cost of at most 1/(1 − α) over pure Neyman.
    """
    if np.isinf(sds).any():
        raise ValueError("every stratum needs at least two draws before Neyman allocation")
    neyman = weights * sds
    if neyman.sum() > 0:
        return (1 - defensive) * neyman / neyman.sum() + defensive * weights
    return weights.copy()


UNSEEN_TAIL = 3.0  # "rule of three": no hit in n draws bounds a rate at about 3/n (95%)


def unseen_tail_bound(pooled: Sequence[Outcomes], mean: float, finite: float) -> np.ndarray:
    """An upper bound on each stratum's S_b that allows for a rare large value its draws have not shown yet.

    Adjacent bits act alike (a flip of exponent bit b scales a value by 2^(2^(b−23))), so a stratum
    whose neighbours show large residuals may hold them too, at a rate its n draws bound by 3/n. With
    M_b = the geometric mean of the two neighbours' largest |d| (small unless both are large),
    S_b ≤ M_b·√(3/n). Allocating with this bound keeps drawing such a stratum until its tail is seen or
    ruled out; it changes only where draws go, never the estimate's unbiasedness. The first and last
    strata have one neighbour and get none.
    """
    peaks = np.array([np.max(np.abs(np.where(o.finite, o.delta_loss, 0.0) - mean * o.finite)) / finite
                      if len(o) else 0.0 for o in pooled])
    neighbours = np.sqrt(np.concatenate([[0.0], peaks[:-1]]) * np.concatenate([peaks[1:], [0.0]]))
    counts = np.array([max(len(o), 1) for o in pooled], dtype=np.float64)
    return neighbours * np.sqrt(UNSEEN_TAIL / counts)


def largest_remainder(real: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to ``total`` closest to ``real`` (which sums to ``total``); ties go to the lower index."""
    base = np.floor(real).astype(np.int64)
    rest = total - int(base.sum())
    if rest > 0:
        order = np.argsort(-(real - base), kind="stable")
        base[order[:rest]] += 1
    return base


def round_counts(shares: np.ndarray, total: int) -> np.ndarray:
    """Draws per stratum in a round of ``total``: ``MIN_PER_ROUND`` each, the rest in proportion to ``shares``."""
    rest = total - MIN_PER_ROUND * len(shares)
    if rest < 0:
        raise ValueError(f"a round of {total} draws cannot give {MIN_PER_ROUND} to each of {len(shares)} strata")
    return MIN_PER_ROUND + largest_remainder(shares * rest, rest)


# ----------------------------------------------------------------------------------------- adaptive loop


@dataclass(frozen=True)
class AdaptiveConfig:
    """Stopping targets and allocation knobs of one adaptive layer run.

    The run plans its last round to meet any given target: ``target_rel`` (half-width of the CI of the
    mean ΔLoss relative to the mean) or ``target_abs`` (absolute half-width); it stops at
    ``max_injections`` at the latest. Without a target that can be met it spends the whole budget.
    """

    target_rel: float | None = 0.1
    target_abs: float | None = None
    max_injections: int = 4096
    pilot: int = 16  # draws per stratum in round 0, which plans the first estimation round only
    defensive: float = 0.1
    confidence: float = 0.99
    min_round: int = 64
    min_increase: float = 0.1  # a round adds at least this share of the injections spent so far ...
    growth: float = 2.0  # ... and at most multiplies them by this (unless it is the last round)

    def __post_init__(self) -> None:
        if self.max_injections < 1:
            raise ValueError("max_injections must be at least 1")
        if self.pilot < 2:
            raise ValueError("pilot must be at least 2 draws per stratum (variance needs two)")
        if not 0 <= self.defensive < 1:
            raise ValueError("defensive share must lie in [0, 1)")
        if self.min_round < 1 or not 0 <= self.min_increase < self.growth - 1:
            raise ValueError("need min_round >= 1 and 0 <= min_increase < growth - 1")
        for name in ("target_rel", "target_abs"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive")

    def check_budget(self, strata: int) -> None:
        """Raise ValueError when ``max_injections`` cannot hold the pilot and one estimation round."""
        if (self.pilot + MIN_PER_ROUND) * strata > self.max_injections:
            raise ValueError(
                f"max_injections {self.max_injections} is below the pilot ({self.pilot} x {strata} strata) "
                f"plus one estimation round ({MIN_PER_ROUND} x {strata})"
            )

    def target_met(self, estimate: Estimate) -> bool:
        """Whether ``estimate``'s half-width satisfies any of the targets."""
        if math.isnan(estimate.half_width):
            return False
        if self.target_abs is not None and estimate.half_width <= self.target_abs:
            return True
        return self.target_rel is not None and estimate.half_width <= self.target_rel * abs(estimate.value)

    def target_half_width(self, estimate: Estimate) -> float:
        """The widest half-width that would meet a target at the current estimate (0 when none)."""
        widths = [0.0]
        if self.target_abs is not None:
            widths.append(self.target_abs)
        if self.target_rel is not None and not math.isnan(estimate.value):
            widths.append(self.target_rel * abs(estimate.value))
        return max(widths)


@dataclass(frozen=True)
class RoundRecord:
    """One round's faults: the stratum index of each fault, the sites and their outcomes."""

    index: int
    stratum: np.ndarray  # int64 index into the strata list, per fault
    sites: FaultSites
    outcomes: Outcomes


class RoundStore(Protocol):
    """Persists finished rounds so that an interrupted run resumes with the same faults and outcomes."""

    def load(self, round_index: int) -> RoundRecord | None:
        """The stored round, or None when it has not finished."""
        ...

    def save(self, record: RoundRecord) -> None:
        """Store a finished round atomically."""
        ...


@dataclass(frozen=True)
class StratumSummary:
    """Per-stratum figures of a finished run (over all its draws, pilot included)."""

    name: str
    weight: float
    n: int
    non_finite: int
    mean_delta_loss: float  # over finite outcomes (NaN when none)
    sd: float  # S_b of the linearised variable (drives the allocation)
    mismatch_rate: float


@dataclass
class StratifiedResult:
    """Outcome of an adaptive stratified run of one layer."""

    layer: str
    loss: Estimate
    mismatch: Estimate
    finite_fraction: float
    n: int
    non_finite: int
    mismatches: int  # observed count (the rate is the stratified estimate in ``mismatch``)
    rounds: int
    stop_reason: str  # "target" (the last round was planned to meet it) or "max_injections"
    uniform_equivalent_n: float  # uniform injections for the same variance
    strata: list[StratumSummary]
    round_weights: list[float]  # λ_r of each round in the estimate (0 for the pilot); they sum to 1
    seconds: float

    @property
    def saving_factor(self) -> float:
        """Uniform injections needed for the achieved precision per stratified injection spent."""
        return self.uniform_equivalent_n / self.n if self.n else math.nan


def _round_sites(
    strata: Sequence[Stratum], counts: np.ndarray, round_index: int, draw: SiteDrawer, layer: str
) -> tuple[np.ndarray, FaultSites]:
    parts = [draw(s, round_index, int(c)) for s, c in zip(strata, counts, strict=True) if c > 0]
    labels = np.repeat(np.arange(len(strata)), counts)
    sites = FaultSites(
        layer,
        torch.cat([p.image for p in parts]),
        torch.cat([p.index for p in parts]),
        torch.cat([p.bit for p in parts]),
    )
    return labels, sites


def same_sites(a: FaultSites, b: FaultSites) -> bool:
    """Whether two site lists hold the same faults in the same order."""
    return all(torch.equal(x, y) for x, y in ((a.image, b.image), (a.index, b.index), (a.bit, b.bit)))


@dataclass(frozen=True)
class _Plan:
    """The next round, fixed before any of its draws: sizes per stratum, weight λ, and whether it is the last."""

    counts: np.ndarray
    weight: float
    last: bool
    stop_reason: str


def _cells(weights: np.ndarray, rounds: Sequence[tuple[float, list[Outcomes]]]) -> tuple[np.ndarray, list[Outcomes]]:
    """(λ_r·W_b, outcomes) of every (estimation round, stratum) cell, flattened."""
    cell_weights = np.concatenate([lam * weights for lam, _ in rounds]) if rounds else np.zeros(0)
    return cell_weights, [o for _, per_stratum in rounds for o in per_stratum]


def _plan_round(
    weights: np.ndarray,
    pooled: Sequence[Outcomes],
    rounds: Sequence[tuple[float, list[Outcomes]]],
    spent: int,
    config: AdaptiveConfig,
) -> _Plan:
    """The next estimation round from the draws so far (all of them: planning may use anything before).

    With the rounds' weights λ_j fixed, the estimate's variance is Σ λ_j² V_j, where a round with counts
    n_b has V = Σ_b W_b² S̃_b² / n_b (S̃_b: S_b raised by :func:`unseen_tail_bound`). The remaining mass
    m = 1 − Σ λ_j then needs the smallest round with m² V ≤ h²/z² − Σ λ_j² V_j for the target half-width
    h (all of the budget without a target). One round takes it if the growth bounds allow, and then gets
    λ = m; otherwise the round takes its share of the plan, λ = m·n_r/(4n).
    """
    planning, sds = loss_estimate(weights, pooled, config.confidence)
    if not math.isnan(planning.value):
        sds = np.maximum(sds, unseen_tail_bound(pooled, planning.value, finite_fraction(weights, pooled)))
    shares = weights if math.isnan(planning.value) else allocation_shares(weights, sds, config.defensive)
    mass = 1.0 - sum(lam for lam, _ in rounds)
    accumulated = 0.0
    if rounds:
        partial, _ = loss_estimate(*_cells(weights, rounds), pooled=pooled)
        accumulated = partial.variance * (1.0 - mass) ** 2  # the partial ratio divides by the mass used
    h = config.target_half_width(planning)
    allowed = (h / z_value(config.confidence)) ** 2 - accumulated
    remaining = config.max_injections - spent
    floor = min(max(config.min_round, math.ceil(config.min_increase * spent), MIN_PER_ROUND * len(weights)), remaining)
    cap = max(floor, int(spent * (config.growth - 1)))
    # When the weighted earlier rounds alone exceed the target variance, no round can meet it: spend the budget.
    need = _draws_needed(weights * sds * mass, shares, allowed, remaining) if h > 0 and allowed > 0 else math.inf
    planned = min(need, remaining)
    if planned <= cap or remaining - cap < floor:  # one round finishes the plan (or leaves too little for another)
        size = min(max(math.ceil(planned), floor), remaining)
        return _Plan(round_counts(shares, size), mass, True, "target" if need <= remaining else "max_injections")
    # An intermediate round is weighted as if the plan were PLAN_MARGIN times larger, so that a plan that
    # turns out too optimistic leaves enough weight for the rounds that follow.
    return _Plan(round_counts(shares, cap), mass * cap / min(PLAN_MARGIN * planned, remaining), False, "")


def _draws_needed(spread: np.ndarray, shares: np.ndarray, allowed: float, remaining: int) -> float:
    """Smallest round size whose variance Σ_b spread_b² / n_b at the round's actual counts n_b is at most
    ``allowed`` (inf when even ``remaining`` draws are not enough).

    The counts include the per-stratum minimum, so a small round is spread more evenly than ``shares``
    and has a larger variance than Σ spread²/π / n; sizing it from the shares alone would plan too few.
    """
    minimum = MIN_PER_ROUND * len(shares)
    if remaining < minimum:
        return math.inf

    def fits(size: int) -> bool:
        return float(np.sum(spread**2 / round_counts(shares, size))) <= allowed

    with np.errstate(divide="ignore", invalid="ignore"):
        ideal = float(np.sum(np.where(shares > 0, spread**2 / shares, 0.0))) / allowed
    low = max(minimum, min(math.ceil(ideal), remaining))
    if fits(low):
        return float(low)
    if not fits(remaining):
        return math.inf
    while remaining - low > 1:  # bisection: ``low`` does not fit, ``remaining`` does
        mid = (low + remaining) // 2
        low, remaining = (low, mid) if fits(mid) else (mid, remaining)
    return float(remaining)


def run_adaptive(
    layer: str,
    strata: Sequence[Stratum],
    weights: np.ndarray,
    draw: SiteDrawer,
    evaluate: Evaluator,
    config: AdaptiveConfig,
    store: RoundStore | None = None,
    on_round: Callable[[int, int, Estimate], None] | None = None,
) -> StratifiedResult:
    """Pilot, then estimation rounds until the planned last one; resumes from ``store`` when given.

    Round 0 (``pilot`` draws per stratum) only plans. Every later round r is allocated (Neyman with a
    defensive share) and given its weight λ_r from earlier rounds only; its own stratified estimate is then
    unbiased, and the estimate Σ λ_r Ẑ_r / Σ λ_r P̂_r combines rounds whose weights sum to 1 whatever the
    stopping point (see docs/stratified.md). Every draw depends only on (stratum, round), so a rerun (or a
    resume from stored rounds) repeats the same faults and stops at the same point.
    ``on_round(round, injections, estimate)`` is called after each round.
    """
    start = time.perf_counter()
    config.check_budget(len(strata))
    plan = _Plan(np.full(len(strata), config.pilot, dtype=np.int64), 0.0, False, "")
    pooled: list[list[Outcomes]] = [[] for _ in strata]  # every draw, for planning
    rounds: list[tuple[float, list[Outcomes]]] = []  # estimation rounds: (λ_r, outcomes per stratum)
    round_weights: list[float] = []
    round_index, spent = 0, 0
    while True:
        labels, sites = _round_sites(strata, plan.counts, round_index, draw, layer)
        record = store.load(round_index) if store is not None else None
        if record is not None and not (same_sites(record.sites, sites) and np.array_equal(record.stratum, labels)):
            raise ValueError(f"stored round {round_index} of {layer} does not match the arguments of this run")
        if record is None:
            record = RoundRecord(round_index, labels, sites, evaluate(sites))
            if store is not None:
                store.save(record)
        per_stratum = [record.outcomes.take(labels == b) for b in range(len(strata))]
        for b, outcomes in enumerate(per_stratum):
            pooled[b].append(outcomes)
        if round_index > 0:
            rounds.append((plan.weight, per_stratum))
        round_weights.append(plan.weight)
        spent += len(labels)
        if on_round is not None:
            all_draws = [Outcomes.concat(p) for p in pooled]
            shown = loss_estimate(*_cells(weights, rounds), config.confidence, all_draws)[0] if rounds else loss_estimate(
                weights, all_draws, config.confidence)[0]
            on_round(round_index, spent, shown)
        if plan.last:
            break
        plan = _plan_round(weights, [Outcomes.concat(p) for p in pooled], rounds, spent, config)
        round_index += 1

    all_draws = [Outcomes.concat(p) for p in pooled]
    cell_weights, cells = _cells(weights, rounds)
    estimate = loss_estimate(cell_weights, cells, config.confidence, all_draws)[0]
    sds = loss_estimate(weights, all_draws, config.confidence)[1]
    return StratifiedResult(
        layer=layer,
        loss=estimate,
        mismatch=mismatch_estimate(cell_weights, cells, config.confidence, all_draws),
        finite_fraction=finite_fraction(cell_weights, cells),
        n=spent,
        non_finite=int(sum((~o.finite).sum() for o in all_draws)),
        mismatches=int(sum(o.mismatch.sum() for o in all_draws)),
        rounds=round_index + 1,
        stop_reason=plan.stop_reason,
        uniform_equivalent_n=uniform_equivalent(weights, all_draws, estimate.variance),
        strata=[
            StratumSummary(
                s.name,
                float(w),
                len(o),
                int((~o.finite).sum()),
                float(o.delta_loss[o.finite].mean()) if o.finite.any() else math.nan,
                float(sd),
                float(o.mismatch.mean()),
            )
            for s, w, o, sd in zip(strata, weights, all_draws, sds, strict=True)
        ],
        round_weights=round_weights,
        seconds=time.perf_counter() - start,
    )


# ----------------------------------------------------------------------------------------- uniform reference


@dataclass(frozen=True)
class UniformStop:
    """Where a uniform campaign checking its CI every ``step`` faults would have stopped."""

    n: int  # faults run: the stopping point, or all of them when the target was not reached
    stats: LayerStats  # the uniform campaign's figures over those faults
    reached: bool
    needed_n: float  # n when reached, else extrapolated from the observed variance

    @property
    def half_width(self) -> float:
        return (self.stats.ci_high - self.stats.ci_low) / 2


def uniform_to_target(outcomes: Outcomes, target_rel: float, step: int, confidence: float = 0.99) -> UniformStop:
    """Stop a uniform campaign's fault list (in list order) at the first multiple of ``step`` where the CI
    half-width of its mean ΔLoss is at most ``target_rel`` x the mean.

    A uniform list's first k faults are the list of k faults (``resilience.sampling``), so this is what a
    uniform campaign run to the target (or to ``len(outcomes)``, the cap) would report. When the target
    is not reached, the injections it would need are extrapolated as (z·s/h)² finite draws, i.e.
    (z·s/h)² · n/finite injections.
    """
    if step < 1 or len(outcomes) == 0:
        raise ValueError("need step >= 1 and at least one outcome")
    for n in [*range(step, len(outcomes), step), len(outcomes)]:
        head = outcomes.take(np.arange(n))
        stats = summarize(head.delta_loss, head.finite, head.mismatch, confidence)
        half = (stats.ci_high - stats.ci_low) / 2
        if half <= target_rel * abs(stats.mean_delta_loss):
            return UniformStop(n, stats, True, float(n))
    finite = stats.n - stats.non_finite
    if finite < 2:  # no variance to extrapolate from
        return UniformStop(n, stats, False, math.nan)
    needed = (z_value(confidence) * stats.std_delta_loss / (target_rel * stats.mean_delta_loss)) ** 2 * n / finite
    return UniformStop(n, stats, False, float(needed))
