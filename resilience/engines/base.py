"""The small interface every neuron-fault injection engine implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from resilience.bitflip import NumberFormat
from resilience.layers import LayerInfo


@dataclass(frozen=True)
class FaultSites:
    """Neuron fault sites of one layer as parallel 1-D int64 tensors of equal length."""

    layer: str
    image: torch.Tensor  # index into the evaluated split
    index: torch.Tensor  # flat element index within one image's output of ``layer``
    bit: torch.Tensor  # bit position, 0 = least significant

    def __len__(self) -> int:
        return int(self.image.numel())

    def slice(self, start: int, stop: int) -> FaultSites:
        """The sites ``start:stop`` of this list."""
        return FaultSites(self.layer, self.image[start:stop], self.index[start:stop], self.bit[start:stop])


@dataclass
class InjectionResult:
    """What an engine measured for each fault, in fault order (CPU tensors)."""

    faulty_logits: torch.Tensor  # [F, C] float32
    golden_value: torch.Tensor  # [F] float64: the element before the fault
    faulty_value: torch.Tensor  # [F] float64: the element the network actually saw (after any clamp)


class ImageSource(Protocol):
    """Gives the preprocessed input images of the evaluated split by index."""

    def images(self, ids: torch.Tensor) -> torch.Tensor:
        """Images ``ids`` stacked into one batch tensor."""
        ...


class Engine(ABC):
    """Runs batches of single-bit neuron faults of one layer and returns the faulty logits.

    The model is given in evaluation mode, already cast to ``fmt.dtype`` and on ``device``. ``clamp``
    maps layer names to the profiled max |activation| (GoldenEye's ``clamp=profile``); without it the
    flipped value is used as is (the plain hardware model).
    """

    name: ClassVar[str]

    def __init__(
        self,
        model: nn.Module,
        layers: list[LayerInfo],
        fmt: NumberFormat,
        *,
        clamp: dict[str, float] | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
    ) -> None:
        self.model = model
        self.layers = {layer.name: layer for layer in layers}
        self.fmt = fmt
        self.clamp = clamp
        self.device = torch.device(device)
        self.batch_size = batch_size

    @abstractmethod
    def run(self, layer: LayerInfo, sites: FaultSites, source: ImageSource) -> InjectionResult:
        """Inject every fault of ``sites`` (all in ``layer``), one inference per fault."""

    def describe(self) -> dict[str, Any]:
        """Facts about this engine worth recording in a campaign summary."""
        return {"engine": self.name}
