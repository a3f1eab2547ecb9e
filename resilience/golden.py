"""The golden (fault-free) pass: evaluated images, golden logits, the golden set, image sources.

Image ids are indices into the evaluated split. ``--max-images K`` evaluates K images drawn by a fixed
permutation of the split (the same for every seed and model, so campaigns on two models always see
the same images; a plain "first K" would keep only a few classes of class-sorted splits such as
ImageNet's validation folder).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.utils.data
from torch import nn

from resilience.bitflip import NumberFormat
from resilience.metrics import cross_entropy, predictions, top2diff

GOLDEN_MODES = ("correct", "all")
SUBSET_SEED = 20091  # fixed: the image subset must not depend on the campaign seed


def evaluated_ids(split_size: int, max_images: int | None) -> torch.Tensor:
    """Sorted split indices of the evaluated images: all, or ``max_images`` of a fixed permutation."""
    if max_images is None or max_images >= split_size:
        return torch.arange(split_size)
    if max_images < 1:
        raise ValueError("--max-images must be at least 1")
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    return torch.randperm(split_size, generator=generator)[:max_images].sort().values


class TensorImageSource:
    """Images held in memory, addressed by split index."""

    def __init__(self, ids: torch.Tensor, images: torch.Tensor) -> None:
        if len(ids) != len(images):
            raise ValueError(f"{len(ids)} ids but {len(images)} images")
        order = torch.argsort(ids)
        self.ids = ids[order]
        self.data = images[order]

    def images(self, ids: torch.Tensor) -> torch.Tensor:
        """Images ``ids`` (split indices) stacked into one batch."""
        rows = torch.searchsorted(self.ids, ids)
        if (rows >= len(self.ids)).any() or not torch.equal(self.ids[rows.clamp(max=len(self.ids) - 1)], ids):
            raise KeyError("image ids outside the evaluated images")
        return self.data[rows]


class DatasetImageSource:
    """Images loaded from a map-style dataset on demand (splits too large to hold in memory)."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def images(self, ids: torch.Tensor) -> torch.Tensor:
        """Images ``ids`` (split indices) stacked into one batch."""
        return torch.stack([self.dataset[int(i)][0] for i in ids])


def iterate_split(
    dataset: torch.utils.data.Dataset, ids: torch.Tensor, batch_size: int, workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (images, labels) of ``dataset`` restricted to ``ids``, in id order."""
    subset = torch.utils.data.Subset(dataset, ids.tolist())
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers, shuffle=False)
    for images, labels in loader:
        yield images, torch.as_tensor(labels).long()


class EvaluatedImages:
    """The evaluated images of a dataset: held in memory up to ``memory_limit`` bytes, else read on demand."""

    def __init__(
        self, dataset: torch.utils.data.Dataset, ids: torch.Tensor, *, workers: int = 0, memory_limit: int = 2 << 30
    ) -> None:
        self.dataset, self.ids, self.workers = dataset, ids, workers
        first = dataset[int(ids[0])][0]
        self.memory: tuple[torch.Tensor, torch.Tensor] | None = None
        self.source: TensorImageSource | DatasetImageSource = DatasetImageSource(dataset)
        if len(ids) * first.numel() * first.element_size() <= memory_limit:
            pairs = list(iterate_split(dataset, ids, 256, workers))
            self.memory = torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])
            self.source = TensorImageSource(ids, self.memory[0])

    def images(self, ids: torch.Tensor) -> torch.Tensor:
        """Images ``ids`` (split indices) stacked into one batch."""
        return self.source.images(ids)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All evaluated (images, labels) in id order."""
        if self.memory is None:
            yield from iterate_split(self.dataset, self.ids, batch_size, self.workers)
            return
        images, labels = self.memory
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size], labels[i : i + batch_size]


@dataclass
class Golden:
    """Fault-free outputs of the evaluated images (rows in ``ids`` order)."""

    ids: torch.Tensor  # int64 split indices, sorted
    logits: torch.Tensor  # [N, C] float32
    labels: torch.Tensor  # int64

    def __post_init__(self) -> None:
        self.pred = predictions(self.logits)
        self.loss = cross_entropy(self.logits, self.labels)
        self.top2diff = top2diff(self.logits)
        self.correct = self.pred == self.labels

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each split index in ``ids``."""
        return torch.searchsorted(self.ids, ids)

    def golden_set(self, mode: str = "correct") -> torch.Tensor:
        """Split indices the faults may hit: correctly classified with Top2Diff > 0, or all images."""
        if mode not in GOLDEN_MODES:
            raise ValueError(f"unknown golden mode {mode!r}; choose one of {', '.join(GOLDEN_MODES)}")
        if mode == "all":
            return self.ids
        return self.ids[self.correct & (self.top2diff > 0)]

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy over the evaluated images."""
        return float(self.correct.double().mean())


@torch.no_grad()
def golden_pass(
    model: nn.Module,
    ids: torch.Tensor,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    fmt: NumberFormat,
    device: torch.device | str,
) -> Golden:
    """Run ``model`` (already in ``fmt`` on ``device``) over (images, labels) batches of the images ``ids``."""
    logits, labels = [], []
    for images, targets in batches:
        logits.append(model(images.to(device, fmt.dtype)).float().cpu())
        labels.append(torch.as_tensor(targets).long())
    if not logits:
        raise ValueError("no images to evaluate")
    return Golden(ids, torch.cat(logits), torch.cat(labels))
