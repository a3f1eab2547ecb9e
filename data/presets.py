"""Preset dicts: plain, JSON-serialisable descriptions of a model's input pipeline.

The evaluation preset ``{"resize_size", "crop_size", "interpolation", "mean", "std", "channels"}`` is
stored in checkpoints and campaign summaries; ``ClassificationPresetEval(**preset)`` rebuilds the exact
transform from it. Rules (see DATA.md):

* Photographs of any size (imagenet, food101): the model family's ImageNet evaluation geometry
  (``imagenet_geometry``) with ImageNet mean/std.
* Small-image datasets keep their native size (cifar 32, fashion-mnist 28, stl10 96, gtsrb warped to
  32x32) with the dataset's own mean/std when no model is named, when the model is a small-input
  model (the CIFAR ResNets) or when ``small_input=True``.
* Otherwise (an ImageNet-style backbone with its stem unchanged) small images are upscaled to the
  model family's ImageNet crop size (224, Swin-V2 256) and normalised with ImageNet mean/std
  (the dataset's own for a 1-channel model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torchvision.transforms import InterpolationMode

from data.catalog import IMAGENET_MEAN, IMAGENET_STD, DatasetSpec, get_spec

EVAL_KEYS = ("resize_size", "crop_size", "interpolation", "mean", "std", "channels")

# The classic CIFAR ResNets (He et al. 2016, section 4.2), as in dnn-benchmarks: 32x32 inputs.
CIFAR_RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")

# dnn-benchmarks / SFIadvancedmodels evaluate their CIFAR-10 models with this (widespread but not
# pixel-exact) std; their released checkpoints and fault-list counts are only reproduced with it.
DNN_BENCHMARKS_CIFAR10_STD = (0.2023, 0.1994, 0.2010)

# PIL's "L" conversion weights (ITU-R 601-2 luma)
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Geometry:
    """ImageNet evaluation geometry: resize the shorter side, centre crop, interpolation."""

    resize_size: int
    crop_size: int
    interpolation: str


_TORCHVISION_REFERENCE = Geometry(256, 224, "bilinear")

# First matching name prefix wins. Values are those of torchvision's IMAGENET1K_V1 weights transforms
# (tests check them) and, for FocalNet, timm's pretrained config: 224 px, crop_pct 0.9 -> resize 248.
_IMAGENET_GEOMETRY: tuple[tuple[str, Geometry], ...] = (
    ("resnet", _TORCHVISION_REFERENCE),
    ("vgg", _TORCHVISION_REFERENCE),
    ("alexnet", _TORCHVISION_REFERENCE),
    ("mobilenet", _TORCHVISION_REFERENCE),
    ("swin_v2_b", Geometry(272, 256, "bicubic")),
    ("swin_v2", Geometry(260, 256, "bicubic")),
    ("maxvit", Geometry(224, 224, "bicubic")),
    ("focalnet", Geometry(248, 224, "bicubic")),
)


def imagenet_geometry(model_name: str | None) -> Geometry:
    """The model family's ImageNet evaluation geometry; torchvision's reference defaults otherwise."""
    name = (model_name or "").lower()
    for prefix, geometry in _IMAGENET_GEOMETRY:
        if name.startswith(prefix):
            return geometry
    return _TORCHVISION_REFERENCE


def is_small_input_model(model_name: str | None) -> bool:
    """True for models built for 32x32 inputs (the CIFAR ResNets)."""
    return (model_name or "").lower() in CIFAR_RESNETS


def _keeps_native_size(spec: DatasetSpec, model_name: str | None, small_input: bool) -> bool:
    return spec.image_size is not None and (model_name is None or small_input or is_small_input_model(model_name))


def _adapt_stats(mean: Sequence[float], std: Sequence[float], channels: int) -> tuple[list[float], list[float]]:
    """Mean/std for ``channels`` model channels from the dataset's per-channel statistics."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels!r}")
    if len(mean) == channels:
        return list(mean), list(std)
    if len(mean) == 1:  # grayscale replicated to RGB: same statistics in every channel
        return list(mean) * 3, list(std) * 3
    # RGB reduced to luma: the mean is exact; the weighted std is exact only for fully correlated channels
    return [sum(w * m for w, m in zip(_LUMA, mean, strict=True))], [sum(w * s for w, s in zip(_LUMA, std, strict=True))]


def eval_preset(dataset: str, model_name: str | None = None, small_input: bool = False,
                in_chans: int | None = None) -> dict[str, Any]:
    """The evaluation preset of ``model_name`` on ``dataset`` (rules in the module docstring).

    ``in_chans`` is the number of channels the model reads (default: the dataset's).
    """
    spec = get_spec(dataset)
    channels = in_chans or spec.channels
    if _keeps_native_size(spec, model_name, small_input):
        crop = spec.image_size
        resize = [crop, crop] if spec.square_resize else None
        interpolation = "bilinear"
        std = DNN_BENCHMARKS_CIFAR10_STD if dataset == "cifar10" and is_small_input_model(model_name) else spec.std
        mean_std = _adapt_stats(spec.mean, std, channels)
    else:
        geometry = imagenet_geometry(model_name)
        crop, interpolation = geometry.crop_size, geometry.interpolation
        if spec.image_size is None:
            resize = geometry.resize_size
        else:  # upscale small images to the size the backbone was designed for
            resize = [crop, crop] if spec.square_resize else crop
        # ImageNet statistics are what a 3-channel backbone (and its pretrained weights) expects; a
        # 1-channel stem has no such weights, so it gets the dataset's own statistics
        stats = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (spec.mean, spec.std)
        mean_std = _adapt_stats(*stats, channels)
    return {"resize_size": resize, "crop_size": crop, "interpolation": interpolation,
            "mean": mean_std[0], "std": mean_std[1], "channels": channels}


PRESET_OVERRIDES = ("resize_size", "crop_size", "interpolation")


def preset_for(meta: Mapping[str, Any], dataset: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The evaluation preset a model described by ``meta`` (a checkpoint's) gets on ``dataset``.

    The checkpoint's own preset when it has one and was trained on ``dataset`` (or names no dataset),
    else :func:`eval_preset` for its model, small-input stem and input channels. ``overrides`` (resize
    size, crop size, interpolation) replace the preset's values where they are not None.
    """
    if meta.get("preset") and meta.get("dataset") in (None, dataset):
        preset = dict(meta["preset"])
    else:
        preset = eval_preset(dataset, meta.get("model"), small_input=bool(meta.get("small_input")),
                             in_chans=meta.get("in_chans"))
    unknown = set(overrides or {}) - set(PRESET_OVERRIDES)
    if unknown:
        raise ValueError(f"only {', '.join(PRESET_OVERRIDES)} can be overridden, not {', '.join(sorted(unknown))}")
    preset.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return preset


def check_eval_preset(preset: Mapping[str, Any]) -> dict[str, Any]:
    """A validated plain copy of an evaluation preset; ValueError naming the first problem."""
    if not isinstance(preset, Mapping):
        raise ValueError(f"a preset must be a dict, not {type(preset).__name__}")
    missing = [k for k in EVAL_KEYS if k not in preset]
    unknown = sorted(set(preset) - set(EVAL_KEYS))
    if missing or unknown:
        raise ValueError(f"bad preset: missing keys {missing}, unknown keys {unknown} (expected {list(EVAL_KEYS)})")
    channels = preset["channels"]
    if not _positive_int(channels) or channels not in (1, 3):
        raise ValueError(f"bad preset: channels must be 1 or 3, not {channels!r}")
    resize = preset["resize_size"]
    if not (resize is None or _positive_int(resize)
            or (isinstance(resize, Sequence) and len(resize) == 2 and all(map(_positive_int, resize)))):
        raise ValueError(f"bad preset: resize_size must be None, an int or [height, width], not {resize!r}")
    if not (preset["crop_size"] is None or _positive_int(preset["crop_size"])):
        raise ValueError(f"bad preset: crop_size must be None or a positive int, not {preset['crop_size']!r}")
    try:
        InterpolationMode(preset["interpolation"])
    except ValueError:
        choices = ", ".join(m.value for m in InterpolationMode)
        raise ValueError(f"bad preset: interpolation {preset['interpolation']!r} (choose from {choices})") from None
    for key in ("mean", "std"):
        values = preset[key]
        if not (isinstance(values, Sequence) and len(values) == channels):
            raise ValueError(f"bad preset: {key} must list {channels} value(s), not {values!r}")
    if any(s <= 0 for s in preset["std"]):
        raise ValueError(f"bad preset: std must be positive, not {preset['std']!r}")
    return {"resize_size": list(resize) if isinstance(resize, Sequence) else resize,
            "crop_size": preset["crop_size"], "interpolation": str(preset["interpolation"]),
            "mean": [float(m) for m in preset["mean"]], "std": [float(s) for s in preset["std"]],
            "channels": channels}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def train_preset(dataset: str, model_name: str | None = None, small_input: bool = False,
                 in_chans: int | None = None, *, base: Mapping[str, Any] | None = None,
                 crop_size: int | None = None, interpolation: str | None = None, hflip_prob: float | None = None,
                 padding: int | None = None, auto_augment: str | None = None, ra_magnitude: int = 9,
                 augmix_severity: int = 3, random_erase: float = 0.0) -> dict[str, Any]:
    """Keyword arguments of ``ClassificationPresetTrain`` for training ``model_name`` on ``dataset``.

    Normalisation, channels, interpolation and sizes come from ``base`` (an evaluation preset; default
    ``eval_preset(dataset, model_name, small_input, in_chans)``). Images kept at their native size get
    the small-image recipe (random crop after padding by 1/8 of the side, CIFAR's 4 px at 32 px),
    others ImageNet's RandomResizedCrop. Horizontal flips default to the dataset's (none for GTSRB).
    """
    spec = get_spec(dataset)
    if base is None:
        base = eval_preset(dataset, model_name, small_input, in_chans)
    else:
        base = check_eval_preset(base)
        if in_chans not in (None, base["channels"]):
            raise ValueError(f"in_chans={in_chans} contradicts the preset's channels={base['channels']}")
    crop = crop_size or base["crop_size"] or spec.image_size
    if crop is None:
        raise ValueError(f"the {dataset} preset has no crop size: pass crop_size for training")
    if padding is None and _keeps_native_size(spec, model_name, small_input):
        padding = crop // 8
    resize = base["resize_size"] if padding is not None else None  # RandomResizedCrop needs no resize
    return {"crop_size": crop, "resize_size": resize, "padding": padding,
            "interpolation": interpolation or base["interpolation"],
            "hflip_prob": spec.hflip_prob if hflip_prob is None else hflip_prob,
            "auto_augment_policy": auto_augment, "ra_magnitude": ra_magnitude, "augmix_severity": augmix_severity,
            "random_erase_prob": random_erase, "mean": list(base["mean"]), "std": list(base["std"]),
            "channels": base["channels"]}
