"""Exponential moving average of model weights (and buffers), as in torchvision's recipes."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class ModelEMA(AveragedModel):
    """``ema = decay * ema + (1 - decay) * weights`` for parameters and buffers (BN statistics).

    Its ``state_dict()`` has the torchvision/paper layout: ``n_averaged`` plus ``module.``-prefixed
    model keys; ``model_state_dict()`` gives plain model keys for loading into a bare model.
    """

    def __init__(self, model: nn.Module, decay: float, device: torch.device | str | None = None) -> None:
        super().__init__(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()


def ema_decay(base_decay: float, world_size: int, batch_size: int, steps: int, epochs: int) -> float:
    """Per-update decay that keeps the averaging horizon independent of GPUs, batch size and epochs.

    The recipe's ``base_decay`` is quoted per image-epoch; one update covers
    ``world_size * batch_size * steps`` images, and the horizon is measured in epochs (pycls' rule, used by
    torchvision's references), so the effective smoothing factor is ``(1 - base_decay) * adjust``.
    """
    adjust = world_size * batch_size * steps / max(1, epochs)
    alpha = min(1.0, (1.0 - base_decay) * adjust)
    return 1.0 - alpha
