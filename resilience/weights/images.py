"""Evaluation images for weight-fault runs, served in contiguous chunks (the memory bound)."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.utils.data


class ImageSet(Protocol):
    """The first ``len(self)`` images of an evaluation split, in a fixed order."""

    def __len__(self) -> int: ...

    def chunk(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``start:stop`` and their labels."""
        ...


class TensorImageSet:
    """Images and labels held in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def chunk(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[start:stop], self.labels[start:stop]


class DatasetImageSet:
    """The first ``limit`` items of a map-style dataset of (image, label), loaded chunk by chunk."""

    def __init__(self, dataset: torch.utils.data.Dataset, limit: int | None = None, workers: int = 0) -> None:
        size = len(dataset)  # type: ignore[arg-type]
        self.dataset = dataset
        self.size = size if limit is None else min(limit, size)
        self.workers = workers

    def __len__(self) -> int:
        return self.size

    def chunk(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        subset = torch.utils.data.Subset(self.dataset, range(start, min(stop, self.size)))
        loader = torch.utils.data.DataLoader(subset, batch_size=max(1, len(subset)), num_workers=self.workers)
        images, labels = next(iter(loader))
        return images, torch.as_tensor(labels).long()

    def materialize(self) -> TensorImageSet:
        """All images in memory (for repeated passes such as a speed comparison)."""
        return TensorImageSet(*self.chunk(0, self.size))
