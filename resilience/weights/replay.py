"""Run a network from one layer's (replaced) output onwards without recomputing the layer's prefix.

This is the plain, module-level way to get a "suffix": every module that finished before the target
layer started (and ran once) sees only golden inputs, so during a replay its ``forward`` is replaced by
a lookup of its cached golden output; the target layer's ``forward`` returns the given output. Only
the functional glue between modules (``F.relu`` in a parent's ``forward``) and the layers after the
target are computed. It assumes eval-mode models without data-dependent control flow, which the
runner checks by replaying the golden output and comparing logits bit for bit.

``make_layer_replay`` is the single entry point, so a graph-splitting suffix can replace it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# CPU GEMM kernels take another code path for 1-2 rows (last-ulp differences in the logits), which
# would break bit-equality with the golden logits; every forward here runs at least this many rows.
MIN_BATCH = 8


def forward_padded(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)``, padding a batch smaller than MIN_BATCH by repeating its last row."""
    n = x.shape[0]
    if n >= MIN_BATCH or n == 0:
        return fn(x)
    pad = x[-1:].expand(MIN_BATCH - n, *x.shape[1:])
    return fn(torch.cat([x, pad]))[:n]


@dataclass(frozen=True)
class ModuleCall:
    """How a module ran during one forward pass: call count, first start and last end tick."""

    calls: int
    start: int
    end: int
    tensor_output: bool


@torch.no_grad()
def trace_module_calls(model: nn.Module, example: torch.Tensor) -> dict[str, ModuleCall]:
    """Execution order of every module (by qualified name) for one forward pass of ``example``."""
    tick = 0
    starts: dict[str, int] = {}
    ends: dict[str, int] = {}
    calls: dict[str, int] = {}
    tensor_out: dict[str, bool] = {}
    handles = []

    def pre(name: str):
        def hook(_module, _args):
            nonlocal tick
            tick += 1
            starts.setdefault(name, tick)
            calls[name] = calls.get(name, 0) + 1

        return hook

    def post(name: str):
        def hook(_module, _args, output):
            nonlocal tick
            tick += 1
            ends[name] = tick
            tensor_out[name] = isinstance(output, torch.Tensor)

        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre(name)))
        handles.append(module.register_forward_hook(post(name)))
    try:
        forward_padded(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return {name: ModuleCall(calls[name], starts[name], ends[name], tensor_out[name]) for name in calls}


@dataclass
class ReplayState:
    """Golden tensors of one image chunk that a replay needs."""

    images: torch.Tensor
    layer_input: torch.Tensor
    layer_output: torch.Tensor
    memo: dict[str, torch.Tensor]


class _LayerReached(Exception):
    """Raised by the capture hook: nothing after the layer is needed."""


class LayerReplay:
    """Capture the golden state of a chunk, then rerun the network with ``layer``'s output replaced."""

    def __init__(self, model: nn.Module, layer: str, calls: dict[str, ModuleCall]) -> None:
        if calls.get(layer, ModuleCall(0, 0, 0, False)).calls != 1:
            raise ValueError(f"layer {layer!r} must run exactly once per forward pass to be replayed")
        self.model = model
        self.layer = layer
        self.modules = dict(model.named_modules())
        start = calls[layer].start
        done = {
            name for name, call in calls.items()
            if name and call.calls == 1 and call.tensor_output and call.end < start
            and not layer.startswith(name + ".")
        }
        # Only the outermost finished modules: their children never run during a replay.
        self.memo_names = sorted(name for name in done if name.rpartition(".")[0] not in done)

    @torch.no_grad()
    def capture(self, images: torch.Tensor, batch_size: int) -> ReplayState:
        """Run ``images`` up to the layer, keeping its input and output and the finished modules' outputs."""
        store: dict[str, list[torch.Tensor]] = {name: [] for name in [*self.memo_names, "<in>", "<out>"]}
        handles = []

        def keep(key: str):
            # clone: in-place ops later in the forward (ReLU(inplace=True)) would overwrite the output
            def hook(_module, _args, output):
                store[key].append(output.detach().clone())

            return hook

        def keep_input(_module, args):
            store["<in>"].append(args[0].detach().clone())

        def keep_output_and_stop(_module, _args, output):
            store["<out>"].append(output.detach().clone())
            raise _LayerReached

        for name in self.memo_names:
            handles.append(self.modules[name].register_forward_hook(keep(name)))
        target = self.modules[self.layer]
        handles.append(target.register_forward_pre_hook(keep_input))
        handles.append(target.register_forward_hook(keep_output_and_stop))
        try:
            for chunk in images.split(batch_size):
                with contextlib.suppress(_LayerReached):
                    forward_padded(self.model, chunk)
                for parts in store.values():  # drop the rows of any padding
                    parts[-1] = parts[-1][: len(chunk)]
        finally:
            for handle in handles:
                handle.remove()
        tensors = {key: torch.cat(parts) for key, parts in store.items()}
        return ReplayState(images, tensors.pop("<in>"), tensors.pop("<out>"), tensors)

    @torch.no_grad()
    def run(self, state: ReplayState, rows: torch.Tensor, layer_output: torch.Tensor) -> torch.Tensor:
        """Logits of images ``rows`` (indices into the chunk) when the layer outputs ``layer_output``."""
        n = len(rows)
        if n < MIN_BATCH:
            pad = MIN_BATCH - n
            rows = torch.cat([rows, rows[-1:].expand(pad)])
            layer_output = torch.cat([layer_output, layer_output[-1:].expand(pad, *layer_output.shape[1:])])
        patched = {name: state.memo[name][rows] for name in self.memo_names}
        patched[self.layer] = layer_output
        # an instance attribute shadows the class's forward; keep any the model set itself
        previous = {name: vars(self.modules[name]).get("forward") for name in patched}
        try:
            for name, value in patched.items():
                self.modules[name].forward = _constant(value)
            return self.model(state.images[rows])[:n]
        finally:
            for name, forward in previous.items():
                if forward is None:
                    del self.modules[name].forward
                else:
                    self.modules[name].forward = forward


def _constant(value: torch.Tensor) -> Callable[..., torch.Tensor]:
    def forward(*_args, **_kwargs) -> torch.Tensor:
        return value

    return forward


def make_layer_replay(model: nn.Module, layer: str, calls: dict[str, ModuleCall]) -> LayerReplay:
    """The suffix runner for ``layer`` (swap point for a graph-based implementation)."""
    return LayerReplay(model, layer, calls)
