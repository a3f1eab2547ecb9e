"""Skewness-corrected confidence intervals for means of heavy-tailed ΔLoss and for ratios of such means.

Per-fault ΔLoss is right-skewed: most flips change the loss a little, a few (exponent and sign bits)
change it by orders of magnitude. A normal interval ``estimate ± z·se`` then undercovers, mostly from
the upper side: a sample that has seen fewer large values than its share underestimates both the mean
and its standard error. The intervals here carry the third cumulant of the estimator alongside its
variance and invert Hall's (1992) monotone transformation of the studentised statistic
T = (θ̂ − θ)/se,

    g(T) = T + a·T² + a²·T³/3 + b,   a = γ/3,  b = γ/6,   γ = κ₃ / V^{3/2} (skewness of θ̂),

which removes the 1/√n skewness term of T's Edgeworth expansion, so that g(T) is close to N(0, 1).
The correction only ever lengthens an arm (the long one, on the side of the tail); the other keeps the
symmetric quantile (see :func:`studentised_bounds`).
For a plain mean of n draws γ = skew(X)/√n and this is Hall's interval; for weighted sums of
independent means (stratified estimates, the mean over layers, neuron-weighted layers) V and κ₃ add
up with the squared and cubed weights. A ratio of two independent estimates gets a Fieller-type
interval built from the arms of the two corrected intervals.

The variance estimate is itself uncertain: when a mean rests on a handful of large values, V̂ varies
about as much as a χ² with twice that many degrees of freedom. Each estimate therefore also carries an
estimate of Var(V̂) (from the fourth moments, adding up with the fourth powers of the weights), and the
interval uses Student's t quantile at the Satterthwaite degrees of freedom 2V̂²/Var(V̂) in place of z.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

from resilience.sampling import z_value

_MAX_SKEW = 6.0  # |γ| beyond this is a few draws' artefact; capping keeps g^{-1} well defined at z = 2.58


@dataclass(frozen=True)
class Moments:
    """An estimate θ̂ with estimates of its variance and third cumulant (all that the intervals need)."""

    value: float
    variance: float
    third: float = 0.0
    variance_of_variance: float = 0.0  # estimated Var(V̂): how far the variance estimate itself may be off

    @classmethod
    def of_mean(cls, x: np.ndarray) -> Moments:
        """The sample mean of ``x`` (i.i.d. draws): variance s²/n, third cumulant k₃/n² (unbiased k-statistics)."""
        x = np.asarray(x, dtype=np.float64)
        n = len(x)
        if n == 0:
            return cls(math.nan, math.nan, math.nan)
        variance, third, spread = sample_cumulants(x)
        return cls(float(x.mean()), variance / n, third / n**2, spread / n**2)

    @classmethod
    def weighted_sum(cls, weights: Sequence[float] | np.ndarray, parts: Sequence[Moments]) -> Moments:
        """Σ w_i θ̂_i of independent estimates: variances add with w², third cumulants with w³."""
        w = np.asarray(weights, dtype=np.float64)
        values = np.array([p.value for p in parts])
        variances = np.array([p.variance for p in parts])
        thirds = np.array([p.third for p in parts])
        spreads = np.array([p.variance_of_variance for p in parts])
        used = w != 0  # a part with weight 0 contributes nothing, even when its figures are undefined
        return cls(
            float(w[used] @ values[used]),
            float(w[used] ** 2 @ variances[used]),
            float(w[used] ** 3 @ thirds[used]),
            float(w[used] ** 4 @ spreads[used]),
        )

    @property
    def se(self) -> float:
        """Standard error √V."""
        return math.sqrt(self.variance) if self.variance >= 0 else math.nan

    @property
    def skewness(self) -> float:
        """Skewness of the estimator, κ₃ / V^{3/2} (0 when V = 0)."""
        if not self.variance > 0 or not math.isfinite(self.variance):
            return 0.0
        return self.third / self.variance**1.5

    @property
    def degrees_of_freedom(self) -> float:
        """Satterthwaite's 2V̂²/Var(V̂) (infinite when the variance estimate is taken as exact)."""
        if not self.variance_of_variance > 0:
            return math.inf
        return 2 * self.variance**2 / self.variance_of_variance

    def interval(self, confidence: float) -> tuple[float, float]:
        """The skewness-corrected interval at Student's quantile (NaN when the estimate or its variance is undefined)."""
        if not (math.isfinite(self.value) and math.isfinite(self.variance)):
            return math.nan, math.nan
        t_low, t_high = studentised_bounds(self.skewness, confidence, self.degrees_of_freedom)
        return self.value - self.se * t_high, self.value - self.se * t_low


def sample_cumulants(x: np.ndarray) -> tuple[float, float, float]:
    """Unbiased estimates (k₂ = s², k₃) of the variance and third cumulant of the distribution ``x`` was
    drawn from, and an estimate of Var(s²) = (μ₄ − σ⁴ (n − 3)/(n − 1)) / n.

    Fewer than two draws leave the variance unknown (infinite); fewer than three, the third cumulant 0;
    fewer than four, Var(s²) 0.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 2:
        return math.inf, 0.0, 0.0
    centred = x - x.mean()
    squares = centred * centred
    k2 = float(np.sum(squares)) / (n - 1)
    k3 = float(np.sum(squares * centred)) * n / ((n - 1) * (n - 2)) if n > 2 else 0.0
    return k2, k3, float(variance_of_sample_variance(float(squares @ squares) / n, k2, n))


def variance_of_sample_variance(m4: np.ndarray | float, k2: np.ndarray | float, n: np.ndarray | int) -> np.ndarray:
    """Var(s²) ≈ (m₄ − s⁴ (n − 3)/(n − 1)) / n from the fourth central moment m₄ = Σ(x − x̄)⁴/n and s² of n
    draws (elementwise; 0 below four draws or when the estimate falls below 0)."""
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 3, np.maximum(0.0, (m4 - k2 * k2 * (n - 3) / (n - 1)) / n), 0.0)


Spread = tuple[np.ndarray, Sequence[np.ndarray], Sequence[np.ndarray]]


def ratio_moments(
    weights: np.ndarray,
    numerators: Sequence[np.ndarray],
    denominators: Sequence[np.ndarray],
    spread: Spread | None = None,
) -> tuple[Moments, np.ndarray]:
    """Combined ratio estimator R = Σ W_c ȳ_c / Σ W_c x̄_c over independently sampled cells c, with the
    variance and third cumulant of its linearisation Σ W_c d̄_c, d = (y − R x) / X̂.

    Each cell's variance and third cumulant of d come from its own draws, or, with ``spread`` = (stratum
    of every cell, numerators and denominators of every draw of each stratum), from all draws of the
    cell's stratum: the rounds of a stratified run draw a stratum identically, so pooling them estimates
    its spread from many draws instead of a round's few. Also returns the standard deviations of d per
    cell (per stratum with ``spread``). Fewer than two draws leave a variance unknown (infinite); cells
    of weight 0 are ignored.
    """
    weights = np.asarray(weights, dtype=np.float64)
    used = weights != 0
    num = np.array([y.mean() if len(y) else math.nan for y in numerators])
    den = np.array([x.mean() if len(x) else math.nan for x in denominators])
    total_den = float(weights[used] @ den[used])
    groups, group_num, group_den = spread if spread is not None else (
        np.arange(len(weights)), numerators, denominators)
    if not total_den > 0:
        return Moments(math.nan, math.nan, math.nan), np.full(len(group_num), math.inf)
    ratio = float(weights[used] @ num[used]) / total_den
    cumulants = np.array([sample_cumulants((y - ratio * x) / total_den) for y, x in zip(group_num, group_den, strict=True)])
    counts = np.array([len(y) for y in numerators], dtype=np.float64)[used]
    group_of_cell = np.asarray(groups)[used]
    k2, k3, _ = cumulants[group_of_cell].T
    w = weights[used]
    with np.errstate(divide="ignore", invalid="ignore"):
        # cells of one group share its k₂, so their variance terms move together: Var(V̂) adds per group
        share = np.bincount(group_of_cell, w**2 / counts, minlength=len(cumulants))
        moments = Moments(ratio, float(np.sum(w**2 * k2 / counts)), float(np.sum(w**3 * k3 / counts**2)),
                          float(np.sum(share[share > 0] ** 2 * cumulants[share > 0, 2])))
    return moments, np.sqrt(cumulants[:, 0])


def uniform_layer_moments(delta_loss: np.ndarray, finite: np.ndarray, bit: np.ndarray, bits: int) -> Moments:
    """The mean ΔLoss over the finite faults of a uniform campaign's layer, post-stratified by flipped bit.

    A uniform draw flips each of the ``bits`` bits with probability 1/bits, so Σ_b ȳ_b / Σ_b p̂_b over the
    bits (ȳ_b: mean of ΔLoss·finite, p̂_b: finite share, among the draws of bit b) estimates the same mean
    as the plain mean over finite faults. Its variance leaves out the chance variation of how many draws
    each bit got, which on heavy-tailed ΔLoss is a large part of the plain mean's; its skewness comes
    from the bits that carry the mean. Falls back to the plain mean when some bit has fewer than 2 draws.
    """
    delta_loss, finite, bit = np.asarray(delta_loss, dtype=np.float64), np.asarray(finite, dtype=bool), np.asarray(bit)
    if len(bit) and not 0 <= bit.min() <= bit.max() < bits:
        raise ValueError(f"flipped bits must lie in 0..{bits - 1}")
    counts = np.bincount(bit, minlength=bits)
    if counts.min() < 2:
        return Moments.of_mean(delta_loss[finite])
    # ratio_moments with one cell per bit, by bincount: the simulations call this hundreds of thousands of times
    z, f = np.where(finite, delta_loss, 0.0), finite.astype(np.float64)
    total_den = float(np.sum(np.bincount(bit, f, bits) / counts)) / bits
    if not total_den > 0:
        return Moments(math.nan, math.nan, math.nan)
    ratio = float(np.sum(np.bincount(bit, z, bits) / counts)) / bits / total_den
    d = (z - ratio * f) / total_den
    centred = d - (np.bincount(bit, d, bits) / counts)[bit]
    squares = centred * centred
    k2 = np.bincount(bit, squares, bits) / (counts - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        k3 = np.where(counts > 2, np.bincount(bit, squares * centred, bits) * counts / ((counts - 1) * (counts - 2)), 0.0)
        spread = variance_of_sample_variance(np.bincount(bit, squares * squares, bits) / counts, k2, counts)
    return Moments(ratio, float(np.sum(k2 / counts)) / bits**2, float(np.sum(k3 / counts**2)) / bits**3,
                   float(np.sum(spread / counts**2)) / bits**4)


def uniform_layer_interval(
    delta_loss: np.ndarray, finite: np.ndarray, bit: np.ndarray, bits: int, confidence: float = 0.99
) -> tuple[float, float]:
    """The interval a uniform campaign's per-layer table should report for the layer's mean ΔLoss:
    Hall's skewness-corrected interval of the bit-post-stratified mean (:func:`uniform_layer_moments`)."""
    return uniform_layer_moments(delta_loss, finite, bit, bits).interval(confidence)


def studentised_bounds(skewness: float, confidence: float, degrees_of_freedom: float = math.inf) -> tuple[float, float]:
    """Quantiles (lower, upper) of T = (θ̂ − θ)/se at ``confidence``: Hall's correction for ``skewness`` applied to
    Student's quantile at ``degrees_of_freedom`` (the normal one when infinite, at least 1 degree), where it
    lengthens an arm only.

    The short arm stays at the symmetric quantile: a sample that caught more rare large values than its
    share overstates the mean and its skewness together, and the arm Hall's correction would shorten is
    exactly the one that must reach back down to the truth.
    """
    q = z_value(confidence) if math.isinf(degrees_of_freedom) else float(
        student_t.ppf(0.5 + confidence / 2, max(1.0, degrees_of_freedom)))
    gamma = max(-_MAX_SKEW, min(_MAX_SKEW, skewness))
    a, b = gamma / 3, gamma / 6
    if abs(a) < 1e-12:
        return -q, q

    def inverse(u: float) -> float:  # g(t) = ((1 + a t)³ − 1)/(3a) + b is increasing in t
        return (np.cbrt(1 + 3 * a * (u - b)) - 1) / a

    return min(float(inverse(-q)), -q), max(float(inverse(q)), q)


def ratio_interval(a: Moments, b: Moments, confidence: float) -> tuple[float, float]:
    """Fieller interval of θ_A / θ_B for independent positive estimates, each side from the Hall intervals' arms.

    Each estimate's Hall interval gives a lower and an upper arm, (θ̂ − low)/z and (high − θ̂)/z. A ratio ρ
    above θ̂_A/θ̂_B is too large if θ_A sits below its estimate's upper reach or θ_B above its lower one, so
    the upper end solves (θ̂_A − ρ θ̂_B)² = z² (upper arm of A² + ρ² lower arm of B²), and the lower end
    the same with the other arms. Without skewness both arms are the standard error and this is Fieller's
    interval; unlike a test of θ̂_A − ρ θ̂_B with its combined skewness, the right tail of the numerator
    is not diluted by the denominator's. An end beyond reach is 0 (A not distinguishable from 0) or
    infinity (B not distinguishable from 0).
    """
    if not (a.value > 0 and b.value > 0 and math.isfinite(a.variance) and math.isfinite(b.variance)):
        return math.nan, math.nan
    (a_low, a_high), (b_low, b_high) = a.interval(confidence), b.interval(confidence)
    cross = a.value * b.value
    # ρ solves q(ρ) = (θ̂_B² − (z·arm_B)²) ρ² − 2 θ̂_A θ̂_B ρ + θ̂_A² − (z·arm_A)² = 0, q < 0 at θ̂_A/θ̂_B
    lead, const = b.value**2 - (b_high - b.value) ** 2, a.value**2 - (a.value - a_low) ** 2
    low = 0.0 if const <= 0 else const / (cross + math.sqrt(cross * cross - lead * const))
    lead, const = b.value**2 - (b.value - b_low) ** 2, a.value**2 - (a_high - a.value) ** 2
    high = math.inf if lead <= 0 else (cross + math.sqrt(cross * cross - lead * const)) / lead
    return low, high

