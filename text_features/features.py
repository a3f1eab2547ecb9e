"""Per-class text features: build (class name / descriptions / random), save and load.

A features file (``.pth``, readable with ``torch.load(..., weights_only=True)``) holds::

    {"format": "tgr-text-features/1", "features": Tensor[C, E] float32 (unit rows), "meta": {...}}

:func:`load_text_features` also reads the paper repository's bare ``[C, E]`` tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .descriptions import DescriptionSet, load_descriptions, match_classes
from .encoders import TextEncoder, build_encoder, encoder_embed_dim
from .errors import TextFeaturesError
from .fileio import atomic_torch_save, sha256_file
from .templates import CLASSNAME_TEMPLATE, format_template

FORMAT = "tgr-text-features/1"
VARIANTS = ("random", "classname", "descriptions")
ASSETS = Path(__file__).resolve().parent / "assets"


def class_features(
    encoder: TextEncoder, texts_per_class: Sequence[Sequence[str]], *, batch_size: int = 256, progress: bool = True
) -> torch.Tensor:
    """Encode every text, L2-normalise, average per class, L2-normalise again -> [C, E].

    The same recipe as open_clip's ``build_zero_shot_classifier``, with texts batched across classes.
    """
    counts = [len(texts) for texts in texts_per_class]
    if any(c == 0 for c in counts):
        raise TextFeaturesError("every class needs at least one text")
    flat = [t for texts in texts_per_class for t in texts]
    emb = encoder.encode(flat, batch_size=batch_size, normalize=True, progress=progress)
    means = torch.stack([chunk.mean(dim=0) for chunk in emb.split(counts)])
    return F.normalize(means, dim=-1)


def random_features(num_classes: int, embed_dim: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows made unit-norm (the paper's random-init ablation), reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num_classes, embed_dim, generator=gen), dim=-1)


def default_descriptions_file(dataset: str | None) -> Path | None:
    """The descriptions shipped with the package for ``dataset``, if any."""
    if not dataset:
        return None
    path = ASSETS / f"{dataset}_descriptions.json"
    return path if path.is_file() else None


def _versions(encoder: TextEncoder | None) -> dict[str, str]:
    versions = {"torch": torch.__version__.split("+")[0]}
    kind = encoder.info().get("kind") if encoder is not None else None
    module = {"open_clip": "open_clip", "sentence-transformers": "sentence_transformers"}.get(kind or "")
    if module:
        with contextlib.suppress(ImportError, AttributeError):
            versions[module] = __import__(module).__version__
    return versions


def build_text_features(
    class_names: Sequence[str],
    variant: str,
    *,
    encoder: TextEncoder | str | None = None,
    device: str | torch.device = "cpu",
    descriptions: str | Path | None = None,
    templates: Sequence[str] | None = None,
    match_by: str = "name",
    embed_dim: int | None = None,
    seed: int = 0,
    dataset: str | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Features [C, E] (unit rows) and their metadata for one of :data:`VARIANTS`.

    ``classname`` encodes ``templates`` (default "a photo of a {}") filled with each name;
    ``descriptions`` encodes the descriptions file (ours or CuPL's JSON); ``random`` needs ``embed_dim``
    (or an encoder to take it from). ``encoder`` may be a spec string: it is then built on ``device``
    only after the class texts have been checked (a random variant never loads it).
    """
    if variant not in VARIANTS:
        raise TextFeaturesError(f"unknown variant {variant!r} (use one of {', '.join(VARIANTS)})")
    class_names = list(class_names)
    if not class_names:
        raise TextFeaturesError("no class names")
    meta: dict[str, Any] = {
        "format": FORMAT,
        "dataset": dataset,
        "variant": variant,
        "num_classes": len(class_names),
        "class_names": class_names,
        "encoder": None,
        "encoder_info": None,
        "templates": None,
        "descriptions_file": None,
        "descriptions_sha256": None,
        "descriptions_source": None,
        "descriptions_per_class": None,
        "seed": None,
        "normalized": True,
    }
    desc_set: DescriptionSet | None = None
    if variant == "descriptions":
        # Read and match the file before the (slow) encoder is needed.
        path = Path(descriptions) if descriptions else default_descriptions_file(dataset)
        if path is None:
            raise TextFeaturesError(
                f"no descriptions file for {dataset or 'these classes'}: pass --descriptions FILE "
                "(write one with python -m text_features.describe, or use a CuPL JSON)"
            )
        desc_set = load_descriptions(path)
        texts = match_classes(desc_set.descriptions, class_names, by=match_by, source=str(path))
        counts = [len(t) for t in texts]
        meta.update(
            templates=desc_set.meta.get("questions"),
            descriptions_file=path.name,
            descriptions_sha256=sha256_file(path),
            descriptions_source=desc_set.meta.get("source"),
            descriptions_per_class={"min": min(counts), "max": max(counts), "total": sum(counts)},
        )
    elif variant == "classname":
        templates = list(templates or [CLASSNAME_TEMPLATE])
        if any("{}" not in t for t in templates):
            raise TextFeaturesError("every template needs a {} where the class name goes")
        texts = [[format_template(t, name) for t in templates] for name in class_names]
        meta["templates"] = templates

    if variant == "random":
        if embed_dim is None and encoder is not None:
            embed_dim = encoder_embed_dim(encoder) if isinstance(encoder, str) else encoder.embed_dim
        if not embed_dim or embed_dim < 1:
            raise TextFeaturesError("the random variant needs a positive embedding width (--embed-dim)")
        feats = random_features(len(class_names), embed_dim, seed)
        meta["seed"] = seed
    else:
        if encoder is None:
            raise TextFeaturesError(f"the {variant} variant needs a text encoder")
        if isinstance(encoder, str):
            encoder = build_encoder(encoder, device=device)
        feats = class_features(encoder, texts, batch_size=batch_size, progress=progress)
        if embed_dim is not None and embed_dim != feats.shape[1]:
            raise TextFeaturesError(f"--embed-dim {embed_dim} differs from the encoder's width {feats.shape[1]}")
    if isinstance(encoder, TextEncoder) and variant != "random":
        meta["encoder"] = encoder.spec
        meta["encoder_info"] = encoder.info()
    meta["embed_dim"] = int(feats.shape[1])
    meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta["versions"] = _versions(encoder if isinstance(encoder, TextEncoder) and variant != "random" else None)
    return feats.float().contiguous(), meta


def save_text_features(path: str | Path, features: torch.Tensor, meta: dict[str, Any]) -> None:
    """Write a features file atomically (plain types only, so ``weights_only=True`` can read it)."""
    if features.ndim != 2:
        raise TextFeaturesError(f"features must be [C, E], got shape {tuple(features.shape)}")
    atomic_torch_save(path, {"format": FORMAT, "features": features.detach().float().cpu().contiguous(),
                             "meta": meta})


def load_text_features(
    path: str | Path, *, num_classes: int | None = None, normalize: bool = False
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Features [C, E] float32 and metadata from our ``.pth`` files or a bare tensor (the paper's).

    ``meta`` gains ``path`` and ``file_sha256``; a bare tensor gets ``{"source": "bare tensor", ...}``.
    ``normalize=True`` L2-normalises the rows (the paper's "a photo of a" file is not normalised).
    """
    path = Path(path)
    if not path.is_file():
        raise TextFeaturesError(f"text features file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for unreadable files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TextFeaturesError(f"cannot read text features from {path}: {first}") from e
    if isinstance(obj, torch.Tensor):
        feats, meta = obj, {"source": "bare tensor"}
    elif isinstance(obj, dict) and isinstance(obj.get("features"), torch.Tensor):
        feats, meta = obj["features"], dict(obj.get("meta") or {})
    else:
        keys = ", ".join(map(str, obj.keys())) if isinstance(obj, dict) else type(obj).__name__
        raise TextFeaturesError(f"{path} holds neither a [C, E] tensor nor a dict with 'features' (found: {keys})")
    if feats.ndim != 2 or not feats.is_floating_point():
        raise TextFeaturesError(f"{path}: expected a floating [C, E] tensor, got {feats.dtype} {tuple(feats.shape)}")
    feats = feats.float()
    if not torch.isfinite(feats).all():
        raise TextFeaturesError(f"{path}: the features contain NaN or Inf")
    if num_classes is not None and feats.shape[0] != num_classes:
        raise TextFeaturesError(f"{path} has {feats.shape[0]} class rows, expected {num_classes}")
    norms = feats.norm(dim=1)
    meta.setdefault("num_classes", int(feats.shape[0]))
    meta.setdefault("embed_dim", int(feats.shape[1]))
    meta.setdefault("normalized", bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3)))
    meta["path"] = str(path)
    meta["file_sha256"] = sha256_file(path)
    if normalize:
        feats = F.normalize(feats, dim=-1)
    return feats, meta
