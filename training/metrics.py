"""Classification metrics accumulated as exact sums (so means are per image, also across processes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.distributed import all_reduce_sum


def hard_labels(target: torch.Tensor) -> torch.Tensor:
    """Class indices from index targets or from MixUp/CutMix probability targets."""
    return target.argmax(dim=1) if target.ndim == 2 else target


def top2diff(logits: torch.Tensor) -> torch.Tensor:
    """Per-image margin between the two largest softmax probabilities, in percent."""
    probs = F.softmax(logits.float(), dim=1)
    if probs.shape[1] < 2:
        return torch.full((probs.shape[0],), 100.0, device=probs.device)
    top = probs.topk(2, dim=1).values
    return (top[:, 0] - top[:, 1]) * 100.0


class EvalAccumulator:
    """Sums of loss, top-1/top-5 hits, Top2Diff and per-class hits over an evaluation pass.

    The loss is the per-image cross-entropy summed and divided by the image count at the end, so the
    mean does not depend on the batch size or on a short last batch.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.k = min(5, num_classes)
        # [count, loss, top1, top5, top2diff, top2diff over correct]
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)
        self.class_total = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.class_correct = torch.zeros(num_classes, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits = logits.float()
        target = hard_labels(target)
        loss = F.cross_entropy(logits, target, reduction="sum")
        topk = logits.topk(self.k, dim=1).indices
        hit1 = topk[:, 0] == target
        hit5 = (topk == target[:, None]).any(dim=1)
        margin = top2diff(logits)
        self.sums += torch.stack(
            [
                torch.tensor(float(target.numel()), device=logits.device),
                loss,
                hit1.sum(),
                hit5.sum(),
                margin.sum(),
                (margin * hit1).sum(),
            ]
        ).to(self.sums)
        self.class_total += torch.bincount(target, minlength=self.num_classes).to(self.class_total)
        self.class_correct += torch.bincount(target[hit1], minlength=self.num_classes).to(self.class_correct)

    def synchronize(self) -> None:
        """Sum the counters over all processes (no-op when undistributed)."""
        all_reduce_sum(self.sums)
        all_reduce_sum(self.class_total)
        all_reduce_sum(self.class_correct)

    @property
    def count(self) -> int:
        return int(self.sums[0].item())

    def result(self) -> dict[str, float | int]:
        n, loss, top1, top5, margin, margin_correct = self.sums.tolist()
        n_safe = max(n, 1.0)
        return {
            "n": int(n),
            "top1": 100.0 * top1 / n_safe,
            "top5": 100.0 * top5 / n_safe,
            "loss": loss / n_safe,
            "top2diff": margin / n_safe,
            "top2diff_correct": margin_correct / max(top1, 1.0),
        }

    def per_class(self) -> list[dict[str, float | int]]:
        """Per-class image count, hits and accuracy (percent; NaN for classes absent from the split)."""
        rows = []
        for c, (total, correct) in enumerate(zip(self.class_total.tolist(), self.class_correct.tolist(), strict=True)):
            rows.append(
                {
                    "class_index": c,
                    "n": int(total),
                    "correct": int(correct),
                    "accuracy": 100.0 * correct / total if total else float("nan"),
                }
            )
        return rows


class TrainAccumulator:
    """Running sums of training loss and top-1 hits, kept on the device to avoid a sync per step."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # count, loss, hits

    @torch.no_grad()
    def update(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        n = logits.shape[0]
        hits = (logits.argmax(dim=1) == hard_labels(target)).sum()
        self.sums[0] += n
        self.sums[1] += loss.detach().double() * n
        self.sums[2] += hits

    def synchronize(self) -> None:
        all_reduce_sum(self.sums)

    def result(self) -> dict[str, float | int]:
        n, loss, hits = self.sums.tolist()
        n_safe = max(n, 1.0)
        return {"n": int(n), "loss": loss / n_safe, "acc1": 100.0 * hits / n_safe}
