"""Discovery of the layers that fault campaigns target: conv and linear modules in forward order."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

TARGET_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LayerInfo:
    """A fault-injection target: a conv/linear module whose output holds the fault sites."""

    name: str
    kind: str  # "conv" or "linear"
    out_shape: tuple[int, ...]  # output shape of one image, batch dimension removed
    order: int  # position in forward execution order

    @property
    def neurons(self) -> int:
        """Number of output elements (fault sites per bit) for one image."""
        return math.prod(self.out_shape)


def _kind(module: nn.Module) -> str:
    return "conv" if isinstance(module, nn.Conv2d) else "linear"


@torch.no_grad()
def discover_layers(model: nn.Module, example_input: torch.Tensor) -> list[LayerInfo]:
    """Run ``example_input`` (a batch of one or more images) and list the executed conv/linear layers.

    Layers are named by their qualified module name and ordered by first execution. Modules that a
    model applies functionally (their ``forward`` is never called) cannot hold output faults and are
    not listed; a module executed more than once per forward is rejected because its output is not a
    single fault site population.
    """
    seen: dict[str, LayerInfo] = {}
    calls: dict[str, int] = {}
    handles = []

    def make_hook(name: str, module: nn.Module):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            calls[name] = calls.get(name, 0) + 1
            if name not in seen:
                seen[name] = LayerInfo(name, _kind(module), tuple(output.shape[1:]), len(seen))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, TARGET_TYPES):
            handles.append(module.register_forward_hook(make_hook(name, module)))
    was_training = model.training
    model.eval()
    try:
        model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    repeated = [name for name, count in calls.items() if count > 1]
    if repeated:
        raise ValueError(f"layers executed more than once per forward pass are not supported: {repeated}")
    return sorted(seen.values(), key=lambda layer: layer.order)


def select_layers(layers: list[LayerInfo], pattern: str | None) -> list[LayerInfo]:
    """Keep the layers whose name matches the regular expression ``pattern`` (all when None)."""
    if not pattern:
        return list(layers)
    regex = re.compile(pattern)
    chosen = [layer for layer in layers if regex.search(layer.name)]
    if not chosen:
        raise ValueError(f"no layer matches --layers {pattern!r}")
    return chosen
