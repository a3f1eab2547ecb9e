"""Discovery of the layers that fault campaigns target: conv and linear modules in forward order."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

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

    Layers are named by their qualified module name and ordered by first execution. A single image is
    run as a batch of two copies, so that every layer's output is seen to lead with the image batch:
    a layer whose output does not (computed once for the whole batch) cannot hold per-image faults and
    is rejected, as is a module executed more than once per forward (its output is not a single fault
    site population). Modules that a model applies functionally (their ``forward`` is never called)
    are not listed; :func:`count_conv_linear_calls` counts those calls independently.
    """
    if len(example_input) == 1:
        example_input = torch.cat([example_input, example_input])
    batch = len(example_input)
    seen: dict[str, LayerInfo] = {}
    calls: dict[str, int] = {}
    unbatched: list[str] = []
    handles = []

    def make_hook(name: str, module: nn.Module):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            calls[name] = calls.get(name, 0) + 1
            if output.dim() < 2 or output.shape[0] != batch:
                unbatched.append(f"{name} {list(output.shape)}")
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
    if unbatched:
        raise ValueError(f"layers whose output does not lead with the batch of {batch} images cannot hold "
                         f"per-image faults: {', '.join(unbatched)}")
    return sorted(seen.values(), key=lambda layer: layer.order)


class _CountConvLinear(TorchFunctionMode):
    """Counts ``F.linear`` and ``F.conv2d`` calls, however they are reached (module or functional)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        if func in (F.linear, F.conv2d):
            self.calls += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def count_conv_linear_calls(model: nn.Module, example_input: torch.Tensor) -> int:
    """How many ``F.linear``/``F.conv2d`` computations one forward pass of ``model`` runs (evaluation mode).

    Independent of module hooks: it sees functional calls with a module's weights too, so it checks that
    :func:`discover_layers` lists every executed conv/linear computation.
    """
    was_training = model.training
    model.eval()
    counter = _CountConvLinear()
    try:
        with counter:
            model(example_input)
    finally:
        model.train(was_training)
    return counter.calls


def select_layers(layers: list[LayerInfo], pattern: str | None) -> list[LayerInfo]:
    """Keep the layers whose name matches the regular expression ``pattern`` (all when None)."""
    if not pattern:
        return list(layers)
    regex = re.compile(pattern)
    chosen = [layer for layer in layers if regex.search(layer.name)]
    if not chosen:
        raise ValueError(f"no layer matches --layers {pattern!r}")
    return chosen
