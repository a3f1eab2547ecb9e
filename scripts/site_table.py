"""Fault sites per registered model: conv/linear calls in a forward = discovered layers = usable in a campaign.

    .venv/bin/python scripts/site_table.py                        (every model, both heads, native input size)
    .venv/bin/python scripts/site_table.py --models 'swin*' --size min --usable

Per model and head (random weights, 10 classes, a 512-wide text head):

* ``calls``: ``F.linear``/``F.conv2d`` computations in one forward pass, counted by a TorchFunctionMode
  (module calls and functional calls with a module's weights alike);
* ``discovered``: the layers ``resilience.layers.discover_layers`` lists (what a campaign samples);
* ``usable`` (with ``--usable``): discovered layers into which both engines inject two faults in one batch
  (one per image, on two images) and agree per fault (bench_inject's criterion).

``--size native`` feeds each model the crop of its evaluation preset (ImageNet networks: 224x224, Swin-V2
256x256; CIFAR ResNets 32x32); ``min`` its smallest supported input (small-input variants where the
registry has them). Exits 1 when a
row's figures differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import models  # noqa: E402
from resilience.bitflip import get_format  # noqa: E402
from resilience.engines import FaultSites  # noqa: E402
from resilience.engines.fast import FastEngine  # noqa: E402
from resilience.engines.reference import ReferenceEngine  # noqa: E402
from resilience.golden import Golden, TensorImageSource, golden_pass  # noqa: E402
from resilience.layers import LayerInfo, count_conv_linear_calls, discover_layers  # noqa: E402
from resilience.metrics import agreement, score_faults  # noqa: E402

NUM_CLASSES = 10


def build(name: str, head: str, size: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A seeded random-weight model of ``name`` with ``head`` and two seeded random images for it."""
    spec = models.get_model_spec(name)
    small = (size == "min" and spec.small_input == "adapted") or spec.small_input == "native"
    dataset = "cifar10" if spec.small_input == "native" else "imagenet"
    side = spec.min_input_size if size == "min" else data.eval_preset(dataset, name)["crop_size"]
    torch.manual_seed(0)
    model = models.build_model(name, NUM_CLASSES, head=head, small_input=small).eval()
    return model, torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))


def usable_layers(model: torch.nn.Module, layers: list[LayerInfo], images: torch.Tensor) -> int:
    """Layers into which both engines inject one fault per image (two in one batch) and agree per fault."""
    fmt, ids = get_format("fp32"), torch.arange(len(images))
    logits = golden_pass(model, ids, [(images, torch.zeros(len(ids), dtype=torch.long))], fmt, "cpu").logits
    golden = Golden(ids, logits, logits.argmax(1))
    source = TensorImageSource(ids, images)
    engines = [engine(model, layers, fmt, batch_size=len(ids)) for engine in (ReferenceEngine, FastEngine)]
    usable = 0
    for layer in layers:
        g = torch.Generator().manual_seed(len(layer.name))
        sites = FaultSites(layer.name, ids, torch.randint(layer.neurons, (len(ids),), generator=g),
                           torch.randint(fmt.bits, (len(ids),), generator=g))
        rows = golden.rows(sites.image)
        try:
            ref, fast = (score_faults(e.run(layer, sites, source).faulty_logits, golden.labels[rows], golden.pred[rows],
                                      golden.loss[rows]) for e in engines)
        except Exception as exc:  # the table reports a failing layer instead of stopping
            print(f"  {layer.name}: {type(exc).__name__}: {exc}", flush=True)
            continue
        usable += bool(agreement(ref, fast).all())
    return usable


def main(argv: list[str] | None = None) -> int:
    """Print the table; 1 when some row's counts differ."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="registry filter (shell pattern or substring)")
    parser.add_argument("--heads", default="linear,text", help="comma-separated heads")
    parser.add_argument("--size", choices=("native", "min"), default="native", help="input size (see above)")
    parser.add_argument("--usable", action="store_true", help="also inject into every layer with both engines")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = parser.parse_args(argv)
    names = models.list_models(args.models)
    heads = [h for h in args.heads.split(",") if h]
    if not names or any(h not in models.registry.HEADS for h in heads):
        print(f"error: no model matches {args.models!r} or unknown head in {args.heads!r}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| model | head | input | calls | discovered | usable |\n|---|---|---:|---:|---:|---:|", flush=True)
    ok = True
    for name in names:
        for head in heads:
            model, images = build(name, head, args.size)
            calls = count_conv_linear_calls(model, images[:1])
            layers = discover_layers(model, images[:1])
            usable = usable_layers(model, layers, images) if args.usable else None
            ok &= calls == len(layers) and usable in (None, len(layers))
            print(f"| {name} | {head} | {images.shape[-1]} | {calls} | {len(layers)} | "
                  f"{'-' if usable is None else usable} |", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
