"""Which part of the text head carries the resilience: head variants over training seeds, against and
combined with Ranger-style range restriction.

For one backbone and dataset, per training seed, the driver trains five heads — ``linear`` (the
baseline), ``cosine`` (no projection), ``projection`` (no normalisation), ``text-random`` (the text head
with random unit directions) and ``text`` (the text head with the description features) — builds the
range-restricted versions of the baseline (``ranger-linear``) and of the text model (``ranger-text``),
runs the same campaign on all seven and tabulates, per variant, accuracy, the last-layer and
network-level improvement over the baseline of the same seed (with each campaign pair's 99% interval
and the spread over seeds), the last layer's value range and Top2Diff. Every step is a command line of
this repository and resumes (:mod:`analysis.pipeline`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analysis.pipeline import Step
from resilience.figures import pyplot, save_png
from resilience.improvement_ci import has_fault_records, improvement_intervals
from resilience.report import CampaignResult, weighted_delta_loss
from resilience.storage import read_json, write_json, write_text

TRAINED = ("linear", "cosine", "projection", "text-random", "text")
RESTRICTED = {"ranger-linear": "linear", "ranger-text": "text"}  # variant -> the trained model it restricts
VARIANTS = (*TRAINED, *RESTRICTED)
BASELINE = "linear"
PRECISION_TARGET = 0.25  # the baseline's network-level interval should lie within ±25% of its estimate
DESCRIPTION = {
    "linear": "baseline: Linear(B→C)",
    "cosine": "normalised features × scale → C (no projection, no text)",
    "projection": "B→E→C, text-initialised (no normalisation, no scale)",
    "text-random": "text head, random unit directions (no text)",
    "text": "text head, description features",
    "ranger-linear": "baseline + range restriction",
    "ranger-text": "text head + range restriction",
}
SEED_COLUMNS = ("variant", "seed", "accuracy", "top2diff", "last_layers", "last_layer_delta_loss", "delta_loss",
                "last_layer_improvement", "last_layer_ci_low", "last_layer_ci_high", "overall_improvement",
                "overall_ci_low", "overall_ci_high", "baseline_network_ci_halfwidth", "last_layer_max_abs",
                "injections_per_layer")


@dataclass
class HeadsPlan:
    """What the heads experiment trains, restricts and injects, and where everything goes."""

    out: Path
    config: str  # train.py recipe
    dataset: str
    features: str  # text features file of the text and projection heads
    embed_dim: int  # its width: the random text head gets the same E
    seeds: Sequence[int] = (0, 1, 2)
    epochs: int = 1
    variants: Sequence[str] = VARIANTS
    train_args: Sequence[str] = ()
    inject_args: Sequence[str] = ()
    campaign_seed: int = 0
    profile_images: int = 1024
    data_path: str | None = None
    range_images: int | None = 2000
    steps_file: Path = field(init=False)

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown} (choose from {', '.join(VARIANTS)})")
        needed = {RESTRICTED.get(v, v) for v in self.variants} | {BASELINE}
        self.variants = [v for v in VARIANTS if v in set(self.variants) | needed]
        self.steps_file = self.out / "step_seconds.json"

    def train_dir(self, variant: str, seed: int) -> Path:
        return self.out / "train" / variant / f"seed{seed}"

    def checkpoint(self, variant: str, seed: int) -> Path:
        if variant in RESTRICTED:
            return self.out / "restricted" / f"{variant}_seed{seed}.pth"
        return self.train_dir(variant, seed) / "checkpoint.pth"

    def campaign_dir(self, variant: str, seed: int) -> Path:
        return self.out / "campaigns" / variant / f"seed{seed}"

    def data_args(self) -> list[str]:
        return ["--data-path", self.data_path] if self.data_path else []


def head_args(plan: HeadsPlan, variant: str) -> list[str]:
    """train.py options that select ``variant``'s head."""
    return {
        "linear": ["--head", "linear"],
        "cosine": ["--head", "cosine"],
        "projection": ["--head", "projection", "--text-features", plan.features],
        "text-random": ["--head", "text", "--embed-dim", str(plan.embed_dim)],
        "text": ["--head", "text", "--text-features", plan.features],
    }[variant]


def heads_steps(plan: HeadsPlan) -> list[Step]:
    """The experiment's commands, seed by seed: training, range restriction, then every campaign."""
    steps: list[Step] = []
    for seed in plan.seeds:
        for variant in (v for v in plan.variants if v in TRAINED):
            train = ["train.py", "-c", plan.config, "--dataset", plan.dataset, "--seed", str(seed),
                     "--epochs", str(plan.epochs), "--lr-per-iteration", *head_args(plan, variant),
                     "--output-dir", str(plan.train_dir(variant, seed)), "--resume", "auto",
                     *plan.data_args(), *plan.train_args]
            steps.append(Step(f"train {variant} seed {seed}", train, plan.train_dir(variant, seed) / "final_metrics.json"))
        for variant in (v for v in plan.variants if v in RESTRICTED):
            restrict = ["analyze.py", "restrict-ranges", "--checkpoint", str(plan.checkpoint(RESTRICTED[variant], seed)),
                        "--out", str(plan.checkpoint(variant, seed)), "--images", str(plan.profile_images),
                        *plan.data_args()]
            steps.append(Step(f"profile ranges {variant} seed {seed}", restrict, plan.checkpoint(variant, seed)))
        for variant in plan.variants:
            inject = ["inject.py", "neurons", "--checkpoint", str(plan.checkpoint(variant, seed)), "--dataset", plan.dataset,
                      "--seed", str(plan.campaign_seed), "--profile-images", str(plan.profile_images),
                      "--out", str(plan.campaign_dir(variant, seed)), *plan.data_args(), *plan.inject_args]
            steps.append(Step(f"campaign {variant} seed {seed}", inject, plan.campaign_dir(variant, seed) / "summary.json"))
    return steps


def record_step_seconds(plan: HeadsPlan, steps: Sequence[Step], seconds: Sequence[float]) -> dict[str, float]:
    """Keep the wall time of every step that ran now in ``step_seconds.json`` (earlier runs' times stay)."""
    stored: dict[str, float] = read_json(plan.steps_file) if plan.steps_file.is_file() else {}
    stored.update({step.title: round(s, 1) for step, s in zip(steps, seconds, strict=True) if s > 0})
    write_json(plan.steps_file, stored)
    return stored


def last_layer_range(plan: HeadsPlan, variant: str, seed: int, device: str = "cpu") -> float:
    """Max |output| of the model's final layer over ``range_images`` test images (cached per model)."""
    cache = plan.out / "ranges" / f"{variant}_seed{seed}.json"
    if cache.is_file():
        return float(read_json(cache)["max_abs"])
    import data
    import models
    from resilience.bitflip import get_format
    from resilience.golden import evaluated_ids, iterate_split
    from resilience.layers import discover_layers
    from resilience.profile import activation_ranges

    model, meta = models.load_checkpoint(plan.checkpoint(variant, seed))
    split = data.build_dataset(plan.dataset, "test", plan.data_path, preset=dict(meta["preset"]))
    ids = evaluated_ids(len(split), plan.range_images)
    last = models.last_layer_names(model)[-1]
    layers = [layer for layer in discover_layers(model, split[int(ids[0])][0][None]) if layer.name == last]
    ranges = activation_ranges(model, layers, (x for x, _ in iterate_split(split, ids, 256)), get_format("fp32"), device)
    write_json(cache, {"layer": last, "images": len(ids), "max_abs": ranges[last].max_abs})
    return ranges[last].max_abs


def _last_layer(result: CampaignResult) -> tuple[float, list[tuple[str, int]]]:
    rows = [result.layer(name) for name in result.summary["last_layers"]]
    return weighted_delta_loss(rows), [(r["layer"], r["neurons"]) for r in rows]


def seed_rows(plan: HeadsPlan) -> list[dict[str, Any]]:
    """One row per variant and seed: the model's numbers and its improvement over the same seed's baseline."""
    rows = []
    for seed in plan.seeds:
        base = CampaignResult.load(plan.campaign_dir(BASELINE, seed))
        base_last, base_layers = _last_layer(base)
        for variant in plan.variants:
            result = CampaignResult.load(plan.campaign_dir(variant, seed))
            last, last_layers = _last_layer(result)
            intervals = dict.fromkeys(("last_layer", "overall", "baseline_network"), (math.nan, math.nan))
            if has_fault_records(base.path) and has_fault_records(result.path):
                intervals = improvement_intervals(base.path, result.path, base_layers[0][0], last_layers)
            low, high = intervals["baseline_network"]
            counts = sorted(set(result.summary["n_per_layer"].values()))
            rows.append({
                "variant": variant, "seed": seed,
                "accuracy": result.summary["golden"]["accuracy"], "top2diff": result.summary["golden"]["mean_top2diff"],
                "last_layers": " + ".join(name for name, _ in last_layers),
                "last_layer_delta_loss": last, "delta_loss": result.delta_loss(),
                "last_layer_improvement": base_last / last if last else math.nan,
                "last_layer_ci_low": intervals["last_layer"][0], "last_layer_ci_high": intervals["last_layer"][1],
                "overall_improvement": base.delta_loss() / result.delta_loss() if result.delta_loss() else math.nan,
                "overall_ci_low": intervals["overall"][0], "overall_ci_high": intervals["overall"][1],
                "baseline_network_ci_halfwidth": max(high - base.delta_loss(), base.delta_loss() - low) / base.delta_loss(),
                "last_layer_max_abs": last_layer_range(plan, variant, seed),
                "injections_per_layer": f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}",
            })
    return rows


def _spread(values: Sequence[float], geometric: bool) -> tuple[float, float, float]:
    """(centre, min, max) over seeds: the geometric mean for ratios, the mean otherwise."""
    x = np.asarray(values, dtype=np.float64)
    if not len(x) or np.isnan(x).any():
        return math.nan, math.nan, math.nan
    centre = float(np.exp(np.log(x).mean())) if geometric else float(x.mean())
    return centre, float(x.min()), float(x.max())


def variant_summary(rows: Sequence[dict[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant: accuracy and Top2Diff (mean, min, max over seeds), improvements (geometric mean, min,
    max), the last layer's max |output| (mean), and how many seeds' intervals lie above 1."""
    out = []
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        summary: dict[str, Any] = {"variant": variant, "seeds": len(mine)}
        for key, geometric in (("accuracy", False), ("top2diff", False), ("last_layer_max_abs", False),
                               ("last_layer_improvement", True), ("overall_improvement", True)):
            summary[key], summary[f"{key}_min"], summary[f"{key}_max"] = _spread([r[key] for r in mine], geometric)
        for key in ("last_layer", "overall"):
            summary[f"{key}_seeds_above_1"] = sum(r[f"{key}_ci_low"] > 1 for r in mine)
            summary[f"{key}_seeds_below_1"] = sum(r[f"{key}_ci_high"] < 1 for r in mine)
        out.append(summary)
    return out


def _csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(row[k]) if isinstance(row[k], float) else row[k] for k in columns})
    return buf.getvalue()


def _g(x: float, spec: str = ".3g") -> str:
    return "n/a" if math.isnan(x) else format(x, spec)


def _range(summary: dict[str, Any], key: str, spec: str = ".3g", scale: float = 1.0) -> str:
    centre, low, high = (summary[k] * scale for k in (key, f"{key}_min", f"{key}_max"))
    if math.isnan(centre):
        return "n/a"
    return _g(centre, spec) if summary["seeds"] == 1 else f"{_g(centre, spec)} [{_g(low, spec)}, {_g(high, spec)}]"


def heads_markdown(rows: Sequence[dict[str, Any]], summaries: Sequence[dict[str, Any]], seconds: dict[str, float]) -> str:
    """The variant table (centre and [min, max] over seeds), the per-seed table with 99% intervals,
    the precision check of the baseline campaigns and the wall time of every step."""
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Per variant over {len(seeds)} training seed(s) ({', '.join(map(str, seeds))}): mean accuracy and "
             "Top2Diff, geometric-mean improvement, each with [min, max] over seeds; improvement = baseline ΔLoss / "
             "variant ΔLoss, each seed against the baseline of the same seed. \"99% CI > 1\": seeds whose "
             "within-campaign interval lies above 1 (below 1 in brackets).", "",
             "| variant | what | accuracy (%) | Top2Diff | last layer × | 99% CI > 1 | overall × | 99% CI > 1 | "
             "last layer max abs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        lines.append(
            f"| {s['variant']} | {DESCRIPTION[s['variant']]} | {_range(s, 'accuracy', '.2f', 100)} | "
            f"{_range(s, 'top2diff', '.2f')} | {_range(s, 'last_layer_improvement')} | "
            f"{s['last_layer_seeds_above_1']} ({s['last_layer_seeds_below_1']}) | {_range(s, 'overall_improvement')} | "
            f"{s['overall_seeds_above_1']} ({s['overall_seeds_below_1']}) | {_range(s, 'last_layer_max_abs')} |")
    lines += ["", "Per seed, with the 99% intervals (skewness-corrected Fieller) of each campaign pair:", "",
              "| variant | seed | accuracy (%) | last layer × [99% CI] | overall × [99% CI] | ΔLoss network | "
              "injections/layer |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['seed']} | {100 * r['accuracy']:.2f} | {_g(r['last_layer_improvement'])} "
            f"[{_g(r['last_layer_ci_low'])}, {_g(r['last_layer_ci_high'])}] | {_g(r['overall_improvement'])} "
            f"[{_g(r['overall_ci_low'])}, {_g(r['overall_ci_high'])}] | {_g(r['delta_loss'], '.4g')} | "
            f"{r['injections_per_layer']} |")
    widths = {r["seed"]: r["baseline_network_ci_halfwidth"] for r in rows if r["variant"] == BASELINE}
    wide = [seed for seed, w in widths.items() if w > PRECISION_TARGET]
    unknown = [seed for seed, w in widths.items() if math.isnan(w)]
    verdict = f" (within the ±{100 * PRECISION_TARGET:.0f}% target)."
    if wide:
        verdict = (f" — wider than ±{100 * PRECISION_TARGET:.0f}% for seed(s) {', '.join(map(str, wide))}: more "
                   "injections are needed for the stated precision.")
    elif unknown:
        verdict = " — no interval without uniform campaigns' per-fault records (faults.parquet)."
    lines += ["", "Baseline network-level ΔLoss, 99% interval half-width relative to the estimate: " + ", ".join(
        f"seed {seed} ±{100 * w:.0f}%" if not math.isnan(w) else f"seed {seed} n/a" for seed, w in widths.items())
        + verdict]
    if seconds:
        lines += ["", "Wall time per step (s): " + "; ".join(f"{title} {s:.0f}" for title, s in seconds.items()) + "."]
    return "\n".join(lines) + "\n"


def plot_improvements(rows: Sequence[dict[str, Any]], variants: Sequence[str], path: Path, title: str) -> Path:
    """Last-layer and network-level improvement per variant: one point per seed with its 99% interval."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.2), sharey=False)
    shown = [v for v in variants if v != BASELINE]
    seeds = sorted({r["seed"] for r in rows})
    for ax, key, label in ((axes[0], "last_layer", "last layer"), (axes[1], "overall", "network level")):
        for j, seed in enumerate(seeds):
            offset = (j - (len(seeds) - 1) / 2) * 0.12
            for i, variant in enumerate(shown):
                row = next(r for r in rows if r["variant"] == variant and r["seed"] == seed)
                y, low, high = row[f"{key}_improvement"], row[f"{key}_ci_low"], row[f"{key}_ci_high"]
                if not y > 0:
                    continue
                err = [[y - low], [high - y]] if low > 0 and high < math.inf else None
                ax.errorbar(i + offset, y, yerr=err, fmt="o", color=f"C{j}", markersize=4, capsize=2,
                            label=f"seed {seed}" if i == 0 else None)
        ax.axhline(1.0, color="grey", linewidth=1)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(shown, rotation=30, ha="right")
        ax.set_ylabel(f"{label} improvement (× vs baseline)")
        ax.grid(True, axis="y", which="major", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path, dpi=120)


def write_heads_report(plan: HeadsPlan) -> list[dict[str, Any]]:
    """heads_seeds.csv, heads.csv, heads.md and heads.png in ``plan.out``; returns the per-variant summaries."""
    rows = seed_rows(plan)
    summaries = variant_summary(rows, plan.variants)
    seconds = read_json(plan.steps_file) if plan.steps_file.is_file() else {}
    write_text(plan.out / "heads_seeds.csv", _csv(rows, SEED_COLUMNS))
    write_text(plan.out / "heads.csv", _csv(summaries, list(summaries[0])))
    write_text(plan.out / "heads.md", heads_markdown(rows, summaries, seconds))
    base = CampaignResult.load(plan.campaign_dir(BASELINE, plan.seeds[0])).summary
    plot_improvements(rows, plan.variants, plan.out / "heads.png",
                      f"{base['model']} on {base['dataset']}: head variants against the baseline "
                      f"(clamp {base['clamp']})")
    return summaries
