"""Opening datasets: data root, downloads, Fashion-MNIST from Debian, ImageNet class folders."""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torchvision.datasets as tvd

from cli_shell import UserError
from data.catalog import get_spec
from data.classnames import imagenet_wnids, label_names
from data.presets import check_eval_preset, eval_preset, train_preset
from data.transforms import ClassificationPresetEval, ClassificationPresetTrain

try:  # POSIX: serialise concurrent downloads (e.g. one per torchrun process) into one root
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SPLITS = {"train": "train", "test": "test", "val": "test"}

# Where each dataset lives under the data root, and how to get it by hand (for error messages).
_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "food101": "food-101",
           "stl10": "stl10_binary", "fashion-mnist": "FashionMNIST/raw", "gtsrb": "gtsrb"}
_BY_HAND = {
    "cifar10": "extract cifar-10-python.tar.gz (www.cs.toronto.edu/~kriz/cifar.html) there",
    "cifar100": "extract cifar-100-python.tar.gz (www.cs.toronto.edu/~kriz/cifar.html) there",
    "food101": "extract food-101.tar.gz (data.vision.ee.ethz.ch/cvl/datasets_extra/food-101) there",
    "stl10": "extract stl10_binary.tar.gz (cs.stanford.edu/~acoates/stl10) there",
    "fashion-mnist": "apt-get install dataset-fashion-mnist, or put the four *-ubyte files there",
    "gtsrb": "put GTSRB/Training, GTSRB/Final_Test/Images and GT-final_test.csv (benchmark.ini.rub.de) there",
}


class DatasetUnavailable(UserError):
    """The dataset's files are missing and could not be fetched; the message says where to put them."""


def default_data_root() -> Path:
    """``$TGR_DATA_ROOT``, else ``~/.cache/text-guided-resilience/data``."""
    env = os.environ.get("TGR_DATA_ROOT")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "text-guided-resilience" / "data"


def build_dataset(name: str, split: str, root: str | os.PathLike[str] | None = None, *,
                  train_transforms: bool = False, preset: Mapping[str, Any] | None = None,
                  model_name: str | None = None, small_input: bool = False, in_chans: int | None = None,
                  download: bool | None = None, **train_options: Any) -> torch.utils.data.Dataset:
    """Dataset ``name`` / ``split`` yielding (image tensor, int label).

    split: "train" or "test" ("val" = "test"). Evaluation inputs follow ``preset`` when given, else
    ``eval_preset(name, model_name, small_input, in_chans)``. ``train_transforms=True`` applies
    ``train_preset(..., base=preset, **train_options)`` instead. ``download``: False never fetches;
    None (default) or True fetch missing files for the datasets torchvision can download. Missing
    data raises ``DatasetUnavailable``.
    """
    get_spec(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if train_options and not train_transforms:
        raise TypeError(f"training options {sorted(train_options)} need train_transforms=True")
    root = Path(root).expanduser() if root else default_data_root()
    if train_transforms:
        kwargs = train_preset(name, model_name, small_input, in_chans, base=preset, **train_options)
        transform: Callable = ClassificationPresetTrain(**kwargs)
    else:
        transform = ClassificationPresetEval(**(check_eval_preset(preset) if preset is not None
                                                else eval_preset(name, model_name, small_input, in_chans)))
    if name == "imagenet":
        return _imagenet(root, "train" if SPLITS[split] == "train" else "val", transform)
    if name == "fashion-mnist":
        _unpack_debian_fashion_mnist(root)
    return _torchvision_dataset(name, root, SPLITS[split], transform, download)


def _torchvision_dataset(name: str, root: Path, split: str, transform: Callable,
                         download: bool | None) -> torch.utils.data.Dataset:
    train = split == "train"
    make = {
        "cifar10": partial(tvd.CIFAR10, root, train=train),
        "cifar100": partial(tvd.CIFAR100, root, train=train),
        "food101": partial(tvd.Food101, root, split=split),
        "stl10": partial(tvd.STL10, root, split=split),
        "fashion-mnist": partial(tvd.FashionMNIST, root, train=train),
        "gtsrb": partial(tvd.GTSRB, root, split=split),
    }[name]
    where = f"{name} ({split}) not found under {root / _FOLDER[name]}"
    try:
        # without download first: torchvision's download=True re-hashes every file of a present dataset
        dataset = make(transform=transform, download=False)
    except (RuntimeError, OSError) as missing:
        if download is False:
            raise DatasetUnavailable(f"{where} and download=False; {_BY_HAND[name]}") from missing
        try:
            with _download_lock(root, name):
                dataset = make(transform=transform, download=True)
        except (RuntimeError, OSError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DatasetUnavailable(f"{where} and the download failed ({reason}); {_BY_HAND[name]}") from exc
    classes = getattr(dataset, "classes", None)
    if classes is not None and list(classes) != label_names(name):
        raise DatasetUnavailable(f"{name} under {root}: its class list differs from the expected one "
                                 f"(first classes {list(classes)[:3]}); labels would not match the class names")
    return dataset


@contextlib.contextmanager
def _download_lock(root: Path, name: str) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(root / f".{name}.download.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _unpack_debian_fashion_mnist(root: Path) -> None:
    """Gunzip Debian's Fashion-MNIST files into ``root/FashionMNIST/raw`` where missing (temp + rename)."""
    raw = root / "FashionMNIST" / "raw"
    for filename in FASHION_MNIST_FILES:
        target, source = raw / filename, DEBIAN_FASHION_MNIST / f"{filename}.gz"
        if target.exists() or not source.is_file():
            continue
        tmp = raw / f".{filename}.tmp{os.getpid()}"
        try:
            raw.mkdir(parents=True, exist_ok=True)
            with gzip.open(source) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, target)
        except OSError as exc:
            raise DatasetUnavailable(f"fashion-mnist: cannot unpack {source} into {raw} ({exc})") from exc
        finally:
            tmp.unlink(missing_ok=True)


class ImageNetFolder(tvd.ImageFolder):
    """ImageFolder labelled by ImageNet-1k index: a class folder's label is its WNID's position among the
    1000 sorted WNIDs, so a folder holding only some classes still gets the right labels."""

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        folders = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
        index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
        unknown = [f for f in folders if f not in index]
        if not folders or unknown:
            found = f"folders that are not ImageNet-1k WNIDs ({', '.join(unknown[:3])})" if unknown else "no folders"
            raise DatasetUnavailable(f"imagenet: {directory} holds {found}; expected one folder per WNID "
                                     "(n01440764, ...) holding that class's images (see DATA.md)")
        return folders, {f: index[f] for f in folders}


def _imagenet(root: Path, folder: str, transform: Callable) -> torch.utils.data.Dataset:
    for directory in (root / "imagenet" / folder, root / folder):
        if directory.is_dir():
            try:
                return ImageNetFolder(directory, transform=transform)
            except FileNotFoundError as exc:  # a class folder without images
                raise DatasetUnavailable(f"imagenet: {exc}".splitlines()[0]) from exc
    raise DatasetUnavailable(f"imagenet ({folder}) not found: no {root / 'imagenet' / folder} (nor {root / folder}); "
                             "ImageNet cannot be downloaded automatically, put the ILSVRC2012 images there as one "
                             "folder per WNID (see DATA.md)")
