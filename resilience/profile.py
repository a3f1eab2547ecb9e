"""GoldenEye's range profile: the max |activation| of each layer over training images, cached on disk.

``clamp=profile`` clamps an injected value to ±(that max) and turns NaN into +max, as GoldenEye does.
The profile depends on the model weights, the number format and the images, so the cache key holds
the checkpoint hash, format, dataset, preset and image count.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cli_shell import describe
from resilience.bitflip import NumberFormat
from resilience.layers import LayerInfo
from resilience.storage import read_json, write_json


@dataclass
class ActivationRange:
    """Magnitude statistics of one layer's output over the finite values seen."""

    max_abs: float = 0.0
    sum_abs: float = 0.0
    count: int = 0

    @property
    def mean_abs(self) -> float:
        """Mean |activation| (0 when nothing finite was seen)."""
        return self.sum_abs / self.count if self.count else 0.0


@torch.no_grad()
def activation_ranges(
    model: nn.Module,
    layers: list[LayerInfo],
    batches: Iterable[torch.Tensor],
    fmt: NumberFormat,
    device: torch.device | str,
) -> dict[str, ActivationRange]:
    """Max and mean |output| of every layer over the finite values of all ``batches``."""
    ranges = {layer.name: ActivationRange() for layer in layers}

    def make_hook(stats: ActivationRange) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            values = output.detach().abs()
            values = values[torch.isfinite(values)]
            if values.numel():
                stats.max_abs = max(stats.max_abs, float(values.max()))
                stats.sum_abs += float(values.double().sum())
                stats.count += values.numel()

        return hook

    handles = [model.get_submodule(name).register_forward_hook(make_hook(stats)) for name, stats in ranges.items()]
    try:
        for images in batches:
            model(images.to(device, fmt.dtype))
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def profile_max_abs(
    model: nn.Module,
    layers: list[LayerInfo],
    batches: Iterable[torch.Tensor],
    fmt: NumberFormat,
    device: torch.device | str,
) -> dict[str, float]:
    """Max |output| of every layer over the finite values of all ``batches``."""
    return {name: stats.max_abs for name, stats in activation_ranges(model, layers, batches, fmt, device).items()}


def cached_profile(cache_dir: Path, key: dict[str, Any], compute: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The profile stored under ``key`` in ``cache_dir``, computing and storing it when absent."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"profile-{digest}.json"
    if path.is_file():
        try:
            stored = read_json(path)
        except (ValueError, OSError):  # a damaged cache entry is computed again
            stored = {}
        if isinstance(stored, dict) and stored.get("key") == key:
            return {name: float(v) for name, v in stored["max_abs"].items()}
    peaks = compute()
    try:
        write_json(path, {"key": key, "max_abs": peaks})
    except OSError as exc:  # the cache only saves time: an unwritable one must not cost the computed profile
        print(f"note: the profile is not cached ({describe(exc)})", file=sys.stderr, flush=True)
    return peaks
