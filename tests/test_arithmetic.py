"""Explicit arithmetic: TF32 rounding, strict fp32 set and restored, per-layer TF32 emulation (engines,
weight faults), AMP fault bits, non-finite outcomes, options recorded and mismatches refused."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from reference_assets import REFERENCE_DIR, load_script, require_fashion_mnist
from test_fast_engine import Images, assert_agree, compare, sites_for
from torch import nn

import models
from resilience import arithmetic
from resilience.arithmetic import Arithmetic, ArithmeticOptionError, round_tf32
from resilience.bitflip import FORMATS
from resilience.campaign import CampaignConfig, CampaignError, layer_sites, plan_layers
from resilience.engines import fast as fast_engine
from resilience.engines.fast import FastEngine
from resilience.engines.reference import ReferenceEngine
from resilience.golden import EvaluatedImages, Golden, TensorImageSource, golden_pass
from resilience.layers import discover_layers, select_layers
from resilience.metrics import score_faults
from resilience.runner import execute, merge
from resilience.weights.faults import WeightFault
from resilience.weights.runner import OutcomeCounter, run_weight_faults, weight_golden

pytestmark = pytest.mark.usefixtures("one_thread")
TF32 = Arithmetic(math="tf32")


def tf32_by_frexp(x: float) -> float:
    """Independent TF32 rounding of a normal float: 11 significant bits, Python's round() ties to even."""
    m, e = math.frexp(x)
    return math.ldexp(round(m * 2**11), e - 11)


def test_tf32_rounding_on_hand_built_values() -> None:
    ulp = 2.0**-10  # TF32's spacing in [1, 2)
    values = [1.0, 1 + ulp, 1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + 2.0**-20, -(1 + ulp / 2), 2 - ulp / 4,
              float("nan"), float("inf"), -float("inf"), 3.4028234663852886e38]
    expected = [1.0, 1 + ulp, 1.0, 1 + 2 * ulp, 1 + ulp, -1.0, 2.0, float("nan"), float("inf"), -float("inf"),
                float("inf")]
    got = round_tf32(torch.tensor(values, dtype=torch.float32)).tolist()
    assert [str(v) for v in got] == [str(v) for v in expected]


def test_tf32_rounding_matches_an_independent_implementation() -> None:
    x = torch.randn(2000, generator=torch.Generator().manual_seed(5)) * 10.0 ** torch.randint(-8, 8, (2000,)).float()
    rounded = round_tf32(x)
    assert (rounded.view(torch.int32) & 0x1FFF).eq(0).all()  # 13 low mantissa bits dropped
    assert rounded.tolist() == [tf32_by_frexp(v) for v in x.tolist()]
    assert torch.equal(round_tf32(rounded), rounded)


def test_strict_fp32_is_set_and_restored() -> None:
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(),
              torch.are_deterministic_algorithms_enabled())
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("medium")
    try:
        with pytest.raises(RuntimeError, match="inside"), arithmetic.applied(Arithmetic()):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            assert torch.get_float32_matmul_precision() == "highest"
            assert torch.are_deterministic_algorithms_enabled()
            raise RuntimeError("inside")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "medium"
        assert torch.are_deterministic_algorithms_enabled() == before[3]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before[:2]
        torch.set_float32_matmul_precision(before[2])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"math": "fp64"}, "unknown --math"),
    ({"tf32_layers": "conv"}, "need --math tf32"),
    ({"math": "tf32", "amp": "bf16"}, "exclude each other"),
    ({"math": "tf32", "tf32_layers": "("}, "not a valid regular expression"),
    ({"amp": "fp8"}, "unknown --amp"),
])
def test_bad_combinations(kwargs: dict, message: str) -> None:
    with pytest.raises(ArithmeticOptionError, match=message):
        Arithmetic(**kwargs)


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).eval()


def test_emulation_rounds_the_selected_layers_only() -> None:
    model, x = small_net(), torch.randn(3, 2, 6, 6)
    conv, linear = model[0], model[3]
    with torch.no_grad():
        plain = model(x)
        conv_tf32 = nn.functional.conv2d(round_tf32(x), round_tf32(conv.weight), conv.bias)
        expected = linear(model[2](model[1](conv_tf32)))
        with arithmetic.applied(Arithmetic(math="tf32", tf32_layers="^0$")):
            assert arithmetic.select_layers(model) == ["0"]
            got = model(x)
            copied = copy.deepcopy(model)(x)  # PyTorchFI injects into a deep copy
        assert torch.equal(got, expected) and torch.equal(copied, expected)
        assert not torch.equal(got, plain)
        assert torch.equal(model(x), plain)  # nothing left behind


def test_fast_engine_agrees_with_reference_under_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_engine, "MIN_WINDOW_SAVING", 0)  # windows on these tiny maps
    model = models.build_model("resnet20", 10, in_chans=1)
    with arithmetic.applied(Arithmetic(math="tf32", tf32_layers=r"^layer[23]\.")):
        assert len(arithmetic.select_layers(model)) == 12
        # Batch composition changes fp32 results in the last bits, and TF32 rounding of the next layer's
        # input turns such a difference into a jump of up to half a TF32 ulp (2^-11 relative): the
        # engines agree on every outcome, their values to TF32 precision.
        fast = compare(model, torch.randn(5, 1, 12, 12), n=10, rtol=5e-3,
                       layers=r"^(conv1|layer2\.0\.conv1|layer2\.1\.conv2|layer3\.2\.conv2|linear)$")
    assert fast.path("layer2.1.conv2") == "windowed" and fast.counts["layer2.1.conv2"]["window_ops"] > 0


def test_fast_engine_agrees_with_reference_under_amp() -> None:
    model = models.build_model("resnet20", 10, in_chans=1).eval()
    x = torch.randn(5, 1, 12, 12)
    fp32 = FORMATS["fp32"]
    with arithmetic.applied(Arithmetic(amp="bf16")):
        layers = select_layers(discover_layers(model, x[:1]), r"^(layer1\.0\.conv2|layer3\.2\.conv2|linear)$")
        reference, fast = (engine(model, layers, fp32, batch_size=8) for engine in (ReferenceEngine, FastEngine))
        for i, layer in enumerate(layers):
            sites = sites_for(layer, 10, len(x), 16, seed=i)  # bf16 layer outputs: 16 bits
            a, b = reference.run(layer, sites, Images(x)), fast.run(layer, sites, Images(x))
            assert_agree(model, x, a, b, sites)


def hand_built_linear() -> tuple[nn.Module, EvaluatedImages]:
    """Logits = x @ W.T; weight (0, 0) = 1.0, and logit 0 of every image lies in [0.5, 2) with every partial
    sum exact, so a change of 2^-23 in that weight reaches logit 0 whatever the summation order."""
    layer = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.5, -0.25, 2.0], [0.75, -1.0, 0.5, 0.125], [-0.5, 0.25, 1.0, -2.0]]))
    images = torch.tensor([[1.0, 0.0, 0.0, 0.25], [1.0, 0.5, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]).repeat(3, 1)
    return nn.Sequential(layer).eval(), EvaluatedImages.from_tensors(images, torch.zeros(len(images), dtype=torch.long))


@pytest.mark.parametrize("method", ["delta", "forward"])
def test_flip_removed_by_tf32_rounding_is_masked_only_under_tf32(method: str) -> None:
    # bit 0 of 1.0 is below TF32's 10-bit mantissa (rounds back to 1.0); bit 13 is its last kept bit
    faults = [WeightFault("0", (0, 0), 0), WeightFault("0", (0, 0), 13)]
    masked = {}
    for arith in (Arithmetic(), TF32):
        model, images = hand_built_linear()
        with arithmetic.applied(arith):
            arithmetic.select_layers(model)
            golden = weight_golden(model, images, FORMATS["fp32"])
            outcomes = run_weight_faults(model, faults, images, golden, method=method).outcomes
        masked[arith.math] = outcomes.masked.tolist()
    assert masked["tf32"] == [9, 0]
    assert masked["fp32"] == [0, 0]


def test_nonfinite_output_is_its_own_outcome_and_critical() -> None:
    golden = Golden(torch.arange(2), torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]]), torch.tensor([0, 1]))
    counter = OutcomeCounter(2, golden)
    faulty = torch.tensor([[float("nan")] * 3, [0.0, float("inf"), 1.0]])  # argmax of the NaN row is 0 = golden
    counter.add(torch.tensor([0, 1]), torch.tensor([0, 1]), faulty)
    out = counter.outcomes
    assert out.nonfinite.tolist() == [1, 1] and out.critical.tolist() == [1, 1]
    assert out.non_critical.tolist() == [0, 0] and out.masked.tolist() == [0, 0]
    assert np.isnan(out.delta_loss()).all()
    # neuron faults: the same output is non-finite with no prediction, even where its loss is finite
    scored = score_faults(torch.tensor([[0.0, -float("inf"), 1.0]]), torch.tensor([0]), torch.tensor([2]),
                          torch.tensor([1.0]))
    assert bool(torch.isfinite(scored.faulty_loss).all())
    assert scored.faulty_pred.tolist() == [-1] and scored.finite.tolist() == [False]


def test_amp_faults_hit_the_bits_of_the_autocast_dtype() -> None:
    cfg = CampaignConfig(model="m", dataset="d", arithmetic=Arithmetic(amp="fp16").describe())
    assert cfg.fault_format.bits == 16
    model = small_net()
    plans = plan_layers(cfg, discover_layers(model, torch.randn(1, 2, 6, 6)), 4)
    assert all(int(layer_sites(cfg, p, torch.arange(4)).bit.max()) < 16 for p in plans)
    with pytest.raises(CampaignError, match="--format fp32"):
        CampaignConfig(model="m", dataset="d", format="bf16", arithmetic=Arithmetic(amp="fp16").describe())


def run_campaign(out: Path, arith: Arithmetic, shard: tuple[int, int] = (0, 1)) -> None:
    model = small_net()
    x = torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(2))
    cfg = CampaignConfig(model="net", dataset="synthetic", injections=4, batch_size=2, chunk_size=2, golden="all",
                         arithmetic=arith.describe())
    with arithmetic.applied(arith):
        arithmetic.select_layers(model)
        with torch.no_grad():
            labels = model(x).argmax(1)
        golden = golden_pass(model, torch.arange(8), [(x, labels)], FORMATS["fp32"], "cpu")
        execute(out, cfg, model, discover_layers(model, x[:1]), golden, TensorImageSource(torch.arange(8), x),
                progress=False, log=lambda _m: None, shard=shard)


def test_arithmetic_is_recorded_and_mismatches_are_refused(tmp_path: Path) -> None:
    run_campaign(tmp_path / "a", TF32)
    record = json.loads((tmp_path / "a" / "campaign.json").read_text())
    assert record["config"]["arithmetic"] == TF32.describe()
    with pytest.raises(CampaignError, match="another arithmetic"):
        run_campaign(tmp_path / "a", Arithmetic())  # resume in another arithmetic
    run_campaign(tmp_path / "s0", TF32, shard=(0, 2))
    run_campaign(tmp_path / "s1", Arithmetic(), shard=(1, 2))
    with pytest.raises(CampaignError, match="different campaign"):
        merge([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")


def test_cli_reports_a_bad_combination_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import inject

    argv = ["neurons", "--checkpoint", str(tmp_path / "none.pth"), "--out", str(tmp_path / "x"), "--tf32-layers", "conv"]
    assert inject.main(argv) == 2
    err = capsys.readouterr().err
    assert err == "error: --tf32-layers and --tf32-impl need --math tf32\n"
    assert inject.main(["weights", "--fault-model", "weight-bitflip", "--fault-list", "x.csv", "--checkpoint", "y.th",
                        "--math", "tf32", "--amp", "fp16"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.skipif(not (REFERENCE_DIR / "cifar10-test-first932" / "cifar10_test_first932.npz").is_file()
                    or not (REFERENCE_DIR / "dnn-benchmarks" / "cifar10" / "ResNet20.th").is_file(),
                    reason="../shared/reference assets absent")
def test_dnn_benchmarks_layer3_low_bits_are_their_tf32_masked_set(tmp_path: Path) -> None:
    """A slice of the replay: layer3 faults in bits <= 12 on the 932 genuine images, layer3 in TF32. The faults
    they report masked on all 10,000 images are those masked on all 932 of ours, which include every fault
    whose flip TF32 rounding removes."""
    replay = load_script("replay_dnn_benchmarks")
    args = replay.get_args_parser().parse_args([
        "--reference", str(REFERENCE_DIR), "--layers", r"^layer3\.", "--max-bit", "12", "--every", "150",
        "--math", "tf32", "--tf32-layers", r"^layer3\.", "--out", str(tmp_path)])
    figures = replay.replay(args)
    table = pd.read_csv(tmp_path / "faults.csv")
    assert figures["images"] == 932 and figures["faults"] == len(table) >= 30
    ours = table["masked"] == table["n"]
    theirs = table["ref_masked"] == table["ref_n"]
    assert ours.equals(theirs) and 0 < ours.sum() < len(table)
    assert (ours | ~table["tf32_removes_flip"]).all() and table["tf32_removes_flip"].sum() > len(table) / 2
    assert figures["golden_accuracy"] == pytest.approx(0.912, abs=0.002)


@pytest.mark.skipif(not (REFERENCE_DIR / "dnn-benchmarks" / "cifar10" / "ResNet20.th").is_file(),
                    reason="../shared/reference assets absent")
def test_weight_run_records_its_arithmetic_and_refuses_another(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_fashion_mnist()
    from resilience.weights.cli import main as weights_main

    bench = REFERENCE_DIR / "dnn-benchmarks" / "cifar10"
    args = ["run", "--fault-list", str(bench / "ResNet20_FL.csv"), "--checkpoint", str(bench / "ResNet20.th"),
            "--model", "resnet20", "--dataset", "fashion-mnist", "--preset-from", "cifar10", "--limit-faults", "3",
            "--max-images", "16", "--out", str(tmp_path), "--no-progress", "-j", "0"]
    tf32 = ["--math", "tf32", "--tf32-layers", r"^layer3\."]
    assert weights_main([*args, *tf32]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["arithmetic"] == Arithmetic(math="tf32", tf32_layers=r"^layer3\.").describe()
    assert weights_main([*args, *tf32]) == 0 and "already complete" in capsys.readouterr().out
    assert weights_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "other arguments (arithmetic:" in err and err.count("\n") == 1
