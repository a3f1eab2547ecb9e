"""The initialisation ablation of the paper's Table 3: random, class-name and description features.

For one backbone and dataset the driver builds the three feature files, trains a text-guided model
from each (and a baseline, unless a finished baseline campaign is given), runs the same campaign on
every model and tabulates accuracy and the last-layer and overall ΔLoss improvements over the
baseline. Every step is a plain command line of this repository and resumes (see
:mod:`analysis.pipeline`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.pipeline import Step
from resilience.report import CampaignResult, table1_row
from resilience.storage import write_text

VARIANTS = ("random", "classname", "descriptions")
COLUMNS = ("variant", "text_accuracy", "baseline_accuracy", "last_layer_improvement", "overall_improvement",
           "text_last_layer_delta_loss", "text_delta_loss", "baseline_delta_loss", "injections_per_layer")


@dataclass
class AblationPlan:
    """What to train and inject for the ablation, and where everything goes."""

    out: Path
    config: str  # train.py recipe
    dataset: str
    encoder: str = "minilm"
    descriptions: str | None = None
    variants: Sequence[str] = VARIANTS
    train_args: Sequence[str] = ()
    inject_args: Sequence[str] = ()
    baseline_campaign: Path | None = None
    seed: int = 0

    def features(self, variant: str) -> Path:
        return self.out / "features" / f"{variant}.pth"

    def train_dir(self, variant: str) -> Path:
        return self.out / "train" / variant

    def campaign_dir(self, variant: str) -> Path:
        if variant == "baseline" and self.baseline_campaign is not None:
            return self.baseline_campaign
        return self.out / "campaigns" / variant


def ablation_steps(plan: AblationPlan) -> list[Step]:
    """The commands of the ablation, in order (baseline first unless its campaign is given)."""
    steps: list[Step] = []
    models = ([] if plan.baseline_campaign is not None else ["baseline"]) + list(plan.variants)
    for variant in models:
        train = ["train.py", "-c", plan.config, "--dataset", plan.dataset, "--seed", str(plan.seed),
                 "--output-dir", str(plan.train_dir(variant)), "--resume", "auto", *plan.train_args]
        if variant != "baseline":
            build = ["-m", "text_features.build", "--dataset", plan.dataset, "--variant", variant,
                     "--encoder", plan.encoder, "--seed", str(plan.seed), "--out", str(plan.features(variant))]
            if variant == "descriptions" and plan.descriptions:
                build += ["--descriptions", plan.descriptions]
            steps.append(Step(f"{variant} text features", build, plan.features(variant)))
            train += ["--head", "text", "--text-features", str(plan.features(variant))]
        steps.append(Step(f"train {variant}", train, plan.train_dir(variant) / "final_metrics.json"))
        inject = ["inject.py", "neurons", "--checkpoint", str(plan.train_dir(variant) / "checkpoint.pth"),
                  "--dataset", plan.dataset, "--seed", str(plan.seed), "--out", str(plan.campaign_dir(variant)),
                  *plan.inject_args]
        steps.append(Step(f"campaign {variant}", inject, plan.campaign_dir(variant) / "summary.json"))
    return steps


def ablation_table(plan: AblationPlan) -> list[dict[str, Any]]:
    """One row per variant: accuracies, ΔLoss and improvements over the baseline campaign."""
    base = CampaignResult.load(plan.campaign_dir("baseline"))
    rows = []
    for variant in plan.variants:
        row = table1_row(base, CampaignResult.load(plan.campaign_dir(variant)))
        rows.append({"variant": variant, **{k: row[k] for k in COLUMNS[1:]}})
    return rows


def write_ablation(rows: Sequence[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """ablation.csv (full precision) and ablation.md (the paper's Table 3 layout)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    lines = ["| Initialisation | Accuracy (%) | Last layer × | Overall × | ΔLoss text (network) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {row['variant']} | {100 * row['text_accuracy']:.2f} | {row['last_layer_improvement']:.3g} | "
              f"{row['overall_improvement']:.3g} | {row['text_delta_loss']:.4g} |" for row in rows]
    if rows:
        lines += ["", f"Baseline: accuracy {100 * rows[0]['baseline_accuracy']:.2f}%, network ΔLoss "
                      f"{rows[0]['baseline_delta_loss']:.4g}; {rows[0]['injections_per_layer']} injections per "
                      "layer. Improvement = baseline ΔLoss / text-guided ΔLoss."]
    return write_text(out / "ablation.csv", buf.getvalue()), write_text(out / "ablation.md", "\n".join(lines) + "\n")
