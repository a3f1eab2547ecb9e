"""Every launch script's final command must parse with train.py's parser (no script can crash on a flag),
and the scripts must cover the paper's Table 1 and Table 2 runs."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402

SCRIPTS = sorted(p for p in (REPO / "scripts" / "train").rglob("*.sh") if p.name != "launch.sh")
TABLE1 = {
    "alexnet", "vgg16_bn", "vgg19_bn", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "mobilenet_v2", "maxvit_t", "swin_v2_t", "swin_v2_s", "focalnet_tiny", "focalnet_small",
}
TABLE2 = {(ds, m) for ds in ("cifar10", "cifar100", "food101", "stl10") for m in ("resnet50", "focalnet_tiny")}


def dry_run(script: Path, *extra: str, ngpu: str = "2") -> list[str]:
    env = {**os.environ, "DRY_RUN": "1", "DATA_PATH": "/data/somewhere", "NGPU": ngpu,
           "TEXT_FEATURES": str(REPO / "text_features" / "assets" / "fashion-mnist_minilm.pth")}
    proc = subprocess.run(["bash", str(script), *extra], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def train_argv(command: list[str]) -> list[str]:
    return command[command.index(str(REPO / "train.py")) + 1 :]


def test_scripts_exist_for_every_table_run() -> None:
    pairs = {(p.parent.name, p.stem.rsplit("_", 1)[0], p.stem.rsplit("_", 1)[1]) for p in SCRIPTS}
    for model in TABLE1:
        for head in ("baseline", "text"):
            assert ("imagenet", model, head) in pairs, (model, head)
    for ds, model in TABLE2:
        for head in ("baseline", "text"):
            assert (ds, model, head) in pairs, (ds, model, head)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO / "scripts" / "train")))
def test_script_arguments_parse(script: Path) -> None:
    import data
    import models

    command = dry_run(script)
    assert command[command.index("--nproc_per_node") + 1] == "2"
    args = train.parse_args(train_argv(command))
    assert args.model in models.list_models(), args.model
    assert args.dataset in data.DATASETS
    assert args.data_path == "/data/somewhere"
    assert args.dataset.replace("-", "_") == script.parent.name
    head = script.stem.rsplit("_", 1)[1]
    assert args.head == ("text" if head == "text" else "linear")
    if head == "text":
        assert args.text_features and Path(args.text_features).is_file()
    for path in args.config:
        assert Path(path).is_file()


def test_extra_options_reach_train_py_and_win() -> None:
    command = dry_run(REPO / "scripts" / "train" / "imagenet" / "resnet50_baseline.sh", "--epochs", "1", "--lr", "0.2")
    args = train.parse_args(train_argv(command))
    assert (args.epochs, args.lr, args.model) == (1, 0.2, "resnet50")


def test_text_script_requires_features_file() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TEXT_FEATURES"} | {"DRY_RUN": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "train" / "imagenet" / "resnet50_text.sh")],
                          capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode != 0 and "TEXT_FEATURES" in proc.stderr


def test_every_script_is_valid_bash() -> None:
    for script in [*SCRIPTS, REPO / "scripts" / "train" / "launch.sh"]:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


# The paper repository's launch scripts, flag for flag: each must parse (its MaxViT one crashed on
# --policy-magnitude, and both used --CLIP_text_path / --embed_size).
PAPER_COMMANDS = {
    "maxvit_clip": "--data-path /d --workers 12 --model maxvit_t --output-dir o --CLIP_text_path f.pth --embed_size 512 "
    "--epochs 400 --batch-size 1024 --opt adamw --lr 3e-3 --weight-decay 0.05 --lr-scheduler cosineannealinglr "
    "--lr-min 1e-5 --lr-warmup-method linear --lr-warmup-epochs 32 --label-smoothing 0.1 --mixup-alpha 0.8 "
    "--clip-grad-norm 1.0 --interpolation bicubic --auto-augment ta_wide --policy-magnitude 15 --model-ema "
    "--val-resize-size 224 --val-crop-size 224 --train-crop-size 224 --amp --model-ema-steps 32 "
    "--transformer-embedding-decay 0 --sync-bn",
    "swin_v2_baseline": "--data-path /d --workers 12 --model swin_v2_t --output-dir o --epochs 300 --batch-size 256 "
    "--opt adamw --lr 0.001 --weight-decay 0.05 --norm-weight-decay 0.0 --bias-weight-decay 0.0 "
    "--transformer-embedding-decay 0.0 --lr-scheduler cosineannealinglr --lr-min 0.00001 --lr-warmup-method linear "
    "--lr-warmup-epochs 20 --lr-warmup-decay 0.01 --amp --label-smoothing 0.1 --mixup-alpha 0.8 --clip-grad-norm 5.0 "
    "--cutmix-alpha 1.0 --random-erase 0.25 --interpolation bicubic --auto-augment ta_wide --model-ema --ra-sampler "
    "--ra-reps 4 --val-resize-size 256 --val-crop-size 256 --train-crop-size 256",
    "mobilenet_v2_baseline": "--data-path /d --workers 12 --model mobilenet_v2 --output-dir o --epochs 300 --lr 0.045 "
    "--batch-size 180 --wd 0.00004 --lr-step-size 1 --lr-gamma 0.98",
    "resnet_clip": "--data-path /d --workers 12 --model resnet50 --output-dir o --batch-size 180 "
    "--CLIP_text_path f.pth --embed_size 512",
}


@pytest.mark.parametrize("name", sorted(PAPER_COMMANDS))
def test_paper_repository_commands_parse(name: str) -> None:
    args = train.parse_args(shlex.split(PAPER_COMMANDS[name]))
    assert args.head == ("text" if "clip" in name else "linear")


def test_test_py_accepts_paper_flags() -> None:
    spec = importlib.util.spec_from_file_location("tgr_test_cli", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.get_args_parser().parse_args(
        ["--data_path", "/d", "--model", "resnet50", "--checkpoint_path", "c.pth", "--batch_size", "64",
         "--num_workers", "2", "--CLIP_model", "--CLIP_text_path", "f.pth", "--embed_size", "512"]
    )
    assert (args.data_path, args.checkpoint, args.head, args.text_features, args.embed_dim) == (
        "/d", "c.pth", "text", "f.pth", 512)


PAPER_SCRIPTS = sorted((REPO / "scripts" / "paper").glob("*.sh"))


def paper_commands(script: Path, **env: str) -> list[list[str]]:
    """The commands a scripts/paper script would run (DRY_RUN=1 prints them as '+ cmd')."""
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DRY_RUN": "1", "DATA_PATH": "/data", **env})
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", [p for p in PAPER_SCRIPTS if p.name != "common.sh"], ids=lambda p: p.name)
def test_paper_scripts_commands_parse(script: Path) -> None:
    import analyze
    import inject
    import report

    parsers = {"inject.py": inject.get_args_parser, "report.py": report.get_args_parser,
               "analyze.py": analyze.get_args_parser}
    commands = paper_commands(script)
    assert commands
    for command in commands:
        name = next(arg for arg in command if arg.endswith(".py"))
        parsers[name]().parse_args(command[command.index(name) + 1 :])


def test_paper_table1_covers_every_backbone_with_its_classifier() -> None:
    commands = paper_commands(REPO / "scripts" / "paper" / "table1.sh")
    fused = [c for c in commands if "--fuse-text-head" in c]
    assert {c[c.index("--checkpoint") + 1].split("/")[-2].removeprefix("imagenet_").removesuffix("_text")
            for c in fused} == TABLE1
    import models

    for name in ("resnet18", "mobilenet_v2", "alexnet"):  # cheap to build; the rest follow the same families
        command = next(c for c in fused if f"imagenet_{name}_text" in c[c.index("--checkpoint") + 1])
        pattern = command[command.index("--layers") + 1]
        model = models.fuse_text_head(models.build_model(name, 10, head="text", embed_dim=16))
        assert re.fullmatch(pattern, models.classifier_name(model)), (name, pattern)
