"""Clean vs faulty Ablation-CAMs of a baseline and a text-guided model on a few images, and their numbers."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from tqdm import tqdm

from analysis.cam import NO_CLASS, CamError, CamLayer, ablation_cams, cam_cosine, predict
from analysis.faults_for_cam import ModelFaults, injected

STATES: tuple[str, ...] = ("clean", "faulty")
CAM_CLASSES: tuple[str, ...] = ("predicted", "clean")
CSV_COLUMNS: tuple[str, ...] = (
    "image", "source", "label", "model", "clean_class", "clean_confidence", "faulty_class",
    "faulty_confidence", "flipped", "faulty_finite", "cam_cosine",
)


@dataclass(frozen=True)
class InputImage:
    """One image: the model input [C, H, W], an RGB picture of it in [0, 1], where it came from, its label."""

    tensor: torch.Tensor
    picture: np.ndarray
    source: str
    label: int | None = None


def picture_of(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The input tensor [C, H, W] with its normalisation undone, as an RGB float array [H, W, 3] in [0, 1]."""
    shape = (-1, 1, 1)
    pixels = (tensor * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)).clamp(0, 1)
    rgb = pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels
    return rgb.permute(1, 2, 0).numpy().astype(np.float32)


def dataset_images(dataset: torch.utils.data.Dataset, indices: Sequence[int], preset: Mapping[str, Any],
                   name: str) -> list[InputImage]:
    """Items ``indices`` of a dataset of (normalised tensor, label); ``name`` (e.g. "fashion-mnist test")
    labels the sources."""
    size = len(dataset)  # type: ignore[arg-type]
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise CamError(f"image index {bad[0]} is out of range for {name} ({size} images: 0..{size - 1})")
    images = []
    for i in indices:
        tensor, label = dataset[i]
        images.append(InputImage(tensor, picture_of(tensor, preset["mean"], preset["std"]), f"{name}[{i}]", int(label)))
    return images


def file_images(paths: Sequence[str | os.PathLike], transform: Any, preset: Mapping[str, Any]) -> list[InputImage]:
    """Image files turned into model inputs by ``transform`` (the evaluation preset)."""
    images = []
    for path in map(Path, paths):
        try:
            with Image.open(path) as img:
                tensor = transform(img)
        except FileNotFoundError:
            raise CamError(f"image file not found: {path}") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise CamError(f"cannot read image {path}: {exc}") from None
        images.append(InputImage(tensor, picture_of(tensor, preset["mean"], preset["std"]), str(path)))
    return images


@dataclass(frozen=True)
class CamModel:
    """A model of the comparison: its key ("baseline"/"text"), CAM layer and faults."""

    key: str
    model: nn.Module
    layer: CamLayer
    faults: ModelFaults


@dataclass(frozen=True)
class Panel:
    """One CAM: prediction (class, ``NO_CLASS`` for NaN logits; softmax confidence), whether the logits were
    finite, the map [H, W] (all NaN when there was no class to explain)."""

    cls: int
    confidence: float
    finite: bool
    cam: np.ndarray


@dataclass(frozen=True)
class ImageResult:
    """The panels of one image: ``panels[(model key, state)]``."""

    image: InputImage
    panels: dict[tuple[str, str], Panel]

    def cosine(self, key: str) -> float:
        """Cosine similarity of the clean and faulty CAM of model ``key``."""
        return cam_cosine(self.panels[key, "clean"].cam, self.panels[key, "faulty"].cam)

    def flipped(self, key: str) -> bool:
        """Whether the faults changed model ``key``'s top-1 class."""
        return self.panels[key, "clean"].cls != self.panels[key, "faulty"].cls


def _panel(cam_model: CamModel, image: torch.Tensor, target: int | None, batch_size: int) -> Panel:
    pred = predict(cam_model.model, image)
    cls = pred.classes[0]
    target = cls if target is None else target
    if target == NO_CLASS:  # NaN logits: no class to explain
        cam = np.full(image.shape[-2:], np.nan, dtype=np.float32)
    else:
        cam = ablation_cams(cam_model.model, cam_model.layer, image, [target], batch_size)[0]
    return Panel(cls, pred.confidences[0], pred.finite[0], cam)


def compare_cams(models: Sequence[CamModel], images: Sequence[InputImage], *, cam_class: str = "predicted",
                 batch_size: int = 32, progress: bool = True) -> list[ImageResult]:
    """Clean and faulty CAM of every model on every image; faults are removed after each use.

    ``cam_class``: "predicted" explains each model state's own top-1 class; "clean" explains the clean
    top-1 class in the faulty state too (how the evidence for the same decision moved).
    """
    if cam_class not in CAM_CLASSES:
        raise CamError(f"unknown CAM class {cam_class!r} (choose from {', '.join(CAM_CLASSES)})")
    device = next(models[0].model.parameters()).device
    results = []
    for image in tqdm(images, desc="Ablation-CAM", unit="image", disable=not progress):
        x = image.tensor.unsqueeze(0).to(device)
        panels = {}
        for m in models:
            clean = _panel(m, x, None, batch_size)
            with injected(m.model, m.faults):
                faulty = _panel(m, x, clean.cls if cam_class == "clean" else None, batch_size)
            panels[m.key, "clean"], panels[m.key, "faulty"] = clean, faulty
        results.append(ImageResult(image, panels))
    return results


def class_name(cls: int, class_names: Sequence[str]) -> str:
    """The class's name; ``"none (NaN)"`` for the missing top-1 of NaN logits."""
    return "none (NaN)" if cls == NO_CLASS else class_names[cls]


def csv_rows(results: Sequence[ImageResult], keys: Sequence[str], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per image and model (columns ``CSV_COLUMNS``)."""
    rows = []
    for number, result in enumerate(results):
        label = result.image.label
        for key in keys:
            clean, faulty = result.panels[key, "clean"], result.panels[key, "faulty"]
            rows.append({
                "image": number, "source": result.image.source, "label": "" if label is None else class_names[label],
                "model": key, "clean_class": class_name(clean.cls, class_names), "clean_confidence": round(clean.confidence, 6),
                "faulty_class": class_name(faulty.cls, class_names), "faulty_confidence": round(faulty.confidence, 6),
                "flipped": result.flipped(key), "faulty_finite": faulty.finite and bool(np.isfinite(faulty.cam).all()),
                "cam_cosine": result.cosine(key),
            })
    return rows


def summarize(results: Sequence[ImageResult], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per model: images, mean CAM cosine over the finite ones, non-finite count, flipped predictions."""
    summary = {}
    for key in keys:
        cosines = [r.cosine(key) for r in results]
        finite = [c for c in cosines if not math.isnan(c)]
        summary[key] = {
            "images": len(results),
            "mean_cam_cosine": float(np.mean(finite)) if finite else math.nan,
            "non_finite": len(cosines) - len(finite),
            "flipped": sum(r.flipped(key) for r in results),
        }
    return summary
