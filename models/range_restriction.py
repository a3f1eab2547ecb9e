"""Ranger-style range restriction (Chen et al., DSN 2021): a mitigation, not a fault model.

Every conv/linear output of a trained model is clamped at inference to the range its layer showed on
training images (``±max |activation|``, the profile of ``inject.py --clamp profile``). A fault that
drives a value far out of range is cut back to the range's edge before the next layer reads it.

The restricted model is a ``torch.fx`` copy of the model with one clamp node after each conv/linear
call. The layers themselves keep their modules and qualified names, so they stay the fault sites: an
injection made by a forward hook on a layer (the reference engine) or into a layer's output node (the
fast engine) happens before the clamp, as in Ranger. A checkpoint records the ranges in its meta
(``meta["range_restriction"]``) next to the unchanged weights; ``load_checkpoint`` rebuilds the
restricted model from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.fx as fx
from torch import nn

from .text_head import last_layer_names

META_KEY = "range_restriction"
LAYER_TYPES = (nn.Conv2d, nn.Linear)


def restrict_range(x: torch.Tensor, bound: float) -> torch.Tensor:
    """``x`` clamped to ``[-bound, bound]``; NaN becomes ``+bound`` (a NaN would pass a plain clamp).

    The same rule as GoldenEye's clamp of an injected value (:func:`resilience.bitflip.clamp_to_profile`),
    written with operations torch.fx can trace again (the fast engine re-traces the model).
    """
    return torch.where(torch.isnan(x), bound, x.clamp(-bound, bound))


class _LayerTracer(fx.Tracer):
    """torch.fx's tracer with every conv/linear kept as one module call (subclasses included)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LAYER_TYPES) or super().is_leaf_module(m, qualname)


def restrict_ranges(model: nn.Module, bounds: Mapping[str, float]) -> fx.GraphModule:
    """``model`` with the output of every conv/linear layer ``name`` clamped by :func:`restrict_range` to
    ``bounds[name]``. Shares the parameters of ``model``; its state dict has the same keys.

    ``bounds`` must name exactly the conv/linear layers the forward pass calls, each with a finite
    bound >= 0 (ValueError otherwise). ``result.meta`` keeps the bounds and the last layer names.
    """
    try:
        graph = _LayerTracer().trace(model)
    except Exception as exc:  # torch.fx raises many types for untraceable code
        raise ValueError(f"range restriction needs a model torch.fx can trace; {type(model).__name__} "
                         f"is not ({type(exc).__name__}: {exc})") from None
    calls = [n for n in graph.nodes if n.op == "call_module" and isinstance(model.get_submodule(n.target), LAYER_TYPES)]
    names = [str(n.target) for n in calls]
    missing, unknown = set(names) - set(bounds), set(bounds) - set(names)
    if missing or unknown:
        raise ValueError(f"the bounds do not fit the model's conv/linear layers (no bound for: "
                         f"{', '.join(sorted(missing)) or 'none'}; not layers of the model: "
                         f"{', '.join(sorted(unknown)) or 'none'})")
    bad = [name for name, b in bounds.items() if not (math.isfinite(b) and b >= 0)]
    if bad:
        raise ValueError(f"bounds must be finite and >= 0 (not for {', '.join(bad)})")
    for node in calls:
        with graph.inserting_after(node):
            clamped = graph.call_function(restrict_range, (node, float(bounds[str(node.target)])))
        node.replace_all_uses_with(clamped, delete_user_cb=lambda user, c=clamped: user is not c)
    restricted = fx.GraphModule(model, graph, "RangeRestricted")
    restricted.train(model.training)
    restricted.meta["last_layers"] = last_layer_names(model)
    restricted.meta[META_KEY] = {name: float(bounds[name]) for name in names}
    return restricted


def restricted_meta(meta: Mapping[str, object], bounds: Mapping[str, float], **profile: object) -> dict[str, object]:
    """Checkpoint meta of the range-restricted version of a model whose meta (as ``load_checkpoint``
    returns it) is ``meta``: its bounds and how they were profiled (``profile``, plain values)."""
    kept = {k: v for k, v in meta.items() if k not in ("checkpoint_sha256", "ema", META_KEY)}
    return {**kept, META_KEY: {"bounds": {k: float(v) for k, v in bounds.items()}, "profile": dict(profile)}}
