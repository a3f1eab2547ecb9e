"""Run weight-fault lists: per fault and image, masked / non-critical / critical, plus ΔLoss.

Outcomes (dnn-benchmarks): *masked* = faulty logits bit-equal to the golden logits; *non-critical* =
different logits, same top-1; *critical* (SDC-1) = top-1 differs from the golden top-1. A faulty
output holding a NaN or Inf (or whose loss is not finite) is *non-finite*: counted in its own column
and, in dnn-benchmarks' three columns, as critical (it has no top-1). ΔLoss = |CE(faulty) − CE(golden)|
against the image label, in float64, averaged over the images with a finite output.

Two methods give the same counts:

* ``forward`` (the SFI approach): per fault, write the faulty weight, run the network over the
  images, restore.
* ``delta``: a weight fault in a conv/linear layer ``L`` changes one output channel (conv) or output
  feature (linear) of ``L``. From ``L``'s cached golden input, only that channel is recomputed with
  the faulty weight row (many faults in one call); images whose channel is bit-equal to the golden one
  are masked with no further work (fault dropping), and only the others run the rest of the network
  from ``L``'s output (``replay``). A fault that leaves the weight's bits unchanged (stuck-at a bit
  already at that level) is masked outright.

Masked is decided bit-exactly and consistently with ``forward``: the recomputed golden channel must
be bit-equal to the layer's golden output (else the whole layer is recomputed with the faulty weight,
which is what ``forward`` computes), and each layer's replay must reproduce the golden logits bit for
bit on a few images (else that layer falls back to ``forward``). Every forward pass runs at least
``replay.MIN_BATCH`` rows, since CPU kernels round differently for one or two rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from resilience import arithmetic
from resilience.bitflip import NumberFormat, format_of
from resilience.golden import EvaluatedImages, Golden, golden_pass
from resilience.weights.faults import (
    ParameterResolver,
    WeightFault,
    WeightFaultError,
    apply_weight_faults,
    check_fault_model,
    corrupt,
)
from resilience.weights.replay import (
    LayerReplay,
    ModuleCall,
    forward_padded,
    make_layer_replay,
    trace_module_calls,
)

METHODS: tuple[str, ...] = ("delta", "forward")
_DELTA_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Elements (per tensor) of the recomputed channels of one fault batch: bounds the batch's memory.
_ROWS_BUDGET = 1 << 23
_CHECK_IMAGES = 32


@dataclass
class Outcomes:
    """Per-fault results over the evaluated images, arrays in fault order."""

    n: np.ndarray  # images evaluated (dnn-benchmarks' n_injections)
    masked: np.ndarray
    non_critical: np.ndarray
    critical: np.ndarray
    nonfinite: np.ndarray  # images whose faulty loss is NaN/Inf (left out of ΔLoss)
    delta_loss_sum: np.ndarray  # float64, over images with a finite faulty loss

    @classmethod
    def zeros(cls, n_faults: int) -> Outcomes:
        """All-zero outcomes for ``n_faults`` faults."""
        ints = [np.zeros(n_faults, dtype=np.int64) for _ in range(5)]
        return cls(*ints, np.zeros(n_faults, dtype=np.float64))

    def counts(self) -> np.ndarray:
        """[F, 4]: n_injections, masked, non_critical, critical (the fault-list count columns)."""
        return np.stack([self.n, self.masked, self.non_critical, self.critical], axis=1)

    def delta_loss(self) -> np.ndarray:
        """Mean ΔLoss per fault over images with a finite faulty loss (NaN when there are none)."""
        finite = self.n - self.nonfinite
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(finite > 0, self.delta_loss_sum / np.maximum(finite, 1), np.nan)


class OutcomeCounter:
    """Classifies faulty logits against the golden ones and accumulates per-fault outcomes."""

    def __init__(self, n_faults: int, golden: Golden, device: torch.device | str = "cpu") -> None:
        logits = golden.logits.to(device)
        self.logits = logits
        self.fmt = format_of(logits.dtype)
        self.golden_bits = logits.view(self.fmt.int_dtype)
        self.golden_pred = logits.argmax(1)
        self.labels = golden.labels.to(device)
        self.golden_loss = F.cross_entropy(logits.double(), self.labels, reduction="none")
        self.outcomes = Outcomes.zeros(n_faults)

    def add_masked(self, faults: np.ndarray, images: np.ndarray) -> None:
        """``images[i]`` images of fault ``faults[i]`` are masked without running anything."""
        np.add.at(self.outcomes.n, faults, images)
        np.add.at(self.outcomes.masked, faults, images)

    def add(self, faults: torch.Tensor, images: torch.Tensor, logits: torch.Tensor) -> None:
        """Row ``i`` of ``logits`` is image ``images[i]`` under fault ``faults[i]``."""
        images = images.to(logits.device)
        equal = (logits.view(self.fmt.int_dtype) == self.golden_bits[images]).all(1)
        loss = F.cross_entropy(logits.double(), self.labels[images], reduction="none")
        # a non-finite output has no top-1 (argmax would rank a NaN first): critical in the three
        # columns, and counted apart
        finite = torch.isfinite(logits).all(1) & torch.isfinite(loss)
        flipped = (logits.argmax(1) != self.golden_pred[images]) | ~finite
        dloss = torch.where(finite, (loss - self.golden_loss[images]).abs(), torch.zeros_like(loss))
        f = faults.cpu().numpy()
        out = self.outcomes
        np.add.at(out.n, f, 1)
        np.add.at(out.masked, f, equal.cpu().numpy())
        np.add.at(out.critical, f, (~equal & flipped).cpu().numpy())
        np.add.at(out.non_critical, f, (~equal & ~flipped).cpu().numpy())
        np.add.at(out.nonfinite, f, (~finite).cpu().numpy())
        np.add.at(out.delta_loss_sum, f, dloss.cpu().numpy())


def weight_golden(
    model: nn.Module, images: EvaluatedImages, fmt: NumberFormat, *, batch_size: int = 128, chunk_images: int = 1024,
    device: torch.device | str = "cpu",
) -> Golden:
    """The golden pass of a weight-fault run: logits in the model's output dtype, batched as the run batches.

    ``fmt`` is the model's number format; the images are cast to it.
    """
    return golden_pass(lambda x: forward_padded(model, x), images.ids, images.batches(batch_size, chunk_images),
                       fmt, device, keep_dtype=True)


@dataclass
class RunReport:
    """What a run measured, plus how each layer was evaluated."""

    outcomes: Outcomes
    layer_methods: dict[str, str] = field(default_factory=dict)  # "delta" or "forward (reason)"


def transient_images(n_faults: int, n_images: int, seed: int, injections: Sequence[int]) -> torch.Tensor:
    """The image each transient fault hits: uniform, derived from (seed, Injection id) alone."""
    return torch.tensor([int(np.random.default_rng([seed, int(i)]).integers(n_images)) for i in injections[:n_faults]])


@dataclass
class _Group:
    """Faults of one parameter, and how they are evaluated."""

    module_name: str
    module: nn.Module
    attr: str
    fault_ids: list[int]
    method: str = "delta"
    replay_checked: bool = False


def _delta_supported(module: nn.Module, attr: str, call: ModuleCall | None) -> str | None:
    """Why the delta method cannot handle faults in ``module.attr`` (None when it can)."""
    if type(module) not in _DELTA_TYPES:
        return f"{type(module).__name__} is not a plain conv/linear module"
    if attr not in ("weight", "bias"):
        return f"parameter {attr}"
    if call is None or call.calls != 1:
        return f"the module runs {0 if call is None else call.calls} times per forward pass"
    if module._forward_hooks or module._forward_pre_hooks:
        return "the module has hooks"
    return None


def run_weight_faults(
    model: nn.Module,
    faults: Sequence[WeightFault],
    images: EvaluatedImages,
    golden: Golden,
    *,
    fault_model: str = "weight-bitflip",
    method: str = "delta",
    fault_images: torch.Tensor | None = None,
    chunk_images: int = 256,
    batch_size: int = 128,
    show_progress: bool = False,
) -> RunReport:
    """Evaluate every fault on every image (or on ``fault_images[i]`` only, for transient faults).

    ``fault_images[i]`` is a position in ``images`` (0 to ``len(images) - 1``), not a split id.
    ``golden`` comes from :func:`weight_golden` on the same ``images``. The model must be in
    eval mode; it is bit-identical afterwards. ``chunk_images`` bounds memory: golden activations of one
    chunk are cached at a time.
    """
    check_fault_model(fault_model)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if model.training:
        raise WeightFaultError("the model must be in eval mode (model.eval()): BatchNorm would use batch statistics")
    device = next(model.parameters()).device
    counter = OutcomeCounter(len(faults), golden, device)
    dtype = golden.logits.dtype
    groups = _group_faults(model, faults)
    report = RunReport(counter.outcomes)
    calls: dict[str, ModuleCall] = {}
    if method == "delta":
        first, _ = images.chunk(0, min(len(images), 8))
        calls = trace_module_calls(model, first.to(device=device, dtype=dtype))
    for group in groups:
        reason = "requested" if method == "forward" else _delta_supported(group.module, group.attr, calls.get(group.module_name))
        if reason:
            group.method = "forward"
            report.layer_methods[group.module_name] = f"forward ({reason})"
        else:
            report.layer_methods[group.module_name] = "delta"
    n_chunks = math.ceil(len(images) / chunk_images)
    with torch.no_grad(), tqdm(total=len(faults) * n_chunks, desc="weight faults", unit="fault",
                               disable=not show_progress, smoothing=0.05) as bar:
        for start in range(0, len(images), chunk_images):
            stop = min(start + chunk_images, len(images))
            x, _ = images.chunk(start, stop)
            x = x.to(device=device, dtype=dtype)
            for group in groups:
                ids = torch.tensor(group.fault_ids)
                targets = None
                if fault_images is not None:
                    hits = (fault_images[ids] >= start) & (fault_images[ids] < stop)
                    ids, targets = ids[hits], fault_images[ids][hits] - start
                if len(ids):
                    if group.method == "delta" and not _run_delta_group(
                        model, group, faults, ids, targets, x, start, counter.logits[start:stop], calls, counter,
                        fault_model, batch_size, bar,
                    ):
                        report.layer_methods[group.module_name] = "forward (replay did not reproduce the golden logits)"
                        group.method = "forward"
                    if group.method == "forward":
                        _run_forward_group(model, faults, ids, targets, x, start, counter, fault_model, batch_size, bar)
                bar.update(len(group.fault_ids) - len(ids))
    return report


def _group_faults(model: nn.Module, faults: Sequence[WeightFault]) -> list[_Group]:
    resolver = ParameterResolver(model)
    groups: dict[str, _Group] = {}
    for i, fault in enumerate(faults):
        module_name, module, attr = resolver.resolve(fault.layer)
        key = f"{module_name}.{attr}"
        if key not in groups:
            groups[key] = _Group(module_name, module, attr, [])
        groups[key].fault_ids.append(i)
    return list(groups.values())


def _run_forward_group(
    model: nn.Module, faults: Sequence[WeightFault], ids: torch.Tensor, targets: torch.Tensor | None,
    x: torch.Tensor, start: int, counter: OutcomeCounter, fault_model: str, batch_size: int, bar: tqdm,
) -> None:
    """The SFI loop: one fault at a time, a full forward pass over the chunk's images."""
    for k, fid in enumerate(ids.tolist()):
        rows = torch.arange(len(x)) if targets is None else targets[k : k + 1]
        with apply_weight_faults(model, [faults[fid]], fault_model):
            logits = torch.cat([forward_padded(model, x[part]) for part in rows.split(batch_size)])
        counter.add(torch.full((len(rows),), fid), rows + start, logits)
        bar.update(1)


def _channel_first(t: torch.Tensor, linear: bool) -> torch.Tensor:
    """Move a layer output's channel (feature) dimension to dim 1."""
    return t.movedim(-1, 1) if linear else t


def _layer_call(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The module's own computation (its arithmetic included) with another weight/bias, channel dimension first."""
    with arithmetic.alias(module.weight, weight):
        if isinstance(module, nn.Linear):
            return forward_padded(lambda t: F.linear(t, weight, bias), x).movedim(-1, 1)
        return forward_padded(lambda t: module._conv_forward(t, weight, bias), x)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    fmt = format_of(a.dtype)
    return a.view(fmt.int_dtype) == b.view(fmt.int_dtype)


def _run_delta_group(
    model: nn.Module, group: _Group, faults: Sequence[WeightFault], ids: torch.Tensor, targets: torch.Tensor | None,
    x: torch.Tensor, start: int, golden: torch.Tensor, calls: dict[str, ModuleCall], counter: OutcomeCounter,
    fault_model: str, batch_size: int, bar: tqdm,
) -> bool:
    """Delta method for the faults ``ids`` of one conv/linear parameter on one chunk.

    Returns False, having done nothing, when the replay does not reproduce the golden logits.
    """
    replay: LayerReplay = make_layer_replay(model, group.module_name, calls)
    state = replay.capture(x, batch_size)
    if not group.replay_checked:
        # Once per layer, on a few images: replaying the golden layer output must give the golden
        # logits bit for bit (it fails for models the replay cannot handle, e.g. data-dependent ones).
        rows = torch.arange(min(len(x), _CHECK_IMAGES), device=x.device)
        if not _bits_equal(replay.run(state, rows, state.layer_output[rows]), golden[rows]).all():
            return False
        group.replay_checked = True
    module, linear = group.module, isinstance(group.module, nn.Linear)
    weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
    param = weight if group.attr == "weight" else bias
    dev = param.device
    out_golden = _channel_first(state.layer_output, linear)
    element = tuple(torch.tensor(col, device=dev) for col in zip(*(faults[i].index for i in ids.tolist()), strict=True))
    golden_el = param[element]
    faulty_el = corrupt(golden_el, torch.tensor([faults[i].bit for i in ids.tolist()], device=dev), fault_model)
    unchanged = _bits_equal(golden_el, faulty_el).cpu()
    m = len(x)
    per_fault = m if targets is None else 1  # images each fault is evaluated on in this chunk
    counter.add_masked(ids[unchanged].numpy(), np.full(int(unchanged.sum()), per_fault))
    bar.update(int(unchanged.sum()))
    live = torch.nonzero(~unchanged).flatten()
    per_channel = 2 * math.prod(out_golden.shape[2:])
    if targets is None:
        fault_batch = max(1, _ROWS_BUDGET // (m * per_channel))
    else:  # each fault's channel is computed on the batch's images: F x F channel maps
        fault_batch = max(1, math.isqrt(_ROWS_BUDGET // per_channel))
    for part in _batches(live, fault_batch):
        channel = element[0][part.to(dev)]
        cols_el = tuple(col[part.to(dev)] for col in element)
        if targets is None:
            yf = _faulty_channels(module, group.attr, state.layer_input, out_golden, weight, bias, channel, cols_el,
                                  faulty_el[part.to(dev)])  # [M, F, ...]
            changed = ~_bits_equal(yf, out_golden[:, channel]).reshape(m, len(part), -1).all(2)  # [M, F]
            pairs = changed.nonzero()  # (image row, fault column)
            rows, cols = pairs[:, 0], pairs[:, 1]
            values = yf[rows, cols]
        else:
            img = targets[part].to(dev)
            yf = _faulty_channels(module, group.attr, state.layer_input[img], out_golden[img], weight, bias, channel,
                                  cols_el, faulty_el[part.to(dev)])  # [F, F, ...]: keep fault f on its image
            diag = torch.arange(len(part), device=dev)
            values = yf[diag, diag]
            changed_f = ~_bits_equal(values, out_golden[img, channel]).reshape(len(part), -1).all(1)
            rows, cols, values = img[changed_f], diag[changed_f], values[changed_f]
        fids = ids[part]
        n_changed = np.bincount(cols.cpu().numpy(), minlength=len(part))
        counter.add_masked(fids.numpy(), per_fault - n_changed)
        for chunk_rows, chunk_cols, chunk_values in zip(_batches(rows, batch_size), _batches(cols, batch_size),
                                                         _batches(values, batch_size), strict=True):
            out = out_golden[chunk_rows].clone()
            out[torch.arange(len(chunk_rows), device=dev), channel[chunk_cols]] = chunk_values
            logits = replay.run(state, chunk_rows, out.movedim(1, -1) if linear else out)
            counter.add(fids[chunk_cols.cpu()], chunk_rows.cpu() + start, logits)
        bar.update(len(part))
    return True


def _batches(t: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """``t`` split into batches along dim 0; no batch at all when ``t`` is empty."""
    return t.split(size) if len(t) else ()


def _faulty_channels(
    module: nn.Module, attr: str, layer_input: torch.Tensor, out_golden: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None, channel: torch.Tensor, element: tuple[torch.Tensor, ...], faulty_el: torch.Tensor,
) -> torch.Tensor:
    """Output channel ``channel[f]`` of the layer under fault ``f`` alone: [M, F, ...] (channel-first)."""
    w_rows, b_rows = weight[channel].clone(), None if bias is None else bias[channel].clone()
    cols = torch.arange(len(channel), device=weight.device)
    if attr == "weight":
        w_rows[(cols, *element[1:])] = faulty_el
    else:
        b_rows[cols] = faulty_el
    grouped = getattr(module, "groups", 1) != 1
    if not grouped:
        # Faulty and golden rows in one call, so both take the same kernel; the golden rows must then
        # match the layer's golden output bit for bit, else the kernel differs from the full layer's.
        both = _layer_call(module, layer_input, torch.cat([w_rows, weight[channel]]),
                           None if bias is None else torch.cat([b_rows, bias[channel]]))
        faulty, again = both[:, : len(channel)], both[:, len(channel) :]
        if _bits_equal(again, out_golden[:, channel]).all():
            return faulty
    # The whole layer with the faulty weight: exactly what the forward pass computes.
    outs = []
    for f in range(len(channel)):
        w, b = weight, bias
        if attr == "weight":
            w = weight.clone()
            w[channel[f]] = w_rows[f]
        else:
            b = bias.clone()
            b[channel[f]] = b_rows[f]
        outs.append(_layer_call(module, layer_input, w, b)[:, channel[f]])
    return torch.stack(outs, 1)
