"""report.py compare: the Table 1 row from two campaign folders (hand-made numbers), the per-layer
alignment and plot, and one-line errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

import report as report_cli
from resilience.report import ReportError, aligned_layers, compare, weighted_delta_loss

COLUMNS = ["layer", "order", "kind", "out_shape", "neurons", "n", "non_finite", "mean_delta_loss", "std_delta_loss",
           "ci_low", "ci_high", "mismatches", "mismatch_rate", "mismatch_ci_low", "mismatch_ci_high"]


def write_campaign(folder: Path, layers: list[tuple[str, int, float]], *, last: list[str], accuracy: float,
                   top2: float, fused: bool = False, dataset: str = "fashion-mnist") -> Path:
    """A minimal finished campaign: layers.csv rows (name, neurons, ΔLoss) and summary.json."""
    folder.mkdir(parents=True)
    with open(folder / "layers.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for i, (name, neurons, dl) in enumerate(layers):
            writer.writerow([name, i, "linear", str(neurons), neurons, 8, 0, dl, 0.1, dl - 0.1, dl + 0.1, 1, 0.125, 0.0, 0.5])
    net = sum(dl for _, _, dl in layers) / len(layers)
    summary = {"network": {"delta_loss": net}, "model": "resnet20", "dataset": dataset, "split": "test",
               "format": "fp32", "clamp": "none", "last_layers": last, "fused_text_head": fused,
               "golden": {"accuracy": accuracy, "mean_top2diff": top2}, "n_per_layer": {n: 8 for n, _, _ in layers}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture()
def campaigns(tmp_path: Path) -> tuple[Path, Path, Path]:
    base = write_campaign(tmp_path / "base", [("conv1", 100, 2.0), ("layer1.0.conv1", 100, 4.0), ("linear", 10, 6.0)],
                          last=["linear"], accuracy=0.90, top2=80.0)
    text = write_campaign(tmp_path / "text", [("backbone.conv1", 100, 1.0), ("backbone.layer1.0.conv1", 100, 2.0),
                                              ("backbone.linear", 30, 1.0), ("head", 10, 3.0)],
                          last=["backbone.linear", "head"], accuracy=0.91, top2=85.5)
    fused = write_campaign(tmp_path / "fused", [("conv1", 100, 1.0), ("layer1.0.conv1", 100, 2.0), ("linear", 10, 1.5)],
                           last=["linear"], accuracy=0.91, top2=85.5, fused=True)
    return base, text, fused


def test_table1_row(campaigns: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, text, fused = campaigns
    row = compare(base, text, tmp_path / "out", fused)
    assert row["text_last_layer_delta_loss"] == pytest.approx((30 * 1.0 + 10 * 3.0) / 40)
    assert row["last_layer_improvement"] == pytest.approx(6.0 / 1.5)
    assert row["fused_last_layer_improvement"] == pytest.approx(6.0 / 1.5)
    assert row["overall_improvement"] == pytest.approx(4.0 / 1.75)
    assert row["top2diff_difference"] == pytest.approx(5.5)
    assert (row["baseline_accuracy"], row["text_accuracy"]) == (0.90, 0.91)
    for name in ("table1.csv", "table1.md", "layers_compared.csv", "delta_loss_per_layer.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    md = (tmp_path / "out" / "table1.md").read_text()
    assert "| resnet20 | fashion-mnist | 90.00 | 91.00 | 4 | 4 | 2.29 |" in md
    with open(tmp_path / "out" / "table1.csv") as f:
        assert float(next(csv.DictReader(f))["overall_improvement"]) == pytest.approx(4.0 / 1.75)


def test_without_fused_campaign(campaigns: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, text, _ = campaigns
    row = compare(base, text, tmp_path / "out")
    assert math.isnan(row["fused_last_layer_improvement"])
    assert "n/a" in (tmp_path / "out" / "table1.md").read_text()


def test_layer_alignment(campaigns: tuple[Path, Path, Path]) -> None:
    from resilience.report import CampaignResult

    base, text, _ = campaigns
    aligned = aligned_layers(CampaignResult.load(base), CampaignResult.load(text))
    assert [(label, b is not None, t is not None) for label, b, t in aligned] == [
        ("conv1", True, True), ("layer1.0.conv1", True, True), ("linear", True, True), ("head", False, True)]
    assert weighted_delta_loss([{"neurons": 1, "mean_delta_loss": 1.0}, {"neurons": 3, "mean_delta_loss": 5.0}]) == 4.0


def test_errors(campaigns: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, text, fused = campaigns
    other = write_campaign(tmp_path / "other", [("head", 10, 1.0), ("x", 1, 1.0)], last=["x", "head"],
                           accuracy=0.5, top2=1.0, dataset="cifar10")
    with pytest.raises(ReportError, match="differ in dataset"):
        compare(base, other, tmp_path / "o")
    with pytest.raises(ReportError, match="not a text-guided campaign"):
        compare(base, fused, tmp_path / "o")
    with pytest.raises(ReportError, match="not run with --fuse-text-head"):
        compare(base, text, tmp_path / "o", base)
    assert report_cli.main(["compare", str(tmp_path / "missing"), str(text), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_collect_gathers_rows_of_several_models(campaigns: tuple[Path, Path, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    base, text, fused = campaigns
    first = compare(base, text, tmp_path / "a", fused)
    second = compare(base, text, tmp_path / "b")
    argv = ["collect", str(tmp_path / "a" / "table1.csv"), str(tmp_path / "b" / "table1.csv"), "--out", str(tmp_path / "all")]
    assert report_cli.main(argv) == 0
    md = (tmp_path / "all" / "table1.md").read_text().splitlines()
    assert len(md) == 4 and md[2].startswith("| resnet20 | fashion-mnist | 90.00 | 91.00 | 4 | 4 |")
    assert "| n/a |" in md[3]  # the second row had no fused campaign
    with open(tmp_path / "all" / "table1.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["overall_improvement"]) for r in rows] == [first["overall_improvement"], second["overall_improvement"]]
    assert "Last layer ×" in capsys.readouterr().out
    assert report_cli.main(["collect", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "x")]) == 2


def write_fault_records(folder: Path, samples: dict[str, list[float]]) -> None:
    """faults.parquet with the given per-layer ΔLoss values (NaN = a non-finite fault)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = [name for name, values in samples.items() for _ in values]
    values = [v for vs in samples.values() for v in vs]
    finite = [math.isfinite(v) for v in values]
    pq.write_table(pa.table({"layer": names, "delta_loss": [v if math.isfinite(v) else math.inf for v in values],
                             "finite": finite}), folder / "faults.parquet")


def test_skew_corrected_intervals_of_the_improvement(campaigns: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import numpy as np

    from resilience.improvement_ci import improvement_intervals

    base, text, _ = campaigns
    rng = np.random.default_rng(1)
    # Baseline ΔLoss four times the text model's in every layer; the head also has non-finite faults.
    base_samples = {name: list(4 * rng.exponential(1.0, 400)) for name in ("conv1", "layer1.0.conv1", "linear")}
    text_samples = {f"backbone.{name}": list(rng.exponential(1.0, 400)) for name in ("conv1", "layer1.0.conv1", "linear")}
    text_samples["head"] = [*rng.exponential(1.0, 380), *[math.nan] * 20]
    write_fault_records(base, base_samples)
    write_fault_records(text, text_samples)
    row = compare(base, text, tmp_path / "out")
    for key in ("last_layer", "overall"):
        low, high = row[f"{key}_improvement_ci_low"], row[f"{key}_improvement_ci_high"]
        assert 2.5 < low < 4.0 < high < 6.5  # covers the true ratio, and is not absurdly wide
    # exponential ΔLoss is right-skewed: the intervals reach further above the estimate than below it
    assert row["baseline_delta_loss_ci_low"] < 4.0 < row["baseline_delta_loss_ci_high"]
    assert row["text_delta_loss_ci_low"] < 1.0 < row["text_delta_loss_ci_high"]
    assert "99% intervals (skewness-corrected" in (tmp_path / "out" / "table1.md").read_text()
    with open(tmp_path / "out" / "layers_compared.csv") as f:
        layers = {r["layer"]: r for r in csv.DictReader(f)}
    for label in ("conv1", "linear"):  # around the records' means (layers.csv holds hand-made values here)
        for side, records in (("baseline", base_samples[label]), ("text", text_samples[f"backbone.{label}"])):
            low, high = float(layers[label][f"{side}_ci_low"]), float(layers[label][f"{side}_ci_high"])
            mean = float(np.mean(records))
            assert low < mean < high and high - mean > mean - low
    assert math.isnan(float(layers["head"]["baseline_ci_low"])) and float(layers["head"]["text_ci_low"]) > 0
    last = [("backbone.linear", 30), ("head", 10)]
    again = improvement_intervals(base, text, "linear", last)
    wider = improvement_intervals(base, text, "linear", last, confidence=0.999)
    assert wider["overall"][0] < again["overall"][0] and wider["overall"][1] > again["overall"][1]


def test_constant_faults_give_a_point_interval(campaigns: tuple[Path, Path, Path]) -> None:
    from resilience.improvement_ci import improvement_intervals

    base, text, _ = campaigns
    write_fault_records(base, {"conv1": [2.0] * 5, "layer1.0.conv1": [4.0] * 5, "linear": [6.0] * 5})
    write_fault_records(text, {"backbone.conv1": [1.0] * 5, "backbone.layer1.0.conv1": [2.0] * 5,
                               "backbone.linear": [1.0] * 5, "head": [3.0, 3.0, math.nan, 3.0]})
    got = improvement_intervals(base, text, "linear", [("backbone.linear", 30), ("head", 10)])
    assert got["last_layer"] == pytest.approx((4.0, 4.0))
    assert got["overall"] == pytest.approx((4.0 / 1.75, 4.0 / 1.75))
    with pytest.raises(ValueError, match="confidence"):
        improvement_intervals(base, text, "linear", [("head", 10)], confidence=1.0)


def test_no_interval_without_fault_records(campaigns: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, text, _ = campaigns
    row = compare(base, text, tmp_path / "out")
    assert math.isnan(row["overall_improvement_ci_low"]) and math.isnan(row["last_layer_improvement_ci_high"])
    assert "needs both campaigns' faults.parquet" in (tmp_path / "out" / "table1.md").read_text()
