"""The graph side of the fast engine: trace a classifier with torch.fx and plan, per layer, the suffix.

``trace`` gives a GraphModule with in-place operations made out of place (so every node's value can be
recorded in a golden pass: ``relu(inplace=True)`` would overwrite the BatchNorm output it reads).
``probe`` runs it once and records per node whether its value is a tensor, depends on the images,
has the batch as its first dimension, and its shape. ``plan_suffix`` then lists, for one layer, the
nodes that depend on the layer's output (the *suffix*) in execution order, each with a rule saying how
it may run on a spatial window of a perturbation:

* ``local``: conv, max/avg-pool, strided subsampling: output pixel o reads input rows o·s − p … o·s − p
  + (k − 1)·d, so a perturbation in a box of the input only reaches a computable box of the output;
* ``unary``: per-pixel operations (BatchNorm in evaluation, activations, channel padding);
* ``binary``: element-wise arithmetic of two same-shaped maps (residual additions);
* ``other``: anything else, run on whole tensors.

It also names the fault-free (golden) values the suffix reads (the cut: residual branches, a downsample
path; and the values the masking tests compare), and the points where the masking test runs: before
the first heavy node (conv, linear, matmul), comparing every live perturbed value with its golden value.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from resilience.layers import TARGET_TYPES

# Functions and tensor methods that do per-row work comparable to a conv/linear layer.
HEAVY_FUNCTIONS = {
    torch.matmul, operator.matmul, torch.bmm, torch.mm, torch.einsum, torch.baddbmm, torch.addmm,
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.scaled_dot_product_attention,
}
HEAVY_METHODS = {"matmul", "bmm", "mm", "__matmul__"}
UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d,
)
UNARY_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.hardtanh, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.leaky_relu,
    torch.sigmoid, torch.tanh, F.elu, F.mish,
}
UNARY_METHODS = {"relu", "sigmoid", "tanh"}
BINARY_FUNCTIONS = {operator.add, operator.mul, operator.sub, torch.add, torch.mul, torch.sub}
BINARY_METHODS = {"add", "mul", "sub"}
# In-place operations and their out-of-place twins.
OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                operator.itruediv: operator.truediv}


class SplitError(RuntimeError):
    """The model cannot be traced or split at a layer; the fast engine falls back to a full forward."""


class _Tracer(fx.Tracer):
    """torch.fx's default tracer, with every conv/linear kept as one call (subclasses included)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, TARGET_TYPES) or super().is_leaf_module(m, qualname)


def _later_users(node: fx.Node, after: fx.Node, order: dict[fx.Node, int]) -> bool:
    return any(order[u] > order[after] for u in node.users)


def _out_of_place(gm: fx.GraphModule) -> None:
    """Rewrite in-place operations whose mutated input nobody reads afterwards (numerically identical)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if first is None or _later_users(first, node, order):
            continue
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if getattr(module, "inplace", False):
                twin = copy.copy(module)
                twin.inplace = False
                name = f"{str(node.target).replace('.', '_')}_out_of_place"
                gm.add_submodule(name, twin)
                node.target = name
        elif node.op == "call_function":
            if node.target in OUT_OF_PLACE:
                node.target = OUT_OF_PLACE[node.target]
            elif node.kwargs.get("inplace"):
                node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_method" and _mutates(node) and hasattr(torch.Tensor, str(node.target)[:-1]):
            node.target = str(node.target)[:-1]


def trace(model: nn.Module) -> fx.GraphModule:
    """A GraphModule of ``model`` with one input, no dead code, in-place operations made out of place
    where that is safe; SplitError when the model does not trace."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # torch.fx raises many types for untraceable code (TraceError, TypeError, ...)
        raise SplitError(f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}") from None
    if sum(node.op == "placeholder" for node in graph.nodes) != 1:
        raise SplitError(f"{type(model).__name__}.forward must take exactly one input")
    gm = fx.GraphModule(model, graph, type(model).__name__)
    gm.graph.eliminate_dead_code()  # so that every node of a suffix leads to the logits
    _out_of_place(gm)
    gm.recompile()
    return gm


@dataclass(frozen=True)
class NodeFacts:
    """What one probe run tells about a node's value."""

    tensor: bool
    input_dependent: bool  # computed from the images (not only from parameters and constants)
    batch_first: bool  # a tensor whose dim 0 is the image batch
    shape: tuple[int, ...]  # tensor shape (batch dimension included), () for other values
    mutated: bool  # an in-place operation changes it after it is computed: its value cannot be recorded

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _Probe(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, batch: int) -> None:
        super().__init__(gm)
        self.batch = batch
        self.facts: dict[fx.Node, NodeFacts] = {}

    def run_node(self, n: fx.Node) -> object:
        value = super().run_node(n)
        dependent = n.op == "placeholder" or any(self.facts[a].input_dependent for a in n.all_input_nodes)
        is_tensor = isinstance(value, torch.Tensor)
        shape = tuple(value.shape) if is_tensor else ()
        first = bool(shape) and shape[0] == self.batch
        self.facts[n] = NodeFacts(is_tensor, dependent, first, shape, False)
        return value


def _mutates(node: fx.Node) -> bool:
    """True for operations that still write into their first argument after :func:`_out_of_place`."""
    target = str(node.target)
    if node.op == "call_function":
        return node.target in OUT_OF_PLACE or bool(node.kwargs.get("inplace"))
    if node.op == "call_method":
        return target.endswith("_") and not target.startswith("_")
    return False


@torch.inference_mode()
def probe(gm: fx.GraphModule, images: torch.Tensor) -> dict[fx.Node, NodeFacts]:
    """Facts of every node from one run on ``images`` (use an odd, small batch: its size marks dim 0)."""
    runner = _Probe(gm, len(images))
    runner.run(images)
    facts = runner.facts
    for node in gm.graph.nodes:
        if _mutates(node) and isinstance(node.args[0], fx.Node):
            target = node.args[0]
            facts[target] = dataclasses.replace(facts[target], mutated=True)
    return facts


@dataclass(frozen=True)
class Local:
    """A spatially local operation on [N, C, H, W] maps (per dimension: kernel, stride, padding, dilation)."""

    kind: str  # "conv", "maxpool", "avgpool" or "subsample"
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    fill: float  # the value implicit padding stands for: 0 for conv, -inf for max-pool
    work: int = 1  # multiply-adds (or comparisons) per output element


@dataclass
class Step:
    """One suffix node and how it may run on a window."""

    node: fx.Node
    rule: str  # "local", "unary", "binary" or "other"
    local: Local | None = None
    heavy: bool = False


@dataclass
class SuffixPlan:
    """How to run everything after one layer."""

    layer: str
    cut: fx.Node  # the layer's node
    windowed: bool  # the layer outputs [N, C, H, W] maps: its perturbation starts as a 1x1 window
    steps: list[Step]
    result: fx.Node  # the logits
    check: int | None = None  # the first heavy step: the masking test runs just before it
    frontier: list[fx.Node] = field(default_factory=list)  # the perturbed values live there (compared)
    free: dict[int, list[fx.Node]] = field(default_factory=dict)  # step -> values nobody reads after it
    golden: set[fx.Node] = field(default_factory=set)  # golden values the plan reads


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _local(gm: fx.GraphModule, node: fx.Node) -> Local | None:
    """Parameters of a local operation the windowed runner knows, else None."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            k = _pair(m.kernel_size)
            return Local("conv", k, _pair(m.stride), _pair(m.padding), _pair(m.dilation), 0.0,
                         m.in_channels // m.groups * k[0] * k[1])
        if isinstance(m, nn.MaxPool2d) and not m.ceil_mode and not m.return_indices:
            k = _pair(m.kernel_size)
            return Local("maxpool", k, _pair(m.stride or m.kernel_size), _pair(m.padding), _pair(m.dilation),
                         float("-inf"), k[0] * k[1])
        if (isinstance(m, nn.AvgPool2d) and not m.ceil_mode and _pair(m.padding) == (0, 0)
                and m.divisor_override is None):
            k = _pair(m.kernel_size)
            return Local("avgpool", k, _pair(m.stride or m.kernel_size), (0, 0), (1, 1), 0.0, k[0] * k[1])
        return None
    if node.op == "call_function" and node.target is operator.getitem:
        # x[:, :, ::s, ::t] (the CIFAR ResNets' option-A shortcut)
        index = node.args[1]
        if isinstance(index, tuple) and len(index) == 4 and all(isinstance(i, slice) for i in index):
            whole = [i.start in (None, 0) and i.stop is None for i in index]
            steps = [i.step or 1 for i in index]
            if all(whole) and steps[:2] == [1, 1] and all(isinstance(s, int) and s > 0 for s in steps):
                return Local("subsample", (1, 1), (steps[2], steps[3]), (0, 0), (1, 1), 0.0)
    return None


def _is_maps(facts: NodeFacts) -> bool:
    return facts.tensor and facts.batch_first and facts.input_dependent and facts.ndim == 4


def _is_broadcast_constant(arg: object, facts: dict[fx.Node, NodeFacts]) -> bool:
    """A number, or an image-independent tensor without spatial extent (broadcasts onto any window)."""
    if not isinstance(arg, fx.Node):
        return isinstance(arg, (int, float))
    f = facts[arg]
    return f.tensor and not f.input_dependent and (f.ndim < 2 or f.shape[-2:] == (1, 1))


def _rule(gm: fx.GraphModule, node: fx.Node, facts: dict[fx.Node, NodeFacts]) -> tuple[str, Local | None]:
    if not _is_maps(facts[node]):
        return "other", None
    local = _local(gm, node)
    if local is not None and _is_maps(facts[node.args[0]]):
        return "local", local
    first, rest = (node.args[0] if node.args else None), [*node.args[1:], *node.kwargs.values()]
    nodes_in_rest = [a for a in rest if isinstance(a, fx.Node)]
    if isinstance(first, fx.Node) and _is_maps(facts[first]) and facts[first].shape[2:] == facts[node].shape[2:]:
        if node.op == "call_module" and not nodes_in_rest:
            m = gm.get_submodule(str(node.target))
            if isinstance(m, UNARY_MODULES) or (isinstance(m, nn.BatchNorm2d) and not m.training
                                                 and m.track_running_stats):
                return "unary", None
        if node.op == "call_function" and not nodes_in_rest and node.target in UNARY_FUNCTIONS:
            return "unary", None
        if node.op == "call_method" and not nodes_in_rest and node.target in UNARY_METHODS:
            return "unary", None
        if (node.op == "call_function" and node.target is F.pad and not nodes_in_rest and len(node.args) > 1
                and tuple(node.args[1])[:4] == (0, 0, 0, 0) and node.kwargs.get("mode", "constant") == "constant"):
            return "unary", None  # padding of the channel dimension only
    binary = (node.op == "call_function" and node.target in BINARY_FUNCTIONS) or (
        node.op == "call_method" and node.target in BINARY_METHODS)
    if binary and len(node.args) == 2 and not node.kwargs:
        maps = [a for a in node.args if isinstance(a, fx.Node) and _is_maps(facts[a])]
        if maps and all(facts[a].shape == facts[node].shape for a in maps) and all(
            a in maps or _is_broadcast_constant(a, facts) for a in node.args
        ):
            return "binary", None
    return "other", None


def _is_heavy(gm: fx.GraphModule, node: fx.Node, facts: dict[fx.Node, NodeFacts]) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return any(p.dim() >= 2 for p in [*module.parameters(), *module.buffers()])
    if node.op == "call_method":
        return node.target in HEAVY_METHODS
    if node.op == "call_function":
        # also wrapped functions that take weight matrices (torchvision's shifted_window_attention)
        return node.target in HEAVY_FUNCTIONS or any(
            facts[a].tensor and not facts[a].input_dependent and facts[a].ndim >= 2 for a in node.all_input_nodes
        )
    return False


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.users)
    while stack:
        n = stack.pop()
        if n not in seen and n.op != "output":
            seen.add(n)
            stack.extend(n.users)
    return seen


def plan_suffix(gm: fx.GraphModule, facts: dict[fx.Node, NodeFacts], layer: str) -> SuffixPlan:
    """The suffix of ``layer`` in ``gm``; SplitError when the layer cannot be cut out this way."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    calls = [n for n in nodes if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        raise SplitError(f"layer {layer} is called {len(calls)} times in the trace (need exactly once)")
    cut = calls[0]
    output = next(n for n in nodes if n.op == "output")
    result = output.args[0]
    if not isinstance(result, fx.Node) or not facts[result].tensor or not facts[result].batch_first:
        raise SplitError("the model must return one [N, C] logits tensor")
    if not facts[cut].batch_first:
        raise SplitError(f"the output of {layer} does not have the batch as its first dimension")
    suffix = _descendants(cut)
    if result is not cut and result not in suffix:
        raise SplitError(f"the output of {layer} does not reach the logits")
    # values that are not tensors but depend on the images (x.shape[0]) are recomputed per fault batch
    stack = list(suffix)
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in suffix and a is not cut and facts[a].input_dependent and not facts[a].tensor:
                suffix.add(a)
                stack.append(a)
    ordered = sorted(suffix, key=order.__getitem__)
    windowed = isinstance(gm.get_submodule(layer), nn.Conv2d) and _is_maps(facts[cut])
    steps = []
    for n in ordered:
        rule, local = _rule(gm, n, facts)
        steps.append(Step(n, rule, local, _is_heavy(gm, n, facts)))
    plan = SuffixPlan(layer, cut, windowed, steps, result)

    perturbed = suffix | {cut}
    last_read: dict[fx.Node, int] = {}
    for i, step in enumerate(steps):
        for a in step.node.all_input_nodes:
            last_read[a] = i
    last_read[result] = len(steps)
    for node, i in last_read.items():
        if node in perturbed and i < len(steps):
            plan.free.setdefault(i, []).append(node)
    heavy = [i for i, step in enumerate(steps) if step.heavy]
    if heavy:
        plan.check = i = heavy[0]
        plan.frontier = [n for n in perturbed if (n is cut or order[n] < order[steps[i].node]) and last_read.get(n, -1) >= i]

    # golden values read: the cut's image-dependent tensors, the values masking tests compare, and the
    # perturbed values that may be windows where a window has to be widened or pasted into a whole map
    may_window = {cut} if windowed else set()
    for step in steps:
        if step.rule in ("unary", "binary", "local") and any(a in may_window for a in step.node.all_input_nodes):
            may_window.add(step.node)
    golden = {cut}
    for step in steps:
        for a in step.node.all_input_nodes:
            cut_value = a not in perturbed and facts[a].input_dependent and facts[a].tensor
            if cut_value or (a in may_window and step.rule != "unary"):
                golden.add(a)
    if result in may_window:
        golden.add(result)
    golden.update(n for n in plan.frontier if facts[n].tensor)
    bad = [n.name for n in golden if facts[n].mutated or not facts[n].batch_first]
    if bad:
        raise SplitError(f"golden values {bad} read after {layer} cannot be recorded per image")
    plan.golden = golden
    return plan


def recorder(gm: fx.GraphModule, outputs: Iterable[fx.Node]) -> fx.GraphModule:
    """A GraphModule over ``gm`` returning the tuple of ``outputs``' values for an input batch."""
    nodes = list(gm.graph.nodes)
    wanted = list(outputs)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n.op == "output":
            break
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(tuple(env[n] for n in wanted))
    gm_out = fx.GraphModule(gm, graph)
    gm_out.graph.eliminate_dead_code()
    gm_out.recompile()
    return gm_out
