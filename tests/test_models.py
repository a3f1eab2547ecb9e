"""models: the registry (every backbone, both heads), input adaptations, the text head, weight-decay
groups and head fusion. Random weights only; no downloads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from reference_assets import PAPER_FEATURES
from torch import nn

import models
from models.text_head import LOGIT_SCALE_INIT

pytestmark = pytest.mark.usefixtures("one_thread")

PAPER_BACKBONES = {
    "alexnet", "vgg16_bn", "vgg19_bn", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "mobilenet_v2", "maxvit_t", "swin_v2_t", "swin_v2_s", "focalnet_tiny", "focalnet_small",
}
CIFAR_RESNETS = {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110"}
CLASSIFIER = {
    "alexnet": "classifier.6", "vgg": "classifier.6", "resnet": "fc", "mobilenet_v2": "classifier.1",
    "maxvit": "classifier.5", "swin_v2": "head", "focalnet": "head.fc", "cifar_resnet": "linear",
}
ONE_PER_FAMILY = ["alexnet", "vgg16_bn", "resnet18", "mobilenet_v2", "maxvit_t", "swin_v2_t", "focalnet_tiny", "resnet20"]
EMBED = 16


def smallest_build(name: str, head: str = "linear", **kw) -> tuple[nn.Module, int]:
    """The model built for the smallest input it supports, and that input size."""
    spec = models.get_model_spec(name)
    small = spec.small_input == "adapted"
    model = models.build_model(name, 10, head=head, embed_dim=EMBED, small_input=small, **kw)
    return model.eval(), spec.min_input_size


# -------------------------------------------------------------------------------------------- registry


def test_registry_lists_every_backbone() -> None:
    assert set(models.list_models()) == PAPER_BACKBONES | CIFAR_RESNETS
    assert models.list_models() == sorted(models.list_models())
    assert models.list_models("swin*") == ["swin_v2_s", "swin_v2_t"]
    assert models.list_models("focalnet") == ["focalnet_small", "focalnet_tiny"]
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        models.build_model("resnet9", 10)
    with pytest.raises(ValueError, match="unknown head"):
        models.build_model("resnet20", 10, head="clip")
    with pytest.raises(ValueError, match="head='text'"):
        models.build_model("resnet20", 10, freeze_head=True)


@pytest.mark.parametrize("head", ["linear", "text"])
@pytest.mark.parametrize("name", models.list_models())
def test_every_model_builds_and_runs(name: str, head: str) -> None:
    torch.manual_seed(0)
    model, size = smallest_build(name, head)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    last = CLASSIFIER[models.get_model_spec(name).family]
    if head == "linear":
        assert models.last_layer_names(model) == [last]
        assert model.get_submodule(last).out_features == 10
    else:
        assert isinstance(model, models.TextGuidedClassifier)
        assert models.last_layer_names(model) == [f"backbone.{last}", "head"]
        assert model.backbone.get_submodule(last).out_features == EMBED
        assert model.head.weight.shape == (10, EMBED) and model.head.bias is None
        keys = set(model.state_dict())
        assert {"logit_scale", "head.weight"} <= keys
        assert all(k.startswith("backbone.") for k in keys - {"logit_scale", "head.weight"})
        assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_INIT)


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_grayscale_input(name: str) -> None:
    model, size = smallest_build(name, in_chans=1)
    if size <= 64:  # MaxViT's 224x224 forward already runs once per head above
        with torch.no_grad():
            assert model(torch.randn(1, 1, size, size)).shape == (1, 10)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1


@pytest.mark.parametrize("name", ["alexnet", "vgg16_bn", "resnet18", "mobilenet_v2"])
def test_small_input_runs_on_28_and_32_pixels(name: str) -> None:
    model = models.build_model(name, 10, in_chans=1, small_input=True).eval()
    with torch.no_grad():
        for size in (28, 32):
            assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_small_input_changes_per_family() -> None:
    r = models.build_model("resnet18", 10, small_input=True)
    assert r.conv1.kernel_size == (3, 3) and r.conv1.stride == (1, 1) and isinstance(r.maxpool, nn.Identity)
    v = models.build_model("vgg16_bn", 10, small_input=True)
    assert v.classifier[0].in_features == 512 and all(m.ceil_mode for m in v.features if isinstance(m, nn.MaxPool2d))
    a = models.build_model("alexnet", 10, small_input=True)
    assert a.features[0].stride == (1, 1) and a.classifier[1].in_features == 256
    m = models.build_model("mobilenet_v2", 10, small_input=True)
    assert m.features[0][0].stride == (1, 1) and m.features[2].conv[1][0].stride == (1, 1)
    # CIFAR ResNets are small-input networks: the flag changes nothing
    torch.manual_seed(0)
    plain = models.build_model("resnet20", 10).state_dict()
    torch.manual_seed(0)
    flagged = models.build_model("resnet20", 10, small_input=True).state_dict()
    assert all(torch.equal(plain[k], flagged[k]) for k in plain)


@pytest.mark.parametrize("name", ["maxvit_t", "swin_v2_t", "focalnet_tiny"])
def test_small_input_unsupported_is_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match=f"small_input=True is not supported for {name}"):
        models.build_model(name, 10, small_input=True)


def test_pretrained_weights_are_loaded_and_adapted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real torchvision loading path, with the download replaced by a known state dict."""
    torch.manual_seed(0)
    reference = tvm.resnet18(num_classes=1000).state_dict()
    monkeypatch.setattr(tvm.WeightsEnum, "get_state_dict", lambda self, *a, **k: reference)
    model = models.build_model("resnet18", 10, in_chans=1, pretrained="IMAGENET1K_V1")
    got = model.state_dict()
    assert torch.allclose(got["conv1.weight"], reference["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(got["layer4.1.conv2.weight"], reference["layer4.1.conv2.weight"])
    assert got["fc.weight"].shape == (10, 512)
    text = models.build_model("resnet18", 10, head="text", embed_dim=EMBED, pretrained="ResNet18_Weights.DEFAULT")
    assert torch.equal(text.backbone.conv1.weight, reference["conv1.weight"])
    assert text.backbone.fc.out_features == EMBED


def test_pretrained_errors_without_download() -> None:
    with pytest.raises(ValueError, match="unknown pretrained weights 'IMAGENET22K' for resnet50.*IMAGENET1K_V2"):
        models.build_model("resnet50", 10, pretrained="IMAGENET22K")
    with pytest.raises(ValueError, match="unknown pretrained weights"):
        models.build_model("resnet50", 10, pretrained="ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match="load_checkpoint"):
        models.build_model("resnet20", 10, pretrained="DEFAULT")


# ------------------------------------------------------------------------------------------- text head


def test_text_head_from_paper_imagenet_features() -> None:
    ref = PAPER_FEATURES
    if not ref.is_dir():
        pytest.skip(f"reference assets not found at {ref} (set TGR_REFERENCE_DIR)")
    for file in ("imagenet_gpt3.pth", "imagenet_a-photo-of-a.pth"):  # normalised rows / raw CLIP rows
        feats = torch.load(ref / file, weights_only=True)
        model = models.build_model("resnet50", 1000, head="text", embed_dim=512, text_features=feats)
        w = model.head.weight.detach()
        assert torch.allclose(w.norm(dim=1), torch.ones(1000), atol=1e-6)
        assert torch.allclose(w, feats / feats.norm(dim=1, keepdim=True), atol=1e-7)
        assert model.backbone.fc.out_features == 512


def test_text_features_validation_and_random_init() -> None:
    with pytest.raises(ValueError, match=r"shape \(10, 384\).*\(num_classes, embed_dim\) = \(10, 512\)"):
        models.build_model("resnet20", 10, head="text", text_features=torch.randn(10, 384))
    with pytest.raises(ValueError, match=r"shape \(9, 16\).*= \(10, 16\)"):
        models.build_model("resnet20", 10, head="text", embed_dim=16, text_features=torch.randn(9, 16))
    zero_row = torch.randn(10, 16)
    zero_row[3] = 0
    with pytest.raises(ValueError, match="non-zero rows"):
        models.build_model("resnet20", 10, head="text", embed_dim=16, text_features=zero_row)
    random_head = models.build_model("resnet20", 10, head="text", embed_dim=16).head.weight
    assert torch.allclose(random_head.norm(dim=1), torch.ones(10), atol=1e-6)


def test_text_forward_is_scaled_cosine_similarity_with_capped_scale() -> None:
    torch.manual_seed(0)
    model = models.build_model("resnet20", 10, head="text", embed_dim=EMBED).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = F.normalize(model.backbone(x), dim=1)
        assert torch.allclose(model(x), (1 / 0.07) * f @ model.head.weight.T, atol=1e-5)
        model.logit_scale.fill_(10.0)  # exp(10) > 100: capped
        assert model.scale.item() == pytest.approx(100.0)
        assert torch.allclose(model(x), 100 * f @ model.head.weight.T, atol=1e-4)


def test_freeze_head_survives_an_optimizer_step() -> None:
    torch.manual_seed(0)
    model = models.build_model("resnet20", 10, head="text", embed_dim=EMBED, freeze_head=True)
    assert not model.head.weight.requires_grad and model.logit_scale.requires_grad
    head, scale = model.head.weight.detach().clone(), model.logit_scale.item()
    conv = model.backbone.conv1.weight.detach().clone()
    optimizer = torch.optim.SGD(models.param_groups(model, 0.1), lr=0.5, momentum=0.9)
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert torch.equal(model.head.weight, head)
    assert model.logit_scale.item() != scale and not torch.equal(model.backbone.conv1.weight, conv)


# ------------------------------------------------------------------------------------------ param groups


def _group_of(groups: list[dict], p: torch.Tensor) -> dict:
    (group,) = [g for g in groups if any(q is p for q in g["params"])]
    return group


def test_param_groups_never_decay_logit_scale() -> None:
    model = models.build_model("resnet20", 10, head="text", embed_dim=EMBED)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for kwargs in ({}, {"norm_weight_decay": 0.0}, {"norm_weight_decay": 0.0, "bias_weight_decay": 0.0}):
        groups = models.param_groups(model, 5e-4, **kwargs)
        assert sorted(id(p) for g in groups for p in g["params"]) == sorted(map(id, trainable))
        assert _group_of(groups, model.logit_scale)["weight_decay"] == 0.0
        assert _group_of(groups, model.head.weight)["weight_decay"] == 5e-4
        assert _group_of(groups, model.backbone.conv1.weight)["weight_decay"] == 5e-4
    groups = models.param_groups(model, 5e-4)
    assert _group_of(groups, model.backbone.bn1.weight)["weight_decay"] == 5e-4
    groups = models.param_groups(model, 5e-4, norm_weight_decay=0.0, bias_weight_decay=1e-5)
    assert _group_of(groups, model.backbone.bn1.weight)["weight_decay"] == 0.0
    assert _group_of(groups, model.backbone.bn1.bias)["weight_decay"] == 1e-5  # bias rule wins, as torchvision
    assert _group_of(groups, model.backbone.linear.bias)["weight_decay"] == 1e-5
    frozen = models.build_model("resnet20", 10, head="text", embed_dim=EMBED, freeze_head=True)
    assert all(p is not frozen.head.weight for g in models.param_groups(frozen, 0.1) for p in g["params"])
    baseline = models.param_groups(models.build_model("resnet20", 10), 1e-4)
    assert [g["weight_decay"] for g in baseline] == [1e-4]


# ---------------------------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "alexnet", "mobilenet_v2"])
def test_fused_head_preserves_prediction(name: str) -> None:
    torch.manual_seed(0)
    model, size = smallest_build(name, "text")
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
        fused = models.fuse_text_head(model).eval()
        x = torch.randn(4, 3, size, size)
        text, out, feats = model(x), fused(x), model.backbone(x)
    last = CLASSIFIER[models.get_model_spec(name).family]
    assert models.last_layer_names(fused) == [last]
    layer = fused.get_submodule(last)
    assert (layer.in_features, layer.out_features) == (model.backbone.get_submodule(last).in_features, 10)
    assert torch.equal(out.argmax(1), text.argmax(1))
    # fused = text * ||f|| / exp(s): one positive factor per sample
    factor = feats.norm(dim=1, keepdim=True) / model.scale
    assert (factor > 0).all()
    assert torch.allclose(out, text * factor, rtol=1e-4, atol=1e-5)
    assert model.backbone.get_submodule(last).out_features == EMBED  # the text model is untouched


def test_last_layer_names_through_a_wrapper() -> None:
    wrapper = nn.Sequential()
    wrapper.add_module("module", models.build_model("resnet20", 10, head="text", embed_dim=EMBED))
    assert models.last_layer_names(wrapper) == ["module.backbone.linear", "module.head"]
    with pytest.raises(TypeError):
        models.fuse_text_head(models.build_model("resnet20", 10))


def test_resolve_device() -> None:
    from models.device import DeviceUnavailable, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match="--device cuda"):
            resolve_device("cuda", local_rank=1)
