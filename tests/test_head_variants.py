"""Head variants (cosine, projection, random-init text head), the per-iteration lr schedule, range
restriction (Ranger) and the heads experiment driver."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import models  # noqa: E402
from training.optim import build_lr_scheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EMBED = 16
X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 3])
FEATURES = torch.randn(10, EMBED, generator=torch.Generator().manual_seed(2))


def build(head: str, **kw) -> nn.Module:
    return models.build_model("resnet20", 10, head=head, embed_dim=EMBED, in_chans=1, **kw)


def meta_of(head: str) -> dict:
    return {"model": "resnet20", "num_classes": 10, "head": head, "embed_dim": EMBED, "in_chans": 1,
            "small_input": True, "dataset": "fashion-mnist"}


def train_step(model: nn.Module) -> None:
    model.train()
    optimizer = torch.optim.SGD(models.param_groups(model, 5e-4), lr=0.1, momentum=0.9)
    optimizer.zero_grad()
    F.cross_entropy(model(X), Y).backward()
    optimizer.step()


# ------------------------------------------------------------------------------------------- heads


@pytest.mark.parametrize("head,features", [("cosine", None), ("projection", FEATURES), ("text", None)],
                         ids=["cosine", "projection", "text-random"])
def test_variant_trains_saves_and_reloads(tmp_path: Path, head: str, features: torch.Tensor | None) -> None:
    model = build(head, text_features=features)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model)
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert "head.weight" in changed and any(k.startswith("backbone.") for k in changed)
    path = models.save_checkpoint(tmp_path / f"{head}.pth", model, meta_of(head))
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["meta"]["head"] == head
    loaded, meta = models.load_checkpoint(path)
    assert type(loaded) is type(model) and meta["head"] == head
    with torch.no_grad():
        assert torch.equal(loaded(X), model.eval()(X))


def test_cosine_head_has_no_projection_and_bounded_initial_logits() -> None:
    model = build("cosine").eval()
    assert models.last_layer_names(model) == ["head"]
    assert not any(isinstance(m, nn.Linear) for m in model.backbone.modules())
    assert model.head.in_features == 64  # resnet20's feature width B
    norms = model.head.weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms))
    with torch.no_grad():
        logits = model(X)
    # unit features against unit rows: every logit is a cosine times the scale
    assert logits.abs().max() <= model.scale * (1 + 1e-5)


def test_cosine_head_gives_positive_features_no_common_class_preference() -> None:
    """Post-ReLU features share the all-ones direction; the random class rows are orthogonal to it, so a
    feature along it scores every class alike (no confident wrong start that would collapse the scale)."""
    model = build("cosine").eval()
    rows = model.head.weight.detach()
    assert rows.sum(dim=1).abs().max() < 1e-5
    with torch.no_grad():
        logits = model.scale * model.head(torch.nn.functional.normalize(torch.ones(1, 64), dim=1))
    assert logits.abs().max() < 1e-4 * model.scale


def test_normalisation_sets_the_heads_apart() -> None:
    """Scaling the projection's output leaves the text head's logits unchanged and scales the projection head's."""
    logits = {}
    for head in ("text", "projection"):
        model = build(head, text_features=FEATURES).eval()
        with torch.no_grad():
            first = model(X)
            last = model.backbone.linear
            last.weight.mul_(3.0)
            last.bias.mul_(3.0)
            logits[head] = first, model(X)
    text_before, text_after = logits["text"]
    proj_before, proj_after = logits["projection"]
    assert torch.allclose(text_after, text_before, rtol=1e-4, atol=1e-5)
    assert torch.allclose(proj_after, 3.0 * proj_before, rtol=1e-4, atol=1e-5)


def test_projection_head_is_text_initialised_and_two_layered() -> None:
    model = build("projection", text_features=FEATURES)
    assert torch.allclose(model.head.weight, F.normalize(FEATURES, dim=1))
    assert models.last_layer_names(model) == ["backbone.linear", "head"]
    assert not hasattr(model, "logit_scale")


def test_head_options_are_checked() -> None:
    with pytest.raises(ValueError, match="text_features need"):
        build("cosine", text_features=FEATURES)
    with pytest.raises(ValueError, match="unknown head"):
        build("cosine-text")
    with pytest.raises(ValueError, match="freeze_head"):
        build("linear", freeze_head=True)


def test_cosine_temperature_is_not_decayed() -> None:
    model = build("cosine")
    decay_of = {id(p): g["weight_decay"] for g in models.param_groups(model, 0.1) for p in g["params"]}
    assert decay_of[id(model.logit_scale)] == 0.0
    assert decay_of[id(model.head.weight)] == 0.1


# ----------------------------------------------------------------------------------- lr schedule


def schedule_args(**kw) -> argparse.Namespace:
    base = {"lr_scheduler": "cosineannealinglr", "lr_warmup_epochs": 0, "lr_warmup_method": "linear",
            "lr_warmup_decay": 0.01, "lr_step_size": 30, "lr_gamma": 0.1, "lr_min": 0.0, "epochs": 3}
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("warmup", [0, 1])
def test_per_iteration_cosine_reaches_lr_min_at_the_last_iteration(warmup: int) -> None:
    steps, epochs = 7, 3
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = build_lr_scheduler(optimizer, schedule_args(epochs=epochs, lr_warmup_epochs=warmup), steps)
    used = []
    for _ in range(epochs * steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    after_warmup = used[warmup * steps:]
    assert all(a > b for a, b in zip(after_warmup, after_warmup[1:], strict=False))  # decreasing every iteration
    assert after_warmup[0] == pytest.approx(0.1)
    assert 0 < used[-1] < 0.1 * (1 - torch.cos(torch.tensor(torch.pi / len(after_warmup))).item())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_per_epoch_stepping_is_unchanged_by_default() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_lr_scheduler(optimizer, schedule_args(epochs=4))
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and scheduler.T_max == 4


# ------------------------------------------------------------------------------ range restriction


def profiled(model: nn.Module) -> dict[str, float]:
    from resilience.bitflip import get_format
    from resilience.layers import discover_layers
    from resilience.profile import profile_max_abs

    model.eval()
    return profile_max_abs(model, discover_layers(model, X[:1]), [X], get_format("fp32"), "cpu")


@pytest.mark.parametrize("head", ["linear", "text"])
def test_restriction_keeps_fault_free_outputs_and_layer_names(head: str) -> None:
    from models.range_restriction import restrict_ranges
    from resilience.layers import discover_layers

    model = build(head).eval()
    restricted = restrict_ranges(model, profiled(model))
    with torch.no_grad():
        assert torch.equal(restricted(X), model(X))  # the profiled images stay inside their ranges
    assert [layer.name for layer in discover_layers(restricted, X[:1])] == [
        layer.name for layer in discover_layers(model, X[:1])]
    assert models.last_layer_names(restricted) == models.last_layer_names(model)
    assert restricted.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("value", [1e30, float("inf"), float("nan")])
def test_huge_flip_in_a_restricted_layer_gives_bounded_output(value: float) -> None:
    """The clamp acts after the injected fault, as in Ranger: a forward hook on the layer (how engines
    inject) writes the fault, the next layer reads the clamped value and the logits stay bounded."""
    from models.range_restriction import restrict_ranges

    model = build("linear").eval()
    bounds = profiled(model)
    restricted = restrict_ranges(model, bounds)
    layer = "layer2.0.conv1"

    def fault(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        output[0, 3, 2, 2] = value

    seen = {}

    def read(_module: nn.Module, inputs: tuple) -> None:
        seen["read"] = inputs[0][0, 3, 2, 2].item()

    handles = [restricted.get_submodule(layer).register_forward_hook(fault),
               restricted.get_submodule("layer2.0.bn1").register_forward_pre_hook(read)]
    with torch.no_grad():
        logits = restricted(X)
        for handle in handles:
            handle.remove()
        handle = model.get_submodule(layer).register_forward_hook(fault)
        plain = model(X)
        handle.remove()
    assert seen["read"] == pytest.approx(bounds[layer] if value > 0 or math.isnan(value) else -bounds[layer])
    assert torch.isfinite(logits).all() and logits.abs().max() <= bounds["linear"]
    assert not torch.isfinite(plain[0]).all() or plain[0].abs().max() > 1e6 * bounds["linear"]


def test_restricted_checkpoint_round_trip(tmp_path: Path) -> None:
    from models.range_restriction import META_KEY, restrict_ranges, restricted_meta

    model = build("text", text_features=FEATURES).eval()
    bounds = profiled(model)
    path = models.save_checkpoint(tmp_path / "r.pth", model, restricted_meta(meta_of("text"), bounds, images=4))
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["meta"][META_KEY]["bounds"] == bounds
    loaded, meta = models.load_checkpoint(path)
    assert meta[META_KEY]["profile"] == {"images": 4}
    assert models.last_layer_names(loaded) == ["backbone.linear", "head"]
    with torch.no_grad():
        assert torch.equal(loaded(X), restrict_ranges(model, bounds)(X))
    broken = restricted_meta(meta_of("text"), {**bounds, "nowhere": 1.0})
    models.save_checkpoint(tmp_path / "bad.pth", model, broken)
    with pytest.raises(models.CheckpointError, match="not layers of the model: nowhere"):
        models.load_checkpoint(tmp_path / "bad.pth")


@pytest.mark.parametrize("clamp", [False, True])
def test_engines_agree_on_a_restricted_model(clamp: bool) -> None:
    """Both engines inject before the restriction's clamp; the fast engine re-traces the restricted graph."""
    from models.range_restriction import restrict_ranges
    from resilience.bitflip import get_format
    from resilience.engines import FaultSites, get_engine
    from resilience.golden import TensorImageSource
    from resilience.layers import discover_layers

    model = build("linear").eval()
    bounds = profiled(model)
    restricted = restrict_ranges(model, bounds)
    layers = discover_layers(restricted, X[:1])
    source = TensorImageSource(torch.arange(len(X)), X)
    generator = torch.Generator().manual_seed(3)
    results = {}
    for name in ("reference", "fast"):
        engine = get_engine(name)(restricted, layers, get_format("fp32"), clamp=bounds if clamp else None, batch_size=8)
        results[name] = []
        for layer in (layers[0], layers[7], layers[-1]):
            g = torch.Generator().manual_seed(generator.initial_seed() + layer.order)
            n = 8
            sites = FaultSites(layer.name, torch.randint(0, len(X), (n,), generator=g),
                               torch.randint(0, layer.neurons, (n,), generator=g),
                               torch.tensor([30, 31, 29, 30, 22, 30, 1, 30]))
            results[name].append(engine.run(layer, sites, source).faulty_logits)
    for ref, fast in zip(results["reference"], results["fast"], strict=True):
        assert torch.isfinite(ref).all()
        assert torch.allclose(ref, fast, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ the driver

SMALL = ["--seeds", "1", "--epochs", "1", "--profile-images", "32", "--range-images", "32",
         "--train-args", "--train-subset 128 --test-subset 64 -b 64 --workers 0 --device cpu --print-freq 1000",
         "--inject-args", "--injections 4 --max-images 64 --engine fast --clamp profile --no-progress -j 0 --device cpu"]


def analyze(*argv: str) -> int:
    import analyze as cli

    return cli.main(list(argv))


def test_dry_run_lists_every_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert analyze("heads", "--out", str(tmp_path / "h"), "--seeds", "3", "--dry-run") == 0
    printed = capsys.readouterr().out
    titles = [line.split("] ", 1)[1] for line in printed.splitlines() if line.startswith("[") and "/" in line.split("]")[0]]
    assert len(titles) == 3 * (5 + 2 + 7)
    for seed in range(3):
        for variant in ("linear", "cosine", "projection", "text-random", "text"):
            assert f"train {variant} seed {seed}" in titles
        for variant in ("linear", "cosine", "projection", "text-random", "text", "ranger-linear", "ranger-text"):
            assert f"campaign {variant} seed {seed}" in titles
        assert f"profile ranges ranger-linear seed {seed}" in titles
    assert "--clamp profile" in printed and "--lr-per-iteration" in printed and "[report]" in printed
    assert not (tmp_path / "h").exists()
    import analyze as analyze_cli
    import inject
    import train

    parse = {"train.py": train.parse_args, "inject.py": inject.get_args_parser().parse_args,
             "analyze.py": analyze_cli.get_args_parser().parse_args}
    commands = [shlex.split(line.strip()[2:]) for line in printed.splitlines() if line.strip().startswith("$ ")]
    assert len(commands) == len(titles)
    heads = []
    for command in commands:
        args = parse[command[1]](command[2:])  # every listed command is valid for its script
        if command[1] == "train.py":
            heads.append((args.head, args.text_features is not None, args.lr_per_iteration))
    assert sorted(set(heads)) == [("cosine", False, True), ("linear", False, True), ("projection", True, True),
                                  ("text", False, True), ("text", True, True)]


def test_bad_driver_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert analyze("heads", "--out", str(tmp_path), "--features", str(tmp_path / "none.pth"), "--dry-run") == 2
    assert capsys.readouterr().err.strip().startswith("error: text features file not found")
    assert analyze("restrict-ranges", "--checkpoint", str(tmp_path / "none.pth"), "--out", str(tmp_path / "r.pth")) == 2


def test_small_experiment_runs_end_to_end_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from reference_assets import require_fashion_mnist

    require_fashion_mnist()
    out = tmp_path / "heads"
    argv = ["heads", "--out", str(out), "--variants", "ranger-linear", *SMALL]  # + the baseline it restricts
    assert analyze(*argv) == 0
    rows = {r["variant"]: r for r in _read_csv(out / "heads_seeds.csv")}
    assert set(rows) == {"linear", "ranger-linear"}
    assert float(rows["linear"]["last_layer_improvement"]) == 1.0  # the baseline against itself
    assert rows["linear"]["last_layers"] == rows["ranger-linear"]["last_layers"] == "linear"
    for row in rows.values():
        assert 0 < float(row["accuracy"]) <= 1 and float(row["last_layer_max_abs"]) > 0
        assert row["injections_per_layer"] == "4"
    ranger_ckpt = torch.load(out / "restricted" / "ranger-linear_seed0.pth", map_location="cpu", weights_only=True)
    assert ranger_ckpt["meta"]["range_restriction"]["profile"]["images"] == 32
    trained = torch.load(out / "train" / "linear" / "seed0" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert trained["meta"]["head"] == "linear"
    assert trained["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-9)  # the schedule ended
    assert (out / "heads.png").stat().st_size > 0 and "ranger-linear" in (out / "heads.md").read_text()
    timed = json_of(out / "step_seconds.json")
    assert len(timed) == 4 and all(s > 0 for s in timed.values())
    before = (out / "heads.md").read_text()
    capsys.readouterr()
    assert analyze(*argv) == 0  # a rerun finds every step done and writes the same report
    assert capsys.readouterr().out.count("done already") == 4
    assert (out / "heads.md").read_text() == before


def _read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def json_of(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8"))
