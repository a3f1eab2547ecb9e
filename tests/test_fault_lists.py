"""dnn-benchmarks fault lists: parsing, round trip, row validation, generation, and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_assets import DNN_BENCHMARKS, require_fashion_mnist
from torch import nn

from resilience.weights.cli import main as weights_main
from resilience.weights.cli import wants_weight_faults
from resilience.weights.fault_list import (
    FaultList,
    FaultListError,
    format_index,
    generate_fault_list,
    layer_allocation,
    leveugle_sample_size,
    parse_index,
    read_fault_list,
    validate_fault_list,
    write_fault_list,
)
from resilience.weights.faults import WeightFault, fault_targets
from resilience.weights.report import fault_table, reference_comparison, summarize
from resilience.weights.runner import Outcomes

pytestmark = pytest.mark.usefixtures("one_thread")

needs_reference = pytest.mark.skipif(not (DNN_BENCHMARKS / "ResNet20_FL.csv").is_file(),
                                     reason=f"dnn-benchmarks assets absent ({DNN_BENCHMARKS})")
HEADER = "Injection,Layer,TensorIndex,Bit,n_injections,masked,non_critical,critical\n"


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn1(self.conv1(x))).mean((2, 3)))


def write(tmp_path: Path, body: str, header: str = HEADER) -> Path:
    path = tmp_path / "fl.csv"
    path.write_text(header + body)
    return path


def test_index_parsing() -> None:
    assert parse_index("(3, 0, 2, 1)") == (3, 0, 2, 1)
    assert parse_index(" (5,) ") == (5,)
    assert parse_index("(5)") == (5,)
    assert format_index((3, 0, 2, 1)) == "(3, 0, 2, 1)"
    assert format_index((5,)) == "(5,)"
    for bad in ("3, 0", "(a, 1)", "(-1, 2)", "()", "[1, 2]"):
        with pytest.raises(ValueError, match="TensorIndex"):
            parse_index(bad)


def test_round_trip_is_byte_identical(tmp_path: Path) -> None:
    body = '0,conv1,"(3, 0, 2, 1)",15,10000,14,9985,1\n1,fc,"(2, 3)",31,10000,0,9000,1000\n2,conv1.bias,"(1,)",0,10,10,0,0\n'
    src = write(tmp_path, body)
    fault_list = read_fault_list(src)
    assert fault_list.faults[0] == WeightFault("conv1", (3, 0, 2, 1), 15)
    assert fault_list.counts.tolist()[1] == [10000, 0, 9000, 1000]
    dst = tmp_path / "out.csv"
    write_fault_list(dst, fault_list)
    assert dst.read_bytes() == src.read_bytes()
    bare = tmp_path / "bare.csv"  # an unrun list keeps dnn-benchmarks' generator's four columns
    write_fault_list(bare, FaultList(fault_list.faults, fault_list.injections))
    assert bare.read_text().splitlines()[:2] == ["Injection,Layer,TensorIndex,Bit", '0,conv1,"(3, 0, 2, 1)",15']
    assert read_fault_list(bare).counts is None
    counts = np.array([[10, 4, 5, 1], [8, 8, 0, 0], [3, 0, 1, 2]])
    write_fault_list(dst, fault_list, counts)
    assert read_fault_list(dst).counts.tolist() == counts.tolist()


@needs_reference
def test_dnn_benchmarks_list_round_trip(tmp_path: Path) -> None:
    src = DNN_BENCHMARKS / "ResNet20_FL.csv"
    fault_list = read_fault_list(src)
    assert len(fault_list) == 16627 and fault_list.counts.shape == (16627, 4)
    dst = tmp_path / "copy.csv"
    write_fault_list(dst, fault_list)
    assert dst.read_bytes() == src.read_bytes()


@pytest.mark.parametrize(("row", "message"), [
    ('0,conv9,"(0, 0, 0, 0)",1,,,,\n', r"line 2 \(Injection 0\): 'conv9' names neither"),
    ('0,conv1,"(4, 0, 0, 0)",1,,,,\n', r"line 2 .*out of range for conv1 of shape \(4, 3, 3, 3\)"),
    ('0,conv1,"(0, 0, 0)",1,,,,\n', r"line 2 .*out of range"),
    ('0,fc,"(0, 0)",32,,,,\n', r"line 2 .*Bit 32 is outside \[0, 31\]"),
    ('0,conv1.bias,"(0,)",3,,,,\n', r"line 2 .*conv1.bias is a bias \(pass --include-bias\)"),
    ('0,bn1.weight,"(0,)",3,,,,\n', r"line 2 .*bn1.weight is a normalisation parameter \(pass --include-bn\)"),
    ('0,bn1.running_mean,"(0,)",3,,,,\n', r"line 2 .*names neither"),
])
def test_validation_names_the_bad_row(tmp_path: Path, row: str, message: str) -> None:
    fault_list = read_fault_list(write(tmp_path, row))
    with pytest.raises(FaultListError, match=message):
        validate_fault_list(Small(), fault_list)


def test_include_flags_admit_bias_and_bn(tmp_path: Path) -> None:
    fault_list = read_fault_list(write(tmp_path, '0,conv1.bias,"(0,)",3,,,,\n1,bn1,"(1,)",30,,,,\n2,fc,"(2, 3)",0,,,,\n'))
    validate_fault_list(Small(), fault_list, include_bias=True, include_bn=True)


@pytest.mark.parametrize(("body", "message"), [
    ('0,conv1,"(0, 0, 0, 0)",1,,,,\n1,conv1,"(1, 2, 3)",x,,,,\n', r"line 3: invalid literal"),
    ('0,conv1,"(0, 0, a, 0)",1,,,,\n', r"line 2: TensorIndex"),
    ('0,conv1,"(0, 0, 0, 0)",1\n', r"line 2: 4 fields, header has 8"),
    ('0,conv1,"(0, 0, 0, 0)",1,10,5,5,1\n', r"line 2: counts \[5, 5, 1\] must .* sum to n_injections 10"),
    ('0,conv1,"(0, 0, 0, 0)",1,,,,\n0,fc,"(0, 0)",1,,,,\n', r"line 3 \(Injection 0\): Injection id repeats .*line 2"),
    ('0,fc,"(0, 0)",1,,,,\n1,fc,"(0, 0)",1,,,,\n', r"line 3 \(Injection 1\): same site as .*line 2"),
    ('0,,"(0, 0)",1,,,,\n', r"line 2: empty Layer"),
])
def test_malformed_rows(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(FaultListError, match=message):
        read_fault_list(write(tmp_path, body))


def test_bad_header(tmp_path: Path) -> None:
    with pytest.raises(FaultListError, match="header lacks TensorIndex"):
        read_fault_list(write(tmp_path, "0,conv1,1\n", header="Injection,Layer,Bit\n"))


def test_leveugle_formula() -> None:
    # ResNet20: 268,336 conv/linear weights x 32 bits; e = 1%, t = 2.58 (99%), p = 0.5
    assert leveugle_sample_size(268336 * 32) == pytest.approx(16608.81, abs=0.01)
    assert leveugle_sample_size(10**15) == pytest.approx(2.58**2 * 0.25 / 0.01**2, rel=1e-6)  # infinite population
    assert leveugle_sample_size(100, e=0.05) < 100


def test_generation_is_seeded_proportional_and_valid(tmp_path: Path) -> None:
    models = pytest.importorskip("models")
    model = models.build_model("resnet20", 10)
    fault_list = generate_fault_list(model, seed=7, e=0.05)
    assert generate_fault_list(model, seed=7, e=0.05).faults == fault_list.faults
    assert generate_fault_list(model, seed=8, e=0.05).faults != fault_list.faults
    assert len(set(fault_list.faults)) == len(fault_list)
    validate_fault_list(model, fault_list)
    targets = fault_targets(model)
    n, per_layer = layer_allocation(targets, 0.05, 2.58, 0.5)
    total = sum(t.numel for t in targets)
    assert per_layer == [math.ceil(n * t.numel / total) for t in targets]
    layers = [f.layer for f in fault_list.faults]
    assert [layers.count(t.layer) for t in targets] == per_layer
    path = tmp_path / "gen.csv"
    write_fault_list(path, fault_list)
    assert read_fault_list(path).faults == fault_list.faults
    with_bias = generate_fault_list(Small(), seed=0, e=0.2, include_bias=True, include_bn=True)
    assert {"conv1.bias", "bn1.weight", "bn1.bias", "fc.bias"} <= {f.layer for f in with_bias.faults}


@needs_reference
def test_allocation_matches_dnn_benchmarks_lists() -> None:
    """Their per-layer counts are within 3 of ceil(n x share) for ResNet20/32/44."""
    models = pytest.importorskip("models")
    for depth in (20, 32, 44):
        fault_list = read_fault_list(DNN_BENCHMARKS / f"ResNet{depth}_FL.csv")
        targets = fault_targets(models.build_model(f"resnet{depth}", 10))
        _, ours = layer_allocation(targets, 0.01, 2.58, 0.5)
        layers = [f.layer for f in fault_list.faults]
        theirs = [layers.count(t.layer) for t in targets]
        assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) <= 3


def test_wants_weight_faults() -> None:
    assert wants_weight_faults(["--fault-model", "weight-stuck1", "--out", "x"])
    assert wants_weight_faults(["--fault-model=weight-bitflip"])
    assert not wants_weight_faults(["--fault-model", "neuron-bitflip"])
    assert not wants_weight_faults(["--out", "weight-bitflip"])


def test_cli_generate(tmp_path: Path, capsys) -> None:
    pytest.importorskip("models")
    out = tmp_path / "fl.csv"
    assert weights_main(["generate", "--model", "resnet20", "--num-classes", "10", "--e", "0.1", "--out", str(out)]) == 0
    fault_list = read_fault_list(out)
    assert len(fault_list) > 0 and fault_list.counts is None
    assert "Leveugle n" in capsys.readouterr().out


def test_cli_reports_bad_row_in_one_line(tmp_path: Path, capsys) -> None:
    pytest.importorskip("models")
    checkpoint = tmp_path / "ck.th"
    models = pytest.importorskip("models")
    model = models.build_model("resnet20", 10)
    torch.save({"best_prec1": 0.0, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    bad = write(tmp_path, '0,layer1.0.conv1,"(16, 0, 0, 0)",3,,,,\n')
    code = weights_main(["run", "--fault-list", str(bad), "--checkpoint", str(checkpoint), "--model", "resnet20",
                         "--dataset", "cifar10", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: ") and "line 2 (Injection 0)" in err and "out of range" in err


@needs_reference
def test_cli_runs_dnn_benchmarks_rows_on_fashion_mnist(tmp_path: Path, capsys) -> None:
    require_fashion_mnist()
    out = tmp_path / "run"
    args = ["run", "--fault-model", "weight-bitflip", "--fault-list", str(DNN_BENCHMARKS / "ResNet20_FL.csv"),
            "--checkpoint", str(DNN_BENCHMARKS / "ResNet20.th"), "--model", "resnet20", "--dataset", "fashion-mnist",
            "--preset-from", "cifar10", "--limit-faults", "6", "--max-images", "16", "--out", str(out),
            "--no-progress", "-j", "0"]
    assert weights_main(args) == 0
    assert "critical rate by bit" in capsys.readouterr().out
    filled = read_fault_list(out / "fault_list.csv")
    assert (out / "fault_list.csv").read_text().startswith(HEADER)
    assert len(filled) == 6 and (filled.counts[:, 0] == 16).all()
    assert (filled.counts[:, 1:].sum(1) == 16).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 16 and summary["config"]["preset"]["resize_size"] == [32, 32]
    assert summary["reference_comparison"]["comparable"] is False  # 16 images here, 10,000 in their counts
    assert set(summary["critical_rate_by_bit"]) == {str(f.bit) for f in filled.faults}
    for name in ("faults.csv", "summary_by_layer.csv", "summary_by_bit.csv", "summary.md", "critical_by_bit.png"):
        assert (out / name).is_file()
    assert weights_main(args) == 0  # same arguments: already complete, nothing recomputed
    assert "already complete" in capsys.readouterr().out


def test_summaries_and_reference_comparison() -> None:
    faults = [WeightFault("conv1", (0, 0, 0, 0), 30), WeightFault("conv1", (1, 0, 0, 0), 2),
              WeightFault("fc", (0, 0), 30)]
    fault_list = FaultList(faults, [0, 1, 2], np.array([[10, 0, 4, 6], [10, 9, 1, 0], [10, 0, 10, 0]]))
    outcomes = Outcomes.zeros(3)
    outcomes.n[:] = 10
    outcomes.masked[:] = [0, 9, 1]
    outcomes.non_critical[:] = [4, 1, 9]
    outcomes.critical[:] = [6, 0, 0]
    outcomes.delta_loss_sum[:] = [5.0, 0.1, 1.0]
    table = fault_table(fault_list, outcomes, fault_model="weight-bitflip", golden_value=np.zeros(3),
                        faulty_value=np.ones(3))
    by_bit = summarize(table, "Bit")
    assert by_bit["Bit"].tolist() == [2, 30]
    assert by_bit["critical_rate"].tolist() == [0.0, 6 / 20]
    assert by_bit["ref_critical_rate"].tolist() == [0.0, 6 / 20]
    by_layer = summarize(table, "Layer")
    assert by_layer["Layer"].tolist() == ["conv1", "fc"] and by_layer["faults"].tolist() == [2, 1]
    assert by_layer["delta_loss_mean"].tolist() == pytest.approx([(0.5 + 0.01) / 2, 0.1])
    comparison = reference_comparison(table)
    assert comparison["comparable"] and comparison["faults_with_identical_counts"] == 2
    assert comparison["masked_mean_abs_difference"] == pytest.approx(1 / 3)
