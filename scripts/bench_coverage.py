"""Bias and 99%-interval coverage of the uniform and stratified estimators over many seeds.

    .venv/bin/python scripts/bench_coverage.py --seeds 500 --out runs/coverage.md
    .venv/bin/python scripts/bench_coverage.py --campaign runs/fi_linear --campaign runs/fi_text --layers 'fc|head'

Populations: the synthetic one of ``resilience.interval_coverage.synthetic_population`` (always), and every
layer of each ``--campaign`` folder (a finished uniform campaign whose faults are taken as the ground-truth
population and resampled with replacement; ``--layers`` picks layers by regular expression). Per
population: the uniform campaign at each ``--uniform-n`` (normal and skewness-corrected intervals), the
stratified one at each fixed ``--budget`` and run adaptively to ``--target-ci`` (campaign layers: those
``--stratified-layers`` picks). A campaign of several layers also gets one row per estimator over its
layers (lowest and median coverage), and every population with an adaptive row the injections a uniform
campaign would need for the same median interval width (the saving). Then the network level (mean over
layers) and the improvement ratio of two models under uniform sampling: synthetic layers, or the layers
of the first two campaigns (``--network-only``: these rows alone). Prints Markdown rows as they finish;
``--out`` also writes them.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli_shell import UserError, run_cli  # noqa: E402
from resilience import interval_coverage as ic  # noqa: E402
from resilience.storage import write_text  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    """Options of the coverage benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, default=500, help="runs per estimator (seeds 0..N-1)")
    parser.add_argument("--uniform-n", type=int, nargs="+", default=[1024, 4096], metavar="N")
    parser.add_argument("--budget", type=int, nargs="+", default=[1300, 2600], metavar="N",
                        help="fixed stratified budgets per layer")
    parser.add_argument("--target-ci", type=float, default=0.1, metavar="REL")
    parser.add_argument("--cap", type=int, default=65536, help="cap of the adaptive stratified runs")
    parser.add_argument("--pilot", type=int, default=16)
    parser.add_argument("--campaign", action="append", default=[], metavar="DIR",
                        help="finished uniform campaign whose layers serve as populations (repeatable)")
    parser.add_argument("--layers", default=None, metavar="REGEX", help="campaign layers to use (default all)")
    parser.add_argument("--stratified-layers", default=None, metavar="REGEX",
                        help="campaign layers that also get the stratified rows (default all; they cost most)")
    parser.add_argument("--network-layers", type=int, default=4, help="synthetic layers per model")
    parser.add_argument("--no-synthetic", action="store_true",
                        help="campaign populations only (and no network rows unless two campaigns are given)")
    parser.add_argument("--network-only", action="store_true",
                        help="only the network level and improvement ratio of the first two campaigns")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the rows here (Markdown)")
    return parser


def regex(pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled, or a usage error naming it."""
    try:
        return re.compile(pattern)
    except re.error as err:
        raise UserError(f"bad regular expression {pattern!r}: {err}") from None


def campaign_populations(folder: str, pattern: str | None) -> list[ic.Population]:
    """The chosen layers of one campaign folder as populations."""
    if not (Path(folder) / "faults.parquet").is_file():
        raise UserError(f"{folder} has no faults.parquet (a finished uniform campaign is needed)")
    chosen = regex(pattern or "")
    names = [n for n in ic.campaign_layers(Path(folder)) if chosen.search(n)]
    if not names:
        raise UserError(f"{folder}: no layer matches {pattern!r}")
    return [ic.campaign_population(Path(folder), name) for name in names]


def saving_lines(rows: dict[str, list[ic.Coverage]], n: int, echo: Callable[[str], None]) -> None:
    """Per population with an adaptive stratified row: the uniform injections for its precision (from the
    spread of the post-stratified uniform estimates at ``n``) and the saving; then the total over them."""
    found = [(name, r[-1], next(u for u in r if u.label.endswith(f"uniform n={n}, post-stratified Hall")))
             for name, r in rows.items() if "cap" in r[-1].label]
    if not found:
        return
    echo(f"# saving at equal precision: spread of the uniform n = {n} post-stratified estimates against adaptive stratified")
    echo("| population | stratified mean injections | its sd | uniform sd at n | uniform injections needed | saving |\n"
         "|---|---:|---:|---:|---:|---:|")
    needed = [ic.equal_precision_injections(u, n, a) for _, a, u in found]
    for (name, a, u), need in zip(found, needed, strict=True):
        echo(f"| {name} | {a.mean_n:,.0f} | {100 * a.rel_sd:.2f}% | {100 * u.rel_sd:.2f}% | {need:,.0f} "
             f"| {need / a.mean_n:.1f}× |")
    total = sum(a.mean_n for _, a, _ in found)
    echo(f"| all {len(found)} | {total:,.0f} | | | {sum(needed):,.0f} | {sum(needed) / total:.1f}× |")


def layer_rows(models: list[list[ic.Population]], opts: argparse.Namespace, echo: Callable[[str], None]) -> None:
    """The rows of every single population, the summaries over each campaign's layers and the savings."""
    synthetic = [] if opts.no_synthetic else [ic.synthetic_population()]
    names = {p.name for m in models for p in m}
    stratified = regex(opts.stratified_layers or "")
    rows = ic.report([*synthetic, *(p for m in models for p in m)], range(opts.seeds), opts.uniform_n, opts.budget,
                     opts.target_ci, opts.cap, opts.pilot, echo,
                     lambda p: p.name not in names or bool(stratified.search(p.name.split(":", 1)[1])))
    for folder, model in zip(opts.campaign, models, strict=True):
        if len(model) > 1:
            echo(f"# over the layers of {folder}")
            echo(ic.ACROSS_HEADER)
            for line in ic.across_layers(Path(folder).name, {p.name: rows[p.name] for p in model}):
                echo(line)
    saving_lines(rows, max(opts.uniform_n), echo)


def main(opts: argparse.Namespace) -> int:
    """Run every simulation and print (and write) the table."""
    if opts.seeds < 2 or opts.target_ci <= 0 or min(opts.uniform_n + opts.budget) < 2 or opts.network_layers < 1:
        raise UserError("need --seeds >= 2, --target-ci > 0, budgets and --uniform-n >= 2, --network-layers >= 1")
    if opts.network_only and len(opts.campaign) < 2:
        raise UserError("--network-only needs two --campaign folders (baseline, then text)")
    models = [campaign_populations(folder, opts.layers) for folder in opts.campaign]
    lines: list[str] = []

    def echo(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    seeds = range(opts.seeds)
    echo(ic.HEADER)
    if not opts.network_only:
        layer_rows(models, opts, echo)
    if len(models) >= 2:
        base, text = models[0], models[1]
    elif opts.no_synthetic:
        base = text = []
    else:
        base = [ic.synthetic_population(seed=i, per_bit=5000, name=f"base{i}") for i in range(opts.network_layers)]
        text = [ic.synthetic_population(seed=100 + i, per_bit=5000).scaled(0.25, f"text{i}")
                for i in range(opts.network_layers)]
    if base and text:
        echo(f"# network level and improvement ratio: {len(base)} + {len(text)} layers")
        for n in opts.uniform_n:
            for row in ic.simulate_network(base, text, n, seeds):
                echo(row.row())
    if opts.out:
        write_text(Path(opts.out), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(get_args_parser().parse_args())))
