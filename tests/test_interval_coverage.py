"""Unbiasedness of the stratified design (exact, by enumerating every draw sequence), the skewness-corrected
and ratio intervals on hand-computable cases, and bias and coverage on a seeded heavy-tailed simulation."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cli_shell import UserError
from resilience import interval_coverage as ic
from resilience import stratified as st
from resilience.engines.base import FaultSites
from resilience.intervals import (
    Moments,
    ratio_interval,
    ratio_moments,
    sample_cumulants,
    studentised_bounds,
    uniform_layer_interval,
    uniform_layer_moments,
)
from resilience.sampling import z_value

ROOT = Path(__file__).resolve().parents[1]
Z = z_value(0.99)
T = TypeVar("T")


# ----------------------------------------------------------------------------------------- intervals by hand


def test_moments_of_a_mean_and_of_weighted_sums() -> None:
    # x = (0, 0, 3): mean 1, s² = 3 so V = 1; Σ(x − x̄)³ = 6, k₃ = 3/(2·1)·6 = 9, third cumulant 9/3² = 1
    m = Moments.of_mean(np.array([0.0, 0.0, 3.0]))
    assert (m.value, m.variance, m.third) == pytest.approx((1.0, 1.0, 1.0))
    combined = Moments.weighted_sum([1.0, 0.5, 0.0], [m, Moments(2.0, 4.0, 8.0), Moments(math.nan, math.inf)])
    assert (combined.value, combined.variance, combined.third) == pytest.approx((2.0, 2.0, 2.0))
    assert Moments.of_mean(np.array([5.0])).variance == math.inf


def test_hall_interval_is_normal_without_skew_and_only_lengthens_the_tail_side_with_it() -> None:
    assert Moments(10.0, 4.0, 0.0).interval(0.99) == pytest.approx((10 - 2 * Z, 10 + 2 * Z))
    low, high = Moments(10.0, 4.0, 4.0).interval(0.99)  # skewness 0.5: a right tail
    assert high - 10 > 2 * Z and 10 - low == pytest.approx(2 * Z)
    mirrored = Moments(10.0, 4.0, -4.0).interval(0.99)
    assert mirrored == pytest.approx((20 - high, 20 - low))
    # T = (θ̂ − θ)/se leans left when θ̂ leans right. Its long (lower) bound inverts Hall's
    # g(t) = t + a t² + a² t³/3 + b (a = γ/3, b = γ/6): g maps it back to −z; the upper one stays at z,
    # where Hall's own bound (g(t) = z) would be shorter
    gamma = 0.5
    a, b = gamma / 3, gamma / 6
    t_low, t_high = studentised_bounds(gamma, 0.99)
    assert t_low + a * t_low**2 + a**2 * t_low**3 / 3 + b == pytest.approx(-Z)
    assert t_high == pytest.approx(Z)
    assert t_high + a * t_high**2 + a**2 * t_high**3 / 3 + b > Z


def test_variance_of_the_variance_gives_students_quantile() -> None:
    # x = (0, 0, 0, 4): centred (−1, −1, −1, 3), s² = 12/3 = 4, m₄ = 84/4 = 21,
    # Var(s²) = (m₄ − s⁴·(n − 3)/(n − 1))/n = (21 − 16/3)/4; of the mean: that over n²
    m = Moments.of_mean(np.array([0.0, 0.0, 0.0, 4.0]))
    assert m.variance_of_variance == pytest.approx((21 - 16 / 3) / 4 / 16)
    assert m.degrees_of_freedom == pytest.approx(2 * m.variance**2 / m.variance_of_variance)
    # 5 degrees of freedom: t quantile 4.0321 in place of z
    t5 = 4.032142983557536
    assert Moments(10.0, 4.0, 0.0, 2 * 16 / 5).interval(0.99) == pytest.approx((10 - 2 * t5, 10 + 2 * t5))
    # parts add with the fourth power of their weights; an exact variance (no spread) keeps z
    combined = Moments.weighted_sum([1.0, 0.5], [Moments(1.0, 1.0, 0.0, 2.0), Moments(2.0, 4.0, 0.0, 16.0)])
    assert combined.variance_of_variance == pytest.approx(2.0 + 16.0 / 16)
    assert Moments(1.0, 1.0).degrees_of_freedom == math.inf


def test_cells_of_one_stratum_share_its_variance_estimate() -> None:
    # two rounds draw the same stratum: their variance terms rest on one pooled s², so Var(V̂) adds up
    # as (Σ w²/n)²·Var(s²), not as a sum of independent terms
    rng = np.random.default_rng(0)
    pooled = rng.exponential(size=40)
    first, second = pooled[:16], pooled[16:]
    ones = [np.ones(16), np.ones(24)]
    spread = (np.array([0, 0]), [pooled], [np.ones(40)])
    moments, _ = ratio_moments(np.array([0.5, 0.5]), [first, second], ones, spread)
    _, _, var_k2 = sample_cumulants(pooled)  # the residuals d = y − R·1 are a shift of the draws
    share = 0.25 / 16 + 0.25 / 24
    assert moments.variance_of_variance == pytest.approx(share**2 * var_k2)


def test_ratio_interval_is_fiellers_without_skew() -> None:
    interval = ratio_interval
    # B known exactly: the interval of A divided by b
    assert interval(Moments(10.0, 1.0), Moments(2.0, 0.0), 0.99) == pytest.approx(((10 - Z) / 2, (10 + Z) / 2))
    # Fieller: (a − ρ b)² = z² (v_a + ρ² v_b)  ⇔  (b² − z² v_b) ρ² − 2ab ρ + a² − z² v_a = 0
    a, va, b, vb = 10.0, 1.0, 2.0, 0.04
    qa, qb, qc = b * b - Z * Z * vb, -2 * a * b, a * a - Z * Z * va
    roots = sorted((-qb + s * math.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa) for s in (-1, 1))
    assert interval(Moments(a, va), Moments(b, vb), 0.99) == pytest.approx(roots, rel=1e-6)
    # a denominator indistinguishable from 0 leaves the interval open above
    low, high = interval(Moments(10.0, 1.0), Moments(1.0, 1.0), 0.99)
    assert 0 < low < 10 and high == math.inf


def test_ratio_by_arms_keeps_the_numerators_skewed_interval() -> None:
    skewed = Moments(10.0, 4.0, 8.0)
    low, high = skewed.interval(0.99)
    # an exact denominator: exactly A's Hall interval over b, where the combined test would not lean as far
    assert ratio_interval(skewed, Moments(2.0, 0.0), 0.99) == pytest.approx((low / 2, high / 2))
    # an uncertain denominator widens both ends beyond that
    wide = ratio_interval(skewed, Moments(2.0, 0.01, 0.001), 0.99)
    assert wide[0] < low / 2 and wide[1] > high / 2


# ----------------------------------------------------------------------------------------- exact unbiasedness


def every_draw_sequence(run: Callable[[Callable[[int], int]], T]) -> Iterator[tuple[T, float]]:
    """(run's value, probability) for every sequence of uniform choices ``run`` can make, depth first.

    ``run`` gets ``choose(k)``, which returns an index in 0..k−1; later choices may depend on earlier ones.
    """
    prefix: list[int] = []
    while True:
        trail: list[tuple[int, int]] = []

        def choose(k: int, prefix: list[int] = prefix, trail: list[tuple[int, int]] = trail) -> int:
            c = prefix[len(trail)] if len(trail) < len(prefix) else 0
            trail.append((c, k))
            return c

        value = run(choose)
        yield value, math.prod(1 / k for _, k in trail)
        while trail and trail[-1][0] == trail[-1][1] - 1:
            trail.pop()
        if not trail:
            return
        prefix = [c for c, _ in trail[:-1]] + [trail[-1][0] + 1]


def test_stratified_estimate_is_exactly_unbiased_under_adaptive_allocation_and_stopping() -> None:
    """Every draw sequence of a small adaptive run, weighted by its probability: the expected estimate is the
    population mean, although allocation, round sizes, round weights and the stopping point all vary."""
    values = {"a": np.array([1.0]), "b": np.array([0.0, 5.0])}
    strata = [st.Stratum("a", (0,)), st.Stratum("b", (1,))]
    weights = np.array([0.3, 0.7])
    truth = 0.3 * 1.0 + 0.7 * 2.5
    config = st.AdaptiveConfig(target_rel=0.5, max_injections=16, pilot=2, min_round=4, growth=2.5)
    shapes = set()

    def run(choose: Callable[[int], int]) -> tuple[float, float]:
        def draw(stratum: st.Stratum, _round: int, count: int) -> FaultSites:
            index = torch.tensor([choose(len(values[stratum.name])) for _ in range(count)], dtype=torch.int64)
            return FaultSites("x", torch.zeros(count, dtype=torch.int64), index, torch.full((count,), stratum.bits[0]))

        def evaluate(sites: FaultSites) -> st.Outcomes:
            y = np.array([values[strata[b].name][i] for b, i in zip(sites.bit.tolist(), sites.index.tolist(), strict=True)])
            return st.Outcomes(y, np.ones(len(y), bool), np.zeros(len(y), bool))

        result = st.run_adaptive("x", strata, weights, draw, evaluate, config)
        shapes.add((tuple(s.n for s in result.strata), tuple(np.round(result.round_weights, 6))))
        return result.loss.value, float(weights @ [s.mean_delta_loss for s in result.strata])

    total_p, expectation, pooled_expectation = 0.0, 0.0, 0.0
    for (estimate, pooled), p in every_draw_sequence(run):
        total_p += p
        expectation += p * estimate
        pooled_expectation += p * pooled
    assert total_p == pytest.approx(1.0)
    assert len(shapes) >= 3, "the design must actually adapt (round sizes differ between sequences)"
    assert expectation == pytest.approx(truth, rel=1e-9)
    # Pooling every draw of a stratum, as an allocation fed by those same draws does, is biased here.
    assert abs(pooled_expectation - truth) > 1e-3 * truth


# ----------------------------------------------------------------------------------------- seeded simulation

SEEDS = range(100)


@pytest.fixture(scope="module")
def population() -> ic.Population:
    return ic.synthetic_population()


def within_three_se(row: ic.Coverage) -> bool:
    return abs(row.bias) <= 3 * row.bias_se


def test_stratified_runs_are_unbiased_and_cover(population: ic.Population) -> None:
    fixed = ic.simulate_stratified(population, st.AdaptiveConfig(target_rel=None, max_injections=2600), SEEDS, "fixed")
    adaptive = ic.simulate_stratified(population, st.AdaptiveConfig(target_rel=0.1, max_injections=20_000), SEEDS, "0.1")
    for row in (fixed, adaptive):
        assert within_three_se(row), row
        assert row.coverage >= 0.97, row
    # the adaptive runs stop on their target, far below their cap
    assert adaptive.rel_half_width < 0.12 and adaptive.mean_n < 0.25 * 20_000


def test_uniform_hall_interval_covers_where_the_normal_one_may_not(population: ic.Population) -> None:
    normal, hall, post = ic.simulate_uniform(population, 1024, SEEDS)
    for row in (hall, post):
        assert within_three_se(row)
        assert row.coverage >= 0.97 and row.coverage >= normal.coverage
    # post-stratifying by bit removes the chance variation of how many draws each bit got: a narrower interval
    assert post.rel_half_width < 0.8 * hall.rel_half_width


def test_post_stratified_uniform_mean_by_hand() -> None:
    # two "bits": bit 0 draws (1, 3), bit 1 draws (10, non-finite, 20): ȳ = (2, 10), p̂ = (1, 2/3)
    # μ̂ = (2 + 10) / (1 + 2/3) = 7.2, against the plain mean over finite faults 34/4 = 8.5
    delta = np.array([1.0, 10.0, 3.0, np.nan, 20.0])
    finite = np.isfinite(delta)
    bit = np.array([0, 1, 0, 1, 1])
    m = uniform_layer_moments(delta, finite, bit, 2)
    assert m.value == pytest.approx(7.2)
    # variance of Σ_b W_b d̄_b, d = (y·f − μ̂ f)/P̂ with P̂ = 5/6: bit 0 d = (−6.2, −4.2)·1.2, s² = 2·1.44;
    # bit 1 d = (2.8, 0, 12.8)·1.2, s² = 1.44·(Σd² − (Σd)²/3)/2
    s1 = 1.44 * ((2.8**2 + 12.8**2) - 15.6**2 / 3) / 2
    assert m.variance == pytest.approx(0.25 * (2 * 1.44 / 2 + s1 / 3))
    assert uniform_layer_interval(delta, finite, bit, 2, 0.99) == pytest.approx(m.interval(0.99))
    # a bit with fewer than two draws cannot be post-stratified: the plain mean is kept
    assert uniform_layer_moments(delta[:4], finite[:4], bit[:4], 3).value == pytest.approx(14 / 3)


def test_unseen_tail_bound_follows_neighbours_that_show_large_values() -> None:
    def outcomes(values: list[float]) -> st.Outcomes:
        return st.Outcomes(np.array(values), np.ones(len(values), bool), np.zeros(len(values), bool))

    # strata 1 and 3 show large values, stratum 2 (between them) none yet, stratum 0 and 4 are ends
    pooled = [outcomes([0.0] * 4), outcomes([0.0, 9.0, 0.0, 0.0]), outcomes([0.0] * 12),
              outcomes([4.0, 0.0, 0.0, 0.0]), outcomes([0.0] * 4)]
    bound = st.unseen_tail_bound(pooled, mean=1.0, finite=1.0)
    # largest |d| = |y − 1|: 1, 8, 1, 3, 1; stratum 2's neighbours give √(8·3), over √(3/12)
    assert bound[2] == pytest.approx(math.sqrt(24) * 0.5)
    assert bound[0] == bound[4] == 0.0 and bound[1] == pytest.approx(math.sqrt(1 * 1) * math.sqrt(3 / 4))


def test_network_level_and_ratio_intervals_cover() -> None:
    # populations as large as the benchmark's (scripts/bench_coverage.py)
    base = [ic.synthetic_population(seed=s, per_bit=5000, name=f"b{s}") for s in (0, 1)]
    text = [ic.synthetic_population(seed=s, per_bit=5000).scaled(0.25, f"t{s}") for s in (2, 3)]
    rows = ic.simulate_network(base, text, 1024, SEEDS)
    assert [r.label.split(" ")[0] for r in rows] == ["network", "network", "improvement"]
    for row in rows:
        assert row.coverage >= 0.97, row


def test_summary_over_layers_names_the_worst_layer_and_counts_misses() -> None:
    def row(name: str, kind: str, cover: float, bias: float) -> ic.Coverage:
        return ic.Coverage(f"c:{name} {kind}", 500, 1024, bias, 0.01, cover, 0.5)

    rows = {"c:conv1": [row("conv1", "uniform", 0.97, 0.05), row("conv1", "fixed", 0.99, 0.0)],
            "c:fc": [row("fc", "uniform", 0.995, -0.01), row("fc", "fixed", 0.985, 0.02)]}
    uniform, fixed = ic.across_layers("c", rows)
    cells = [c.strip() for c in uniform.split("|")[1:-1]]
    # estimator, layers, seeds, injections, lowest coverage (layer), median, layers < 98%, largest |bias|/SE, width
    assert cells == ["c: uniform", "2", "500", "1,024", "97.0% (`conv1`)", "98.2%", "1", "5.0", "50.0%"]
    assert fixed.split("|")[5].strip() == "98.5% (`fc`)" and fixed.split("|")[7].strip() == "0"


def test_equal_precision_injections_scale_with_the_squared_spread_ratio() -> None:
    # bias SE × √runs is the spread of the estimates: 0.3 and 0.1, whatever the interval widths
    uniform = ic.Coverage("u", 100, 4096, 0.0, 0.03, 0.99, 0.9)
    stratified = ic.Coverage("s", 100, 2000, 0.0, 0.01, 0.99, 0.1)
    assert (uniform.rel_sd, stratified.rel_sd) == pytest.approx((0.3, 0.1))
    assert ic.equal_precision_injections(uniform, 4096, stratified) == pytest.approx(9 * 4096)


# ----------------------------------------------------------------------------------------- real campaigns


def write_faults(folder: Path, bits: list[int], values: list[float]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    finite = [math.isfinite(v) for v in values]
    pq.write_table(pa.table({"layer": ["l"] * len(bits), "bit": pa.array(bits, pa.int16()),
                             "delta_loss": values, "finite": finite}), folder / "faults.parquet")


def test_campaign_population_is_the_uniform_campaigns_target(tmp_path: Path) -> None:
    bits = [b for b in range(32) for _ in range(2)]
    values = [float(b) for b in bits]
    values[-1] = math.inf  # one non-finite fault of bit 31, left out as the campaign does
    write_faults(tmp_path / "c", bits, values)
    population = ic.campaign_population(tmp_path / "c", "l")
    # bit 31 contributes 31 with weight 1/2 of a stratum: (Σ_{b<31} b + 31/2) / (31 + 1/2)
    assert population.truth == pytest.approx((sum(range(31)) + 15.5) / 31.5)
    write_faults(tmp_path / "short", bits[:-2], values[:-2])
    with pytest.raises(UserError, match=r"no faults of bits \[31\]"):
        ic.campaign_population(tmp_path / "short", "l")


@pytest.mark.parametrize(("case", "message"), [("no faults", "faults.parquet"), ("bad regex", "regular expression"),
                                                ("one campaign", "two --campaign")])
def test_benchmark_script_refuses_bad_input_in_one_line(tmp_path: Path, case: str, message: str) -> None:
    args = ["--campaign", str(tmp_path)]
    if case != "no faults":
        write_faults(tmp_path, list(range(32)) * 2, [1.0] * 64)
        args += ["--stratified-layers", "("] if case == "bad regex" else ["--network-only"]
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_coverage.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.startswith("error: ")
    assert message in done.stderr
    assert done.stderr.count("\n") == 1
