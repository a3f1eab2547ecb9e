"""Stratified against uniform sampling: injections and wall time per layer to reach the same precision.

    .venv/bin/python scripts/bench_stratified.py --checkpoint runs/strat_linear/checkpoint.pth \\
        --checkpoint runs/strat_text/checkpoint.pth --target-ci 0.1 --max-images 2000 --out runs/bench_stratified

Per checkpoint, two campaigns run through ``inject.py`` on the same engine, one after the other: the
stratified one (``--sampling stratified``) until each layer's 99% CI half-width of the mean ΔLoss is at
most ``--target-ci`` x the mean, and the paper's uniform one with ``--uniform-cap`` injections per layer.
The first k faults of a uniform campaign are the campaign of k faults, so the uniform figures at the
target are those of its first multiple of ``--step`` faults that reaches it, with its layer's wall time
prorated; where the cap comes first, the injections it would need are extrapolated from its observed
variance, (z·s/h)²·n/finite, and so is its wall time. Both campaign folders are resumable, and the
uniform one (``OUT/<checkpoint folder>/uniform``) is shared by runs with other targets
(``.../stratified-ci<REL>``). Prints per-layer tables, totals (saving factors) and the agreement of the
two estimates; writes ``bench-ci<REL>.json`` and ``report-ci<REL>.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import inject  # noqa: E402
from cli_shell import run_cli  # noqa: E402
from resilience import stratified as st  # noqa: E402
from resilience.campaign import CampaignError  # noqa: E402
from resilience.engines import ENGINES  # noqa: E402
from resilience.metrics import CONFIDENCE  # noqa: E402
from resilience.sampling import z_value  # noqa: E402
from resilience.storage import write_json, write_text  # noqa: E402
from resilience.stratified_campaign import outcomes_of  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    """Options of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, help="repeat for several models")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--target-ci", type=float, default=0.1, metavar="REL")
    parser.add_argument("--uniform-cap", type=int, default=4096, metavar="N")
    parser.add_argument("--step", type=int, default=256, metavar="N",
                        help="uniform checks its CI every N faults (also its chunk size)")
    parser.add_argument("--max-injections", type=int, default=65536, metavar="N", help="stratified cap")
    parser.add_argument("--pilot", type=int, default=16)
    parser.add_argument("--defensive", type=float, default=0.1)
    parser.add_argument("--strata", choices=st.GROUPINGS, default="bit")
    parser.add_argument("--engine", choices=tuple(sorted(ENGINES)), default="reference")
    parser.add_argument("--clamp", choices=("none", "profile"), default="none")
    parser.add_argument("--layers", default=None, metavar="REGEX")
    parser.add_argument("--max-images", type=int, default=None, metavar="K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run_campaigns(checkpoint: str, out: Path, opts: argparse.Namespace) -> tuple[Path, Path]:
    """The stratified and the uniform campaign of ``checkpoint`` (run, resumed or already complete)."""
    common = ["--checkpoint", checkpoint, "--seed", str(opts.seed), "--device", "cpu", "-j", "0",
              "--engine", opts.engine, "--clamp", opts.clamp, "--batch-size", str(opts.batch_size),
              "--chunk-size", str(opts.step)]
    for name in ("max_images", "layers", "threads"):
        if getattr(opts, name) is not None:
            common += [f"--{name.replace('_', '-')}", str(getattr(opts, name))]
    if opts.no_progress:
        common.append("--no-progress")
    stratified, uniform = out / f"stratified-ci{opts.target_ci:g}", out / "uniform"
    runs = [
        [*common, "--out", str(stratified), "--sampling", "stratified", "--target-ci", str(opts.target_ci),
         "--max-injections", str(opts.max_injections), "--pilot", str(opts.pilot), "--defensive", str(opts.defensive),
         "--strata", opts.strata],
        [*common, "--out", str(uniform), "--injections", str(opts.uniform_cap)],
    ]
    for argv in runs:
        if inject.main(["neurons", *argv]) != 0:
            raise CampaignError(f"inject.py neurons {' '.join(argv)} failed")
    return stratified, uniform


def layer_seconds(folder: Path) -> dict[str, float]:
    """Injection wall time per layer, summed over the invocations logged in runs.jsonl."""
    total: dict[str, float] = {}
    for line in (folder / "runs.jsonl").read_text().splitlines():
        for name, seconds in json.loads(line).get("layer_seconds", {}).items():
            total[name] = total.get(name, 0.0) + seconds
    return total


def compare(stratified: Path, uniform: Path, target: float, step: int) -> list[dict[str, Any]]:
    """Per layer: the stratified figures, the uniform campaign stopped at the target, their agreement."""
    s_rows = pd.read_csv(stratified / "layers.csv").to_dict("records")
    s_seconds, u_seconds = layer_seconds(stratified), layer_seconds(uniform)
    faults = pq.read_table(uniform / "faults.parquet")
    layer_col = faults.column("layer").to_numpy(zero_copy_only=False)
    z = z_value(CONFIDENCE)
    rows = []
    for s in s_rows:
        name = s["layer"]
        layer_faults = faults.filter(layer_col == name)
        u = st.uniform_to_target(outcomes_of(layer_faults), target, step, CONFIDENCE)
        per_fault = u_seconds[name] / layer_faults.num_rows
        s_half, u_mean = s["ci_half_width"], u.stats.mean_delta_loss
        diff_sd = math.hypot(s_half / z, u.half_width / z)
        rows.append({
            "layer": name, "neurons": s["neurons"],
            "s_n": s["n"], "s_rounds": s["rounds"], "s_stop": s["stop_reason"], "s_seconds": s_seconds[name],
            "s_mean": s["mean_delta_loss"], "s_half": s_half, "s_rel": s["ci_rel_half_width"],
            "s_mismatch": s["mismatch_rate"], "s_non_finite": s["non_finite"],
            "s_uniform_equivalent_n": s["uniform_equivalent_n"],
            "u_n": u.n, "u_reached": u.reached, "u_seconds": per_fault * u.n, "u_mean": u_mean,
            "u_half": u.half_width, "u_rel": u.half_width / abs(u_mean), "u_mismatch": u.stats.mismatch_rate,
            "u_non_finite": u.stats.non_finite, "u_needed_n": u.needed_n, "u_seconds_needed": per_fault * u.needed_n,
            "saving_n": u.needed_n / s["n"], "saving_seconds": per_fault * u.needed_n / s_seconds[name],
            "overlap": bool(s["ci_low"] <= u_mean + u.half_width and u_mean - u.half_width <= s["ci_high"]),
            "z_diff": abs(s["mean_delta_loss"] - u_mean) / diff_sd if diff_sd else math.nan,
        })
    return rows


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
        "below_5x": [r["layer"] for r in rows if not r["saving_n"] >= 5],
        "disagree": [r["layer"] for r in rows if not r["overlap"]],
        "z_diff_above_2.58": [r["layer"] for r in rows if r["z_diff"] > z_value(CONFIDENCE)],
    }


def totals_text(total: dict[str, Any]) -> str:
    """The totals and the layers that miss a goal, as two lines."""
    return (
        f"Total over {total['layers']} layers: stratified {total['s_n']} injections in {total['s_seconds']:.0f} s; "
        f"uniform needs {total['u_needed_n']:.0f} injections, {total['u_seconds_needed']:.0f} s (ran {total['u_n_run']} "
        f"in {total['u_seconds_run']:.0f} s). Saving: {total['saving_n']:.1f}x injections, "
        f"{total['saving_seconds']:.1f}x wall time.\n"
        f"Stratified stopped at its cap: {total['s_target_missed'] or 'none'}; uniform reached the target: "
        f"{total['u_reached'] or 'none'}; layers below 5x: {total['below_5x'] or 'none'}; "
        f"CIs not overlapping: {total['disagree'] or 'none'}; |z| of the difference > 2.58: "
        f"{total['z_diff_above_2.58'] or 'none'}.\n"
    )


def markdown(title: str, rows: list[dict[str, Any]], total: dict[str, Any], target: float) -> str:
    """Per-layer table and totals."""
    lines = [
        f"## {title}", "",
        f"Target: 99% CI half-width ≤ {100 * target:g}% of the mean ΔLoss. Uniform: its first faults up to the "
        "target or the cap; past the cap, n and time extrapolated from its observed variance (marked ~).", "",
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
    """Run (or resume) both campaigns of every checkpoint and write the comparison."""
    out = Path(opts.out)
    report, results = [f"# Stratified vs uniform sampling (engine {opts.engine}, seed {opts.seed})", ""], {}
    for checkpoint in opts.checkpoint:
        tag = Path(checkpoint).resolve().parent.name
        stratified, uniform = run_campaigns(checkpoint, out / tag, opts)
        rows = compare(stratified, uniform, opts.target_ci, opts.step)
        total = totals(rows)
        results[tag] = {"rows": rows, "total": total}
        report.append(markdown(tag, rows, total, opts.target_ci))
    grand = totals([r for v in results.values() for r in v["rows"]])
    report += ["## All models", "", totals_text(grand)]
    write_json(out / f"bench-ci{opts.target_ci:g}.json", {"args": vars(opts), "models": results, "total": grand})
    write_text(out / f"report-ci{opts.target_ci:g}.md", "\n".join(report))
    print("\n".join(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(get_args_parser().parse_args())))
