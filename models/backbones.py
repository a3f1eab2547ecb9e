"""The paper's ImageNet backbones (torchvision, timm) with grayscale and small-input adaptations.

``in_chans != 3`` replaces the first convolution (with pretrained weights, the RGB kernel is adapted
as timm does: summed for one channel, repeated and rescaled otherwise).

``small_input=True`` per family, for 28x28 and 32x32 inputs:
- ResNet: 3x3 stride-1 first conv and no max-pool (the usual CIFAR variant; total stride 8).
- VGG: max-pools use ceil_mode (identical on 32x32, lets 28x28 reach 1x1 instead of 0x0), global
  average pooling instead of the 7x7 adaptive pool, and ``classifier.0`` becomes Linear(512, 4096).
- AlexNet: 3x3 stride-1 first conv (the 11x11 stride-4 stem leaves too little for the last max-pool),
  global average pooling, and ``classifier.1`` becomes Linear(256, 4096).
- MobileNet-V2: stride 1 in the stem and in the first stride-2 block (total stride 8, as in common
  CIFAR ports).
- MaxViT, Swin-V2, FocalNet: not supported (ValueError); feed inputs resized to 224.
Layers replaced for small inputs start from the family's initialisation, not from pretrained weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision.models as tvm
from torch import nn

from .registry import register_model
from .text_head import classifier_name

_STEM = {
    "resnet": "conv1",
    "vgg": "features.0",
    "alexnet": "features.0",
    "mobilenet_v2": "features.0.0",
    "maxvit": "stem.0.0",
    "swin_v2": "features.0.0",
}


def _kaiming_fan_out(m: nn.Module) -> None:
    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _normal(std: float) -> Callable[[nn.Module], None]:
    return lambda m: nn.init.normal_(m.weight, 0.0, std)


def _trunc_normal(m: nn.Module) -> None:
    nn.init.trunc_normal_(m.weight, std=0.02)


# The initialisation each torchvision family applies in its constructor; families not listed keep
# PyTorch's default layer init, as torchvision does for them.
_CONV_INIT: dict[str, Callable[[nn.Module], None]] = {
    "resnet": _kaiming_fan_out,
    "vgg": _kaiming_fan_out,
    "mobilenet_v2": _kaiming_fan_out,
    "maxvit": _normal(0.02),
}
_LINEAR_INIT: dict[str, Callable[[nn.Module], None]] = {
    "vgg": _normal(0.01),
    "mobilenet_v2": _normal(0.01),
    "maxvit": _normal(0.02),
    "swin_v2": _trunc_normal,
}


def _init_layer(layer: nn.Conv2d | nn.Linear, family: str) -> None:
    init = (_CONV_INIT if isinstance(layer, nn.Conv2d) else _LINEAR_INIT).get(family)
    if init is not None:
        init(layer)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def _replace_conv(
    model: nn.Module,
    name: str,
    family: str,
    *,
    in_chans: int,
    keep_weights: bool,
    kernel_size: int | None = None,
    stride: int | None = None,
    padding: int | None = None,
) -> None:
    """Swap conv ``name`` for one with ``in_chans`` inputs (and optionally another geometry)."""
    old: nn.Conv2d = model.get_submodule(name)
    conv = nn.Conv2d(
        in_chans,
        old.out_channels,
        kernel_size or old.kernel_size,
        stride=stride or old.stride,
        padding=old.padding if padding is None else padding,
        bias=old.bias is not None,
    )
    _init_layer(conv, family)
    if keep_weights and conv.weight.shape[2:] == old.weight.shape[2:]:
        from timm.models import adapt_input_conv

        conv.weight.data.copy_(adapt_input_conv(in_chans, old.weight.data))
        if old.bias is not None:
            conv.bias.data.copy_(old.bias.data)
    model.set_submodule(name, conv)


def _replace_linear(model: nn.Module, name: str, family: str, in_features: int, out_features: int) -> None:
    layer = nn.Linear(in_features, out_features)
    _init_layer(layer, family)
    model.set_submodule(name, layer)


def _small_input(model: nn.Module, family: str, in_chans: int, keep_weights: bool) -> None:
    """Adapt an ImageNet network to 28x28/32x32 inputs (see the module docstring)."""
    stem = _STEM[family]
    if family == "resnet":
        _replace_conv(model, stem, family, in_chans=in_chans, keep_weights=False, kernel_size=3, stride=1, padding=1)
        model.maxpool = nn.Identity()
    elif family == "vgg":
        if in_chans != 3:
            _replace_conv(model, stem, family, in_chans=in_chans, keep_weights=keep_weights)
        for m in model.features:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        _replace_linear(model, "classifier.0", family, 512, 4096)
    elif family == "alexnet":
        _replace_conv(model, stem, family, in_chans=in_chans, keep_weights=False, kernel_size=3, stride=1, padding=1)
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        _replace_linear(model, "classifier.1", family, 256, 4096)
    elif family == "mobilenet_v2":
        if in_chans != 3:
            _replace_conv(model, stem, family, in_chans=in_chans, keep_weights=keep_weights)
        model.get_submodule(stem).stride = (1, 1)
        # the depthwise conv of the first stride-2 inverted residual (16 -> 24 channels)
        model.get_submodule("features.2.conv.1.0").stride = (1, 1)
    else:
        raise ValueError(f"small_input=True is not supported for the {family} family")


def _torchvision_weights(name: str, tag: str) -> tvm.WeightsEnum:
    """Resolve "DEFAULT", "IMAGENET1K_V1" or "ResNet50_Weights.IMAGENET1K_V1" for model ``name``."""
    enum = tvm.get_model_weights(name)
    try:
        weights = tvm.get_weight(tag) if "." in tag else enum[tag]
    except (KeyError, ValueError):
        weights = None
    if not isinstance(weights, enum):
        available = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise ValueError(f"unknown pretrained weights {tag!r} for {name} (available: {available})")
    return weights


def _torchvision(
    name: str, family: str, num_classes: int, in_chans: int, small_input: bool, pretrained: str | None
) -> nn.Module:
    if pretrained:
        model = tvm.get_model(name, weights=_torchvision_weights(name, pretrained))
        last = model.get_submodule(classifier_name(model))
        if last.out_features != num_classes:
            _replace_linear(model, classifier_name(model), family, last.in_features, num_classes)
    else:
        model = tvm.get_model(name, weights=None, num_classes=num_classes)
    if small_input:
        _small_input(model, family, in_chans, keep_weights=bool(pretrained))
    elif in_chans != 3:
        _replace_conv(model, _STEM[family], family, in_chans=in_chans, keep_weights=bool(pretrained))
    return model


def _timm(timm_name: str, num_classes: int, in_chans: int, pretrained: str | None) -> nn.Module:
    import timm  # imported on use: it is slow to import and only FocalNet needs it

    if pretrained and pretrained != "DEFAULT":
        timm_name = f"{timm_name}.{pretrained}"
    return timm.create_model(timm_name, pretrained=bool(pretrained), num_classes=num_classes, in_chans=in_chans)


@register_model(family="alexnet", source="torchvision", small_input="adapted")
def alexnet(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _torchvision("alexnet", "alexnet", num_classes, in_chans, small_input, pretrained)


@register_model(family="vgg", source="torchvision", small_input="adapted")
def vgg16_bn(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _torchvision("vgg16_bn", "vgg", num_classes, in_chans, small_input, pretrained)


@register_model(family="vgg", source="torchvision", small_input="adapted")
def vgg19_bn(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _torchvision("vgg19_bn", "vgg", num_classes, in_chans, small_input, pretrained)


@register_model(family="resnet", source="torchvision", small_input="adapted")
def resnet18(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _torchvision("resnet18", "resnet", num_classes, in_chans, small_input, pretrained)


@register_model(family="resnet", source="torchvision", small_input="adapted")
def resnet34(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _torchvision("resnet34", "resnet", num_classes, in_chans, small_input, pretrained)


@register_model(family="resnet", source="torchvision", small_input="adapted")
def resnet50(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _torchvision("resnet50", "resnet", num_classes, in_chans, small_input, pretrained)


@register_model(family="resnet", source="torchvision", small_input="adapted")
def resnet101(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _torchvision("resnet101", "resnet", num_classes, in_chans, small_input, pretrained)


@register_model(family="resnet", source="torchvision", small_input="adapted")
def resnet152(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _torchvision("resnet152", "resnet", num_classes, in_chans, small_input, pretrained)


@register_model(family="mobilenet_v2", source="torchvision", small_input="adapted")
def mobilenet_v2(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _torchvision("mobilenet_v2", "mobilenet_v2", num_classes, in_chans, small_input, pretrained)


# MaxViT's window/grid partitions (7x7 at strides 4..32) need the input to be a multiple of 224.
@register_model(family="maxvit", source="torchvision", small_input="unsupported", min_input_size=224)
def maxvit_t(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _torchvision("maxvit_t", "maxvit", num_classes, in_chans, small_input, pretrained)


@register_model(family="swin_v2", source="torchvision", small_input="unsupported")
def swin_v2_t(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _torchvision("swin_v2_t", "swin_v2", num_classes, in_chans, small_input, pretrained)


@register_model(family="swin_v2", source="torchvision", small_input="unsupported")
def swin_v2_s(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _torchvision("swin_v2_s", "swin_v2", num_classes, in_chans, small_input, pretrained)


# FocalNet-T/S: timm's small-receptive-field (SRF) variants; the paper does not name the variant.
@register_model(family="focalnet", source="timm", small_input="unsupported")
def focalnet_tiny(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _timm("focalnet_tiny_srf", num_classes, in_chans, pretrained)


@register_model(family="focalnet", source="timm", small_input="unsupported")
def focalnet_small(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _timm("focalnet_small_srf", num_classes, in_chans, pretrained)
