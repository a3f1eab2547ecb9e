"""Stratified against uniform sampling: injections and wall time per layer to reach the same precision.

    .venv/bin/python scripts/bench_stratified.py --checkpoint runs/fm_resnet20_linear/checkpoint.pth \\
        --checkpoint runs/fm_resnet20_text/checkpoint.pth --target-ci 0.1 --out runs/bench_stratified

For every layer, the stratified sampler runs until the 99% CI half-width of the mean ΔLoss is at most
``--target-ci`` x the mean (a stratified campaign folder per checkpoint, resumable); then the uniform
campaign's own faults of that layer run chunk by chunk until the same target or ``--uniform-cap``
injections. When uniform stops at the cap, the injections it would need are extrapolated from its
observed variance, (z·s/h)²·n/finite, and so is its wall time. Both use the same engine object, layer
after layer, so they share the machine's conditions. Prints per-layer tables, totals (saving factors)
and the agreement check; writes ``bench.json`` and ``report.md`` into --out.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import inject  # noqa: E402
from resilience import stratified as st  # noqa: E402
from resilience.bitflip import get_format  # noqa: E402
from resilience.campaign import CampaignConfig, CampaignError  # noqa: E402
from resilience.engines import ENGINES  # noqa: E402
from resilience.golden import EvaluatedImages, evaluated_ids, golden_pass, iterate_split  # noqa: E402
from resilience.layers import discover_layers  # noqa: E402
from resilience.metrics import CONFIDENCE  # noqa: E402
from resilience.profile import cached_profile, profile_max_abs  # noqa: E402
from resilience.sampling import z_value  # noqa: E402
from resilience.storage import read_json, write_json, write_text  # noqa: E402
from resilience.stratified_campaign import (  # noqa: E402
    StratifiedCampaign,
    assemble_stratified,
    open_stratified_campaign,
    run_uniform_to_target,
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, help="repeat for several models")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--target-ci", type=float, default=0.1, metavar="REL")
    parser.add_argument("--uniform-cap", type=int, default=4096, metavar="N")
    parser.add_argument("--max-injections", type=int, default=65536, metavar="N", help="stratified cap")
    parser.add_argument("--pilot", type=int, default=16)
    parser.add_argument("--defensive", type=float, default=0.1)
    parser.add_argument("--strata", choices=st.GROUPINGS, default="bit")
    parser.add_argument("--engine", default="auto", help="auto: fast when registered, else reference")
    parser.add_argument("--clamp", choices=("none", "profile"), default="none")
    parser.add_argument("--layers", default=None, metavar="REGEX")
    parser.add_argument("--max-images", type=int, default=None, metavar="K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=256, help="uniform checks its CI every chunk")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def open_campaign(checkpoint: str, out: Path, opts: argparse.Namespace) -> StratifiedCampaign:
    """Model, golden pass and layer plan of one checkpoint (inject.py's helpers), as a stratified campaign."""
    import data

    argv = ["--checkpoint", checkpoint, "--out", str(out), "--seed", str(opts.seed), "--device", "cpu",
            "--clamp", opts.clamp, "--batch-size", str(opts.batch_size), "--workers", "0"]
    args = inject.get_args_parser().parse_args(argv + (["--max-images", str(opts.max_images)] if opts.max_images else []))
    model, meta = inject.load_model(args)
    dataset_name, preset = inject.resolve_dataset(args, meta)
    fmt = get_format(args.format)
    model.to(dtype=fmt.dtype).eval()
    dataset = data.build_dataset(dataset_name, "test", preset=preset)
    ids = evaluated_ids(len(dataset), args.max_images)
    images = EvaluatedImages(dataset, ids, memory_limit=inject.IN_MEMORY_LIMIT)
    golden = golden_pass(model, ids, images.batches(inject.GOLDEN_BATCH), fmt, "cpu")
    layers = discover_layers(model, images.images(ids[:1]))
    clamp_max = None
    if opts.clamp == "profile":
        train = data.build_dataset(dataset_name, "train", preset=preset)
        train_ids = evaluated_ids(len(train), args.profile_images)
        key = {"checkpoint_sha256": meta.get("checkpoint_sha256"), "fused_text_head": False, "dataset": dataset_name,
               "preset": preset, "format": args.format, "images": len(train_ids), "device": "cpu"}
        clamp_max = cached_profile(Path.home() / ".cache/text-guided-resilience/profiles", key, lambda: profile_max_abs(
            model, layers, (x for x, _ in iterate_split(train, train_ids, inject.GOLDEN_BATCH)), fmt, "cpu"))
    config = CampaignConfig(
        model=meta["model"], dataset=dataset_name, checkpoint_sha256=meta.get("checkpoint_sha256"), preset=preset,
        seed=opts.seed, golden=args.golden, max_images=args.max_images, layers=opts.layers, format=args.format,
        clamp=opts.clamp, profile_images=args.profile_images if opts.clamp == "profile" else None,
        engine=opts.engine, batch_size=opts.batch_size, chunk_size=opts.chunk_size, device="cpu",
    )
    adaptive = st.AdaptiveConfig(target_rel=opts.target_ci, max_injections=opts.max_injections, pilot=opts.pilot,
                                 defensive=opts.defensive)
    print(f"{checkpoint}: {meta['model']} ({meta.get('head')} head) on {dataset_name}, accuracy "
          f"{100 * golden.accuracy:.2f}%, golden set {len(golden.golden_set())}, {len(layers)} layers, "
          f"engine {opts.engine}", flush=True)
    return open_stratified_campaign(
        out, config, adaptive, model, layers, golden, images, grouping=opts.strata, clamp_max=clamp_max,
        provenance={"checkpoint": str(Path(checkpoint).resolve()), "head": meta.get("head")},
    )


def compare_layer(campaign: StratifiedCampaign, position: int, opts: argparse.Namespace) -> dict[str, Any]:
    """Stratified, then uniform, on one layer; the figures of both and their agreement."""
    plan = campaign.plans[position]
    progress = not opts.no_progress
    s, loaded = campaign.run_layer(position, progress=progress, desc=f"stratified {plan.name}")
    u = run_uniform_to_target(campaign.engine, campaign.config, plan, campaign.golden, campaign.source,
                              opts.target_ci, opts.uniform_cap)
    z = z_value(CONFIDENCE)
    u_mean, u_half = u.stats.mean_delta_loss, u.half_width
    u_seconds_needed = u.seconds / u.n * u.needed_n
    diff_sd = math.hypot(s.loss.half_width / z, u_half / z)
    return {
        "layer": plan.name, "neurons": plan.neurons,
        "s_n": s.n, "s_rounds": s.rounds, "s_stop": s.stop_reason, "s_seconds": s.seconds, "s_resumed": loaded > 0,
        "s_mean": s.loss.value, "s_half": s.loss.half_width, "s_rel": s.loss.half_width / abs(s.loss.value),
        "s_mismatch": s.mismatch.value, "s_mismatch_half": s.mismatch.half_width, "s_non_finite": s.non_finite,
        "s_uniform_equivalent_n": s.uniform_equivalent_n,
        "u_n": u.n, "u_reached": u.reached, "u_seconds": u.seconds, "u_mean": u_mean, "u_half": u_half,
        "u_rel": u_half / abs(u_mean), "u_mismatch": u.stats.mismatch_rate, "u_non_finite": u.stats.non_finite,
        "u_needed_n": u.needed_n, "u_seconds_needed": u_seconds_needed,
        "saving_n": u.needed_n / s.n, "saving_seconds": u_seconds_needed / s.seconds if s.seconds else math.nan,
        "overlap": s.loss.low <= u_mean + u_half and u_mean - u_half <= s.loss.high,
        "z_diff": abs(s.loss.value - u_mean) / diff_sd if diff_sd else math.nan,
    }


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Sums over layers and the overall saving factors."""
    s_n, u_n = sum(r["s_n"] for r in rows), sum(r["u_needed_n"] for r in rows)
    s_t, u_t = sum(r["s_seconds"] for r in rows), sum(r["u_seconds_needed"] for r in rows)
    return {
        "layers": len(rows), "s_n": s_n, "u_needed_n": u_n, "saving_n": u_n / s_n,
        "s_seconds": s_t, "u_seconds_needed": u_t, "saving_seconds": u_t / s_t if s_t else math.nan,
        "u_n_run": sum(r["u_n"] for r in rows), "u_seconds_run": sum(r["u_seconds"] for r in rows),
        "s_target_missed": [r["layer"] for r in rows if r["s_stop"] != "target"],
        "u_reached": [r["layer"] for r in rows if r["u_reached"]],
        "below_5x": [r["layer"] for r in rows if r["saving_n"] < 5],
        "disagree": [r["layer"] for r in rows if not r["overlap"]],
        "z_diff_above_2.58": [r["layer"] for r in rows if r["z_diff"] > 2.576],
    }


def totals_text(total: dict[str, Any]) -> str:
    """The totals and the layers that miss a goal, as two lines."""
    return (
        f"Total over {total['layers']} layers: stratified {total['s_n']} injections in {total['s_seconds']:.0f} s; "
        f"uniform needs {total['u_needed_n']:.0f} injections, {total['u_seconds_needed']:.0f} s (ran {total['u_n_run']} "
        f"in {total['u_seconds_run']:.0f} s). Saving: {total['saving_n']:.1f}x injections, "
        f"{total['saving_seconds']:.1f}x wall time.\n"
        f"Stratified missed the target (cap): {total['s_target_missed'] or 'none'}; uniform reached it: "
        f"{total['u_reached'] or 'none'}; layers below 5x: {total['below_5x'] or 'none'}; "
        f"CIs not overlapping: {total['disagree'] or 'none'}.\n"
    )


def markdown(title: str, rows: list[dict[str, Any]], total: dict[str, Any], target: float) -> str:
    """Per-layer table and totals."""
    lines = [
        f"## {title}", "",
        f"Target: 99% CI half-width ≤ {100 * target:g}% of the mean ΔLoss. Uniform: measured up to the cap, "
        "then n and time extrapolated from its observed variance (marked ~).", "",
        "| layer | strat. n | strat. s | strat. mean ΔLoss ± half | ± % | unif. n run | unif. mean ΔLoss ± half | ± % "
        "| unif. n needed | unif. s needed | saving (n) | saving (s) | CIs overlap | z |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for r in rows:
        approx = "" if r["u_reached"] else "~"
        lines.append(
            f"| `{r['layer']}` | {r['s_n']} | {r['s_seconds']:.1f} | {r['s_mean']:.4g} ± {r['s_half']:.2g} "
            f"| {100 * r['s_rel']:.1f} | {r['u_n']} | {r['u_mean']:.4g} ± {r['u_half']:.2g} | {100 * r['u_rel']:.1f} "
            f"| {approx}{r['u_needed_n']:.0f} | {approx}{r['u_seconds_needed']:.1f} | {r['saving_n']:.1f}x "
            f"| {r['saving_seconds']:.1f}x | {'yes' if r['overlap'] else 'NO'} | {r['z_diff']:.2f} |"
        )
    lines += ["", totals_text(total)]
    return "\n".join(lines)


def main(opts: argparse.Namespace) -> int:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.engine == "auto":
        opts.engine = "fast" if "fast" in ENGINES else "reference"
    out = Path(opts.out)
    report, results = [f"# Stratified vs uniform sampling (engine {opts.engine}, seed {opts.seed})", ""], {}
    for checkpoint in opts.checkpoint:
        tag = Path(checkpoint).resolve().parent.name
        campaign = open_campaign(checkpoint, out / tag / "stratified", opts)
        rows = []
        for position, plan in enumerate(campaign.plans):
            done = out / tag / "compare" / f"{position:04d}.json"
            row = read_json(done) if done.is_file() else compare_layer(campaign, position, opts)
            write_json(done, row)
            print(f"{tag} {plan.name}: stratified n={row['s_n']} ({row['s_seconds']:.1f} s, ±{100 * row['s_rel']:.1f}%), "
                  f"uniform needs {row['u_needed_n']:.0f} ({row['u_seconds_needed']:.1f} s): {row['saving_n']:.1f}x; "
                  f"overlap {row['overlap']}", flush=True)
            rows.append(row)
        assemble_stratified(out / tag / "stratified")
        total = totals(rows)
        results[tag] = {"rows": rows, "total": total}
        report.append(markdown(tag, rows, total, opts.target_ci))
    grand = totals([r for v in results.values() for r in v["rows"]])
    report += ["## All models", "", totals_text(grand)]
    write_json(out / "bench.json", {"args": vars(opts), "models": results, "total": grand})
    write_text(out / "report.md", "\n".join(report))
    print("\n".join(report), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except (CampaignError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
