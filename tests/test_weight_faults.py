"""Weight fault models and the weight-fault runner: bit semantics, restoration, outcome counts."""

from __future__ import annotations

import copy
import os
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_assets import DNN_BENCHMARKS, REFERENCE_DIR, load_script
from torch import nn

from resilience.bitflip import FORMATS
from resilience.golden import EvaluatedImages
from resilience.weights.fault_list import read_fault_list
from resilience.weights.faults import (
    WeightFault,
    WeightFaultError,
    apply_weight_faults,
    corrupt,
    fault_targets,
    fault_values,
    random_weight_faults,
)
from resilience.weights.replay import forward_padded
from resilience.weights.runner import OutcomeCounter, run_weight_faults, transient_images, weight_golden

pytestmark = pytest.mark.usefixtures("one_thread")


def f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def tensor_bits(t: torch.Tensor) -> list[int]:
    return [v & 0xFFFFFFFF for v in t.view(torch.int32).tolist()]


def reference_fault(value: float, bit: int, fault_model: str) -> int:
    """Expected fp32 bit pattern, computed with struct."""
    word = f32_bits(value)
    if fault_model == "weight-stuck0":
        return word & ~(1 << bit)
    if fault_model == "weight-stuck1":
        return word | (1 << bit)
    return word ^ (1 << bit)


@pytest.mark.parametrize("fault_model", ["weight-bitflip", "weight-stuck0", "weight-stuck1"])
def test_corrupt_matches_struct(fault_model: str) -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(64, generator=g) * 0.1
    bits = torch.randint(0, 32, (64,), generator=g)
    out = corrupt(values, bits, fault_model)
    expected = [reference_fault(v, b, fault_model) for v, b in zip(values.tolist(), bits.tolist(), strict=True)]
    assert tensor_bits(out) == expected


def test_stuck_at_is_not_a_flip() -> None:
    value = torch.tensor([1.0])  # 0x3F800000: bit 29 is 1, bit 30 is 0
    assert corrupt(value, torch.tensor([29]), "weight-stuck1").item() == 1.0  # already at level: unchanged
    assert corrupt(value, torch.tensor([30]), "weight-stuck0").item() == 1.0
    assert corrupt(value, torch.tensor([29]), "weight-bitflip").item() != 1.0
    assert corrupt(value, torch.tensor([31]), "weight-stuck1").item() == -1.0


def test_fp16_flip_matches_struct() -> None:
    values = torch.tensor([0.5, -3.25, 1e-3], dtype=torch.float16)
    bits = torch.tensor([15, 10, 0])
    out = corrupt(values, bits, "weight-bitflip")
    for v, b, o in zip(values.tolist(), bits.tolist(), out.tolist(), strict=True):
        word = struct.unpack("<H", struct.pack("<e", v))[0] ^ (1 << b)
        assert struct.unpack("<H", struct.pack("<e", o))[0] == word


def test_unknown_fault_model() -> None:
    with pytest.raises(WeightFaultError, match="unknown weight fault model"):
        corrupt(torch.ones(1), torch.zeros(1, dtype=torch.long), "weight-stuckX")


class Tiny(nn.Module):
    """conv+BN+ReLU, a residual conv, a grouped strided conv, two linears, a module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.dw = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=3)
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.act(self.conv2(y) + y)
        return self.fc2(F.relu(self.fc1(self.dw(y).flatten(1))))


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, EvaluatedImages]:
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    images = EvaluatedImages.from_tensors(torch.randn(20, 3, 8, 8), torch.randint(0, 5, (20,)))
    return model, images


def state_bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().view(torch.int32) if v.dtype == torch.float32 else v.clone()
            for k, v in model.state_dict().items()}


def test_apply_weight_faults_changes_and_restores(tiny) -> None:
    model, _ = tiny
    before = state_bits(model)
    faults = [WeightFault("conv1", (1, 2, 0, 1), 30), WeightFault("fc2.bias", (3,), 31),
              WeightFault("bn1.weight", (0,), 22)]
    golden = [model.conv1.weight[1, 2, 0, 1].item(), model.fc2.bias[3].item(), model.bn1.weight[0].item()]
    with apply_weight_faults(model, faults, "weight-bitflip"):
        got = [model.conv1.weight[1, 2, 0, 1], model.fc2.bias[3], model.bn1.weight[0]]
        for value, fault, t in zip(golden, faults, got, strict=True):
            assert tensor_bits(t.reshape(1)) == [reference_fault(value, fault.bit, "weight-bitflip")]
    after = state_bits(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_apply_weight_faults_restores_on_error_and_composes(tiny) -> None:
    model, _ = tiny
    before = state_bits(model)
    site = (0, 0, 1, 1)
    value = model.conv1.weight[site].item()
    with apply_weight_faults(model, [WeightFault("conv1", site, 3), WeightFault("conv1", site, 7)]):
        assert tensor_bits(model.conv1.weight[site].reshape(1)) == [f32_bits(value) ^ (1 << 3) ^ (1 << 7)]
    with apply_weight_faults(model, [WeightFault("conv1", site, 5), WeightFault("conv1", site, 5)]):
        assert model.conv1.weight[site].item() == value  # two flips of one bit cancel
    with pytest.raises(RuntimeError, match="boom"), apply_weight_faults(model, [WeightFault("fc1", (0, 0), 30)]):
        raise RuntimeError("boom")
    after = state_bits(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_random_weight_faults_seeded_distinct_and_in_range(tiny) -> None:
    model, _ = tiny
    a = random_weight_faults(model, 200, seed=3)
    assert a == random_weight_faults(model, 200, seed=3)
    assert a != random_weight_faults(model, 200, seed=4)
    assert len(set(a)) == 200
    shapes = {t.layer: t.shape for t in fault_targets(model)}
    assert {f.layer for f in a} <= set(shapes) == {"conv1", "conv2", "dw", "fc1", "fc2"}
    assert all(len(f.index) == len(shapes[f.layer]) and all(i < s for i, s in zip(f.index, shapes[f.layer], strict=True))
               and 0 <= f.bit < 32 for f in a)
    high = random_weight_faults(model, 50, seed=0, bits=[30, 31], include_bias=True, include_bn=True)
    assert {f.bit for f in high} <= {30, 31}
    targets = {t.layer for t in fault_targets(model, include_bias=True, include_bn=True)}
    assert {"conv1.bias", "bn1.weight", "bn1.bias", "fc2.bias"} <= targets


def independent_counts(model: nn.Module, fault: WeightFault, fault_model: str, x: torch.Tensor, y: torch.Tensor,
                       rows: list[int]) -> tuple[list[int], float]:
    """Masked / non-critical / critical and mean ΔLoss by plain deep-copied full forward passes."""
    faulty_model = copy.deepcopy(model)
    name = f"{fault.layer}.weight" if fault.layer in dict(model.named_modules()) else fault.layer
    param = dict(faulty_model.named_parameters())[name]
    word = reference_fault(param.data[fault.index].item(), fault.bit, fault_model)
    with torch.no_grad():
        param.data[fault.index] = torch.tensor([word - (1 << 32) if word >= 1 << 31 else word], dtype=torch.int32
                                               ).view(torch.float32)[0]
        golden, faulty = model(x), faulty_model(x)
    golden, faulty = golden[rows], faulty[rows]
    equal = (golden.view(torch.int32) == faulty.view(torch.int32)).all(1)
    flipped = golden.argmax(1) != faulty.argmax(1)
    loss = lambda z: F.cross_entropy(z.double(), y[rows], reduction="none")  # noqa: E731
    dloss = (loss(faulty) - loss(golden)).abs()
    finite = torch.isfinite(dloss)
    counts = [len(rows), int(equal.sum()), int((~equal & ~flipped).sum()), int((~equal & flipped).sum())]
    return counts, float(dloss[finite].mean()) if finite.any() else float("nan")


@pytest.mark.parametrize("fault_model", ["weight-bitflip", "weight-stuck0", "weight-stuck1", "weight-bitflip-transient"])
def test_outcome_counts_match_independent_computation(tiny, fault_model: str) -> None:
    model, images = tiny
    faults = random_weight_faults(model, 24, seed=1, include_bias=True, include_bn=True)
    # certainly not masked, and a BatchNorm parameter (evaluated by the forward method)
    faults += [WeightFault("conv2", (0, 0, 1, 1), 30), WeightFault("fc2", (1, 1), 30), WeightFault("bn1.weight", (2,), 30)]
    golden = weight_golden(model, images, FORMATS["fp32"], batch_size=8)
    hit = transient_images(len(faults), len(images), 0, list(range(len(faults)))) if "transient" in fault_model else None
    reports = {method: run_weight_faults(model, faults, images, golden, fault_model=fault_model, method=method,
                                         fault_images=hit, chunk_images=12, batch_size=8)
               for method in ("delta", "forward")}
    x, y = images.chunk(0, len(images))
    for k, fault in enumerate(faults):
        rows = list(range(len(x))) if hit is None else [int(hit[k])]
        counts, dloss = independent_counts(model, fault, fault_model, x, y, rows)
        for method, report in reports.items():
            assert report.outcomes.counts()[k].tolist() == counts, (method, fault)
            assert report.outcomes.delta_loss()[k] == pytest.approx(dloss, rel=1e-9, abs=1e-12, nan_ok=True)
    delta = reports["delta"]
    assert delta.layer_methods["conv1"] == "delta" and delta.layer_methods["fc2"] == "delta"
    assert delta.layer_methods["bn1"].startswith("forward")
    assert np.array_equal(delta.outcomes.delta_loss(), reports["forward"].outcomes.delta_loss(), equal_nan=True)


def test_stuck_at_level_is_masked_without_running(tiny) -> None:
    model, images = tiny
    value = model.fc1.weight[2, 3].item()
    bit = 31
    level = 1 if value < 0 else 0  # the sign bit is already at this level
    golden = weight_golden(model, images, FORMATS["fp32"])
    report = run_weight_faults(model, [WeightFault("fc1", (2, 3), bit)], images, golden,
                               fault_model=f"weight-stuck{level}")
    assert report.outcomes.counts()[0].tolist() == [len(images), len(images), 0, 0]


def test_fault_values(tiny) -> None:
    model, _ = tiny
    faults = [WeightFault("fc2", (0, 0), 31), WeightFault("conv1", (0, 0, 0, 0), 31)]
    golden, faulty = fault_values(model, faults, "weight-bitflip")
    assert golden.tolist() == [model.fc2.weight[0, 0].item(), model.conv1.weight[0, 0, 0, 0].item()]
    assert faulty.tolist() == [-g for g in golden.tolist()]


@pytest.mark.skipif(not (DNN_BENCHMARKS / "ResNet20.th").is_file(), reason=f"dnn-benchmarks assets absent ({DNN_BENCHMARKS})")
def test_dnn_benchmarks_resnet20_rows_delta_equals_forward() -> None:
    models = pytest.importorskip("models")
    from resilience.weights.fault_list import validate_fault_list

    model, _ = models.load_checkpoint(DNN_BENCHMARKS / "ResNet20.th", model_name="resnet20")
    fault_list = read_fault_list(DNN_BENCHMARKS / "ResNet20_FL.csv")
    validate_fault_list(model, fault_list)
    rows = [2, 200, 4000, 9000, 16600]  # conv1, layer1, layer2, layer3, linear
    faults = [fault_list.faults[r] for r in rows]
    g = torch.Generator().manual_seed(0)
    images = EvaluatedImages.from_tensors(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    golden = weight_golden(model, images, FORMATS["fp32"])
    delta = run_weight_faults(model, faults, images, golden, method="delta")
    forward = run_weight_faults(model, faults, images, golden, method="forward")
    assert set(delta.layer_methods.values()) == {"delta"}
    assert np.array_equal(delta.outcomes.counts(), forward.outcomes.counts())
    assert np.array_equal(delta.outcomes.delta_loss(), forward.outcomes.delta_loss(), equal_nan=True)
    assert delta.outcomes.counts()[0, 3] > 0  # conv1 bit 30: critical on random inputs too


class BatchCoupled(nn.Module):
    """Logits depend on the other images of the batch: the replay cannot reproduce them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        return self.fc(y - y.mean(0, keepdim=True))


def test_replay_mismatch_falls_back_to_forward() -> None:
    torch.manual_seed(0)
    model = BatchCoupled().eval()
    images = EvaluatedImages.from_tensors(torch.randn(20, 3, 6, 6), torch.randint(0, 3, (20,)))
    faults = random_weight_faults(model, 6, seed=0, bits=[30])
    golden = weight_golden(model, images, FORMATS["fp32"], batch_size=8)
    delta = run_weight_faults(model, faults, images, golden, batch_size=8, chunk_images=20)
    forward = run_weight_faults(model, faults, images, golden, batch_size=8, chunk_images=20, method="forward")
    assert delta.layer_methods["conv"].startswith("forward (replay did not reproduce")
    assert np.array_equal(delta.outcomes.counts(), forward.outcomes.counts())


def test_training_mode_is_refused(tiny) -> None:
    model, images = tiny
    golden = weight_golden(model, images, FORMATS["fp32"])
    model.train()
    try:
        with pytest.raises(WeightFaultError, match="eval mode"):
            run_weight_faults(model, [WeightFault("fc2", (0, 0), 3)], images, golden)
    finally:
        model.eval()


GENUINE_CIFAR10 = REFERENCE_DIR / "cifar10-test-first932" / "cifar10_test_first932.npz"
# The acceptance run scales these up (e.g. 100 faults per layer over ResNet20's 20 layers, 128 images).
EXACT_FAULTS_PER_LAYER = int(os.environ.get("TGR_EXACT_FAULTS_PER_LAYER", "2"))
EXACT_IMAGES = int(os.environ.get("TGR_EXACT_IMAGES", "32"))


@pytest.mark.skipif(not (DNN_BENCHMARKS / "ResNet20.th").is_file() or not GENUINE_CIFAR10.is_file(),
                    reason=f"reference assets absent ({REFERENCE_DIR})")
def test_delta_outcome_of_every_fault_and_image_is_a_plain_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """dnn-benchmarks' ResNet20 faults spread over every layer, on genuine CIFAR-10 images: the delta runner's
    masked / non-critical / critical outcome of each (fault, image) is what the faulty model's own forward pass
    gives, batched as the golden pass was, compared bit for bit with the golden logits."""
    import models

    model, _ = models.load_checkpoint(DNN_BENCHMARKS / "ResNet20.th", model_name="resnet20")
    model.eval()
    fault_list = read_fault_list(DNN_BENCHMARKS / "ResNet20_FL.csv")
    by_layer: dict[str, list[int]] = {}
    for row, fault in enumerate(fault_list.faults):
        by_layer.setdefault(fault.layer, []).append(row)
    rows = [r for layer_rows in by_layer.values()
            for r in np.array(layer_rows)[np.linspace(0, len(layer_rows) - 1, EXACT_FAULTS_PER_LAYER).astype(int)]]
    faults = [fault_list.faults[r] for r in rows]
    images = load_script("replay_dnn_benchmarks").load_images(REFERENCE_DIR, EXACT_IMAGES)
    batch = 16
    golden = weight_golden(model, images, FORMATS["fp32"], batch_size=batch)

    seen: dict[tuple[int, int], bool] = {}  # (fault, image) the runner found changed -> its top-1 changed
    add = OutcomeCounter.add

    def recording_add(self: OutcomeCounter, fault_ids: torch.Tensor, image_ids: torch.Tensor, logits: torch.Tensor) -> None:
        unequal = ~(logits.view(torch.int32) == self.golden_bits[image_ids]).all(1)
        flipped = (logits.argmax(1) != self.golden_pred[image_ids]) | ~torch.isfinite(logits).all(1)
        for f, i, u, c in zip(fault_ids.tolist(), image_ids.tolist(), unequal.tolist(), flipped.tolist(), strict=True):
            if u:
                seen[f, i] = c
        add(self, fault_ids, image_ids, logits)

    monkeypatch.setattr(OutcomeCounter, "add", recording_add)
    report = run_weight_faults(model, faults, images, golden, method="delta", batch_size=batch)
    assert set(report.layer_methods.values()) == {"delta"}
    assert len(by_layer) == sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())  # every layer

    params = dict(model.named_parameters())
    expected: dict[tuple[int, int], bool] = {}
    with torch.no_grad():
        for k, fault in enumerate(faults):
            param = params[f"{fault.layer}.weight"]
            value = param[fault.index].item()
            param[fault.index] = struct.unpack("<f", struct.pack("<I", f32_bits(value) ^ (1 << fault.bit)))[0]
            try:
                faulty = torch.cat([forward_padded(model, x) for x in images.chunk(0, len(images))[0].split(batch)])
            finally:
                param[fault.index] = value
            unequal = ~(faulty.view(torch.int32) == golden.logits.view(torch.int32)).all(1)
            flipped = (faulty.argmax(1) != golden.logits.argmax(1)) | ~torch.isfinite(faulty).all(1)
            expected.update({(k, i): bool(flipped[i]) for i in torch.nonzero(unequal).flatten().tolist()})
    assert len(faults) == len(by_layer) * EXACT_FAULTS_PER_LAYER
    assert seen == expected
    assert 0 < len(expected) < len(faults) * len(images)  # both outcomes occur
