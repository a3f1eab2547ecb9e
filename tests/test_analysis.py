"""Value ranges, the Top2Diff sweep and the experiment pipeline (analyze.py)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import analyze
from analysis.ablation import AblationPlan, ablation_steps
from analysis.pipeline import Step, StepFailed, run_steps
from analysis.top2diff_sweep import accuracy_above, crossing_point

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_accuracy_above_counts_correct_images_at_or_over_delta() -> None:
    rng = np.random.default_rng(0)
    correct = rng.random(500) < 0.8
    margins = rng.choice([0.0, 1.0, 2.5, 10.0, 39.0, 40.0, 80.0], size=500)
    deltas = [0.0, 1.0, 2.0, 2.5, 10.0, 40.0, 41.0]
    expected = [np.mean(correct & (margins >= d)) for d in deltas]
    assert accuracy_above(correct, margins, deltas) == pytest.approx(expected, abs=0)
    with pytest.raises(ValueError, match="equal-length"):
        accuracy_above(correct[:3], margins[:4], deltas)


def test_crossing_point() -> None:
    deltas = [1.0, 2.0, 3.0, 4.0]
    base = np.array([0.90, 0.88, 0.85, 0.80])
    assert crossing_point(deltas, base, np.array([0.89, 0.87, 0.86, 0.84])) == pytest.approx(2.5)
    assert math.isnan(crossing_point(deltas, base, base - 0.01))
    assert crossing_point(deltas, base, base) == 1.0


@pytest.fixture(scope="module")
def checkpoint_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    data = pytest.importorskip("data")
    import models
    import text_features

    try:
        data.build_dataset("fashion-mnist", "test")
    except data.DatasetUnavailable as exc:
        pytest.skip(f"Fashion-MNIST unavailable: {exc}")
    features, _ = text_features.load_text_features(REPO / "text_features/assets/fashion-mnist_minilm.pth")
    preset = data.eval_preset("fashion-mnist", "resnet20", in_chans=1)
    folder = tmp_path_factory.mktemp("pair")
    paths = []
    for head in ("linear", "text"):
        torch.manual_seed(0)
        text = {"embed_dim": features.shape[1], "text_features": features} if head == "text" else {}
        model = models.build_model("resnet20", 10, head=head, in_chans=1, **text)
        meta = {"model": "resnet20", "num_classes": 10, "head": head, "in_chans": 1, "small_input": False,
                "embed_dim": features.shape[1] if head == "text" else None, "dataset": "fashion-mnist",
                "preset": preset}
        paths.append(models.save_checkpoint(folder / f"{head}.pth", model, meta))
    return paths[0], paths[1]


def test_value_ranges_cli(checkpoint_pair: tuple[Path, Path], tmp_path: Path) -> None:
    import data
    import models
    from resilience.golden import evaluated_ids
    from resilience.layers import discover_layers

    base, text = checkpoint_pair
    argv = ["value-ranges", "--baseline", str(base), "--text", str(text), "--out", str(tmp_path), "--max-images", "48",
            "--batch-size", "16", "--device", "cpu"]
    assert analyze.main(argv) == 0
    with open(tmp_path / "value_ranges.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_model = {label: [r for r in rows if r["model"] == label] for label in analyze.MODELS}
    assert [r["layer"] for r in by_model["baseline"]][-1] == "linear"
    assert [r["layer"] for r in by_model["text-guided"]][-2:] == ["backbone.linear", "head"]
    assert (tmp_path / "value_ranges.png").stat().st_size > 1000

    # the first conv's numbers equal a direct computation over the same 48 images
    model, meta = models.load_checkpoint(base)
    split = data.build_dataset("fashion-mnist", "test", preset=meta["preset"])
    images = torch.stack([split[int(i)][0] for i in evaluated_ids(len(split), 48)])
    layer = discover_layers(model, images[:1])[0]
    with torch.no_grad():
        out = model.get_submodule(layer.name)(images).abs()
    first = by_model["baseline"][0]
    assert first["layer"] == layer.name
    assert float(first["max_abs"]) == pytest.approx(float(out.max()), rel=1e-6)
    assert float(first["mean_abs"]) == pytest.approx(float(out.double().mean()), rel=1e-6)


def test_top2diff_sweep_cli(checkpoint_pair: tuple[Path, Path], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    base, text = checkpoint_pair
    argv = ["top2diff-sweep", "--baseline", str(base), "--text", str(text), "--out", str(tmp_path), "--max-images",
            "64", "--deltas", "0", "5", "20", "--device", "cpu"]
    assert analyze.main(argv) == 0
    summary = json.loads((tmp_path / "top2diff_sweep.json").read_text())
    lines = (tmp_path / "top2diff_sweep.csv").read_text().splitlines()
    assert lines[0] == "delta,baseline_accuracy,text_accuracy" and len(lines) == 4
    at_zero = [float(v) for v in lines[1].split(",")[1:]]
    assert at_zero == pytest.approx([summary["accuracy"]["baseline"], summary["accuracy"]["text-guided"]])
    curve = [float(line.split(",")[1]) for line in lines[1:]]
    assert curve == sorted(curve, reverse=True)  # raising δ can only remove correct images
    assert summary["images"] == 64
    said = capsys.readouterr().out
    crossing = summary["crossing_delta"]
    if crossing is None:
        assert "stays below the baseline's over δ = 0…20" in said
    elif crossing == 0:
        assert "is at or above the baseline's from δ = 0" in said
    else:
        assert f"reaches the baseline's at δ = {crossing:.2f}" in said


def test_bad_input_is_one_line(checkpoint_pair: tuple[Path, Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    base, text = checkpoint_pair
    assert analyze.main(["top2diff-sweep", "--baseline", str(base), "--text", str(tmp_path / "no.pth"),
                         "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: text-guided checkpoint not found: {tmp_path / 'no.pth'}"
    assert analyze.main(["top2diff-sweep", "--baseline", str(base), "--text", str(base), "--out", str(tmp_path),
                         "--deltas", "10", "5"]) == 2
    assert "increasing" in capsys.readouterr().err
    assert analyze.main(["value-ranges", "--baseline", str(base), "--text", str(text), "--out", str(tmp_path),
                         "--dataset", "cifar10"]) == 2
    assert "trained on fashion-mnist" in capsys.readouterr().err


def test_run_steps_skips_finished_and_stops_on_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "made.txt"
    write = Step("write", ["-c", f"open({str(marker)!r}, 'w').write('x')"], marker)
    assert run_steps([write])[0] > 0 and marker.read_text() == "x"
    marker.write_text("kept")
    assert run_steps([write]) == [0.0] and marker.read_text() == "kept"
    assert "done already" in capsys.readouterr().out
    with pytest.raises(StepFailed, match="step 1 \\(boom\\) failed with exit code 3"):
        run_steps([Step("boom", ["-c", "raise SystemExit(3)"], tmp_path / "never")])
    with pytest.raises(StepFailed, match="without writing"):
        run_steps([Step("silent", ["-c", "pass"], tmp_path / "never")])


def test_ablation_plan_trains_each_init_from_its_own_features(tmp_path: Path) -> None:
    plan = AblationPlan(out=tmp_path, config="configs/fashion_mnist/resnet20.yaml", dataset="fashion-mnist",
                        train_args=["--epochs", "1"], inject_args=["--injections", "64"])
    steps = ablation_steps(plan)
    assert [s.title for s in steps] == [
        "train baseline", "campaign baseline",
        "random text features", "train random", "campaign random",
        "classname text features", "train classname", "campaign classname",
        "descriptions text features", "train descriptions", "campaign descriptions"]
    train_random = steps[3].command
    assert train_random[train_random.index("--text-features") + 1] == str(plan.features("random"))
    assert "--epochs" in train_random and "--injections" in steps[4].command
    given = AblationPlan(out=tmp_path, config="c.yaml", dataset="fashion-mnist", variants=["random"],
                         baseline_campaign=tmp_path / "base")
    assert [s.title for s in ablation_steps(given)] == ["random text features", "train random", "campaign random"]
    assert given.campaign_dir("baseline") == tmp_path / "base"


def parse_step(step: Step) -> None:
    """Parse a step's command with the parser of the script it runs (argparse exits on a bad flag)."""
    import inject
    import report
    import train
    from text_features.build import get_args_parser as features_parser

    first, *rest = step.command
    if first == "-m":
        assert rest[0] == "text_features.build"
        features_parser().parse_args(rest[1:])
        return
    parsers = {"train.py": train.get_args_parser, "inject.py": inject.get_args_parser,
               "report.py": report.get_args_parser, "analyze.py": analyze.get_args_parser}
    parsers[first]().parse_args(rest)


def test_every_ablation_command_parses(tmp_path: Path) -> None:
    plan = AblationPlan(out=tmp_path, config="configs/fashion_mnist/resnet20.yaml", dataset="fashion-mnist")
    for step in ablation_steps(plan):
        parse_step(step)


def test_quickstart_commands_parse(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart", REPO / "scripts" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    args = quickstart.get_args_parser().parse_args(["--out", str(tmp_path), "--epochs", "1"])
    steps = quickstart.quickstart_steps(args, tmp_path, tmp_path / "features.pth")
    assert [s.command[0] for s in steps] == ["train.py", "inject.py"] * 2 + ["report.py", "analyze.py", "analyze.py"]
    for step in steps:
        parse_step(step)
    campaign = steps[1].command
    assert campaign[campaign.index("--clamp") + 1] == "profile"  # the paper's setting by default
    text_train = steps[2].command
    assert text_train[text_train.index("--text-features") + 1] == str(tmp_path / "features.pth")
