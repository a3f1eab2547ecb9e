"""Sampling, metrics and the campaign runner on a tiny model: seeded fault lists, ΔLoss recomputed
independently, resume after an interruption and sharding give files identical to one run, the CLI."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from reference_assets import require_fashion_mnist
from torch import nn

from resilience.bitflip import FORMATS
from resilience.campaign import CampaignConfig, CampaignError, UniformCampaign, parse_shard, plan_layers
from resilience.golden import EvaluatedImages, Golden, TensorImageSource, evaluated_ids, golden_pass
from resilience.layers import discover_layers
from resilience.metrics import mean_ci, predictions, summarize, top2diff, wilson_interval
from resilience.runner import execute, merge
from resilience.sampling import leveugle_n, sample_sites, stable_seed

FP32 = FORMATS["fp32"]
FINAL = ("faults.parquet", "layers.csv", "layers.md", "summary.json")


# ------------------------------------------------------------------------------------------ sampling


def test_same_seed_same_fault_list_and_prefix_stability() -> None:
    images = torch.arange(10, 30)
    a = sample_sites(7, "layer1.0.conv1", 500, images, 300, 32)
    b = sample_sites(7, "layer1.0.conv1", 500, images, 300, 32)
    assert all(torch.equal(x, y) for x, y in ((a.image, b.image), (a.index, b.index), (a.bit, b.bit)))
    c = sample_sites(8, "layer1.0.conv1", 500, images, 300, 32)
    d = sample_sites(7, "layer1.0.conv2", 500, images, 300, 32)
    assert not torch.equal(a.index, c.index) and not torch.equal(a.index, d.index)
    short = sample_sites(7, "layer1.0.conv1", 500, images, 40, 32)
    assert torch.equal(short.index, a.index[:40]) and torch.equal(short.bit, a.bit[:40])
    assert set(a.image.tolist()) <= set(images.tolist())
    assert int(a.index.max()) < 500 and int(a.bit.max()) < 32 and int(a.bit.min()) >= 0
    assert stable_seed(7, "x") == stable_seed(7, "x") != stable_seed(7, "y")


def test_sampling_is_roughly_uniform() -> None:
    sites = sample_sites(0, "fc", 4, torch.arange(4), 32000, 16)
    for values, k in ((sites.image, 4), (sites.index, 4), (sites.bit, 16)):
        counts = torch.bincount(values, minlength=k).double()
        assert (counts / counts.mean() - 1).abs().max() < 0.08


def test_leveugle_sample_size() -> None:
    # infinite population: t^2 p (1-p) / e^2 = 2.5758^2 / 4 / 0.01^2 = 16587
    assert leveugle_n(10**15, 0.01, 0.99) == math.ceil(2.5758293035489004**2 * 0.25 / 0.01**2)
    assert leveugle_n(100, 0.01, 0.99) <= 100
    assert leveugle_n(1, 0.05, 0.95) == 1
    with pytest.raises(ValueError):
        leveugle_n(100, 0.0, 0.99)


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_definitions() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, math.nan, 1.0], [1.0, 1.0, 0.0]])
    assert predictions(logits).tolist() == [0, -1, 0]
    p = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()
    assert top2diff(logits)[0].item() == pytest.approx((p[0] - p[1]) * 100)
    assert top2diff(logits)[2].item() == 0.0
    mean, std, low, high = mean_ci(np.array([1.0, 2.0, 3.0, 4.0]), 0.99)
    assert (mean, std) == (2.5, pytest.approx(np.std([1, 2, 3, 4], ddof=1)))
    assert high - mean == pytest.approx(2.5758293 * std / 2)
    low_w, high_w = wilson_interval(5, 100, 0.95)  # textbook value: [0.0215, 0.1118]
    assert (low_w, high_w) == (pytest.approx(0.02154, abs=1e-4), pytest.approx(0.11175, abs=1e-4))
    stats = summarize(np.array([1.0, np.inf, 3.0]), np.array([True, False, True]), np.array([True, True, False]))
    assert (stats.n, stats.non_finite, stats.mean_delta_loss, stats.mismatches) == (3, 1, 2.0, 2)


# ------------------------------------------------------------------------------------------ campaign


def tiny_setup(n_images: int = 24) -> tuple[nn.Module, torch.Tensor, Golden, TensorImageSource]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 8), nn.ReLU(), nn.Linear(8, 3),
    ).eval()
    x = torch.randn(n_images, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = model(x).argmax(1)
    labels[:4] = (labels[:4] + 1) % 3  # a few misclassified images stay out of the golden set
    ids = torch.arange(n_images)
    golden = golden_pass(model, ids, [(x[:10], labels[:10]), (x[10:], labels[10:])], FP32, "cpu")
    return model, x, golden, TensorImageSource(ids, x)


def config(**kw: object) -> CampaignConfig:
    base = {"model": "tiny", "dataset": "synthetic", "injections": 12, "seed": 3, "batch_size": 6, "chunk_size": 6}
    return CampaignConfig(**{**base, **kw})


def run_all(out: Path, cfg: CampaignConfig, **kw: object) -> UniformCampaign:
    model, x, golden, source = tiny_setup()
    layers = discover_layers(model, x[:1])
    cdir, _ = execute(out, cfg, model, layers, golden, source, progress=False, log=lambda _m: None, **kw)
    return cdir


def test_golden_set_and_subset() -> None:
    _, _, golden, _ = tiny_setup()
    gs = golden.golden_set("correct")
    assert set(gs.tolist()).isdisjoint({0, 1, 2, 3}) and len(gs) == 20
    assert len(golden.golden_set("all")) == 24
    sub = evaluated_ids(1000, 50)
    assert torch.equal(sub, evaluated_ids(1000, 50)) and len(sub.unique()) == 50 and torch.equal(sub, sub.sort().values)


@pytest.mark.parametrize("memory_limit", [0, 1 << 20])
def test_evaluated_images_in_memory_or_on_demand(memory_limit: int) -> None:
    x, y = torch.randn(12, 1, 4, 4), torch.arange(12) % 3
    ids = torch.tensor([1, 4, 5, 9])
    evaluated = EvaluatedImages(torch.utils.data.TensorDataset(x, y), ids, memory_limit=memory_limit)
    assert torch.equal(evaluated.images(torch.tensor([9, 1, 9])), x[[9, 1, 9]])
    batches = list(evaluated.batches(3))
    assert [len(b[0]) for b in batches] == [3, 1]
    assert torch.equal(torch.cat([b[1] for b in batches]), y[ids])


def f32_flip(value: float, bit: int) -> float:
    (word,) = struct.unpack("<I", struct.pack("<f", value))
    return struct.unpack("<f", struct.pack("<I", word ^ (1 << bit)))[0]


def test_campaign_records_and_independent_delta_loss(tmp_path: Path) -> None:
    cdir = run_all(tmp_path / "c", config())
    cdir.assemble()
    faults = pq.read_table(tmp_path / "c" / "faults.parquet").to_pandas()
    assert len(faults) == 4 * 12 and list(faults["layer"].unique()) == ["0", "2", "5", "7"]
    model, x, golden, _ = tiny_setup()
    rows = faults.sample(12, random_state=0)
    for _, r in rows.iterrows():
        # recompute with a struct flip on one image and a NumPy cross-entropy
        def hook(_m: nn.Module, _i: tuple, out: torch.Tensor, r=r) -> torch.Tensor:
            out = out.clone()
            flat = out.view(-1)
            assert float(flat[r["index"]]) == pytest.approx(r["golden_value"], rel=1e-6, abs=1e-6)
            flat[r["index"]] = f32_flip(float(flat[r["index"]]), int(r["bit"]))
            return out

        handle = model.get_submodule(r["layer"]).register_forward_hook(hook)
        with torch.no_grad():
            logits = model(x[r["image"]][None])[0].double().numpy()
        handle.remove()
        with torch.no_grad():
            clean = model(x[r["image"]][None])[0].double().numpy()
        label = int(r["label"])

        def ce(z: np.ndarray, label: int = label) -> float:
            m = z.max()
            return float(m + np.log(np.exp(z - m).sum()) - z[label])

        assert label == int(golden.labels[r["image"]])
        assert r["golden_loss"] == pytest.approx(ce(clean), rel=1e-5, abs=1e-6)
        if np.isfinite(logits).all():
            assert r["finite"]
            assert r["delta_loss"] == pytest.approx(abs(ce(logits) - ce(clean)), rel=1e-4, abs=1e-5)
            assert r["mismatch"] == (int(np.argmax(logits)) != int(r["golden_pred"]))
    csv = (tmp_path / "c" / "layers.csv").read_text().splitlines()
    assert csv[0].startswith("layer,order,kind,out_shape,neurons,n,non_finite,mean_delta_loss")
    layer0 = faults[faults["layer"] == "0"]
    finite = layer0[layer0["finite"]]
    assert float(csv[1].split(",")[7]) == pytest.approx(finite["delta_loss"].mean(), rel=1e-12)


def test_interrupted_run_resumes_to_identical_files(tmp_path: Path) -> None:
    full = run_all(tmp_path / "full", config())
    full.assemble()

    class Killed(Exception):
        pass

    seen = []

    def kill_after_three(faults: int) -> None:
        seen.append(faults)
        if len(seen) == 3:
            raise Killed

    with pytest.raises(Killed):
        run_all(tmp_path / "resumed", config(), after_chunk=kill_after_three)
    assert len(list((tmp_path / "resumed" / "parts").glob("*.parquet"))) == 3
    resumed = run_all(tmp_path / "resumed", config())
    assert not resumed.missing()
    resumed.assemble()
    for name in FINAL:
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_shards_merge_to_identical_files(tmp_path: Path) -> None:
    run_all(tmp_path / "full", config()).assemble()
    run_all(tmp_path / "s0", config(), shard=parse_shard("0/2"))
    s1 = run_all(tmp_path / "s1", config(), shard=(1, 2))
    assert s1.missing()
    merge([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    for name in FINAL:
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "merged" / name).read_bytes(), name


def test_other_config_in_same_folder_is_refused(tmp_path: Path) -> None:
    run_all(tmp_path / "c", config(layers="^7$"))
    with pytest.raises(CampaignError, match="different campaign"):
        run_all(tmp_path / "c", config(layers="^7$", seed=4))


def test_bad_configs() -> None:
    with pytest.raises(CampaignError, match="multiple of --batch-size"):
        config(chunk_size=9)
    with pytest.raises(CampaignError, match="either --injections"):
        config(injections=None)
    with pytest.raises(CampaignError, match="--shard"):
        parse_shard("2/2")
    model, x, golden, _ = tiny_setup()
    with pytest.raises(CampaignError, match="no layer matches"):
        plan_layers(config(layers="nothing"), discover_layers(model, x[:1]), 10)
    plans = plan_layers(config(injections=None, margin=0.05, confidence=0.99), discover_layers(model, x[:1]), 20)
    assert [p.n for p in plans] == [leveugle_n(20 * p.neurons * 32, 0.05, 0.99) for p in plans]


def test_clamp_profile_is_recorded(tmp_path: Path) -> None:
    model, x, golden, source = tiny_setup()
    layers = discover_layers(model, x[:1])
    clamp = {layer.name: 1.0 for layer in layers}
    cfg = config(clamp="profile", profile_images=4, layers="^5$")
    cdir, _ = execute(tmp_path / "c", cfg, model, layers, golden, source, clamp_max=clamp, progress=False)
    cdir.assemble()
    faults = pq.read_table(tmp_path / "c" / "faults.parquet").to_pandas()
    assert faults["faulty_value"].abs().max() <= 1.0
    assert "clamp_max_abs" in (tmp_path / "c" / "layers.csv").read_text().splitlines()[0]


# ------------------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = require_fashion_mnist()
    models = pytest.importorskip("models")
    torch.manual_seed(0)
    model = models.build_model("resnet20", 10, in_chans=1)
    meta = {"model": "resnet20", "num_classes": 10, "head": "linear", "embed_dim": None, "in_chans": 1,
            "small_input": False, "dataset": "fashion-mnist",
            "preset": data.eval_preset("fashion-mnist", "resnet20", in_chans=1), "text_features": None}
    return models.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", model, meta)


def test_cli_end_to_end(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import inject

    out = tmp_path / "fi"
    argv = ["--checkpoint", str(tiny_checkpoint), "--injections", "8", "--seed", "1", "--out", str(out),
            "--max-images", "40", "--golden", "all", "--layers", "^(conv1|layer3.2.conv2|linear)$",
            "--batch-size", "4", "--chunk-size", "4", "--device", "cpu", "--no-progress", "-j", "0"]
    assert inject.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_per_layer"] == {"conv1": 8, "layer3.2.conv2": 8, "linear": 8}
    assert summary["golden"]["evaluated_images"] == 40 and summary["golden"]["golden_set_size"] == 40
    assert summary["engine"]["engine"] == "reference" and summary["last_layers"] == ["linear"]
    assert summary["command"].startswith("python inject.py --checkpoint")
    faults = pq.read_table(out / "faults.parquet")
    assert faults.num_rows == 24 and set(faults.column_names) >= {
        "layer", "image", "index", "bit", "golden_value", "faulty_value", "label", "golden_pred", "faulty_pred",
        "golden_loss", "faulty_loss", "delta_loss", "faulty_top2diff"}
    before = {name: (out / name).read_bytes() for name in FINAL}
    assert inject.main(argv) == 0
    assert "already complete" in capsys.readouterr().out
    assert before == {name: (out / name).read_bytes() for name in FINAL}


@pytest.mark.parametrize(("extra", "message"), [
    (["--injections", "0"], "argument --injections: must be at least 1 (got 0)"),
    (["--layers", "nothing-matches"], "no layer matches"),
    (["--chunk-size", "6", "--batch-size", "4"], "multiple of --batch-size"),
])
def test_cli_bad_input(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                       extra: list[str], message: str) -> None:
    import inject

    argv = ["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "x"), "--max-images", "8", "--no-progress",
            "-j", "0", "--device", "cpu", *extra]
    try:
        code = inject.main(argv)
    except SystemExit as exc:  # argparse refuses bad values after its usage line
        code = exc.code
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert len(errors) == 1 and message in errors[0]


def test_cli_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import inject

    assert inject.main(["neurons", "--checkpoint", str(tmp_path / "none.pth"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize(("argv", "command"), [
    (["--checkpoint", "c.pth", "--out", "x"], "neurons"),
    (["--fault-model", "neuron-bitflip", "--checkpoint", "c.pth", "--out", "x"], "neurons"),
    (["--fault-model", "weight-stuck1", "--fault-list", "f.csv", "--checkpoint", "c.pth"], "weights"),
    (["--fault-model=weight-bitflip", "--fault-list", "f.csv", "--checkpoint", "c.pth"], "weights"),
    (["neurons", "--checkpoint", "c.pth", "--out", "x"], "neurons"),
    (["weights", "--fault-list", "f.csv", "--checkpoint", "c.pth"], "weights"),
    (["merge", "a", "b"], "merge"),
])
def test_subcommands_and_the_older_spellings(argv: list[str], command: str) -> None:
    import inject

    args = inject.get_args_parser().parse_args(argv)
    assert args.command == command
    if argv[0] in inject.SUBCOMMANDS:
        assert args.spelling_note is None
    else:
        assert args.spelling_note == f"note: this command is now spelled 'inject.py {command} ...' (the spelling used keeps working)"
        assert args.checkpoint == "c.pth"
