"""The network-level interval of summary.json: Hall's interval of the mean over layers of the layer
estimates, for uniform and stratified campaigns alike, and the same moments in ``report.py compare``."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pandas as pd
import pytest
from test_stratified import tiny_campaign_setup

from resilience import stratified as st
from resilience.image_pool import LayerSet
from resilience.improvement_ci import (
    improvement_intervals,
    layer_moments,
    layer_set,
    network_interval,
    network_moments,
)
from resilience.intervals import Moments
from resilience.runner import StratifiedSampling, execute

pytestmark = pytest.mark.usefixtures("one_thread")


def run_campaign(out, sampling=None):
    model, layers, golden, source, config = tiny_campaign_setup()
    kwargs = {} if sampling is None else {"sampling": sampling}
    if sampling is None:
        config = replace(config, injections=96, chunk_size=32)
    campaign, _ = execute(out, config, model, layers, golden, source, progress=False, **kwargs)
    campaign.assemble()
    return json.loads((out / "summary.json").read_text()), pd.read_csv(out / "layers.csv", dtype={"layer": str})


@pytest.mark.parametrize("stratified", [False, True], ids=["uniform", "stratified"])
def test_summary_has_the_interval_of_the_mean_over_layers(tmp_path, stratified: bool) -> None:
    sampling = StratifiedSampling(st.AdaptiveConfig(target_rel=0.3, pilot=4, max_injections=1_000, min_round=32))
    summary, rows = run_campaign(tmp_path / "c", sampling if stratified else None)
    network = summary["network"]
    moments = layer_moments(tmp_path / "c")
    assert list(moments) == rows.layer.tolist()
    # the moments rebuilt from faults.parquet give each layer's own estimate and interval
    for row in rows.itertuples():
        m = moments[row.layer]
        assert math.isclose(m.value, row.mean_delta_loss, rel_tol=1e-9)
        low, high = m.interval(0.99)
        assert math.isclose(low, row.ci_low, rel_tol=1e-9) and math.isclose(high, row.ci_high, rel_tol=1e-9)
    whole = network_moments(layer_set(tmp_path / "c"))
    assert math.isclose(whole.value, network["delta_loss"], rel_tol=1e-9)
    assert network["ci_low"] < network["delta_loss"] < network["ci_high"]
    # independent layer means: the network's variance is theirs added up over L^2
    assert math.isclose(whole.variance, sum(m.variance for m in moments.values()) / len(moments) ** 2, rel_tol=1e-9)
    assert (network["ci_low"], network["ci_high"]) == pytest.approx(whole.interval(0.99), rel=1e-9)
    assert "99% CI [" in (tmp_path / "c" / "layers.md").read_text().split("Network level")[1]


def test_stratified_campaigns_get_compare_intervals(tmp_path) -> None:
    """``report.py compare`` intervals now exist for stratified campaigns (a campaign against itself: the
    overall improvement interval straddles 1)."""
    sampling = StratifiedSampling(st.AdaptiveConfig(target_rel=0.3, pilot=4, max_injections=1_000, min_round=32))
    summary, rows = run_campaign(tmp_path / "s", sampling)
    last = rows.layer.iloc[-1]
    intervals = improvement_intervals(tmp_path / "s", tmp_path / "s", last, [(last, 1)])
    low, high = intervals["overall"]
    assert low < 1 < high
    assert intervals["text_network"] == pytest.approx((summary["network"]["ci_low"], summary["network"]["ci_high"]))


def test_layers_without_an_estimate_are_left_out() -> None:
    parts = LayerSet({"a": Moments(2.0, 0.01, 0.0), "b": Moments(math.nan, math.nan, math.nan), "c": Moments(4.0, 0.01, 0.0)})
    ci = network_interval(parts)
    assert ci["ci_low"] < 3.0 < ci["ci_high"]
    assert math.isnan(network_interval(LayerSet({"a": Moments(math.nan, math.nan, math.nan)}))["ci_low"])
