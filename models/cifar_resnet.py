"""The classic CIFAR ResNet (He et al. 2016, Sec. 4.2): 6n+2 layers, 3 stages of 16/32/64 channels.

Option-A shortcuts (stride-2 subsampling plus zero-padded channels, no parameters), global average
pooling and a final ``linear``. Parameter names match dnn-benchmarks' CIFAR-10 checkpoints
(``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``linear``) so those load with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


class PadShortcut(nn.Module):
    """Option-A shortcut: take every other pixel and zero-pad the new channels on both sides."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        self.front = (planes - in_planes) // 2
        self.back = planes - in_planes - self.front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.front, self.back))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(in_planes, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (any size works: the pooling is global)."""

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)  # the init of the reference implementation (akamaster)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def _cifar_resnet(depth: int, num_classes: int, in_chans: int, pretrained: str | None) -> CifarResNet:
    if pretrained:
        raise ValueError(
            f"no downloadable weights for resnet{depth}; load a checkpoint (e.g. dnn-benchmarks' "
            f"ResNet{depth}.th) with models.load_checkpoint instead"
        )
    return CifarResNet(depth, num_classes, in_chans)


# small_input is the native design of these networks, so the flag is accepted and ignored.
_SPEC = {"family": "cifar_resnet", "source": "local", "small_input": "native", "min_input_size": 32}


@register_model(**_SPEC)
def resnet20(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _cifar_resnet(20, num_classes, in_chans, pretrained)


@register_model(**_SPEC)
def resnet32(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _cifar_resnet(32, num_classes, in_chans, pretrained)


@register_model(**_SPEC)
def resnet44(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _cifar_resnet(44, num_classes, in_chans, pretrained)


@register_model(**_SPEC)
def resnet56(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _cifar_resnet(56, num_classes, in_chans, pretrained)


@register_model(**_SPEC)
def resnet110(num_classes: int, *, in_chans: int = 3, small_input: bool = False, pretrained: str | None = None) -> nn.Module:
    return _cifar_resnet(110, num_classes, in_chans, pretrained)
