"""Weight fault sites, fault models, and applying faults to a model's parameters in place.

A weight fault site is (layer, index tuple in PyTorch order, bit), as in dnn-benchmarks. ``layer`` is
a module name, meaning that module's ``weight``, or a qualified parameter name (``conv1.bias``,
``bn1.weight``) for the parameters that are not a conv/linear weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from cli_shell import UserError
from resilience.bitflip import flip_bits, format_of, stuck_at

# Permanent faults hold for the whole evaluation set; the transient flip lasts for one inference.
FAULT_MODELS: tuple[str, ...] = ("weight-bitflip", "weight-stuck0", "weight-stuck1", "weight-bitflip-transient")
TRANSIENT_FAULT_MODELS: tuple[str, ...] = ("weight-bitflip-transient",)

_NORM_TYPES: tuple[type[nn.Module], ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm)


class WeightFaultError(UserError, ValueError):
    """A weight fault or fault model that does not fit the model (one-line message)."""


@dataclass(frozen=True)
class WeightFault:
    """One weight fault site: element ``index`` of the parameter named by ``layer``, bit ``bit``."""

    layer: str
    index: tuple[int, ...]
    bit: int


@dataclass(frozen=True)
class FaultTarget:
    """A parameter that can hold weight faults, and how fault lists name it."""

    layer: str  # the name fault lists use (module name for conv/linear weights)
    param_name: str  # qualified parameter name
    kind: str  # "weight" (conv/linear), "bias" (conv/linear) or "norm" (normalisation layers)
    shape: tuple[int, ...]
    bits: int  # bits per element in the parameter's number format

    @property
    def numel(self) -> int:
        """Number of elements of the parameter."""
        return int(np.prod(self.shape, dtype=np.int64))


def check_fault_model(fault_model: str) -> str:
    """Return ``fault_model`` if known, else raise WeightFaultError listing the choices."""
    if fault_model not in FAULT_MODELS:
        raise WeightFaultError(f"unknown weight fault model {fault_model!r}; choose one of {', '.join(FAULT_MODELS)}")
    return fault_model


def parameter_kind(module: nn.Module, attr: str) -> str | None:
    """"weight"/"bias" for conv and linear parameters, "norm" for normalisation layers, else None."""
    if isinstance(module, _NORM_TYPES):
        return "norm"
    if isinstance(module, _ConvNd | nn.Linear) and attr in ("weight", "bias"):
        return attr
    return None


def fault_targets(model: nn.Module, *, include_bias: bool = False, include_bn: bool = False) -> list[FaultTarget]:
    """Parameters eligible for weight faults, in module definition order.

    Conv/linear weights always; their biases with ``include_bias``; normalisation layers' affine
    parameters (BatchNorm, LayerNorm, GroupNorm) with ``include_bn``.
    """
    allowed = {"weight"} | ({"bias"} if include_bias else set()) | ({"norm"} if include_bn else set())
    targets = []
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            kind = parameter_kind(module, attr)
            if kind not in allowed:
                continue
            qualified = f"{module_name}.{attr}" if module_name else attr
            layer = module_name if kind == "weight" else qualified
            targets.append(FaultTarget(layer, qualified, kind, tuple(param.shape), format_of(param.dtype).bits))
    return targets


class ParameterResolver:
    """Maps fault-list layer names to (module name, module, parameter attribute) of one model."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())

    def resolve(self, layer: str) -> tuple[str, nn.Module, str]:
        """The module name, module and parameter attribute that ``layer`` names."""
        module = self.modules.get(layer)
        if module is not None and isinstance(module._parameters.get("weight"), nn.Parameter):
            return layer, module, "weight"
        prefix, _, attr = layer.rpartition(".")
        module = self.modules.get(prefix)
        if module is not None and isinstance(module._parameters.get(attr), nn.Parameter):
            return prefix, module, attr
        raise WeightFaultError(f"{layer!r} names neither a module with a weight nor a parameter of the model")

    def parameter(self, layer: str) -> nn.Parameter:
        """The parameter that ``layer`` names."""
        _, module, attr = self.resolve(layer)
        return module._parameters[attr]


def corrupt(values: torch.Tensor, bits: torch.Tensor, fault_model: str) -> torch.Tensor:
    """``values`` with fault model ``fault_model`` applied to bit ``bits[i]`` of element ``i``."""
    if fault_model == "weight-stuck0":
        return stuck_at(values, bits, 0)
    if fault_model == "weight-stuck1":
        return stuck_at(values, bits, 1)
    check_fault_model(fault_model)
    return flip_bits(values, bits)


def _index_columns(indices: Sequence[tuple[int, ...]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Index tuples as one index tensor per dimension, usable as ``tensor[columns]``."""
    return tuple(torch.as_tensor(col, dtype=torch.long, device=device) for col in zip(*indices, strict=True))


def fault_values(
    model: nn.Module, faults: Sequence[WeightFault], fault_model: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Golden and faulty value of each fault's weight element (float64, fault order), each fault alone."""
    resolver = ParameterResolver(model)
    golden = torch.empty(len(faults), dtype=torch.float64)
    faulty = torch.empty(len(faults), dtype=torch.float64)
    for layer, members in _group_by_layer(faults).items():
        param = resolver.parameter(layer)
        values = param.detach()[_index_columns([faults[i].index for i in members], param.device)]
        bits = torch.tensor([faults[i].bit for i in members])
        golden[members] = values.double().cpu()
        faulty[members] = corrupt(values, bits.to(param.device), fault_model).double().cpu()
    return golden, faulty


def _group_by_layer(faults: Sequence[WeightFault]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, fault in enumerate(faults):
        groups.setdefault(fault.layer, []).append(i)
    return groups


@contextlib.contextmanager
def apply_weight_faults(
    model: nn.Module, faults: Sequence[WeightFault], fault_model: str = "weight-bitflip"
) -> Iterator[None]:
    """Apply all ``faults`` to the model's parameters in place; restore the exact original bits on exit.

    Several faults on one element compose in list order (two flips of one bit cancel). The original
    elements are saved before any change and written back in ``finally``, so the model is bit-identical
    afterwards even when the body raises.
    """
    check_fault_model(fault_model)
    resolver = ParameterResolver(model)
    saved: list[tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer, members in _group_by_layer(faults).items():
                param = resolver.parameter(layer)
                fmt = format_of(param.dtype)
                indices = [faults[i].index for i in members]
                if any(len(ix) != param.dim() for ix in indices):
                    raise WeightFaultError(f"{layer}: index tuples must have {param.dim()} entries for shape {tuple(param.shape)}")
                flat = np.ravel_multi_index(tuple(zip(*indices, strict=True)), tuple(param.shape))
                bits = torch.tensor([faults[i].bit for i in members], device=param.device)
                if int(bits.min()) < 0 or int(bits.max()) >= fmt.bits:
                    raise WeightFaultError(f"{layer}: bits must lie in [0, {fmt.bits - 1}] for {fmt.name}")
                unique_flat = np.unique(flat)
                unique_cols = _index_columns(list(zip(*np.unravel_index(unique_flat, tuple(param.shape)), strict=True)),
                                             param.device)
                saved.append((param, unique_cols, param.data[unique_cols].clone()))
                # Faults on the same element go in successive rounds so that each round touches
                # distinct elements and the rounds reproduce the sequential composition.
                rank = _occurrence_rank(flat)
                cols = _index_columns(indices, param.device)
                for r in range(int(rank.max()) + 1):
                    sel = torch.as_tensor(rank == r, device=param.device)
                    round_cols = tuple(c[sel] for c in cols)
                    param.data[round_cols] = corrupt(param.data[round_cols], bits[sel], fault_model)
        yield
    finally:
        with torch.no_grad():
            for param, cols, original in reversed(saved):
                param.data[cols] = original


def _occurrence_rank(values: np.ndarray) -> np.ndarray:
    """For each entry, how many equal entries precede it."""
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_vals)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(values)]))
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(len(values)) - run_start
    return rank


def sites_to_faults(targets: Sequence[FaultTarget], target_ids: np.ndarray, sites: np.ndarray) -> list[WeightFault]:
    """Turn per-target site numbers ``element * bits + bit`` into WeightFaults."""
    faults = []
    for tid, site in zip(target_ids.tolist(), sites.tolist(), strict=True):
        target = targets[tid]
        element, bit = divmod(site, target.bits)
        index = tuple(int(i) for i in np.unravel_index(element, target.shape))
        faults.append(WeightFault(target.layer, index, int(bit)))
    return faults


def random_weight_faults(
    model: nn.Module,
    n: int,
    seed: int,
    *,
    include_bias: bool = False,
    include_bn: bool = False,
    bits: Sequence[int] | None = None,
) -> list[WeightFault]:
    """``n`` distinct weight fault sites drawn uniformly over all (element, bit) sites of the targets.

    ``bits`` restricts the bit positions (default: every bit of each parameter's format). Seeded: the
    same model structure, ``n`` and ``seed`` always give the same list.
    """
    targets = fault_targets(model, include_bias=include_bias, include_bn=include_bn)
    if not targets:
        raise WeightFaultError("the model has no parameters eligible for weight faults")
    allowed = [np.asarray(sorted(set(bits)) if bits is not None else np.arange(t.bits)) for t in targets]
    for target, b in zip(targets, allowed, strict=True):
        if len(b) == 0 or b.min() < 0 or b.max() >= target.bits:
            raise WeightFaultError(f"bits must be a non-empty subset of [0, {target.bits - 1}] for {target.layer}")
    total = sum(t.numel * len(b) for t, b in zip(targets, allowed, strict=True))
    if not 0 <= n <= total:
        raise WeightFaultError(f"cannot draw {n} distinct faults from {total} sites")
    return draw_weight_faults(targets, allowed, n, np.random.default_rng(seed))


def draw_weight_faults(
    targets: Sequence[FaultTarget], allowed: Sequence[np.ndarray], n: int, rng: np.random.Generator, *,
    in_site_order: bool = False,
) -> list[WeightFault]:
    """``n`` distinct (element, bit) sites uniform over ``targets`` (``allowed[i]``: bit positions of target i).

    Faults come in draw order, or in parameter/element/bit order with ``in_site_order``.
    """
    if n == 0:
        return []
    sizes = np.array([t.numel * len(b) for t, b in zip(targets, allowed, strict=True)], dtype=np.int64)
    picks = rng.choice(int(sizes.sum()), size=n, replace=False)  # Floyd-style sampling: fine for huge populations
    if in_site_order:
        picks = np.sort(picks)
    offsets = np.r_[0, np.cumsum(sizes)]
    target_ids = np.searchsorted(offsets, picks, side="right") - 1
    nbits = np.array([len(b) for b in allowed])[target_ids]
    elements, bit_pos = np.divmod(picks - offsets[target_ids], nbits)
    bit_values = np.array([allowed[t][p] for t, p in zip(target_ids.tolist(), bit_pos.tolist(), strict=True)],
                          dtype=np.int64)
    site_bits = np.array([targets[t].bits for t in target_ids.tolist()], dtype=np.int64)
    return sites_to_faults(targets, target_ids, elements * site_bits + bit_values)
