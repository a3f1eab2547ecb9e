"""train.py / test.py end to end on a tiny Fashion-MNIST subset (CPU, seconds), plus the engine pieces."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from reference_assets import DNN_BENCHMARKS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402
from training import config as cfg  # noqa: E402
from training.metrics import EvalAccumulator, top2diff  # noqa: E402
from training.run_log import CSVLog  # noqa: E402

FEATURES = REPO / "text_features" / "assets" / "fashion-mnist_minilm.pth"
TINY = ["--train-subset", "256", "--test-subset", "128", "-b", "64", "--workers", "0", "--print-freq", "1000",
        "--device", "cpu"]


def load_test_cli():
    """test.py as a module (its name would collide with the standard library's ``test`` package)."""
    spec = importlib.util.spec_from_file_location("tgr_test_cli", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate_cli(*argv: str) -> dict:
    cli = load_test_cli()
    return cli.main(cli.get_args_parser().parse_args([*argv, "--workers", "0", "--device", "cpu"]))


def fashion_mnist_or_skip() -> None:
    import data

    try:
        data.build_dataset("fashion-mnist", "test")
    except data.DatasetUnavailable as exc:
        pytest.skip(f"Fashion-MNIST unavailable: {exc}")


def run_args(out: Path, head: str, *extra: str) -> list[str]:
    args = ["-c", str(REPO / "configs" / "fashion_mnist" / "resnet20.yaml"), "--epochs", "1", *TINY,
            "--output-dir", str(out)]
    if head == "text":
        args += ["--text-features", str(FEATURES)]
    return args + list(extra)


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One 1-epoch run per head, shared by the tests below."""
    fashion_mnist_or_skip()
    out = {}
    for head in ("linear", "text"):
        folder = tmp_path_factory.mktemp(f"run_{head}")
        extra = ["--model-ema", "--model-ema-steps", "1"] if head == "linear" else []
        train.main(train.parse_args(run_args(folder, head, *extra)))
        out[head] = folder
    return out


# ------------------------------------------------------------------------------------- config handling


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_parses(path: Path) -> None:
    args = train.parse_args(["-c", str(path)])
    raw = yaml.safe_load(path.read_text())
    for key, value in raw.items():
        got = getattr(args, cfg.normalise_key(key))
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, key


def test_command_line_beats_config_and_unknown_keys_fail(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.5\nepochs: 7\nlr-warmup-epochs: 2\n")
    args = train.parse_args(["-c", str(recipe), "--lr", "0.01"])
    assert (args.lr, args.epochs, args.lr_warmup_epochs) == (0.01, 7, 2)
    recipe.write_text("learning_rate: 0.5\n")
    with pytest.raises(SystemExit):
        train.parse_args(["-c", str(recipe)])
    recipe.write_text("opt: adamx\n")
    with pytest.raises(SystemExit):
        train.parse_args(["-c", str(recipe)])


def test_linear_lr_scaling() -> None:
    assert cfg.scaled_lr(0.1, 256, 128) == pytest.approx(0.2)
    with pytest.raises(SystemExit):
        train.parse_args(["--scale-lr"])


def test_saved_config_round_trips(tmp_path: Path) -> None:
    args = train.parse_args(["-c", str(REPO / "configs" / "imagenet" / "swin_v2.yaml"), "--epochs", "3"])
    path = tmp_path / "args.yaml"
    train.save_effective_config(args, path)
    again = train.parse_args(["-c", str(path)])
    assert vars(again) == vars(args) | {"config": [str(path)]}


def test_paper_flag_spellings_parse() -> None:
    args = train.parse_args(["--data_path", "/d", "--CLIP_text_path", "f.pth", "--embed_size", "512",
                             "--policy-magnitude", "15", "--wd", "0.05"])
    assert (args.data_path, args.text_features, args.embed_dim, args.ra_magnitude) == ("/d", "f.pth", 512, 15)
    assert args.head == "text" and args.weight_decay == 0.05


# ----------------------------------------------------------------------------------------- engine parts


def test_metrics_are_per_image_means() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(10, 4), torch.randint(0, 4, (10,))
    whole, split = EvalAccumulator(4), EvalAccumulator(4)
    whole.update(logits, target)
    split.update(logits[:7], target[:7])
    split.update(logits[7:], target[7:])
    a, b = whole.result(), split.result()
    assert a == pytest.approx(b)
    assert a["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item(), rel=1e-6)
    assert a["top2diff"] == pytest.approx(top2diff(logits).mean().item(), rel=1e-6)
    assert sum(r["n"] for r in whole.per_class()) == 10


def test_csv_log_truncates_redone_epochs(tmp_path: Path) -> None:
    log = CSVLog(tmp_path / "m.csv")
    for epoch in range(3):
        log.log({"epoch": epoch, "loss": 1.0 / (epoch + 1)})
    CSVLog(tmp_path / "m.csv", truncate_from_epoch=1).log({"epoch": 1, "loss": 0.1, "new": 5})
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert rows[0] == "epoch,loss,new" and len(rows) == 3


def test_logit_scale_is_not_decayed() -> None:
    import models
    from training.optim import build_param_groups

    model = models.build_model("resnet20", 10, head="text", embed_dim=16)
    args = train.parse_args(["--wd", "0.1"])
    groups = build_param_groups(model, args)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of[id(model.logit_scale)] == 0.0
    assert decay_of[id(model.head.weight)] == 0.1
    assert len(decay_of) == sum(1 for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("head", ["linear", "text"])
def test_one_epoch_writes_self_describing_checkpoint(runs: dict[str, Path], head: str) -> None:
    out = runs[head]
    for name in ("checkpoint.pth", "model_0.pth", "args.yaml", "metrics.csv"):
        assert (out / name).is_file(), name
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)  # no pickled objects
    assert ckpt["epoch"] == 0 and isinstance(ckpt["args"], dict)
    meta = ckpt["meta"]
    assert (meta["model"], meta["head"], meta["dataset"], meta["num_classes"]) == ("resnet20", head, "fashion-mnist", 10)
    assert isinstance(meta["preset"], dict)
    if head == "text":
        assert meta["embed_dim"] == 384  # follows the features file
        assert meta["text_features"] is not None
    saved = yaml.safe_load((out / "args.yaml").read_text())
    assert saved["epochs"] == 1 and saved["head"] == head
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("epoch", "lr", "train_loss", "train_acc1", "test_top1", "test_top5", "test_loss", "images_per_s"):
        assert column in header


def test_resume_continues_at_next_epoch(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    out.mkdir()
    for name in ("checkpoint.pth", "metrics.csv"):
        (out / name).write_bytes((runs["linear"] / name).read_bytes())
    args = train.parse_args(run_args(out, "linear", "--epochs", "2", "--resume", "auto"))
    train.main(args)
    assert args.start_epoch == 1
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1
    assert (out / "model_1.pth").is_file() and not (out / "model_0.pth").exists()
    epochs = [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["0", "1"]


def test_test_only_matches_training_eval(runs: dict[str, Path]) -> None:
    out = runs["text"]
    result = train.main(train.parse_args(run_args(out, "text", "--resume", str(out / "checkpoint.pth"), "--test-only")))
    logged = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["metrics"]
    assert result["top1"] == pytest.approx(logged["test_top1"])


def test_test_py_reads_train_py_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    ckpt = runs["text"] / "checkpoint.pth"
    proc = subprocess.run(
        [sys.executable, str(REPO / "test.py"), "--checkpoint", str(ckpt), "--dataset", "fashion-mnist",
         "--out", str(report), "--subset", "128", "--workers", "0", "--device", "cpu"],
        capture_output=True, text=True, env=env(), cwd=REPO, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    for key in ("top1", "top5", "loss", "top2diff"):
        assert isinstance(result[key], float)
    assert len(result["per_class"]) == 10
    assert report.with_suffix(".csv").read_text().startswith("class_index,class_name,n,correct,accuracy")


def test_cli_errors_are_one_line(runs: dict[str, Path], tmp_path: Path) -> None:
    cases = [
        [str(REPO / "test.py"), "--checkpoint", str(tmp_path / "missing.pth"), "--dataset", "fashion-mnist"],
        [str(REPO / "train.py"), *run_args(tmp_path / "x", "text", "--embed-dim", "512")],
        [str(REPO / "train.py"), *run_args(tmp_path / "y", "linear", "--model", "no_such_net")],
    ]
    for argv in cases:
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env(), cwd=REPO, timeout=120)
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr


def test_two_process_gloo_ddp(tmp_path: Path) -> None:
    fashion_mnist_or_skip()
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "train.py"), *run_args(out, "linear", "-b", "32")],
        capture_output=True, text=True, env=env(), cwd=REPO, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.pth")) == ["checkpoint.pth", "model_0.pth"]
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["args"]["world_size"] == 2 and ckpt["metrics"]["train_images"] == 256
    assert ckpt["metrics"]["test_n"] == 128


def test_test_py_ema_weights_differ(runs: dict[str, Path]) -> None:
    ckpt = str(runs["linear"] / "checkpoint.pth")
    plain = evaluate_cli("--checkpoint", ckpt, "--subset", "128")
    ema = evaluate_cli("--checkpoint", ckpt, "--subset", "128", "--ema")
    assert ema["ema"] and not plain["ema"]
    assert (ema["loss"], ema["top2diff"]) != (plain["loss"], plain["top2diff"])


def test_test_py_reads_paper_layout(runs: dict[str, Path], tmp_path: Path) -> None:
    """The paper repository's training dict: weights under "model", args as a pickled Namespace."""
    ours = torch.load(runs["text"] / "checkpoint.pth", map_location="cpu", weights_only=True)
    paper = {"model": ours["model"], "epoch": 0, "args": argparse.Namespace(model="resnet20", lr=0.1)}
    torch.save(paper, tmp_path / "paper.pth")
    result = evaluate_cli("--checkpoint_path", str(tmp_path / "paper.pth"), "--dataset", "fashion-mnist",
                          "--CLIP_model", "--embed_size", "384", "--CLIP_text_path", str(FEATURES), "--subset", "128")
    direct = evaluate_cli("--checkpoint", str(runs["text"] / "checkpoint.pth"), "--subset", "128")
    assert result["head"] == "text" and result["top1"] == pytest.approx(direct["top1"])
    assert result["preset"] == direct["preset"]


def test_test_py_reads_dnn_benchmarks_layout() -> None:
    ckpt = DNN_BENCHMARKS / "ResNet20.th"
    if not ckpt.is_file():
        pytest.skip(f"reference checkpoint absent: {ckpt}")
    fashion_mnist_or_skip()  # CIFAR-10 is not available offline: the 10-class grayscale set exercises the path
    result = evaluate_cli("--checkpoint", str(ckpt), "--model", "resnet20", "--dataset", "fashion-mnist",
                          "--subset", "64")
    assert result["model"] == "resnet20" and result["preset"]["channels"] == 3 and result["n"] == 64
