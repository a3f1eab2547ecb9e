"""Optimizer parameter groups with per-kind weight decay (torchvision's ``set_weight_decay`` rules)."""

from __future__ import annotations

from torch import nn

from .text_head import HeadClassifier

NORM_CLASSES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    norm_weight_decay: float | None = None,
    bias_weight_decay: float | None = None,
) -> list[dict]:
    """Groups ``{"params": [...], "weight_decay": wd}`` for ``torch.optim`` (empty groups left out).

    Precedence as in torchvision: the text and cosine heads' ``logit_scale`` (never decayed: decay would pull the
    temperature towards exp(0) = 1, i.e. flat softmax outputs), then parameters named ``bias`` when
    ``bias_weight_decay`` is set, then parameters of normalisation layers when ``norm_weight_decay`` is
    set, then everything else at ``weight_decay``. Frozen parameters (``requires_grad=False``) are left
    out. Only the head's temperature is special: e.g. Swin-V2's attention ``logit_scale``
    parameters follow the ordinary rules, as in torchvision's recipes.
    """
    temperatures = {id(m.logit_scale) for m in model.modules() if isinstance(m, HeadClassifier) and m.normalises}
    groups: dict[str, list[nn.Parameter]] = {"other": [], "norm": [], "bias": [], "no_decay": []}
    seen: set[int] = set()  # a parameter shared by two modules may only enter one group
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in temperatures:
                groups["no_decay"].append(p)
            elif bias_weight_decay is not None and name == "bias":
                groups["bias"].append(p)
            elif norm_weight_decay is not None and isinstance(module, NORM_CLASSES):
                groups["norm"].append(p)
            else:
                groups["other"].append(p)
    decay = {"other": weight_decay, "norm": norm_weight_decay, "bias": bias_weight_decay, "no_decay": 0.0}
    return [{"params": params, "weight_decay": decay[key]} for key, params in groups.items() if params]
