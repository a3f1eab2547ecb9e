"""The fast engine against the PyTorchFI reference on tiny inputs: a CIFAR ResNet, MobileNetV2, a small
VGG, the text head, a Swin-V2; closed-form layers, exact dropping, fp16/bf16, clamp=profile, a small
golden cache, the fallback for a model torch.fx cannot trace, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

import models
from models.swin_routing import route_window_attention
from resilience.bitflip import FORMATS
from resilience.engines import ENGINES, EngineError, FaultSites, InjectionResult
from resilience.engines import fast as fast_engine
from resilience.engines.fast import FastEngine
from resilience.engines.reference import ReferenceEngine
from resilience.layers import LayerInfo, discover_layers, select_layers
from resilience.metrics import score_faults
from resilience.profile import profile_max_abs

pytestmark = pytest.mark.usefixtures("one_thread")
DEFAULT_MIN_WINDOW_SAVING = fast_engine.MIN_WINDOW_SAVING


@pytest.fixture(autouse=True)
def windows_on_tiny_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test maps are so small that the default cost rule would run every op on whole maps."""
    monkeypatch.setattr(fast_engine, "MIN_WINDOW_SAVING", 0)


class Images:
    """ImageSource over a tensor indexed by image id."""

    def __init__(self, images: torch.Tensor) -> None:
        self.data = images

    def images(self, ids: torch.Tensor) -> torch.Tensor:
        return self.data[ids]


def sites_for(layer: LayerInfo, n: int, images: int, bits: int, seed: int) -> FaultSites:
    g = torch.Generator().manual_seed(seed)
    return FaultSites(layer.name, torch.randint(images, (n,), generator=g), torch.randint(layer.neurons, (n,), generator=g),
                      torch.randint(bits, (n,), generator=g))


def assert_agree(model: nn.Module, x: torch.Tensor, a: InjectionResult, b: InjectionResult, sites: FaultSites,
                 rtol: float = 1e-4) -> None:
    """The bench's criterion, for every fault: finiteness, ΔLoss within rtol·max(1, ΔLoss_ref), mismatch."""
    with torch.no_grad():
        golden = model(x).float()
    labels = golden.argmax(1)
    loss = torch.nn.functional.cross_entropy(golden.double(), labels, reduction="none")
    rows = sites.image
    ref, fast = (score_faults(r.faulty_logits, labels[rows], labels[rows], loss[rows]) for r in (a, b))
    assert torch.equal(ref.finite, fast.finite), sites.layer
    close = (fast.delta_loss - ref.delta_loss).abs() <= rtol * ref.delta_loss.clamp(min=1)
    assert bool((close | ~ref.finite).all()), (sites.layer, ref.delta_loss[~close], fast.delta_loss[~close])
    assert torch.equal(ref.mismatch, fast.mismatch), sites.layer
    # golden values come from differently composed batches: equal up to the last bits
    assert torch.allclose(a.golden_value, b.golden_value, rtol=rtol, atol=rtol)
    assert torch.allclose(a.faulty_value, b.faulty_value, rtol=rtol, atol=rtol, equal_nan=True)


def compare(model: nn.Module, x: torch.Tensor, n: int = 12, fmt: str = "fp32", clamp: bool = False,
            layers: str | None = None, rtol: float = 1e-4, cost_model: bool = False, **fast_options) -> FastEngine:
    """Run ``n`` faults per layer (those matching the regex ``layers``) through both engines; assert agreement.
    Without ``cost_model`` every batch runs its plan (on these tiny inputs the cost model would run most of
    them as full forwards, leaving the plans untested)."""
    nf = FORMATS[fmt]
    model = model.to(nf.dtype).eval()
    x = x.to(nf.dtype)
    chosen = select_layers(discover_layers(model, x[:1]), layers)
    limits = profile_max_abs(model, chosen, [x], nf, "cpu") if clamp else None
    reference = ReferenceEngine(model, chosen, nf, batch_size=8, clamp=limits)
    fast = FastEngine(model, chosen, nf, batch_size=8, clamp=limits, cost_model=cost_model, **fast_options)
    for i, layer in enumerate(chosen):
        sites = sites_for(layer, n, len(x), nf.bits, seed=i)
        assert_agree(model, x, reference.run(layer, sites, Images(x)), fast.run(layer, sites, Images(x)), sites, rtol)
    return fast


def small_vgg() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 3 * 3, 32), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(32, 5),
    ).eval()


def test_registered() -> None:
    assert ENGINES["fast"] is FastEngine


def test_cifar_resnet_agrees_and_uses_windows() -> None:
    torch.manual_seed(0)
    model = models.build_model("resnet20", 10, in_chans=1)
    fast = compare(model, torch.randn(5, 1, 12, 12))
    assert fast.path("layer1.0.conv1") == "windowed" and fast.path("linear") == "closed-form"
    assert fast.describe() == {"engine": "fast", "traced": True}
    assert fast.golden_images == 5  # one golden pass per image for all layers
    assert sum(c["dropped"] for c in fast.counts.values()) > 0
    assert fast.counts["layer1.0.conv1"]["window_ops"] > 0


def test_small_narrow_maps_run_on_whole_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the default cost rule a window on a 12x12, 16-channel map saves too little: whole maps, same results."""
    monkeypatch.setattr(fast_engine, "MIN_WINDOW_SAVING", DEFAULT_MIN_WINDOW_SAVING)
    torch.manual_seed(0)
    fast = compare(models.build_model("resnet20", 10, in_chans=1), torch.randn(5, 1, 12, 12), layers="layer1")
    assert fast.path("layer1.0.conv1") == "windowed"  # planned as windows, run whole
    assert all(c["window_ops"] == 0 for c in fast.counts.values())


def test_mobilenet_v2_inverted_residuals() -> None:
    torch.manual_seed(0)
    model = models.build_model("mobilenet_v2", 6, small_input=True)
    # the stem, the first block (no residual), block 3 (expansion, depthwise, projection into a residual
    # addition) and the classifier
    fast = compare(model, torch.randn(3, 3, 32, 32), n=8, layers=r"^features\.(0|1|3)\.|classifier")
    assert fast.path("features.3.conv.1.0") == "windowed" and fast.path("classifier.1") == "closed-form"


def test_small_vgg_with_max_pools() -> None:
    fast = compare(small_vgg(), torch.randn(4, 3, 12, 12), n=16)
    assert fast.path("0") == "windowed" and fast.path("12") == "suffix" and fast.path("15") == "closed-form"


def test_text_head() -> None:
    torch.manual_seed(0)
    model = models.build_model("resnet20", 4, head="text", embed_dim=8, in_chans=1)
    fast = compare(model, torch.randn(4, 1, 8, 8), n=16, layers="layer3|linear|head")
    # the B->E layer is followed by the normalisation, the E->C layer by the scale
    assert fast.path("backbone.linear") == "suffix" and fast.path("head") == "suffix"


def test_swin_v2() -> None:
    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
                            stochastic_depth_prob=0.0, num_classes=5, block=SwinTransformerBlockV2,
                            downsample_layer=PatchMergingV2)
    route_window_attention(model)  # as models.build_model does: qkv, proj and cpb_mlp become fault sites
    fast = compare(model, torch.randn(3, 3, 8, 8), n=10)
    assert fast.describe()["traced"] and "fallback" not in fast.describe() and "fallback_layers" not in fast.describe()
    assert {"features.1.0.attn.qkv", "features.1.0.attn.cpb_mlp.0", "features.1.0.attn.proj"} <= set(fast.counts)


def test_closed_form_replaces_one_logit() -> None:
    torch.manual_seed(0)
    model = models.build_model("resnet20", 10, in_chans=1).eval()
    x = torch.randn(3, 1, 8, 8)
    layer = discover_layers(model, x[:1])[-1]
    fast = FastEngine(model, [layer], FORMATS["fp32"], batch_size=4, cost_model=False)
    sites = FaultSites("linear", torch.tensor([0, 2, 1]), torch.tensor([3, 9, 0]), torch.tensor([30, 22, 31]))
    result = fast.run(layer, sites, Images(x))
    assert fast.path("linear") == "closed-form"
    with torch.no_grad():
        golden = model(x)[sites.image]
    for i, index in enumerate(sites.index.tolist()):
        assert result.faulty_logits[i, index].item() == result.faulty_value[i].item()
        others = torch.arange(10) != index
        assert torch.allclose(result.faulty_logits[i, others], golden[i, others], rtol=1e-5, atol=1e-5)


def test_dropping_is_exact() -> None:
    """A flip that a ReLU absorbs is dropped; one that changes a ReLU output by one ulp is recomputed."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(48, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model[0].weight.fill_(1.0)
        model[0].bias.copy_(torch.tensor([-10.0, 0.0]))  # channel 0 is negative everywhere, channel 1 positive
        # logit 0 is channel 1's value at pixel 3, copied through a centre tap and a one-hot row: sums of
        # exact zeros, so a one-ulp change reaches the logits unrounded in any summation order
        model[2].weight[0, 1, 1, 1] = 1.0
        model[4].weight[0, 3] = 1.0
    model.eval()
    x = (torch.arange(32, dtype=torch.float32).reshape(2, 1, 4, 4) + 17) / 32
    layer = discover_layers(model, x[:1])[0]
    reference = ReferenceEngine(model, [layer], FORMATS["fp32"], batch_size=8)
    fast = FastEngine(model, [layer], FORMATS["fp32"], batch_size=8, cost_model=False)
    # channel 0, bits 0 and 22: still negative -> masked; bit 31: positive -> not; channel 1, bit 0: one ulp
    sites = FaultSites("0", torch.tensor([0, 1, 0, 1]), torch.tensor([5, 7, 5, 16 + 3]), torch.tensor([0, 22, 31, 0]))
    a, b = reference.run(layer, sites, Images(x)), fast.run(layer, sites, Images(x))
    assert (fast.counts["0"]["faults"], fast.counts["0"]["dropped"]) == (4, 2)
    with torch.no_grad():
        golden = model(x)
    assert torch.equal(b.faulty_logits[:2], golden[[0, 1]])
    assert torch.equal(a.faulty_logits, b.faulty_logits)
    one_ulp = golden[1, 0].view(torch.int32) ^ 1
    assert torch.equal(b.faulty_logits[3, 0].view(torch.int32), one_ulp)


def test_strided_conv_that_reads_none_of_the_window() -> None:
    """A 1x1 stride-2 conv skips odd pixels: a flip there changes nothing after it (ResNet-50's downsample)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 1, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).eval()
    x = torch.rand(2, 1, 6, 6) + 1.0
    layer = discover_layers(model, x[:1])[0]
    reference = ReferenceEngine(model, [layer], FORMATS["fp32"], batch_size=8)
    fast = FastEngine(model, [layer], FORMATS["fp32"], batch_size=8, cost_model=False)
    odd = torch.tensor([1 * 6 + 1, 36 + 3 * 6 + 5, 72 + 5 * 6 + 3])  # (channel, odd row, odd column)
    sites = FaultSites("0", torch.tensor([0, 1, 1]), odd, torch.tensor([30, 31, 22]))
    a, b = reference.run(layer, sites, Images(x)), fast.run(layer, sites, Images(x))
    assert fast.path("0") == "windowed"
    assert_agree(model, x, a, b, sites)


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_half_formats(fmt: str) -> None:
    compare(small_vgg(), torch.randn(3, 3, 12, 12), n=12, fmt=fmt)


def test_clamp_profile() -> None:
    torch.manual_seed(0)
    fast = compare(models.build_model("resnet20", 10, in_chans=1), torch.randn(4, 1, 8, 8), n=12, clamp=True,
                   layers="layer1")
    assert fast.counts


def test_small_cache_recomputes_images() -> None:
    torch.manual_seed(0)
    model = models.build_model("resnet20", 10, in_chans=1)
    fast = compare(model, torch.randn(6, 1, 8, 8), n=20, layers=r"layer2\.0", cache_bytes=1)
    assert fast.golden_images > 6  # one image held at a time: evicted images are computed again


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        if y.sum() > 0:
            y = y * 2
        return self.fc(y.flatten(1))


def test_untraceable_model_falls_back_to_the_reference_computation() -> None:
    model = Untraceable().eval()
    x = torch.randn(5, 1, 6, 6)
    layers = discover_layers(model, x[:1])
    reference = ReferenceEngine(model, layers, FORMATS["fp32"], batch_size=4)
    with pytest.warns(UserWarning, match="falls back"):
        fast = FastEngine(model, layers, FORMATS["fp32"], batch_size=4)
    assert "fallback" in fast.describe() and not fast.describe()["traced"]
    for layer in layers:
        sites = sites_for(layer, 9, 5, 32, seed=3)
        a, b = reference.run(layer, sites, Images(x)), fast.run(layer, sites, Images(x))
        assert fast.path(layer.name) == "fallback"
        assert torch.equal(a.faulty_logits.nan_to_num(1.0), b.faulty_logits.nan_to_num(1.0))  # same batches: same bits
        assert torch.equal(a.golden_value, b.golden_value)


def test_bad_input() -> None:
    model = small_vgg()
    x = torch.randn(2, 3, 12, 12)
    layers = discover_layers(model, x[:1])
    fast = FastEngine(model, layers, FORMATS["fp32"], batch_size=4)
    with pytest.raises(EngineError, match="given for layer"):
        fast.run(layers[0], FaultSites("4", torch.tensor([0]), torch.tensor([0]), torch.tensor([0])), Images(x))
    with pytest.raises(EngineError, match="out of range"):
        fast.run(layers[0], FaultSites("0", torch.tensor([0]), torch.tensor([8 * 144]), torch.tensor([0])), Images(x))
    with pytest.raises(EngineError, match="bit positions"):
        fast.run(layers[0], FaultSites("0", torch.tensor([0]), torch.tensor([0]), torch.tensor([32])), Images(x))
    with pytest.raises(EngineError, match="cache_bytes"):
        FastEngine(model, layers, FORMATS["fp32"], cache_bytes=0)
