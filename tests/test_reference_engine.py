"""The PyTorchFI reference engine on hand-built tiny models: expected faulty logits, values, clamp,
partial batches, repeated runs, other formats, outputs PyTorchFI cannot address, root logging intact."""

from __future__ import annotations

import logging
import math
import struct

import pytest
import torch
from torch import nn

from resilience.bitflip import FORMATS, flip_bits
from resilience.engines import ENGINES, EngineError, FaultSites, get_engine
from resilience.engines.reference import ReferenceEngine
from resilience.layers import discover_layers

FP32 = FORMATS["fp32"]


class Images:
    """ImageSource over a tensor indexed by image id."""

    def __init__(self, images: torch.Tensor) -> None:
        self.data = images

    def images(self, ids: torch.Tensor) -> torch.Tensor:
        return self.data[ids]


def f32_flip(value: float, bit: int) -> float:
    (word,) = struct.unpack("<I", struct.pack("<f", value))
    return struct.unpack("<f", struct.pack("<I", word ^ (1 << bit)))[0]


def hand_mlp() -> nn.Sequential:
    """y = W2 relu(W1 x + b1) with small exact weights."""
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model[0].bias.copy_(torch.tensor([0.0, 0.5, -1.0]))
        model[2].weight.copy_(torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.5, 0.0]]))
    return model.eval()


def test_registry() -> None:
    assert ENGINES["reference"] is ReferenceEngine
    with pytest.raises(EngineError, match="unknown engine"):
        get_engine("nope")


def test_fault_in_hand_built_model_gives_expected_logits() -> None:
    model = hand_mlp()
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    layers = discover_layers(model, x[:1])
    assert [(layer.name, layer.out_shape) for layer in layers] == [("0", (3,)), ("2", (2,))]
    engine = ReferenceEngine(model, layers, FP32, batch_size=4)
    # image 0: hidden = relu([1, 2.5, 2]); flip bit 30 of element 1 (2.5 -> 2.5 * 2^128 overflows to... a finite
    # huge value would be 2^129*1.25: not representable, so use bit 22 (mantissa MSB): 2.5 -> 3.5)
    # image 1: hidden pre-activation [3, -0.5, 1]; flip the sign of element 0 -> -3, relu kills it
    sites = FaultSites("0", torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([22, 31]))
    result = engine.run(layers[0], sites, Images(x))
    assert result.golden_value.tolist() == [2.5, 3.0]
    assert result.faulty_value.tolist() == [f32_flip(2.5, 22), -3.0] == [3.5, -3.0]
    w2 = torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.5, 0.0]])
    expected = torch.stack([w2 @ torch.tensor([1.0, 3.5, 2.0]), w2 @ torch.tensor([0.0, 0.0, 1.0])])
    assert torch.equal(result.faulty_logits, expected)


def reference_logits(model: nn.Module, name: str, image: torch.Tensor, index: int, bit: int) -> torch.Tensor:
    """One image, one fault, flipped through ``struct`` in a plain forward hook."""

    def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        flat = out.view(-1)
        flat[index] = f32_flip(float(flat[index]), bit)
        return out

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(image[None])[0]
    finally:
        handle.remove()


def conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2),
        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 5), nn.Tanh(), nn.Linear(5, 3),
    ).eval()


def test_conv_and_linear_faults_match_independent_flips() -> None:
    model = conv_model()
    x = torch.randn(6, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    layers = discover_layers(model, x[:1])
    engine = ReferenceEngine(model, layers, FP32, batch_size=4)  # 7 faults: a full and a partial batch
    g = torch.Generator().manual_seed(2)
    for layer in layers:
        n = 7
        bits = torch.tensor([31, 30, 29, 23, 22, 0, 27])
        sites = FaultSites(layer.name, torch.randint(6, (n,), generator=g), torch.randint(layer.neurons, (n,), generator=g), bits)
        result = engine.run(layer, sites, Images(x))
        assert result.faulty_logits.shape == (n, 3)
        for i in range(n):
            ref = reference_logits(model, layer.name, x[sites.image[i]], int(sites.index[i]), int(sites.bit[i]))
            got = result.faulty_logits[i]
            both_nan = torch.isnan(ref) & torch.isnan(got)
            # batched and single-image convolutions may differ in the last bits
            assert torch.allclose(ref[~both_nan], got[~both_nan], rtol=1e-5, atol=1e-5), (layer.name, i)
        assert torch.equal(flip_bits(result.golden_value.float(), bits), result.faulty_value.float())


def test_repeated_runs_and_root_logging() -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    model = hand_mlp()
    x = torch.tensor([[1.0, 2.0]])
    layers = discover_layers(model, x)
    engine = ReferenceEngine(model, layers, FP32, batch_size=2)
    sites = FaultSites("2", torch.tensor([0]), torch.tensor([1]), torch.tensor([31]))
    first = engine.run(layers[1], sites, Images(x))
    second = engine.run(layers[1], sites, Images(x))  # PyTorchFI alone raises IndexError on a second forward
    assert torch.equal(first.faulty_logits, second.faulty_logits)
    assert root.handlers == handlers and root.level == level  # PyTorchFI's basicConfig undone


def test_clamp_profile_and_nan() -> None:
    model = nn.Sequential(nn.Linear(1, 2), nn.Linear(2, 1)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([1.5 * 2.0**127, 1.0]))  # bit 23 of the first makes a NaN
        model[1].weight.fill_(0.0)
    x = torch.zeros(1, 1)
    layers = discover_layers(model, x)
    engine = ReferenceEngine(model, layers, FP32, batch_size=2, clamp={"0": 4.0, "1": 1.0})
    sites = FaultSites("0", torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([23, 30]))
    result = engine.run(layers[0], sites, Images(x))
    assert math.isinf(f32_flip(1.0, 30)) and math.isnan(f32_flip(1.5 * 2.0**127, 23))
    assert result.faulty_value.tolist() == [4.0, 4.0]  # NaN -> +max, +inf -> +max


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_half_formats_flip_their_own_bits(fmt: str) -> None:
    nf = FORMATS[fmt]
    model = hand_mlp().to(nf.dtype)
    x = torch.tensor([[1.0, 2.0]])
    layers = discover_layers(model, x.to(nf.dtype))
    engine = ReferenceEngine(model, layers, nf, batch_size=2)
    sites = FaultSites("0", torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([14, 15]))
    result = engine.run(layers[0], sites, Images(x))
    assert result.golden_value.tolist() == [1.0, 2.5]
    # 1.0 is 0x3C00 (fp16) / 0x3F80 (bf16): bit 14 completes the all-ones exponent; bit 15 is the sign
    assert result.faulty_value.tolist() == [math.inf, -2.5]
    assert result.faulty_logits.dtype == torch.float32


class TokenModel(nn.Module):
    """Linear layers on [N, H, W, C] (Swin's layout, addressed by PyTorchFI) and on a 5-D tensor (not)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.tokens = nn.Linear(2, 4)
        self.deep = nn.Linear(4, 2)
        self.fc = nn.Linear(3 * 2 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x.permute(0, 2, 3, 1))  # [N, H, W, 4]
        t = self.deep(t.unsqueeze(1).expand(-1, 3, -1, -1, -1))  # [N, 3, H, W, 2]
        return self.fc(t.flatten(1))


def test_token_layers_4d_and_5d_outputs() -> None:
    model = TokenModel().eval()
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(4))
    layers = discover_layers(model, x[:1])
    assert [layer.out_shape for layer in layers] == [(2, 2, 4), (3, 2, 2, 2), (3,)]
    engine = ReferenceEngine(model, layers, FP32, batch_size=2)
    for layer in layers[:2]:
        sites = FaultSites(layer.name, torch.tensor([0, 2, 1]), torch.tensor([5, layer.neurons - 1, 0]), torch.tensor([30, 31, 22]))
        result = engine.run(layer, sites, Images(x))
        for i in range(3):
            ref = reference_logits(model, layer.name, x[sites.image[i]], int(sites.index[i]), int(sites.bit[i]))
            assert torch.allclose(ref, result.faulty_logits[i], rtol=1e-5, atol=1e-5)


def test_bad_sites_are_rejected() -> None:
    model = hand_mlp()
    x = torch.tensor([[1.0, 2.0]])
    layers = discover_layers(model, x)
    engine = ReferenceEngine(model, layers, FP32, batch_size=2)
    with pytest.raises(EngineError, match="given for layer"):
        engine.run(layers[0], FaultSites("2", torch.tensor([0]), torch.tensor([0]), torch.tensor([0])), Images(x))
    with pytest.raises(EngineError, match="out of range"):
        engine.run(layers[0], FaultSites("0", torch.tensor([0]), torch.tensor([3]), torch.tensor([0])), Images(x))
