"""IEEE-754 number formats and bit-level fault models.

Bit 0 is the least significant bit of the word and the highest bit is the sign (fp32: 31), as in
dnn-benchmarks and GoldenEye. A flip is an XOR of the integer view of the value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NumberFormat:
    """A floating-point format the model runs in and whose bits faults hit."""

    name: str
    dtype: torch.dtype
    int_dtype: torch.dtype
    bits: int


FORMATS: dict[str, NumberFormat] = {
    "fp32": NumberFormat("fp32", torch.float32, torch.int32, 32),
    "fp16": NumberFormat("fp16", torch.float16, torch.int16, 16),
    "bf16": NumberFormat("bf16", torch.bfloat16, torch.int16, 16),
}


def get_format(name: str) -> NumberFormat:
    """Look up a number format by name (fp32, fp16, bf16)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown number format {name!r}; choose one of {', '.join(FORMATS)}") from None


def format_of(dtype: torch.dtype) -> NumberFormat:
    """The number format whose dtype is ``dtype``."""
    for fmt in FORMATS.values():
        if fmt.dtype == dtype:
            return fmt
    raise ValueError(f"no bit-flip support for dtype {dtype}")


def bit_masks(bits: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """Integer masks ``1 << bit`` in the format's integer dtype (the sign bit wraps to the negative word)."""
    bits = torch.as_tensor(bits, dtype=torch.int64)
    if bits.numel() and (int(bits.min()) < 0 or int(bits.max()) >= fmt.bits):
        raise ValueError(f"bit positions must lie in [0, {fmt.bits - 1}] for {fmt.name}")
    # Shift in int64 then narrow: two's-complement truncation gives the right pattern for the top bit.
    return (torch.ones_like(bits) << bits).to(fmt.int_dtype)


def flip_bits(values: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Return ``values`` with bit ``bits[i]`` of element ``i`` inverted (element-wise, same shape)."""
    fmt = format_of(values.dtype)
    masks = bit_masks(bits, fmt).to(values.device)
    return (values.contiguous().view(fmt.int_dtype) ^ masks).view(fmt.dtype)


def stuck_at(values: torch.Tensor, bits: torch.Tensor, level: int) -> torch.Tensor:
    """Return ``values`` with bit ``bits[i]`` forced to ``level`` (0 or 1): a true stuck-at fault."""
    if level not in (0, 1):
        raise ValueError("stuck-at level must be 0 or 1")
    fmt = format_of(values.dtype)
    masks = bit_masks(bits, fmt).to(values.device)
    words = values.contiguous().view(fmt.int_dtype)
    words = words | masks if level else words & ~masks
    return words.view(fmt.dtype)


def clamp_to_profile(values: torch.Tensor, max_abs: torch.Tensor | float) -> torch.Tensor:
    """GoldenEye's range restriction: clamp to ±max_abs, and NaN becomes +max_abs."""
    max_abs = torch.as_tensor(max_abs, dtype=values.dtype, device=values.device)
    clamped = torch.maximum(torch.minimum(values, max_abs), -max_abs)
    return torch.where(torch.isnan(values), max_abs.expand_as(values), clamped)


def largest_finite_magnitude(logits: torch.Tensor) -> torch.Tensor:
    """Per row, the largest |value| among the finite ones (0 when none is), float64: the scale of the
    rounding error two summation orders leave in a row of logits."""
    return logits.double().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().amax(dim=1)
