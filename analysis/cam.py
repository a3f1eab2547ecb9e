"""Ablation-CAM of a classifier with the ``grad-cam`` package: target layer per family, CAMs, similarity.

The target layer is the output of the last convolutional stage (the last block stage for the
transformers), named in the baseline's way; a text-guided model uses the same layer of its backbone
(``backbone.<layer>``). Swin-V2 keeps its feature maps channels-last ([B, H, W, C]) and layers with
token outputs ([B, N, C]) hold a square grid of tokens: both get a reshape transform to [B, C, H, W]
and grad-cam's ``AblationLayerVit``, which ablates the channel axis where it lies.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from pytorch_grad_cam import AblationCAM
from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from analysis.faults_for_cam import backbone_prefix, canonical_name
from cli_shell import UserError
from models import get_model_spec

# The module whose output is the last stage's feature map, per registry family.
FAMILY_LAYERS: dict[str, str] = {
    "cifar_resnet": "layer3",
    "resnet": "layer4",
    "vgg": "features",
    "alexnet": "features",
    "mobilenet_v2": "features",
    "maxvit": "blocks.3",
    "swin_v2": "norm",
    "focalnet": "norm",
}
_CHANNELS_LAST_FAMILIES = frozenset({"swin_v2"})
LAYOUTS: tuple[str, ...] = ("nchw", "nhwc", "tokens")


class CamError(UserError, ValueError):
    """A CAM request that does not fit the model (one-line message)."""


@dataclass(frozen=True)
class CamLayer:
    """The layer a CAM is computed on: its qualified module name and the layout of its output."""

    name: str
    layout: str  # "nchw", "nhwc" ([B, H, W, C]) or "tokens" ([B, N, C], N a square)


def default_cam_layer(model_name: str) -> str:
    """The target layer of ``model_name``'s family (baseline naming)."""
    family = get_model_spec(model_name).family
    if family not in FAMILY_LAYERS:
        raise CamError(f"no default Ablation-CAM layer for the {family} family ({model_name}); pass --target-layer")
    return FAMILY_LAYERS[family]


@torch.no_grad()
def _output_shape(model: nn.Module, module: nn.Module, example: torch.Tensor) -> tuple[int, ...] | None:
    shapes: list[tuple[int, ...]] = []
    handle = module.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    try:
        model(example)
    finally:
        handle.remove()
    return shapes[-1] if shapes else None


def resolve_cam_layer(model: nn.Module, model_name: str, example: torch.Tensor, name: str | None = None) -> CamLayer:
    """The CAM layer of ``model``: ``name`` (baseline naming, default: the family's) checked against one
    forward pass of ``example``."""
    wanted = canonical_name(name) if name else default_cam_layer(model_name)
    qualified = backbone_prefix(model) + wanted
    modules = dict(model.named_modules())
    if qualified not in modules:
        top = [n for n, _ in model.get_submodule(backbone_prefix(model).rstrip(".")).named_children()]
        raise CamError(f"{model_name} has no layer {wanted!r} (its top-level modules: {', '.join(top)})")
    shape = _output_shape(model, modules[qualified], example)
    if shape is None:
        raise CamError(f"{qualified} never runs as a module in {model_name}'s forward pass (a container?); "
                       f"name one of its children")
    if len(shape) == 4:
        family = get_model_spec(model_name).family
        return CamLayer(qualified, "nhwc" if family in _CHANNELS_LAST_FAMILIES else "nchw")
    if len(shape) == 3 and math.isqrt(shape[1]) ** 2 == shape[1]:
        return CamLayer(qualified, "tokens")
    raise CamError(f"{qualified} outputs {shape}: no square spatial map to draw a CAM on")


def _channels_first(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def _tokens_to_grid(t: torch.Tensor) -> torch.Tensor:
    side = math.isqrt(t.shape[1])
    return t.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)


def ablation_cams(
    model: nn.Module, layer: CamLayer, images: torch.Tensor, classes: list[int], batch_size: int = 32
) -> np.ndarray:
    """Ablation-CAMs [B, H, W] (input resolution, each scaled to [0, 1] by grad-cam) of ``classes``.

    ``batch_size`` is how many ablated copies of an image one forward pass runs. A model whose scores
    are not finite gives a non-finite CAM, which is returned as is.
    """
    if layer.layout not in LAYOUTS:
        raise CamError(f"unknown layout {layer.layout!r} (choose from {', '.join(LAYOUTS)})")
    reshape = {"nchw": None, "nhwc": _channels_first, "tokens": _tokens_to_grid}[layer.layout]
    ablation = AblationLayer() if layer.layout == "nchw" else AblationLayerVit()
    cam = AblationCAM(model, [model.get_submodule(layer.name)], reshape_transform=reshape,
                      ablation_layer=ablation, batch_size=batch_size)
    try:
        # grad-cam draws a progress bar per image and warns on NaN scores; the caller reports both
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()), np.errstate(all="ignore"):
            return cam(images, [ClassifierOutputTarget(c) for c in classes])
    finally:
        cam.activations_and_grads.release()


NO_CLASS = -1  # the top-1 of logits that contain a NaN (as the campaigns record it)


@dataclass(frozen=True)
class Predictions:
    """Top-1 class (``NO_CLASS`` for logits with a NaN), its softmax probability, and whether the logits
    are finite, per image."""

    classes: list[int]
    confidences: list[float]
    finite: list[bool]


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor) -> Predictions:
    """Top-1 predictions of ``model``."""
    logits = model(images)
    probs = torch.softmax(logits.double(), dim=1)
    top = logits.argmax(dim=1)
    confidences = probs.gather(1, top[:, None])[:, 0]
    top[torch.isnan(logits).any(dim=1)] = NO_CLASS
    return Predictions(top.tolist(), confidences.tolist(), torch.isfinite(logits).all(dim=1).tolist())


def cam_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two CAMs: 1 for identical maps (two blank ones too), 0 when one is blank,
    NaN when either is not finite."""
    if np.array_equal(a, b):
        return 1.0  # exact, where the float64 formula could give 1 - 1 ulp
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 or ny == 0:
        return 0.0
    return float(np.dot(x, y) / (nx * ny))
