"""The fast engine's cost model: golden passes where images take many faults, full forwards where they
take one, the same choice on every run, and agreement with the reference either way."""

from __future__ import annotations

import pytest
import torch
from test_fast_engine import Images, assert_agree

import models
from resilience.bitflip import FORMATS
from resilience.engines import FaultSites
from resilience.engines.fast import FastEngine, population_size
from resilience.engines.reference import ReferenceEngine
from resilience.layers import LayerInfo, discover_layers

pytestmark = pytest.mark.usefixtures("one_thread")
FP32 = FORMATS["fp32"]


@pytest.fixture(scope="module")
def resnet() -> tuple[torch.nn.Module, list[LayerInfo], torch.Tensor]:
    torch.manual_seed(0)
    model = models.build_model("resnet20", 10, in_chans=1).eval()
    x = torch.randn(24, 1, 8, 8)
    return model, discover_layers(model, x[:1]), x


def layer(layers: list[LayerInfo], name: str) -> LayerInfo:
    return next(info for info in layers if info.name == name)


def faults(info: LayerInfo, images: torch.Tensor, seed: int) -> FaultSites:
    g = torch.Generator().manual_seed(seed)
    n = len(images)
    return FaultSites(info.name, images, torch.randint(info.neurons, (n,), generator=g), torch.randint(32, (n,), generator=g))


def test_one_fault_per_image_runs_full_forwards(resnet: tuple) -> None:
    """Every image hit once: a golden pass would serve one fault, so the batch runs as full forwards."""
    model, layers, x = resnet
    info = layer(layers, "conv1")
    fast = FastEngine(model, [info], FP32, batch_size=8)
    sites = faults(info, torch.arange(len(x)), seed=1)
    result = fast.run(info, sites, Images(x))
    assert fast.counts["conv1"]["full_forward"] == len(sites)
    assert fast.golden_images == 1  # the probe image of the self-check, nothing for the faults
    assert_agree(model, x, ReferenceEngine(model, [info], FP32, batch_size=8).run(info, sites, Images(x)), result, sites)


def test_many_faults_per_image_run_the_plan(resnet: tuple) -> None:
    model, layers, x = resnet
    info = layer(layers, "layer3.2.conv1")
    fast = FastEngine(model, [info], FP32, batch_size=8)
    sites = faults(info, torch.tensor([3, 5]).repeat_interleave(16), seed=2)
    result = fast.run(info, sites, Images(x))
    assert fast.counts[info.name]["full_forward"] == 0
    assert fast.golden_images == 2  # the probe is image 3, held from the self-check on
    assert_agree(model, x, ReferenceEngine(model, [info], FP32, batch_size=8).run(info, sites, Images(x)), result, sites)


def test_images_asked_for_before_warm_the_store(resnet: tuple) -> None:
    """A first layer that hits each image once runs full forwards; a later layer hitting the same images
    again counts them as held and computes their golden passes, which later faults then share."""
    model, layers, x = resnet
    first, late = layer(layers, "layer1.0.conv1"), layer(layers, "layer3.2.conv2")
    fast = FastEngine(model, [first, late], FP32, batch_size=8)
    images = torch.arange(8)
    fast.run(first, faults(first, images, seed=3), Images(x))
    assert fast.counts[first.name]["full_forward"] == 8
    fast.run(late, faults(late, images, seed=4), Images(x))
    fast.run(late, faults(late, images.flip(0), seed=5), Images(x))
    assert fast.counts[late.name]["full_forward"] == 0
    assert fast.golden_images == 8


def test_the_choice_is_the_same_on_every_run(resnet: tuple) -> None:
    """FLOP counts, not timings, decide: two engines give the same bits and the same counts."""
    model, layers, x = resnet
    chosen = [layer(layers, name) for name in ("layer1.1.conv2", "layer2.0.conv1", "layer3.0.conv2")]
    g = torch.Generator().manual_seed(6)
    results = []
    for _ in range(2):
        fast = FastEngine(model, chosen, FP32, batch_size=8, cache_bytes=200_000)
        runs = [fast.run(info, faults(info, torch.randint(len(x), (40,), generator=g.manual_seed(i)), seed=i), Images(x))
                for i, info in enumerate(chosen)]
        results.append((runs, fast.counts, fast.golden_images))
    (a, counts_a, golden_a), (b, counts_b, golden_b) = results
    assert counts_a == counts_b and golden_a == golden_b
    assert 0 < sum(c["full_forward"] for c in counts_a.values()) < 120  # both ways were taken
    for ra, rb in zip(a, b, strict=True):
        # bit patterns, so that NaN logits of a flipped exponent compare too
        assert torch.equal(ra.faulty_logits.view(torch.int32), rb.faulty_logits.view(torch.int32))
        assert torch.equal(ra.faulty_value.view(torch.int64), rb.faulty_value.view(torch.int64))


def test_faults_the_later_layers_bring_pay_for_the_golden_pass(resnet: tuple) -> None:
    """About three faults per image in this layer do not pay for golden passes on their own; with every
    other layer still to run on the same few images they do, and the engine runs the plan."""
    model, layers, x = resnet
    info = layer(layers, "layer3.2.conv1")
    sites = faults(info, torch.randint(len(x), (64,), generator=torch.Generator().manual_seed(7)), seed=7)
    alone = FastEngine(model, [info], FP32, batch_size=64)
    alone.run(info, sites, Images(x))
    assert alone.counts[info.name]["full_forward"] == len(sites)
    campaign = FastEngine(model, layers, FP32, batch_size=64)
    result = campaign.run(info, sites, Images(x))
    assert campaign.counts[info.name]["full_forward"] == 0
    assert_agree(model, x, ReferenceEngine(model, [info], FP32, batch_size=64).run(info, sites, Images(x)), result, sites)


@pytest.mark.parametrize("size", [30, 200, 5000])
def test_population_is_estimated_from_repeats(size: int) -> None:
    """Draws with replacement from ``size`` items: the distinct count gives the size back roughly; no repeat
    says nothing bounds it."""
    g = torch.Generator().manual_seed(size)
    draws = torch.randint(size, (size,), generator=g)
    estimate = population_size(len(draws), len(set(draws.tolist())))
    assert 0.7 * size < estimate < 1.4 * size
    assert population_size(10, 10) == float("inf")
