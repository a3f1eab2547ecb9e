"""Image transforms in the manner of torchvision's ``references/classification/presets.py``.

Both presets take PIL images and return normalised float tensors. They first convert the image to
the number of channels the model reads (grayscale replicated to RGB, or RGB reduced to luma), so a
1-channel dataset can feed a 3-channel model and back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

Size = int | Sequence[int]


class ToChannels:
    """Convert a PIL image to 1 (mode "L") or 3 (mode "RGB") channels."""

    def __init__(self, channels: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {channels!r}")
        self.channels = channels
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels})"


def _size(size: Size) -> int | tuple[int, ...]:
    """An int resizes the shorter side; a [height, width] pair resizes to exactly that."""
    return size if isinstance(size, int) else tuple(size)


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    # PILToTensor + ConvertImageDtype gives the same floats as ToTensor (x / 255), as the references do
    return [T.PILToTensor(), T.ConvertImageDtype(torch.float), T.Normalize(list(mean), list(std))]


class ClassificationPresetTrain:
    """Training augmentation.

    ``padding=None`` is the ImageNet recipe (RandomResizedCrop to ``crop_size``); an int is the
    small-image recipe: optional fixed resize (and centre crop) to ``crop_size``, then pad by
    ``padding`` pixels and take a random ``crop_size`` crop (CIFAR's 4 px at 32 px).
    ``auto_augment_policy``: "ra", "ta_wide", "augmix" or an ``AutoAugmentPolicy`` value
    ("imagenet", "cifar10", "svhn").
    """

    def __init__(
        self,
        *,
        crop_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str | InterpolationMode = "bilinear",
        hflip_prob: float = 0.5,
        auto_augment_policy: str | None = None,
        ra_magnitude: int = 9,
        augmix_severity: int = 3,
        random_erase_prob: float = 0.0,
        channels: int = 3,
        resize_size: Size | None = None,
        padding: int | None = None,
    ) -> None:
        interpolation = InterpolationMode(interpolation)
        trans: list = [ToChannels(channels)]
        if padding is None:
            trans.append(T.RandomResizedCrop(crop_size, interpolation=interpolation, antialias=True))
        else:
            if resize_size is not None:
                trans += [T.Resize(_size(resize_size), interpolation=interpolation, antialias=True),
                          T.CenterCrop(crop_size)]
            trans.append(T.RandomCrop(crop_size, padding=padding))
        if hflip_prob > 0:
            trans.append(T.RandomHorizontalFlip(hflip_prob))
        if auto_augment_policy:
            trans.append(_auto_augment(auto_augment_policy, interpolation, ra_magnitude, augmix_severity))
        trans += _to_normalised_tensor(mean, std)
        if random_erase_prob > 0:
            trans.append(T.RandomErasing(p=random_erase_prob))
        self.transforms = T.Compose(trans)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transforms(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms!r})"


class ClassificationPresetEval:
    """Evaluation inputs: optional resize, optional centre crop, normalisation.

    ``resize_size``: None (keep), an int (shorter side, aspect kept) or [height, width];
    ``crop_size``: None (keep) or the side of the centre crop.
    """

    def __init__(
        self,
        *,
        crop_size: int | None,
        resize_size: Size | None,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str | InterpolationMode = "bilinear",
        channels: int = 3,
    ) -> None:
        trans: list = [ToChannels(channels)]
        if resize_size is not None:
            trans.append(T.Resize(_size(resize_size), interpolation=InterpolationMode(interpolation), antialias=True))
        if crop_size is not None:
            trans.append(T.CenterCrop(crop_size))
        trans += _to_normalised_tensor(mean, std)
        self.transforms = T.Compose(trans)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transforms(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms!r})"


def _auto_augment(policy: str, interpolation: InterpolationMode, magnitude: int, severity: int) -> torch.nn.Module:
    if policy == "ra":
        return T.RandAugment(interpolation=interpolation, magnitude=magnitude)
    if policy == "ta_wide":
        return T.TrivialAugmentWide(interpolation=interpolation)
    if policy == "augmix":
        return T.AugMix(interpolation=interpolation, severity=severity)
    try:
        return T.AutoAugment(T.AutoAugmentPolicy(policy), interpolation=interpolation)
    except ValueError:
        choices = ["ra", "ta_wide", "augmix", *(p.value for p in T.AutoAugmentPolicy)]
        raise ValueError(f"unknown auto augment policy {policy!r} (choose from {', '.join(choices)})") from None
