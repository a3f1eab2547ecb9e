"""The datasets this project knows: names, channels, native image size and pixel statistics."""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetSpec:
    """What presets need to know about one dataset.

    ``image_size`` is the side of the images fed to a small-input model (None for photographs of any
    size, which always get an ImageNet-style preset); ``square_resize`` marks datasets whose images
    vary in size and are warped to that square; ``mean``/``std`` are the per-channel pixel statistics
    (in [0, 1]) used by the native-size preset.
    """

    name: str
    channels: int
    image_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    square_resize: bool = False
    hflip_prob: float = 0.5


_SPECS = (
    DatasetSpec("imagenet", 3, None, IMAGENET_MEAN, IMAGENET_STD),
    # CIFAR-10/100 and STL-10: per-channel pixel statistics of the training split
    DatasetSpec("cifar10", 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    DatasetSpec("cifar100", 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    DatasetSpec("food101", 3, None, IMAGENET_MEAN, IMAGENET_STD),
    DatasetSpec("stl10", 3, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    DatasetSpec("fashion-mnist", 1, 28, (0.2860,), (0.3530,)),
    # GTSRB: dnn-benchmarks' statistics; a mirrored sign can mean another class (turn left/right), so no flips
    DatasetSpec("gtsrb", 3, 32, (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669), square_resize=True, hflip_prob=0.0),
)
SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}
DATASETS: tuple[str, ...] = tuple(SPECS)


def get_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; ValueError naming the choices for an unknown name."""
    try:
        return SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})") from None


def dataset_channels(name: str) -> int:
    """Channels of the dataset's images: 1 for fashion-mnist, else 3."""
    return get_spec(name).channels
