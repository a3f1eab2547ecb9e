"""The reference engine: PyTorchFI 0.6.0 neuron injection with an IEEE-754 XOR custom function.

Per batch of B faults, ``declare_neuron_fi(function=hook, layer_num=[l]*B, batch=[0..B-1], dim1..dim3)``
builds a corrupted copy of the model in which batch element ``i`` carries fault ``i``; our hook reads
the declared coordinates back from the injector and XORs the chosen bit (optionally clamping the result
to the layer's profiled range, as GoldenEye does). PyTorchFI's own "single bit flip" is an 8-bit
quantised flip, hence the custom function.

Known problems of PyTorchFI 0.6.0 handled here without patching it:

* its layer counter (``current_layer``) is never reset after a forward pass, so a second forward of the
  same corrupted model indexes past its layer list (IndexError): every batch declares a fresh corrupted
  model, and the counter is reset before and checked after the forward;
* its constructor calls ``logging.basicConfig`` with a format needing ``clientip``/``user`` fields, which
  breaks every later root log record: root handlers and level are restored around each call into it;
* its batch size is fixed at construction but only bounds the declared batch indices, so a final
  partial batch simply runs fewer images;
* it addresses outputs of rank 2 to 4 only (``dim1..dim3``); a layer whose output has more dimensions
  gets the same XOR from a forward hook of ours on the uncopied model (no such layer exists in the
  registered models; Swin's token Linears output [N, H, W, C] and its routed window projections
  [N, windows, tokens, C], which PyTorchFI addresses).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cli_shell import UserError
from resilience.bitflip import clamp_to_profile, flip_bits
from resilience.engines.base import Engine, FaultSites, ImageSource, InjectionResult
from resilience.layers import TARGET_TYPES, LayerInfo, discover_layers

PYTORCHFI_MAX_RANK = 4  # batch + dim1..dim3


class EngineError(UserError, RuntimeError):
    """The engine cannot inject into this model or layer as asked."""


@contextlib.contextmanager
def quiet_root_logging() -> Iterator[None]:
    """Undo PyTorchFI's ``logging.basicConfig`` and mute its INFO chatter on the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def inject_output(
    output: torch.Tensor,
    batch: torch.Tensor,
    coords: tuple[torch.Tensor, ...],
    bits: torch.Tensor,
    max_abs: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip ``bits`` at ``output[batch, *coords]`` in place; return (golden, faulty) values as float64."""
    where = (batch, *coords)
    golden = output[where]
    faulty = flip_bits(golden, bits)
    if max_abs is not None:
        faulty = clamp_to_profile(faulty, max_abs)
    output[where] = faulty
    return golden.double().cpu(), faulty.double().cpu()


class ReferenceEngine(Engine):
    """Neuron bit flips through PyTorchFI ``declare_neuron_fi`` with a custom XOR function."""

    name = "reference"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pfi: Any = None  # built on the first batch, when the input shape is known
        self._pfi_index: dict[str, int] = {}

    def _injector(self, example: torch.Tensor) -> Any:
        """The PyTorchFI injector over the whole model, with its layer indices mapped to our names."""
        if self._pfi is not None:
            return self._pfi
        from pytorchfi.core import fault_injection

        with quiet_root_logging(), torch.no_grad():
            pfi = fault_injection(
                self.model,
                batch_size=self.batch_size,
                input_shape=list(example.shape[1:]),
                layer_types=list(TARGET_TYPES),
                use_cuda=self.device.type == "cuda",
            )
        # PyTorchFI numbers layers by hook calls during a forward pass; ours are the executed conv/linear
        # modules in first-execution order. They agree when each module runs once; verify on the shapes
        # here and on module identity inside the hook.
        executed = discover_layers(self.model, example[:1])
        shapes = [tuple(shape[1:]) for shape in pfi.get_output_size()]
        if shapes != [layer.out_shape for layer in executed]:
            raise EngineError("PyTorchFI's layer enumeration does not match the executed conv/linear layers")
        self._pfi = pfi
        self._pfi_index = {layer.name: i for i, layer in enumerate(executed)}
        return pfi

    def run(self, layer: LayerInfo, sites: FaultSites, source: ImageSource) -> InjectionResult:
        """Inject every fault of ``sites`` in batches of ``batch_size``, one image copy per fault."""
        if sites.layer != layer.name:
            raise EngineError(f"fault sites of {sites.layer!r} given for layer {layer.name!r}")
        logits, golden, faulty = [], [], []
        for start in range(0, len(sites), self.batch_size):
            chunk = sites.slice(start, start + self.batch_size)
            images = source.images(chunk.image).to(self.device, self.fmt.dtype)
            out, gold, bad = self._run_batch(layer, chunk, images)
            logits.append(out)
            golden.append(gold)
            faulty.append(bad)
        if not logits:
            return InjectionResult(torch.empty(0, 0), torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64))
        return InjectionResult(torch.cat(logits), torch.cat(golden), torch.cat(faulty))

    def _coords(self, layer: LayerInfo, sites: FaultSites) -> tuple[torch.Tensor, ...]:
        if int(sites.index.min()) < 0 or int(sites.index.max()) >= layer.neurons:
            raise EngineError(f"element index out of range for layer {layer.name} ({layer.neurons} elements)")
        return tuple(c.to(self.device) for c in torch.unravel_index(sites.index, layer.out_shape))

    @torch.no_grad()
    def _run_batch(
        self, layer: LayerInfo, sites: FaultSites, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        coords = self._coords(layer, sites)
        batch = torch.arange(len(sites), device=self.device)
        bits = sites.bit.to(self.device)
        max_abs = None if self.clamp is None else float(self.clamp[layer.name])
        if len(layer.out_shape) + 1 > PYTORCHFI_MAX_RANK:
            return self._run_batch_own_hook(layer, images, batch, coords, bits, max_abs)

        pfi = self._injector(images)
        target = self._pfi_index[layer.name]
        record: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            if pfi.get_current_layer() == target:
                if module is not corrupted.get_submodule(layer.name):
                    raise EngineError(f"PyTorchFI layer {target} is not {layer.name}")
                # Coordinates as PyTorchFI holds them after declare_neuron_fi (its bounds checks ran).
                where = tuple(
                    torch.as_tensor(dims, device=self.device)
                    for dims in (pfi.corrupt_dim1, pfi.corrupt_dim2, pfi.corrupt_dim3)[: output.dim() - 1]
                )
                rows = torch.as_tensor(pfi.corrupt_batch, device=self.device)
                record["golden"], record["faulty"] = inject_output(output, rows, where, bits, max_abs)
            pfi.updateLayer()

        dims = [c.tolist() for c in coords] + [[None] * len(sites)] * (3 - len(coords))
        with quiet_root_logging():
            corrupted = pfi.declare_neuron_fi(
                function=hook,
                layer_num=[target] * len(sites),
                batch=batch.tolist(),
                dim1=dims[0],
                dim2=dims[1],
                dim3=dims[2],
            )
        pfi.reset_current_layer()
        try:
            logits = corrupted(images)
            if pfi.get_current_layer() != pfi.get_total_layers() or "golden" not in record:
                raise EngineError(f"PyTorchFI hooks did not run once per layer injecting into {layer.name}")
        finally:
            with quiet_root_logging():
                pfi.fi_reset()  # drops the corrupted copy and its hooks
        return logits.float().cpu(), record["golden"], record["faulty"]

    def _run_batch_own_hook(
        self,
        layer: LayerInfo,
        images: torch.Tensor,
        batch: torch.Tensor,
        coords: tuple[torch.Tensor, ...],
        bits: torch.Tensor,
        max_abs: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Outputs PyTorchFI cannot address (rank > 4): the same XOR from a hook on the model itself."""
        record: dict[str, torch.Tensor] = {}

        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            record["golden"], record["faulty"] = inject_output(output, batch, coords, bits, max_abs)

        handle = self.model.get_submodule(layer.name).register_forward_hook(hook)
        try:
            logits = self.model(images)
        finally:
            handle.remove()
        return logits.float().cpu(), record["golden"], record["faulty"]

    def describe(self) -> dict[str, Any]:
        """Engine name and the PyTorchFI version behind it."""
        from importlib.metadata import version

        return {"engine": self.name, "pytorchfi": version("pytorchfi")}
