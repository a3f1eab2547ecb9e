"""The arithmetic a model runs in, chosen explicitly and recorded with every result.

A bit flip in a low mantissa bit may or may not reach the logits depending on how conv/linear layers
compute: in strict IEEE fp32, in TF32 (operands rounded to a 10-bit mantissa on tensor cores, fp32
accumulation), or under automatic mixed precision. PyTorch's defaults differ by device
(``torch.backends.cudnn.allow_tf32`` is on out of the box), so every command that runs a model sets
the arithmetic explicitly:

* ``--math fp32`` (default): strict single precision on every device — TF32 off in cuDNN and cuBLAS,
  ``float32_matmul_precision("highest")``, deterministic algorithms where available;
* ``--math tf32``: conv/linear layers matching ``--tf32-layers`` (default: all) take TF32 operands.
  ``--tf32-impl emulate`` rounds each such layer's input and weight to TF32 (round to nearest even)
  and computes in fp32, on any device and bit-faithful to the rounding; ``native`` lets cuDNN/cuBLAS
  use the tensor cores of a CUDA GPU;
* ``--amp fp16|bf16``: PyTorch autocast, the dtype policy mixed-precision deployments use (conv and
  linear layers compute and output in the low-precision dtype, normalisations stay in fp32).

:func:`applied` sets all of this for a block and restores the previous settings on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cli_shell import UserError

MATH_MODES: tuple[str, ...] = ("fp32", "tf32")
TF32_IMPLS: tuple[str, ...] = ("emulate", "native")
AMP_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
TF32_DROPPED_BITS = 13  # fp32 has 23 mantissa bits, TF32 keeps 10
_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_LAYER_OPS: frozenset[Callable[..., Any]] = frozenset({F.conv1d, F.conv2d, F.conv3d, F.linear})
_MARK = "_tf32_layer"  # set on selected modules; survives deep copies (PyTorchFI corrupts a copy)


class ArithmeticOptionError(UserError, ValueError):
    """An arithmetic that cannot be set up as asked (reported as one ``error:`` line)."""


@dataclass(frozen=True)
class Arithmetic:
    """How conv/linear layers compute: the ``--math``, ``--tf32-layers``, ``--tf32-impl`` and ``--amp`` options."""

    math: str = "fp32"
    tf32_layers: str | None = None  # regex over qualified layer names; None: every layer
    tf32_impl: str = "emulate"
    amp: str | None = None

    def __post_init__(self) -> None:
        if self.math not in MATH_MODES:
            raise ArithmeticOptionError(f"unknown --math {self.math!r}; choose one of {', '.join(MATH_MODES)}")
        if self.tf32_impl not in TF32_IMPLS:
            raise ArithmeticOptionError(f"unknown --tf32-impl {self.tf32_impl!r}; choose one of {', '.join(TF32_IMPLS)}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ArithmeticOptionError(f"unknown --amp {self.amp!r}; choose one of {', '.join(AMP_DTYPES)}")
        if self.math == "fp32" and (self.tf32_layers is not None or self.tf32_impl != "emulate"):
            raise ArithmeticOptionError("--tf32-layers and --tf32-impl need --math tf32")
        if self.math == "tf32" and self.amp is not None:
            raise ArithmeticOptionError("--amp and --math tf32 exclude each other: autocast layers do not compute in fp32")
        if self.tf32_layers is not None:
            try:
                re.compile(self.tf32_layers)
            except re.error as exc:
                raise ArithmeticOptionError(f"--tf32-layers {self.tf32_layers!r} is not a valid regular expression: {exc}") from None

    def describe(self) -> dict[str, Any]:
        """The options as a JSON-ready dict (recorded in outputs, part of golden and campaign keys)."""
        return asdict(self)

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``fp32``, ``tf32[^layer3\\.]``, ``amp-bf16``."""
        if self.amp:
            return f"amp-{self.amp}"
        if self.math == "tf32":
            return "tf32" + (f"[{self.tf32_layers}]" if self.tf32_layers else "") + (
                "" if self.tf32_impl == "emulate" else "-native")
        return "fp32"

    def uses_tf32(self, layer: str) -> bool:
        """Whether conv/linear layer ``layer`` takes TF32 operands."""
        return self.math == "tf32" and (self.tf32_layers is None or re.search(self.tf32_layers, layer) is not None)


STRICT_FP32 = Arithmetic()


def add_arguments(parser: argparse.ArgumentParser, *, amp: bool = True) -> None:
    """Add the arithmetic options to ``parser`` (``amp=False`` where the command has its own ``--amp``)."""
    g = parser.add_argument_group("arithmetic")
    g.add_argument("--math", choices=MATH_MODES, default="fp32",
                   help="fp32: strict IEEE single precision on every device (TF32 off); "
                        "tf32: conv/linear operands rounded to TF32 (see --tf32-layers, --tf32-impl)")
    g.add_argument("--tf32-layers", default=None, metavar="REGEX",
                   help="with --math tf32: only conv/linear layers whose name matches compute in TF32 (default: all)")
    g.add_argument("--tf32-impl", choices=TF32_IMPLS, default=None,
                   help="with --math tf32: emulate (round operands to TF32, any device; default) or "
                        "native (cuDNN/cuBLAS tensor cores, CUDA only)")
    if amp:
        g.add_argument("--amp", choices=tuple(AMP_DTYPES), default=None,
                       help="autocast mixed precision: conv/linear compute and output in this dtype")


def from_args(args: argparse.Namespace) -> Arithmetic:
    """The :class:`Arithmetic` of parsed options (raises :class:`ArithmeticOptionError` on a bad combination)."""
    amp = getattr(args, "amp", None)
    return Arithmetic(
        math=args.math, tf32_layers=args.tf32_layers, tf32_impl=args.tf32_impl or "emulate",
        amp=amp if isinstance(amp, str) else None,
    )


def from_record(record: dict[str, Any] | None) -> Arithmetic:
    """The arithmetic of a recorded ``describe()`` dict; outputs recorded before it existed ran in strict fp32."""
    return Arithmetic(**record) if record else STRICT_FP32


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to TF32: 10 mantissa bits, round to nearest, ties to even; NaN/Inf unchanged."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    keep = (bits >> TF32_DROPPED_BITS) & 1  # the last kept bit decides ties
    half = (1 << (TF32_DROPPED_BITS - 1)) - 1
    rounded = ((bits + half + keep) & ~((1 << TF32_DROPPED_BITS) - 1)).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


class _LayerArithmetic(TorchFunctionMode):
    """Runs selected conv/linear calls in TF32, recognised by their weight tensor.

    A call is selected when its weight is a registered weight (or an alias of one, such as faulty
    rows stacked from it), or the weight of the marked module currently running (a deep copy of a
    marked module stays marked). ``emulate`` rounds input and weight; ``native`` switches the
    backends' TF32 flags on for selected calls only.
    """

    def __init__(self, native: bool) -> None:
        super().__init__()
        self.native = native
        self.weights: dict[int, torch.Tensor] = {}
        self.running: nn.Module | None = None

    def selected(self, weight: object) -> bool:
        if not isinstance(weight, torch.Tensor):
            return False
        if self.weights.get(id(weight)) is weight:
            return True
        module = self.running
        return module is not None and getattr(module, "weight", None) is weight

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's protocol)
        kwargs = kwargs or {}
        if func not in _LAYER_OPS:
            return func(*args, **kwargs)
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        chosen = self.selected(weight)
        if self.native:
            with _tf32_flags(chosen):
                return func(*args, **kwargs)
        if chosen:
            args = (round_tf32(args[0]), round_tf32(weight), *args[2:]) if len(args) > 1 else (round_tf32(args[0]),)
            if "weight" in kwargs:
                kwargs = {**kwargs, "weight": round_tf32(weight)}
        return func(*args, **kwargs)


_active: list[_LayerArithmetic] = []  # modes of the enclosing TF32 blocks
_applied: list[Arithmetic] = []  # arithmetic of the enclosing applied() blocks


@contextlib.contextmanager
def _tf32_flags(on: bool) -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def _backend_settings(tf32: bool) -> Iterator[None]:
    """TF32 flags, matmul precision and determinism for the block; the previous values afterwards."""
    saved = (torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    try:
        with _tf32_flags(tf32):
            torch.set_float32_matmul_precision("high" if tf32 else "highest")
            # warn_only: operations without a deterministic kernel still run (with a warning)
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[3], saved[4]


@contextlib.contextmanager
def applied(arithmetic: Arithmetic) -> Iterator[Arithmetic]:
    """Run the block in ``arithmetic``; every setting it changes is restored on exit.

    Per-layer TF32 takes effect for the models passed to :func:`select_layers` inside the block.
    """
    if arithmetic.math == "tf32" and arithmetic.tf32_impl == "native" and not torch.cuda.is_available():
        raise ArithmeticOptionError("--tf32-impl native needs a CUDA GPU; use --tf32-impl emulate on this machine")
    # native TF32 on every layer is just the backend flags; anything per layer goes through the mode
    all_native = arithmetic.math == "tf32" and arithmetic.tf32_impl == "native" and arithmetic.tf32_layers is None
    with contextlib.ExitStack() as stack:
        stack.enter_context(_backend_settings(all_native))
        if arithmetic.math == "tf32" and not all_native:
            mode = stack.enter_context(_LayerArithmetic(native=arithmetic.tf32_impl == "native"))
            _active.append(mode)
            stack.callback(_active.pop)
            stack.enter_context(_track_running(mode))
        if arithmetic.amp:
            dtype = AMP_DTYPES[arithmetic.amp]
            stack.enter_context(torch.autocast("cpu", dtype=dtype))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", dtype=dtype))
        _applied.append(arithmetic)
        stack.callback(_applied.pop)
        yield arithmetic


@contextlib.contextmanager
def _track_running(mode: _LayerArithmetic) -> Iterator[None]:
    def before(module: nn.Module, _args: tuple) -> None:
        if getattr(module, _MARK, False):
            mode.running = module

    def after(module: nn.Module, _args: tuple, _output: object) -> None:
        if mode.running is module:
            mode.running = None

    handles = [nn.modules.module.register_module_forward_pre_hook(before),
               nn.modules.module.register_module_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def select_layers(model: nn.Module) -> list[str]:
    """Register the conv/linear layers of ``model`` that the current arithmetic runs in TF32; their names.

    Call it inside :func:`applied` once the model is built (and moved to its device); outside a TF32
    block it only returns the empty list.
    """
    current = _applied[-1] if _applied else STRICT_FP32
    names = [name for name, module in model.named_modules()
             if isinstance(module, _LAYER_TYPES) and current.uses_tf32(name)]
    if _active:
        mode = _active[-1]
        for name in names:
            module = model.get_submodule(name)
            setattr(module, _MARK, True)
            mode.weights[id(module.weight)] = module.weight
    return names


@contextlib.contextmanager
def alias(weight: torch.Tensor, derived: torch.Tensor) -> Iterator[None]:
    """Within the block, a tensor ``derived`` from a layer's ``weight`` (faulty rows) computes as that layer does."""
    mode = _active[-1] if _active else None
    if mode is None or not mode.selected(weight) or id(derived) in mode.weights:
        yield
        return
    mode.weights[id(derived)] = derived
    try:
        yield
    finally:
        del mode.weights[id(derived)]
