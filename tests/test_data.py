"""data/: class names, presets, and real datasets (Fashion-MNIST from the Debian package, offline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import models as tvm
from torchvision import transforms as T

import data
from data import sources

EXPECTED_CLASSES = {"imagenet": 1000, "cifar10": 10, "cifar100": 100, "food101": 101, "stl10": 10,
                    "fashion-mnist": 10, "gtsrb": 43}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data_root")


@pytest.fixture(autouse=True)
def isolated_root(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TGR_DATA_ROOT", str(data_root))


@pytest.fixture
def debian_fashion_mnist() -> None:
    if not all((sources.DEBIAN_FASHION_MNIST / f"{f}.gz").is_file() for f in sources.FASHION_MNIST_FILES):
        pytest.skip(f"Fashion-MNIST Debian package absent ({sources.DEBIAN_FASHION_MNIST}): "
                    "apt-get install dataset-fashion-mnist")


def random_image(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = 3 if mode == "RGB" else 1
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


# ------------------------------------------------------------------------------------------- datasets


def test_default_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TGR_DATA_ROOT", str(tmp_path))
    assert data.default_data_root() == tmp_path
    monkeypatch.delenv("TGR_DATA_ROOT")
    assert data.default_data_root() == Path.home() / ".cache" / "text-guided-resilience" / "data"


@pytest.mark.usefixtures("debian_fashion_mnist")
def test_fashion_mnist_offline(data_root: Path) -> None:
    test = data.build_dataset("fashion-mnist", "test")
    raw = data_root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(sources.FASHION_MNIST_FILES)  # no temp files left
    train = data.build_dataset("fashion-mnist", "train")
    assert (len(train), len(test), len(data.build_dataset("fashion-mnist", "val"))) == (60000, 10000, 10000)
    assert data.num_classes("fashion-mnist") == 10 and data.dataset_channels("fashion-mnist") == 1

    x, y = test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    assert {test[i][1] for i in range(200)} == set(range(10))
    # the preset's normalisation of the raw pixels, nothing else
    pixels = test.data[0].float() / 255
    torch.testing.assert_close(x[0], (pixels - 0.2860) / 0.3530, rtol=0, atol=1e-6)


@pytest.mark.usefixtures("debian_fashion_mnist")
def test_fashion_mnist_as_three_channel_32px() -> None:
    preset = data.eval_preset("fashion-mnist", "resnet20", in_chans=3)
    assert preset["mean"] == [0.2860] * 3 and preset["std"] == [0.3530] * 3
    preset.update(resize_size=32, crop_size=32)
    x, _ = data.build_dataset("fashion-mnist", "test", preset=preset)[0]
    assert x.shape == (3, 32, 32)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


@pytest.mark.usefixtures("debian_fashion_mnist")
def test_eval_preset_json_round_trip_reproduces_inputs() -> None:
    preset = {**data.eval_preset("fashion-mnist", "resnet50", in_chans=3), "interpolation": "bicubic"}
    stored = json.loads(json.dumps(preset))
    assert stored == preset
    a = data.build_dataset("fashion-mnist", "test", preset=preset)
    b = data.build_dataset("fashion-mnist", "test", preset=stored)
    for i in (0, 1, 9999):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert a[0][0].shape == (3, 224, 224)


@pytest.mark.usefixtures("debian_fashion_mnist")
def test_training_transforms() -> None:
    train = data.build_dataset("fashion-mnist", "train", train_transforms=True, model_name="resnet20",
                               in_chans=3, auto_augment="ta_wide", random_erase=0.5)
    torch.manual_seed(0)
    x, y = train[0]
    assert x.shape == (3, 28, 28) and isinstance(y, int)
    assert not torch.equal(x, train[0][0])  # random augmentation
    with pytest.raises(TypeError, match="train_transforms=True"):
        data.build_dataset("fashion-mnist", "train", auto_augment="ra")


def test_fashion_mnist_missing_without_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    with pytest.raises(data.DatasetUnavailable, match=r"FashionMNIST/raw and download=False; apt-get install"):
        data.build_dataset("fashion-mnist", "test", tmp_path / "root", download=False)


def test_missing_imagenet_root(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetUnavailable, match="cannot be downloaded") as info:
        data.build_dataset("imagenet", "val", tmp_path)
    assert str(tmp_path / "imagenet" / "val") in str(info.value) and "\n" not in str(info.value)


def test_imagenet_folder_labels_are_wnid_indices(tmp_path: Path) -> None:
    wnids = data.imagenet_wnids()
    for wnid in (wnids[1], wnids[999]):  # a subset of the classes keeps the 1000-class indices
        folder = tmp_path / "imagenet" / "train" / wnid
        folder.mkdir(parents=True)
        random_image((40, 30)).save(folder / "a.png")
    ds = data.build_dataset("imagenet", "train", tmp_path, model_name="resnet18")
    assert sorted(y for _, y in ds) == [1, 999]
    assert ds[0][0].shape == (3, 224, 224)

    (tmp_path / "imagenet" / "train" / "cats").mkdir()
    with pytest.raises(data.DatasetUnavailable, match="not ImageNet-1k WNIDs"):
        data.build_dataset("imagenet", "train", tmp_path)


def test_unknown_names_are_clear_errors() -> None:
    for call in (data.get_class_names, data.num_classes, data.dataset_channels, data.eval_preset):
        with pytest.raises(ValueError, match=r"unknown dataset 'mnist' \(choose from imagenet, cifar10"):
            call("mnist")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.build_dataset("mnist", "test")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        data.build_dataset("cifar10", "dev")


# ---------------------------------------------------------------------------------------- class names


def test_class_names() -> None:
    assert tuple(EXPECTED_CLASSES) == data.DATASETS
    for name, count in EXPECTED_CLASSES.items():
        names = data.get_class_names(name)
        assert len(names) == len(set(names)) == data.num_classes(name) == count
        assert len(data.label_names(name)) == count
    imagenet = data.get_class_names("imagenet")
    assert imagenet[0] == "tench" and imagenet[999] == "toilet tissue"
    wnids = data.imagenet_wnids()
    assert wnids[0] == "n01440764" and list(wnids) == sorted(wnids)
    # torchvision's label order: sorted folder names (Food-101), alphabetical fine labels (CIFAR-100)
    for name in ("cifar100", "food101"):
        assert data.label_names(name) == sorted(data.label_names(name))
    assert data.get_class_names("food101")[:2] == ["apple pie", "baby back ribs"]
    assert data.get_class_names("cifar100")[1] == "aquarium fish"
    assert data.get_class_names("fashion-mnist") == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert data.get_class_names("gtsrb")[14] == "Stop"


# -------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("model", ["resnet18", "resnet50", "vgg16_bn", "alexnet", "mobilenet_v2",
                                   "swin_v2_t", "swin_v2_s", "swin_v2_b", "maxvit_t"])
def test_imagenet_preset_matches_torchvision_weights(model: str) -> None:
    ref = tvm.get_model_weights(model)["IMAGENET1K_V1"].transforms()
    preset = data.eval_preset("imagenet", model)
    assert [preset["resize_size"]] == ref.resize_size and [preset["crop_size"]] == ref.crop_size
    assert preset["interpolation"] == ref.interpolation.value
    assert preset["mean"] == ref.mean and preset["std"] == ref.std and preset["channels"] == 3


def test_focalnet_preset_matches_timm() -> None:
    timm = pytest.importorskip("timm")
    cfg = timm.models.get_pretrained_cfg("focalnet_tiny_srf")
    preset = data.eval_preset("imagenet", "focalnet_t")
    assert preset["crop_size"] == cfg.input_size[-1]
    assert preset["resize_size"] == math.floor(cfg.input_size[-1] / cfg.crop_pct) == 248
    assert preset["interpolation"] == cfg.interpolation


def test_small_dataset_rules() -> None:
    native = data.eval_preset("cifar10")
    assert (native["resize_size"], native["crop_size"], native["std"]) == (None, 32, [0.2470, 0.2435, 0.2616])
    assert data.eval_preset("cifar100", "resnet50", small_input=True)["crop_size"] == 32
    assert data.eval_preset("cifar10", "resnet56")["std"] == [0.2023, 0.1994, 0.2010]  # dnn-benchmarks'
    big = data.eval_preset("cifar10", "resnet50")
    assert (big["resize_size"], big["crop_size"], big["mean"]) == (224, 224, [0.485, 0.456, 0.406])
    assert data.eval_preset("stl10", "swin_v2_t")["crop_size"] == 256
    assert data.eval_preset("gtsrb")["resize_size"] == [32, 32]
    assert data.eval_preset("food101")["resize_size"] == 256
    assert data.eval_preset("cifar10", in_chans=1)["mean"] == [pytest.approx(0.299 * 0.4914 + 0.587 * 0.4822
                                                                             + 0.114 * 0.4465)]
    assert data.train_preset("gtsrb")["hflip_prob"] == 0.0
    assert data.train_preset("cifar10", "resnet20")["padding"] == 4
    assert data.train_preset("imagenet", "swin_v2_t")["crop_size"] == 256


def test_cifar_resnet_preset_is_dnn_benchmarks_transform() -> None:
    ours = data.ClassificationPresetEval(**data.eval_preset("cifar10", "resnet20"))
    theirs = T.Compose([T.CenterCrop(32), T.ToTensor(),
                        T.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))])
    img = random_image((32, 32))
    assert torch.equal(ours(img), theirs(img))


def test_gray_and_rgb_conversions() -> None:
    to_rgb = data.ClassificationPresetEval(crop_size=None, resize_size=[8, 12], mean=[0.5] * 3, std=[0.5] * 3,
                                           interpolation="bilinear", channels=3)
    x = to_rgb(random_image((20, 20), "L"))
    assert x.shape == (3, 8, 12) and torch.equal(x[0], x[2])
    to_gray = data.ClassificationPresetEval(crop_size=4, resize_size=None, mean=[0.5], std=[0.5],
                                            interpolation="bilinear", channels=1)
    assert to_gray(random_image((6, 6))).shape == (1, 4, 4)


def test_bad_presets_are_rejected() -> None:
    good = data.eval_preset("cifar10")
    assert data.check_eval_preset(good) == good
    for bad, message in (({k: v for k, v in good.items() if k != "std"}, "missing keys"),
                         ({**good, "crop": 3}, "unknown keys"),
                         ({**good, "channels": 1}, "mean must list 1 value"),
                         ({**good, "interpolation": "cubic"}, "interpolation 'cubic'"),
                         ({**good, "resize_size": [32]}, "resize_size")):
        with pytest.raises(ValueError, match=message):
            data.build_dataset("cifar10", "test", preset=bad)


def test_preset_for_takes_the_checkpoints_preset_only_on_its_dataset() -> None:
    own = {**data.eval_preset("fashion-mnist", "resnet20", in_chans=1), "crop_size": 30}
    meta = {"model": "resnet20", "in_chans": 1, "small_input": False, "dataset": "fashion-mnist", "preset": own}
    assert data.preset_for(meta, "fashion-mnist") == own
    assert data.preset_for({**meta, "dataset": None}, "fashion-mnist") == own
    assert data.preset_for(meta, "cifar10") == data.eval_preset("cifar10", "resnet20", in_chans=1)
    assert data.preset_for({"model": "resnet20", "small_input": True}, "cifar10") == data.eval_preset(
        "cifar10", "resnet20", small_input=True)
    changed = data.preset_for(meta, "fashion-mnist", {"crop_size": 28, "resize_size": None, "interpolation": "nearest"})
    assert changed == {**own, "crop_size": 28, "interpolation": "nearest"}
    assert meta["preset"] == own  # the checkpoint's preset is not modified
    with pytest.raises(ValueError, match="only resize_size, crop_size, interpolation can be overridden"):
        data.preset_for(meta, "fashion-mnist", {"mean": [0.5]})
