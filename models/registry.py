"""Model registry in the timm style: ``@register_model`` entry points, ``list_models``, ``build_model``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from .swin_routing import route_window_attention
from .text_head import CosineClassifier, ProjectionClassifier, TextGuidedClassifier, drop_classifier

SmallInput = Literal["native", "adapted", "unsupported"]
# linear: the backbone's own Linear(B -> C); text: the paper's head; cosine: the text head without the
# projection (normalised backbone features, scale, B -> C); projection: the text head without normalisation
# and scale (B -> E -> C, text-initialised)
HEADS = ("linear", "text", "cosine", "projection")
TEXT_HEADS = ("text", "projection")  # heads initialised from class text features [C, E]


class BackboneBuilder(Protocol):
    """Signature of a registered entry point."""

    def __call__(
        self, num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None
    ) -> nn.Module: ...


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one backbone.

    ``small_input``: "native" (a 32x32 network, the flag is ignored), "adapted" (``small_input=True``
    changes the stem/pooling for 28x28 and 32x32 inputs) or "unsupported" (feed resized inputs).
    ``min_input_size``: smallest square input (pixels) the network is meant to run on, built with
    ``small_input=True`` where that is "adapted" (the tests use it).
    """

    name: str
    family: str
    source: str
    small_input: SmallInput
    min_input_size: int
    builder: BackboneBuilder


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    *, family: str, source: str, small_input: SmallInput, min_input_size: int = 32
) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Register the decorated builder under its function name (``def resnet18(...)`` -> "resnet18")."""

    def decorator(fn: BackboneBuilder) -> BackboneBuilder:
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"model {fn.__name__!r} is registered twice")
        _REGISTRY[fn.__name__] = ModelSpec(fn.__name__, family, source, small_input, min_input_size, fn)
        return fn

    return decorator


def list_models(filter: str = "") -> list[str]:
    """Registered model names, sorted; ``filter`` is a shell-style pattern ("resnet*") or a substring."""
    names = sorted(_REGISTRY)
    if not filter:
        return names
    if any(c in filter for c in "*?["):
        return [n for n in names if fnmatch.fnmatchcase(n, filter)]
    return [n for n in names if filter in n]


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; ValueError naming the known models when it is unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(list_models())})") from None


def build_backbone(
    name: str, num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None
) -> nn.Module:
    """The plain registered network whose last layer is Linear(B -> num_classes).

    Swin-V2's window attentions are routed through their modules (:mod:`models.swin_routing`), so that
    every conv/linear computation is a module call whose output leads with the image batch.
    """
    spec = get_model_spec(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if small_input and spec.small_input == "unsupported":
        raise ValueError(
            f"small_input=True is not supported for {name} ({spec.family}); "
            f"feed inputs resized to its native resolution instead"
        )
    model = spec.builder(num_classes, in_chans=in_chans, small_input=small_input, pretrained=pretrained)
    route_window_attention(model)
    return model


def build_model(
    name: str,
    num_classes: int,
    head: str = "linear",
    embed_dim: int = 512,
    text_features: torch.Tensor | None = None,
    in_chans: int = 3,
    small_input: bool = False,
    freeze_head: bool = False,
    pretrained: str | None = None,
) -> nn.Module:
    """A baseline classifier (``head="linear"``) or one of the other heads of ``HEADS`` (see models.text_head).

    ``pretrained`` is a torchvision weights name ("DEFAULT", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2")
    or a timm pretrained tag ("DEFAULT", "ms_in1k") and is downloaded on first use. ``embed_dim`` and
    ``text_features`` apply to the heads of ``TEXT_HEADS`` (without features their class directions start
    as random unit vectors, as the cosine head's always do); ``freeze_head`` to every head but linear.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r} (choose from {', '.join(HEADS)})")
    options = {"in_chans": in_chans, "small_input": small_input, "pretrained": pretrained}
    if text_features is not None and head not in TEXT_HEADS:
        raise ValueError(f"text_features need a head initialised from text ({', '.join(TEXT_HEADS)}), not {head!r}")
    if head == "linear":
        if freeze_head:
            raise ValueError("freeze_head needs a head with class directions (head='text', 'cosine' or 'projection')")
        return build_backbone(name, num_classes, **options)
    if head == "cosine":
        backbone = build_backbone(name, num_classes, **options)
        return CosineClassifier(backbone, num_classes, drop_classifier(backbone), freeze_head=freeze_head)
    backbone = build_backbone(name, embed_dim, **options)
    head_class = TextGuidedClassifier if head == "text" else ProjectionClassifier
    return head_class(backbone, num_classes, embed_dim, text_features=text_features, freeze_head=freeze_head)
