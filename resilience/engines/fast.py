"""The fast engine: one golden pass per image, suffix-only faulty passes on windows, exact fault dropping.

The model is traced once with torch.fx (:mod:`resilience.engines.graph_split`). For every layer the
engine knows the *suffix* (the nodes that depend on the layer's output) and the golden values that
suffix reads. A :class:`GoldenStore` runs the fault-free model once per image and keeps those values
for all layers at once (bounded by ``cache_bytes``, least recently used images go first). A batch of
faults of one layer then

1. reads its images' golden layer outputs and flips one element per row exactly as the reference
   engine does (:func:`resilience.engines.reference.inject_output`, clamp included); rows whose flipped
   element is bit-for-bit the golden one (a clamp can do that) are done;
2. runs the suffix only. A conv layer's perturbation starts as a 1x1 window (all channels): per-pixel
   operations run on the window, convs and pools on the window grown by their reach (the golden map
   fills the halo), residual additions on the union of windows. A window that grows past half its
   map, or meets any other operation, is pasted into the golden map and the rest runs on whole maps.
   This is the fault's cone of influence: early layers touch a few pixels of the next feature maps;
3. before the first heavy node after the layer (conv, linear, matmul) compares the live perturbed values
   with their golden values, bit for bit: rows where all are equal are fully masked (a ReLU or max-pool
   absorbed the flip), their logits are the golden logits and they leave the batch. Exact equality,
   never a threshold. (Later tests were tried: a flip that survives the first ReLU almost never
   vanishes after a conv, so they cost more than they save);
4. a layer whose output is the logits needs no pass at all (closed form: the golden logits with one
   element replaced).

A golden pass pays only when its image takes several faults, in this batch or in the layers still to
come while the store holds it. A batch whose cold images (neither held nor recently asked for) would
cost more in golden passes, shared with the faults those images can still expect, than its suffix
passes save runs a hooked full forward per fault instead, the reference's computation without its
model copy, so that a whole test set, where few faults share an image, does not run slower than the
reference (:meth:`FastEngine._plan_pays`).

Models torch.fx cannot trace, and layers whose plan fails or whose self-check fails (the plan's
fault-free logits against the model's own on one image), run a hooked full forward per batch of
faults, and :meth:`FastEngine.describe` says so. Results agree with the reference engine to
floating-point reassociation: convolutions on a window sum in another order than on the whole map.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from resilience.bitflip import largest_finite_magnitude
from resilience.engines import graph_split
from resilience.engines.base import Engine, FaultSites, ImageSource, InjectionResult
from resilience.engines.graph_split import NodeFacts, SplitError, Step, SuffixPlan
from resilience.engines.reference import EngineError, inject_output
from resilience.layers import LayerInfo

DEFAULT_CACHE_BYTES = 2 << 30
PROBE_BATCH = 5  # odd and unusual, so that a leading dimension equal to it marks the batch dimension
MAX_IMAGES = 1 << 16  # golden store slots, whatever the budget (ImageNet's validation split has 50 000 images)
WINDOW_LIMIT = 0.5  # a window covering more of its map than this is pasted and the op runs on whole maps
# ... and so is a conv's window that saves fewer multiply-adds per row than this: cutting and pasting
# boxes row by row costs Python time that small, narrow maps (CIFAR-sized networks) do not win back.
# Pools and subsampling keep their windows: pasting costs a copy of the whole map, they save little
MIN_WINDOW_SAVING = 1 << 22
# A golden pass of an image costs about this many forward passes: it also writes every value the plans
# read into the store, first touches of the store's pages included (measured on resnet20, 28x28: 1.3 on
# warm pages, 3.3 while the store fills on a loaded machine; the higher bound keeps full forwards safe)
GOLDEN_PASS_COST = 3.0
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def population_size(draws: int, distinct: int) -> float:
    """The G for which ``draws`` uniform draws with replacement hit ``distinct`` of G items on average
    (infinite when no draw repeats)."""
    if distinct >= draws:
        return math.inf
    low, high = float(distinct), float(distinct)
    while high * -math.expm1(-draws / high) < distinct:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if mid * -math.expm1(-draws / mid) < distinct else (low, mid)
    return high


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Floating-point tensors as their integer words, so that == compares bit patterns (-0.0 != 0.0)."""
    return t.view(_INT_OF_SIZE[t.element_size()]) if t.is_floating_point() else t


def _rows_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row (dim 0): every element of ``a`` has the bits of ``b``'s."""
    return (_bits(a) == _bits(b)).reshape(len(a), -1).all(dim=1)


def _crop(src: torch.Tensor, rows: list[int], ys: list[int], xs: list[int], size: tuple[int, int], fill: float) -> torch.Tensor:
    """``src[rows[f], :, ys[f] : ys[f] + h, xs[f] : xs[f] + w]`` stacked ([F, C, h, w]); off-map pixels read
    ``fill``. Row by row: slicing copies contiguous runs, where one advanced-indexing gather is far slower."""
    h, w = size
    height, width = src.shape[-2:]
    if all(y >= 0 and x >= 0 and y + h <= height and x + w <= width for y, x in zip(ys, xs, strict=True)):
        return torch.stack([src[r, :, y : y + h, x : x + w] for r, y, x in zip(rows, ys, xs, strict=True)])
    out = src.new_full((len(rows), src.shape[1], h, w), fill)
    for f, (r, y, x) in enumerate(zip(rows, ys, xs, strict=True)):
        y0, y1, x0, x1 = max(y, 0), min(y + h, height), max(x, 0), min(x + w, width)
        if y0 < y1 and x0 < x1:
            out[f, :, y0 - y : y1 - y, x0 - x : x1 - x] = src[r, :, y0:y1, x0:x1]
    return out


def _overlay(dst: torch.Tensor, ys: list[int], xs: list[int], window: Window) -> torch.Tensor:
    """Write ``window`` into ``dst`` ([F, C, h, w] boxes whose top-left pixels are ``ys``, ``xs``) where they meet."""
    h, w = dst.shape[-2:]
    wh, ww = window.crop.shape[-2:]
    for f, (y, x, top, left) in enumerate(zip(ys, xs, window.top.tolist(), window.left.tolist(), strict=True)):
        y0, y1, x0, x1 = max(y, top), min(y + h, top + wh), max(x, left), min(x + w, left + ww)
        if y0 < y1 and x0 < x1:
            dst[f, :, y0 - y : y1 - y, x0 - x : x1 - x] = window.crop[f, :, y0 - top : y1 - top, x0 - left : x1 - left]
    return dst


@dataclass
class Window:
    """A perturbed [F, C, H, W] value that equals its golden value outside one box per row."""

    crop: torch.Tensor  # [F, C, h, w]: the value inside the box
    top: torch.Tensor  # [F] first row of the box (int64, on the CPU: boxes are cut row by row in Python)
    left: torch.Tensor  # [F] first column

    def subset(self, keep: torch.Tensor) -> Window:
        cpu = keep.cpu()
        return Window(self.crop[keep], self.top[cpu], self.left[cpu])


class GoldenStore:
    """Golden values of the nodes the plans read, per image, in one slot tensor per node.

    Images are computed in batches by one recorder pass of the traced model and evicted least recently
    used first when more than ``capacity`` images would be held (``capacity`` = ``cache_bytes`` over the
    bytes one image needs, at least 1 and at most ``MAX_IMAGES``).
    """

    def __init__(
        self, gm: fx.GraphModule, nodes: list[fx.Node], shared: list[fx.Node], facts: dict[fx.Node, NodeFacts],
        cache_bytes: int,
    ) -> None:
        self.nodes, self.shared_nodes = nodes, shared
        self.recorder = graph_split.recorder(gm, [*nodes, *shared])
        self.image_bytes = sum(math.prod(facts[n].shape[1:]) for n in nodes) * 4  # fp32 bound
        self.capacity = max(1, min(MAX_IMAGES, cache_bytes // max(1, self.image_bytes)))
        self.slabs: dict[fx.Node, torch.Tensor] = {}
        self._free: list[int] = []  # slots holding no image
        self.shared: dict[fx.Node, Any] = {}
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # image id -> slot, least recently used first
        self.demand: OrderedDict[int, None] = OrderedDict()  # the last ``capacity`` distinct images asked for
        self.computed = 0  # images run through the recorder (a measure of golden work)
        self.seen: set[int] = set()  # every image ever asked for ...
        self.asked = 0  # ... by this many faults: together they estimate how many images faults draw from

    def cold(self, ids: list[int]) -> list[int]:
        """Distinct images of ``ids`` neither held nor among the last ``capacity`` asked for: those a golden
        pass would compute even with every batch planned (a held image's pass is already paid; a recently
        asked-for one would be held)."""
        return [i for i in dict.fromkeys(ids) if i not in self.slot_of and i not in self.demand]

    def want(self, ids: list[int]) -> None:
        """Record that faults asked for ``ids``, whichever way they ran."""
        self.asked += len(ids)
        self.seen.update(ids)
        for image in ids:
            self.demand[image] = None
            self.demand.move_to_end(image)
        while len(self.demand) > self.capacity:
            self.demand.popitem(last=False)

    def slots(self, ids: list[int], source: ImageSource, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Slot of each image in ``ids`` (at most ``capacity`` distinct), computing the missing ones."""
        wanted = dict.fromkeys(ids)
        if len(wanted) > self.capacity:
            raise EngineError(f"{len(wanted)} images in one batch but the golden cache holds {self.capacity}")
        for image in wanted:
            if image in self.slot_of:
                self.slot_of.move_to_end(image)
        missing = [i for i in wanted if i not in self.slot_of]
        step = max(1, self.capacity // 4)  # a recorder pass holds its outputs twice (returned, then stored)
        for start in range(0, len(missing), step):
            batch = missing[start : start + step]
            values = self.recorder(source.images(torch.tensor(batch)).to(device, dtype))
            self.computed += len(batch)
            if not self.shared:
                self.shared = dict(zip(self.shared_nodes, values[len(self.nodes) :], strict=True))
            slots = torch.tensor(self._free_slots(len(batch), wanted, values), device=device)
            for node, value in zip(self.nodes, values, strict=False):
                self.slabs[node].index_copy_(0, slots, value)
            self.slot_of.update(zip(batch, slots.tolist(), strict=True))
        return torch.tensor([self.slot_of[i] for i in ids], device=device)

    def _free_slots(self, count: int, keep: dict[int, None], like: tuple[torch.Tensor, ...]) -> list[int]:
        """``count`` slots not holding an image of ``keep``: unused ones, else those of the least recently
        used images."""
        if not self.slabs:  # all at once: on the CPU untouched pages cost nothing
            self.slabs = {n: v.new_empty((self.capacity, *v.shape[1:])) for n, v in zip(self.nodes, like, strict=False)}
            self._free = list(range(self.capacity))
        while len(self._free) < count:
            image = next(i for i in self.slot_of if i not in keep)
            self._free.append(self.slot_of.pop(image))
        taken, self._free = self._free[:count], self._free[count:]
        return taken


class _Run:
    """One batch of faults of one layer going through the suffix plan."""

    def __init__(self, context: Context, plan: SuffixPlan, slots: torch.Tensor) -> None:
        self.context, self.plan, self.store, self.facts = context, plan, context.store, context.facts
        self.window_ops = 0  # convs and pools run on windows rather than whole maps
        self.slots = slots
        self.rows = slots.tolist()
        self.index = torch.arange(len(slots), device=slots.device)  # rows' positions in the batch
        self.env: dict[fx.Node, Any] = {}
        self._golden_full: dict[fx.Node, torch.Tensor] = {}

    # values ------------------------------------------------------------------------------------------
    def golden_full(self, node: fx.Node) -> torch.Tensor:
        if node not in self._golden_full:
            self._golden_full[node] = self.store.slabs[node].index_select(0, self.slots)
        return self._golden_full[node]

    def full(self, node: fx.Node) -> Any:
        """The value of ``node`` for the rows, as a whole tensor (a window is pasted into its golden map)."""
        if node.op == "get_attr" or (node not in self.env and not self.facts[node].input_dependent):
            return self.store.shared[node]
        if node not in self.env:
            return self.golden_full(node)
        value = self.env[node]
        if isinstance(value, Window):
            whole = self.store.slabs[node].index_select(0, self.slots)
            zeros = [0] * len(self.rows)
            self.env[node] = value = _overlay(whole, zeros, zeros, value)
        return value

    def region(self, node: fx.Node, ys: list[int], xs: list[int], size: tuple[int, int], fill: float) -> torch.Tensor:
        """The value of ``node`` on the per-row boxes at ``ys``, ``xs`` of ``size`` ([F, C, h, w]), ``fill``
        off the map."""
        value = self.env.get(node)
        if isinstance(value, torch.Tensor):
            return _crop(value, list(range(len(self.rows))), ys, xs, size, fill)
        if isinstance(value, Window) and tuple(value.crop.shape[-2:]) == size and value.top.tolist() == ys and (
            value.left.tolist() == xs
        ):
            return value.crop
        golden = _crop(self.store.slabs[node], self.rows, ys, xs, size, fill)
        return golden if value is None else _overlay(golden, ys, xs, value)

    def subset(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` (a bool mask)."""
        self.slots, self.index = self.slots[keep], self.index[keep]
        self.rows = self.slots.tolist()
        self._golden_full.clear()
        for node, value in self.env.items():
            if isinstance(value, Window):
                self.env[node] = value.subset(keep)
            elif isinstance(value, torch.Tensor) and self.facts[node].batch_first:
                self.env[node] = value[keep]

    # steps -------------------------------------------------------------------------------------------
    def call(self, node: fx.Node, transform: Any = None) -> Any:
        """Run ``node`` on whole values (or, with ``transform``, on what it maps each input node to)."""
        get = transform or self.full
        args = fx.node.map_arg(node.args, get)
        kwargs = fx.node.map_arg(node.kwargs, get)
        if node.op == "call_module":
            return self.context.modules[str(node.target)](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        self_arg, *rest = args
        return getattr(self_arg, str(node.target))(*rest, **kwargs)

    def local(self, step: Step) -> Any:
        """A conv/pool/subsampling step on a window: its output box and the input box it reads."""
        node, spec = step.node, step.local
        assert spec is not None
        source: fx.Node = node.args[0]
        value: Window = self.env[source]
        out_h, out_w = self.facts[node].shape[2:]
        starts, sizes, tops = [], [], []
        for dim, (start, extent, limit) in enumerate(((value.top, value.crop.shape[2], out_h), (value.left, value.crop.shape[3], out_w))):
            k, s, p, d = spec.kernel[dim], spec.stride[dim], spec.padding[dim], spec.dilation[dim]
            lo = (-(-(start + p - (k - 1) * d) // s)).clamp(min=0)  # first output whose reach meets the box
            hi = ((start + extent - 1 + p) // s).clamp(max=limit - 1)
            # at least one pixel: a strided op may read none of the box (a 1x1 stride-2 conv skips odd
            # pixels); the extra pixels of a box are computed from their golden inputs, so they are right
            n = max(1, int((hi - lo + 1).max()))
            lo = torch.minimum(lo, torch.full_like(lo, limit - n))
            tops.append(lo)
            sizes.append(n)
            starts.append((lo * s - p, (n - 1) * s + (k - 1) * d + 1))
        saved = (out_h * out_w - sizes[0] * sizes[1]) * self.facts[node].shape[1] * spec.work
        if sizes[0] * sizes[1] > WINDOW_LIMIT * out_h * out_w or (spec.kind == "conv" and saved < MIN_WINDOW_SAVING):
            return self.call(node)
        self.window_ops += 1
        (y0, rh), (x0, rw) = starts
        grid = self.region(source, y0.tolist(), x0.tolist(), (rh, rw), spec.fill)
        module = self.context.modules.get(str(node.target)) if node.op == "call_module" else None
        if spec.kind == "conv":
            out = F.conv2d(grid, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
        elif spec.kind == "maxpool":
            out = F.max_pool2d(grid, module.kernel_size, module.stride, 0, module.dilation)
        elif spec.kind == "avgpool":
            out = F.avg_pool2d(grid, module.kernel_size, module.stride, 0, False, module.count_include_pad)
        else:
            out = grid[node.args[1]]
        return Window(out, tops[0], tops[1])

    def binary(self, node: fx.Node) -> Any:
        """An element-wise step on windows: both operands on the union of their boxes."""
        windows = [self.env[a] for a in node.all_input_nodes if isinstance(self.env.get(a), Window)]
        height, width = self.facts[node].shape[2:]
        box = []
        for starts, extent, limit in (([w.top for w in windows], 2, height), ([w.left for w in windows], 3, width)):
            lo = torch.stack(starts).amin(0)
            hi = torch.stack([s + w.crop.shape[extent] for s, w in zip(starts, windows, strict=True)]).amax(0)
            n = int((hi - lo).max())
            box.append((torch.minimum(lo, torch.full_like(lo, limit - n)), n))
        (top, h), (left, w) = box
        ys, xs = top.tolist(), left.tolist()
        out = self.call(node, lambda a: self.region(a, ys, xs, (h, w), 0.0) if self.facts[a].input_dependent else self.full(a))
        return Window(out, top, left)

    def check(self, live: list[fx.Node]) -> None:
        """Drop the rows whose live perturbed values all equal their golden values, bit for bit."""
        if any(not isinstance(v, Window) and not (isinstance(v, torch.Tensor) and self.facts[n].batch_first)
               for n, v in self.env.items()):
            return  # a value held that is not per row (a size) would not follow a change of the row count
        values = [self.env[n] for n in live]
        same = torch.ones(len(self.slots), dtype=torch.bool, device=self.slots.device)
        for node, value in zip(live, values, strict=True):
            if isinstance(value, Window):
                size = tuple(value.crop.shape[-2:])
                golden = _crop(self.store.slabs[node], self.rows, value.top.tolist(), value.left.tolist(), size, 0.0)
                same &= _rows_equal(value.crop, golden)
            else:
                same &= _rows_equal(value, self.golden_full(node))
        if bool(same.any()):
            self.subset(~same)

    def execute(self, drop: bool) -> torch.Tensor:
        """Run the plan's steps on the rows; returns the logits of the rows still in ``self.index``."""
        plan = self.plan
        for i, step in enumerate(plan.steps):
            if drop and i == plan.check:
                self.check(plan.frontier)
                if not len(self.slots):
                    return torch.empty(0)
            node, arg = step.node, step.node.args[0] if step.node.args else None
            windowed_input = isinstance(self.env.get(arg), Window) if isinstance(arg, fx.Node) else False
            if step.rule == "local" and windowed_input:
                value = self.local(step)
            elif step.rule == "unary" and windowed_input:
                win = self.env[arg]
                value = Window(self.call(node, lambda a, win=win, arg=arg: win.crop if a is arg else self.full(a)), win.top, win.left)
            elif step.rule == "binary" and all(isinstance(self.env[a], Window) for a in node.all_input_nodes if a in self.env):
                value = self.binary(node)
            else:
                value = self.call(node)
            self.env[node] = value
            for done in plan.free.get(i, ()):
                self.env.pop(done, None)
        return self.full(plan.result)


@dataclass(frozen=True)
class Context:
    """What a run reads besides its plan: the golden store, the traced nodes' facts, the traced modules."""

    store: GoldenStore
    facts: dict[fx.Node, NodeFacts]
    modules: dict[str, nn.Module]


@dataclass(frozen=True)
class Plan:
    """A layer whose faults can run its suffix plan; ``flops`` is the plan's conv/matmul work per fault."""

    suffix: SuffixPlan
    flops: float


@dataclass(frozen=True)
class Fallback:
    """A layer whose faults run a hooked full forward, and why (``whole_model``: no layer has a plan)."""

    reason: str
    whole_model: bool = False


class FastEngine(Engine):
    """Suffix-only injection on a torch.fx trace of the model, on windows, with exact fault dropping.

    ``batch_size`` bounds the faults of one suffix pass; ``cache_bytes`` bounds the golden values held
    (for all layers at once; images are recomputed when they do not fit). With ``cost_model`` (the
    default) a batch whose golden passes would cost more than they save runs a hooked full forward
    instead (see :meth:`_plan_pays`); without it every planned layer runs its plan. ``counts[layer]``
    tallies ``faults``, ``dropped`` (found masked: no suffix pass past the point of masking),
    ``window_ops`` (convs and pools run on windows rather than whole maps, per batch) and
    ``full_forward`` (faults run as a hooked full forward).
    """

    name = "fast"

    def __init__(self, *args: Any, cache_bytes: int = DEFAULT_CACHE_BYTES, cost_model: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if cache_bytes < 1:
            raise EngineError("cache_bytes must be at least 1")
        self.cache_bytes, self.cost_model = cache_bytes, cost_model
        self.counts: dict[str, dict[str, int]] = {}
        self._routes: dict[str, Plan | Fallback] = {}  # every layer's, once planned (on the first run)
        self._context: Context | None = None
        self._forward_flops = 0.0  # conv/matmul work of the model's forward pass, per image
        self._gm: fx.GraphModule | None = None
        try:
            self._gm = graph_split.trace(self.model)
        except SplitError as exc:
            self._fall_back_everywhere(str(exc))

    def describe(self) -> dict[str, Any]:
        """Engine name, whether the model traced, and every layer that fell back to a full forward."""
        info: dict[str, Any] = {"engine": self.name, "traced": self._gm is not None}
        fallbacks = {name: r for name, r in self._routes.items() if isinstance(r, Fallback)}
        whole = next((r.reason for r in fallbacks.values() if r.whole_model), None)
        if whole is not None:
            info["fallback"] = f"every layer runs a hooked full forward per batch of faults ({whole})"
        elif fallbacks:
            info["fallback_layers"] = {name: r.reason for name, r in fallbacks.items()}
        return info

    @property
    def golden_images(self) -> int:
        """Images run through the golden pass so far (each once while the cache holds it)."""
        return self._context.store.computed if self._context is not None else 0

    def path(self, layer: str) -> str:
        """How faults of ``layer`` run: "closed-form", "windowed", "suffix", "fallback" or "unknown" (not run
        yet). A planned layer's batches may still run full forwards when the cost model says so."""
        route = self._routes.get(layer)
        if route is None:
            return "unknown"
        if isinstance(route, Fallback):
            return "fallback"
        plan = route.suffix
        return "closed-form" if not plan.steps else "windowed" if plan.windowed else "suffix"

    @torch.inference_mode()
    def run(self, layer: LayerInfo, sites: FaultSites, source: ImageSource) -> InjectionResult:
        """Inject every fault of ``sites`` (all in ``layer``); results in fault order."""
        if sites.layer != layer.name:
            raise EngineError(f"fault sites of {sites.layer!r} given for layer {layer.name!r}")
        n = len(sites)
        if n == 0:
            return InjectionResult(torch.empty(0, 0), torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64))
        if int(sites.index.min()) < 0 or int(sites.index.max()) >= layer.neurons:
            raise EngineError(f"element index out of range for layer {layer.name} ({layer.neurons} elements)")
        if int(sites.bit.min()) < 0 or int(sites.bit.max()) >= self.fmt.bits:
            raise EngineError(f"bit positions must lie in [0, {self.fmt.bits - 1}] for {self.fmt.name}")
        counts = self.counts.setdefault(layer.name, {"faults": 0, "dropped": 0, "window_ops": 0, "full_forward": 0})
        counts["faults"] += n
        route = self._route(layer, sites, source)
        logits: torch.Tensor | None = None
        golden = torch.empty(n, dtype=torch.float64)
        faulty = torch.empty(n, dtype=torch.float64)
        with tqdm(total=n, unit="fault", desc=layer.name, leave=False, disable=None) as bar:
            for where in self._batches(sites, isinstance(route, Plan)):
                chunk = FaultSites(layer.name, sites.image[where], sites.index[where], sites.bit[where])
                if isinstance(route, Plan) and self._plan_pays(route, chunk.image.tolist()):
                    out, gold, bad, run = self._run_plan(route.suffix, layer, chunk, source)
                    counts["dropped"] += len(chunk) - len(run.index)
                    counts["window_ops"] += run.window_ops
                else:
                    out, gold, bad = self._run_hooked(layer, chunk, source)
                    counts["full_forward"] += len(chunk)
                if logits is None:
                    logits = torch.empty(n, out.shape[1])
                logits[where], golden[where], faulty[where] = out, gold, bad
                bar.update(len(chunk))
        assert logits is not None
        return InjectionResult(logits, golden, faulty)

    def _batches(self, sites: FaultSites, planned: bool) -> list[torch.Tensor]:
        """Fault positions per batch: in order for the fallback (the reference's batches); sorted by image
        for plans, so that batches reuse held golden values, with at most ``capacity`` images each."""
        n = len(sites)
        if not planned:
            return [torch.arange(start, min(start + self.batch_size, n)) for start in range(0, n, self.batch_size)]
        assert self._context is not None
        capacity = self._context.store.capacity
        order = torch.argsort(sites.image, stable=True)
        images = sites.image[order].tolist()
        batches, start, distinct = [], 0, 0
        for j in range(n):
            new = j == start or images[j] != images[j - 1]
            if j > start and (j - start == self.batch_size or (new and distinct == capacity)):
                batches.append(order[start:j])
                start, distinct, new = j, 0, True
            distinct += new
        batches.append(order[start:])
        return batches

    def _plan_pays(self, plan: Plan, images: list[int]) -> bool:
        """Whether a batch of faults on ``images`` should run ``plan`` rather than a full forward each.

        The plan costs the suffix per fault plus a golden pass per cold image, shared between the image's
        faults in this batch and those it can expect in the layers still to come (:meth:`_future_faults`);
        the full forwards cost one forward per fault. Counted in conv/matmul FLOPs of the trace and in
        fault sites, never in timings, so the choice is the same on every run and machine. Images asked
        for recently count as held, so that a cold start on few images does not stop the store from
        ever filling, while a whole test set that the store cannot hold runs full forwards: there a
        golden pass serves about one fault.
        """
        assert self._context is not None
        store = self._context.store
        cold = store.cold(images)
        store.want(images)
        if not self.cost_model:
            return True
        here = Counter(images)
        future = self._future_faults()
        golden = sum(GOLDEN_PASS_COST * here[i] / (here[i] + future) for i in cold)
        n = len(images)
        return golden * self._forward_flops + n * plan.flops <= n * self._forward_flops

    def _future_faults(self) -> float:
        """Faults an image can expect in the layers not run yet, while the store still holds it.

        Campaigns draw every layer's images uniformly from one golden set; its size G is estimated from
        the faults asked for so far and the distinct images among them (n draws hit G(1 - e^(-n/G))
        distinct images on average), the faults per layer from the layers run so far. A store smaller
        than G keeps about capacity/G of the images until they are asked for again.
        """
        assert self._context is not None
        store = self._context.store
        started = len(self.counts)
        remaining = len(self.layers) - started
        size = population_size(store.asked, len(store.seen))
        if remaining <= 0 or math.isinf(size):
            return 0.0
        return store.asked / started * remaining / size * min(1.0, store.capacity / size)

    # ------------------------------------------------------------------------------------- plans

    def _route(self, layer: LayerInfo, sites: FaultSites, source: ImageSource) -> Plan | Fallback:
        """How ``layer`` runs; every layer is planned and checked on the first run."""
        if not self._routes:
            assert self._gm is not None  # an untraced model has its routes from the start
            try:
                self._make_routes(self._gm, int(sites.image[0]), source)
            except Exception as exc:  # the trace does not run as the model does: no plan at all
                self._fall_back_everywhere(f"{type(exc).__name__}: {exc}")
        return self._routes.get(layer.name, Fallback("not among the engine's layers"))

    def _fall_back_everywhere(self, reason: str) -> None:
        self._routes = {name: Fallback(reason, whole_model=True) for name in self.layers}
        warnings.warn(f"fast engine: every layer falls back to a full forward ({reason})", stacklevel=3)

    def _make_routes(self, gm: fx.GraphModule, probe_id: int, source: ImageSource) -> None:
        """Plan every layer on one probe image, make the golden store, then check each plan on the probe."""
        image = source.images(torch.tensor([probe_id])).to(self.device, self.fmt.dtype)
        with FlopCounterMode(display=False) as counter:
            expected = self.model(image).float()
        self._forward_flops = float(counter.get_total_flops())
        facts = graph_split.probe(gm, torch.cat([image] * PROBE_BATCH))
        plans: dict[str, SuffixPlan] = {}
        routes: dict[str, Plan | Fallback] = {}
        for name in self.layers:
            try:
                plans[name] = graph_split.plan_suffix(gm, facts, name)
            except SplitError as exc:
                routes[name] = self._fallback(name, exc)
        nodes = {n for plan in plans.values() for n in [*plan.golden, plan.result]}
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        shared = {
            a for plan in plans.values() for step in plan.steps for a in step.node.all_input_nodes
            if a.op == "get_attr" or not facts[a].input_dependent
        }
        store = GoldenStore(gm, sorted(nodes, key=order.__getitem__), sorted(shared, key=order.__getitem__),
                            facts, self.cache_bytes)
        self._context = context = Context(store, facts, dict(gm.named_modules()))
        for name, plan in plans.items():
            try:
                routes[name] = Plan(plan, self._self_check(context, plan, self.layers[name], probe_id, expected, source))
            except Exception as exc:  # any failure of the plan means: run this layer the slow, sure way
                routes[name] = self._fallback(name, exc)
        self._routes = {name: routes[name] for name in self.layers}

    @staticmethod
    def _fallback(layer: str, exc: Exception) -> Fallback:
        reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"fast engine: layer {layer} falls back to a full forward ({reason})", stacklevel=4)
        return Fallback(reason)

    def _self_check(
        self, context: Context, plan: SuffixPlan, layer: LayerInfo, probe_id: int, expected: torch.Tensor,
        source: ImageSource,
    ) -> float:
        """The plan without a fault, on two rows of the probe image (a window in the middle of the map),
        must give the model's own logits ``expected``. Returns the plan's conv/matmul FLOPs per row."""
        slots = context.store.slots([probe_id, probe_id], source, self.device, self.fmt.dtype)
        shape = layer.out_shape
        middle = torch.tensor([(shape[1] // 2) * shape[2] + shape[2] // 2 if plan.windowed else layer.neurons // 2] * 2)
        run, *_ = self._start(context, plan, layer, slots, middle, None)
        with FlopCounterMode(display=False) as counter:
            logits = run.execute(drop=False).float()
        expected = expected.expand(2, -1)
        # A structural check (a wrong plan is far off), relative to each row's largest logit: reassociation
        # errors scale with it, and a random-weight ResNet-152 at 224 px has logits from 7e3 to 1.3e8
        tol = 1e-3 if self.fmt.bits == 32 else 5e-2
        finite = torch.isfinite(expected)
        scale = 1 + largest_finite_magnitude(expected).float().unsqueeze(1).expand_as(expected)
        if logits.shape != expected.shape or not torch.equal(finite, torch.isfinite(logits)) or not bool(
            ((logits[finite] - expected[finite]).abs() <= tol * scale[finite]).all()
        ):
            raise SplitError(f"the plan of {layer.name} does not reproduce the model's logits")
        return counter.get_total_flops() / 2

    def _start(
        self, context: Context, plan: SuffixPlan, layer: LayerInfo, slots: torch.Tensor, index: torch.Tensor,
        bits: torch.Tensor | None,
    ) -> tuple[_Run, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """A run whose layer output is golden but for ``bits`` flipped at ``index`` (no flip when None),
        with the golden and faulty values (float64) and whether the flip changed the value's bits."""
        run = _Run(context, plan, slots)
        slab = context.store.slabs[plan.cut]
        if plan.windowed:
            channel, y, x = torch.unravel_index(index, layer.out_shape)
            crop = _crop(slab, run.rows, y.tolist(), x.tolist(), (1, 1), 0.0)
            run.env[plan.cut] = Window(crop, y, x)
            zero = torch.zeros_like(run.index)
            where, target = (run.index, channel.to(self.device), zero, zero), crop
        else:
            run.env[plan.cut] = target = slab.index_select(0, slots)
            where = (run.index, *(c.to(self.device) for c in torch.unravel_index(index, layer.out_shape)))
        if bits is None:
            return run, None, None, None
        before = target[where]
        golden, faulty = inject_output(target, where[0], where[1:], bits.to(self.device), self._max_abs(layer))
        changed = _bits(target[where]) != _bits(before)  # a clamp can give back the golden value
        return run, golden, faulty, changed

    def _run_plan(
        self, plan: SuffixPlan, layer: LayerInfo, sites: FaultSites, source: ImageSource
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Run]:
        """Logits, golden and faulty values of a batch through ``plan``, and the run (its rows still in
        ``index`` went to the logits; the others were masked)."""
        assert self._context is not None
        store = self._context.store
        slots = store.slots(sites.image.tolist(), source, self.device, self.fmt.dtype)
        run, golden, faulty, changed = self._start(self._context, plan, layer, slots, sites.index, sites.bit)
        assert golden is not None and faulty is not None and changed is not None
        logits = store.slabs[plan.result].index_select(0, slots)
        if not bool(changed.all()):
            run.subset(changed)
        if len(run.slots):
            out = run.execute(drop=True)
            if len(run.index):
                logits[run.index] = out
        return logits.float().cpu(), golden, faulty, run

    # ------------------------------------------------------------------------------------- fallback

    def _run_hooked(
        self, layer: LayerInfo, sites: FaultSites, source: ImageSource
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A full forward of the batch's images with the flips made by a forward hook on the layer."""
        images = source.images(sites.image).to(self.device, self.fmt.dtype)
        batch = torch.arange(len(sites), device=self.device)
        coords = tuple(c.to(self.device) for c in torch.unravel_index(sites.index, layer.out_shape))
        bits, max_abs = sites.bit.to(self.device), self._max_abs(layer)
        record: dict[str, torch.Tensor] = {}

        def hook(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            record["golden"], record["faulty"] = inject_output(output, batch, coords, bits, max_abs)

        handle = self.model.get_submodule(layer.name).register_forward_hook(hook)
        try:
            logits = self.model(images)
        finally:
            handle.remove()
        if "golden" not in record:
            raise EngineError(f"layer {layer.name} did not run in the forward pass")
        return logits.float().cpu(), record["golden"], record["faulty"]

    def _max_abs(self, layer: LayerInfo) -> float | None:
        return None if self.clamp is None else float(self.clamp[layer.name])
