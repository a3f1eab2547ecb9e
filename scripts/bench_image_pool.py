"""What the image pool costs in interval width, and whether its intervals cover.

    .venv/bin/python scripts/bench_image_pool.py --checkpoint CKPT [CKPT ...] --out /tmp/pool \\
        --pools 64 256 1024 all --injections 1024 --seeds 0 1 2
    .venv/bin/python scripts/bench_image_pool.py --sampling stratified --checkpoint CKPT --out /tmp/pool-strat \\
        --injections 1024 --inject-args "--engine fast --clamp profile --threads 1 --target-ci 0.01"
    .venv/bin/python scripts/bench_image_pool.py --simulate --sim-seeds 400

Campaign mode runs ``inject.py neurons`` once per checkpoint and pool size K (same seed, same injections
per layer; folders under --out, so a rerun resumes or skips finished campaigns; the golden pass is
computed once per checkpoint and copied) and prints, per K, the workload (pool images, golden images hit,
faults per image hit, injections per layer), the injection time, the network-level ΔLoss with the width of
its 99% interval and that width relative to the all-image campaign, the share of the variance that is
between images, and the widths of a few layers' intervals. With ``--sampling stratified``, --injections
is each layer's cap (a --target-ci it cannot meet spends all of it).

Simulation mode checks the pooled intervals against a known truth: a population of golden images whose
per-image means differ (a log-normal image factor shared by every layer) and a heavy-tailed per-bit fault
distribution (rare large values in the high exponent bits, as ΔLoss has); each seed draws a pool of K
images and n faults per layer, and the 99% interval of each layer and of the mean over layers is checked
against the population's exact means.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import inject  # noqa: E402
from cli_shell import UserError, run_cli  # noqa: E402
from resilience.bitflip import get_format  # noqa: E402
from resilience.image_pool import (  # noqa: E402
    ImagePool,
    LayerSet,
    pool_size_arg,
    stratified_layer_set,
    uniform_layer_set,
)
from resilience.improvement_ci import layer_set  # noqa: E402
from resilience.storage import read_json  # noqa: E402
from resilience.stratified import make_strata  # noqa: E402

CONFIDENCE = 0.99


def get_args_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", default=[], help="checkpoints (one campaign per pool size each)")
    parser.add_argument("--out", default=None, metavar="DIR", help="root of the campaign folders")
    parser.add_argument("--pools", nargs="+", type=pool_arg, default=[64, 256, 1024, None], metavar="K",
                        help="pool sizes K, or all")
    parser.add_argument("--injections", type=int, default=1024, help="faults per layer")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="campaign seeds (one campaign per K each)")
    parser.add_argument("--sampling", choices=("uniform", "stratified"), default="uniform",
                        help="stratified: --injections is the cap per layer; give --target-ci in --inject-args")
    parser.add_argument("--show-layers", type=int, default=3, help="layers whose intervals are printed")
    parser.add_argument("--inject-args", default="--engine fast --clamp profile --threads 1 --no-progress",
                        help="further options of inject.py neurons")
    parser.add_argument("--simulate", action="store_true", help="coverage simulation instead of campaigns")
    parser.add_argument("--sim-seeds", type=int, default=400, help="simulated campaigns per pool size")
    parser.add_argument("--sim-images", type=int, default=4000, help="golden images of the simulated population")
    parser.add_argument("--sim-layers", type=int, default=4, help="layers of the simulated network")
    parser.add_argument("--sim-sigma", type=float, default=1.0, help="log-sd of the per-image factor")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    return parser


def pool_arg(text: str) -> int | None:
    """argparse type of ``--pools``: a pool size (as ``--image-pool``) or ``all`` (None)."""
    return None if text == "all" else pool_size_arg(text)


def run_campaign(checkpoint: str, out: Path, pool: int | None, seed: int, args: argparse.Namespace,
                 golden_from: Path | None) -> None:
    """One ``inject.py neurons`` campaign (resumed or skipped when already there)."""
    if golden_from is not None and not (out / "golden.pt").is_file():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(golden_from, out / "golden.pt")  # inject.py checks its key: the same model and images
    budget = ["--injections", str(args.injections)] if args.sampling == "uniform" else [
        "--sampling", "stratified", "--max-injections", str(args.injections)]
    argv = ["neurons", "--checkpoint", checkpoint, "--out", str(out), *budget, "--seed", str(seed),
            *args.inject_args.split()]
    if pool is not None:
        argv += ["--image-pool", str(pool)]
    code = inject.main(argv)
    if code:
        raise UserError(f"inject.py exited with {code} for {out}")


def stratified_layers(out: Path, summary: dict) -> LayerSet:
    """The layers of a finished stratified campaign folder, with their image effects when it has a pool."""
    faults = pq.read_table(out / "faults.parquet")
    names = np.asarray(faults.column("layer").to_pylist())
    strata = [s.name for s in make_strata(get_format(summary["config"]["format"]), summary["stratified"]["grouping"])]
    pool = ImagePool.from_record(read_json(out / "campaign.json"))
    by_layer = {name: faults.filter(pa.array(names == name)) for name in dict.fromkeys(names.tolist())}
    return stratified_layer_set(pool, by_layer, strata)


def campaign_figures(out: Path, show: int) -> dict:
    """Workload, time and intervals of a finished campaign folder."""
    summary = read_json(out / "summary.json")
    image = pq.read_table(out / "faults.parquet", columns=["image"]).column("image").to_numpy()
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    layers = stratified_layers(out, summary) if "stratified" in summary else layer_set(out)
    network = layers.mean()
    low, high = network.interval(CONFIDENCE)
    within = layers.given_pool().mean()
    names = list(layers.within)
    picks = [names[round(i * (len(names) - 1) / max(1, show - 1))] for i in range(show)] if show else []
    return {
        "pool": summary.get("image_pool", {}).get("size"),
        "golden_set": summary["golden"]["golden_set_size"],
        "images_hit": int(len(np.unique(image))),
        "faults": int(len(image)),
        "faults_per_image": len(image) / len(np.unique(image)),
        "injections_per_layer": float(np.mean(list(summary["n_per_layer"].values()))),
        "layers": len(names),
        "injection_seconds": sum(r["injection_seconds"] for r in runs),
        "delta_loss": network.value,
        "width": high - low,
        "between_share": 1 - within.variance / network.variance if network.variance > 0 else 0.0,
        "layer_widths": {n: float(np.subtract(*layers.layer(n).interval(CONFIDENCE)[::-1])) for n in picks},
    }


def print_campaigns(name: str, rows: Sequence[dict], seeds: int) -> None:
    """One line per K: figures averaged over the seeds (widths as the mean width)."""
    by_pool: dict[int | None, list[dict]] = {}
    for r in rows:
        by_pool.setdefault(r["pool"], []).append(r)
    base = by_pool.get(None, rows)
    base_width = float(np.mean([r["width"] for r in base]))
    first = base[0]
    print(f"\n{name}: {first['layers']} layers x {first['injections_per_layer']:.0f} injections per layer, golden set "
          f"{first['golden_set']}, {seeds} seed(s) per K (figures are means over them)")
    head = (f"{'K':>6} {'images hit':>10} {'faults/img':>10} {'inject s':>9} {'net ΔLoss':>10} {'99% width':>10} "
            f"{'x all':>6} {'between':>8} {'1/√(1-b)':>8}  " + "  ".join(f"{n:>14}" for n in first["layer_widths"]))
    print(head + "\n" + "-" * len(head))
    for pool, group in by_pool.items():
        mean = {key: float(np.mean([r[key] for r in group])) for key in
                ("images_hit", "faults_per_image", "injection_seconds", "delta_loss", "width", "between_share")}
        widths = [float(np.mean([r["layer_widths"][n] for r in group])) for n in first["layer_widths"]]
        print(f"{pool or 'all':>6} {mean['images_hit']:>10.0f} {mean['faults_per_image']:>10.2f} "
              f"{mean['injection_seconds']:>9.1f} {mean['delta_loss']:>10.4g} {mean['width']:>10.3g} "
              f"{mean['width'] / base_width:>6.2f} {100 * mean['between_share']:>7.1f}% "
              f"{1 / np.sqrt(1 - mean['between_share']):>8.2f}  " + "  ".join(f"{w:>14.3g}" for w in widths))


def campaigns(args: argparse.Namespace) -> dict:
    """Campaign mode: one campaign per checkpoint, seed and K; prints and returns their figures."""
    if not args.checkpoint or not args.out:
        raise UserError("give --checkpoint and --out (or --simulate)")
    missing = [c for c in args.checkpoint if not Path(c).is_file()]
    if missing:
        raise UserError(f"checkpoint not found: {', '.join(missing)}")
    pools = args.pools
    results = {}
    for index, checkpoint in enumerate(args.checkpoint):
        root = Path(args.out) / f"{index}-{Path(checkpoint).parent.name}"
        rows, golden = [], None
        for seed in args.seeds:
            for pool in pools:
                out = root / f"K{pool or 'all'}-seed{seed}"
                run_campaign(checkpoint, out, pool, seed, args, golden)
                golden = golden or out / "golden.pt"
                rows.append(campaign_figures(out, args.show_layers))
        print_campaigns(checkpoint, rows, len(args.seeds))
        results[checkpoint] = rows
    return results


# ------------------------------------------------------------------------------------------ simulation

BITS = 32


def population(args: argparse.Namespace, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-image factors a_i, per-layer scales, per-bit probabilities p_b and sizes L_b of the large value."""
    factor = rng.lognormal(0.0, args.sim_sigma, args.sim_images)
    scale = rng.uniform(0.5, 2.0, args.sim_layers)
    p = np.full(BITS, 0.0)
    p[23:30] = np.linspace(0.002, 0.05, 7)
    p[30], p[31] = 0.5, 0.2
    large = np.where(np.arange(BITS) >= 23, 10.0 ** np.linspace(0, 3, BITS), 0.0)
    return factor, scale, p, large


def simulate(args: argparse.Namespace) -> dict:
    """Simulation mode: coverage and bias of the pooled intervals per K against the population's exact means."""
    pools = [min(p or args.sim_images, args.sim_images) for p in args.pools]
    rng = np.random.default_rng(12345)
    factor, scale, p, large = population(args, rng)
    small = 1e-4
    bit_means = p * large + (1 - p) * small  # ΔLoss = a_i · scale_l · (large w.p. p_b, else small)
    truth = factor.mean() * scale * bit_means.mean()
    print(f"simulated population: {args.sim_images} images (log-sd {args.sim_sigma} image factor), "
          f"{args.sim_layers} layers, {args.injections} faults per layer, {args.sim_seeds} seeds per K")
    print(f"{'K':>6} {'layer coverage':>15} {'network coverage':>17} {'network rel. bias':>18} {'between share':>14}")
    results = {}
    for k in pools:
        covered_layers, covered_net, rel_err, share = 0, 0, [], []
        for seed in range(args.sim_seeds):
            g = np.random.default_rng([seed, k])
            images = np.sort(g.choice(args.sim_images, size=k, replace=False))
            pool = ImagePool(images, args.sim_images) if k < args.sim_images else None
            tables = []
            for layer in range(args.sim_layers):
                image = images[g.integers(0, k, args.injections)]
                bit = g.integers(0, BITS, args.injections)
                hit = g.random(args.injections) < p[bit]
                value = factor[image] * scale[layer] * np.where(hit, large[bit], small)
                tables.append(pa.table({"layer": [f"l{layer}"] * args.injections, "delta_loss": value,
                                        "finite": np.ones(args.injections, dtype=bool), "bit": bit, "image": image}))
            layers = uniform_layer_set(pa.concat_tables(tables), BITS, pool)
            for layer, name in enumerate(layers.within):
                low, high = layers.layer(name).interval(CONFIDENCE)
                covered_layers += low <= truth[layer] <= high
            net = layers.mean()
            low, high = net.interval(CONFIDENCE)
            covered_net += low <= truth.mean() <= high
            rel_err.append(net.value / truth.mean() - 1)
            share.append(1 - layers.given_pool().mean().variance / net.variance if net.variance > 0 else 0.0)
        bias, se = float(np.mean(rel_err)), float(np.std(rel_err, ddof=1) / np.sqrt(len(rel_err)))
        row = {"layer_coverage": covered_layers / (args.sim_seeds * args.sim_layers),
               "network_coverage": covered_net / args.sim_seeds, "relative_bias": bias, "bias_se": se,
               "between_share": float(np.mean(share))}
        results[k] = row
        print(f"{k if k < args.sim_images else 'all':>6} {100 * row['layer_coverage']:>14.1f}% "
              f"{100 * row['network_coverage']:>16.1f}% {100 * bias:>+10.2f}% ± {100 * se:.2f} "
              f"{100 * row['between_share']:>13.1f}%")
    return {"truth": truth.tolist(), "pools": results}


def main(argv: list[str] | None = None) -> int:
    """Run the campaigns or the simulation the command line asks for."""
    args = get_args_parser().parse_args(argv)
    if args.injections < 2 or args.sim_seeds < 2 or args.sim_images < 2 or args.sim_layers < 1:
        raise UserError("--injections, --sim-seeds and --sim-images must be at least 2, --sim-layers at least 1")
    results = simulate(args) if args.simulate else campaigns(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
