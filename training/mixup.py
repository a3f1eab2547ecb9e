"""Batch-level MixUp / CutMix as a DataLoader collate function (soft targets out)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2


class MixCollate:
    """Collate a batch, then apply one of the configured batch transforms (picklable for workers)."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = default_collate(batch)
        return self.transform(images, labels)


def build_mix_collate(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> MixCollate | None:
    """MixUp and/or CutMix (one picked at random per batch when both are on); None when both are off.

    Targets come out as probability vectors [B, C]; ``nn.CrossEntropyLoss`` (label smoothing included)
    accepts them directly.
    """
    choices: list[Callable] = []
    if mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    return MixCollate(choices[0] if len(choices) == 1 else v2.RandomChoice(choices))
