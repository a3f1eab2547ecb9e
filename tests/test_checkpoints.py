"""models.checkpoint: our format round trip, the paper repository's and dnn-benchmarks' layouts,
damaged files and pickles that would run code."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pytest
import torch
from reference_assets import DNN_BENCHMARKS
from torch import nn
from torch.optim.swa_utils import AveragedModel

import models
from models import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def dnn_benchmarks_dir() -> Path:
    path = DNN_BENCHMARKS
    if not path.is_dir():
        pytest.skip(f"reference assets not found at {path} (set TGR_REFERENCE_DIR)")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(model: nn.Module, x: torch.Tensor = X32) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def text_model(name: str = "resnet20", embed_dim: int = 16) -> models.TextGuidedClassifier:
    torch.manual_seed(0)
    return models.build_model(name, 10, head="text", embed_dim=embed_dim, text_features=torch.randn(10, embed_dim))


def our_meta(model_name: str = "resnet20", head: str = "text", embed_dim: int | None = 16) -> dict:
    return {
        "model": model_name, "num_classes": 10, "head": head, "embed_dim": embed_dim, "in_chans": 3,
        "small_input": False, "dataset": "cifar10", "preset": {"crop_size": 32}, "text_features": {"file": "f.pth"},
    }


# ------------------------------------------------------------------------------------------ our format


def test_round_trip_with_ema_and_optimizer(tmp_path: Path) -> None:
    model = text_model()
    ema = AveragedModel(model, use_buffers=True)
    with torch.no_grad():
        model.logit_scale.add_(0.5)  # the live weights now differ from the EMA copy
    optimizer = torch.optim.SGD(models.param_groups(model, 1e-4), lr=0.1, momentum=0.9)
    path = models.save_checkpoint(
        tmp_path / "run" / "checkpoint.pth", model, our_meta(),
        model_ema=ema.state_dict(), optimizer=optimizer.state_dict(), epoch=3, args={"lr": 0.1},
    )
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pth"]  # no temp file left behind
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == models.CHECKPOINT_FORMAT and raw["epoch"] == 3

    loaded, meta = models.load_checkpoint(path)
    assert isinstance(loaded, models.TextGuidedClassifier) and not loaded.training
    assert torch.equal(outputs(loaded), outputs(model))
    assert {k: meta[k] for k in our_meta()} == our_meta()
    assert meta["checkpoint_sha256"] == sha256(path)

    loaded_ema, meta_ema = models.load_checkpoint(path, use_ema=True)
    assert meta_ema["ema"] is True
    assert torch.equal(outputs(loaded_ema), outputs(ema.module))
    assert not torch.equal(outputs(loaded_ema), outputs(model))


def test_save_rejects_objects_and_incomplete_meta(tmp_path: Path) -> None:
    model = models.build_model("resnet20", 10)
    meta = our_meta(head="linear", embed_dim=None)
    with pytest.raises(TypeError, match=r"checkpoint\['args'\] is a Namespace"):
        models.save_checkpoint(tmp_path / "a.pth", model, meta, args=argparse.Namespace(lr=0.1))
    with pytest.raises(ValueError, match="meta lacks num_classes"):
        models.save_checkpoint(tmp_path / "a.pth", model, {"model": "resnet20", "head": "linear"})
    assert list(tmp_path.iterdir()) == []


def test_requested_arguments_must_agree(tmp_path: Path) -> None:
    path = models.save_checkpoint(tmp_path / "c.pth", text_model(), our_meta())
    models.load_checkpoint(path, model_name="resnet20", num_classes=10, head="text", embed_dim=16)
    with pytest.raises(CheckpointError, match="num_classes=10 but num_classes=100 was requested"):
        models.load_checkpoint(path, num_classes=100)
    with pytest.raises(CheckpointError, match="head='text' but head='linear'"):
        models.load_checkpoint(path, head="linear")
    with pytest.raises(CheckpointError, match="no 'model_ema' entry"):
        models.load_checkpoint(path, use_ema=True)


# -------------------------------------------------------------------------------------- paper layout


def test_paper_training_dict_with_namespace(tmp_path: Path) -> None:
    """The paper repository's checkpoint: keys backbone.*/logit_scale/head.weight, args a Namespace."""
    model = text_model("resnet18", embed_dim=32)
    ema = AveragedModel(model, use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(model="resnet18", embed_size=32, lr=0.1, CLIP_text_path="gpt3.pth")
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": {}, "epoch": 89, "args": args}, path)

    loaded, meta = models.load_checkpoint(path, dataset="imagenet")  # the architecture comes from args.model
    assert torch.equal(outputs(loaded), outputs(model))
    assert (meta["model"], meta["head"], meta["num_classes"], meta["embed_dim"]) == ("resnet18", "text", 10, 32)
    assert meta["source_info"]["args"]["CLIP_text_path"] == "gpt3.pth" and meta["source_info"]["epoch"] == 89
    assert meta["preset"]["channels"] == 3 and meta["dataset"] == "imagenet"
    assert meta["checkpoint_sha256"] == sha256(path)
    loaded_ema, _ = models.load_checkpoint(path, use_ema=True)
    assert torch.equal(outputs(loaded_ema), outputs(model))


def test_bare_state_dict_needs_a_model_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.build_model("resnet18", 7)
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="pass model_name"):
        models.load_checkpoint(path)
    loaded, meta = models.load_checkpoint(path, model_name="resnet18")
    assert torch.equal(outputs(loaded), outputs(model))
    assert (meta["head"], meta["num_classes"], meta["in_chans"], meta["small_input"]) == ("linear", 7, 3, False)
    with pytest.raises(CheckpointError, match=r"does not fit resnet18.*shape mismatch.*conv1\.weight"):
        models.load_checkpoint(path, model_name="resnet18", small_input=True)


# ------------------------------------------------------------------------------------- dnn-benchmarks


@pytest.mark.parametrize("depth", [20, 32, 44])
def test_dnn_benchmarks_checkpoints_load_strictly(depth: int) -> None:
    path = dnn_benchmarks_dir() / f"ResNet{depth}.th"
    model, meta = models.load_checkpoint(path, model_name=f"resnet{depth}")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    for key in ("conv1.weight", "layer2.0.conv1.weight", "layer3.1.conv2.weight", "linear.weight"):
        assert torch.equal(model.state_dict()[key], state[f"module.{key}"])
    assert (meta["model"], meta["head"], meta["num_classes"], meta["small_input"]) == (f"resnet{depth}", "linear", 10, True)
    assert meta["dataset"] == "cifar10" and meta["preset"]["channels"] == 3
    assert meta["source_info"]["best_prec1"] > 90
    assert meta["checkpoint_sha256"] == sha256(path)
    assert torch.isfinite(outputs(model)).all()


def test_dnn_benchmarks_wrong_depth_is_one_line() -> None:
    path = dnn_benchmarks_dir() / "ResNet20.th"
    with pytest.raises(CheckpointError) as err:
        models.load_checkpoint(path, model_name="resnet32")
    assert "does not fit resnet32" in str(err.value) and "missing: layer1.3" in str(err.value)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ damaged, unsafe


def test_truncated_and_foreign_files(tmp_path: Path) -> None:
    good = models.save_checkpoint(tmp_path / "good.pth", text_model(), our_meta())
    files = {"truncated.pth": good.read_bytes()[:5000], "empty.pth": b"", "notes.pth": b"not a checkpoint"}
    ref = DNN_BENCHMARKS / "ResNet20.th"
    if ref.is_file():  # the legacy (non-zip) serialisation fails differently when cut short
        files["legacy_truncated.th"] = ref.read_bytes()[:400_000]
    for name, payload in files.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(CheckpointError, match="cannot read") as err:
            models.load_checkpoint(tmp_path / name, model_name="resnet20")
        assert "\n" not in str(err.value), name
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        models.load_checkpoint(tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not found"):
        models.load_checkpoint(tmp_path / "missing.pth")


class _Payload:
    """Unpickling this executes Python source that creates ``marker``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_code_running_pickle_is_refused_unless_allowed(tmp_path: Path) -> None:
    model = models.build_model("resnet20", 10)
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": model.state_dict(), "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="could run arbitrary code.*--allow-unsafe-checkpoint") as err:
        models.load_checkpoint(path, model_name="resnet20")
    assert "Python object exec" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    loaded, _ = models.load_checkpoint(path, model_name="resnet20", allow_unsafe=True)
    assert marker.exists()
    assert torch.equal(outputs(loaded), outputs(model))
