"""Fast against reference engine: one neuron-fault campaign through both, speed and agreement.

    .venv/bin/python scripts/bench_inject.py --model resnet20 --dataset fashion-mnist --max-images 32 --injections 256
    .venv/bin/python scripts/bench_inject.py --checkpoint runs/fm_resnet20_linear/checkpoint.pth --max-images 32
    .venv/bin/python scripts/bench_inject.py --model resnet50 --input-size 224 --max-images 8 --injections 256

Both engines get the same fault sites (drawn per layer from (seed, layer) as a campaign does), layer
by layer, reference first, so that both see the same machine conditions. Prints per layer and in total
the faults/s of each engine, the speed ratio and the agreement (resilience.metrics.agreement): per
fault, the same finiteness of the faulty loss, ΔLoss within 1e-4·max(1, ΔLoss_ref) plus 128 float32 ulps
of the largest |logit| for finite ones, and the same mismatch decision unless the top two logits tie to
64 ulps. Exits 1 when fewer than 99.9% of the faults agree. The speed of the fast engine depends on the
workload: the golden images the faults hit and the faults per image hit are printed with the times
(``full%``: the share of a layer's faults the fast engine ran as full forwards, where golden passes
would not pay). Without --checkpoint the model has random
weights (said in the output); without --dataset the inputs are random images and their labels the
model's own predictions. The fast engine's one-time setup (tracing, planning, self-checks) and golden
passes count in its time.

Where the time goes: the "work" column is the ratio of conv/matmul FLOPs per fault (reference over fast,
counted with torch.utils.flop_counter on the first --flop-faults faults of each layer, after timing):
the speed-up the fast engine would reach if time followed arithmetic. A ratio well below it means
overhead (Python, small kernels); a work ratio near the speed ratio means the suffix's arithmetic
itself is the cost.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli_shell import UserError, run_cli  # noqa: E402
from resilience.bitflip import FORMATS, NumberFormat, get_format  # noqa: E402
from resilience.engines import FaultSites, InjectionResult  # noqa: E402
from resilience.engines.fast import DEFAULT_CACHE_BYTES, FastEngine  # noqa: E402
from resilience.engines.reference import ReferenceEngine  # noqa: E402
from resilience.golden import Golden, TensorImageSource, evaluated_ids, golden_pass, iterate_split  # noqa: E402
from resilience.layers import LayerInfo, discover_layers, select_layers  # noqa: E402
from resilience.metrics import agreement, score_faults  # noqa: E402
from resilience.profile import profile_max_abs  # noqa: E402
from resilience.sampling import sample_sites  # noqa: E402

REQUIRED_AGREEMENT = 0.999


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark of the engines shares: model, images, fault model, execution."""
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", default=None, help="checkpoint to load (default: random weights)")
    g.add_argument("--model", default=None, help="architecture (random weights, or a foreign checkpoint)")
    g.add_argument("--head", choices=("linear", "text"), default="linear", help="head of a random-weight model")
    g.add_argument("--embed-dim", type=int, default=512, help="text-head width of a random-weight model")
    g.add_argument("--num-classes", type=int, default=None, help="classes (default: the dataset's, else 1000)")
    g.add_argument("--seed-weights", type=int, default=0, help="seed of the random weights")
    g = parser.add_argument_group("images")
    g.add_argument("--dataset", default=None, help="test split to read (default: random inputs)")
    g.add_argument("--data-path", default=None)
    g.add_argument("--input-size", type=int, default=224, help="side of random inputs")
    g.add_argument("--max-images", "--images", dest="images", type=int, default=16, metavar="K",
                   help="evaluated images: with --dataset the fixed subset of every command's --max-images, "
                        "else K random inputs")
    g.add_argument("--golden", choices=("correct", "all"), default=None,
                   help="images faults may hit (default: correct with a checkpoint, all with random weights)")
    g = parser.add_argument_group("faults")
    g.add_argument("--layers", default=None, metavar="REGEX", help="only layers whose name matches")
    g.add_argument("--seed", type=int, default=0, help="fault sampling seed")
    g.add_argument("--format", choices=tuple(FORMATS), default="fp32")
    g.add_argument("--clamp", choices=("none", "profile"), default="none",
                   help="profile: clamp to the max |activation| over the evaluated images")
    g = parser.add_argument_group("execution")
    g.add_argument("-b", "--batch-size", type=int, default=64, help="faults per pass (both engines)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    g.add_argument("--device", default="cpu")
    g.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_workload_args(parser)
    g = parser.add_argument_group("this benchmark")
    g.add_argument("--injections", type=int, default=256, metavar="N", help="faults per layer")
    g.add_argument("--cache-mb", type=int, default=DEFAULT_CACHE_BYTES >> 20, help="fast engine's golden cache")
    g.add_argument("--no-cost-model", action="store_true",
                   help="the fast engine runs every planned batch on its plan, even where full forwards cost less")
    g.add_argument("--flop-faults", type=int, default=64, metavar="K",
                   help="faults per layer whose FLOPs are counted for the work column (0: no count)")
    return parser


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, str, Any, torch.Tensor, torch.Tensor | None]:
    """The model (evaluation mode), its description, a dataset or None, evaluated ids and random images."""
    import data
    import models

    dataset = None
    if args.checkpoint:
        model, meta = models.load_checkpoint(args.checkpoint, model_name=args.model, num_classes=args.num_classes,
                                             dataset=args.dataset)
        name = f"{meta['model']} ({meta.get('head')} head) from {args.checkpoint}"
        preset = meta.get("preset") if meta.get("dataset") == args.dataset else None
        small, chans = bool(meta.get("small_input")), meta.get("in_chans")
        model_name = meta["model"]
    else:
        if not args.model:
            raise UserError("give --checkpoint or --model")
        torch.manual_seed(args.seed_weights)
        try:
            spec = models.get_model_spec(args.model)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        small = args.dataset is not None and spec.small_input == "adapted" and args.input_size <= 64
        chans = data.dataset_channels(args.dataset) if args.dataset else 3
        classes = args.num_classes or (data.num_classes(args.dataset) if args.dataset else 1000)
        model = models.build_model(args.model, classes, head=args.head, embed_dim=args.embed_dim, in_chans=chans,
                                   small_input=small or spec.small_input == "native")
        name = f"{args.model} ({args.head} head), RANDOM WEIGHTS (no --checkpoint)"
        preset, model_name = None, args.model
    if args.dataset:
        dataset = data.build_dataset(args.dataset, "test", args.data_path, preset=preset, model_name=model_name,
                                     small_input=small, in_chans=chans)
        return model.eval(), name, dataset, evaluated_ids(len(dataset), args.images), None
    in_chans = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    g = torch.Generator().manual_seed(args.seed_weights)
    images = torch.randn(args.images, in_chans, args.input_size, args.input_size, generator=g)
    return model.eval(), name, None, torch.arange(args.images), images


@dataclass
class Workload:
    """A benchmark's model and images: golden pass, golden set, image source, layers and clamp profile."""

    model: torch.nn.Module
    name: str
    dataset: Any
    ids: torch.Tensor
    images: torch.Tensor
    golden: Golden
    mode: str  # the golden set's definition
    golden_set: torch.Tensor
    source: TensorImageSource
    all_layers: list[LayerInfo]
    layers: list[LayerInfo]  # those --layers selects
    clamp: dict[str, float] | None
    fmt: NumberFormat
    device: torch.device

    def describe(self, args: argparse.Namespace) -> str:
        inputs = f"random {tuple(self.images.shape[1:])}" if self.dataset is None else args.dataset
        return (f"model: {self.name}\ninputs: {inputs} x {len(self.ids)} images, golden set ({self.mode}) "
                f"{len(self.golden_set)}, accuracy {100 * self.golden.accuracy:.1f}%")


def prepare(args: argparse.Namespace) -> Workload:
    """Threads, model, golden pass over the evaluated images, golden set, layers and (``--clamp profile``)
    the profile over the evaluated images: what every benchmark of the engines starts from."""
    if args.threads:
        torch.set_num_threads(args.threads)
    fmt, device = get_format(args.format), torch.device(args.device)
    model, name, dataset, ids, images = build(args)
    model.to(device=device, dtype=fmt.dtype)
    if dataset is not None:
        pairs = list(iterate_split(dataset, ids, 256))
        images = torch.cat([x for x, _ in pairs])
        golden = golden_pass(model, ids, pairs, fmt, device)
    else:
        assert images is not None
        logits = golden_pass(model, ids, [(images, torch.zeros(len(ids), dtype=torch.long))], fmt, device).logits
        golden = Golden(ids, logits, logits.argmax(1))  # random inputs: the model's predictions are the labels
    mode = args.golden or ("correct" if args.checkpoint else "all")
    golden_set = golden.golden_set(mode)
    if len(golden_set) == 0:
        raise UserError("the golden set is empty (use --golden all)")
    all_layers = discover_layers(model, images[:1].to(device, fmt.dtype))
    try:
        layers = select_layers(all_layers, args.layers)
    except ValueError as exc:
        raise UserError(f"{exc}") from None
    clamp = None
    if args.clamp == "profile":
        clamp = profile_max_abs(model, all_layers, (images[i : i + 64] for i in range(0, len(images), 64)), fmt, device)
    return Workload(model, name, dataset, ids, images, golden, mode, golden_set, TensorImageSource(ids, images),
                    all_layers, layers, clamp, fmt, device)


def timed(engine: Any, layer: LayerInfo, sites: FaultSites, source: Any) -> tuple[InjectionResult, float]:
    t0 = time.perf_counter()
    result = engine.run(layer, sites, source)
    return result, time.perf_counter() - t0


def flops_per_fault(engine: Any, layer: LayerInfo, sites: FaultSites, source: Any, k: int) -> float:
    """Conv/matmul FLOPs per fault of ``engine`` on the first ``k`` faults of ``sites``."""
    from torch.utils.flop_counter import FlopCounterMode

    part = FaultSites(sites.layer, sites.image[:k], sites.index[:k], sites.bit[:k])
    with FlopCounterMode(display=False) as counter:
        engine.run(layer, part, source)
    return counter.get_total_flops() / len(part)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.images < 1 or args.injections < 1 or args.batch_size < 1 or args.cache_mb < 1:
        raise UserError("--max-images, --injections, --batch-size and --cache-mb must be at least 1")
    if args.flop_faults < 0:
        raise UserError("--flop-faults must be at least 0")
    w = prepare(args)
    model, name, ids, golden, golden_set, source, layers, clamp, fmt, device = (
        w.model, w.name, w.ids, w.golden, w.golden_set, w.source, w.layers, w.clamp, w.fmt, w.device)
    print(f"{w.describe(args)}\n{len(layers)} layers x {args.injections} faults, seed {args.seed}, {args.format}, "
          f"clamp {args.clamp}, batch {args.batch_size}, {torch.get_num_threads()} threads, device {device}", flush=True)

    options = {"clamp": clamp, "device": device, "batch_size": args.batch_size}
    reference = ReferenceEngine(model, layers, fmt, **options)
    t0 = time.perf_counter()
    fast = FastEngine(model, layers, fmt, cache_bytes=args.cache_mb << 20, cost_model=not args.no_cost_model, **options)
    setup = time.perf_counter() - t0
    totals = {"reference": 0.0, "fast": setup, "reference_flops": 0.0, "fast_flops": 0.0}
    agree_all, rows, hit = [], [], set()
    header = (f"{'layer':28} {'path':11} {'full%':>6} {'drop%':>6} {'ref f/s':>9} {'fast f/s':>9} {'ratio':>7} "
              f"{'work':>7} {'agree%':>7}")
    print(header + "\n" + "-" * len(header), flush=True)
    for layer in layers:
        sites = sample_sites(args.seed, layer.name, layer.neurons, golden_set, args.injections, fmt.bits)
        again = sample_sites(args.seed, layer.name, layer.neurons, golden_set, args.injections, fmt.bits)
        if not all(torch.equal(a, b) for a, b in ((sites.image, again.image), (sites.index, again.index), (sites.bit, again.bit))):
            raise UserError(f"the fault sites of {layer.name} are not reproducible")
        ref_result, t_ref = timed(reference, layer, sites, source)
        fast_result, t_fast = timed(fast, layer, sites, source)
        totals["reference"] += t_ref
        totals["fast"] += t_fast
        r = golden.rows(sites.image)
        scored = [score_faults(res.faulty_logits, golden.labels[r], golden.pred[r], golden.loss[r])
                  for res in (ref_result, fast_result)]
        agree = agreement(*scored)
        agree_all.append(agree)
        hit.update(sites.image.tolist())
        n = len(sites)
        dropped, full = fast.counts[layer.name]["dropped"], fast.counts[layer.name]["full_forward"]
        work = math.nan
        if args.flop_faults:
            ref_flops, fast_flops = (flops_per_fault(e, layer, sites, source, args.flop_faults) for e in (reference, fast))
            totals["reference_flops"] += ref_flops * n
            totals["fast_flops"] += fast_flops * n
            work = ref_flops / fast_flops if fast_flops else math.inf
        row = {"layer": layer.name, "path": fast.path(layer.name), "faults": n, "full_forward": full, "dropped": dropped,
               "window_ops": fast.counts[layer.name]["window_ops"], "reference_s": t_ref, "fast_s": t_fast,
               "work_ratio": work, "agree": int(agree.sum())}
        rows.append(row)
        print(f"{layer.name:28} {row['path']:11} {100 * full / n:6.1f} {100 * dropped / n:6.1f} {n / t_ref:9.1f} {n / t_fast:9.1f} "
              f"{t_ref / t_fast:7.1f} {work:7.3g} {100 * float(agree.double().mean()):7.2f}", flush=True)

    agree = torch.cat(agree_all)
    faults = len(agree)
    rate = float(agree.double().mean())
    ref_rate, fast_rate = faults / totals["reference"], faults / totals["fast"]
    full = sum(c["full_forward"] for c in fast.counts.values())
    print("-" * len(header))
    print(f"workload: {len(ids)} images, golden set {len(golden_set)}, {len(hit)} golden images hit by "
          f"{faults} faults = {faults / len(hit):.2f} faults per image hit")
    print(f"total: reference {totals['reference']:.1f} s = {ref_rate:.2f} faults/s; fast {totals['fast']:.1f} s "
          f"(construction {setup:.1f} s, golden passes over {fast.golden_images} images, {full} faults as full "
          f"forwards) = {fast_rate:.2f} faults/s; ratio {fast_rate / ref_rate:.2f}x")
    work = totals["reference_flops"] / totals["fast_flops"] if totals["fast_flops"] else math.nan
    if args.flop_faults:
        print(f"work: conv/matmul FLOPs per fault, reference over fast, {work:.2f}x (the ratio if time followed "
              f"arithmetic; golden passes not counted)")
    print(f"agreement: identical fault sites; {int(agree.sum())}/{faults} faults agree ({100 * rate:.3f}%, "
          f"need {100 * REQUIRED_AGREEMENT:.1f}%)")
    print(f"fast engine: {json.dumps(fast.describe())}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "model": name, "layers": rows, "faults": faults, "agreement": rate,
            "images": len(ids), "golden_set": len(golden_set), "images_hit": len(hit),
            "faults_per_image": faults / len(hit), "golden_passes": fast.golden_images, "full_forward": full,
            "reference_s": totals["reference"], "fast_s": totals["fast"],
            "reference_faults_per_s": ref_rate, "fast_faults_per_s": fast_rate, "ratio": fast_rate / ref_rate,
            "work_ratio": work,
            "fast_setup_s": setup, "engine": fast.describe(),
        }, indent=2) + "\n")
    return 0 if rate >= REQUIRED_AGREEMENT else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
