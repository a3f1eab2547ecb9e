"""The training and evaluation loops."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cli_shell import UserError
from training.ema import ModelEMA
from training.metrics import EvalAccumulator, TrainAccumulator
from training.progress import Progress


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN/Inf)."""


def autocast_for(device: torch.device, enabled: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """Mixed precision context: float16 on CUDA (with a GradScaler), bfloat16 on CPU."""
    if not enabled:
        return contextlib.nullcontext
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class TrainOptions:
    """The per-step knobs of :func:`train_one_epoch`."""

    clip_grad_norm: float | None = None
    amp: bool = False
    ema_steps: int = 32
    ema_warmup_epochs: int = 0  # the EMA copies the weights (no averaging) during these epochs
    print_freq: int = 100
    show_progress: bool = True


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    epoch: int,
    options: TrainOptions,
    *,
    model_ema: ModelEMA | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, top-1 (vs argmax of mixed targets), images/s."""
    model.train()
    autocast = autocast_for(device, options.amp)
    meter = TrainAccumulator(device)
    bar = Progress(loader, desc=f"Epoch {epoch}", enabled=options.show_progress, print_freq=options.print_freq)
    start = time.perf_counter()
    for step, (images, target) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast():
            output = model(images)
            loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if options.clip_grad_norm is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if options.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad_norm)
            optimizer.step()
        if model_ema is not None and step % options.ema_steps == 0:
            model_ema.update_parameters(model)
            if epoch < options.ema_warmup_epochs:
                model_ema.n_averaged.fill_(0)  # keep copying the weights while the lr warms up
        meter.update(loss, output, target)
        if options.show_progress and (step + 1) % options.print_freq == 0:
            current = loss.item()
            if not math.isfinite(current):
                raise TrainingError(f"loss is {current} at epoch {epoch}, step {step}; lower --lr or use --clip-grad-norm")
            bar.set_postfix(loss=current, lr=optimizer.param_groups[0]["lr"])
    elapsed = time.perf_counter() - start
    meter.synchronize()
    stats = meter.result()
    if not math.isfinite(stats["loss"]):
        raise TrainingError(f"training loss is {stats['loss']} in epoch {epoch}; lower --lr or use --clip-grad-norm")
    return {
        "train_loss": stats["loss"],
        "train_acc1": stats["acc1"],
        "train_images": stats["n"],
        "train_time": elapsed,
        "images_per_s": stats["n"] / elapsed if elapsed > 0 else float("nan"),
    }


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    num_classes: int,
    *,
    amp: bool = False,
    desc: str = "Test",
    show_progress: bool = True,
    print_freq: int = 100,
) -> EvalAccumulator:
    """Evaluate on ``loader`` (this process's shard); the returned accumulator is summed over processes."""
    model.eval()
    autocast = autocast_for(device, amp)
    acc = EvalAccumulator(num_classes, device)
    for images, target in Progress(loader, desc=desc, enabled=show_progress, print_freq=print_freq):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast():
            output = model(images)
        acc.update(output, target)
    acc.synchronize()
    return acc

