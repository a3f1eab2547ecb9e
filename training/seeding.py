"""Seeding of every random source a run touches, per process, and determinism switches."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, rank: int = 0, deterministic: bool = False) -> None:
    """Seed python, numpy and torch with ``seed + rank`` (ranks draw different augmentations).

    ``deterministic`` forces deterministic kernels (slower; errors on ops that have none).
    """
    value = seed + rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible matmuls.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive numpy/python seeds from the worker's torch seed."""
    value = torch.initial_seed() % 2**32
    np.random.seed(value)
    random.seed(value)


def make_generator(seed: int, rank: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed + rank)
    return g
