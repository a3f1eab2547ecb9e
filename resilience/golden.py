"""The evaluated images and their golden (fault-free) pass, shared by neuron and weight faults.

Image ids are indices into the evaluated split. ``--max-images K`` means the same in every command
(``inject.py neurons|weights``, ``test.py``, ``train.py``, ``analyze.py``): the K images
:func:`evaluated_ids` draws by a fixed permutation of the split (the same for every seed and model, so
campaigns on two models always see the same images; a plain "first K" would keep only a few classes
of class-sorted splits such as ImageNet's validation folder)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.utils.data

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


def evaluated_subset(dataset: torch.utils.data.Dataset, max_images: int | None) -> torch.utils.data.Dataset:
    """``dataset`` restricted to :func:`evaluated_ids` (the dataset itself when all images are evaluated)."""
    if max_images is None:
        return dataset
    return torch.utils.data.Subset(dataset, evaluated_ids(len(dataset), max_images).tolist())  # type: ignore[arg-type]


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
    """The evaluated images of a split, by id: held in memory up to ``memory_limit`` bytes, else read on demand.

    Neuron engines fetch images by id (:meth:`images`, the ``ImageSource`` protocol); golden passes and
    weight-fault runs walk them in id order (:meth:`batches`, :meth:`chunk`).
    """

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

    @classmethod
    def from_tensors(cls, images: torch.Tensor, labels: torch.Tensor) -> EvaluatedImages:
        """Images and labels already in memory, with ids ``0..len(images)-1``."""
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        return cls(torch.utils.data.TensorDataset(images, labels.long()), torch.arange(len(images)))

    def __len__(self) -> int:
        return len(self.ids)

    def images(self, ids: torch.Tensor) -> torch.Tensor:
        """Images ``ids`` (split indices) stacked into one batch."""
        return self.source.images(ids)

    def chunk(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of the evaluated images at positions ``start:stop`` (id order)."""
        if self.memory is not None:
            images, labels = self.memory
            return images[start:stop], labels[start:stop]
        ids = self.ids[start:stop]
        return next(iterate_split(self.dataset, ids, max(1, len(ids)), self.workers))

    def batches(self, batch_size: int, chunk_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All evaluated (images, labels) in id order; with ``chunk_size``, batches restart at every chunk.

        ``chunk_size`` reproduces the batch composition of a run that walks the images chunk by chunk
        (weight faults), which the last bits of the outputs depend on.
        """
        if self.memory is None and chunk_size is None:
            yield from iterate_split(self.dataset, self.ids, batch_size, self.workers)
            return
        step = chunk_size or len(self)
        for start in range(0, len(self), step):
            images, labels = self.chunk(start, start + step)
            yield from zip(images.split(batch_size), labels.split(batch_size), strict=True)


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
    model: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    fmt: NumberFormat,
    device: torch.device | str,
    *,
    keep_dtype: bool = False,
) -> Golden:
    """Run ``model`` (already in ``fmt`` on ``device``) over (images, labels) batches of the images ``ids``.

    Logits are stored as float32 on the CPU; ``keep_dtype`` keeps the dtype the model outputs (under
    autocast a 16-bit one), for callers that compare faulty logits with the golden ones bit for bit.
    """
    logits, labels = [], []
    for images, targets in batches:
        out = model(images.to(device, fmt.dtype))
        logits.append((out if keep_dtype else out.float()).cpu())
        labels.append(torch.as_tensor(targets).long())
    if not logits:
        raise ValueError("no images to evaluate")
    return Golden(ids, torch.cat(logits), torch.cat(labels))
