"""Every conv/linear computation is a fault site: Swin-V2's routed attention (bit-identical to torchvision),
per-image faults in its batch-less position-bias layers, calls = discovered layers, both engines agreeing,
and the torchrun path.

The checks over the whole registry (every model x both heads) are slow on a CPU: they run when the
environment variable TGR_ALL_MODELS=1 is set (``scripts/site_table.py`` prints the same figures).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from test_campaign import tiny_checkpoint  # noqa: F401  (fixture: a random resnet20 checkpoint on Fashion-MNIST)
from torch import nn

import inject
import models
from models.swin_routing import KeyMaskedLinear, RoutedWindowAttentionV2, route_window_attention
from resilience.bitflip import FORMATS, flip_bits
from resilience.engines import FaultSites
from resilience.engines.fast import FastEngine
from resilience.engines.reference import ReferenceEngine
from resilience.golden import Golden, TensorImageSource, golden_pass
from resilience.layers import count_conv_linear_calls, discover_layers
from resilience.metrics import agreement, score_faults

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
FP32 = FORMATS["fp32"]
SWIN_SIDE = 64  # stage 1 is 16x16 tokens: two 8x8 windows a side, so the shifted blocks really shift
ALL_MODELS = os.environ.get("TGR_ALL_MODELS") == "1"


@pytest.fixture(scope="module")
def swin() -> tuple[nn.Module, torch.Tensor]:
    """swin_v2_t from the registry (routed), seeded random weights, two seeded 64x64 images."""
    torch.manual_seed(0)
    model = models.build_model("swin_v2_t", 10).eval()
    return model, torch.randn(2, 3, SWIN_SIDE, SWIN_SIDE, generator=torch.Generator().manual_seed(1))


def test_routed_swin_is_bit_identical_to_torchvision() -> None:
    torch.manual_seed(0)
    original = tvm.swin_v2_t(num_classes=10).eval()
    for name, p in original.named_parameters():
        if name.endswith("qkv.bias"):
            nn.init.normal_(p)  # a non-zero key bias: the forward must mask it as torchvision does
    routed = copy.deepcopy(original)
    assert route_window_attention(routed) == 12
    assert route_window_attention(routed) == 0  # idempotent
    attn = routed.features[1][0].attn
    assert isinstance(attn, RoutedWindowAttentionV2) and isinstance(attn.qkv, KeyMaskedLinear)
    assert routed.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(2, 3, SWIN_SIDE, SWIN_SIDE)
    with torch.no_grad():
        assert torch.equal(routed(x), original(x))
        torch.manual_seed(3)  # training mode: the same stochastic-depth draws on both sides
        trained = routed.train()(x)
        torch.manual_seed(3)
        assert torch.equal(trained, original.train()(x))
    assert bool((attn.qkv.bias[96:192] != 0).all())  # the parameter itself keeps its values


def test_swin_sites_are_named_and_counted(swin: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = swin
    layers = discover_layers(model, x[:1])
    names = [layer.name for layer in layers]
    assert count_conv_linear_calls(model, x[:1]) == len(layers) == 77
    assert names[:5] == ["features.0.0", "features.1.0.attn.qkv", "features.1.0.attn.cpb_mlp.0",
                         "features.1.0.attn.cpb_mlp.2", "features.1.0.attn.proj"]
    by_name = {layer.name: layer for layer in layers}
    # per image: 4 windows of 64 tokens; the bias table of 15x15 relative positions
    assert by_name["features.1.0.attn.qkv"].out_shape == (4, 64, 288)
    assert by_name["features.1.0.attn.cpb_mlp.0"].out_shape == (15, 15, 512)


def test_cpb_fault_changes_only_its_own_image(swin: tuple[nn.Module, torch.Tensor]) -> None:
    """The fault model of a batch-less layer: a flip during one inference corrupts that inference's bias table."""
    model, x = swin
    layer = model.get_submodule("features.1.1.attn.cpb_mlp.0")

    def flip_first_image(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        out[0, 7, 7, 3] = flip_bits(out[0, 7, 7, 3], torch.tensor(30))

    with torch.no_grad():
        golden = model(x)
        handle = layer.register_forward_hook(flip_first_image)
        try:
            faulty = model(x)
        finally:
            handle.remove()
    assert not torch.equal(faulty[0], golden[0])
    assert torch.equal(faulty[1], golden[1])


def both_engines_agree(model: nn.Module, x: torch.Tensor, layer_pattern: str, faults: int) -> int:
    """Run ``faults`` faults per matching layer (batches holding both images) through both engines;
    assert per-fault agreement (bench_inject's criterion) and return the faults run."""
    ids = torch.arange(len(x))
    logits = golden_pass(model, ids, [(x, torch.zeros(len(x), dtype=torch.long))], FP32, "cpu").logits
    golden = Golden(ids, logits, logits.argmax(1))
    source = TensorImageSource(ids, x)
    layers = [layer for layer in discover_layers(model, x[:1]) if layer_pattern in layer.name]
    assert layers
    engines = [engine(model, layers, FP32, batch_size=faults) for engine in (ReferenceEngine, FastEngine)]
    g = torch.Generator().manual_seed(2)
    run = 0
    for layer in layers:
        sites = FaultSites(layer.name, torch.arange(faults) % len(x), torch.randint(layer.neurons, (faults,), generator=g),
                           torch.randint(24, 32, (faults,), generator=g))  # high bits: visible outcomes
        rows = golden.rows(sites.image)
        ref, fast = (score_faults(e.run(layer, sites, source).faulty_logits, golden.labels[rows], golden.pred[rows],
                                  golden.loss[rows]) for e in engines)
        assert bool(agreement(ref, fast).all()), layer.name
        run += faults
    return run


def test_cpb_layers_take_several_faults_per_batch_in_both_engines(swin: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = swin
    assert both_engines_agree(model, x, "features.1.1.attn.cpb_mlp", faults=4) == 2 * 4  # a shifted block


def test_discovery_rejects_an_output_without_image_dimension() -> None:
    class TableBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Linear(2, 4)
            self.register_buffer("coords", torch.zeros(1, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.table(self.coords)

    with pytest.raises(ValueError, match=r"per-image faults: table \[1, 4\]"):
        discover_layers(TableBias(), torch.randn(1, 4))


@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn"])
def test_cnn_calls_equal_discovered_and_engines_agree(name: str) -> None:
    torch.manual_seed(0)
    model = models.build_model(name, 10, head="text", small_input=True).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert count_conv_linear_calls(model, x[:1]) == len(discover_layers(model, x[:1]))
    assert both_engines_agree(model, x, "classifier" if name.startswith("vgg") else "layer4.1", faults=2) > 0


@pytest.mark.skipif(not ALL_MODELS, reason="every model x both heads: set TGR_ALL_MODELS=1")
@pytest.mark.parametrize("head", models.registry.HEADS)
@pytest.mark.parametrize("name", models.list_models())
def test_every_model_every_site(name: str, head: str) -> None:
    spec = models.get_model_spec(name)
    torch.manual_seed(0)
    model = models.build_model(name, 10, head=head, small_input=spec.small_input != "unsupported").eval()
    x = torch.randn(2, 3, spec.min_input_size, spec.min_input_size, generator=torch.Generator().manual_seed(1))
    layers = discover_layers(model, x[:1])
    assert count_conv_linear_calls(model, x[:1]) == len(layers)
    assert both_engines_agree(model, x, "", faults=2) == 2 * len(layers)


def test_torchrun_two_processes_equal_one(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """torchrun with two CPU ranks (one shard each, into one folder) writes the single-process files byte for byte."""
    checkpoint = request.getfixturevalue("tiny_checkpoint")
    options = ["--checkpoint", str(checkpoint), "--injections", "8", "--seed", "1", "--max-images", "16",
               "--golden", "all", "--layers", "^(layer3.2.conv2|linear)$", "--batch-size", "4",
               "--chunk-size", "4", "--device", "cpu", "--no-progress", "-j", "0", "--threads", "1"]
    assert inject.main([*options, "--out", str(tmp_path / "one")]) == 0
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "inject.py", *options, "--out", str(tmp_path / "two")], cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr
    assert "shard 1/2" in ranks.stdout and "shard 0/2" in ranks.stdout
    for name in ("faults.parquet", "layers.csv"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def _ulps(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` moved by ``k`` float32 units in the last place (same sign and binade)."""
    return (x.view(torch.int32) + k).view(torch.float32)


def test_agreement_scales_with_the_logits() -> None:
    """Large logits: a reassociation-sized difference agrees, a real one does not; a near-tie may flip top-1."""
    golden = torch.tensor([[7.4e4, 7.0e4, 1.0e3]])
    label = torch.tensor([1])
    ref_logits = golden.clone()
    ref_logits[0, 0] = _ulps(golden[0, 0], 64)  # a small fault effect: ΔLoss 0.5 on a loss near 4000

    def scored(logits: torch.Tensor):
        clean = torch.nn.functional.cross_entropy(golden.double(), label, reduction="none")
        return score_faults(logits, label, golden.argmax(1), clean)

    def moved(k: int) -> torch.Tensor:
        out = ref_logits.clone()
        out[0, 0] = _ulps(ref_logits[0, 0], k)
        return out

    ref = scored(ref_logits)
    assert 0.4 < float(ref.delta_loss) < 0.6
    assert bool(agreement(ref, scored(moved(6))))  # 0.047 apart: failed a tolerance of 1e-4·max(1, ΔLoss)
    assert not bool(agreement(ref, scored(moved(1000))))
    tie = torch.tensor([[7.4e4, 7.4e4, 1.0e3]])
    tie[0, 1] = _ulps(tie[0, 0], -1)
    swapped = tie[:, [1, 0, 2]]
    assert bool(agreement(scored(tie), scored(swapped)))  # top-1 flips, but the logits tie to an ulp
    apart = tie.clone()
    apart[0, 1] = _ulps(tie[0, 0], -1000)
    assert not bool(agreement(scored(apart), scored(apart[:, [1, 0, 2]])))
    assert not bool(agreement(ref, scored(torch.tensor([[float("inf"), 7.0e4, 1.0e3]]))))
