"""Ranger-style range restriction of a trained checkpoint: profile its layers on training images and save
the restricted model's checkpoint (``python analyze.py restrict-ranges``)."""

from __future__ import annotations

from pathlib import Path

import torch

from cli_shell import UserError
from resilience.bitflip import get_format
from resilience.golden import evaluated_ids, iterate_split
from resilience.layers import discover_layers
from resilience.profile import profile_max_abs

PROFILE_BATCH = 256  # the batch of inject.py's profile, so that both see the same arithmetic


def restrict_checkpoint(
    source: Path, out: Path, *, images: int = 1024, data_path: str | None = None, workers: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Write ``out``: the model of ``source`` with every conv/linear output clamped to ±(its max |output|
    over ``images`` training images, drawn as ``inject.py --profile-images`` draws them). Returns the bounds."""
    import data
    import models
    from models.range_restriction import META_KEY, restricted_meta

    model, meta = models.load_checkpoint(source)
    if meta.get(META_KEY) is not None:
        raise UserError(f"{source} is range-restricted already")
    dataset = meta.get("dataset")
    if dataset not in data.DATASETS:
        raise UserError(f"{source} names no known dataset to profile on ({dataset!r})")
    preset = meta.get("preset") or data.eval_preset(dataset, meta["model"], small_input=bool(meta.get("small_input")),
                                                    in_chans=meta.get("in_chans"))
    train = data.build_dataset(dataset, "train", data_path, preset=dict(preset))
    ids = evaluated_ids(len(train), images)
    fmt = get_format("fp32")
    model.to(device).eval()
    layers = discover_layers(model, train[int(ids[0])][0][None].to(device))
    batches = (x for x, _ in iterate_split(train, ids, PROFILE_BATCH, workers))
    bounds = profile_max_abs(model, layers, batches, fmt, device)
    models.save_checkpoint(out, model.cpu(), restricted_meta(
        meta, bounds, dataset=dataset, split="train", images=len(ids), source=str(source),
        source_sha256=meta["checkpoint_sha256"]))
    return bounds
