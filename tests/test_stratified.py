"""resilience.stratified: strata, the stratified ratio estimator, Neyman allocation, adaptive stopping,
determinism and resume, checked against a tiny model whose every fault (site x bit) is enumerated."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_campaign import tiny_checkpoint  # noqa: F401  (fixture: a random resnet20 checkpoint on Fashion-MNIST)
from torch import nn

from resilience import stratified as st
from resilience.bitflip import FORMATS, flip_bits
from resilience.engines.base import FaultSites
from resilience.sampling import z_value

pytestmark = pytest.mark.usefixtures("one_thread")

FP32 = FORMATS["fp32"]
IMAGES, NEURONS, BITS = 2, 4, 32
LAYER = "conv"


def tiny_population() -> st.Outcomes:
    """Every fault of a 2x2 conv output (4 neurons) for 2 images and 32 bits, feeding a Linear(4, 3).

    Returned in (image, element, bit) order so that a site's flat position is
    ``(image * NEURONS + index) * BITS + bit``.
    """
    g = torch.Generator().manual_seed(0)
    conv, fc = nn.Conv2d(1, 1, 2), nn.Linear(4, 3)
    with torch.no_grad():
        for p in [*conv.parameters(), *fc.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g))
        act = conv(torch.randn(IMAGES, 1, 3, 3, generator=g)).flatten(1)
        golden = fc(act)
        labels = golden.argmax(1)
        golden_loss = F.cross_entropy(golden, labels, reduction="none")
        image, index, bit = (t.flatten() for t in torch.meshgrid(
            torch.arange(IMAGES), torch.arange(NEURONS), torch.arange(BITS), indexing="ij"))
        faulty = act[image].clone()
        rows = torch.arange(len(image))
        faulty[rows, index] = flip_bits(faulty[rows, index].contiguous(), bit)
        logits = fc(faulty)
        loss = F.cross_entropy(logits, labels[image], reduction="none")
    return st.Outcomes(
        (loss - golden_loss[image]).abs().double().numpy(),
        torch.isfinite(loss).numpy(),
        (logits.argmax(1) != labels[image]).numpy(),
    )


POPULATION = tiny_population()
TRUE_LOSS = float(POPULATION.delta_loss[POPULATION.finite].mean())  # what the uniform campaign targets
TRUE_MISMATCH = float(POPULATION.mismatch.mean())


def lookup(sites: FaultSites) -> st.Outcomes:
    """Evaluator reading the precomputed population (as an engine would measure it)."""
    flat = ((sites.image * NEURONS + sites.index) * BITS + sites.bit).numpy()
    return POPULATION.take(flat)


def run(seed: int, grouping: str = "bit", store: st.RoundStore | None = None, **config) -> st.StratifiedResult:
    strata = st.make_strata(FP32, grouping)
    draw = st.stratum_drawer(seed, LAYER, torch.arange(IMAGES), NEURONS)
    options = {"target_rel": 0.1, "pilot": 8, "max_injections": 20_000, "min_round": 32} | config
    return st.run_adaptive(
        LAYER, strata, st.stratum_weights(strata, FP32), draw, lookup, st.AdaptiveConfig(**options), store
    )


def uniform_estimate(seed: int, n: int) -> st.Estimate:
    """The uniform campaign's estimator: one stratum holding every bit, n uniform draws."""
    everything = st.Stratum("all", tuple(range(BITS)))
    sites = st.stratum_drawer(seed, LAYER, torch.arange(IMAGES), NEURONS)(everything, 0, n)
    return st.loss_estimate(np.ones(1), [lookup(sites)])[0]


def test_population_is_a_meaningful_case() -> None:
    assert POPULATION.delta_loss.shape == (IMAGES * NEURONS * BITS,)
    assert 0 < (~POPULATION.finite).sum() < 4, "a non-finite outcome must be present and excluded"
    assert POPULATION.mismatch.any()
    per_bit = POPULATION.delta_loss.reshape(IMAGES * NEURONS, BITS)
    assert np.nanstd(per_bit[:, :8]) < 1e-5 < np.nanstd(per_bit[:, 31]), "variance sits in the high bits"


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16"])
def test_strata_cover_every_bit_once(name: str) -> None:
    fmt = FORMATS[name]
    for grouping in st.GROUPINGS:
        strata = st.make_strata(fmt, grouping)
        weights = st.stratum_weights(strata, fmt)
        assert math.isclose(weights.sum(), 1.0)
        assert sorted(b for s in strata for b in s.bits) == list(range(fmt.bits))
    fields = {s.name: s.bits for s in st.make_strata(FORMATS["fp32"], "field")}
    assert fields["sign"] == (31,) and fields["exponent"] == tuple(range(23, 31))
    assert st.format_fields(FORMATS["bf16"]) == (8, 7) and st.format_fields(FORMATS["fp16"]) == (5, 10)
    with pytest.raises(ValueError, match="grouping"):
        st.make_strata(fmt, "nibble")


def test_draws_depend_only_on_seed_layer_stratum_and_round() -> None:
    draw = st.stratum_drawer(5, LAYER, torch.tensor([3, 9]), NEURONS)
    exponent = st.make_strata(FP32, "field")[1]
    sites = draw(exponent, 2, 500)
    assert sites.layer == LAYER and set(sites.bit.tolist()) == set(exponent.bits)
    assert set(sites.image.tolist()) == {3, 9} and set(sites.index.tolist()) == set(range(NEURONS))
    again = st.stratum_drawer(5, LAYER, torch.tensor([3, 9]), NEURONS)(exponent, 2, 500)
    assert torch.equal(sites.index, again.index) and torch.equal(sites.bit, again.bit)
    other_round = draw(exponent, 3, 500)
    assert not torch.equal(sites.index, other_round.index)
    # The uniform campaign's sampler, on a stream of its own: a prefix of a longer draw is a shorter draw.
    assert torch.equal(draw(exponent, 2, 100).index, sites.index[:100])


def test_single_stratum_ratio_is_the_plain_mean_over_finite() -> None:
    rng = np.random.default_rng(0)
    y, f = rng.exponential(size=50), rng.random(50) > 0.1
    est, sds = st.loss_estimate(np.ones(1), [st.Outcomes(np.where(f, y, np.nan), f, np.zeros(50, bool))])
    finite = y[f]
    assert math.isclose(est.value, finite.mean())
    # delta-method variance of a mean over a random number of finite draws: s^2 (k-1) n / ((n-1) k^2)
    k, n = len(finite), 50
    assert math.isclose(est.variance, finite.var(ddof=1) * (k - 1) * n / ((n - 1) * k**2))
    assert math.isclose(st.uniform_equivalent(np.ones(1), [st.Outcomes(y, f, f)], est.variance), n)


def test_allocation_follows_neyman_with_a_defensive_floor() -> None:
    weights, sds = np.full(4, 0.25), np.array([0.0, 1.0, 3.0, 0.0])
    shares = st.allocation_shares(weights, sds, defensive=0.2)
    assert math.isclose(shares.sum(), 1.0)
    assert np.allclose(shares, 0.8 * np.array([0, 0.25, 0.75, 0]) + 0.2 * 0.25)
    counts = st.round_counts(shares, 140)
    # 2 each, then 132 x shares = [6.6, 33, 85.8, 6.6]: floors 130, the two left go to 85.8 and the first 6.6
    assert counts.tolist() == [9, 35, 88, 8]
    with pytest.raises(ValueError, match="cannot give"):
        st.round_counts(shares, 7)
    assert st.largest_remainder(np.array([1.5, 1.5, 1.0]), 4).tolist() == [2, 1, 1]
    with pytest.raises(ValueError, match="two draws"):
        st.allocation_shares(weights, np.array([1.0, math.inf, 1.0, 1.0]), 0.1)


def test_adaptive_run_reaches_target_and_reports_saving() -> None:
    result = run(0)
    assert result.stop_reason == "target"
    # The last round is sized from earlier rounds' variance: it meets the target up to sampling noise.
    assert result.loss.half_width <= 0.125 * result.loss.value
    assert result.round_weights[0] == 0 and math.isclose(sum(result.round_weights), 1.0)
    assert result.n == sum(s.n for s in result.strata) and min(s.n for s in result.strata) >= 8
    assert result.loss.covers(TRUE_LOSS) and result.mismatch.covers(TRUE_MISMATCH)
    # Neyman puts the draws where the variance is: the sign bit gets far more than a low mantissa bit.
    by_name = {s.name: s for s in result.strata}
    assert by_name["bit31"].n > 10 * by_name["bit3"].n
    assert result.saving_factor > 3
    assert result.uniform_equivalent_n > result.n


def test_cap_stops_the_run() -> None:
    result = run(0, target_rel=0.001, max_injections=600)
    assert result.stop_reason == "max_injections" and result.n == 600
    with pytest.raises(ValueError, match="pilot"):
        run(0, max_injections=100)


def test_absolute_target_is_enough() -> None:
    result = run(0, target_rel=None, target_abs=0.05)
    # The plan sizes the last round for the variance; the skewness-corrected interval of a round with two or
    # three draws in the sign bit reaches further up than z·se.
    assert result.stop_reason == "target" and z_value(0.99) * math.sqrt(result.loss.variance) <= 0.05 * 1.05
    assert result.loss.high - result.loss.value > result.loss.value - result.loss.low


def test_same_seed_same_faults_and_stopping_point() -> None:
    seen: list[list[FaultSites]] = [[], []]

    def recording(k: int):
        def evaluate(sites: FaultSites) -> st.Outcomes:
            seen[k].append(sites)
            return lookup(sites)

        return evaluate

    strata = st.make_strata(FP32, "bit")
    results = [
        st.run_adaptive(
            LAYER, strata, st.stratum_weights(strata, FP32),
            st.stratum_drawer(7, LAYER, torch.arange(IMAGES), NEURONS), recording(k),
            st.AdaptiveConfig(pilot=8, min_round=32),
        )
        for k in range(2)
    ]
    assert results[0].n == results[1].n and results[0].rounds == results[1].rounds > 1
    assert results[0].loss == results[1].loss
    assert all(torch.equal(a.bit, b.bit) and torch.equal(a.index, b.index) for a, b in zip(*seen, strict=True))
    assert run(8).loss != run(7).loss


class MemoryStore:
    """RoundStore in a dict, able to simulate an interruption after a number of saved rounds."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.rounds: dict[int, st.RoundRecord] = {}
        self.fail_after = fail_after

    def load(self, round_index: int) -> st.RoundRecord | None:
        return self.rounds.get(round_index)

    def save(self, record: st.RoundRecord) -> None:
        self.rounds[record.index] = record
        if self.fail_after is not None and len(self.rounds) >= self.fail_after:
            raise KeyboardInterrupt


def test_resume_after_interruption_stops_at_the_same_point() -> None:
    uninterrupted = run(3)
    store = MemoryStore(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        run(3, store=store)
    store.fail_after = None
    calls = []
    resumed = st.run_adaptive(
        LAYER, st.make_strata(FP32), st.stratum_weights(st.make_strata(FP32), FP32),
        st.stratum_drawer(3, LAYER, torch.arange(IMAGES), NEURONS),
        lambda sites: calls.append(len(sites)) or lookup(sites),
        st.AdaptiveConfig(target_rel=0.1, pilot=8, max_injections=20_000, min_round=32), store,
    )
    assert (resumed.n, resumed.rounds, resumed.loss) == (uninterrupted.n, uninterrupted.rounds, uninterrupted.loss)
    assert sum(calls) == resumed.n - sum(len(store.rounds[i].sites) for i in (0, 1))
    with pytest.raises(ValueError, match="does not match"):
        run(4, store=store)


SEEDS = range(200)


def test_both_estimators_are_unbiased() -> None:
    stratified = np.array([run(seed, max_injections=2_000, target_rel=1e-6).loss.value for seed in SEEDS[:150]])
    uniform = np.array([uniform_estimate(seed, 2_000).value for seed in SEEDS[:150]])
    for values in (stratified, uniform):
        standard_error = values.std(ddof=1) / math.sqrt(len(values))
        assert abs(values.mean() - TRUE_LOSS) < 3.3 * standard_error  # 99.9% two-sided
    assert stratified.var() < uniform.var() / 3, "same n, far less variance"


def test_adaptive_intervals_cover_at_about_the_nominal_rate() -> None:
    results = [run(seed) for seed in SEEDS]
    loss = np.mean([r.loss.covers(TRUE_LOSS) for r in results])
    mismatch = np.mean([r.mismatch.covers(TRUE_MISMATCH) for r in results])
    # Nominal 99%; sequential stopping on an estimated variance costs a little coverage.
    assert loss >= 0.95, loss
    assert mismatch >= 0.93, mismatch
    fixed = [run(seed, grouping="field", max_injections=1_000, target_rel=1e-6) for seed in SEEDS]
    assert np.mean([r.loss.covers(TRUE_LOSS) for r in fixed]) >= 0.96


def test_uniform_to_target_stops_where_a_uniform_campaign_would() -> None:
    from resilience.metrics import summarize

    everything = st.Stratum("all", tuple(range(BITS)))
    outcomes = lookup(st.stratum_drawer(0, LAYER, torch.arange(IMAGES), NEURONS)(everything, 0, 4096))
    stop = st.uniform_to_target(outcomes, target_rel=0.3, step=64)
    assert stop.reached and stop.n % 64 == 0 and stop.needed_n == stop.n
    assert stop.half_width <= 0.3 * stop.stats.mean_delta_loss
    head = outcomes.take(np.arange(stop.n))
    assert stop.stats == summarize(head.delta_loss, head.finite, head.mismatch)
    earlier = st.uniform_to_target(outcomes.take(np.arange(stop.n - 64)), target_rel=0.3, step=64)
    assert not earlier.reached and earlier.n == stop.n - 64 < earlier.needed_n


# ----------------------------------------------------------------------------------------- campaign glue


def tiny_campaign_setup():
    """A conv (2x2 output) + linear model, two images, its golden pass and the uniform runner's config."""
    from resilience.campaign import CampaignConfig
    from resilience.golden import TensorImageSource, golden_pass
    from resilience.layers import discover_layers

    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 1, 2), nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    ids, images = torch.tensor([4, 7]), torch.randn(IMAGES, 1, 3, 3, generator=g)
    labels = model(images).argmax(1).detach()  # every image correct: both are in the golden set
    golden = golden_pass(model, ids, [(images, labels)], FP32, "cpu")
    config = CampaignConfig(model="tiny", dataset="synthetic", seed=0, batch_size=32, chunk_size=64)
    return model, discover_layers(model, images[:1]), golden, TensorImageSource(ids, images), config


def test_stratified_campaign_resumes_and_covers_the_exhaustive_mean(tmp_path, monkeypatch) -> None:
    import pyarrow.parquet as pq

    from resilience import stratified_campaign as sc
    from resilience.campaign import CampaignError, chunk_table, plan_layers
    from resilience.engines import get_engine
    from resilience.engines.reference import ReferenceEngine
    from resilience.runner import StratifiedSampling, execute

    model, layers, golden, source, config = tiny_campaign_setup()
    config = replace(config, chunk_size=32)  # the pilot round (32 strata x 4) takes four chunks
    adaptive = st.AdaptiveConfig(target_rel=0.2, pilot=4, max_injections=3_000, min_round=32)

    def campaign(out, **kw):
        return execute(out, config, model, layers, golden, source, sampling=StratifiedSampling(adaptive),
                       progress=False, **kw)

    whole, stats = campaign(tmp_path / "a")
    results = whole.results
    assert whole.missing() == [] and stats.skipped == 0 and min(r.rounds for r in results.values()) > 1
    summary = whole.assemble()
    assert summary["network"]["faults"] == stats.faults == sum(r.n for r in results.values())

    # Kill in the middle of the first round of the second layer, after two of its chunks; then rerun.
    calls, run = {"n": 0}, ReferenceEngine.run

    def dying_run(self, layer, sites, source):
        calls["n"] += layer.name == "2"
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return run(self, layer, sites, source)

    monkeypatch.setattr(ReferenceEngine, "run", dying_run)
    with pytest.raises(KeyboardInterrupt):
        campaign(tmp_path / "b")
    assert len(list((tmp_path / "b" / "parts").glob("0001-r0000-c*.parquet"))) == 2, "finished chunks are kept"
    monkeypatch.setattr(ReferenceEngine, "run", run)
    opened, resumed = campaign(tmp_path / "b")
    assert resumed.skipped > 0 and resumed.faults + resumed.skipped == stats.faults
    opened.assemble()
    for name in ("faults.parquet", "layers.csv", "strata.csv", "summary.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert not list((tmp_path / "b" / "parts").glob("*-c*.parquet"))

    # The weighted fault records reproduce the layer estimate; the CI covers the exhaustive mean.
    faults = pq.read_table(tmp_path / "a" / "faults.parquet").to_pandas()
    engine = get_engine("reference")(model, layers, FP32, batch_size=64)
    for plan in plan_layers(config, layers, IMAGES):
        rows = faults[faults.layer == plan.name]
        fin = rows[rows.finite]
        assert math.isclose((fin.weight * fin.delta_loss).sum() / fin.weight.sum(), results[plan.name].loss.value)
        image, index, bit = (t.flatten() for t in torch.meshgrid(
            golden.ids, torch.arange(plan.neurons), torch.arange(BITS), indexing="ij"))
        every = FaultSites(plan.name, image, index, bit)
        table = chunk_table(plan, 0, every, engine.run(plan.info(), every, source), golden)
        exhaustive = sc.outcomes_of(table)
        assert results[plan.name].loss.covers(float(exhaustive.delta_loss[exhaustive.finite].mean()))

    with pytest.raises(CampaignError, match="different campaign"):
        execute(tmp_path / "a", config, model, layers, golden, source,
                sampling=StratifiedSampling(st.AdaptiveConfig(pilot=5)), progress=False)


def test_shards_merge_into_the_same_files(tmp_path) -> None:
    from resilience.campaign import CampaignError
    from resilience.runner import StratifiedSampling, execute, merge, open_campaign

    model, layers, golden, source, config = tiny_campaign_setup()
    sampling = StratifiedSampling(st.AdaptiveConfig(target_rel=0.3, pilot=4, max_injections=2_000))

    def campaign(out, shard=(0, 1)):
        return execute(out, config, model, layers, golden, source, sampling=sampling, shard=shard, progress=False)

    campaign(tmp_path / "whole")[0].assemble()
    for i in range(2):
        opened, _ = campaign(tmp_path / f"shard{i}", (i, 2))
        assert len(opened.missing()) == 1
    with pytest.raises(CampaignError, match="not finished"):
        open_campaign(tmp_path / "shard0").assemble()
    merge([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged")
    for name in ("faults.parquet", "layers.csv", "strata.csv", "summary.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "merged" / name).read_bytes(), name


# ----------------------------------------------------------------------------------------- command line


def test_inject_cli_stratified_end_to_end(request, tmp_path, capsys) -> None:
    import json

    import pandas as pd

    import inject
    from report import main as report_main

    checkpoint = request.getfixturevalue("tiny_checkpoint")

    def argv(out, *extra):
        return ["--checkpoint", str(checkpoint), "--seed", "1", "--out", str(out), "--max-images", "16",
                "--golden", "all", "--layers", "^(conv1|linear)$", "--batch-size", "4", "--chunk-size", "8",
                "--device", "cpu", "--no-progress", "-j", "0", *extra]

    options = ["--sampling", "stratified", "--strata", "field", "--pilot", "3", "--max-injections", "64",
               "--target-ci", "0.3"]
    out = tmp_path / "fi"
    assert inject.main(argv(out, *options)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stratified"]["grouping"] == "field" and summary["stratified"]["pilot"] == 3
    assert set(summary["n_per_layer"]) == {"conv1", "linear"} and min(summary["n_per_layer"].values()) >= 12
    assert max(summary["n_per_layer"].values()) <= 64 and summary["engine"]["engine"] == "reference"
    layers = pd.read_csv(out / "layers.csv")
    assert set(layers.stop_reason) <= {"target", "max_injections"} and (layers.saving_factor > 0).all()
    assert len(pd.read_csv(out / "strata.csv")) == 2 * 4
    log = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert set(log["layer_seconds"]) == {"conv1", "linear"}

    before = {name: (out / name).read_bytes() for name in ("faults.parquet", "layers.csv", "summary.json")}
    assert inject.main(argv(out, *options)) == 0
    assert "already complete" in capsys.readouterr().out
    assert before == {name: (out / name).read_bytes() for name in before}
    for i in range(2):
        assert inject.main(argv(tmp_path / f"shard{i}", *options, "--shard", f"{i}/2")) == 0
    assert inject.main(["merge", str(tmp_path / "shard0"), str(tmp_path / "shard1"), "--out", str(tmp_path / "m")]) == 0
    merged = {name: (tmp_path / "m" / name).read_bytes() for name in before}
    assert merged.pop("summary.json") != before.pop("summary.json"), "the command line (--out) differs"
    assert before == merged
    # report.py reads stratified layer tables like uniform ones.
    assert report_main(["compare", str(out), str(out), "--out", str(tmp_path / "r")]) == 2
    assert "not a text-guided campaign" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (["--sampling", "stratified", "--injections", "64"], "--injections: uniform sampling only"),
    (["--sampling", "stratified", "--margin", "0.05"], "--margin: uniform sampling only"),
    (["--target-ci", "0.2", "--strata", "field"], "--strata, --target-ci: --sampling stratified only"),
    (["--sampling", "stratified", "--max-injections", "100"], "--max-injections 100 is below the --pilot (16 x 32"),
    (["--sampling", "stratified", "--pilot", "1"], "--pilot must be at least 2"),
    (["--sampling", "stratified", "--target-ci", "0"], "--target-ci must be positive"),
    (["--sampling", "stratified", "--defensive", "1"], "--defensive share must lie in [0, 1)"),
])
def test_inject_cli_refuses_option_combinations(tmp_path, capsys, extra, message) -> None:
    import inject

    # Checked before the checkpoint is even read.
    assert inject.main(["neurons", "--checkpoint", str(tmp_path / "none.pth"), "--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
