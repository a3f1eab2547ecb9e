"""GoldenEye's range profile: the max |activation| of each layer over training images, cached on disk.

``clamp=profile`` clamps an injected value to ±(that max) and turns NaN into +max, as GoldenEye does.
The profile depends on the model weights, the number format and the images, so the cache key holds
the checkpoint hash, format, dataset, preset and image count.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resilience.bitflip import NumberFormat
from resilience.layers import LayerInfo
from resilience.storage import read_json, write_json


@torch.no_grad()
def profile_max_abs(
    model: nn.Module,
    layers: list[LayerInfo],
    batches: Iterable[torch.Tensor],
    fmt: NumberFormat,
    device: torch.device | str,
) -> dict[str, float]:
    """Max |output| of every layer over the finite values of all ``batches``."""
    peaks = dict.fromkeys((layer.name for layer in layers), 0.0)

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            values = output.detach().abs()
            values = values[torch.isfinite(values)]
            if values.numel():
                peaks[name] = max(peaks[name], float(values.max()))

        return hook

    handles = [model.get_submodule(name).register_forward_hook(make_hook(name)) for name in peaks]
    try:
        for images in batches:
            model(images.to(device, fmt.dtype))
    finally:
        for handle in handles:
            handle.remove()
    return peaks


def cached_profile(cache_dir: Path, key: dict[str, Any], compute: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The profile stored under ``key`` in ``cache_dir``, computing and storing it when absent."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"profile-{digest}.json"
    if path.is_file():
        stored = read_json(path)
        if stored.get("key") == key:
            return {name: float(v) for name, v in stored["max_abs"].items()}
    peaks = compute()
    write_json(path, {"key": key, "max_abs": peaks})
    return peaks
