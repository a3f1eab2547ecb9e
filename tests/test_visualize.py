"""visualize.py and analysis.cam*: Ablation-CAM before/after faults on tiny random-weight resnet20 pairs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import data
import models
import visualize
from analysis.cam import FAMILY_LAYERS, CamLayer, ablation_cams, cam_cosine, resolve_cam_layer
from analysis.cam_compare import CSV_COLUMNS, CamModel, InputImage, compare_cams, csv_rows, summarize
from analysis.cam_figure import grid_size_px, render_grid
from analysis.faults_for_cam import (
    FaultSpecError,
    ModelFaults,
    NeuronFault,
    RandomFlips,
    SingleWeightFault,
    backbone_prefix,
    fault_list_row,
    injected,
    pair_faults,
    split_targets,
)
from resilience.weights.fault_list import FaultList, read_fault_list, write_fault_list
from resilience.weights.faults import WeightFault
from text_features import load_text_features

FEATURES = Path(__file__).resolve().parents[1] / "text_features" / "assets" / "fashion-mnist_minilm.pth"
PRESET = data.eval_preset("fashion-mnist", "resnet20")
ZERO_LAYER = "layer1.0.conv1"  # the tests zero one weight of it: a flip of its sign bit is masked
ZERO_INDEX = (0, 0, 0, 0)
NAN_INDEX = (1, 0, 0, 0)  # holds 1.5 (exponent 127): flipping bit 30 sets every exponent bit -> NaN


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny inputs: one thread avoids OpenMP hand-off costs on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_pair() -> tuple[nn.Module, nn.Module]:
    """Random-weight resnet20 baseline and text model (MiniLM Fashion-MNIST features), one weight zeroed."""
    torch.manual_seed(0)
    feats, _ = load_text_features(FEATURES)
    baseline = models.build_model("resnet20", 10, in_chans=1)
    text = models.build_model("resnet20", 10, head="text", embed_dim=feats.shape[1], text_features=feats, in_chans=1)
    for model in (baseline, text):
        with torch.no_grad():
            weight = model.get_submodule(backbone_prefix(model) + ZERO_LAYER).weight
            weight[ZERO_INDEX], weight[NAN_INDEX] = 0.0, 1.5
    return baseline.eval(), text.eval()


@pytest.fixture(scope="module")
def fm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not data.sources.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("needs Fashion-MNIST: apt-get install dataset-fashion-mnist")
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module]:
    return tiny_pair()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, pair) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cam")
    paths = {}
    for key, model in zip(("baseline", "text"), pair, strict=True):
        head = "text" if key == "text" else "linear"
        meta = {"model": "resnet20", "num_classes": 10, "head": head, "in_chans": 1, "small_input": False,
                "embed_dim": model.head.in_features if head == "text" else None, "dataset": "fashion-mnist",
                "preset": PRESET}
        paths[key] = models.save_checkpoint(root / f"{key}.pth", model, meta)
    rng = np.random.default_rng(0)
    for i in range(2):  # a bright blob on a dark background, somewhere else in each image
        img = np.zeros((28, 28), np.uint8)
        img[4 + 8 * i: 16 + 8 * i, 6:20] = 200
        img += rng.integers(0, 30, img.shape, dtype=np.uint8)
        Image.fromarray(img).save(root / f"img{i}.png")
        paths[f"img{i}"] = root / f"img{i}.png"
    return paths


def images(n: int = 2) -> list[InputImage]:
    gen = torch.Generator().manual_seed(1)
    return [InputImage(torch.randn(1, 28, 28, generator=gen), np.zeros((28, 28, 3), np.float32), f"random[{i}]")
            for i in range(n)]


def cam_models(pair, faults: tuple[ModelFaults, ModelFaults]) -> list[CamModel]:
    example = images(1)[0].tensor[None]
    return [CamModel(key, m, resolve_cam_layer(m, "resnet20", example), f)
            for key, m, f in zip(("baseline", "text"), pair, faults, strict=True)]


def bits_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as raw integers, so NaN and -0.0 compare bit for bit."""
    return {k: v.detach().clone().view(torch.int32) if v.dtype == torch.float32 else v.clone()
            for k, v in model.state_dict().items()}


def run_cli(*argv: str | Path) -> int:
    return visualize.cli([str(a) for a in argv])


def test_every_family_has_a_cam_layer() -> None:
    families = {models.get_model_spec(name).family for name in models.list_models()}
    assert families <= FAMILY_LAYERS.keys()


def test_cam_layer_of_both_heads(pair) -> None:
    example = images(1)[0].tensor[None]
    baseline, text = pair
    assert resolve_cam_layer(baseline, "resnet20", example) == CamLayer("layer3", "nchw")
    assert resolve_cam_layer(text, "resnet20", example) == CamLayer("backbone.layer3", "nchw")
    assert resolve_cam_layer(text, "resnet20", example, "layer2.2").name == "backbone.layer2.2"


def test_channels_last_layer_uses_the_vit_ablation() -> None:
    class ChannelsLast(nn.Module):
        """conv -> [B, H, W, C] norm (Swin's layout) -> pool -> linear."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 6, 3, padding=1)
            self.norm = nn.LayerNorm(6)
            self.fc = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.norm(self.conv(x).permute(0, 2, 3, 1))
            return self.fc(y.mean(dim=(1, 2)))

    torch.manual_seed(0)
    model = ChannelsLast().eval()
    x = torch.randn(2, 1, 8, 8)
    cams = ablation_cams(model, CamLayer("norm", "nhwc"), x, [0, 2], batch_size=4)
    assert cams.shape == (2, 8, 8) and np.isfinite(cams).all() and cams.max() > 0


def test_cam_cosine() -> None:
    a = np.array([[1.0, 0.0], [0.5, 0.25]], np.float32)
    assert cam_cosine(a, a.copy()) == 1.0
    assert cam_cosine(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    assert cam_cosine(a, np.zeros((2, 2))) == 0.0
    assert cam_cosine(np.eye(2), np.fliplr(np.eye(2))) == 0.0
    assert math.isnan(cam_cosine(a, np.full((2, 2), np.nan)))
    assert cam_cosine(a, 2 * a) == pytest.approx(1.0)


def test_same_seed_gives_the_same_faults(pair) -> None:
    baseline, text = pair
    spec = RandomFlips(300, seed=3)
    first, again = pair_faults(baseline, text, spec, None), pair_faults(baseline, text, spec, None)
    assert first == again
    assert pair_faults(baseline, text, RandomFlips(300, seed=4), None)[0] != first[0]

    base, txt = first
    shared, base_own, text_own = split_targets(baseline, text)
    assert [t.layer for t in base_own] == ["linear"] and [t.layer for t in text_own] == ["backbone.linear", "head"]
    assert base.count == 300 and base.shared == txt.shared
    # the shared faults are the same sites under the text model's names
    assert [WeightFault("backbone." + f.layer, f.index, f.bit) for f in base.weights[:base.shared]] == \
        list(txt.weights[:txt.shared])
    # density rule: the text head gets flips in proportion to its size
    sites = {name: sum(t.numel for t in targets) for name, targets in
             (("shared", shared), ("base", base_own), ("text", text_own))}
    assert txt.own == round(300 * sites["text"] / (sites["shared"] + sites["base"]))
    counted = pair_faults(baseline, text, RandomFlips(300, seed=3, head_rule="count"), None)[1]
    assert counted.own == base.own and counted.weights[:counted.shared] == txt.weights[:txt.shared]
    # restricted bits
    low = pair_faults(baseline, text, RandomFlips(300, seed=3, bits=(0, 1, 2)), None)
    assert {f.bit for m in low for f in m.weights} <= {0, 1, 2}


def test_fault_list_row(pair, tmp_path: Path) -> None:
    rows = [WeightFault("conv1", (3, 0, 2, 1), 15), WeightFault("linear", (2, 7), 30)]
    path = tmp_path / "FL.csv"
    write_fault_list(path, FaultList(rows, [10, 11]))
    spec = fault_list_row(path, 10)
    assert spec == SingleWeightFault(rows[0], f"{path} line 2 (Injection 10)")
    assert pair_faults(*pair, spec, None)[1].weights == (WeightFault("backbone.conv1", (3, 0, 2, 1), 15),)
    with pytest.raises(FaultSpecError, match=r"line 3 \(Injection 11\): 'linear' is not a conv/linear weight"):
        pair_faults(*pair, fault_list_row(path, 11), None)
    with pytest.raises(FaultSpecError, match=r"no row with Injection 12 \(ids: 10\.\.11\)"):
        fault_list_row(path, 12)


def test_faults_are_removed_and_zero_faults_give_cosine_one(pair) -> None:
    before = [bits_of(m) for m in pair]
    example = images(1)[0].tensor[None]
    faulty = pair_faults(*pair, RandomFlips(400, seed=0), example)
    neuron = pair_faults(*pair, NeuronFault("layer2.0.conv1", 17, 30), example)
    results = compare_cams(cam_models(pair, faulty), images(), batch_size=16, progress=False)
    compare_cams(cam_models(pair, neuron), images(1), batch_size=16, progress=False)
    for model, saved in zip(pair, before, strict=True):
        after = bits_of(model)
        assert all(torch.equal(saved[k], after[k]) for k in saved)
        assert not any(m._forward_hooks for m in model.modules())
    assert {r.panels[k, "clean"].cam.shape for r in results for k in ("baseline", "text")} == {(28, 28)}

    clean = compare_cams(cam_models(pair, (ModelFaults(), ModelFaults())), images(1), batch_size=16, progress=False)
    summary = summarize(clean, ("baseline", "text"))
    assert all(s["mean_cam_cosine"] == 1.0 and s["flipped"] == 0 for s in summary.values())
    # and the CAM of an unfaulted run equals the clean one computed beside the faulty runs
    assert np.array_equal(clean[0].panels["text", "faulty"].cam, results[0].panels["text", "clean"].cam)


def test_masked_fault_gives_cosine_one(pair) -> None:
    # the weight is +0.0: flipping its sign bit makes -0.0, and x * -0.0 adds nothing to any sum
    spec = SingleWeightFault(WeightFault(ZERO_LAYER, ZERO_INDEX, 31))
    faults = pair_faults(*pair, spec, None)
    results = compare_cams(cam_models(pair, faults), images(1), batch_size=16, progress=False)
    assert [results[0].cosine(k) for k in ("baseline", "text")] == [1.0, 1.0]
    with injected(pair[1], faults[1]):
        assert str(pair[1].backbone.get_submodule(ZERO_LAYER).weight[ZERO_INDEX].item()) == "-0.0"


def test_nan_logits_have_no_class(pair, tmp_path: Path) -> None:
    faults = pair_faults(*pair, SingleWeightFault(WeightFault(ZERO_LAYER, NAN_INDEX, 30)), None)
    results = compare_cams(cam_models(pair, faults), images(1), batch_size=16, progress=False)
    names = data.get_class_names("fashion-mnist")
    rows = csv_rows(results, ("baseline", "text"), names)
    assert [(r["faulty_class"], r["flipped"], r["faulty_finite"]) for r in rows] == [("none (NaN)", True, False)] * 2
    assert all(math.isnan(r["cam_cosine"]) and math.isnan(r["faulty_confidence"]) for r in rows)
    assert summarize(results, ("baseline", "text"))["text"]["non_finite"] == 1
    render_grid(results, ("baseline", "text"), ("baseline", "text-guided"), names, tmp_path / "nan.png")
    with Image.open(tmp_path / "nan.png") as png:
        assert png.size == grid_size_px(rows=1, columns=5)


def test_cli_grid_csv_json_and_fault_lists(checkpoints, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    code = run_cli("--baseline", checkpoints["baseline"], "--text", checkpoints["text"], "--images",
                   checkpoints["img0"], checkpoints["img1"], "--flips", "40", "--seed", "1", "--cam-batch-size", "16",
                   "--no-progress", "--out", out)
    assert code == 0
    with Image.open(out) as png:
        assert png.size == grid_size_px(rows=2, columns=5)
    with out.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [(r["image"], r["model"]) for r in rows] == [("0", "baseline"), ("0", "text"), ("1", "baseline"), ("1", "text")]
    assert all(r["source"] == str(checkpoints[f"img{r['image']}"]) and r["label"] == "" for r in rows)
    summary = json.loads(out.with_suffix(".json").read_text())
    base, text = summary["models"]["baseline"], summary["models"]["text"]
    assert base["faults"]["total"] == 40 and base["faults"]["shared"] == text["faults"]["shared"]
    assert (base["cam_layer"], text["cam_layer"]) == ("layer3", "backbone.layer3")
    listed = read_fault_list(tmp_path / "grid_faults_text.csv")
    assert len(listed) == text["faults"]["total"] and listed.faults[-1].layer in ("backbone.linear", "head")


def test_cli_dataset_indices_and_single_fault(checkpoints, fm_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "one.png"
    common = ["--baseline", checkpoints["baseline"], "--text", checkpoints["text"], "--data-path", fm_root,
              "--cam-batch-size", "16", "--no-progress"]
    assert run_cli(*common, "--indices", "0", "--weight-fault", "layer3.0.conv1", "5,3,1,1", "30", "--out", out) == 0
    with out.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["source"] for r in rows] == ["fashion-mnist test[0]"] * 2 and rows[0]["label"] == "Ankle boot"
    assert [f.layer for f in read_fault_list(tmp_path / "one_faults_text.csv").faults] == ["backbone.layer3.0.conv1"]


@pytest.mark.parametrize(("args", "message"), [
    (["--baseline", "missing.pth"], "checkpoint not found"),
    (["--target-layer", "layer9"], "has no layer 'layer9'"),
    (["--weight-fault", "linear", "(0, 0)", "3"], "not a conv/linear weight both models share"),
    (["--weight-fault", "conv1", "(0, 0, 0, 7)", "3"], "out of range"),
    (["--neuron-fault", "layer1.0.conv1", "99999", "3"], "outside 0..12543"),
    (["--swap"], "needs a linear head"),
    (["--images", "nowhere.png"], "image file not found"),
    (["--out", "grid.jpg"], "must name a .png"),
    (["--injection", "3"], "--injection selects a row of --fault-list"),
])
def test_bad_input_is_one_error_line(checkpoints, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    options = {"--baseline": [checkpoints["baseline"]], "--text": [checkpoints["text"]],
               "--images": [checkpoints["img0"]], "--flips": ["5"], "--out": [tmp_path / "g.png"]}
    if args == ["--swap"]:
        options["--baseline"], options["--text"] = options["--text"], options["--baseline"]
    elif args[0] in ("--weight-fault", "--neuron-fault"):
        del options["--flips"]
        options[args[0]] = args[1:]
    else:
        options[args[0]] = args[1:]
    argv = [str(a) for key, values in options.items() for a in [key, *values]]
    assert run_cli(*argv, "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_out_of_range_index(checkpoints, fm_root: Path, tmp_path: Path, capsys) -> None:
    code = run_cli("--baseline", checkpoints["baseline"], "--text", checkpoints["text"], "--indices", "10000",
                   "--data-path", fm_root, "--flips", "1", "--out", tmp_path / "g.png")
    assert code == 2
    assert "image index 10000 is out of range for fashion-mnist test (10000 images: 0..9999)" in capsys.readouterr().err
