"""Time to a network-level precision: reference + uniform against fast + stratified, side by side.

    .venv/bin/python scripts/bench_precision.py --checkpoint runs/fm_text/checkpoint.pth --dataset fashion-mnist \\
        --images 10000 --width 0.05 --threads 2
    .venv/bin/python scripts/bench_precision.py --model resnet50 --input-size 224 --images 1000 \\
        --layers '^layer4\\.' --width 0.2 --threads 2

Both sides estimate the same quantity, the network-level mean ΔLoss (the mean over layers of the layer
means), on the same model, golden images and clamp profile, in one process:

(a) the reference engine, uniform sampling over the whole golden set: the first k faults of a layer's
    uniform list are the uniform campaign of k (``resilience.sampling.sample_sites``), so the run grows
    every layer's list (k = --start, 2k, 4k, ...), running only the new faults, until the 99% interval of
    the network level (Hall's, the layer moments added up: ``resilience.improvement_ci.network_interval``)
    has a half-width of at most --width times the estimate, or k reaches --max-uniform (then W becomes
    the precision reached, and the output says so). Timed: the engine's passes and the scoring.
(b) the fast engine with ``--sampling stratified``, run as inject.py runs it (``resilience.runner.execute``
    into a temporary folder, then assembly): every layer stops at an absolute half-width a, chosen so that
    L layers at a give the network interval W: a = W · estimate · √L · 0.9 (the estimate is (a)'s; or
    --target-abs). If the assembled network interval misses W, the campaign runs again with a smaller a,
    and every attempt's time counts. Timed: the whole run, setup, golden passes and file writes included.

Prints per step the injections, faults per golden image hit, the interval and the time; then both wall
times, injections and the ratio. Clamp ``--clamp profile`` (the paper's fault model) profiles the
evaluated images. Random inputs (no --dataset) are the model's own predictions as labels, every image
golden; their count is --images.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inject import Workload, add_workload_args, prepare  # noqa: E402

from cli_shell import UserError, run_cli  # noqa: E402
from resilience import stratified as st  # noqa: E402
from resilience.campaign import CampaignConfig  # noqa: E402
from resilience.engines.reference import ReferenceEngine  # noqa: E402
from resilience.image_pool import LayerSet, pool_size_arg  # noqa: E402
from resilience.improvement_ci import network_interval, network_moments  # noqa: E402
from resilience.intervals import uniform_layer_moments  # noqa: E402
from resilience.metrics import score_faults  # noqa: E402
from resilience.runner import StratifiedSampling, execute  # noqa: E402
from resilience.sampling import sample_sites  # noqa: E402

SAFETY = 0.9  # layers stop at or below their target; a little margin spares most second attempts


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_workload_args(parser)
    parser.set_defaults(images=10_000, clamp="profile", threads=2)
    g = parser.add_argument_group("precision")
    g.add_argument("--width", type=float, default=0.05, metavar="W",
                   help="network-level 99%% CI half-width to reach, relative to the estimate")
    g.add_argument("--start", type=int, default=256, help="uniform faults per layer of the reference's first step")
    g.add_argument("--max-uniform", type=int, default=65_536, help="the reference stops here even short of W")
    g.add_argument("--target-abs", type=float, default=None,
                   help="per-layer absolute half-width of the stratified run (default: from W and (a)'s estimate)")
    g.add_argument("--strata", choices=st.GROUPINGS, default="bit")
    g.add_argument("--pilot", type=int, default=16, help="stratified pilot draws per stratum")
    g.add_argument("--max-injections", type=int, default=65_536, help="stratified cap per layer")
    g.add_argument("--attempts", type=int, default=3, help="stratified runs at most (each with a smaller target)")
    g.add_argument("--image-pool", type=pool_size_arg, default=None, metavar="K",
                   help="the stratified campaign draws its images from a pool of K golden images (inject.py --image-pool)")
    return parser


def network_figures(moments: LayerSet) -> dict[str, float]:
    """Estimate, interval and relative half-width of the network level from per-layer moments."""
    ci = network_interval(moments)
    value = network_moments(moments).value
    return {"estimate": value, **ci, "rel_half_width": (ci["ci_high"] - ci["ci_low"]) / 2 / abs(value)}


def reference_to_width(args: argparse.Namespace, w: Workload) -> dict[str, Any]:
    """(a): uniform lists grown by doubling, reference engine, until the network interval reaches W."""
    engine = ReferenceEngine(w.model, w.layers, w.fmt, clamp=w.clamp, device=w.device, batch_size=args.batch_size)
    kept: dict[str, list[np.ndarray]] = {layer.name: [] for layer in w.layers}
    seconds, done, k, hit, steps = 0.0, 0, args.start, set(), []
    while True:
        for layer in w.layers:
            sites = sample_sites(args.seed, layer.name, layer.neurons, w.golden_set, k, w.fmt.bits).slice(done, k)
            t0 = time.perf_counter()
            result = engine.run(layer, sites, w.source)
            rows = w.golden.rows(sites.image)
            out = score_faults(result.faulty_logits, w.golden.labels[rows], w.golden.pred[rows], w.golden.loss[rows])
            seconds += time.perf_counter() - t0
            kept[layer.name].append(np.stack([out.delta_loss.numpy(), out.finite.numpy(), sites.bit.numpy()]))
            hit.update(sites.image.tolist())
        moments = LayerSet({})
        for name in kept:
            delta, finite, bit = np.concatenate(kept[name], axis=1)
            moments.within[name] = uniform_layer_moments(delta, finite.astype(bool), bit.astype(np.int64), w.fmt.bits)
        step = {"per_layer": k, "injections": k * len(w.layers), "seconds": seconds,
                "faults_per_image": k * len(w.layers) / len(hit), **network_figures(moments)}
        steps.append(step)
        print(f"  (a) {k:6d} per layer = {step['injections']:8d} faults, {step['faults_per_image']:.2f} per golden "
              f"image hit: ΔLoss {step['estimate']:.5g} [{step['ci_low']:.5g}, {step['ci_high']:.5g}] "
              f"± {100 * step['rel_half_width']:.2f}%, {seconds:.1f} s", flush=True)
        if step["rel_half_width"] <= args.width or 2 * k > args.max_uniform:
            return {"steps": steps, **step, "reached": step["rel_half_width"] <= args.width}
        done, k = k, 2 * k


def stratified_to_width(args: argparse.Namespace, w: Workload, estimate: float, width: float) -> dict[str, Any]:
    """(b): fast engine, stratified campaigns through the runner, until the assembled network interval
    reaches ``width`` (relative half-width)."""
    config = CampaignConfig(model=args.model or Path(args.checkpoint).stem, dataset=args.dataset or "random", seed=args.seed, golden=w.mode,
                            layers=args.layers, format=args.format, clamp=args.clamp, engine="fast",
                            profile_images=len(w.ids) if args.clamp == "profile" else None,
                            batch_size=args.batch_size, chunk_size=4 * args.batch_size, device=str(w.device))
    target = args.target_abs or width * abs(estimate) * math.sqrt(len(w.layers)) * SAFETY
    attempts, seconds = [], 0.0
    for _ in range(args.attempts):
        adaptive = st.AdaptiveConfig(target_rel=None, target_abs=target, max_injections=args.max_injections,
                                     pilot=args.pilot)
        with tempfile.TemporaryDirectory() as folder:
            t0 = time.perf_counter()
            campaign, _ = execute(Path(folder) / "c", config, w.model, w.all_layers, w.golden, w.source,
                                  sampling=StratifiedSampling(adaptive, args.strata), clamp_max=w.clamp, device=w.device,
                                  progress=False, log=lambda _line: None, image_pool=args.image_pool)
            summary = campaign.assemble()
            took = time.perf_counter() - t0
            images = len(np.unique(pq.read_table(Path(folder) / "c" / "faults.parquet", columns=["image"])
                                   .column("image").to_numpy()))
        seconds += took
        network = summary["network"]
        rel = (network["ci_high"] - network["ci_low"]) / 2 / abs(network["delta_loss"])
        attempt = {"target_abs": target, "injections": network["faults"], "seconds": took, "estimate": network["delta_loss"],
                   "ci_low": network["ci_low"], "ci_high": network["ci_high"], "rel_half_width": rel,
                   "faults_per_image": network["faults"] / images}
        attempts.append(attempt)
        print(f"  (b) per-layer target ±{target:.4g}: {attempt['injections']} faults, {attempt['faults_per_image']:.2f} "
              f"per golden image hit: ΔLoss {attempt['estimate']:.5g} [{attempt['ci_low']:.5g}, {attempt['ci_high']:.5g}] "
              f"± {100 * rel:.2f}%, {took:.1f} s", flush=True)
        if rel <= width:
            break
        target *= SAFETY * width / rel
    return {"attempts": attempts, **attempts[-1], "seconds": seconds, "reached": attempts[-1]["rel_half_width"] <= width,
            "injections_all_attempts": sum(a["injections"] for a in attempts)}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not 0 < args.width < 1:
        raise UserError("--width must lie in (0, 1)")
    if min(args.images, args.start, args.max_uniform, args.pilot, args.max_injections, args.attempts, args.batch_size) < 1:
        raise UserError("--images, --start, --max-uniform, --pilot, --max-injections, --attempts and "
                         "--batch-size must be at least 1")
    if args.target_abs is not None and not args.target_abs > 0:
        raise UserError("--target-abs must be positive")
    w = prepare(args)
    print(f"{w.describe(args)}\n{len(w.layers)} layers, target: network 99% CI half-width <= {100 * args.width:g}% "
          f"of the estimate; seed {args.seed}, {args.format}, clamp {args.clamp}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, device {w.device}", flush=True)
    ref = reference_to_width(args, w)
    # short of W at --max-uniform, the fast side aims at the precision the reference did reach
    width = args.width if ref["reached"] else ref["rel_half_width"]
    fast = stratified_to_width(args, w, ref["estimate"], width)
    ratio = ref["seconds"] / fast["seconds"]
    print(f"(a) reference, uniform, all {len(w.golden_set)} golden images: {ref['injections']} faults "
          f"({ref['per_layer']} per layer, {ref['faults_per_image']:.2f} per golden image hit), {ref['seconds']:.1f} s, "
          f"network ± {100 * ref['rel_half_width']:.2f}%{'' if ref['reached'] else ' (W NOT reached)'}")
    print(f"(b) fast, stratified ({args.strata}){'' if args.image_pool is None else f', image pool {args.image_pool}'}: "
          f"{fast['injections']} faults ({fast['faults_per_image']:.2f} per golden image hit), {fast['seconds']:.1f} s "
          f"over {len(fast['attempts'])} attempt(s) ({fast['injections_all_attempts']} faults in all), "
          f"network ± {100 * fast['rel_half_width']:.2f}%{'' if fast['reached'] else ' (W NOT reached)'}")
    print(f"time to precision W = {100 * width:.3g}%: reference / fast = {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "model": w.name, "layers": len(w.layers),
                                               "golden_set": len(w.golden_set), "reference": ref, "fast": fast,
                                               "ratio": ratio}, indent=2) + "\n")
    return 0 if fast["reached"] else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
