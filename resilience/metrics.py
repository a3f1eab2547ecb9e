"""Per-fault and per-layer metrics, exactly as DESIGN.md defines them.

ΔLoss = |CE(faulty logits, label) − CE(golden logits, label)| in float64; mismatch = faulty top-1 ≠
golden top-1 (a faulty output holding a NaN or Inf has no top-1: prediction −1, always a mismatch);
Top2Diff = (softmax top-1 − top-2) × 100. A fault whose faulty output or loss is not finite is counted
apart (non-finite) and left out of the ΔLoss mean, std and CI; the mismatch rate is over all faults. CI of the mean: normal approximation,
mean ± z_{(1+c)/2} · s / √n with the sample standard deviation s (ddof = 1); mismatch rate: Wilson
score interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from resilience.bitflip import largest_finite_magnitude
from resilience.sampling import z_value

CONFIDENCE = 0.99
AGREEMENT_RTOL = 1e-4  # engines sum in different orders: ΔLoss agrees to reassociation, not bit for bit
# ... and the logits themselves differ by a few units in the last place of their largest magnitude (a
# 224-pixel ResNet-101 with random weights has logits near 7e4, where one float32 ulp is 0.0078)
AGREEMENT_LOGIT_ULPS = 64


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy in float64 (NaN/Inf pass through)."""
    return F.cross_entropy(logits.double(), labels.long(), reduction="none")


def top2diff(logits: torch.Tensor) -> torch.Tensor:
    """(softmax top-1 − top-2) × 100 per sample, float64."""
    top = torch.softmax(logits.double(), dim=1).topk(2, dim=1).values
    return (top[:, 0] - top[:, 1]) * 100.0


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 class per sample; −1 where any logit is NaN or Inf (torch's argmax would pick a NaN's index)."""
    pred = logits.argmax(dim=1)
    return torch.where(~torch.isfinite(logits).all(dim=1), torch.full_like(pred, -1), pred)


@dataclass
class FaultOutcomes:
    """Metrics of each fault (CPU tensors, fault order)."""

    faulty_loss: torch.Tensor  # float64
    delta_loss: torch.Tensor  # float64, NaN/Inf where the faulty loss is not finite
    finite: torch.Tensor  # bool
    faulty_pred: torch.Tensor  # int64 (−1: non-finite output)
    mismatch: torch.Tensor  # bool
    faulty_top2diff: torch.Tensor  # float64
    logit_scale: torch.Tensor  # float64, largest finite |faulty logit| (0 when none is finite)
    top_gap: torch.Tensor  # float64, faulty top-1 logit minus top-2 logit (NaN for a non-finite output)


def score_faults(
    faulty_logits: torch.Tensor, labels: torch.Tensor, golden_pred: torch.Tensor, golden_loss: torch.Tensor
) -> FaultOutcomes:
    """ΔLoss, mismatch and faulty Top2Diff of faults given the golden prediction and loss of their images."""
    faulty_loss = cross_entropy(faulty_logits, labels)
    pred = predictions(faulty_logits)
    return FaultOutcomes(
        faulty_loss=faulty_loss,
        delta_loss=(faulty_loss - golden_loss.double()).abs(),
        finite=torch.isfinite(faulty_loss) & (pred >= 0),
        faulty_pred=pred,
        mismatch=pred != golden_pred,
        faulty_top2diff=top2diff(faulty_logits),
        logit_scale=largest_finite_magnitude(faulty_logits),
        top_gap=faulty_logits.double().topk(2, dim=1).values.diff(dim=1).neg().squeeze(1),
    )


def agreement(
    ref: FaultOutcomes, other: FaultOutcomes, rtol: float = AGREEMENT_RTOL, logit_ulps: int = AGREEMENT_LOGIT_ULPS
) -> torch.Tensor:
    """Per fault, whether two engines agree to float32 reassociation.

    Same finiteness of the faulty loss; when finite, ΔLoss within ``rtol``·max(1, ΔLoss_ref) + 2·τ, where
    τ = ``logit_ulps`` float32 ulps of the largest logit (a cross-entropy moves by at most twice its
    logits' largest change); the same mismatch decision, unless both engines' top-1 and top-2 logits are
    within τ of each other (a tie that summation order may break either way).
    """
    tau = logit_ulps * torch.finfo(torch.float32).eps * torch.maximum(ref.logit_scale, other.logit_scale)
    close = (other.delta_loss - ref.delta_loss).abs() <= rtol * ref.delta_loss.clamp(min=1.0) + 2 * tau
    tie = (ref.top_gap <= tau) & (other.top_gap <= tau)
    return (ref.finite == other.finite) & (~ref.finite | close) & ((ref.mismatch == other.mismatch) | tie)


def mean_ci(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(mean, sample std, CI low, CI high) of ``values``; NaN where undefined (std and CI need n >= 2)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(np.mean(values))
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(np.std(values, ddof=1))
    half = z_value(confidence) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (NaN when n = 0)."""
    if n == 0:
        return math.nan, math.nan
    z = z_value(confidence)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class LayerStats:
    """Summary of one layer's faults."""

    n: int
    non_finite: int
    mean_delta_loss: float
    std_delta_loss: float
    ci_low: float
    ci_high: float
    mismatches: int
    mismatch_rate: float
    mismatch_ci_low: float
    mismatch_ci_high: float

    def as_dict(self) -> dict[str, Any]:
        """Field name -> value."""
        return asdict(self)


def summarize(
    delta_loss: np.ndarray, finite: np.ndarray, mismatch: np.ndarray, confidence: float = CONFIDENCE
) -> LayerStats:
    """Mean ΔLoss over finite faults with std and CI, non-finite count, mismatch rate with Wilson CI."""
    finite = np.asarray(finite, dtype=bool)
    n = len(finite)
    mean, std, low, high = mean_ci(np.asarray(delta_loss, dtype=np.float64)[finite], confidence)
    k = int(np.count_nonzero(mismatch))
    rate = k / n if n else math.nan
    m_low, m_high = wilson_interval(k, n, confidence)
    return LayerStats(n, int(n - finite.sum()), mean, std, low, high, k, rate, m_low, m_high)
