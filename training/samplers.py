"""Samplers for distributed training (repeated augmentation) and exact distributed evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ShardSampler(Sampler[int]):
    """Deterministic, non-overlapping shard ``rank::world_size`` of a dataset, without padding.

    ``DistributedSampler`` pads the last shard with repeated images, which biases evaluation metrics;
    here every image is seen exactly once across processes and the sums are all-reduced afterwards.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class RepeatedAugmentSampler(Sampler[int]):
    """Repeated augmentation (Hoffer et al. 2020; DeiT): each image appears ``repetitions`` times per
    epoch on different processes (so with different augmentations), and each process still draws
    ``ceil(len / world_size)`` images per epoch, keeping the epoch length of plain sharding.
    """

    def __init__(
        self, length: int, rank: int = 0, world_size: int = 1, repetitions: int = 3, seed: int = 0
    ) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size
        self.repetitions, self.seed, self.epoch = repetitions, seed, 0
        self.per_rank = math.ceil(length * repetitions / world_size)
        self.total = self.per_rank * world_size
        self.kept = math.ceil(length / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=g).repeat_interleave(self.repetitions).tolist()
        order += order[: self.total - len(order)]
        return iter(order[self.rank : self.total : self.world_size][: self.kept])

    def __len__(self) -> int:
        return self.kept
