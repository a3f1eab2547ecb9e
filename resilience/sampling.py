"""Fault-site sampling: Leveugle et al. (DATE 2009) sample sizes and per-layer seeded draws.

Every layer's draws come from a generator seeded by ``sha256(f"{seed}:{layer}")`` alone, so shards,
resumed runs and runs over a subset of layers (``--layers``) all see the same faults in each layer.
Each fault takes three consecutive uniforms, so the first k faults of a list of n > k are the k faults
of a list of k: a campaign can be extended without changing its first faults.
"""

from __future__ import annotations

import hashlib
import math
from statistics import NormalDist

import torch

from resilience.engines.base import FaultSites


def stable_seed(seed: int, layer: str) -> int:
    """A 63-bit generator seed from ``f"{seed}:{layer}"`` that is the same in every process and platform."""
    digest = hashlib.sha256(f"{seed}:{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def z_value(confidence: float) -> float:
    """Two-sided standard-normal quantile: 2.5758 for 0.99."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def leveugle_n(population: int, margin: float, confidence: float, p: float = 0.5) -> int:
    """Injections for error ``margin`` at ``confidence`` over a finite fault ``population``.

    n = N / (1 + e² (N − 1) / (t² p (1 − p))), rounded up (Leveugle et al. 2009, eq. 1), with the
    worst case p = 0.5 by default.
    """
    if population < 1:
        raise ValueError("the fault population is empty")
    if not 0.0 < margin < 1.0:
        raise ValueError(f"margin must lie in (0, 1), got {margin}")
    t = z_value(confidence)
    return math.ceil(population / (1.0 + margin**2 * (population - 1) / (t**2 * p * (1.0 - p))))


def sample_sites(seed: int, layer: str, neurons: int, images: torch.Tensor, n: int, bits: int) -> FaultSites:
    """``n`` fault sites of ``layer``: image uniform over ``images``, element over ``neurons``, bit over ``bits``."""
    if len(images) == 0:
        raise ValueError("cannot sample faults: the golden set is empty")
    generator = torch.Generator().manual_seed(stable_seed(seed, layer))
    u = torch.rand((n, 3), generator=generator, dtype=torch.float64)

    def pick(column: torch.Tensor, size: int) -> torch.Tensor:
        # floor(u * size) is uniform on 0..size-1; the clamp only guards against rounding at u -> 1
        return (column * size).long().clamp_(max=size - 1)

    image = images.long()[pick(u[:, 0], len(images))]
    return FaultSites(layer, image, pick(u[:, 1], neurons), pick(u[:, 2], bits))
