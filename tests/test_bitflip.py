"""resilience.bitflip: the XOR flip matches struct-based IEEE-754 flips for every bit and special value."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from resilience.bitflip import FORMATS, bit_masks, clamp_to_profile, flip_bits, get_format, stuck_at

# normal, zero, subnormal (smallest and largest), extremes, infinities and NaN, in each format's range
FP32_VALUES = [0.0, -0.0, 1.0, -2.5, 3.1415926, 1e-45, 1.1754942e-38, 5.877e-39, 3.4028235e38, -1.1754944e-38,
               math.inf, -math.inf, math.nan]
FP16_VALUES = [0.0, -0.0, 1.0, -2.5, 65504.0, 6e-08, 6.1e-05, 3.05e-05, math.inf, -math.inf, math.nan]
BF16_VALUES = [0.0, -0.0, 1.0, -2.5, 3.3895e38, 9.2e-41, 1.1755e-38, math.inf, -math.inf, math.nan]


def struct_flip(value: float, bit: int, fmt: str) -> int:
    """The flipped word computed through ``struct``, independently of torch's integer views."""
    if fmt == "fp32":
        (word,) = struct.unpack("<I", struct.pack("<f", value))
    elif fmt == "fp16":
        (word,) = struct.unpack("<H", struct.pack("<e", value))
    else:  # bf16 = the upper half of the fp32 word (the values above are exact in bf16)
        (word,) = struct.unpack("<I", struct.pack("<f", value))
        word >>= 16
    return word ^ (1 << bit)


def words(t: torch.Tensor) -> list[int]:
    """Unsigned integer words of a float tensor."""
    fmt = FORMATS[{torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[t.dtype]]
    return [int(w) & ((1 << fmt.bits) - 1) for w in t.view(fmt.int_dtype).tolist()]


@pytest.mark.parametrize(("fmt", "values"), [("fp32", FP32_VALUES), ("fp16", FP16_VALUES), ("bf16", BF16_VALUES)])
def test_xor_flip_matches_struct_for_every_bit(fmt: str, values: list[float]) -> None:
    nf = FORMATS[fmt]
    base = torch.tensor(values, dtype=nf.dtype)
    for bit in range(nf.bits):
        flipped = flip_bits(base, torch.full((len(values),), bit))
        expected = [struct_flip(float(v), bit, fmt) for v in base.float().tolist()]
        assert words(flipped) == expected, (fmt, bit)
        # flipping twice restores the exact word (also for NaN payloads)
        assert words(flip_bits(flipped, torch.full((len(values),), bit))) == words(base)


def test_sign_bit_and_exponent_examples() -> None:
    x = torch.tensor([1.0, 1.0, 1.0])
    out = flip_bits(x, torch.tensor([31, 30, 0]))
    assert out[0] == -1.0
    assert out[1] == math.inf  # 1.0 = 0x3F800000: bit 30 completes the all-ones exponent
    assert out[2] == struct.unpack("<f", struct.pack("<I", 0x3F800001))[0]


def test_bit_range_is_checked() -> None:
    with pytest.raises(ValueError, match="bit positions"):
        bit_masks(torch.tensor([32]), FORMATS["fp32"])
    with pytest.raises(ValueError, match="bit positions"):
        flip_bits(torch.ones(1, dtype=torch.float16), torch.tensor([16]))
    with pytest.raises(ValueError, match="unknown number format"):
        get_format("fp8")


def test_stuck_at_forces_the_bit() -> None:
    x = torch.tensor([1.0, -1.0])
    assert stuck_at(x, torch.tensor([31, 31]), 0).tolist() == [1.0, 1.0]
    assert stuck_at(x, torch.tensor([31, 31]), 1).tolist() == [-1.0, -1.0]
    with pytest.raises(ValueError):
        stuck_at(x, torch.tensor([0, 0]), 2)


def test_goldeneye_clamp() -> None:
    x = torch.tensor([5.0, -7.0, math.nan, 0.5, math.inf, -math.inf])
    assert clamp_to_profile(x, 2.0).tolist() == [2.0, -2.0, 2.0, 0.5, 2.0, -2.0]
