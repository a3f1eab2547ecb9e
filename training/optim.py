"""Optimizer and learning-rate schedule factories (torchvision reference recipes' options)."""

from __future__ import annotations

import argparse

import torch
from torch import nn

OPTIMIZERS = ("sgd", "sgd_nesterov", "rmsprop", "adamw")
SCHEDULERS = ("steplr", "cosineannealinglr", "exponentiallr")
WARMUP_METHODS = ("linear", "constant")
# Parameter names of transformer position/relative-position tables that recipes exempt from weight decay.
EMBEDDING_KEYS = ("class_token", "position_embedding", "relative_position_bias_table", "pos_embed", "cls_token")


def split_by_name(
    model: nn.Module, groups: list[dict], keys: tuple[str, ...], weight_decay: float
) -> list[dict]:
    """Move parameters whose last name component is in ``keys`` into their own group with ``weight_decay``."""
    chosen = {id(p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in keys}
    if not chosen:
        return groups
    out, moved = [], []
    for group in groups:
        kept = [p for p in group["params"] if id(p) not in chosen]
        moved += [p for p in group["params"] if id(p) in chosen]
        if kept:
            out.append({**group, "params": kept})
    out.append({"params": moved, "weight_decay": weight_decay})
    return out


def build_param_groups(model: nn.Module, args: argparse.Namespace) -> list[dict]:
    """Weight-decay groups: norm/bias overrides from the recipe, ``logit_scale`` never decayed.

    Decaying ``logit_scale`` would pull the learned temperature towards exp(0) = 1, i.e. towards flat
    softmax outputs, which fights the loss for no regularisation benefit; CLIP does not decay it either.
    """
    import models

    groups = models.param_groups(
        model,
        args.weight_decay,
        norm_weight_decay=args.norm_weight_decay,
        bias_weight_decay=args.bias_weight_decay,
    )
    if args.transformer_embedding_decay is not None:
        groups = split_by_name(model, groups, EMBEDDING_KEYS, args.transformer_embedding_decay)
    return groups


def build_optimizer(params: list[dict], args: argparse.Namespace) -> torch.optim.Optimizer:
    name = args.opt.lower()
    if name.startswith("sgd"):
        return torch.optim.SGD(
            params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, nesterov="nesterov" in name
        )
    if name == "rmsprop":
        # eps/alpha as in the TF-derived MobileNet/EfficientNet recipes torchvision uses.
        return torch.optim.RMSprop(
            params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, eps=0.0316, alpha=0.9
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    raise ValueError(f"unknown optimizer {args.opt!r} (choose from {', '.join(OPTIMIZERS)})")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int = 1
) -> torch.optim.lr_scheduler.LRScheduler:
    """Optional warmup (``lr_warmup_epochs``) followed by the main schedule, stepped ``steps_per_epoch``
    times per epoch: 1 (the default) steps once per epoch; the number of iterations per epoch steps after
    every iteration, so that a cosine schedule reaches ``lr_min`` exactly when the last epoch ends."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
    name = args.lr_scheduler.lower()
    warmup = max(0, args.lr_warmup_epochs) * steps_per_epoch
    if name == "steplr":
        main = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=args.lr_step_size * steps_per_epoch, gamma=args.lr_gamma
        )
    elif name == "cosineannealinglr":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, args.epochs * steps_per_epoch - warmup), eta_min=args.lr_min
        )
    elif name == "exponentiallr":
        # the per-epoch factor spread evenly over the epoch's iterations
        main = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_gamma ** (1 / steps_per_epoch))
    else:
        raise ValueError(f"unknown lr scheduler {args.lr_scheduler!r} (choose from {', '.join(SCHEDULERS)})")
    if warmup == 0:
        return main
    if args.lr_warmup_method == "linear":
        first = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=args.lr_warmup_decay, total_iters=warmup)
    elif args.lr_warmup_method == "constant":
        first = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=args.lr_warmup_decay, total_iters=warmup)
    else:
        raise ValueError(f"unknown warmup method {args.lr_warmup_method!r} (choose from {', '.join(WARMUP_METHODS)})")
    return torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers=[first, main], milestones=[warmup])
