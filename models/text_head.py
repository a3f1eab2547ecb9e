"""Classifier heads (text-guided, cosine, projection), the text head's fusion into one B->C layer,
and last-layer lookup."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_SCALE_INIT = math.log(1 / 0.07)
# CLIP caps the temperature at 100 so the logits cannot grow without bound during training; the cap is
# applied in forward (exp(min(logit_scale, log 100))), so the stored parameter is never rewritten.
LOGIT_SCALE_MAX = math.log(100)


def classifier_name(module: nn.Module) -> str:
    """Qualified name of the last ``nn.Linear`` in registration order: the classifier of every
    registered backbone ("fc", "linear", "classifier.6", "classifier.1", "classifier.5", "head", "head.fc")."""
    names = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(module).__name__} has no nn.Linear layer")
    return names[-1]


def _normalized_rows(text_features: torch.Tensor | None, num_classes: int, embed_dim: int) -> torch.Tensor:
    if text_features is None:
        # Random directions, unit norm like real text features, so the "random" ablation differs only in
        # the directions, not in the scale of the initial logits.
        return F.normalize(torch.randn(num_classes, embed_dim), dim=1)
    if not isinstance(text_features, torch.Tensor):
        raise TypeError(f"text_features must be a Tensor[C, E], got {type(text_features).__name__}")
    if tuple(text_features.shape) != (num_classes, embed_dim):
        raise ValueError(
            f"text_features has shape {tuple(text_features.shape)} but the head needs "
            f"(num_classes, embed_dim) = ({num_classes}, {embed_dim})"
        )
    feats = text_features.detach().float()
    norms = feats.norm(dim=1)
    if not torch.isfinite(feats).all() or (norms == 0).any():
        raise ValueError("text_features must be finite with non-zero rows")
    return feats / norms[:, None]


def drop_classifier(backbone: nn.Module) -> int:
    """Replace the backbone's classifier (its last ``nn.Linear``) by ``nn.Identity``; returns the feature width B."""
    name = classifier_name(backbone)
    width = backbone.get_submodule(name).in_features
    backbone.set_submodule(name, nn.Identity())
    return width


class HeadClassifier(nn.Module):
    """A backbone followed by ``head`` = Linear(F -> C, bias=False) whose rows start as unit vectors: the
    L2-normalised ``text_features`` when given, else random directions (the text head's "random" init).

    Subclasses say what comes between: ``projects`` (the backbone ends in a Linear(B -> E) projection,
    F = E) and ``normalises`` (``logits = exp(min(logit_scale, log 100)) * head(f / ||f||)``; otherwise
    ``logits = head(f)``). ``freeze_head=True`` fixes the head weight (the class directions);
    ``logit_scale`` stays trainable on purpose: it is the softmax temperature, a single scalar the loss
    needs to tune whatever the directions are. State-dict keys: ``backbone.*``, ``logit_scale`` (when
    normalising), ``head.weight``.
    """

    projects: bool = True
    normalises: bool = True

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        embed_dim: int,
        text_features: torch.Tensor | None = None,
        freeze_head: bool = False,
    ) -> None:
        super().__init__()
        if self.projects:
            last = backbone.get_submodule(classifier_name(backbone))
            if last.out_features != embed_dim:
                raise ValueError(f"the backbone outputs {last.out_features} features but embed_dim is {embed_dim}")
        self.backbone = backbone
        if self.normalises:
            self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.head = nn.Linear(embed_dim, num_classes, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(_normalized_rows(text_features, num_classes, embed_dim))
        self.head.weight.requires_grad_(not freeze_head)

    @property
    def scale(self) -> torch.Tensor:
        """The multiplier actually applied to the cosine similarities (capped at 100)."""
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        if not self.normalises:
            return self.head(features)
        return self.scale * self.head(F.normalize(features, dim=1))


class TextGuidedClassifier(HeadClassifier):
    """The paper's text head: Linear(B -> E) at the end of the backbone, L2 normalisation, the learned
    scale, then Linear(E -> C) initialised from the class text features (the paper repository's layout)."""

    projects, normalises = True, True


class CosineClassifier(HeadClassifier):
    """The text head without the projection: the backbone's own features (its classifier removed,
    ``embed_dim`` = B) L2-normalised, scaled, then Linear(B -> C) with random unit rows of zero mean."""

    projects, normalises = False, True

    def __init__(self, backbone: nn.Module, num_classes: int, embed_dim: int, freeze_head: bool = False) -> None:
        super().__init__(backbone, num_classes, embed_dim, freeze_head=freeze_head)
        # The backbone's features end in a ReLU, so they all lie in the positive orthant: random directions
        # with a mean component give every image the same confident class preference, and the quickest cure
        # for that loss is shrinking the learned scale towards 0, after which no gradient is left (resnet20
        # on Fashion-MNIST at lr 0.1: scale 14 -> 0.02 in 25 steps, loss stuck at ln 10). Rows orthogonal to
        # the all-ones direction start every class at the same mean logit.
        with torch.no_grad():
            rows = self.head.weight
            rows.copy_(F.normalize(rows - rows.mean(dim=1, keepdim=True), dim=1))


class ProjectionClassifier(HeadClassifier):
    """The text head without normalisation and scale: Linear(B -> E), then Linear(E -> C) initialised from
    the class text features; the fused text head's shape, trained as such."""

    projects, normalises = True, False


def fuse_text_head(model: TextGuidedClassifier) -> nn.Module:
    """A copy of ``model.backbone`` whose last Linear(B -> E) is replaced by one Linear(B -> C).

    ``W = head.weight @ last.weight`` and ``b = head.weight @ last.bias``, so the fused network outputs
    ``head(f)`` with the unnormalised feature ``f``, while the text model outputs ``exp(s) * head(f / ||f||)``:
    fused logits = text logits * ||f|| / exp(s), a positive factor per sample. The predicted class
    (argmax) and the ranking of classes are therefore identical; probabilities and losses are not. The
    returned module is a deep copy (the text model is left untouched) with the baseline's module names.
    """
    if not isinstance(model, TextGuidedClassifier):
        raise TypeError(f"fuse_text_head needs a TextGuidedClassifier, got {type(model).__name__}")
    fused = copy.deepcopy(model.backbone)
    name = classifier_name(fused)
    last: nn.Linear = fused.get_submodule(name)
    head = model.head.weight.detach()
    layer = nn.Linear(
        last.in_features, head.shape[0], bias=last.bias is not None, device=head.device, dtype=last.weight.dtype
    )
    with torch.no_grad():
        layer.weight.copy_(head @ last.weight)
        if last.bias is not None:
            layer.bias.copy_(head @ last.bias)
    fused.set_submodule(name, layer)
    return fused


def last_layer_names(model: nn.Module) -> list[str]:
    """The classifier's last layer(s): ``["fc"]`` for a baseline, ``["head"]`` for a cosine classifier,
    ``["backbone.fc", "head"]`` for a text or projection head.

    A head found inside a wrapper (DDP, EMA) is reported with the wrapper's prefix; a model that records
    its own (``model.meta["last_layers"]``, the range-restricted copies of :mod:`models.range_restriction`)
    is taken at its word.
    """
    recorded = getattr(model, "meta", None)
    if isinstance(recorded, dict) and "last_layers" in recorded:
        return list(recorded["last_layers"])
    for prefix, module in model.named_modules():
        p = f"{prefix}." if prefix else ""
        if isinstance(module, HeadClassifier):
            projection = [f"{p}backbone.{classifier_name(module.backbone)}"] if module.projects else []
            return [*projection, f"{p}head"]
    return [classifier_name(model)]
