"""The faults of a CAM comparison: one specification, turned into the same faults for a baseline and a
text-guided model.

Naming. The text model's backbone modules are ``backbone.X`` where the baseline's are ``X``. Faults
name layers the baseline's way (``layer3.0.conv1``; the ``backbone.`` prefix is accepted too). A
conv/linear weight is *shared* when both models have it under the same name with the same shape and
it is not a classifier layer; everything else is a model's *own* part: the baseline's classifier
(``linear``/``fc``), the text model's ``backbone.<classifier>`` (B -> E) and ``head`` (E -> C), and
any layer the two backbones do not have in common.

Random flips (N distinct weight bit flips, bits uniform over ``bits``). T, S and H_b are the numbers
of (element, bit) sites of the baseline's conv/linear weights, of the shared part and of the
baseline's own part (T = S + H_b); H_t is the text model's own part.
- shared: round(N * S / T) sites drawn once, uniformly over S, and applied to both models;
- baseline own: the remaining N - round(N * S / T) sites, uniformly over H_b, so the baseline gets
  exactly N flips spread uniformly over all its conv/linear weights (as the paper's 2000);
- text own: ``head_rule="density"`` (default) draws round(N * H_t / T) sites uniformly over H_t, the
  same flips per bit as everywhere else (one bit error rate for both chips; the text head has more
  weights, so it takes more flips); ``head_rule="count"`` draws as many as the baseline's own part.
The three draws use independent streams of ``SeedSequence(seed)``: the same seed gives the same
faults, and the head rule never changes the shared faults.

Single faults (one weight, one fault-list row, one neuron) must hit a shared layer: the classifiers
have no counterpart in the other model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cli_shell import UserError
from models import TextGuidedClassifier, last_layer_names
from resilience.bitflip import flip_bits
from resilience.layers import LayerInfo, discover_layers
from resilience.weights.fault_list import format_index, read_fault_list
from resilience.weights.faults import (
    FaultTarget,
    WeightFault,
    apply_weight_faults,
    draw_weight_faults,
    fault_targets,
)

HEAD_RULES: tuple[str, ...] = ("density", "count")


class FaultSpecError(UserError, ValueError):
    """A fault specification that does not fit the model pair (one-line message)."""


@dataclass(frozen=True)
class RandomFlips:
    """``n`` random weight bit flips over all conv/linear weights (see the module docstring)."""

    n: int
    seed: int = 0
    head_rule: str = "density"
    bits: tuple[int, ...] | None = None  # allowed bit positions; None = every bit of the format


@dataclass(frozen=True)
class SingleWeightFault:
    """One weight bit flip in a shared layer (baseline naming); ``origin`` names it in messages."""

    fault: WeightFault
    origin: str = "--weight-fault"


@dataclass(frozen=True)
class NeuronFault:
    """A flip of bit ``bit`` of element ``index`` (flat, within one image's output) of a conv/linear layer,
    in every image of every forward pass while it is applied."""

    layer: str
    index: int
    bit: int


FaultSpec = RandomFlips | SingleWeightFault | NeuronFault


@dataclass(frozen=True)
class ModelFaults:
    """The faults of one model, in its own naming; ``shared`` of the weight faults are also in the other model."""

    weights: tuple[WeightFault, ...] = ()
    neuron: NeuronFault | None = None
    shared: int = 0

    @property
    def count(self) -> int:
        """Number of faults (weight faults plus the neuron fault)."""
        return len(self.weights) + (self.neuron is not None)

    @property
    def own(self) -> int:
        """Faults in the model's own part (not shared with the other model)."""
        return self.count - self.shared


def backbone_prefix(model: nn.Module) -> str:
    """``"backbone."`` for a text-guided model (its backbone's modules are named so), else ``""``."""
    return "backbone." if isinstance(model, TextGuidedClassifier) else ""


def canonical_name(name: str) -> str:
    """A layer name in the baseline's naming: the text model's ``backbone.`` prefix removed."""
    return name.removeprefix("backbone.")


def fault_list_row(path: str | Path, injection: int) -> SingleWeightFault:
    """The row of a dnn-benchmarks fault-list CSV whose ``Injection`` id is ``injection``."""
    fault_list = read_fault_list(path)
    try:
        row = fault_list.injections.index(injection)
    except ValueError:
        ids = fault_list.injections
        span = f"{min(ids)}..{max(ids)}" if ids else "none"
        raise FaultSpecError(f"{path} has no row with Injection {injection} (ids: {span})") from None
    return SingleWeightFault(fault_list.faults[row], fault_list.where(row))


def split_targets(baseline: nn.Module, text: nn.Module) -> tuple[list[FaultTarget], list[FaultTarget], list[FaultTarget]]:
    """(shared, baseline own, text own) conv/linear weights; shared ones in the baseline's naming."""
    base_last, text_last = set(last_layer_names(baseline)), set(last_layer_names(text))
    prefix = backbone_prefix(text)
    text_targets = fault_targets(text)
    text_backbone = {
        canonical_name(t.layer): t for t in text_targets
        if t.layer.startswith(prefix) and t.layer not in text_last
    }
    shared, base_own = [], []
    for target in fault_targets(baseline):
        other = None if target.layer in base_last else text_backbone.get(target.layer)
        if other is not None and (other.shape, other.bits) == (target.shape, target.bits):
            shared.append(target)
        else:
            base_own.append(target)
    shared_in_text = {prefix + t.layer for t in shared}
    text_own = [t for t in text_targets if t.layer not in shared_in_text]
    return shared, base_own, text_own


def _allowed_bits(targets: Sequence[FaultTarget], bits: tuple[int, ...] | None) -> np.ndarray:
    width = min(t.bits for t in targets)
    if bits is None:
        return np.arange(width)
    allowed = np.unique(np.asarray(bits, dtype=np.int64))
    if len(allowed) == 0 or allowed.min() < 0 or allowed.max() >= width:
        raise FaultSpecError(f"--bits must be a non-empty subset of 0-{width - 1}")
    return allowed


def _sites(targets: Sequence[FaultTarget], nbits: int) -> int:
    return sum(t.numel for t in targets) * nbits


def _draw(targets: Sequence[FaultTarget], k: int, bits: np.ndarray, rng: np.random.Generator) -> list[WeightFault]:
    """``k`` distinct sites over ``targets`` with the same allowed ``bits`` for each, in parameter order."""
    return draw_weight_faults(targets, [bits] * len(targets), k, rng, in_site_order=True)


def _with_prefix(faults: Sequence[WeightFault], prefix: str) -> list[WeightFault]:
    return [WeightFault(prefix + f.layer, f.index, f.bit) for f in faults]


def random_pair_faults(baseline: nn.Module, text: nn.Module, spec: RandomFlips) -> tuple[ModelFaults, ModelFaults]:
    """The faults of ``spec`` for (baseline, text); rule in the module docstring."""
    if spec.head_rule not in HEAD_RULES:
        raise FaultSpecError(f"unknown head rule {spec.head_rule!r} (choose from {', '.join(HEAD_RULES)})")
    shared, base_own, text_own = split_targets(baseline, text)
    bits = _allowed_bits([*shared, *base_own, *text_own], spec.bits)
    s, h_base, h_text = (_sites(t, len(bits)) for t in (shared, base_own, text_own))
    total = s + h_base
    if not 0 <= spec.n <= total:
        raise FaultSpecError(f"--flips must lie in 0..{total} (the baseline's conv/linear weight bits), got {spec.n}")
    k_shared = round(spec.n * s / total)
    k_base = spec.n - k_shared
    k_text = round(spec.n * h_text / total) if spec.head_rule == "density" else k_base
    if k_text > h_text:
        raise FaultSpecError(f"the text model's own part has only {h_text} sites for {k_text} flips")
    streams = [np.random.default_rng(s_) for s_ in np.random.SeedSequence(spec.seed).spawn(3)]
    common = _draw(shared, k_shared, bits, streams[0])
    base = ModelFaults(tuple(common + _draw(base_own, k_base, bits, streams[1])), shared=k_shared)
    text_faults = _with_prefix(common, backbone_prefix(text)) + _draw(text_own, k_text, bits, streams[2])
    return base, ModelFaults(tuple(text_faults), shared=k_shared)


def single_pair_faults(baseline: nn.Module, text: nn.Module, spec: SingleWeightFault) -> tuple[ModelFaults, ModelFaults]:
    """The weight fault of ``spec`` in both models, after checking it fits a shared layer."""
    layer = canonical_name(spec.fault.layer)
    shared = {t.layer: t for t in split_targets(baseline, text)[0]}
    target = shared.get(layer)
    if target is None:
        example = next(iter(shared), "none")
        raise FaultSpecError(f"{spec.origin}: {spec.fault.layer!r} is not a conv/linear weight both models share "
                             f"(the backbone layers, e.g. {example}; the classifiers differ)")
    index = spec.fault.index
    if len(index) != len(target.shape) or any(not 0 <= i < n for i, n in zip(index, target.shape, strict=False)):
        raise FaultSpecError(f"{spec.origin}: index {format_index(index)} is out of range for {layer} of shape "
                             f"{target.shape}")
    if not 0 <= spec.fault.bit < target.bits:
        raise FaultSpecError(f"{spec.origin}: bit {spec.fault.bit} is outside 0..{target.bits - 1}")
    base, text_fault = (WeightFault(backbone_prefix(m) + layer, index, spec.fault.bit) for m in (baseline, text))
    return ModelFaults((base,), shared=1), ModelFaults((text_fault,), shared=1)


def neuron_pair_faults(
    baseline: nn.Module, text: nn.Module, spec: NeuronFault, example: torch.Tensor
) -> tuple[ModelFaults, ModelFaults]:
    """The neuron fault of ``spec`` in both models, after checking layer, element index and bit."""
    layer = canonical_name(spec.layer)
    try:
        infos: list[dict[str, LayerInfo]] = [
            {canonical_name(i.name): i for i in discover_layers(m, example) if i.name not in last_layer_names(m)}
            for m in (baseline, text)
        ]
    except ValueError as exc:  # a layer that runs more than once per forward pass
        raise FaultSpecError(f"--neuron-fault: {exc}") from None
    found = [info.get(layer) for info in infos]
    if None in found or found[0].out_shape != found[1].out_shape:
        names = [n for n in infos[0] if n in infos[1]]
        raise FaultSpecError(
            f"--neuron-fault: {spec.layer!r} is not a conv/linear layer both models share "
            f"(e.g. {', '.join(names[:2] + names[-1:]) or 'none'})"
        )
    if not 0 <= spec.index < found[0].neurons:
        raise FaultSpecError(f"--neuron-fault: index {spec.index} is outside 0..{found[0].neurons - 1} for {layer} "
                             f"(output {found[0].out_shape} per image)")
    width = torch.finfo(example.dtype).bits
    if not 0 <= spec.bit < width:
        raise FaultSpecError(f"--neuron-fault: bit {spec.bit} is outside 0..{width - 1}")
    base, text_fault = (NeuronFault(backbone_prefix(m) + layer, spec.index, spec.bit) for m in (baseline, text))
    return ModelFaults(neuron=base, shared=1), ModelFaults(neuron=text_fault, shared=1)


def pair_faults(
    baseline: nn.Module, text: nn.Module, spec: FaultSpec, example: torch.Tensor
) -> tuple[ModelFaults, ModelFaults]:
    """The faults ``spec`` means for (baseline, text); ``example`` (one input batch) sizes neuron outputs."""
    if isinstance(spec, RandomFlips):
        return random_pair_faults(baseline, text, spec)
    if isinstance(spec, SingleWeightFault):
        return single_pair_faults(baseline, text, spec)
    return neuron_pair_faults(baseline, text, spec, example)


def _flip_output_element(index: int, bit: int):
    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        # a new tensor: the layer's output may be a view that later in-place ops (ReLU) reuse
        faulty = output.reshape(output.shape[0], -1).clone()
        faulty[:, index] = flip_bits(faulty[:, index], torch.tensor(bit))
        return faulty.view(output.shape)

    return hook


@contextlib.contextmanager
def injected(model: nn.Module, faults: ModelFaults) -> Iterator[None]:
    """Apply ``faults`` to ``model`` for the body; on exit the weights are bit-identical and no hook is left."""
    with apply_weight_faults(model, faults.weights):
        handle = None
        if faults.neuron is not None:
            module = model.get_submodule(faults.neuron.layer)
            handle = module.register_forward_hook(_flip_output_element(faults.neuron.index, faults.neuron.bit))
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()
